"""A run, from its composed config to its summaries: `train(cfg, env)` is what every job does.

Hydra names the run directory (`run_name` in bnrepro.config.resolvers: the arm, the seeds and a
hash of the settings that define the result), so the same command finds the same directory again:
`train` returns at once when the run there has finished, resumes it from its checkpoint when
it has not, and starts it otherwise. It builds the task, the network(s) (plain, seeds stacked
in one StackedMLP or StackedBNInception, DDP, compiled), the optimizer and the trackers, trains
with `bnrepro.training.loop.fit`, and writes each network's summary.json and figure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import resource
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf, open_dict

from bnrepro.analysis.plots import plot_run
from bnrepro.config.resolvers import result_hash
from bnrepro.config.schema import RunConfig
from bnrepro.errors import ConfigError
from bnrepro.infra.checkpoint import Checkpointer, find_resume
from bnrepro.infra.distributed import (
    DistEnv,
    broadcast_object,
    device_name,
    replicas_in_sync,
    wrap_model,
)
from bnrepro.infra.preemption import PreemptionSignals
from bnrepro.infra.provenance import code_version, provenance
from bnrepro.infra.run_lock import hold_run
from bnrepro.infra.tracking import Tracker, open_trackers
from bnrepro.measures.bn_estimators import StatsEstimators
from bnrepro.models.batchnorm import BNStats
from bnrepro.models.networks import build_network
from bnrepro.models.norms import Normalization
from bnrepro.tasks import build_task
from bnrepro.training.loop import LoopResult, Preempted, fit
from bnrepro.training.optim import build_optimizer, build_scheduler
from bnrepro.training.placement import Placement, decide_placement

log = logging.getLogger("bnrepro.train")
FINISHED = ("completed", "diverged")  # a run with this status is not trained again


def train(cfg: RunConfig, env: DistEnv) -> list[dict[str, Any]]:
    """Train the network(s) `cfg` describes, resuming from a checkpoint when there is one;
    return one summary per network. One process at a time per run directory (infra.run_lock):
    a second one fails with one line naming the holder and leaves the run alone."""
    run_dir = Path(broadcast_object(env, cfg.source.paths.output_dir))  # rank 0's, for safety
    done = already_finished(cfg, run_dir)
    if done is None:
        with hold_run(run_dir, env):  # released on any exit, by the kernel if killed
            done = already_finished(cfg, run_dir)  # again: a holder may have finished it since
            if done is None:
                return train_held(cfg, env, run_dir)
    statuses = ", ".join(sorted({s["status"] for s in done}))
    log.info(f"already finished ({statuses}): {run_dir}; nothing to train")
    return done


def already_finished(cfg: RunConfig, run_dir: Path) -> list[dict[str, Any]] | None:
    """The summaries of a finished run (finished_summaries), or None when it is to be trained."""
    return None if cfg.resume == "never" else finished_summaries(member_runs(cfg, run_dir, False))


def train_held(cfg: RunConfig, env: DistEnv, run_dir: Path) -> list[dict[str, Any]]:
    """What `train` does once this process holds `run_dir`: build, train, summarize."""
    code_version()  # the checkout as training starts (cached): what the summary records
    torch.set_num_threads(cfg.trainer.num_threads)
    torch.set_flush_denormal(cfg.trainer.flush_denormal)
    placement = decide_placement(cfg, env)  # the task, the network and the loop follow it
    if placement.is_cuda:
        torch.backends.cudnn.benchmark = cfg.trainer.cudnn_benchmark
    device = device_name(env.device)
    norm = Normalization.from_model(cfg.model)  # model.norm and its settings, parsed once
    bn = norm.bn  # the BN statistics the task and loop ask (None without BN)
    check_ics(cfg, env)  # settings that cannot apply: one line before any data is read
    cuda_graph = use_cuda_graph(cfg, env, placement, bn)
    task = build_task(cfg, env, placement, bn)
    network, model = build_model(cfg, env, placement, norm)
    estimators = stats_estimators(cfg, network)
    log.info(f"device: {device}" + (", CUDA graph" if cuda_graph else ""))
    if env.enabled:
        syncbn = " with SyncBatchNorm" if cfg.trainer.sync_bn else ""
        log.info(
            f"distributed: {dist.get_backend()} backend, {env.world_size} process(es), DDP"
            f"{syncbn}, trainer.dist_bn={cfg.trainer.dist_bn}"
        )
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim)
    checkpoints = Checkpointer(run_dir, cfg.source, network, optimizer, scheduler, task, env)
    resume_from = find_resume(cfg.resume, run_dir)
    state = checkpoints.restore(resume_from) if resume_from else None
    if state is not None:
        log.info(f"resuming from {resume_from} at step {state.step}")
    runs = member_runs(cfg, run_dir, write=env.is_main)
    histories = [r.history for r in state.results] if state else None
    start = time.perf_counter()
    with contextlib.ExitStack() as stack, PreemptionSignals() as signals:
        sources = [(c.source, d) for c, d in runs]  # the configs as data, for W&B
        trackers = open_trackers(stack, sources, env.is_main, histories, checkpoints.wandb_ids)
        checkpoints.trackers = trackers

        def write_summaries(status: str, results: list[LoopResult]) -> None:
            for (member_cfg, _), tracker, result in zip(runs, trackers, results, strict=True):
                result = replace(result, status=status) if result.status == "completed" else result
                seconds = time.perf_counter() - start
                summary = summarize(member_cfg, task.monitor, result, seconds, env.device)
                tracker.write_summary(summary)

        try:
            results = fit(
                model,
                optimizer,
                scheduler,
                task,
                cfg.trainer,
                placement,
                trackers,
                env,
                bn=bn,
                cuda_graph=cuda_graph,
                estimators=estimators,
                label=progress_label(cfg),
                state=state,
                save_checkpoint=checkpoints.save,
                stop_requested=signals.requested,
            )
        except Preempted as stop:
            log.warning(
                f"stopped by a signal at step {stop.step}; checkpoint written, the same "
                f"command resumes"
            )
            write_summaries("preempted", checkpoints.last_state.results)
            signals.hand_over()
        except Exception:
            write_summaries("failed", [LoopResult("failed", 0) for _ in runs])
            raise
        seconds = checkpoints.last_state.seconds if checkpoints.last_state else 0.0
        return [
            finish_run(c, d, tracker, network, result, task.monitor, seconds, env, task.validation)
            for (c, d), tracker, result in zip(runs, trackers, results, strict=True)
        ]


def seed_everything(seed: int) -> None:
    """Reset every global RNG: multirun jobs of the basic launcher share one process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_ics(cfg: RunConfig, env: DistEnv) -> None:
    """trainer.ics compares one process's fp32 steps (measures/ics.py): a ConfigError under
    torchrun or with autocast asked for (on any device, so a config means one thing)."""
    if cfg.trainer.ics is not None and (env.enabled or cfg.trainer.amp is not None):
        raise ConfigError(
            "trainer.ics measures one process's fp32 steps: run it without torchrun and with "
            "trainer.amp=null"
        )


