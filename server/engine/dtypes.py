"""The default compute dtype of a device.

CUDA: bfloat16. CPU: bfloat16 where the CPU has native bf16 arithmetic (AVX512-BF16 or AMX-BF16:
oneDNN then runs bf16 GEMMs at up to twice the fp32 rate and the weights stream half the bytes), float32
elsewhere, where bf16 is emulated and slower than float32. Measured on this project's CPU (AVX512-BF16,
docs/BENCHMARKS.md): our engine decodes 1.33-1.57x faster in bf16 than in float32.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU advertises bf16 arithmetic (Linux ``/proc/cpuinfo`` flags; False elsewhere)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
            return any(f in flags for f in NATIVE_BF16_FLAGS)
    return False


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on CUDA and on CPUs with native bf16, float32 otherwise."""
    kind = torch.device(device).type
    if kind == "cuda" or (kind == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32
