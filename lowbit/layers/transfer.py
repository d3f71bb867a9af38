"""Host-to-device copies that do not make the host wait for the device.

`torch.tensor(..., device="cuda")` synchronizes the stream, and a `non_blocking` copy from pageable
memory may too (the driver stages it through pinned memory; CUDA allows it to synchronize with
the stream first), which would stall the host behind the GPU work already queued and undo
asynchronous scheduling. So the host side is put in pinned memory (torch's caching host allocator
keeps each buffer until its copy has run) and copied without blocking.
"""
from __future__ import annotations

import numpy as np
import torch


def pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` (on the host) in pinned memory when it is bound for a CUDA device, else as it is."""
    return t.pin_memory() if torch.device(device).type == "cuda" else t


def to_device(vals, dtype: torch.dtype, device) -> torch.Tensor:
    """Host values (a sequence, or a numpy array) on `device`, queued behind the device's work."""
    t = torch.from_numpy(vals) if isinstance(vals, np.ndarray) else torch.tensor(vals, dtype=dtype)
    return pinned(t.to(dtype), device).to(device, non_blocking=True)


def copy_to(dst: torch.Tensor, src: torch.Tensor) -> None:
    """`dst.copy_(src)` from a host tensor, queued behind the device's work."""
    dst.copy_(pinned(src, dst.device), non_blocking=True)