def stats_estimators(cfg: RunConfig, network: torch.nn.Module) -> StatsEstimators | None:
    """trainer.bn_stats_probe's estimators of BN's statistics, attached to `network`; None
    without the probe."""
    probe = cfg.trainer.bn_stats_probe
    if probe is None:
        return None
    return StatsEstimators(
        network, probe.ema_momenta, probe.population_batches, layer_errors=probe.layer_errors
    )


def progress_label(cfg: RunConfig) -> str:
    """The progress bar's label: the arm and its seed(s), e.g. 'bn seeds 1,2'."""
    return f"{cfg.arm} seed{'s' if cfg.seeds else ''} " + ",".join(
        map(str, cfg.seeds or [cfg.seed])
    )


def use_cuda_graph(cfg: RunConfig, env: DistEnv, placement: Placement, bn: BNStats | None) -> bool:
    """Whether the training step is captured in a CUDA graph (graph_step.py says what that
    needs): `auto` where it can be, `true` insists (one line when it cannot), `false` never."""
    wanted = cfg.trainer.cuda_graph
    if wanted is False:
        return False
    obstacles = [
        (not placement.is_cuda, "the device is not a GPU"),
        (env.enabled, "the job runs under torchrun (DDP)"),
        (cfg.trainer.compile, "trainer.compile=true"),
        (placement.autocast_dtype is not None, "trainer.amp=bf16"),
        (cfg.optim.schedule is not None, "the learning rate follows a schedule"),
        (cfg.trainer.ics is not None, "trainer.ics measures some steps outside the graph"),
        (cfg.trainer.bn_stats_probe is not None, "trainer.bn_stats_probe hooks BN's inputs"),
        (
            bn is not None and bn.layer_momentum is None,
            "model.bn.stats=cumulative reads its momentum on the host",
        ),
        (
            cfg.data.name == "imagenet",
            "the ImageNet loader's pin-memory thread calls CUDA during the capture",
        ),
    ]
    reasons = [why for present, why in obstacles if present]
    if reasons and wanted is True:
        raise ConfigError(
            f"trainer.cuda_graph=true cannot capture this run: {reasons[0]}; "
            f"use trainer.cuda_graph=auto (captures when it can) or false"
        )
    return not reasons


