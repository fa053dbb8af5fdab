"""ICS and the loss landscape: no BN, BN, noisy BN and noise alone (Santurkar et al. 2018).

    python scripts/make_ics_figure.py --runs results/ics/runs --out results/ics

Reads the runs of `make reproduce-ics` (experiment=ics/baseline, ics/bn, ics/noisy_bn and the
control ics/noise, several seeds each) and writes ics.png, eight panels (mean over seeds, band
from the lowest to the highest seed): test and training accuracy (Santurkar et al.'s Figure
2), ICS as the l2 distance and the cosine between a layer's gradient before and after the
preceding layers' update (their Figure 3 in the NeurIPS version, Figure 5 in arXiv v1; the
mean over the layers measured), and the landscape along the gradient (their Figure 4): loss
variation, the gradient change relative to the gradient's norm and the effective
beta-smoothness (change per distance moved) against the step, and beta against the training
loss. The step sizes run from half the learning rate to just below the rate at which the
network without BN stops training (results/ics/lr_search.md).

ics.json holds the curves and, per seed, each measure averaged in three phases: the whole
run, its first tenth (where Santurkar et al. see the largest differences), and the measured
steps whose batch loss lies in a band both BN and no BN pass through (matched training loss:
[q, 2q], q the higher of the two arms' final loss, the mean over the last tenth of the run).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, MaxNLocator

from bnrepro.analysis.plots import save
from bnrepro.analysis.runs import RunRecord, figure_command
from bnrepro.analysis.stats import seed_summary

COMMAND = "make reproduce-ics"
ARMS = {"baseline": "no BN", "bn": "BN", "noisy_bn": "noisy BN", "noise": "noise, no BN"}
COLORS = {"baseline": "tab:blue", "bn": "tab:red", "noisy_bn": "tab:purple", "noise": "tab:gray"}
# (key in ics.json, title, what is averaged): each panel's measure.
MEASURES = {
    "ics_l2": ("ICS: ||G - G'|| (l2, mean over layers)", "l2"),
    "ics_cos": ("ICS: cos(G, G') (mean over layers)", "cos"),
    "loss_range": ("loss variation along the gradient", "landscape/loss_range"),
    "grad_change": ("max ||g(eta) - g|| (unnormalised)", "landscape/grad_change"),
    "grad_change_rel": (
        "gradient predictiveness: max ||g(eta) - g|| / ||g||",
        "landscape/grad_change_rel",
    ),
    "beta": ("effective beta-smoothness: max ||g(eta) - g|| / ||eta g||", "landscape/beta"),
    "loss": ("batch loss at the measured step", "landscape/loss"),
}
PLOTTED = ["ics_l2", "ics_cos", "loss_range", "grad_change_rel", "beta"]
EARLY_FRACTION = 0.1  # the first tenth of training
MATCHED_ARMS = ("baseline", "bn")  # the arms whose losses set the matched band
MATCHED_BAND = 2.0  # [q, 2q]


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


def accuracy_curve(run: RunRecord, key: str = "test/acc") -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in run.metrics if key in r]
    return [s for s, _ in points], [a for _, a in points]


def phase_means(steps: list[int], values: list[float], losses: list[float], band, total: int):
    """(early, matched): the mean of `values` over the first tenth of `total` steps, and over
    the measured steps whose batch loss lies in `band` (None where no step does)."""
    early = [v for s, v in zip(steps, values, strict=True) if s < EARLY_FRACTION * total]
    low, high = band
    matched = [v for v, loss in zip(values, losses, strict=True) if low <= loss <= high]
    return float(np.mean(early)), (float(np.mean(matched)) if matched else None)


def final_loss(run: RunRecord) -> float:
    """The batch loss at the measured steps of the run's last tenth, averaged."""
    steps, losses = measure_curve(run, "landscape/loss")
    last = [v for s, v in zip(steps, losses, strict=True) if s >= (1 - EARLY_FRACTION) * steps[-1]]
    return float(np.mean(last))


