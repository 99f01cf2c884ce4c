"""``triton.autotune`` with results that survive process restarts, and an interpreter bypass.

Persistence: Triton (>= 3.2, so the 3.6 on the H200 and the 3.9 here) can store autotuning
results on disk itself: ``triton.autotune(..., cache_results=True)`` (or ``TRITON_CACHE_AUTOTUNING=1``)
writes ``<kernel>.autotune.json`` (every config's timing) into Triton's cache directory
(``TRITON_CACHE_DIR``, default ``~/.triton/cache``) under a hash of the Triton version, the GPU
target, the kernel *source*, the cache-invalidating env vars, the tuning key values (for our
kernels: M bucket, N, K, R, split) and the argument dtypes. A restarted process finds that file
and skips benchmarking; the compiled binaries sit in the same directory, so a warm restart costs
neither tuning nor compilation. Because the kernel source is part of the hash, editing a kernel
invalidates its stale configs automatically, which a hand-rolled JSON keyed by device and shape
would not. We therefore use the native mechanism rather than a second cache under
``~/.cache/modegpt``; deployments that want the cache on a persistent volume set
``TRITON_CACHE_DIR``. The GPU model is part of the key through the backend target (sm_90 etc.).
The engine's own timed picks (our kernel or cuBLAS per shape, ``skinny_linear._timed_pick``) are kept
in the same directory by ``kernels.pick_store``.

Tuning happens on the first call for a new key, which benchmarks kernels: it must not happen
during CUDA-graph capture, so the engine warms every (M bucket, shape) it will capture first
(``kernels.bench`` does the same).

Cold start: Triton's autotuner compiles the configs of a new key one after another, and a fresh
GPU machine spent minutes there (2026-11-29, session 5: two engine A/Bs produced nothing within 240 s
and 170 s). Before a key is tuned for the first time, :func:`launch` therefore compiles all its pruned
configs at once on a thread pool (Triton's ``AsyncCompileMode``, Triton >= 3.4; its compiler
releases the GIL: measured 1.8x on this project's 2-core CPU machine for 4 sm_90 compiles on 2
threads), so the autotuner finds them compiled. Timing uses short windows (``_quick_bench``).

``MODEGPT_AUTOTUNE=off`` skips tuning (the first config that passes pruning and fits in shared
memory); the test suite sets it.

Interpreter: under ``TRITON_INTERPRET=1`` there is nothing to time, so launchers call the
undecorated kernel with one small fixed config (``interpret_config``) whose tiles are smaller than
the test shapes: loops run several iterations with ragged tails, which is what the tests must cover.
"""
from __future__ import annotations

import functools
import inspect
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import triton
import triton.testing

from ._common import interpret_mode


def _quick_bench(fn, quantiles=None, **_):
    # Short warm-up/repeat windows (ms): decode kernels take microseconds, and an engine start must
    # tune dozens of shapes. do_bench clears the L2 (a 256 MB memset, ~0.1 ms) before every timed call,
    # so a 10 us kernel costs ~0.1 ms per repetition: 8 ms of kernel time is ~800 repetitions, ~0.1 s per
    # config, and their median is stable to a few percent.
    return triton.testing.do_bench(fn, warmup=2, rep=8, quantiles=quantiles)


def autotune(configs: Sequence[triton.Config], key: list[str],
             prune: Callable | None = None) -> Callable:
    """``triton.autotune`` with disk-cached results (where the installed Triton supports it)."""
    params = inspect.signature(triton.autotune).parameters
    kwargs: dict = {"configs": list(configs), "key": key}
    if prune is not None:
        kwargs["prune_configs_by"] = {"early_config_prune": prune}
    if "cache_results" in params:
        kwargs["cache_results"] = True
    if "do_bench" in params:
        kwargs["do_bench"] = _quick_bench
    else:  # pragma: no cover - Triton < 3.2
        kwargs["warmup"], kwargs["rep"] = 5, 25
    return triton.autotune(**kwargs)


