"""Reading run directories back: what the figure scripts build from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
