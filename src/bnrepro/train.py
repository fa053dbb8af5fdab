"""The one training entrypoint: `python -m bnrepro.train experiment=mnist/bn seed=2`.

Every experiment of the suite runs through here; Hydra composes the config and, with `-m`,
sweeps it. Each job writes metrics.jsonl, summary.json and (logger=wandb) one W&B run into
its own run directory.
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
from bnrepro.data.batches import shuffled_batches
from bnrepro.data.mnist import load_mnist
from bnrepro.engine import LoopResult, LoopSettings, fit
from bnrepro.errors import UserError
from bnrepro.plots import plot_run
from bnrepro.tracking import tracking

log = logging.getLogger("bnrepro.train")
# An absolute path, so `python -m bnrepro.train` and the `bnrepro-train` script find the same
# configs (the package is installed editable from the checkout).
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
register_resolvers()

# Population statistics draw their own batches so that the training order of a seed is the
# same whichever BN statistics mode is chosen.
POPULATION_SEED_OFFSET = 1_000_003


def seed_everything(seed: int) -> None:
    """Reset every global RNG: multirun jobs of the basic launcher share one process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loop_settings(cfg: DictConfig) -> LoopSettings:
    return LoopSettings(
        steps=cfg.trainer.steps,
        eval_every=cfg.trainer.eval_every,
        eval_at_start=cfg.trainer.eval_at_start,
        probe_images=cfg.trainer.probe.num_images,
        probe_unit=cfg.trainer.probe.unit,
        percentiles=list(cfg.trainer.probe.percentiles),
        bn_stats=cfg.model.bn.stats if cfg.model.norm == "bn" else "ema",
        population_batches=cfg.model.bn.population_batches,
        progress=cfg.trainer.progress,
        progress_desc=f"{cfg.arm} seed {cfg.seed}",
    )


def summarize(cfg: DictConfig, result: LoopResult, wall_seconds: float) -> dict[str, Any]:
    accs = [r["test/acc"] for r in result.history]
    best = max(range(len(accs)), key=accs.__getitem__) if accs else None
    return {
        "status": result.status,
        "steps": result.steps,
        "diverged_at_step": result.diverged_at_step,
        "final_test_acc": accs[-1] if accs else None,
        "best_test_acc": accs[best] if best is not None else None,
        "best_step": result.history[best]["step"] if best is not None else None,
        "wall_seconds": round(wall_seconds, 3),
        "experiment": cfg.experiment_name,
        "arm": cfg.arm,
        "seed": cfg.seed,
    }


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one network as `cfg` says; return its summary."""
    check_config(cfg)
    run_dir = Path(cfg.paths.output_dir)
    data = load_mnist(
        cfg.data.root,
        download=cfg.data.download,
        sha256=cfg.data.sha256 if cfg.data.verify_checksums else None,
    )
    torch.set_num_threads(cfg.trainer.num_threads)
    seed_everything(cfg.seed)
    model = instantiate(cfg.model)
    optimizer = instantiate(cfg.optim, params=model.parameters())
    batch = cfg.data.batch_size
    train_batches = shuffled_batches(
        data.train_x, data.train_y, batch, torch.Generator().manual_seed(cfg.seed)
    )
    population_batches = shuffled_batches(
        data.train_x,
        data.train_y,
        batch,
        torch.Generator().manual_seed(cfg.seed + POPULATION_SEED_OFFSET),
    )
    config = OmegaConf.to_container(cfg, resolve=True)
    logger_cfg = config["logger"] if config.get("logger") else None
    settings = loop_settings(cfg)
    start = time.perf_counter()
    with tracking(run_dir, logger_cfg, config) as tracker:
        try:
            result = fit(
                model, optimizer, data, train_batches, population_batches, settings, tracker
            )
        except Exception:
            failed = LoopResult(status="failed", steps=0)
            tracker.write_summary(summarize(cfg, failed, time.perf_counter() - start))
            raise
        summary = summarize(cfg, result, time.perf_counter() - start)
        if result.history:
            figure = run_dir / "run.png"
            last_layer = list(model.nonlinearities())[-1]
            plot_run(result.history, last_layer, f"{cfg.arm} seed {cfg.seed}", figure)
            tracker.log_image("figure/run", figure)
        tracker.write_summary(summary)
    log.info(
        "%s seed %s: %s after %d steps, final test acc %s %%, %.1f s",
        cfg.arm,
        cfg.seed,
        summary["status"],
        summary["steps"],
        summary["final_test_acc"],
        summary["wall_seconds"],
    )
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
