"""The one training entrypoint: `python -m bnrepro.train experiment=mnist/bn seed=2`.

Every experiment of the suite runs through here, MNIST or ImageNet, one process or many
under torchrun; Hydra composes the config and, with `-m`, sweeps it. Each job writes
metrics.jsonl, summary.json and (logger=wandb) one W&B run into its own run directory.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bnrepro.config import check_config, register_resolvers
from bnrepro.distributed import (
    DistEnv,
    broadcast_object,
    init_distributed,
    replicas_in_sync,
    shutdown,
    wrap_model,
)
from bnrepro.engine import LoopResult, LoopSettings, fit
from bnrepro.errors import UserError
from bnrepro.optim import build_optimizer, build_scheduler
from bnrepro.plots import plot_run
from bnrepro.runs import summarize
from bnrepro.tasks import build_task
from bnrepro.tracking import tracking

log = logging.getLogger("bnrepro.train")
register_resolvers()
# An absolute path, so `python -m bnrepro.train` and the `bnrepro-train` script find the same
# configs (the package is installed editable from the checkout).
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def seed_everything(seed: int) -> None:
    """Reset every global RNG: multirun jobs of the basic launcher share one process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loop_settings(cfg: DictConfig, env: DistEnv) -> LoopSettings:
    return LoopSettings(
        steps=cfg.trainer.steps,
        eval_every=cfg.trainer.eval_every,
        eval_at_start=cfg.trainer.eval_at_start,
        probe_unit=cfg.trainer.probe.unit,
        percentiles=list(cfg.trainer.probe.percentiles),
        bn_stats=cfg.model.bn.stats if cfg.model.norm == "bn" else "ema",
        population_batches=cfg.model.bn.population_batches,
        amp=cfg.trainer.amp == "bf16" and env.device.type == "cuda",
        progress=cfg.trainer.progress,
        progress_desc=f"{cfg.arm} seed {cfg.seed}",
    )


def build_model(cfg: DictConfig, env: DistEnv) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The network (same initial weights on every rank) and what trains it (DDP, compiled)."""
    seed_everything(cfg.seed)
    network = instantiate(cfg.model).to(env.device)
    if cfg.trainer.channels_last and env.device.type == "cuda":
        network = network.to(memory_format=torch.channels_last)
    trained = wrap_model(network, env, cfg.trainer.sync_bn)
    # Per-rank streams for dropout and augmentation; rank 0 keeps the single-process stream.
    seed_everything(cfg.seed + env.rank)
    return network, torch.compile(trained) if cfg.trainer.compile else trained


def train(cfg: DictConfig, env: DistEnv) -> dict[str, Any]:
    """Train one network as `cfg` says; return its summary."""
    run_dir = Path(broadcast_object(env, cfg.paths.output_dir))  # rank 0's timestamped dir
    torch.set_num_threads(cfg.trainer.num_threads)
    task = build_task(cfg, env)
    network, model = build_model(cfg, env)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim)
    config = OmegaConf.to_container(cfg, resolve=True)
    logger_cfg = config["logger"] if config.get("logger") else None
    start = time.perf_counter()
    with tracking(run_dir, logger_cfg, config, enabled=env.is_main) as tracker:
        try:
            result = fit(model, optimizer, scheduler, task, loop_settings(cfg, env), tracker, env)
        except Exception:
            failed = LoopResult(status="failed", steps=0)
            tracker.write_summary(summarize(cfg, task.monitor, failed, time.perf_counter() - start))
            raise
        summary = summarize(cfg, task.monitor, result, time.perf_counter() - start)
        if env.enabled:
            summary |= {
                "world_size": env.world_size,
                "replicas_in_sync": replicas_in_sync(env, network),
            }
        if result.history and env.is_main:
            figure = run_dir / "run.png"
            last_layer = list(network.nonlinearities())[-1]
            plot_run(result.history, task.monitor, last_layer, f"{cfg.arm} seed {cfg.seed}", figure)
            tracker.log_image("figure/run", figure)
        tracker.write_summary(summary)
    if env.is_main:
        log.info(
            "%s seed %s: %s after %d steps, final %s %s, %.1f s",
            cfg.arm,
            cfg.seed,
            summary["status"],
            summary["steps"],
            task.monitor,
            summary[f"final_{task.monitor.replace('/', '_')}"],
            summary["wall_seconds"],
        )
    return summary


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
