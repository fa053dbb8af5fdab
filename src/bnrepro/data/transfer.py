"""Host-to-device copies that do not make the host wait for the device.

A plain `tensor.to("cuda")` from ordinary (pageable) memory is a blocking copy: the host stops
until the GPU has run everything queued before it, which stalls the pipeline of a training
loop that otherwise never waits (training/loop.py). Per-step inputs go over with `to_device`.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a host-device sync: on a GPU a pinned copy of it goes
    over asynchronously, ordered on the current stream (torch's pinned-memory allocator keeps
    the pinned block until the copy has run). On a CPU: `tensor.to(device)`, i.e. itself."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
