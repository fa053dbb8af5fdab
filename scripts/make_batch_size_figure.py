"""Test error against batch size for each normalisation (like Figure 1 of Wu & He 2018).

    python scripts/make_batch_size_figure.py --runs results/batch_size/runs --out results/batch_size

Reads the runs of `make reproduce-batch-size-mlp` (issue 13's study, experiment=batch_size/grid:
one arm per norm and batch size, several seeds each) and writes batch_size.png (final test
error, mean over seeds with its 95 % interval, against the batch size on a log axis) and
batch_size.json (every seed's number, the means and intervals, the devices and the jobs' wall
time).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter
from omegaconf import OmegaConf

from bnrepro.analysis.plots import NORM_COLORS as COLORS
from bnrepro.analysis.plots import NORM_LABELS as LABELS
from bnrepro.analysis.plots import save
from bnrepro.analysis.runs import RunRecord, figure_command
from bnrepro.analysis.stats import seed_summary

COMMAND = "make reproduce-batch-size-mlp"


def run_config(run: RunRecord) -> dict:
    """The composed config saved beside a run (collected runs: config.yaml)."""
    for name in ("config.yaml", ".hydra/config.yaml"):
        if (run.path / name).is_file():
            return OmegaConf.to_container(OmegaConf.load(run.path / name))
    raise ValueError(f"{run.path}: no config.yaml beside the run")


def collect(runs: list[RunRecord]) -> dict:
    """{norm: {batch size: [final test error per seed]}}, and where and how long they ran."""
    errors: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    seeds: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    devices, seconds, schedule = set(), {}, set()
    for run in runs:
        summary = run.summary
        settings = summary["settings"]
        if run.arm not in seconds:  # one config read per job: its seeds share it
            # The experiment's epochs, and its learning rate rescaled to batch size 60.
            lr_at_60 = round(settings["lr"] * 60 / settings["batch_size"], 6)
            schedule.add((run_config(run)["epochs"], lr_at_60))
        norm, batch = summary["variant"]["norm"], summary["settings"]["batch_size"]
        acc = summary["final_test_acc"] if summary["status"] == "completed" else None
        errors[norm][batch].append(100.0 - acc if acc is not None else 100.0)
        seeds[norm][batch].append(run.seed)
        devices.add(summary["device"])
        seconds[run.arm] = summary["wall_seconds"]  # a stacked job's members share it
    table = {}
    for norm in [n for n in LABELS if n in errors]:
        table[norm] = {}
        for batch in sorted(errors[norm]):
            summary = seed_summary(errors[norm][batch])
            table[norm][str(batch)] = {"seeds": seeds[norm][batch]} | summary
    return {
        "command": COMMAND,
        "metric": "final test error (%) = 100 - final test accuracy; a diverged run counts 100",
        "devices": sorted(devices),
        "job_seconds_sum": round(sum(seconds.values()), 1),
        "epochs_and_lr_at_60": sorted(schedule),
        "norms": table,
    }


def plot(data: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for norm, rows in data["norms"].items():
        sizes = [int(b) for b in rows]
        means = [rows[b]["mean"] for b in rows]
        below = [rows[b]["mean"] - rows[b]["low"] for b in rows]
        above = [rows[b]["high"] - rows[b]["mean"] for b in rows]
        ax.errorbar(
            sizes,
            means,
            yerr=[below, above],
            label=LABELS[norm],
            color=COLORS[norm],
            marker="o",
            ms=4,
            capsize=3,
        )
    ax.set_xscale("log", base=2)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yscale("log")
    lowest = min(r["low"] for rows in data["norms"].values() for r in rows.values())
    ticks = [1, 2, 5, 10, 20, 50, 100]
    ax.set_yticks(ticks, [str(t) for t in ticks])
    ax.set_ylim(max(0.5, 0.8 * lowest), 100)
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(sizes_all := sorted({int(b) for rows in data["norms"].values() for b in rows}))
    ax.set_xticklabels([str(b) for b in sizes_all])
    ax.set_xlabel("batch size (examples per mini-batch)")
    ax.set_ylabel("final test error, % (log scale)")
    epochs, lr60 = data["epochs_and_lr_at_60"][0]
    ax.set_title(f"MNIST MLP, {epochs:g} epoch(s) at every batch size B, lr = {lr60:g} x B / 60")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save(fig, path)


def main() -> int:
    return figure_command(
        __doc__.splitlines()[0], "batch_size", collect, plot, "norms", "batch-size runs"
    )


if __name__ == "__main__":
    sys.exit(main())
