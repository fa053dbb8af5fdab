"""The training loop: one step, one evaluation, and the loop that alternates them."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from bnrepro.data.mnist import MnistTensors
from bnrepro.models.batchnorm import recompute_population_stats
from bnrepro.probes import nonlinearity_input_percentiles
from bnrepro.tracking import Tracker

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LoopSettings:
    """What the loop needs from the config, flattened."""

    steps: int
    eval_every: int
    eval_at_start: bool
    probe_images: int
    probe_unit: int
    percentiles: list[float]
    bn_stats: str = "ema"
    population_batches: int = 100
    progress: bool = True
    progress_desc: str = "train"


@dataclass
class LoopResult:
    status: str  # "completed" or "diverged"
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    diverged_at_step: int | None = None


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x, y) -> torch.Tensor:
    """One SGD step on one mini-batch; returns the detached loss."""
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Test loss and accuracy (percent) with inference-mode BN."""
    was_training = model.training
    model.eval()
    logits = model(x)
    model.train(was_training)
    return {
        "test/loss": F.cross_entropy(logits, y).item(),
        "test/acc": 100.0 * (logits.argmax(dim=1) == y).sum().item() / y.numel(),
    }


def evaluation_record(
    model: nn.Module, data: MnistTensors, settings: LoopSettings, population: Batches
) -> dict[str, float]:
    """Everything logged at one evaluation: test metrics and the activation percentiles."""
    if settings.bn_stats == "population":
        recompute_population_stats(model, population, settings.population_batches)
    record = evaluate(model, data.test_x, data.test_y)
    record |= nonlinearity_input_percentiles(
        model,
        model.nonlinearities(),
        data.test_x[: settings.probe_images],
        settings.probe_unit,
        settings.percentiles,
    )
    return record


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: MnistTensors,
    train_batches: Batches,
    population_batches: Batches,
    settings: LoopSettings,
    tracker: Tracker,
) -> LoopResult:
    """Train for `settings.steps`, evaluating every `eval_every` steps and at the end.

    A non-finite loss stops the run as "diverged": a result to record, not a crash.
    """
    result = LoopResult(status="completed", steps=0)
    loss_sum, loss_count = 0.0, 0
    window_start = time.perf_counter()
    if settings.eval_at_start:
        record = {"step": 0} | evaluation_record(model, data, settings, population_batches)
        tracker.log(record)
        result.history.append(record)
    model.train()
    bar = tqdm(
        total=settings.steps,
        desc=settings.progress_desc,
        disable=not settings.progress,
        mininterval=1.0,
        unit="step",
        dynamic_ncols=True,
    )
    with bar:
        for step in range(1, settings.steps + 1):
            x, y = next(train_batches)
            loss = train_step(model, optimizer, x, y).item()
            result.steps = step
            bar.update(1)
            if not math.isfinite(loss):
                result.status, result.diverged_at_step = "diverged", step
                tracker.log({"step": step, "train/loss": loss})
                break
            loss_sum, loss_count = loss_sum + loss, loss_count + 1
            if step % settings.eval_every and step != settings.steps:
                continue
            record = {"step": step, "train/loss": loss_sum / loss_count}
            record["perf/steps_per_s"] = loss_count / (time.perf_counter() - window_start)
            record |= evaluation_record(model, data, settings, population_batches)
            tracker.log(record)
            result.history.append(record)
            bar.set_postfix(loss=f"{record['train/loss']:.4f}", acc=f"{record['test/acc']:.2f}")
            loss_sum, loss_count = 0.0, 0
            window_start = time.perf_counter()
    return result
