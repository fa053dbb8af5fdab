"""The training loop: one step, one evaluation, and the loop that alternates them."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from bnrepro.distributed import DistEnv, average_bn_buffers, mean_across_ranks
from bnrepro.models.batchnorm import recompute_population_stats
from bnrepro.optim import StepwiseExponentialLR
from bnrepro.probes import nonlinearity_input_percentiles
from bnrepro.tasks import Task
from bnrepro.tracking import Tracker


@dataclass
class LoopSettings:
    """What the loop needs from the config, flattened."""

    steps: int
    eval_every: int
    eval_at_start: bool
    probe_unit: int
    percentiles: list[float]
    bn_stats: str = "ema"
    population_batches: int = 100
    amp: bool = False  # bf16 autocast (GPU only)
    progress: bool = True
    progress_desc: str = "train"


@dataclass
class LoopResult:
    status: str  # "completed" or "diverged"
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    diverged_at_step: int | None = None


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    amp: bool = False,
) -> torch.Tensor:
    """One SGD step on one mini-batch; returns the detached loss."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def evaluation_record(
    model: nn.Module, task: Task, settings: LoopSettings, env: DistEnv
) -> dict[str, float]:
    """Everything logged at one evaluation: the task's metrics and the activation percentiles.

    `model` is the bare network (not the DDP wrapper): evaluation runs no collective of DDP.
    """
    if settings.bn_stats == "population":
        recompute_population_stats(model, task.population_batches, settings.population_batches)
    average_bn_buffers(env, model)
    record = task.evaluate(model)
    record |= nonlinearity_input_percentiles(
        model, model.nonlinearities(), task.probe_x, settings.probe_unit, settings.percentiles
    )
    return record


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: StepwiseExponentialLR | None,
    task: Task,
    settings: LoopSettings,
    tracker: Tracker,
    env: DistEnv,
) -> LoopResult:
    """Train for `settings.steps`, evaluating every `eval_every` steps and at the end.

    `model` is what trains (possibly DDP-wrapped or compiled); evaluation uses the bare network.
    A non-finite loss stops the run as "diverged": a result to record, not a crash.
    """
    network = getattr(model, "module", model)
    network = getattr(network, "_orig_mod", network)  # under torch.compile
    result = LoopResult(status="completed", steps=0)
    loss_sum, loss_count = 0.0, 0

    def evaluate_and_log(step: int, extra: dict[str, float]) -> dict[str, float]:
        record = {"step": step} | extra | evaluation_record(network, task, settings, env)
        record["train/lr"] = optimizer.param_groups[0]["lr"]
        tracker.log(record)
        result.history.append(record)
        return record

    if settings.eval_at_start:
        evaluate_and_log(0, {})
    model.train()
    window_start = time.perf_counter()
    bar = tqdm(
        total=settings.steps,
        desc=settings.progress_desc,
        mininterval=1.0,
        unit="step",
        disable=not (settings.progress and env.is_main),
        dynamic_ncols=True,
    )
    with bar:
        for step in range(1, settings.steps + 1):
            x, y = next(task.train_batches)
            loss = train_step(model, optimizer, x, y, settings.amp)
            # One decision for all replicas: a rank that stopped alone would hang the others.
            loss = mean_across_ranks(env, loss.item()) if env.enabled else loss.item()
            if scheduler is not None:
                scheduler.step_batch()
            result.steps = step
            bar.update(1)
            if not math.isfinite(loss):
                result.status, result.diverged_at_step = "diverged", step
                tracker.log({"step": step, "train/loss": loss})
                break
            loss_sum, loss_count = loss_sum + loss, loss_count + 1
            if step % settings.eval_every and step != settings.steps:
                continue
            speed = loss_count / (time.perf_counter() - window_start)
            record = evaluate_and_log(
                step, {"train/loss": loss_sum / loss_count, "perf/steps_per_s": speed}
            )
            bar.set_postfix(loss=f"{record['train/loss']:.4f}", acc=f"{record[task.monitor]:.2f}")
            loss_sum, loss_count = 0.0, 0
            window_start = time.perf_counter()
    return result
