"""Run summaries: made at the end of a run, read back by the figure scripts."""

from __future__ import annotations

import json
import logging
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from bnrepro.distributed import DistEnv, device_name, replicas_in_sync
from bnrepro.plots import plot_run

if TYPE_CHECKING:
    from bnrepro.engine import LoopResult
    from bnrepro.tracking import Tracker

log = logging.getLogger("bnrepro.train")


def summarize(
    cfg: DictConfig, monitor: str, result: LoopResult, seconds: float, device: str
) -> dict[str, Any]:
    """summary.json: status, steps, final and best accuracy (`monitor`), wall time, names, and
    the device that made the result."""
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
        "wall_seconds": round(seconds, 3),
        # The whole process's peak (all members of a stacked job share it).
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "experiment": cfg.experiment_name,
        "arm": cfg.arm,
        "seed": cfg.seed,
        "device": device,
    }


def member_runs(
    cfg: DictConfig, run_dir: Path, write: bool = True
) -> list[tuple[DictConfig, Path]]:
    """(config, run directory) of each trained network: the job itself, or with `seeds` one
    per seed in <run_dir>/seed<k>/, each a complete run directory of its own."""
    if not cfg.seeds:
        return [(cfg, run_dir)]
    runs = []
    for seed in cfg.seeds:
        member = cfg.copy()
        with open_dict(member):
            member.seed, member.seeds = seed, None
        member_dir = run_dir / f"seed{seed}"
        if write:  # what Hydra writes for a job, so every run directory looks the same
            (member_dir / ".hydra").mkdir(parents=True, exist_ok=True)
            OmegaConf.save(member, member_dir / ".hydra" / "config.yaml")
        runs.append((member, member_dir))
    return runs


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
    summary = summarize(cfg, monitor, result, seconds, device_name(env.device))
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


@dataclass
class RunRecord:
    path: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]

    @property
    def arm(self) -> str:
        return self.summary["arm"]

    @property
    def seed(self) -> int:
        return self.summary["seed"]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def find_runs(root: str | Path) -> list[RunRecord]:
    """Every run directory below `root` (those holding a summary.json), sorted by arm and seed."""
    runs = []
    for summary_path in sorted(Path(root).rglob("summary.json")):
        run_dir = summary_path.parent
        runs.append(
            RunRecord(
                path=run_dir,
                summary=json.loads(summary_path.read_text()),
                metrics=read_metrics(run_dir / "metrics.jsonl"),
            )
        )
    return sorted(runs, key=lambda r: (r.arm, r.seed))
