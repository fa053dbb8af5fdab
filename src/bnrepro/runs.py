"""Run summaries: made at the end of a run, read back by the figure scripts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from bnrepro.engine import LoopResult


def summarize(cfg: DictConfig, monitor: str, result: LoopResult, seconds: float) -> dict[str, Any]:
    """summary.json: status, steps, final and best accuracy (`monitor`), wall time, names."""
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
        "experiment": cfg.experiment_name,
        "arm": cfg.arm,
        "seed": cfg.seed,
    }


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
