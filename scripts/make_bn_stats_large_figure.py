"""BN's inference statistics at a large batch: each estimate's accuracy and per-layer error.

    python scripts/make_bn_stats_large_figure.py --runs results/bn_stats/large/runs \
        --out results/bn_stats/large

Reads the runs of `make reproduce-bn-stats-large` (experiment=bn_stats_large/bn: the scaled
BN-Inception at batch 2048, linear lr scaling with warm-up, several seeds). At every evaluation
the same weights were tested with each estimate of BN's statistics and each estimate's distance
from the precise statistics was recorded per BN layer (bnrepro/measures/bn_estimators.py).
Writes bn_stats_large.png:

(a) validation accuracy of each estimate through training (mean over seeds, band min-max);
(b) each estimate's mean error |mu - mu_precise| / sigma_precise, median over the BN layers,
    through training (mean over seeds);
(c) the same error per layer (network order), averaged over the high-rate phase;
(d) the standard deviation's error |log(sigma / sigma_precise)| per layer, likewise.

bn_stats_large.json holds every seed's numbers. "The high-rate phase" is every evaluation
after the warm-up (step > optim.schedule.warmup_steps), where the rate is 0.64-0.77 here; the
gap of an estimate is its accuracy minus precise BN's on the same weights, averaged over those
evaluations per seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from bnrepro.analysis.plots import ESTIMATE_COLORS, ESTIMATE_LABELS, save
from bnrepro.analysis.runs import RunRecord, figure_command
from bnrepro.analysis.stats import seed_summary

COMMAND = "make reproduce-bn-stats-large"
REFERENCE = "precise"
COMPARED = [name for name in ESTIMATE_LABELS if name != REFERENCE]


def _records(run: RunRecord) -> list[dict]:
    """The run's evaluations that tested the estimates, in step order."""
    return [r for r in run.metrics if f"bn_stats/{REFERENCE}/val_acc" in r]


def _layer_errors(record: dict, name: str, kind: str) -> list[float]:
    """One evaluation's per-layer errors of one estimate (`kind`: mean_err or std_err)."""
    prefix = f"bn_stats/{name}/{kind}/"
    keys = sorted(k for k in record if k.startswith(prefix))
    return [record[k] for k in keys]


def collect(runs: list[RunRecord]) -> dict:
    runs = [r for r in runs if _records(r)]
    if not runs:
        return {"estimates": {}}
    cfg = runs[0].config()
    warmup = int(cfg.optim.schedule.get("warmup_steps", 0))
    steps = [r["step"] for r in _records(runs[0])]
    # A run shorter than its warm-up has no high-rate phase: then every evaluation after step 0.
    high = [i for i, step in enumerate(steps) if step > warmup] or list(range(1, len(steps)))
    estimates = {}
    for name in ESTIMATE_LABELS:
        per_seed = [_records(run) for run in runs]
        acc = [[r[f"bn_stats/{name}/val_acc"] for r in records] for records in per_seed]
        ref = [[r[f"bn_stats/{REFERENCE}/val_acc"] for r in records] for records in per_seed]
        entry = {
            "val_acc": acc,
            "gap_high_rate": seed_summary(
                [float(np.mean([a[i] - p[i] for i in high])) for a, p in zip(acc, ref, strict=True)]
            ),
            "final_val_acc": seed_summary([a[-1] for a in acc]),
        }
        if name != REFERENCE:
            for kind in ("mean_err", "std_err"):
                # [seed][evaluation][layer]
                errors = np.array(
                    [[_layer_errors(r, name, kind) for r in records] for records in per_seed]
                )
                entry[kind] = {
                    "median_over_layers": np.median(errors, axis=2).tolist(),
                    "per_layer_high_rate": errors[:, high, :].mean(axis=1).tolist(),
                    "high_rate_median": seed_summary(
                        [float(np.median(e[high, :].mean(axis=0))) for e in errors]
                    ),
                }
        estimates[name] = entry
    return {
        "command": COMMAND,
        "devices": sorted({r.summary["device"] for r in runs}),
        "job_seconds": runs[0].summary["wall_seconds"],
        "seeds": [r.seed for r in runs],
        "batch_size": runs[0].summary["settings"]["batch_size"],
        "peak_lr": runs[0].summary["settings"]["lr"],
        "warmup_steps": warmup,
        "steps": steps,
        "high_rate_steps": [steps[i] for i in high],
        "gap": f"validation accuracy (points) of the estimate minus {REFERENCE} BN's, same "
        f"weights, averaged over the evaluations after the warm-up",
        "mean_err": "|mu - mu_precise| / sqrt(var_precise + eps), mean over a layer's channels",
        "std_err": "|log(sigma / sigma_precise)|, mean over a layer's channels",
        "estimates": estimates,
    }


def plot(data: dict, path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    steps = data["steps"]
    est = data["estimates"]
    ax = axes[0, 0]
    for name in ESTIMATE_LABELS:
        values = np.array(est[name]["val_acc"])
        ax.plot(
            steps, values.mean(axis=0), color=ESTIMATE_COLORS[name], label=ESTIMATE_LABELS[name]
        )
        ax.fill_between(
            steps, values.min(axis=0), values.max(axis=0), color=ESTIMATE_COLORS[name], alpha=0.15
        )
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy, %")
    ax.set_title("(a) each estimate on the same weights (band: min-max over seeds)")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for name in COMPARED:
        values = np.array(est[name]["mean_err"]["median_over_layers"])
        ax.plot(
            steps, values.mean(axis=0), color=ESTIMATE_COLORS[name], label=ESTIMATE_LABELS[name]
        )
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("|mu - mu_precise| / sigma_precise, median over layers")
    ax.set_title("(b) mean's error against precise statistics (mean over seeds)")
    ax.legend(fontsize=8)
    for ax, kind, label, letter in (
        (axes[1, 0], "mean_err", "|mu - mu_precise| / sigma_precise", "c"),
        (axes[1, 1], "std_err", "|log(sigma / sigma_precise)|", "d"),
    ):
        for name in COMPARED:
            values = np.array(est[name][kind]["per_layer_high_rate"])
            layers = np.arange(values.shape[1])
            ax.plot(
                layers,
                values.mean(axis=0),
                color=ESTIMATE_COLORS[name],
                label=ESTIMATE_LABELS[name],
            )
        ax.set_yscale("log")
        ax.set_xlabel("BN layer (network order, 0 = first convolution)")
        ax.set_ylabel(f"{label}, mean over channels")
        ax.set_title(
            f"({letter}) per layer, averaged over steps {data['high_rate_steps'][0]}-"
            f"{data['high_rate_steps'][-1]} and seeds"
        )
        ax.legend(fontsize=8)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    fig.suptitle(
        f"Scaled BN-Inception on Fashion-MNIST, batch {data['batch_size']}, lr {data['peak_lr']:g} "
        f"after {data['warmup_steps']} warm-up steps, seeds {data['seeds']}",
        fontsize=11,
    )
    save(fig, path)


def main() -> int:
    return figure_command(
        __doc__.splitlines()[0], "bn_stats_large", collect, plot, "estimates", "bn_stats runs"
    )


if __name__ == "__main__":
    sys.exit(main())
