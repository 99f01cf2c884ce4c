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

Tuning happens on the first call for a new key, which benchmarks kernels: it must not happen
during CUDA-graph capture, so the engine warms every (M bucket, shape) it will capture first
(``kernels.bench`` does the same).

``MODEGPT_AUTOTUNE=off`` skips tuning (the first config that passes pruning and fits in shared
memory); the test suite sets it.

Interpreter: under ``TRITON_INTERPRET=1`` there is nothing to time, so launchers call the
undecorated kernel with one small fixed config (``interpret_config``) whose tiles are smaller than
the test shapes: loops run several iterations with ragged tails, which is what the tests must cover.
"""
from __future__ import annotations

import inspect
import os
from typing import Callable, Sequence

import triton
import triton.testing

from ._common import interpret_mode


def _quick_bench(fn, quantiles=None, **_):
    # Short warm-up/repeat windows (ms): decode kernels take microseconds, and the bench must tune
    # dozens of shapes within minutes. Medians over 25 ms are stable to a few percent.
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


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


def launch(kernel, grid, args: tuple, kwargs: dict, interpret_config: dict) -> None:
    """Launch an autotuned ``kernel``; under the interpreter, its raw function with a fixed config;
    with autotuning off, its raw function with its first valid config that fits."""
    if interpret_mode():
        fn = kernel.fn if hasattr(kernel, "fn") else kernel
        fn[grid](*args, **kwargs, **interpret_config)
    elif not autotuning_enabled() and hasattr(kernel, "configs"):
        _untuned_launch(kernel, grid, args, kwargs)
    else:
        kernel[grid](*args, **kwargs)
