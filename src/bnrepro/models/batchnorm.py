"""How BN's inference statistics are obtained: the three modes the paper and PyTorch offer.

`BNStats` holds a network's choice (the config's ``model.bn``), builds its BN layers (torch's,
or `StackedBatchNorm` for seeds stacked in one StackedMLP) and refreshes their statistics
before an evaluation.

- ``ema``: PyTorch's exponential moving average (``model.bn.momentum``, unbiased variance).
- ``cumulative``: the plain average over every training batch seen (``momentum=None``).
- ``population``: Algorithm 2 of the paper: before each evaluation, forget the running
  statistics and average them over K training mini-batches of size m with the trained
  weights; PyTorch's unbiased per-batch variance makes that m/(m-1) * E_B[var_B].

Only ``cumulative`` builds layers with ``momentum=None``: torch then reads
``num_batches_tracked`` on the host at every training forward (one GPU sync per layer per
step, and a step no CUDA graph can capture). Population mode trains with the EMA buffers,
which its recompute discards, and the recompute passes the cumulative factor 1/k as a
Python float: the same arithmetic as ``momentum=None``, without the sync.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict
from itertools import islice
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnrepro.config.schema import BNSettings, parse


class BNStats(BNSettings):
    """How a network's BN layers get their inference statistics (Section 3.1 / Algorithm 2).

    The config's `model.bn` (its fields, types and checks are bnrepro.config.schema.BNSettings; its
    values live in configs/model only), with what the models, tasks and loop ask of it.
    """

    @classmethod
    def from_config(cls, bn: Mapping[str, Any] | BNSettings) -> BNStats:
        """The settings of a `model.bn` mapping (every key, checked: ConfigError otherwise)."""
        if isinstance(bn, BNStats):
            return bn
        if isinstance(bn, BNSettings):
            return cls(**asdict(bn))
        return parse(cls, bn, "model.bn")

    @property
    def layer_momentum(self) -> float | None:
        """The momentum BN layers are built with: None (torch's cumulative average) only for
        cumulative; population trains with the EMA, which its recompute discards."""
        return None if self.stats == "cumulative" else self.momentum

    @property
    def needs_population_batches(self) -> bool:
        """Whether evaluations need training batches to recompute the statistics (Algorithm 2)."""
        return self.stats == "population"

    def layer(self, num_features: int, dims: int = 1) -> nn.BatchNorm1d | nn.BatchNorm2d:
        """A BN layer with these settings.

        dims=1 normalises each feature of (N, C) inputs; dims=2 each feature map of (N, C, H, W)
        inputs over the batch and all positions (Section 3.2).
        """
        layer = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims]
        return layer(num_features, eps=self.eps, momentum=self.layer_momentum)

    def stacked_layer(self, members: int, features: int) -> StackedBatchNorm:
        """The BN layer of `members` stacked MLPs' (M, F, B) activations (models/stacked_mlp.py),
        one channel per member and feature."""
        return StackedBatchNorm(members, features, eps=self.eps, momentum=self.layer_momentum)

    def refresh(
        self, model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None
    ) -> None:
        """Make the inference statistics current before an evaluation: population mode
        recomputes them from K training batches; ema and cumulative keep what training built."""
        if not self.needs_population_batches:
            return
        if batches is None:
            raise ValueError("model.bn.stats=population needs training batches to recompute from")
        recompute_population_stats(model, batches, self.population_batches)


class StackedBatchNorm(nn.BatchNorm1d):
    """BN per member and feature of (M, F, B) activations, as channels of a (1, M*F, B) view:
    torch's own kernel, statistics over each member's B examples, members never mixed. Member
    i's statistics and gamma, beta are entries i*F .. (i+1)*F - 1."""

    def __init__(self, members: int, features: int, eps: float, momentum: float | None) -> None:
        super().__init__(members * features, eps=eps, momentum=momentum)
        self.members, self.features = members, features

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return super().forward(h.reshape(1, -1, h.shape[-1])).view_as(h)


def recompute_population_stats(
    model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], num_batches: int
) -> None:
    """Algorithm 2: set every BN layer's running mean/var to population estimates.

    As torch's `update_bn`: reset the buffers, run K batches through the model in training
    mode with a cumulative average, restore the model's mode and momenta. Unlike it, the
    factor of batch k is given as momentum 1/k, which keeps the host out of the loop (see the
    module docstring). Dropout stays active while it runs, so the statistics describe the
    same distribution the layer saw in training.
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers:
        return
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            for k, (x, _) in enumerate(islice(batches, num_batches), start=1):
                for layer in layers:
                    layer.momentum = 1.0 / k  # torch's cumulative factor, 1/num_batches_tracked
                model(x)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
        model.train(was_training)
