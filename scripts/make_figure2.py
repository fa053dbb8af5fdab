"""Figures 2 and 3 of the paper, at full scale (ImageNet) or small scale (Fashion-MNIST).

    python scripts/make_figure2.py --runs logs/multiruns/<time> --out results/imagenet
    python scripts/make_figure2.py --wandb-project me/bnrepro --out results/imagenet
    python scripts/make_figure2.py --small --runs results/fig2_small/runs --out results/fig2_small

Figure 2: accuracy against training step for Inception and its BN variants. Figure 3: the
table "steps to reach X % / max accuracy", beside the paper's numbers; X is 72.2 (Inception's
best in the paper) at full scale. Writes figure2.png, figure3.md and figure3.json (the table,
the curves and every seed's numbers).

With --small (Fashion-MNIST, issue 21's design): validation accuracy on the 5,000 held-out
training images, the mean over seeds with a band from the lowest to the highest seed, on a
log-step axis, with the paper's two no-BN controls and the dropout pair. X is Inception's
plateau maximum: the lowest of its seeds' maximum validation accuracies, which every Inception
seed reached. Each seed's step to X is read by linear interpolation between the evaluations
around its crossing (bnrepro.analysis.stats.crossing_step); the table gives each arm's
geometric mean over the seeds that reached X and its speed-up over Inception with Welch's
interval on log steps (stats.ratio_interval, every seed of both arms), the mean max
validation accuracy, the test accuracy read once at the end, and where each arm stopped
(plateau or step cap).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

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
from bnrepro.analysis.stats import crossing_step, mean_interval, ratio_interval

# Figure 3 of the paper: steps to 72.2 % and maximum single-crop top-1 (Section 4.2.2).
PAPER = {
    "inception": {"paper: steps to 72.2 %": "31.0M", "paper: max acc": "72.2 %"},
    "bn_baseline": {"paper: steps to 72.2 %": "13.3M", "paper: max acc": "72.7 %"},
    "bn_x5": {"paper: steps to 72.2 %": "2.1M", "paper: max acc": "73.0 %"},
    "bn_x30": {"paper: steps to 72.2 %": "2.7M", "paper: max acc": "74.8 %"},
    "bn_x5_sigmoid": {"paper: steps to 72.2 %": "-", "paper: max acc": "69.8 %"},
    "inception_x5": {"paper: steps to 72.2 %": "-", "paper: max acc": "diverged"},
    "inception_sigmoid": {"paper: steps to 72.2 %": "-", "paper: max acc": "never > 0.1 %"},
    "bn_x5_dropout": {"paper: steps to 72.2 %": "-", "paper: max acc": "not trained"},
    "inception_no_dropout": {"paper: steps to 72.2 %": "-", "paper: max acc": "not trained"},
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
# The dropout pair's other halves (issue 21): "Remove Dropout" tested with its control.
DROPOUT = {
    "bn_x5_dropout": "BN-x5 with dropout",
    "inception_no_dropout": "Inception without dropout",
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
    "val/acc",
    "validation accuracy (%)",
    "Figure 2 at small scale: BN-Inception /8, Fashion-MNIST, 5,000 held-out images\n"
    "(mean over seeds, band: min to max; dots: crossings of the target)",
    LABELS | CONTROLS | DROPOUT,
    None,
    "Figures 2 and 3 at small scale (Fashion-MNIST)",
)


def curve(run: RunRecord, metric: str) -> list[tuple[int, float]]:
    return [(m["step"], m[metric]) for m in run.metrics if m.get(metric) is not None]


def per_seed(runs: list[RunRecord], metric: str, target: float) -> dict[str, list[dict]]:
    """Every seed's own numbers, for confidence intervals (scripts/make_report.py); the step
    to the target interpolated between evaluations (None: never reached)."""
    out: dict[str, list[dict]] = {}
    for run in runs:
        points = curve(run, metric)
        out.setdefault(run.arm, []).append(
            {
                "seed": run.seed,
                "status": run.summary["status"],
                "diverged_at_step": run.summary.get("diverged_at_step"),
                "max_acc": max((acc for _, acc in points), default=None),
                "final_acc": points[-1][1] if points else None,
                "steps_to_target": crossing_step(points, target),
                "steps": run.summary.get("steps"),
                "plateau_step": run.summary.get("plateau_step"),
                "stopped_by": run.summary.get("stopped_by"),
                "final_test_acc": run.summary.get("final_test_acc"),
                "device": run.summary.get("device"),
                "wall_seconds": run.summary.get("wall_seconds"),
            }
        )
    return out


def design(runs: list[RunRecord], target: float) -> str:
    """The small-scale design as the report states it, read from an Inception run's config."""
    cfg = next(r for r in runs if r.arm == "inception").config()
    trainer, plateau = cfg.trainer, cfg.trainer.plateau
    return (
        "BN-Inception at 1/8 width on Fashion-MNIST (28x28), batch 32; validation accuracy on "
        f"{cfg.data.val_size:,} held-out training images (class-balanced, fixed) every "
        f"{trainer.eval_every} steps, the test set once at the end; each arm trained until "
        f"its best validation accuracy gained less than {plateau.min_gain:g} points over the "
        f"last {plateau.window:.0%} of its steps (from step {plateau.min_steps:,}), or to the "
        f"{trainer.steps:,}-step cap; base learning rate {cfg.optim.base_lr:g} from the search "
        f"(lr_search.md); target: Inception's plateau maximum, {target:.2f} % (the lowest of "
        "its seeds' maxima); steps to it interpolated between evaluations."
    )


