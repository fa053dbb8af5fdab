"""Optimiser and learning-rate schedule from the `optim` config group."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops._utils import split_normalization_params

from bnrepro.config.schema import OptimConfig
from bnrepro.models.norms import NORM_CLASSES

# torchvision's normalisation classes (its default) and ours (models/norms.py).
_NORMS = [
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
    *NORM_CLASSES,
]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    """SGD (with momentum when set). Weight decay skips the norms' gamma and beta, as
    torchvision's reference scripts do with --norm-weight-decay 0: decaying gamma would fight
    the scale that BN is there to learn."""
    norm_params, other_params = split_normalization_params(model, _NORMS)
    groups = [{"params": other_params, "weight_decay": cfg.weight_decay}]
    if norm_params:
        groups.append({"params": norm_params, "weight_decay": cfg.norm_weight_decay})
    return torch.optim.SGD(
        groups,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        fused=cfg.fused or None,
    )


class StepwiseExponentialLR(torch.optim.lr_scheduler.ExponentialLR):
    """torch's ExponentialLR, advanced once every `every_steps` training steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, gamma: float, every_steps: int) -> None:
        self.every_steps = max(1, int(every_steps))
        self._steps_seen = 0
        super().__init__(optimizer, gamma=gamma)

    def step_batch(self) -> None:
        """Call once per training step."""
        self._steps_seen += 1
        if self._steps_seen % self.every_steps == 0:
            self.step()


class WarmupExponentialLR(torch.optim.lr_scheduler.LambdaLR):
    """Goyal et al. 2017's gradual warm-up, then StepwiseExponentialLR's decay: at step s
    (from 0) the rate is lr * min(1, (s + 1) / warmup_steps) * gamma ** (s // every_steps)."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, gamma: float, every_steps: int, warmup_steps: int
    ) -> None:
        every = max(1, int(every_steps))
        super().__init__(
            optimizer, lambda s: min(1.0, (s + 1) / warmup_steps) * gamma ** (s // every)
        )

    def step_batch(self) -> None:
        """Call once per training step."""
        self.step()


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig
) -> StepwiseExponentialLR | WarmupExponentialLR | None:
    """The paper's exponential decay (Section 4.2), after a linear warm-up where
    optim.schedule.warmup_steps is set; None for a constant rate."""
    if cfg.schedule is None:
        return None
    if cfg.schedule.warmup_steps:
        return WarmupExponentialLR(
            optimizer, cfg.schedule.gamma, cfg.schedule.every_steps, cfg.schedule.warmup_steps
        )
    return StepwiseExponentialLR(optimizer, cfg.schedule.gamma, cfg.schedule.every_steps)
