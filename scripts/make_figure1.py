"""Figure 1 of the paper from stored MNIST (or Fashion-MNIST) run logs.

    python scripts/make_figure1.py --runs results/mnist/runs --out results/mnist
    python scripts/make_figure1.py --runs results/fashion_mnist/runs --out results/fashion_mnist

(a) test accuracy against training step, mean and min-max band over seeds, with and
without BN; (b, c) the 15th/50th/85th percentiles of the input to one typical sigmoid of the
last hidden layer, without (b) and with (c) BN. Writes figure1.png and figure1.json (the
plotted numbers and the per-arm statistics quoted in the README).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from bnrepro.analysis.plots import plot_accuracy_band, plot_percentiles, save
from bnrepro.analysis.runs import RunRecord, find_runs, provenance_of

ARMS = {"baseline": "Without BN", "bn": "With BN"}
COLORS = {"baseline": "tab:blue", "bn": "tab:red"}
# data.name -> the dataset's name, the command that makes its runs, panel (a)'s accuracy range.
DATASETS = {
    "mnist": ("MNIST", "make reproduce-mnist", (90, 100)),
    "fashion_mnist": ("Fashion-MNIST", "make reproduce-fashion", (75, 92)),
}
DRIFT_KEYS = ("p50_drift", "spread_drift", "p50_range", "spread_range")


def last_hidden_layer(run: RunRecord) -> str:
    layers = {key.split("/")[1] for key in run.metrics[0] if key.startswith("act/")}
    return max(layers, key=lambda name: int(name[1:]))


def mean_std(values: list[float]) -> dict:
    """Mean, population std and n, with every seed's value (the report's intervals use them)."""
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values)),
        "n": len(values),
        "values": [float(v) for v in values],
    }


def dataset_of(runs: list[RunRecord]) -> str:
    """data.name of the runs (summaries record it; runs made before that were MNIST)."""
    names = {r.summary.get("settings", {}).get("data", "mnist") for r in runs}
    if len(names) != 1:
        raise SystemExit(f"error: runs of several datasets ({sorted(names)}); give one sweep")
    return names.pop()


def trace(run: RunRecord, layer: str, key: str) -> np.ndarray:
    return np.array([r[f"act/{layer}/{key}"] for r in run.metrics])


def drift(run: RunRecord, layer: str) -> dict[str, float]:
    """How far the median and the 15-85 spread moved: first to last evaluation ("drift"),
    and the whole range they covered during training ("range", which also counts a
    wander that came back)."""
    p15, p50, p85 = (trace(run, layer, k) for k in ("p15", "p50", "p85"))
    spread = p85 - p15
    return {
        "p50_drift": float(abs(p50[-1] - p50[0])),
        "spread_drift": float(abs(spread[-1] - spread[0])),
        "p50_range": float(p50.max() - p50.min()),
        "spread_range": float(spread.max() - spread.min()),
    }


def arm_statistics(runs: list[RunRecord], layer: str) -> dict:
    completed = [r for r in runs if r.summary["status"] == "completed"]
    drifts = [drift(r, layer) for r in completed]
    return {
        "seeds": [r.seed for r in runs],
        "status": {str(r.seed): r.summary["status"] for r in runs},
        "final_test_acc": mean_std([r.summary["final_test_acc"] for r in completed]),
        "best_test_acc": mean_std([r.summary["best_test_acc"] for r in completed]),
        **{key: mean_std([d[key] for d in drifts]) for key in DRIFT_KEYS},
    }


def accuracy_matrix(runs: list[RunRecord]) -> tuple[list[int], np.ndarray]:
    """Steps and a (runs x evaluations) accuracy matrix, cut to the evaluations all share."""
    n = min(len(r.metrics) for r in runs)
    steps = [r["step"] for r in runs[0].metrics[:n]]
    return steps, np.array([[m["test/acc"] for m in r.metrics[:n]] for r in runs])


def first_step_reaching(steps: list[int], curve: np.ndarray, target: float) -> int | None:
    hits = np.nonzero(curve >= target)[0]
    return int(steps[hits[0]]) if hits.size else None


def build(runs: list[RunRecord], out: Path) -> dict:
    data = dataset_of(runs)
    dataset, command, acc_range = DATASETS[data]
    by_arm = {arm: [r for r in runs if r.arm == arm] for arm in ARMS}
    missing = [arm for arm, rs in by_arm.items() if not rs]
    if missing:
        raise SystemExit(f"error: no runs of arm(s) {missing}; run `{command}` first")
    layer = last_hidden_layer(runs[0])
    trace_seed = min(r.seed for r in runs)
    devices = sorted({r.summary["device"] for r in runs if "device" in r.summary})
    result: dict = {
        "command": command,
        "layer": layer,
        "trace_seed": trace_seed,
        "arms": {},
        "plotted": {},
    }
    if devices:  # summaries record the device since the GPU path came (issue 10)
        result["device"] = ", ".join(devices)
    if data != "mnist":  # MNIST's figure1.json predates the key
        result["dataset"] = dataset

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for arm, title in ARMS.items():
        arm_runs = [r for r in by_arm[arm] if r.summary["status"] == "completed"]
        steps, accs = accuracy_matrix(arm_runs)
        dropped = len(by_arm[arm]) - len(arm_runs)  # diverged or failed: said, not hidden
        label = f"{title} (n={len(arm_runs)}" + (
            f", {dropped} diverged/failed)" if dropped else ")"
        )
        plot_accuracy_band(axes[0], steps, accs, label, COLORS[arm])
        shown = (
            next(r for r in arm_runs if r.seed == trace_seed)
            if any(r.seed == trace_seed for r in arm_runs)
            else arm_runs[0]
        )
        traces = {k: trace(shown, layer, k).tolist() for k in ("p15", "p50", "p85")}
        panel = axes[1] if arm == "baseline" else axes[2]
        plot_percentiles(
            panel,
            [m["step"] for m in shown.metrics],
            traces,
            f"({'b' if arm == 'baseline' else 'c'}) {title}: {layer} unit, seed {shown.seed}",
        )
        result["arms"][arm] = arm_statistics(by_arm[arm], layer)
        result["plotted"][arm] = {
            "steps": steps,
            "test_acc_mean": accs.mean(axis=0).tolist(),
            "test_acc_min": accs.min(axis=0).tolist(),
            "test_acc_max": accs.max(axis=0).tolist(),
            "trace_steps": [m["step"] for m in shown.metrics],
            **traces,
        }
    axes[0].set_title(f"(a) {dataset} test accuracy,\nmean and min-max over seeds")
    axes[0].set_ylim(*acc_range)
    axes[0].legend(loc="lower right")
    # Same scale for (b) and (c), so that drift reads the same in both panels; headroom on
    # top keeps the legend off the traces.
    low = min(axes[1].get_ylim()[0], axes[2].get_ylim()[0])
    high = max(axes[1].get_ylim()[1], axes[2].get_ylim()[1])
    for ax in axes[1:]:
        ax.set_ylim(low, high + 0.25 * (high - low))
        ax.legend(fontsize=8, loc="upper center", ncol=3, frameon=False)
    out.mkdir(parents=True, exist_ok=True)
    save(fig, out / "figure1.png")

    baseline_final = result["arms"]["baseline"]["final_test_acc"]["mean"]
    bn = result["plotted"]["bn"]
    result["bn_steps_to_baseline_final_acc"] = first_step_reaching(
        bn["steps"], np.array(bn["test_acc_mean"]), baseline_final
    )
    result["provenance"] = provenance_of(runs)
    (out / "figure1.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "README.md").write_text(results_table(result))
    return result


def results_table(result: dict) -> str:
    """results/mnist/README.md: the numbers of figure1.json and the command that made them."""
    on_device = f" on {result['device']}" if "device" in result else ""
    rows = []
    for arm, title in ARMS.items():
        s = result["arms"][arm]
        acc, best = s["final_test_acc"], s["best_test_acc"]
        rows.append(
            f"| {title} | {acc['n']} | {acc['mean']:.2f} ± {acc['std']:.2f} | "
            f"{best['mean']:.2f} ± {best['std']:.2f} | "
            + " | ".join(f"{s[key]['mean']:.2f} ± {s[key]['std']:.2f}" for key in DRIFT_KEYS)
            + " |"
        )
    return "\n".join(
        [
            f"# {result.get('dataset', 'MNIST')}, Figure 1",
            "",
            "![Figure 1](figure1.png)",
            "",
            f"Made by `{result['command']}`{on_device} (runs in `runs/`, plotted numbers in "
            "`figure1.json`;",
            "`make figures` rebuilds both from `runs/`). Accuracy in %, mean ± std over seeds;",
            f"drift = |last - first evaluation| of the {result['layer']} unit's input median (p50)",
            "and 15-85 spread (p85 - p15); range = max - min over all evaluations; mean ± std",
            "over seeds. The first evaluation is at step 0 (initialisation).",
            "",
            "| network | seeds | final test acc | best test acc | p50 drift | spread drift "
            "| p50 range | spread range |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"BN reaches the baseline's mean final accuracy at step "
            f"{result['bn_steps_to_baseline_final_acc']} (of 50,000).",
            "",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description="Build Figure 1 from MNIST run logs.")
    parser.add_argument("--runs", type=Path, default=Path("results/mnist/runs"))
    parser.add_argument("--out", type=Path, default=Path("results/mnist"))
    args = parser.parse_args()
    runs = find_runs(args.runs)
    if not runs:
        commands = " or ".join(f"`{command}`" for _, command, _ in DATASETS.values())
        print(f"error: no runs under {args.runs}; run {commands} first", file=sys.stderr)
        return 2
    result = build(runs, args.out)
    for arm, stats in result["arms"].items():
        acc = stats["final_test_acc"]
        drifts = ", ".join(f"{key} {stats[key]['mean']:.2f}" for key in DRIFT_KEYS)
        print(f"{arm:9s} final test acc {acc['mean']:.2f} ± {acc['std']:.2f} %, {drifts}")
    print(
        f"BN reaches the baseline's final accuracy at step "
        f"{result['bn_steps_to_baseline_final_acc']}"
    )
    print(f"wrote {args.out / 'figure1.png'} and {args.out / 'figure1.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
