"""The training loop: one step, one evaluation, and the loop that alternates them.

The loop trains one network, or several stacked as one module (a StackedMLP: one member per
seed). Every member has its own tracker, history and fate: a member that diverges is recorded
as diverged and no longer logged, while the others train on.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from bnrepro.config.schema import TrainerConfig
from bnrepro.infra.cuda_graph import GraphStep
from bnrepro.infra.distributed import DistEnv, sync_bn_buffers
from bnrepro.infra.tracking import Tracker
from bnrepro.measures.bn_estimators import StatsEstimators
from bnrepro.measures.ics import measured_step
from bnrepro.measures.probes import nonlinearity_input_percentiles
from bnrepro.models.batchnorm import BNStats
from bnrepro.tasks.task import Task
from bnrepro.training.optim import StepwiseExponentialLR, WarmupExponentialLR
from bnrepro.training.placement import Placement, autocast
from bnrepro.training.plateau import plateaued


@dataclass
class LoopResult:
    """One member's outcome."""

    status: str  # "completed" or "diverged"
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    diverged_at_step: int | None = None
    plateau_step: int | None = None  # the first evaluation at which trainer.plateau held


@dataclass
class LoopState:
    """Where the loop is: saved in checkpoints, restored on resume."""

    results: list[LoopResult]
    step: int = 0
    alive: list[int] = field(default_factory=list)
    loss_sum: torch.Tensor | None = None  # per member, since the last evaluation
    loss_count: int = 0
    seconds: float = 0.0  # training wall time so far, over all resumptions

    @classmethod
    def fresh(cls, members: int) -> LoopState:
        return cls(
            results=[LoopResult("completed", 0) for _ in range(members)],
            alive=list(range(members)),
            loss_sum=torch.zeros(members, dtype=torch.float64),
        )


class Preempted(Exception):
    """SIGTERM/SIGUSR1 arrived; a checkpoint was written at `step`."""

    def __init__(self, step: int) -> None:
        super().__init__(f"preempted at step {step}")
        self.step = step


# trainer.sync_debug -> torch.cuda.set_sync_debug_mode's levels (0, off, is "default").
SYNC_DEBUG_MODES = {"warn": 1, "error": 2}


class SyncDebug:
    """trainer.sync_debug: torch's CUDA sync debug mode (warn or error) while `fit` runs its
    steps, so that a host-device sync hidden in a step (`.item()`, a blocking copy to or from
    the GPU) warns or raises where it happens. The loop's deliberate syncs run inside
    `allowed()`; leaving the context restores the mode found on entering it.

    A no-op on a CPU (there is no device to wait for; nothing here touches torch.cuda then).
    torch's check covers copies and stream synchronisations, not event waits: the device
    decoder's wait for its own stream (data/device_decode.DataStream) needs no exemption.
    """

    def __init__(self, mode: str | None, device: torch.device) -> None:
        self.level = SYNC_DEBUG_MODES[mode] if mode is not None and device.type == "cuda" else 0
        self.previous = 0

    def __enter__(self) -> SyncDebug:
        if self.level:
            self.previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(self.level)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.level:
            torch.cuda.set_sync_debug_mode(self.previous)

    @contextlib.contextmanager
    def allowed(self) -> Iterator[None]:
        """A deliberate sync: the mode is off inside, and back to what it was after."""
        if not self.level:
            yield
            return
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(mode)


