"""A task is what the loop trains on: batches in, evaluation records out.

`build_task` picks the dataset's task from `data.name`; the loop (loop.py) never needs
to know whether it trains the MNIST MLP or BN-Inception.
"""

from __future__ import annotations

from bnrepro.config.schema import RunConfig
from bnrepro.infra.distributed import DistEnv
from bnrepro.models.batchnorm import BNStats

# What a task is and what each checks (tasks/task.py), under the package's name too.
from bnrepro.tasks.task import (
    POPULATION_SEED_OFFSET,
    PRECISE_SEED_OFFSET,
    Batches,
    Task,
    check_batch_size,
)
from bnrepro.training.placement import Placement

__all__ = [
    "POPULATION_SEED_OFFSET",
    "PRECISE_SEED_OFFSET",
    "Batches",
    "Task",
    "build_task",
    "check_batch_size",
]


def build_task(cfg: RunConfig, env: DistEnv, placement: Placement, bn: BNStats | None) -> Task:
    """The task of `cfg.data.name` for this rank (`env`), its tensors on `placement`, with
    population batches when `bn` needs them; data problems raise DataError before any
    training."""
    if cfg.data.name in ("mnist", "fashion_mnist"):
        from bnrepro.tasks.mnist import build_mnist_task

        return build_mnist_task(cfg, env, placement, bn)
    if cfg.data.name == "imagenet":
        from bnrepro.tasks.imagenet import build_imagenet_task

        return build_imagenet_task(cfg, env, placement, bn)
    raise ValueError(f"unknown data.name {cfg.data.name!r}")
