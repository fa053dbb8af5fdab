"""How BN's inference statistics are obtained: the three modes the paper and PyTorch offer.

- ``ema``: PyTorch's exponential moving average (momentum 0.1, unbiased variance).
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

from collections.abc import Iterator
from itertools import islice

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

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
    # Population mode recomputes before every evaluation; the EMA in between costs no sync
    # and keeps the buffers meaningful if someone evaluates without recomputing.
    return layer(num_features, eps=eps, momentum=None if stats == "cumulative" else momentum)


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
