"""Optimiser and learning-rate schedule from the `optim` config group."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchvision.ops._utils import split_normalization_params


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.SGD:
    """SGD (with momentum when set). Weight decay skips BN's gamma and beta, as
    torchvision's reference scripts do with --norm-weight-decay 0: decaying gamma would fight
    the scale that BN is there to learn."""
    norm_params, other_params = split_normalization_params(model)
    groups = [{"params": other_params, "weight_decay": cfg["weight_decay"]}]
    if norm_params:
        groups.append({"params": norm_params, "weight_decay": cfg["norm_weight_decay"]})
    return torch.optim.SGD(
        groups,
        lr=cfg["lr"],
        momentum=cfg["momentum"],
        nesterov=cfg.get("nesterov", False),
        fused=cfg.get("fused") or None,
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


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any]
) -> StepwiseExponentialLR | None:
    """The paper's exponential decay (Section 4.2), or None for a constant rate."""
    schedule = cfg.get("schedule")
    if not schedule:
        return None
    if schedule["name"] != "exponential":
        raise ValueError(f"unknown schedule {schedule['name']!r}; only 'exponential' exists")
    return StepwiseExponentialLR(optimizer, schedule["gamma"], schedule["every_steps"])
