"""Test error against the normalisation batch on a conv net, in Wu & He's and Ioffe's designs.

    python scripts/make_batch_size_conv_figure.py --runs results/batch_size_conv/runs \
        --out results/batch_size_conv

Reads the runs of `make reproduce-batch-size` (configs/experiment/batch_size_conv/) and writes
batch_size_conv.png and batch_size_conv.json:

- Wu & He 2018's design (experiment batch_size_conv/wu_he): each norm at SGD batch = the batch
  it normalises over, 2 to 32, the learning rate scaled linearly with it (Group Normalization,
  Figure 1);
- Ioffe 2017's design (batch_size_conv/ghost): the SGD batch stays 32 at the calibrated rate,
  BN and Batch Renorm normalise ghost batches of g = 2..16 within it (Batch Renormalization,
  Section 4.2: micro-batches of 4); g = 32 is the Wu & He run at batch 32, and GroupNorm and
  LayerNorm, which use no batch statistics, are drawn at batch 32 as references.

The number is the final test error (the test set is read once, at the end; evaluations during
training read 5,000 held-out training images), every seed's (the dots), with the mean and its
95 % t interval over the seeds (drawn within the axis: a seed that ended at chance makes it
wide).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from bnrepro.analysis.plots import NORM_COLORS, NORM_LABELS, save
from bnrepro.analysis.runs import RunRecord, figure_command
from bnrepro.analysis.stats import seed_summary

COMMAND = "make reproduce-batch-size"
DESIGNS = {
    "batch_size_conv/wu_he": "wu_he",
    "batch_size_conv/ghost": "ghost",
}
REFERENCE_BATCH = 32  # the SGD batch of the ghost design, and Wu & He's images per GPU
GHOST_NORMS = ("bn", "batch_renorm")  # the norms with batch statistics: the ghost design's
FLOOR = 10.0  # the error axis starts here (log scale): intervals below it are drawn to it


def collect(runs: list[RunRecord]) -> dict:
    """{design: {norm: {normalisation batch: seed summary}}} and the settings they share."""
    errors = {d: defaultdict(lambda: defaultdict(list)) for d in DESIGNS.values()}
    seeds = {d: defaultdict(lambda: defaultdict(list)) for d in DESIGNS.values()}
    devices, seconds, settings = set(), {}, set()
    for run in runs:
        summary = run.summary
        design = DESIGNS.get(summary["experiment"])
        if design is None:
            continue
        cfg = run.config()
        norm, batch = summary["variant"]["norm"], summary["settings"]["batch_size"]
        group = cfg.model.bn.get("ghost_batch") or batch  # None: the whole batch
        acc = summary["final_test_acc"] if summary["status"] == "completed" else None
        errors[design][norm][group].append(100.0 - acc if acc is not None else 100.0)
        seeds[design][norm][group].append(run.seed)
        devices.add(summary["device"])
        seconds[(design, run.arm)] = summary["wall_seconds"]  # a stacked job's seeds share it
        lr_at_reference = round(summary["settings"]["lr"] * REFERENCE_BATCH / batch, 6)
        settings.add((cfg.epochs, cfg.data.train_size, lr_at_reference))
    tables = {}
    for design in DESIGNS.values():
        tables[design] = {
            norm: {
                str(g): {"seeds": seeds[design][norm][g]} | seed_summary(errors[design][norm][g])
                for g in sorted(errors[design][norm])
            }
            for norm in NORM_LABELS
            if norm in errors[design]
        }
    # The ghost design's g = 32 is the whole batch: the Wu & He runs at batch 32.
    for norm, rows in tables["wu_he"].items():
        if norm in GHOST_NORMS and str(REFERENCE_BATCH) in rows:
            tables["ghost"].setdefault(norm, {})[str(REFERENCE_BATCH)] = rows[str(REFERENCE_BATCH)]
    found = any(tables[d] for d in tables)
    return {
        "command": COMMAND,
        "metric": "final test error (%) = 100 - final test accuracy; a diverged run counts 100",
        "devices": sorted(devices),
        "job_seconds_sum": round(sum(seconds.values()), 1),
        "epochs_train_size_lr_at_32": sorted(settings),
        "designs": tables if found else {},
    }


def _panel(ax: Axes, rows_by_norm: dict, norms: list[str]) -> None:
    """Each norm's mean error with its interval (clipped to the axis, whose scale is log) and
    every seed's own error as a dot beside it."""
    for k, norm in enumerate(norms):
        rows = rows_by_norm.get(norm, {})
        if not rows:
            continue
        sizes = [int(b) for b in rows]
        means = [rows[b]["mean"] for b in rows]
        below = [rows[b]["mean"] - max(rows[b]["low"], FLOOR) for b in rows]
        above = [min(rows[b]["high"], 100.0) - rows[b]["mean"] for b in rows]
        ax.errorbar(
            sizes,
            means,
            yerr=[below, above],
            label=NORM_LABELS[norm],
            color=NORM_COLORS[norm],
            marker="o",
            ms=4,
            capsize=3,
        )
        shift = 2 ** ((k - (len(norms) - 1) / 2) * 0.04)  # dots side by side, not on top
        for b in rows:
            values = rows[b]["values"]
            ax.scatter(
                [int(b) * shift] * len(values), values, color=NORM_COLORS[norm], s=6, alpha=0.5
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted({int(b) for rows in rows_by_norm.values() for b in rows})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    yticks = [10, 12, 15, 20, 30, 50, 100]
    ax.set_yticks(yticks, [str(t) for t in yticks])
    ax.minorticks_off()
    ax.set_ylim(FLOOR, 100)
    ax.grid(True, alpha=0.3)


def plot(data: dict, path: Path) -> None:
    designs = data["designs"]
    fig, (wu, ghost) = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    _panel(wu, designs["wu_he"], list(NORM_LABELS))
    wu.set_xlabel("batch size = normalisation batch (lr x batch / 32)")
    wu.set_ylabel("final test error, % (log scale; dots: each seed)")
    wu.set_title("Wu & He's design: SGD batch = normalisation batch")
    wu.legend(title="mean, 95 % t interval over seeds", fontsize=8, title_fontsize=8)

    _panel(ghost, designs["ghost"], list(GHOST_NORMS))
    for norm in ("group_norm", "layer_norm"):  # no batch statistics: one value at batch 32
        row = designs["wu_he"].get(norm, {}).get(str(REFERENCE_BATCH))
        if row is not None:
            ghost.axhline(
                row["mean"],
                color=NORM_COLORS[norm],
                ls="--",
                lw=1,
                label=f"{NORM_LABELS[norm]} (no batch statistics)",
            )
    ghost.set_xlabel(f"examples per ghost batch g (SGD batch {REFERENCE_BATCH}, same lr)")
    ghost.set_title("Ioffe's design: BN over ghost batches within the SGD batch")
    ghost.legend(title="mean, 95 % t interval over seeds", fontsize=8, title_fontsize=8)
    epochs, train_size, lr32 = data["epochs_train_size_lr_at_32"][0]
    fig.suptitle(
        f"Conv net on Fashion-MNIST: {epochs} epochs of {train_size} images, lr {lr32:g} at "
        f"batch {REFERENCE_BATCH}",
        fontsize=10,
    )
    save(fig, path)


def main() -> int:
    return figure_command(
        __doc__.splitlines()[0], "batch_size_conv", collect, plot, "designs", "batch-size runs"
    )


if __name__ == "__main__":
    sys.exit(main())
