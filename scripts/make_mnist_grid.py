"""The variant grid on MNIST (Figure 3 in miniature) from stored run logs.

    python scripts/make_mnist_grid.py --runs results/mnist/grid_runs --out results/mnist

Test accuracy against step for every combination of normalisation, learning-rate multiplier,
activation and dropout (one panel per activation and dropout), and the table "steps to reach
X % / max accuracy / diverged". Writes grid.png, grid.md and grid.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib.pyplot as plt

from bnrepro.analysis.plots import save
from bnrepro.analysis.runs import (
    arm_results,
    find_runs,
    markdown_table,
    provenance_of,
    results_json,
    table_rows,
)

COMMAND = "make reproduce-mnist-grid"
METRIC = "test/acc"
LR_STYLES = {1: ":", 5: "--", 30: "-"}
NORM_COLORS = {"none": "tab:blue", "bn": "tab:red"}


def main() -> int:
    parser = argparse.ArgumentParser(description="Build the MNIST variant grid figure and table.")
    parser.add_argument("--runs", type=Path, default=Path("results/mnist/grid_runs"))
    parser.add_argument("--out", type=Path, default=Path("results/mnist"))
    parser.add_argument("--target", type=float, default=97.0, help="accuracy (%%) to reach")
    args = parser.parse_args()
    runs = find_runs(args.runs)
    if not runs:
        print(f"error: no runs under {args.runs}; run `{COMMAND}` first", file=sys.stderr)
        return 2
    results = arm_results(runs, METRIC)
    # Each arm's variant as its runs recorded it (summary.json, else their stored config).
    variants = {run.arm: run.variant for run in runs}
    panels = sorted({(v["activation"], v["dropout"]) for v in variants.values()})
    ncols = 2 if len(panels) > 1 else 1
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.2 * nrows), squeeze=False)
    order = sorted(results, key=lambda a: (variants[a]["norm"], variants[a]["lr_mult"]))
    for ax, (activation, dropout) in zip(axes.flat, panels, strict=False):
        for arm in order:
            result = results[arm]
            v = variants[arm]
            if (v["activation"], v["dropout"]) != (activation, dropout):
                continue
            label = f"{'BN' if v['norm'] == 'bn' else 'no BN'} x{v['lr_mult']}"
            if result.diverged:
                label += f" (diverged at {min(result.diverged_at):,})"
            ax.plot(
                result.steps,
                result.curve,
                LR_STYLES[v["lr_mult"]],
                color=NORM_COLORS[v["norm"]],
                label=label,
            )
        ax.axhline(args.target, color="grey", linewidth=0.8)
        ax.set_title(f"{activation}, dropout {dropout}")
        ax.set_xlabel("training step")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(80, 100)
        ax.legend(fontsize=7, loc="lower right")
    args.out.mkdir(parents=True, exist_ok=True)
    save(fig, args.out / "grid.png")

    rows = table_rows(results, args.target)
    table = markdown_table(rows, args.target)
    (args.out / "grid.md").write_text(
        f"# MNIST variant grid\n\n![grid](grid.png)\n\nMade by `{COMMAND}` (runs in `grid_runs/`; "
        f"`make figures` rebuilds this from them). Test accuracy in %, one seed per variant; "
        f"a variant is `<norm>_x<lr multiplier>_<activation>_drop<dropout>`, base lr 0.1.\n\n"
        + table
    )
    (args.out / "grid.json").write_text(
        results_json(
            results, rows, METRIC, args.target, command=COMMAND, provenance=provenance_of(runs)
        )
    )
    print(table)
    print(f"wrote {args.out / 'grid.png'}, grid.md and grid.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
