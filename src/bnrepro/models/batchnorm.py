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

Ghost batches (``model.bn.ghost_batch`` = g; absent or null: the whole batch): in training
mode a layer splits its batch of N examples into N/g consecutive groups of g and normalises
each with its own mean and biased variance (same gamma, beta), while the gradient still
flows through the whole batch: Hoffer et al. 2017's "ghost batch normalization", and Ioffe
2017 ("Batch Renormalization", Section 4.2), whose workers split 32 examples into
micro-batches of 4. The groups are channels of one torch kernel call: (N, C, ...) becomes
(g, C*N/g, ...), channel c*N/g + k being channel c of group k (a copy each way; the stacked
(M, F, B) activations need none: (1, M*F*B/g, g) is a view). The running statistics (ema,
cumulative, and so Algorithm 2's recompute) are fed, per step, the average of the groups'
means and of their unbiased variances: Algorithm 2's E[x] and m/(m-1) E[var] with m = g
examples (g*H*W values per channel for convolutions), each group counting as one of its
mini-batches. Inference is unchanged: one affine map from the running statistics.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
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
        """A BN layer with these settings: torch's own, or its ghost-batch subclass when
        ghost_batch is set.

        dims=1 normalises each feature of (N, C) inputs; dims=2 each feature map of (N, C, H, W)
        inputs over the batch and all positions (Section 3.2).
        """
        if self.ghost_batch is None:
            layer = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims]
            return layer(num_features, eps=self.eps, momentum=self.layer_momentum)
        ghost = {1: GhostBatchNorm1d, 2: GhostBatchNorm2d}[dims]
        return ghost(num_features, self.ghost_batch, eps=self.eps, momentum=self.layer_momentum)

    def stacked_layer(self, members: int, features: int) -> StackedBatchNorm:
        """The BN layer of `members` stacked MLPs' (M, F, B) activations (models/stacked_mlp.py),
        one channel per member and feature."""
        return StackedBatchNorm(
            members, features, eps=self.eps, momentum=self.layer_momentum, ghost=self.ghost_batch
        )

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


def ghost_groups(batch: int, ghost_batch: int) -> int:
    """How many ghost batches of `ghost_batch` examples a batch of `batch` makes; ValueError
    unless it divides (RunConfig checks data.batch_size before a run starts)."""
    if batch % ghost_batch:
        raise ValueError(
            f"a batch of {batch} examples does not split into ghost batches of "
            f"model.bn.ghost_batch={ghost_batch}: use a batch size that is a multiple of it"
        )
    return batch // ghost_batch


def group_average(stat: Tensor, groups: int) -> Tensor:
    """Per channel, the average over groups of a grouped layout's (channel c*groups + k)."""
    return stat.view(-1, groups).mean(dim=1)


def to_ghost_layout(x: Tensor, ghost_batch: int) -> tuple[Tensor, int]:
    """(N, C, ...) `x` as (g, C*n, ...), its n groups of g consecutive examples as channels:
    channel c*n + k is channel c of group k, so per-channel statistics are per group; and n."""
    groups = ghost_groups(x.shape[0], ghost_batch)
    rest = x.shape[2:]
    per_group = x.reshape(groups, ghost_batch, x.shape[1], *rest)
    return per_group.movedim(0, 2).reshape(ghost_batch, -1, *rest), groups


def from_ghost_layout(out: Tensor, like: Tensor, groups: int) -> Tensor:
    """`to_ghost_layout` undone: `out` back to the shape and memory format of `like`."""
    channels, rest = like.shape[1], like.shape[2:]
    out = out.reshape(out.shape[0], channels, groups, *rest).movedim(2, 0)
    channels_last = like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return out.reshape(like.shape).contiguous(memory_format=layout)


