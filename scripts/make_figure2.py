"""Figures 2 and 3 of the paper (ImageNet) from run directories or a W&B project.

    python scripts/make_figure2.py --runs logs/multiruns/<time> --out results/imagenet
    python scripts/make_figure2.py --wandb-project me/bnrepro --out results/imagenet

Figure 2: single-crop validation top-1 against training step for Inception and its BN
variants. Figure 3: the table "steps to reach X % / max accuracy" (X = 72.2, Inception's
best, unless --target says otherwise), beside the paper's numbers. Writes figure2.png,
figure3.md and figure3.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib.pyplot as plt

from bnrepro.analysis import (
    arm_results,
    find_runs,
    markdown_table,
    results_json,
    runs_from_wandb,
    table_rows,
)
from bnrepro.plots import save

METRIC = "val/top1"
# Figure 3 of the paper: steps to 72.2 % and maximum single-crop top-1.
PAPER = {
    "inception": {"paper: steps to 72.2 %": "31.0M", "paper: max acc": "72.2 %"},
    "bn_baseline": {"paper: steps to 72.2 %": "13.3M", "paper: max acc": "72.7 %"},
    "bn_x5": {"paper: steps to 72.2 %": "2.1M", "paper: max acc": "73.0 %"},
    "bn_x30": {"paper: steps to 72.2 %": "2.7M", "paper: max acc": "74.8 %"},
    "bn_x5_sigmoid": {"paper: steps to 72.2 %": "-", "paper: max acc": "69.8 %"},
}
LABELS = {
    "inception": "Inception",
    "bn_baseline": "BN-Baseline",
    "bn_x5": "BN-x5",
    "bn_x30": "BN-x30",
    "bn_x5_sigmoid": "BN-x5-Sigmoid",
}


def main() -> int:
    parser = argparse.ArgumentParser(description="Build Figure 2 and the Figure 3 table.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--runs", type=Path, help="a folder holding run directories")
    source.add_argument("--wandb-project", help="entity/project to read the runs from")
    parser.add_argument("--out", type=Path, default=Path("results/imagenet"))
    parser.add_argument("--target", type=float, default=72.2, help="top-1 (%%) to reach")
    args = parser.parse_args()
    runs = (
        runs_from_wandb(args.wandb_project, METRIC) if args.wandb_project else find_runs(args.runs)
    )
    runs = [r for r in runs if r.arm in LABELS]
    if not runs:
        print(f"error: no ImageNet runs ({', '.join(LABELS)}) found", file=sys.stderr)
        return 2
    results = arm_results(runs, METRIC)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in LABELS:
        if arm in results:
            r = results[arm]
            ax.plot(r.steps, r.curve, label=LABELS[arm] + (" (diverged)" if r.diverged else ""))
    ax.axhline(args.target, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation top-1 accuracy (%), single crop")
    ax.set_title("Figure 2: Inception and its batch-normalized variants")
    ax.legend()
    args.out.mkdir(parents=True, exist_ok=True)
    save(fig, args.out / "figure2.png")

    rows = sorted(table_rows(results, args.target), key=lambda row: list(LABELS).index(row["arm"]))
    table = markdown_table(rows, args.target, PAPER)
    source_text = args.wandb_project or str(args.runs)
    (args.out / "figure3.md").write_text(
        f"# ImageNet, Figures 2 and 3\n\n![Figure 2](figure2.png)\n\nBuilt from `{source_text}` "
        f"by `python scripts/make_figure2.py`.\n\n" + table
    )
    (args.out / "figure3.json").write_text(
        results_json(results, rows, METRIC, args.target, source=source_text)
    )
    print(table)
    print(f"wrote {args.out / 'figure2.png'}, figure3.md and figure3.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