def collect(runs: list[RunRecord]) -> dict:
    by_arm: dict[str, list[RunRecord]] = defaultdict(list)
    for run in runs:
        if run.arm in ARMS:
            by_arm[run.arm].append(run)
    # The matched-loss band: both arms pass through it (each ends at or below q).
    finals = [
        np.mean([final_loss(r) for r in by_arm[a]])
        for a in MATCHED_ARMS
        if by_arm[a] and measure_curve(by_arm[a][0], "landscape/loss")[1]
    ]
    q = float(max(finals)) if finals else None
    band = (q, MATCHED_BAND * q) if q is not None else (np.inf, np.inf)
    arms = {}
    for arm in [a for a in ARMS if a in by_arm]:
        runs = by_arm[arm]
        entry: dict = {
            "seeds": [r.seed for r in runs],
            "curves": {},
            "per_seed_mean": {},
            "per_seed_early": {},
            "per_seed_matched": {},
            "matched_points": {},
        }
        for key, metric in (("test_acc", "test/acc"), ("train_acc", "trainset/acc")):
            steps, accs = zip(*(accuracy_curve(r, metric) for r in runs), strict=True)
            if not accs[0]:
                continue
            entry["curves"][key] = {"steps": steps[0], "per_seed": [list(a) for a in accs]}
            entry[f"final_{key}"] = seed_summary([a[-1] for a in accs])
        losses = [measure_curve(r, "landscape/loss")[1] for r in runs]
        for key, (_, measure) in MEASURES.items():
            steps, values = zip(*(measure_curve(r, measure) for r in runs), strict=True)
            if not values[0]:  # runs from before this measure was logged
                continue
            entry["curves"][key] = {"steps": steps[0], "per_seed": [list(v) for v in values]}
            entry["per_seed_mean"][key] = seed_summary([float(np.mean(v)) for v in values])
            if not losses[0]:  # runs from before landscape/loss was logged
                continue
            phases = [
                phase_means(list(st), list(v), loss, band, r.summary["steps"])
                for st, v, loss, r in zip(steps, values, losses, runs, strict=True)
            ]
            entry["per_seed_early"][key] = seed_summary([e for e, _ in phases])
            matched = [m for _, m in phases if m is not None]
            if len(matched) == len(phases):
                entry["per_seed_matched"][key] = seed_summary(matched)
        if losses[0]:
            entry["matched_points"] = [
                sum(band[0] <= v <= band[1] for v in loss) for loss in losses
            ]
        arms[arm] = entry
    devices = sorted({r.summary["device"] for runs in by_arm.values() for r in runs})
    first = next(iter(by_arm.values()))[0] if by_arm else None
    ics = first.config()["trainer"]["ics"] if first is not None else None
    return {
        "command": COMMAND,
        "devices": devices,
        "job_seconds_sum": round(
            sum(runs[0].summary["wall_seconds"] for runs in by_arm.values()), 1
        ),
        "step_scales": list(ics["step_scales"]) if ics else None,
        "measured_every": ics["every"] if ics else None,
        "per_seed_mean": "each measure averaged over every measured step of a seed's run",
        "per_seed_early": f"the same over the steps before {EARLY_FRACTION:g} of the run",
        "per_seed_matched": (
            "the same over the measured steps whose batch loss lies in matched_loss_band"
        ),
        "matched_loss_band": list(band) if q is not None else None,
        "arms": arms,
    }


def _band(ax, steps, values: np.ndarray, arm: str) -> None:
    ax.plot(steps, values.mean(axis=0), color=COLORS[arm], label=ARMS[arm], lw=1.2)
    ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=COLORS[arm], alpha=0.2)


def plot(data: dict, path: Path) -> None:
    fig, axes = plt.subplots(2, 4, figsize=(20, 9))
    accuracy = [
        ("test_acc", "test accuracy (%)"),
        ("train_acc", "training accuracy (%), 10k images"),
    ]
    panels = accuracy + [(key, MEASURES[key][0]) for key in PLOTTED]
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        for arm, entry in data["arms"].items():
            if key not in entry["curves"]:
                continue
            curve = entry["curves"][key]
            _band(ax, curve["steps"], np.array(curve["per_seed"], dtype=float), arm)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v else "0"))
        ax.set_ylabel("%" if key.endswith("acc") else MEASURES[key][1].split("/")[-1])
        ax.grid(True, alpha=0.3)
        if key in ("loss_range", "grad_change_rel", "beta", "ics_l2"):
            ax.set_yscale("log")
        if key.endswith("acc"):
            ax.set_ylim(80, 100.5)
        ax.legend(fontsize=8)
    # Beta against the batch loss: the arms compared where they are equally trained.
    ax = axes.flat[-1]
    for arm, entry in data["arms"].items():
        if "loss" not in entry["curves"]:
            continue
        loss = np.array(entry["curves"]["loss"]["per_seed"], dtype=float).ravel()
        beta = np.array(entry["curves"]["beta"]["per_seed"], dtype=float).ravel()
        if loss.size:
            ax.scatter(loss, beta, s=3, alpha=0.3, color=COLORS[arm], label=ARMS[arm])
    if data.get("matched_loss_band"):
        ax.axvspan(*data["matched_loss_band"], color="grey", alpha=0.15, label="matched band")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch loss at the measured step")
    ax.set_ylabel("beta")
    ax.set_title("effective beta-smoothness against training loss", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, markerscale=4)
    scales = data.get("step_scales") or []
    fig.suptitle(
        "MNIST MLP (Section 4.1): ICS and loss landscape, mean over seeds, band = lowest to "
        f"highest seed; steps along the gradient {', '.join(f'{v:g}' for v in scales)} x lr "
        "(Santurkar et al. 2018, Figures 2-4)"
    )
    fig.tight_layout()
    save(fig, path)


def main() -> int:
    return figure_command(
        __doc__.splitlines()[0], "ics", collect, plot, "arms", f"ICS runs ({', '.join(ARMS)})"
    )


if __name__ == "__main__":
    sys.exit(main())
