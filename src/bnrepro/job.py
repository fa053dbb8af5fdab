"""One job: build the task, the network(s) and the trackers from a composed config, train,
and write each network's summary. `bnrepro.train` hands every job it launches to `train`."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from bnrepro.build import build_model, loop_settings
from bnrepro.checkpoint import Checkpointer, find_resume
from bnrepro.distributed import DistEnv, broadcast_object, device_name
from bnrepro.engine import LoopResult, Preempted, fit
from bnrepro.optim import build_optimizer, build_scheduler
from bnrepro.preemption import PreemptionSignals
from bnrepro.runs import finish_run, member_runs, summarize
from bnrepro.tasks import build_task
from bnrepro.tracking import open_trackers

log = logging.getLogger("bnrepro.train")


def train(cfg: DictConfig, env: DistEnv) -> list[dict[str, Any]]:
    """Train the network(s) `cfg` describes, resuming from a checkpoint when there is one;
    return one summary per network."""
    run_dir = Path(broadcast_object(env, cfg.paths.output_dir))  # rank 0's timestamped dir
    torch.set_num_threads(cfg.trainer.num_threads)
    torch.set_flush_denormal(cfg.trainer.flush_denormal)
    if env.device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.trainer.cudnn_benchmark
    task = build_task(cfg, env)
    network, model = build_model(cfg, env)
    settings = loop_settings(cfg, env)
    log.info(f"device: {device_name(env.device)}" + (", CUDA graph" if settings.cuda_graph else ""))
    if env.enabled:
        syncbn = " with SyncBatchNorm" if cfg.trainer.sync_bn else ""
        log.info(
            f"distributed: {dist.get_backend()} backend, {env.world_size} process(es), DDP"
            f"{syncbn}, trainer.dist_bn={cfg.trainer.dist_bn}"
        )
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim)
    checkpoints = Checkpointer(run_dir, cfg, network, optimizer, scheduler, task, env.is_main)
    resume_from = find_resume(cfg.resume, run_dir)
    state = checkpoints.restore(resume_from) if resume_from else None
    if state is not None:
        log.info(f"resuming from {resume_from} at step {state.step}")
    runs = member_runs(cfg, run_dir, write=env.is_main)
    device = device_name(env.device)
    histories = [r.history for r in state.results] if state else None
    start = time.perf_counter()
    with contextlib.ExitStack() as stack, PreemptionSignals() as signals:
        trackers = open_trackers(stack, runs, env.is_main, histories, checkpoints.wandb_ids)
        checkpoints.trackers = trackers

        def write_summaries(status: str, results: list[LoopResult]) -> None:
            for (member_cfg, _), tracker, result in zip(runs, trackers, results, strict=True):
                result = replace(result, status=status) if result.status == "completed" else result
                seconds = time.perf_counter() - start
                summary = summarize(member_cfg, task.monitor, result, seconds, device)
                tracker.write_summary(summary)

        try:
            results = fit(
                model,
                optimizer,
                scheduler,
                task,
                settings,
                trackers,
                env,
                state,
                checkpoints.save,
                signals.requested,
            )
        except Preempted as stop:
            log.warning(
                f"stopped by a signal at step {stop.step}; checkpoint written, the same "
                f"command (same hydra.run.dir) resumes"
            )
            write_summaries("preempted", checkpoints.last_state.results)
            signals.hand_over()
        except Exception:
            write_summaries("failed", [LoopResult("failed", 0) for _ in runs])
            raise
        seconds = checkpoints.last_state.seconds if checkpoints.last_state else 0.0
        return [
            finish_run(c, d, tracker, network, result, task.monitor, seconds, env)
            for (c, d), tracker, result in zip(runs, trackers, results, strict=True)
        ]