def build_model(
    cfg: RunConfig, env: DistEnv, placement: Placement, norm: Normalization
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The network (same initial weights on every rank; with `seeds`, one stacked member
    per seed (StackedMLP, StackedBNInception), each initialised as its plain run would be) and
    what trains it (DDP, compiled).

    The network class is models.networks's entry for the type of `cfg.model`; it gets the
    checked settings and the run's one normalisation `norm`."""
    if cfg.seeds:
        network = build_network(cfg.model, norm, members=len(cfg.seeds))
        for i, seed in enumerate(cfg.seeds):
            seed_everything(seed)
            network.load_member(i, build_network(cfg.model, norm))
    else:
        seed_everything(cfg.seed)
        network = build_network(cfg.model, norm)
    network = network.to(placement.device, memory_format=placement.memory_format)
    trained = wrap_model(network, env, cfg.trainer.sync_bn)
    # Per-rank streams for dropout and augmentation; rank 0 keeps the single-process stream.
    seed_everything(cfg.seed + env.rank)
    return network, torch.compile(trained) if cfg.trainer.compile else trained


def finished_summaries(runs: list[tuple[RunConfig, Path]]) -> list[dict[str, Any]] | None:
    """Every network's summary when all of them have finished (completed or diverged) with
    the settings asked for now: then there is nothing to train. None when any is missing,
    preempted, failed, or was made with other settings (a run directory given by hand)."""
    summaries = []
    for member_cfg, run_dir in runs:
        path = run_dir / "summary.json"
        if not path.is_file():
            return None
        summary = json.loads(path.read_text())
        if summary.get("status") not in FINISHED:
            return None
        if summary.get("result_hash") != result_hash(member_cfg.source):
            return None
        summaries.append(summary)
    return summaries


def summarize(
    cfg: RunConfig, monitor: str, result: LoopResult, seconds: float, device: torch.device
) -> dict[str, Any]:
    """summary.json: status, steps, final and best accuracy (`monitor`), wall time, names, the
    variant and key settings, the device that made the result and where it came from (the
    commit, libraries, machine and command: bnrepro.infra.provenance)."""
    key = monitor.replace("/", "_")  # test/acc -> final_test_acc, best_test_acc
    accs = [r[monitor] for r in result.history]
    best = max(range(len(accs)), key=accs.__getitem__) if accs else None
    return {
        "status": result.status,
        "steps": result.steps,
        "diverged_at_step": result.diverged_at_step,
        f"final_{key}": accs[-1] if accs else None,
        f"best_{key}": accs[best] if best is not None else None,
        "best_step": result.history[best]["step"] if best is not None else None,
        **stopping(cfg, monitor, result),
        "wall_seconds": round(seconds, 3),
        # The whole process's peak (all members of a stacked job share it).
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "experiment": cfg.experiment_name,
        "arm": cfg.arm,
        "seed": cfg.seed,
        "variant": cfg.variant,
        "result_hash": result_hash(cfg.source),  # what a re-run compares to skip a finished run
        "settings": {
            "lr": cfg.optim.lr,
            "batch_size": cfg.data.batch_size,
            "trainer_steps": cfg.trainer.steps,
            "data": cfg.data.name,
        },
        "device": device_name(device),
        "provenance": provenance(device),
    }


def stopping(cfg: RunConfig, monitor: str, result: LoopResult) -> dict[str, Any]:
    """With trainer.plateau: the step at which the member plateaued and what ended its run
    ("plateau", or "step cap" when trainer.steps came first). With a validation split: the
    test accuracy read once at the end."""
    out: dict[str, Any] = {}
    if cfg.trainer.plateau is not None:
        out["plateau_step"] = result.plateau_step
        # A member that plateaued first trains on (uselessly) until every member has.
        ended = "plateau" if result.plateau_step is not None else "step cap"
        out["stopped_by"] = ended if result.status == "completed" else result.status
    last = result.history[-1] if result.history else {}
    if monitor != "test/acc" and "test/acc" in last:
        out["final_test_acc"] = last["test/acc"]
    return out


def member_runs(cfg: RunConfig, run_dir: Path, write: bool = True) -> list[tuple[RunConfig, Path]]:
    """(config, run directory) of each trained network: the job itself, or with `seeds` one
    per seed in <run_dir>/seed<k>/, each a complete run directory of its own. With `write`
    (when training starts or resumes) each gets config.yaml, the config it trains with: Hydra
    rewrites .hydra/ at every launch, "already finished" included, so only this file still
    says what a finished run was trained with after the sweep is launched again."""
    if not cfg.seeds:
        if write:
            OmegaConf.save(cfg.source, run_dir / "config.yaml")
            overrides = run_dir / ".hydra" / "overrides.yaml"  # the job's command-line overrides
            if overrides.is_file():
                shutil.copy2(overrides, run_dir / "overrides.yaml")
        return [(cfg, run_dir)]
    runs = []
    for seed in cfg.seeds:
        source = cfg.source.copy()
        with open_dict(source):
            source.seed, source.seeds = seed, None
        member_dir = run_dir / f"seed{seed}"
        if write:  # what Hydra writes for a job, so every run directory looks the same
            (member_dir / ".hydra").mkdir(parents=True, exist_ok=True)
            OmegaConf.save(source, member_dir / ".hydra" / "config.yaml")
            OmegaConf.save(source, member_dir / "config.yaml")
        runs.append((replace(cfg, seed=seed, seeds=None, source=source), member_dir))
    return runs


def finish_run(
    cfg: RunConfig,
    run_dir: Path,
    tracker: Tracker,
    network: torch.nn.Module,
    result: LoopResult,
    monitor: str,
    seconds: float,
    env: DistEnv,
    validation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write one network's summary.json and figure; return the summary. `validation`: the
    task's validation split, recorded beside the numbers read on it."""
    summary = summarize(cfg, monitor, result, seconds, env.device)
    if validation is not None:
        summary["validation"] = validation
    if env.enabled:
        summary |= {
            "world_size": env.world_size,
            "replicas_in_sync": replicas_in_sync(env, network),
        }
    if result.history and env.is_main:
        last_layer = list(network.nonlinearities())[-1]
        plot_run(
            result.history, monitor, last_layer, f"{cfg.arm} seed {cfg.seed}", run_dir / "run.png"
        )
        tracker.log_image("figure/run", run_dir / "run.png")
    tracker.write_summary(summary)
    final = summary[f"final_{monitor.replace('/', '_')}"]
    if env.is_main:
        log.info(
            f"{cfg.arm} seed {cfg.seed}: {summary['status']} after {summary['steps']} "
            f"steps, final {monitor} {final}, {seconds:.1f} s"
        )
    return summary