def member_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per member: shape (M,) for stacked (M, B, C) logits, (1,) otherwise.

    Their sum is what is minimised: each member's gradient is that of its own mean loss.
    """
    if logits.dim() == 2:
        return F.cross_entropy(logits, y).reshape(1)
    # Classes in dim 1, (M, C, B): for a StackedMLP's logits a free view, and 2x faster than
    # flattening to (M*B, C), which copies.
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(dim=1)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One SGD step on one mini-batch (the forward pass autocast to `autocast_dtype`, if any);
    returns the detached loss of each member."""
    with autocast(x.device, autocast_dtype):
        losses = member_losses(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    losses.sum().backward()
    optimizer.step()
    return losses.detach()


def evaluation_records(
    model: nn.Module,
    task: Task,
    trainer: TrainerConfig,
    env: DistEnv,
    bn: BNStats | None = None,
    estimators: StatsEstimators | None = None,
) -> list[dict[str, float]]:
    """What is logged at one evaluation, per member: the task's metrics and the percentiles.

    `model` is the bare network (not the DDP wrapper): evaluation runs no collective of DDP.
    With `estimators`, each estimate of BN's statistics is evaluated first.
    """
    compared: list[dict[str, float]] = [{} for _ in range(getattr(model, "members", 1))]
    if estimators is not None:
        compared = estimators.evaluate(task.evaluate, task.population_batches, task.epoch_batches())
    if bn is not None:  # Algorithm 2 in population mode; nothing for the others
        bn.refresh(model, task.population_batches)
    sync_bn_buffers(env, model, trainer.dist_bn)
    probes = nonlinearity_input_percentiles(
        model, model.nonlinearities(), task.probe_x, trainer.probe.unit, trainer.probe.percentiles
    )
    return [
        metrics | probe | other
        for metrics, probe, other in zip(task.evaluate(model), probes, compared, strict=True)
    ]


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: StepwiseExponentialLR | WarmupExponentialLR | None,
    task: Task,
    trainer: TrainerConfig,
    placement: Placement,
    trackers: Sequence[Tracker],
    env: DistEnv,
    *,
    bn: BNStats | None = None,
    cuda_graph: bool = False,
    estimators: StatsEstimators | None = None,
    label: str = "train",
    state: LoopState | None = None,
    save_checkpoint: Callable[[LoopState], None] = lambda state: None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> list[LoopResult]:
    """Train up to `trainer.steps`, from `state` (a resumed run) or from scratch, evaluating
    every `trainer.eval_every` steps and at the end, checkpointing every
    `trainer.checkpoint_every` steps (0: never in between) and at the end.

    `model` is what trains (possibly DDP-wrapped or compiled) on `placement`; evaluation uses
    the bare network. What the run derived besides: the network's BN statistics `bn` (None: no
    BN), whether the step is captured in a CUDA graph (infra/cuda_graph.py), the `estimators`
    of BN's statistics evaluated with the network (trainer.bn_stats_probe) and the progress
    bar's `label`. A non-finite loss (or one above `trainer.diverge_loss`) stops a member as
    "diverged": a result to record, not a crash. When `stop_requested()` turns true, a
    checkpoint is written and Preempted raised.

    The host never waits for the device during steps: each step's losses stay on the device
    in a small log that the host reads every `trainer.sync_every` steps and at every evaluation,
    checkpoint and stop (on a CPU that costs nothing). Divergence is then found at its exact
    step; a diverged member trains on (uselessly, members never mix) until that read.
    `trainer.sync_debug` has torch check that on a GPU (SyncDebug): those reads, evaluations,
    checkpoints and trainer.ics's measured steps are its only allowed syncs.
    """
    network = getattr(model, "module", model)
    network = getattr(network, "_orig_mod", network)  # under torch.compile
    resumed = state is not None
    state = state or LoopState.fresh(len(trackers))
    results, alive = state.results, state.alive
    limit = trainer.diverge_loss if trainer.diverge_loss is not None else float("inf")
    seconds_before, started = state.seconds, time.perf_counter()

    def step_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return train_step(model, optimizer, x, y, placement.autocast_dtype)

    run_step = GraphStep(step_fn) if cuda_graph else step_fn
    sync_debug = SyncDebug(trainer.sync_debug, placement.device)
    loss_log = torch.empty(trainer.sync_every, len(trackers), device=placement.device)
    logged = 0  # steps in loss_log not yet read by the host

    def evaluate_and_log(step: int, extra: list[dict[str, float]]) -> bool:
        """Evaluate and log at `step`; return whether training ends here: the last step, or
        every member alive has plateaued (trainer.plateau). At the end the task's final
        records (the test set, with a validation split) join the last evaluation's."""
        records = evaluation_records(network, task, trainer, env, bn, estimators)
        last = step == trainer.steps
        if trainer.plateau is not None and step > 0:
            for i in alive:
                points = [(r["step"], r[task.monitor]) for r in results[i].history]
                points.append((step, records[i][task.monitor]))
                if results[i].plateau_step is None and plateaued(points, trainer.plateau):
                    results[i].plateau_step = step
            last = last or all(results[i].plateau_step is not None for i in alive)
        if last and task.evaluate_final is not None:
            for record, final in zip(records, task.evaluate_final(network), strict=True):
                record.update(final)
        for i in alive:
            record = {"step": step} | extra[i] | records[i]
            record["train/lr"] = optimizer.param_groups[0]["lr"]
            trackers[i].log(record)
            results[i].history.append(record)
        return last

    def read_losses(first_step: int, stop: bool) -> bool:
        """Read the logged steps' losses (mean over ranks), record divergences at their exact
        step, add to the running sums; return whether any rank asked to stop."""
        block = loss_log[:logged].double()
        if env.enabled:  # one decision for all replicas: a rank stopping alone hangs the rest
            flag = torch.tensor([float(stop)], dtype=torch.float64, device=block.device)
            flat = torch.cat([block.flatten(), flag])
            dist.all_reduce(flat)
            block, stop = flat[:-1].view_as(block) / env.world_size, flat[-1].item() > 0
        sums = state.loss_sum.tolist()
        for step, values in enumerate(block.tolist(), start=first_step):
            for i in [i for i in alive if not math.isfinite(values[i]) or values[i] > limit]:
                results[i].status, results[i].diverged_at_step = "diverged", step
                results[i].steps = step
                trackers[i].log({"step": step, "train/loss": values[i]})
                alive.remove(i)
            for i, value in enumerate(values):
                sums[i] += value  # in step order, as float64: the same sum as step by step
        state.loss_sum = torch.tensor(sums, dtype=torch.float64)
        return stop

    def measure(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The step with Santurkar et al.'s measurements (ics.py), logged at once."""
        losses, records = measured_step(
            network, optimizer, x, y, trainer.ics.step_scales, member_losses
        )
        for i in alive:
            trackers[i].log({"step": state.step} | records[i])
        return losses

    if trainer.eval_at_start and not resumed:
        evaluate_and_log(0, [{} for _ in trackers])
    finished = False  # the last evaluation has been made: the step cap, or a plateau
    model.train()
    window_start = time.perf_counter()
    bar = tqdm(
        total=trainer.steps,
        initial=state.step,
        desc=label,
        mininterval=1.0,
        unit="step",
        dynamic_ncols=True,
        disable=not (trainer.progress and env.is_main),
    )
    with bar, sync_debug:
        while state.step < trainer.steps and alive and not finished:
            x, y = next(task.train_batches)
            if trainer.ics is not None and state.step % trainer.ics.every == 0:
                with sync_debug.allowed():  # measured steps log their records at once
                    loss_log[logged].copy_(measure(x, y))
            else:
                loss_log[logged].copy_(run_step(x, y), non_blocking=True)
            logged += 1
            if scheduler is not None:
                scheduler.step_batch()
            state.step += 1
            step = state.step
            bar.update(1)
            stop = stop_requested()
            every = trainer.checkpoint_every
            evaluate = step % trainer.eval_every == 0 or step == trainer.steps
            checkpoint = (every and step % every == 0) or step == trainer.steps
            sync = evaluate or checkpoint or logged == trainer.sync_every
            if not (sync or (stop and not env.enabled)):  # ranks agree on stops at syncs only
                continue
            with sync_debug.allowed():  # the deliberate syncs: losses, evaluation, checkpoint
                stop = read_losses(step - logged + 1, stop)
                state.loss_count += logged
                logged = 0
                for i in alive:
                    results[i].steps = step
                if alive and evaluate:
                    speed = state.loss_count / (time.perf_counter() - window_start)
                    means = (state.loss_sum / state.loss_count).tolist()
                    finished = evaluate_and_log(step, [{"train/loss": m} for m in means])
                    for tracker in trackers:
                        tracker.log_perf({"step": step, "perf/steps_per_s": speed})
                    first = results[alive[0]].history[-1]
                    bar.set_postfix(
                        loss=f"{first['train/loss']:.4f}", acc=f"{first[task.monitor]:.2f}"
                    )
                    state.loss_sum.zero_()
                    state.loss_count = 0
                    window_start = time.perf_counter()
                if stop or checkpoint or not alive or finished:
                    state.seconds = seconds_before + time.perf_counter() - started
                    save_checkpoint(state)
            if stop:
                raise Preempted(step)
    return results