def ghost_batch_norm(layer: _BatchNorm, grouped: Tensor, groups: int) -> Tensor:
    """Training-mode BN of `grouped`, the layout `layer.grouped` makes: channel c*groups + k
    is the layer's channel c in group k, normalised with that group's mean and biased
    variance and the layer's gamma_c, beta_c (torch's kernel). The layer's running
    statistics (if it tracks them) move as torch moves them, towards the groups' average mean
    and average unbiased variance (the module docstring says why)."""
    track = layer.training and layer.track_running_stats
    if track:
        # momentum 1 writes the groups' mean and unbiased variance into these (1*s + 0*0).
        size, like = layer.num_features * groups, layer.running_mean
        mean, var = like.new_zeros(size), like.new_zeros(size)
    else:
        mean = var = None
    weight = None if layer.weight is None else layer.weight.repeat_interleave(groups)
    bias = None if layer.bias is None else layer.bias.repeat_interleave(groups)
    out = F.batch_norm(grouped, mean, var, weight, bias, True, 1.0, layer.eps)
    if track:
        # torch's _BatchNorm.forward: the EMA's momentum, or 1/k for the cumulative average.
        factor = 0.0 if layer.momentum is None else layer.momentum
        if layer.num_batches_tracked is not None:
            layer.num_batches_tracked.add_(1)
            if layer.momentum is None:
                factor = 1.0 / float(layer.num_batches_tracked)
        with torch.no_grad():  # torch's order: momentum * new + (1 - momentum) * running
            for running, stat in ((layer.running_mean, mean), (layer.running_var, var)):
                running.mul_(1.0 - factor).add_(group_average(stat, groups).mul_(factor))
    return out


def ghost_batch_stats(layer: _BatchNorm, x: Tensor) -> tuple[Tensor, Tensor]:
    """What a ghost-batch layer's running statistics are fed for input `x`: per channel, the
    average of its groups' means and of their unbiased variances."""
    grouped, groups = layer.grouped(x.detach())
    dims = [d for d in range(grouped.dim()) if d != 1]
    var, mean = torch.var_mean(grouped, dim=dims, correction=1)
    return group_average(mean, groups), group_average(var, groups)


class _GhostBatchNorm:
    """torch's BN on (N, C, ...) inputs, with statistics per ghost batch of `ghost_batch`
    consecutive examples in training mode (the module docstring); torch's own in evaluation."""

    def __init__(
        self, num_features: int, ghost_batch: int, eps: float, momentum: float | None
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.ghost_batch = ghost_batch

    def grouped(self, x: Tensor) -> tuple[Tensor, int]:
        """`x` as (g, C*n, ...), the n groups of g examples as channels c*n + k; and n."""
        return to_ghost_layout(x, self.ghost_batch)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and self.running_mean is not None:
            return super().forward(x)  # running statistics: every example alike
        self._check_input_dim(x)
        grouped, groups = self.grouped(x)
        return from_ghost_layout(ghost_batch_norm(self, grouped, groups), x, groups)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch={self.ghost_batch}"


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    """BatchNorm1d with ghost batches of `ghost_batch` examples in training mode."""


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    """BatchNorm2d with ghost batches of `ghost_batch` examples in training mode: each feature
    map's statistics over g examples and all positions."""


class StackedBatchNorm(nn.BatchNorm1d):
    """BN per member and feature of (M, F, B) activations, as channels of a (1, M*F, B) view:
    torch's own kernel, statistics over each member's B examples, members never mixed. Member
    i's statistics and gamma, beta are entries i*F .. (i+1)*F - 1. With `ghost` = g, training
    statistics are over each member's consecutive groups of g examples, the channels of a
    (1, M*F*B/g, g) view."""

    def __init__(
        self,
        members: int,
        features: int,
        eps: float,
        momentum: float | None,
        ghost: int | None = None,
    ) -> None:
        super().__init__(members * features, eps=eps, momentum=momentum)
        self.members, self.features, self.ghost_batch = members, features, ghost

    def grouped(self, h: Tensor) -> tuple[Tensor, int]:
        """`h` as (1, M*F*n, g), member-feature c's group k in channel c*n + k; and n."""
        groups = ghost_groups(h.shape[-1], self.ghost_batch)
        return h.reshape(1, -1, self.ghost_batch), groups

    def forward(self, h: Tensor) -> Tensor:
        if self.ghost_batch is None or (not self.training and self.running_mean is not None):
            return super().forward(h.reshape(1, -1, h.shape[-1])).view_as(h)
        return ghost_batch_norm(self, *self.grouped(h)).view_as(h)

    def extra_repr(self) -> str:
        ghost = "" if self.ghost_batch is None else f", ghost_batch={self.ghost_batch}"
        return f"{super().extra_repr()}{ghost}"


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