def plateau_target(runs: list[RunRecord], metric: str) -> float:
    """Inception's plateau maximum: the lowest of its seeds' maximum accuracies (so every
    Inception seed reached it), rounded to 0.01 as the table prints it."""
    return round(min(max(a for _, a in curve(r, metric)) for r in runs if r.arm == "inception"), 2)


def geometric_mean(values: list[float]) -> float | None:
    """Over the positive values; None without any (a crossing at step 0, before training, has
    no place on a log scale)."""
    positive = [v for v in values if v > 0]
    return math.exp(sum(map(math.log, positive)) / len(positive)) if positive else None


def small_table(seeds: dict[str, list[dict]], order: list[str], target: float) -> str:
    """Figure 3 at small scale: per arm, steps to the target, speed-up over Inception with its
    interval, max validation accuracy, test accuracy at the end, where training stopped."""
    inception = [s["steps_to_target"] for s in seeds.get("inception", [])]
    inception = [s for s in inception if s]  # reached, after step 0
    head = [
        "variant",
        "seeds",
        f"steps to {target:.2f} % (geo. mean; reached)",
        "speed-up over Inception [95 % CI]",
        "max val acc (%)",
        "test acc at end (%)",
        "stopped (step)",
        "paper: steps to 72.2 %",
        "paper: max acc",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in order:
        if arm not in seeds:
            continue
        entries = seeds[arm]
        reached = [s["steps_to_target"] for s in entries if s["steps_to_target"] is not None]
        mean = geometric_mean(reached)
        steps = f"{mean:,.0f}" if mean else ("at step 0" if reached else "not reached")
        steps += f" ({len(reached)} of {len(entries)})"
        positive = [s for s in reached if s > 0]
        ratio = ratio_interval(inception, positive) if arm != "inception" else None
        speed = ratio.text("x") if ratio else "-"
        maxes = [s["max_acc"] for s in entries if s["max_acc"] is not None]
        tests = [s["final_test_acc"] for s in entries if s.get("final_test_acc") is not None]
        stopped = sorted({f"{s['stopped_by'] or s['status']} ({s['steps']:,})" for s in entries})
        lines.append(
            "| "
            + " | ".join(
                [
                    arm,
                    str(len(entries)),
                    steps,
                    speed,
                    mean_interval(maxes).text() if maxes else "-",
                    mean_interval(tests).text() if tests else "-",
                    ", ".join(stopped),
                    PAPER.get(arm, {}).get("paper: steps to 72.2 %", ""),
                    PAPER.get(arm, {}).get("paper: max acc", ""),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


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
        target = plateau_target(runs, scale.metric)
    seeds = per_seed(runs, scale.metric, target)

    # At small scale a second panel zooms in on the target, where the arms cross it.
    fig, axes = plt.subplots(1, 2 if args.small else 1, figsize=(14 if args.small else 7.5, 4.8))
    panels = list(axes) if args.small else [axes]
    for ax in panels:
        for arm, label in scale.arms.items():
            if arm in results:
                r = results[arm]
                text = label + (" (diverged)" if r.diverged else "")
                line = ax.plot(r.steps, r.curve, label=text)
                band = r.seed_curves
                if args.small and band.shape[0] > 1:
                    ax.fill_between(
                        r.steps, band.min(0), band.max(0), color=line[0].get_color(), alpha=0.15
                    )
                crossed = [s["steps_to_target"] for s in seeds[arm] if s["steps_to_target"]]
                if args.small and crossed:
                    ax.plot([geometric_mean(crossed)], [target], "o", color=line[0].get_color())
        ax.axhline(target, color="grey", linewidth=0.8, linestyle=":", label="target")
        ax.set_xlabel("training step")
        ax.set_ylabel(scale.ylabel)
        ax.legend(fontsize=8)
    ax = panels[0]
    ax.set_title(scale.title)
    if args.small:
        ax.set_xscale("symlog", linthresh=100)  # step 0 stays on the axis
        ax.set_xlabel("training step (linear to 100, logarithmic above)")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        zoom = panels[1]
        top = max(float(np.nanmax(r.curve)) for r in results.values())
        zoom.set_xscale("log")
        zoom.set_xlim(500, max(max(r.steps) for r in results.values()))
        zoom.set_ylim(target - 8, top + 1)
        zoom.set_xlabel("training step (logarithmic, from 500)")
        zoom.set_title(f"near the target ({target:.2f} %, dotted); dots: crossings")
    args.out.mkdir(parents=True, exist_ok=True)
    save(fig, args.out / "figure2.png")

    order = list(scale.arms)
    rows = sorted(table_rows(results, target), key=lambda row: order.index(row["arm"]))
    table = small_table(seeds, order, target) if args.small else markdown_table(rows, target, PAPER)
    source_text = args.wandb_project or str(args.runs)
    devices = sorted({str(r.summary.get("device", "not recorded")) for r in runs})
    command = "python scripts/make_figure2.py" + (" --small" if args.small else "")
    target_text = (
        f"The target is Inception's plateau maximum here, {target:.2f} % validation accuracy "
        "(the lowest of its seeds' maxima; 72.2 % in the paper)."
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
            per_seed=seeds,
            **({"design": design(runs, target)} if args.small else {}),
            seed_curves={
                arm: {str(r.seed): curve(r, scale.metric) for r in runs if r.arm == arm}
                for arm in results
            },
            provenance=provenance_of(runs),
        )
    )
    print(table)
    print(f"wrote {args.out / 'figure2.png'}, figure3.md and figure3.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
