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
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from bnrepro.build import build_model, loop_settings
from bnrepro.config import check_config, register_resolvers
from bnrepro.distributed import (
    DistEnv,
    broadcast_object,
    init_distributed,
    replicas_in_sync,
    shutdown,
)
from bnrepro.engine import LoopResult, fit
from bnrepro.errors import UserError
from bnrepro.optim import build_optimizer, build_scheduler
from bnrepro.plots import plot_run
from bnrepro.runs import member_runs, summarize
from bnrepro.tasks import build_task
from bnrepro.tracking import Tracker, open_trackers

log = logging.getLogger("bnrepro.train")
register_resolvers()
# An absolute path, so `python -m bnrepro.train` and the `bnrepro-train` script find the same
# configs (the package is installed editable from the checkout).
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def finish_run(
    cfg: DictConfig,
    run_dir: Path,
    tracker: Tracker,
    network: torch.nn.Module,
    result: LoopResult,
    monitor: str,
    seconds: float,
    env: DistEnv,
) -> dict[str, Any]:
    """Write one network's summary.json and figure; return the summary."""
    summary = summarize(cfg, monitor, result, seconds)
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


def train(cfg: DictConfig, env: DistEnv) -> list[dict[str, Any]]:
    """Train the network(s) `cfg` describes; return one summary per network."""
    run_dir = Path(broadcast_object(env, cfg.paths.output_dir))  # rank 0's timestamped dir
    torch.set_num_threads(cfg.trainer.num_threads)
    task = build_task(cfg, env)
    network, model = build_model(cfg, env)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim)
    runs = member_runs(cfg, run_dir, write=env.is_main)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        trackers = open_trackers(stack, runs, enabled=env.is_main)
        try:
            results = fit(model, optimizer, scheduler, task, loop_settings(cfg, env), trackers, env)
        except Exception:
            failed = LoopResult(status="failed", steps=0)
            for (member_cfg, _), tracker in zip(runs, trackers, strict=True):
                tracker.write_summary(
                    summarize(member_cfg, task.monitor, failed, time.perf_counter() - start)
                )
            raise
        seconds = time.perf_counter() - start
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


if __name__ == "__main__":
    main()
