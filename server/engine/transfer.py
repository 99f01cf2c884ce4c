"""Host lists to device tensors without waiting for the device.

`torch.tensor(values, device="cuda")` copies from pageable memory, and such a copy makes the host wait
until the stream has drained: every step launched ahead of the host (`LLMEngine`'s async scheduling)
would be waited for by the next step's input copies. `to_device` stages the values in pinned memory
and copies them without blocking; the caching host allocator keeps the staging buffer until its copy
has run.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> Tensor:
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
