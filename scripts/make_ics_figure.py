"""Internal covariate shift and the loss landscape: no BN, BN and noisy BN (Santurkar et al.).

    python scripts/make_ics_figure.py --runs results/ics/runs --out results/ics

Reads the runs of `make reproduce-ics` (experiment=ics/baseline, ics/bn, ics/noisy_bn, several
seeds each) and writes ics.png, six panels against the training step (mean over seeds, band
from the lowest to the highest seed): test accuracy (Santurkar et al.'s Figure 2), ICS as the
l2 distance and the cosine between a layer's gradient before and after the preceding layers'
update (their Figure 5; the mean over the layers measured), and the landscape along the
gradient (their Figure 4): loss variation, gradient predictiveness and effective
beta-smoothness. ics.json holds the curves and, per seed, each measure averaged over the
whole run and the final test accuracy: the numbers the report compares.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from bnrepro.analysis.plots import save
from bnrepro.analysis.runs import RunRecord, figure_command
from bnrepro.analysis.stats import seed_summary

COMMAND = "make reproduce-ics"
ARMS = {"baseline": "no BN", "bn": "BN", "noisy_bn": "noisy BN"}
COLORS = {"baseline": "tab:blue", "bn": "tab:red", "noisy_bn": "tab:purple"}
# (key in ics.json, title, what is averaged): each panel's measure.
MEASURES = {
    "ics_l2": ("ICS: ||G - G'|| (l2, mean over layers)", "l2"),
    "ics_cos": ("ICS: cos(G, G') (mean over layers)", "cos"),
    "loss_range": ("loss variation along the gradient", "landscape/loss_range"),
    "grad_change": ("gradient predictiveness: max ||g(eta) - g||", "landscape/grad_change"),
    "beta": ("effective beta-smoothness", "landscape/beta"),
}


def measure_curve(run: RunRecord, measure: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one measure in one run's metrics.jsonl."""
    steps, values = [], []
    for record in run.metrics:
        if measure in ("l2", "cos"):
            layers = [v for k, v in record.items() if k.startswith("ics/") and k.endswith(measure)]
            if not layers:
                continue
            value = float(np.mean(layers))
        elif measure in record:
            value = record[measure]
        else:
            continue
        steps.append(record["step"])
        values.append(value)
    return steps, values


def accuracy_curve(run: RunRecord) -> tuple[list[int], list[float]]:
    points = [(r["step"], r["test/acc"]) for r in run.metrics if "test/acc" in r]
    return [s for s, _ in points], [a for _, a in points]


def collect(runs: list[RunRecord]) -> dict:
    by_arm: dict[str, list[RunRecord]] = defaultdict(list)
    for run in runs:
        if run.arm in ARMS:
            by_arm[run.arm].append(run)
    arms = {}
    for arm in [a for a in ARMS if a in by_arm]:
        runs = by_arm[arm]
        entry: dict = {"seeds": [r.seed for r in runs], "curves": {}, "per_seed_mean": {}}
        steps, accs = zip(*(accuracy_curve(r) for r in runs), strict=True)
        entry["curves"]["test_acc"] = {"steps": steps[0], "per_seed": [list(a) for a in accs]}
        entry["final_test_acc"] = seed_summary([a[-1] for a in accs])
        for key, (_, measure) in MEASURES.items():
            steps, values = zip(*(measure_curve(r, measure) for r in runs), strict=True)
            entry["curves"][key] = {"steps": steps[0], "per_seed": [list(v) for v in values]}
            entry["per_seed_mean"][key] = seed_summary([float(np.mean(v)) for v in values])
        arms[arm] = entry
    devices = sorted({r.summary["device"] for runs in by_arm.values() for r in runs})
    return {
        "command": COMMAND,
        "devices": devices,
        "job_seconds_sum": round(
            sum(runs[0].summary["wall_seconds"] for runs in by_arm.values()), 1
        ),
        "per_seed_mean": "each measure averaged over every measured step of a seed's run",
        "arms": arms,
    }


def plot(data: dict, path: Path) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    panels = [("test_acc", ("test accuracy, %", None)), *MEASURES.items()]
    for ax, (key, (title, _)) in zip(axes.flat, panels, strict=True):
        for arm, entry in data["arms"].items():
            curve = entry["curves"][key]
            values = np.array(curve["per_seed"], dtype=float)
            mean = values.mean(axis=0)
            ax.plot(curve["steps"], mean, color=COLORS[arm], label=ARMS[arm], lw=1.2)
            ax.fill_between(
                curve["steps"], values.min(axis=0), values.max(axis=0), color=COLORS[arm], alpha=0.2
            )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(True, alpha=0.3)
        if key in ("loss_range", "grad_change", "beta", "ics_l2"):
            ax.set_yscale("log")
        if key == "test_acc":
            ax.set_ylim(80, 100)
            ax.legend()
    fig.suptitle(
        "MNIST MLP (Section 4.1): ICS and loss landscape, mean over seeds, band min-max "
        "(Santurkar et al. 2018, Figures 2, 4, 5)"
    )
    fig.tight_layout()
    save(fig, path)


def main() -> int:
    return figure_command(
        __doc__.splitlines()[0], "ics", collect, plot, "arms", f"ICS runs ({', '.join(ARMS)})"
    )


if __name__ == "__main__":
    sys.exit(main())
