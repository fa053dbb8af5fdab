"""A task is what the loop trains on: batches in, evaluation records out.

`build_task` picks the dataset's task from `data.name`; the loop (loop.py) never needs
to know whether it trains the MNIST MLP or BN-Inception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from bnrepro.config.schema import RunConfig
from bnrepro.infra.distributed import DistEnv
from bnrepro.models.batchnorm import BNStats

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]

# Population statistics draw their own batches, seeded apart from the training order, so a
# seed's training data order is the same whichever BN statistics mode is chosen.
POPULATION_SEED_OFFSET = 1_000_003
PRECISE_SEED_OFFSET = 2_000_003  # the whole-training-set passes of precise BN, likewise


@dataclass
class Task:
    train_batches: Batches
    # Batches for Algorithm 2's population statistics, drawn separately so the training
    # order of a seed does not depend on the statistics mode. None when not needed.
    population_batches: Batches | None
    # One record per member of the model (a plain network is one member).
    evaluate: Callable[[nn.Module], list[dict[str, float]]]
    probe_x: torch.Tensor  # fixed inputs for the activation-percentile traces
    monitor: str  # the accuracy key the summary reports, e.g. "test/acc" or "val/top1"
    # One pass over the whole training set in training-size batches, a fresh order per call
    # (precise BN, bn_estimators.py); None where the probe is off or the data is not in memory.
    epoch_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None


def build_task(cfg: RunConfig, env: DistEnv, bn: BNStats | None) -> Task:
    """The task of `cfg.data.name`, with population batches when `bn` needs them; data
    problems raise DataError before any training."""
    if cfg.data.name in ("mnist", "fashion_mnist"):
        from bnrepro.tasks.mnist import build_mnist_task

        return build_mnist_task(cfg, env, bn)
    if cfg.data.name == "imagenet":
        from bnrepro.tasks.imagenet import build_imagenet_task

        return build_imagenet_task(cfg, env, bn)
    raise ValueError(f"unknown data.name {cfg.data.name!r}")
