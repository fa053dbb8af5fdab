"""Where and in what form a run's tensors live: decided once per run, read everywhere else.

`decide_placement` turns the config (trainer.amp, trainer.channels_last) and the device the
process got (`DistEnv.device`, chosen by bnrepro.infra.distributed.pick_device from
trainer.device and the local rank) into a `Placement`. The task (bnrepro.tasks), the network
(training/run.py `build_model`) and the loop (training/loop.py) receive it and never ask
`device.type == "cuda"` themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bnrepro.config.schema import RunConfig
from bnrepro.infra.distributed import DistEnv


@dataclass(frozen=True)
class Placement:
    """A run's device and the forms its tensors take there."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # the forward passes' autocast dtype; None: plain fp32
    memory_format: torch.memory_format  # of the network's weights and the image batches
    pin_memory: bool  # DataLoaders hand over page-locked batches (fast, async host-to-device)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def channels_last(self) -> bool:
        """Whether images and convolution weights are NHWC (what bnrepro.data.imagenet takes)."""
        return self.memory_format == torch.channels_last

    def autocast(self) -> torch.autocast:
        """The forward pass's autocast context: off (a no-op) without an autocast dtype."""
        return autocast(self.device, self.autocast_dtype)


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to `dtype` on `device`; entered but disabled when `dtype` is None (torch then
    takes the device's default dtype, which nothing reads)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def decide_placement(cfg: RunConfig, env: DistEnv) -> Placement:
    """The one place that says what a run does on a GPU and not on a CPU."""
    t = cfg.trainer
    cuda = env.device.type == "cuda"
    return Placement(
        device=env.device,
        # bf16 only on CUDA: autocast is there for the GPU's tensor cores (the ImageNet runs).
        # CPU runs stay fp32, so a CPU result is the same whatever trainer.amp says, as the
        # committed results and the tests assume.
        autocast_dtype=torch.bfloat16 if cuda and t.amp == "bf16" else None,
        # channels_last only on CUDA: it is for cuDNN's fast NHWC convolution kernels; CPU
        # runs keep torch's default NCHW layout, and their numbers.
        memory_format=torch.channels_last if cuda and t.channels_last else torch.contiguous_format,
        # Pinned memory only on CUDA: page-locked batches let the copy to the GPU run
        # asynchronously (non_blocking=True); with the CPU as the device there is no copy.
        pin_memory=cuda,
    )
