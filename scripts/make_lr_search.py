"""A learning-rate search read from its runs: the best rate, and where the network stops training.

    python scripts/make_lr_search.py --runs results/fig2_small/lr_search_runs \
        --out results/fig2_small                  # lr_search.png, .md, .json
    python scripts/make_lr_search.py --winner results/fig2_small/lr_search.json   # prints it
    python scripts/make_lr_search.py --scales 0.1 results/ics/lr_search.json      # ICS's range

Two searches use it. Figures 2 and 3 at small scale:

The paper's 0.0015 was Inception's own tuned rate (Section 4.2.1). Ours is found the same way
(experiment=fig2_small/lr_search): Inception without BN at each rate of a grid, one seed, the
same short budget. The winner is the rate with the best maximum validation accuracy, read
from the runs; every arm's x1 is this rate, x5 and x30 multiply it (the Makefile passes it to
the sweep as optim.base_lr). "Stops training": the lowest rate above the winner at which the
network diverged or ended within CHANCE_MARGIN of chance (bnrepro.analysis.stats).

The ICS landscape (experiment=ics/lr_search, `make reproduce-ics`): Santurkar et al. move
along the gradient up to a step "just below" the rate at which the network without BN
diverges (Appendix A.2.2). `--scales LR` prints that range as multiples of the run's rate LR:
from 0.5 up to the highest rate of the grid that still trains below the failing one, doubling.
The accuracy read is validation accuracy where the runs hold images out, test accuracy if not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt

from bnrepro.analysis.plots import save
from bnrepro.analysis.runs import RunRecord, find_runs, provenance_of
from bnrepro.analysis.stats import at_chance


def metric_of(runs: list[RunRecord]) -> str:
    """val/acc where the runs hold images out, test/acc otherwise."""
    held_out = any(m.get("val/acc") is not None for r in runs for m in r.metrics)
    return "val/acc" if held_out else "test/acc"


def rate_of(run: RunRecord) -> float:
    return float(run.summary["settings"]["lr"])


def table(runs: list[RunRecord], metric: str) -> list[dict]:
    """One row per rate: max and final accuracy (`metric`), status, steps."""
    rows = []
    for run in sorted(runs, key=rate_of):
        accs = [m[metric] for m in run.metrics if m.get(metric) is not None]
        rows.append(
            {
                "lr": rate_of(run),
                "seed": run.seed,
                "status": run.summary["status"],
                "steps": run.summary["steps"],
                "diverged_at_step": run.summary.get("diverged_at_step"),
                "max_acc": max(accs) if accs else None,
                "final_acc": accs[-1] if accs else None,
            }
        )
    return rows


def trains(row: dict) -> bool:
    """Completed, and still above chance at the end (a rate whose net rises for a moment and
    then dies, its ReLUs silent, does not train)."""
    return row["status"] == "completed" and not at_chance(row["final_acc"])


def step_scales(result: dict, lr: float) -> list[float]:
    """The landscape's step sizes as multiples of `lr`: 0.5, 1, 2, ... doubling, up to the
    highest rate of the search that trains below the lowest one that fails (which must exist)."""
    stops = result["stops_training_at"]
    if stops is None:
        raise ValueError("no rate of the search stopped training: widen the grid upwards")
    top = max(r["lr"] for r in result["rows"] if r["lr"] < stops and trains(r)) / lr
    scales = [0.5]
    while scales[-1] * 2 < top:
        scales.append(scales[-1] * 2)
    return [*scales, top] if top > scales[-1] else scales


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, help="the search's collected runs")
    parser.add_argument("--out", type=Path, help="where lr_search.{png,md,json} go")
    parser.add_argument("--winner", type=Path, help="print the winning rate of this JSON")
    parser.add_argument(
        "--scales", nargs=2, metavar=("LR", "JSON"), help="print the landscape's step scales"
    )
    parser.add_argument("--network", default="Inception (no BN)", help="what was searched")
    parser.add_argument("--command", default="make reproduce-fig2-small", help="what ran it")
    parser.add_argument("--experiment", default="fig2_small/lr_search", help="its experiment")
    parser.add_argument("--paper", default="The paper's Inception rate was 0.0015.")
    args = parser.parse_args()
    if args.scales:
        lr, path = float(args.scales[0]), Path(args.scales[1])
        if not path.is_file():
            print(f"error: {path} is missing: run the search first", file=sys.stderr)
            return 2
        try:
            scales = step_scales(json.loads(path.read_text()), lr)
        except ValueError as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            return 2
        print("[" + ",".join(f"{v:g}" for v in scales) + "]")
        return 0
    if args.winner:
        if not args.winner.is_file():
            print(f"error: {args.winner} is missing: run the search first", file=sys.stderr)
            return 2
        print(json.loads(args.winner.read_text())["winner"])
        return 0
    if not (args.runs and args.out):
        parser.error("--runs and --out (or --winner)")
    runs = [r for r in find_runs(args.runs) if r.arm.startswith("lr_search")]
    metric = metric_of(runs)
    rows = table(runs, metric)
    trained = [r for r in rows if trains(r)]
    if not trained:
        print(f"error: no rate of {args.runs} trained; widen the grid", file=sys.stderr)
        return 2
    best = max(trained, key=lambda r: r["max_acc"])
    failing = [r["lr"] for r in rows if not trains(r)]
    stops = min((lr for lr in failing if lr > best["lr"]), default=None)
    rates = [r["lr"] for r in rows]
    edge = best["lr"] in (rates[0], rates[-1])
    result = {
        "metric": metric,
        "rule": f"the rate with the best max {metric} among those that trained",
        "winner": best["lr"],
        "winner_at_grid_edge": edge,
        "stops_training_at": stops,
        "rows": rows,
        "provenance": provenance_of(runs),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lr_search.json").write_text(json.dumps(result, indent=1) + "\n")

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for run in sorted(runs, key=rate_of):
        points = [(m["step"], m[metric]) for m in run.metrics if m.get(metric) is not None]
        left.plot(*zip(*points, strict=True), label=f"lr {rate_of(run):g}")
    left.set_xlabel("training step")
    left.set_ylabel(f"{metric} (%)")
    left.set_title(f"{args.network} at each rate")
    left.legend(fontsize=7)
    right.plot(rates, [r["max_acc"] for r in rows], "o-")
    right.axvline(best["lr"], color="grey", linestyle=":", label=f"winner {best['lr']:g}")
    right.set_xscale("log")
    right.set_xlabel("base learning rate")
    right.set_ylabel(f"max {metric} (%)")
    right.set_title(f"{rows[0]['steps']:,} steps, seed {rows[0]['seed']}")
    right.legend(fontsize=8)
    save(fig, args.out / "lr_search.png")

    lines = [
        f"# Learning-rate search: {args.network}",
        "",
        "![lr search](lr_search.png)",
        "",
        f"Built by `python scripts/make_lr_search.py --runs {args.runs} --out {args.out}` from "
        f"`{args.command}` (experiment={args.experiment}). Rule: "
        f"{result['rule']}. Winner: **{best['lr']:g}**"
        + (" (at the edge of the grid: widen it)" if edge else "")
        + ". The network stops training at "
        + (f"{stops:g}" if stops is not None else "no rate of the grid")
        + f". {args.paper} Runs made at "
        + ", ".join(result["provenance"]["commits"])
        + " on "
        + ", ".join(result["provenance"]["devices"])
        + ".",
        "",
        f"| lr | status | steps | max {metric} (%) | final {metric} (%) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        status = r["status"] + (f" at {r['diverged_at_step']:,}" if r["diverged_at_step"] else "")
        accs = [f"{a:.2f}" if a is not None else "-" for a in (r["max_acc"], r["final_acc"])]
        lines.append(f"| {r['lr']:g} | {status} | {r['steps']:,} | {accs[0]} | {accs[1]} |")
    (args.out / "lr_search.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out / 'lr_search.png'}, lr_search.md and lr_search.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
