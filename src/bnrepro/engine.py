"""The training loop: one step, one evaluation, and the loop that alternates them.

The loop trains one network, or several stacked as one module (a StackedMLP: one member per
seed). Every member has its own tracker, history and fate: a member that diverges is recorded
as diverged and no longer logged, while the others train on.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from bnrepro.distributed import DistEnv, average_bn_buffers, sum_across_ranks
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
    """One member's outcome."""

    status: str  # "completed" or "diverged"
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    diverged_at_step: int | None = None


def member_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per member: shape (M,) for stacked (M, B, C) logits, (1,) otherwise.

    Their sum is what is minimised: each member's gradient is that of its own mean loss.
    """
    if logits.dim() == 2:
        return F.cross_entropy(logits, y).reshape(1)
    per_example = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    return per_example.view(logits.shape[0], -1).mean(dim=1)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    amp: bool = False,
) -> torch.Tensor:
    """One SGD step on one mini-batch; returns the detached loss of each member."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        losses = member_losses(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    losses.sum().backward()
    optimizer.step()
    return losses.detach()


def evaluation_records(
    model: nn.Module, task: Task, settings: LoopSettings, env: DistEnv
) -> list[dict[str, float]]:
    """What is logged at one evaluation, per member: the task's metrics and the percentiles.

    `model` is the bare network (not the DDP wrapper): evaluation runs no collective of DDP.
    """
    if settings.bn_stats == "population":
        recompute_population_stats(model, task.population_batches, settings.population_batches)
    average_bn_buffers(env, model)
    probes = nonlinearity_input_percentiles(
        model, model.nonlinearities(), task.probe_x, settings.probe_unit, settings.percentiles
    )
    return [metrics | probe for metrics, probe in zip(task.evaluate(model), probes, strict=True)]


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: StepwiseExponentialLR | None,
    task: Task,
    settings: LoopSettings,
    trackers: Sequence[Tracker],
    env: DistEnv,
) -> list[LoopResult]:
    """Train for `settings.steps`, evaluating every `eval_every` steps and at the end.

    `model` is what trains (possibly DDP-wrapped or compiled); evaluation uses the bare network.
    A non-finite loss stops a member as "diverged": a result to record, not a crash.
    """
    network = getattr(model, "module", model)
    network = getattr(network, "_orig_mod", network)  # under torch.compile
    results = [LoopResult(status="completed", steps=0) for _ in trackers]
    alive = list(range(len(trackers)))
    alive_mask = torch.ones(len(trackers), dtype=torch.bool)
    loss_sum = torch.zeros(len(trackers), dtype=torch.float64)
    loss_count, step = 0, 0

    def evaluate_and_log(step: int, extra: list[dict[str, float]]) -> None:
        records = evaluation_records(network, task, settings, env)
        for i in alive:
            record = {"step": step} | extra[i] | records[i]
            record["train/lr"] = optimizer.param_groups[0]["lr"]
            trackers[i].log(record)
            results[i].history.append(record)

    if settings.eval_at_start:
        evaluate_and_log(0, [{} for _ in trackers])
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
            losses = train_step(model, optimizer, x, y, settings.amp).cpu()
            if env.enabled:  # one decision for all replicas: a rank stopping alone hangs the rest
                losses = torch.tensor(sum_across_ranks(env, losses.tolist())) / env.world_size
            if scheduler is not None:
                scheduler.step_batch()
            bar.update(1)
            if bool((alive_mask & ~torch.isfinite(losses)).any()):
                for i in [i for i in alive if not torch.isfinite(losses[i])]:
                    results[i].status, results[i].diverged_at_step = "diverged", step
                    results[i].steps = step
                    trackers[i].log({"step": step, "train/loss": losses[i].item()})
                    alive.remove(i)
                    alive_mask[i] = False
                if not alive:
                    break
            loss_sum += losses
            loss_count += 1
            if step % settings.eval_every and step != settings.steps:
                continue
            speed = loss_count / (time.perf_counter() - window_start)
            means = (loss_sum / loss_count).tolist()
            evaluate_and_log(step, [{"train/loss": m, "perf/steps_per_s": speed} for m in means])
            first = results[alive[0]].history[-1]
            bar.set_postfix(loss=f"{first['train/loss']:.4f}", acc=f"{first[task.monitor]:.2f}")
            loss_sum.zero_()
            loss_count = 0
            window_start = time.perf_counter()
    for i in alive:
        results[i].steps = step
    return results