def autotuning_enabled() -> bool:
    """False under ``MODEGPT_AUTOTUNE=off``: launches take the first config that survives pruning,
    with no benchmarking (the tests' setting: correctness does not need tuned tiles, and tuning
    every shape of the real-shape suite cost minutes on the H200)."""
    return os.environ.get("MODEGPT_AUTOTUNE", "on").strip().lower() not in ("off", "0", "false", "no")


def pruned_configs(kernel, args: tuple, kwargs: dict) -> list[triton.Config]:
    """The configs of the autotuned ``kernel`` that its pruner keeps for this launch, in order."""
    configs = kernel.configs
    if getattr(kernel, "early_config_prune", None):
        configs = kernel.early_config_prune(configs, dict(zip(kernel.arg_names, args)), **kwargs)
    return list(configs)


def first_config(kernel, args: tuple, kwargs: dict) -> triton.Config:
    """The config an untuned launch of the autotuned ``kernel`` starts from: the first its pruner keeps."""
    return pruned_configs(kernel, args, kwargs)[0]


def _untuned_launch(kernel, grid, args: tuple, kwargs: dict) -> None:
    """The first pruned config that fits the GPU: a config can need more shared memory than the SM
    has for some dtypes (fp32 doubles every tile; measured on the H200: the low-rank expand's first
    config asked for 248 KB at fp32), which the autotuner would have skipped as failed."""
    configs = pruned_configs(kernel, args, kwargs)
    for i, cfg in enumerate(configs):
        try:
            kernel.fn[grid](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            return
        except triton.runtime.errors.OutOfResources:
            if i == len(configs) - 1:
                raise


def tuning_key(kernel, args: tuple, kwargs: dict) -> tuple:
    """The key under which Triton's autotuner stores this launch's best config (as its ``run``
    computes it: the values of the ``key`` arguments, then the dtypes of the tensor arguments)."""
    named = {k: v for k, v in {**dict(zip(kernel.arg_names, args)), **kwargs}.items() if k in kernel.arg_names}
    return tuple([named[k] for k in kernel.keys if k in named]
                 + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")])


@functools.lru_cache(maxsize=1)
def _compile_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, min(32, os.cpu_count() or 1)), thread_name_prefix="triton-compile")


def precompile(kernel, grid, args: tuple, kwargs: dict) -> bool:
    """Compile every pruned config of the autotuned ``kernel`` for this launch, in parallel, unless
    its tuning key is already tuned (then there is nothing to compile). False where the installed
    Triton has no async compile mode, or during a CUDA-graph capture (a first compile loads a module,
    which would invalidate the capture; the caller's launch then fails loudly as before)."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:  # pragma: no cover - Triton < 3.4
        return False
    import torch

    if tuning_key(kernel, args, kwargs) in kernel.cache or torch.cuda.is_current_stream_capturing():
        return False
    with AsyncCompileMode(_compile_pool()):
        kernel.warmup(*args, grid=grid, **kwargs)
    return True


def launch(kernel, grid, args: tuple, kwargs: dict, interpret_config: dict) -> None:
    """Launch an autotuned ``kernel``; under the interpreter, its raw function with a fixed config;
    with autotuning off, its raw function with its first valid config that fits; otherwise tuned,
    with all configs of a new key compiled in parallel first (:func:`precompile`)."""
    if interpret_mode():
        fn = kernel.fn if hasattr(kernel, "fn") else kernel
        fn[grid](*args, **kwargs, **interpret_config)
    elif not autotuning_enabled() and hasattr(kernel, "configs"):
        _untuned_launch(kernel, grid, args, kwargs)
    else:
        if hasattr(kernel, "configs") and len(kernel.configs) > 1:
            precompile(kernel, grid, args, kwargs)
        kernel[grid](*args, **kwargs)
