"""Figures 2 and 3 of the paper, at full scale (ImageNet) or small scale (Fashion-MNIST).

    python scripts/make_figure2.py --runs logs/multiruns/<time> --out results/imagenet
    python scripts/make_figure2.py --wandb-project me/bnrepro --out results/imagenet
    python scripts/make_figure2.py --small --runs results/fig2_small/runs --out results/fig2_small

Figure 2: accuracy against training step for Inception and its BN variants (with --small,
test accuracy on Fashion-MNIST, the mean over seeds with a band from the lowest to the highest
seed, and the paper's two no-BN controls). Figure 3: the table "steps to reach X % / max
accuracy", beside the paper's numbers; X is 72.2 (Inception's best in the paper) at full
scale, and Inception's own best mean accuracy with --small. Writes figure2.png, figure3.md
and figure3.json (the table, the curves and every seed's numbers).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt

from bnrepro.analysis.plots import save
from bnrepro.analysis.runs import (
    RunRecord,
    arm_results,
    find_runs,
    markdown_table,
    provenance_of,
    results_json,
    runs_from_wandb,
    table_rows,
)

# Figure 3 of the paper: steps to 72.2 % and maximum single-crop top-1 (Section 4.2.2).
PAPER = {
    "inception": {"paper: steps to 72.2 %": "31.0M", "paper: max acc": "72.2 %"},
    "bn_baseline": {"paper: steps to 72.2 %": "13.3M", "paper: max acc": "72.7 %"},
    "bn_x5": {"paper: steps to 72.2 %": "2.1M", "paper: max acc": "73.0 %"},
    "bn_x30": {"paper: steps to 72.2 %": "2.7M", "paper: max acc": "74.8 %"},
    "bn_x5_sigmoid": {"paper: steps to 72.2 %": "-", "paper: max acc": "69.8 %"},
    "inception_x5": {"paper: steps to 72.2 %": "-", "paper: max acc": "diverged"},
    "inception_sigmoid": {"paper: steps to 72.2 %": "-", "paper: max acc": "never > 0.1 %"},
}
LABELS = {
    "inception": "Inception",
    "bn_baseline": "BN-Baseline",
    "bn_x5": "BN-x5",
    "bn_x30": "BN-x30",
    "bn_x5_sigmoid": "BN-x5-Sigmoid",
}
# The paper's two no-BN controls (Section 4.2.2), trained at small scale only.
CONTROLS = {
    "inception_x5": "Inception-x5 (no BN)",
    "inception_sigmoid": "Inception-Sigmoid (no BN)",
}


@dataclass(frozen=True)
class Scale:
    metric: str
    ylabel: str
    title: str
    arms: dict[str, str]
    target: float | None  # None: Inception's own best mean accuracy
    heading: str


FULL = Scale(
    "val/top1",
    "validation top-1 accuracy (%), single crop",
    "Figure 2: Inception and its batch-normalized variants",
    LABELS,
    72.2,
    "ImageNet, Figures 2 and 3",
)
SMALL = Scale(
    "test/acc",
    "Fashion-MNIST test accuracy (%)",
    "Figure 2 at small scale: BN-Inception /8 on Fashion-MNIST\n"
    "(mean over seeds, band: min to max)",
    LABELS | CONTROLS,
    None,
    "Figures 2 and 3 at small scale (Fashion-MNIST)",
)


def per_seed(runs: list[RunRecord], metric: str, target: float) -> dict[str, list[dict]]:
    """Every seed's own numbers, for confidence intervals (scripts/make_report.py)."""
    out: dict[str, list[dict]] = {}
    for run in runs:
        points = [(m["step"], m[metric]) for m in run.metrics if m.get(metric) is not None]
        reached = [step for step, acc in points if acc >= target]
        out.setdefault(run.arm, []).append(
            {
                "seed": run.seed,
                "status": run.summary["status"],
                "diverged_at_step": run.summary.get("diverged_at_step"),
                "max_acc": max((acc for _, acc in points), default=None),
                "final_acc": points[-1][1] if points else None,
                "steps_to_target": reached[0] if reached else None,
                "device": run.summary.get("device"),
                "wall_seconds": run.summary.get("wall_seconds"),
            }
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description="Build Figure 2 and the Figure 3 table.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--runs", type=Path, help="a folder holding run directories")
    source.add_argument("--wandb-project", help="entity/project to read the runs from")
    parser.add_argument("--out", type=Path, default=Path("results/imagenet"))
    parser.add_argument("--small", action="store_true", help="the Fashion-MNIST scale")
    parser.add_argument("--target", type=float, help="accuracy (%%) to reach")
    args = parser.parse_args()
    scale = SMALL if args.small else FULL
    runs = (
        runs_from_wandb(args.wandb_project, scale.metric)
        if args.wandb_project
        else find_runs(args.runs)
    )
    runs = [r for r in runs if r.arm in scale.arms]
    if not runs:
        print(f"error: no runs of {', '.join(scale.arms)} found", file=sys.stderr)
        return 2
    results = arm_results(runs, scale.metric)
    target = args.target or scale.target
    if target is None:
        if "inception" not in results:
            print("error: no Inception runs: pass --target", file=sys.stderr)
            return 2
        target = round(results["inception"].max_acc, 2)

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for arm, label in scale.arms.items():
        if arm in results:
            r = results[arm]
            line = ax.plot(r.steps, r.curve, label=label + (" (diverged)" if r.diverged else ""))
            seeds = r.seed_curves
            if args.small and seeds.shape[0] > 1:
                ax.fill_between(
                    r.steps, seeds.min(0), seeds.max(0), color=line[0].get_color(), alpha=0.15
                )
    ax.axhline(target, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("training step")
    ax.set_ylabel(scale.ylabel)
    ax.set_title(scale.title)
    ax.legend(fontsize=8)
    args.out.mkdir(parents=True, exist_ok=True)
    save(fig, args.out / "figure2.png")

    order = list(scale.arms)
    rows = sorted(table_rows(results, target), key=lambda row: order.index(row["arm"]))
    table = markdown_table(rows, target, PAPER)
    source_text = args.wandb_project or str(args.runs)
    devices = sorted({str(r.summary.get("device", "not recorded")) for r in runs})
    command = "python scripts/make_figure2.py" + (" --small" if args.small else "")
    target_text = (
        f"The target is Inception's best mean accuracy here, {target:g} % (72.2 % in the paper)."
        if scale.target is None and args.target is None
        else f"The target is {target:g} %."
    )
    (args.out / "figure3.md").write_text(
        f"# {scale.heading}\n\n![Figure 2](figure2.png)\n\nBuilt from `{source_text}` by "
        f"`{command}`; trained on {', '.join(devices)}. {target_text}\n\n" + table
    )
    (args.out / "figure3.json").write_text(
        results_json(
            results,
            rows,
            scale.metric,
            target,
            source=source_text,
            devices=devices,
            per_seed=per_seed(runs, scale.metric, target),
            provenance=provenance_of(runs),
        )
    )
    print(table)
    print(f"wrote {args.out / 'figure2.png'}, figure3.md and figure3.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
