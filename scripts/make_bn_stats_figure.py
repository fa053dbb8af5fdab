"""Which inference statistics should BN use? Each estimate's test accuracy against precise BN.

    python scripts/make_bn_stats_figure.py --runs results/bn_stats/runs --out results/bn_stats

Reads the runs of `make reproduce-bn-stats` (experiment=bn_stats/bn at several batch sizes,
several seeds each; every evaluation tests the same weights with each estimate,
bnrepro/measures/bn_estimators.py) and writes bn_stats.png: (a) the final test-accuracy gap of each
estimate to precise BN (the population estimate) against the batch size, mean over seeds with
its 95 % interval; (b, c) the gap through training at the smallest batch size and at the
paper's 60. bn_stats.json holds every seed's numbers: the final gap, the gap averaged over
the evaluations after step 0 ("through training") and each estimate's final accuracy.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from bnrepro.analysis.plots import ESTIMATE_COLORS as COLORS
from bnrepro.analysis.plots import ESTIMATE_LABELS as LABELS
from bnrepro.analysis.plots import save
from bnrepro.analysis.runs import RunRecord, figure_command
from bnrepro.analysis.stats import seed_summary

COMMAND = "make reproduce-bn-stats"
REFERENCE = "precise"
PAPER_BATCH = 60  # Section 4.1


def gap_curves(run: RunRecord) -> tuple[list[int], dict[str, list[float]], dict[str, float]]:
    """Steps of the evaluations, each estimate's accuracy minus precise BN's at each, and each
    estimate's final accuracy."""
    records = [r for r in run.metrics if f"bn_stats/{REFERENCE}/test_acc" in r]
    steps = [r["step"] for r in records]
    gaps, final = {}, {}
    for name in LABELS:
        key = f"bn_stats/{name}/test_acc"
        gaps[name] = [r[key] - r[f"bn_stats/{REFERENCE}/test_acc"] for r in records]
        final[name] = records[-1][key]
    return steps, gaps, final


def collect(runs: list[RunRecord]) -> dict:
    by_batch: dict[int, list[RunRecord]] = defaultdict(list)
    for run in runs:
        by_batch[run.summary["settings"]["batch_size"]].append(run)
    batches = {}
    for batch in sorted(by_batch):
        runs = by_batch[batch]
        curves = [gap_curves(r) for r in runs]
        entry: dict = {"seeds": [r.seed for r in runs], "steps": curves[0][0], "estimates": {}}
        for name in LABELS:
            per_seed = [gaps[name] for _, gaps, _ in curves]
            entry["estimates"][name] = {
                "final_gap": seed_summary([g[-1] for g in per_seed]),
                "gap_through_training": seed_summary([float(np.mean(g[1:])) for g in per_seed]),
                "final_acc": seed_summary([final[name] for _, _, final in curves]),
                "gap_curves": per_seed,
            }
        batches[str(batch)] = entry
    devices = sorted({r.summary["device"] for runs in by_batch.values() for r in runs})
    seconds = sum(runs[0].summary["wall_seconds"] for runs in by_batch.values())
    return {
        "command": COMMAND,
        "devices": devices,
        "job_seconds_sum": round(seconds, 1),
        "gap": f"test accuracy (points) of the estimate minus that of {REFERENCE} BN, same weights",
        "gap_through_training": "the gap averaged over every evaluation after step 0",
        "batch_sizes": batches,
    }


def plot(data: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    batches = data["batch_sizes"]
    sizes = [int(b) for b in batches]
    ax = axes[0]
    for name in LABELS:
        rows = [batches[b]["estimates"][name]["final_gap"] for b in batches]
        ax.errorbar(
            sizes,
            [r["mean"] for r in rows],
            yerr=[[r["mean"] - r["low"] for r in rows], [r["high"] - r["mean"] for r in rows]],
            label=LABELS[name],
            color=COLORS[name],
            marker="o",
            ms=4,
            capsize=3,
        )
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("training batch size")
    ax.set_ylabel("test accuracy - precise BN's, points")
    ax.set_title("(a) at the end of training, 95 % interval over seeds", fontsize=10)
    ax.legend(fontsize=8)
    shown = [str(min(sizes))] + ([str(PAPER_BATCH)] if str(PAPER_BATCH) in batches else [])
    for ax, batch, letter in zip(axes[1:], shown, "bc", strict=False):
        entry = batches[batch]
        for name in LABELS:
            values = np.array(entry["estimates"][name]["gap_curves"])
            ax.plot(entry["steps"], values.mean(axis=0), color=COLORS[name], label=LABELS[name])
            ax.fill_between(
                entry["steps"],
                values.min(axis=0),
                values.max(axis=0),
                color=COLORS[name],
                alpha=0.15,
            )
        ax.set_xlabel("training step")
        ax.set_title(
            f"({letter}) through training, batch size {batch} (band: min-max)", fontsize=10
        )
    for ax in axes:
        ax.axhline(0, color="black", lw=0.6)
        ax.grid(True, alpha=0.3)
    fig.suptitle("MNIST MLP with BN: the same weights tested with each estimate of BN's statistics")
    fig.tight_layout()
    save(fig, path)


def main() -> int:
    return figure_command(
        __doc__.splitlines()[0], "bn_stats", collect, plot, "batch_sizes", "bn_stats runs"
    )


if __name__ == "__main__":
    sys.exit(main())
