"""How BN's inference statistics are obtained: the three modes the paper and PyTorch offer.

- ``ema``: PyTorch's exponential moving average (momentum 0.1, unbiased variance).
- ``cumulative``: the plain average over every training batch seen (``momentum=None``).
- ``population``: Algorithm 2 of the paper: before each evaluation, forget the running
  statistics and average them over K training mini-batches of size m with the trained
  weights; PyTorch's unbiased per-batch variance makes that m/(m-1) * E_B[var_B].
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from bnrepro.choices import STATS_MODES


def make_batchnorm(
    num_features: int, stats: str, momentum: float, eps: float, dims: int = 1
) -> nn.BatchNorm1d | nn.BatchNorm2d:
    """A BatchNorm layer whose running statistics follow `stats` (one of STATS_MODES).

    dims=1 normalises each feature of (N, C) inputs; dims=2 each feature map of (N, C, H, W)
    inputs over the batch and all positions (Section 3.2).
    """
    if stats not in STATS_MODES:
        raise ValueError(f"bn stats must be one of {STATS_MODES}, got {stats!r}")
    layer = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims]
    # Population mode recomputes before every evaluation; a cumulative average in between
    # costs nothing and keeps the buffers meaningful if someone evaluates without recomputing.
    return layer(num_features, eps=eps, momentum=momentum if stats == "ema" else None)


def recompute_population_stats(
    model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], num_batches: int
) -> None:
    """Algorithm 2: set every BN layer's running mean/var to population estimates.

    torch's `update_bn` resets the buffers, runs the model in training mode with a cumulative
    average, and restores the model's mode and momenta. Dropout stays active while it runs,
    so the statistics describe the same distribution the layer saw in training.
    """
    inputs: Iterable[torch.Tensor] = (x for x, _ in islice(batches, num_batches))
    with torch.no_grad():
        update_bn(inputs, model)
