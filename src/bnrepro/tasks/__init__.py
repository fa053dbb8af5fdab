"""A task is what the loop trains on: batches in, evaluation records out.

`build_task` picks the dataset's task from `data.name` (what a task is: tasks/task.py); the
loop (training/loop.py) never needs to know whether it trains the MNIST MLP or BN-Inception.
"""

from __future__ import annotations

from bnrepro.config.schema import RunConfig
from bnrepro.infra.distributed import DistEnv
from bnrepro.models.batchnorm import BNStats
from bnrepro.tasks.task import Task
from bnrepro.training.placement import Placement


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
