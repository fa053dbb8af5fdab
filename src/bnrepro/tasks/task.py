"""What every task is (the loop's side of it: batches in, evaluation records out) and what
every task checks. The tasks (mnist.py, imagenet.py) import this module, and the package's
`build_task` imports them: kept apart, so no import goes round in a circle."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from bnrepro.config.schema import RunConfig
from bnrepro.errors import ConfigError

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
    # With a validation split: the test set's records, read once, at the last evaluation.
    evaluate_final: Callable[[nn.Module], list[dict[str, float]]] | None = None
    # The validation split (size, seed, digest of its indices) that summaries record; or None.
    validation: dict[str, int | str] | None = None


def check_batch_size(cfg: RunConfig, train_size: int, per_process: bool = False) -> None:
    """ConfigError unless one batch of `data.batch_size` fits in the `train_size` training
    images. Epochs drop their incomplete last batch (every batch keeps BN's m), so a larger
    batch gives no batch at all: the first step or Algorithm 2's population batches (drawn the
    same way, any number of them) would fail with an IndexError. Only the task knows the
    training-set size, so each task calls this before it draws anything. Evaluation is
    chunked by `data.eval_batch_size` and takes any size, larger than the test set included."""
    if cfg.data.batch_size > train_size:
        share = " per process" if per_process else ""
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is larger than the training set "
            f"({train_size} images{share} in {cfg.data.name}): no batch can be drawn; use "
            f"data.batch_size<={train_size}"
        )
