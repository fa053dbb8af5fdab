"""Reading finished runs back, for the figure scripts: run directories (or a W&B project),
each run's variant, and the comparison of variants (Figures 2 and 3, the MNIST grid): curves
and the table "steps to reach X % / max accuracy". The trainer never imports this module.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from bnrepro.config.schema import is_bn

# The variant groups of the paper (configs/norm, activation, dropout, lr_mult) and the BN
# statistics mode: what `summary.json` records as a run's "variant".
VARIANT_KEYS = ("norm", "activation", "dropout", "lr_mult", "bn_stats")


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

    def config(self) -> DictConfig:
        """The run's composed config: config.yaml beside it once collected, else Hydra's
        .hydra/config.yaml in its directory or, for a stacked job's seed, the job's."""
        for path in (
            self.path / "config.yaml",
            self.path / ".hydra" / "config.yaml",
            self.path.parent / ".hydra" / "config.yaml",
        ):
            if path.is_file():
                return OmegaConf.load(path)
        raise ValueError(f"{self.path}: no config.yaml beside it or in .hydra/")

    @property
    def variant(self) -> dict[str, Any]:
        """norm, activation, dropout, lr_mult, bn_stats: from summary.json, or for runs made
        before summaries recorded it, from the resolved config stored beside them."""
        if "variant" in self.summary:
            return self.summary["variant"]
        for name in ("config.yaml", ".hydra/config.yaml"):
            if (self.path / name).is_file():
                cfg = OmegaConf.to_container(OmegaConf.load(self.path / name))
                model, optim = cfg["model"], cfg["optim"]
                return {
                    "norm": model["norm"],
                    "activation": model["activation"],
                    "dropout": model["dropout"],
                    "lr_mult": optim["lr_mult"],
                    "bn_stats": model["bn"]["stats"] if is_bn(model["norm"]) else None,
                }
        raise ValueError(f"{self.path}: no variant in summary.json and no config.yaml beside it")


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


def provenance_of(runs: list[RunRecord]) -> dict[str, list[str]]:
    """The code, libraries and devices behind `runs` (their summaries' `provenance`), for the
    figure JSONs and the report: the distinct commits ("+dirty" when the tree had uncommitted
    changes, " (added)" when only the commit that added the run to results/ is known:
    scripts/backfill_provenance.py), torch versions and devices, sorted; "not recorded" where
    a summary has none."""
    commits, torches, devices = set(), set(), set()
    for run in runs:
        origin = run.summary.get("provenance") or {}
        commit = origin.get("commit") or "not recorded"
        commits.add(
            commit
            + ("+dirty" if origin.get("dirty") else "")
            + (" (added)" if "backfilled" in origin else "")
        )
        torches.add(origin.get("torch") or "not recorded")
        devices.add(run.summary.get("device") or "not recorded")
    return {"commits": sorted(commits), "torch": sorted(torches), "devices": sorted(devices)}


@dataclass
class ArmResult:
    """One variant (arm): its accuracy curve (mean over seeds) and what the table reports."""

    arm: str
    seeds: list[int]
    steps: list[int]
    seed_curves: np.ndarray  # (seeds, steps): each seed's metric at the shared evaluations
    statuses: list[str]
    diverged_at: list[int]

    @property
    def curve(self) -> np.ndarray:
        """The mean over seeds at each shared evaluation."""
        return self.seed_curves.mean(axis=0) if self.seed_curves.size else np.array([])

    @property
    def diverged(self) -> bool:
        return bool(self.diverged_at)

    def steps_to(self, target: float) -> int | None:
        hits = np.nonzero(self.curve >= target)[0]
        return int(self.steps[hits[0]]) if hits.size else None

    @property
    def max_acc(self) -> float | None:
        return float(self.curve.max()) if self.curve.size else None

    @property
    def max_at_step(self) -> int | None:
        return int(self.steps[int(self.curve.argmax())]) if self.curve.size else None


def arm_results(runs: list[RunRecord], metric: str) -> dict[str, ArmResult]:
    """Group runs by arm; average `metric` over the seeds' shared evaluations.

    A diverged seed keeps its curve up to the divergence; the arm is marked diverged.
    """
    by_arm: dict[str, list[RunRecord]] = {}
    for run in runs:
        by_arm.setdefault(run.arm, []).append(run)
    results = {}
    for arm, arm_runs in by_arm.items():
        curves = [[m for m in r.metrics if metric in m and m[metric] is not None] for r in arm_runs]
        n = min(len(c) for c in curves)
        results[arm] = ArmResult(
            arm=arm,
            seeds=[r.seed for r in arm_runs],
            steps=[m["step"] for m in curves[0][:n]],
            seed_curves=np.array([[m[metric] for m in c[:n]] for c in curves]).reshape(
                len(curves), n
            ),
            statuses=[r.summary["status"] for r in arm_runs],
            diverged_at=[
                r.summary["diverged_at_step"] for r in arm_runs if r.summary["status"] == "diverged"
            ],
        )
    return results


def table_rows(results: dict[str, ArmResult], target: float) -> list[dict[str, Any]]:
    return [
        {
            "arm": r.arm,
            "seeds": len(r.seeds),
            "steps_to_target": r.steps_to(target),
            "max_acc": r.max_acc,
            "max_at_step": r.max_at_step,
            "diverged": r.diverged,
            "diverged_at_step": min(r.diverged_at) if r.diverged else None,
        }
        for r in results.values()
    ]


def results_json(
    results: dict[str, ArmResult],
    rows: list[dict[str, Any]],
    metric: str,
    target: float,
    **about: Any,
) -> str:
    """The table's rows and the plotted curves, as the figure scripts store them."""
    curves = {a: {"steps": r.steps, metric: r.curve.tolist()} for a, r in results.items()}
    payload = about | {"metric": metric, "target": target, "rows": rows, "curves": curves}
    return json.dumps(payload, indent=2) + "\n"


def markdown_table(rows: list[dict[str, Any]], target: float, extra: dict | None = None) -> str:
    """The Figure 3 table; `extra` maps arm -> {column: value} (e.g. the paper's numbers)."""
    extra = extra or {}
    extra_cols = sorted({c for cols in extra.values() for c in cols})
    head = ["variant", "seeds", f"steps to {target:g} %", "max acc (%)", "at step", "diverged"]
    lines = [
        "| " + " | ".join(head + extra_cols) + " |",
        "|" + "---|" * (len(head) + len(extra_cols)),
    ]
    for row in rows:
        cells = [
            row["arm"],
            str(row["seeds"]),
            f"{row['steps_to_target']:,}" if row["steps_to_target"] is not None else "not reached",
            f"{row['max_acc']:.2f}" if row["max_acc"] is not None else "-",
            f"{row['max_at_step']:,}" if row["max_at_step"] is not None else "-",
            f"yes, step {row['diverged_at_step']:,}" if row["diverged"] else "no",
        ]
        cells += [str(extra.get(row["arm"], {}).get(c, "")) for c in extra_cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def runs_from_wandb(project: str, metric: str) -> list[RunRecord]:
    """The same records from a W&B project ("entity/project"), for runs synced or logged online.

    Needs network access and `wandb login`; the summary keys are those of summary.json.
    """
    import wandb

    records = []
    for run in wandb.Api().runs(project):
        summary = dict(run.summary)
        if "arm" not in summary:
            continue
        metrics = [row for row in run.scan_history(keys=["step", metric]) if metric in row]
        records.append(RunRecord(path=Path(run.url), summary=summary, metrics=metrics))
    return sorted(records, key=lambda r: (r.arm, r.seed))


def figure_command(
    description: str,
    name: str,
    collect: Callable[[list[RunRecord]], dict[str, Any]],
    plot: Callable[[dict[str, Any], Path], None],
    found: str,
    what: str,
) -> int:
    """The command line of a figure script: `--runs DIR --out DIR`; `collect(runs)` gives the
    plotted numbers, written with the runs' provenance to <out>/<name>.json, and `plot` draws
    <out>/<name>.png. No runs (nothing under `data[found]`) is one line naming `what` and exit
    status 2."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not args.runs.is_dir():
        print(f"error: {args.runs} is not a directory of runs", file=sys.stderr)
        return 2
    runs = find_runs(args.runs)
    data = collect(runs)
    if not data[found]:
        print(f"error: no {what} under {args.runs}", file=sys.stderr)
        return 2
    data["provenance"] = provenance_of(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    plot(data, args.out / f"{name}.png")
    print(f"wrote {args.out / f'{name}.png'} and {name}.json")
    return 0
