"""The one training entrypoint: `python -m bnrepro.train experiment=mnist/bn seed=2`.

Every experiment of the suite runs through here, MNIST or ImageNet, one process or many
under torchrun; Hydra composes the config and, with `-m`, sweeps it. Each job writes
metrics.jsonl, summary.json and (logger=wandb) one W&B run into its own run directory.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from bnrepro.build import build_model, loop_settings
from bnrepro.checkpoint import Checkpointer, find_resume
from bnrepro.config import check_config, register_resolvers
from bnrepro.distributed import (
    DistEnv,
    broadcast_object,
    init_distributed,
    shutdown,
)
from bnrepro.engine import LoopResult, Preempted, fit
from bnrepro.errors import UserError
from bnrepro.optim import build_optimizer, build_scheduler
from bnrepro.preemption import PreemptionSignals
from bnrepro.preflight import preflight
from bnrepro.runs import finish_run, member_runs, summarize
from bnrepro.tasks import build_task
from bnrepro.tracking import open_trackers

log = logging.getLogger("bnrepro.train")
register_resolvers()
# An absolute path, so `python -m bnrepro.train` and the `bnrepro-train` script find the same
# configs (the package is installed editable from the checkout).
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def train(cfg: DictConfig, env: DistEnv) -> list[dict[str, Any]]:
    """Train the network(s) `cfg` describes, resuming from a checkpoint when there is one;
    return one summary per network."""
    run_dir = Path(broadcast_object(env, cfg.paths.output_dir))  # rank 0's timestamped dir
    torch.set_num_threads(cfg.trainer.num_threads)
    torch.set_flush_denormal(cfg.trainer.flush_denormal)
    task = build_task(cfg, env)
    network, model = build_model(cfg, env)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim)
    checkpoints = Checkpointer(run_dir, cfg, network, optimizer, scheduler, task, env.is_main)
    resume_from = find_resume(cfg.resume, run_dir)
    state = checkpoints.restore(resume_from) if resume_from else None
    if state is not None:
        log.info(f"resuming from {resume_from} at step {state.step}")
    runs = member_runs(cfg, run_dir, write=env.is_main)
    histories = [r.history for r in state.results] if state else None
    start = time.perf_counter()
    with contextlib.ExitStack() as stack, PreemptionSignals() as signals:
        trackers = open_trackers(stack, runs, env.is_main, histories, checkpoints.wandb_ids)
        checkpoints.trackers = trackers

        def write_summaries(status: str, results: list[LoopResult]) -> None:
            for (member_cfg, _), tracker, result in zip(runs, trackers, results, strict=True):
                result = replace(result, status=status) if result.status == "completed" else result
                seconds = time.perf_counter() - start
                tracker.write_summary(summarize(member_cfg, task.monitor, result, seconds))

        try:
            results = fit(
                model,
                optimizer,
                scheduler,
                task,
                loop_settings(cfg, env),
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


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    env = None
    try:
        check_config(cfg)
        env = init_distributed(cfg.trainer.device)
        train(cfg, env)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        if env is not None:
            shutdown(env)


def run() -> None:
    """The console entry (`bnrepro-train`, `python -m bnrepro.train`): check the command line
    first, so that a typo costs one line and no job starts, then hand it to Hydra."""
    try:
        preflight(sys.argv[1:], CONFIG_DIR)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    run()
