"""Triton device helpers shared by the kernels."""
import triton
import triton.language as tl

# ``PRECISION`` values: "ieee" (exact fp32 products), "tf32" (the default; ignored by 16-bit
# operands), "upcast" (interpreter only, see below).


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` in fp32.

    "upcast" works around the CPU interpreter's dot, which multiplies bf16 operands as their raw
    uint16 storage (Triton 3.6-3.9). Upcasting bf16 to fp32 is exact and products of bf16 values
    are exact in fp32, so it computes what the GPU's bf16 MMA with fp32 accumulation computes.
    """
    if PRECISION == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Programmatic dependent launch (``kernels._common.pdl_enabled``): block until the previous
    kernel on the stream has completed and its writes are visible, then allow the next kernel to
    launch (its programs start, prefetch their weights and wait here in turn). Everything before
    this call may read only data no kernel of the step writes (weights); every program must call
    it, before any activation load and any store. A no-op when ``PDL`` is False."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def l2_prefetch(ptrs):
    """Ask the L2 to fetch the 128-byte lines at ``ptrs`` (one ``prefetch.global.L2::evict_last``
    per element; nothing is loaded into registers and nothing waits for it). CUDA only: launchers
    enable it through ``kernels._common.l2_prefetch_bytes``, which is 0 off the GPU."""
    tl.inline_asm_elementwise("mov.u32 $0, 0;\n\tprefetch.global.L2::evict_last [$1];", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)
