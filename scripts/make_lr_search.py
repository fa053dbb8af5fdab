"""The base learning rate of Figures 2 and 3 at small scale, calibrated as the paper's was.

    python scripts/make_lr_search.py --runs results/fig2_small/lr_search_runs \
        --out results/fig2_small                  # lr_search.png, .md, .json
    python scripts/make_lr_search.py --winner results/fig2_small/lr_search.json   # prints it

The paper's 0.0015 was Inception's own tuned rate (Section 4.2.1). Ours is found the same way
(experiment=fig2_small/lr_search): Inception without BN at each rate of a grid, one seed, the
same short budget. The winner is the rate with the best maximum validation accuracy, read
from the runs; every arm's x1 is this rate, x5 and x30 multiply it (the Makefile passes it to
the sweep as optim.base_lr). "Stops training": the lowest rate above the winner at which the
network diverged or ended within CHANCE_MARGIN of chance (bnrepro.analysis.stats).
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

METRIC = "val/acc"


def rate_of(run: RunRecord) -> float:
    return float(run.summary["settings"]["lr"])


def table(runs: list[RunRecord]) -> list[dict]:
    """One row per rate: max and final validation accuracy, status, steps."""
    rows = []
    for run in sorted(runs, key=rate_of):
        accs = [m[METRIC] for m in run.metrics if m.get(METRIC) is not None]
        rows.append(
            {
                "lr": rate_of(run),
                "seed": run.seed,
                "status": run.summary["status"],
                "steps": run.summary["steps"],
                "diverged_at_step": run.summary.get("diverged_at_step"),
                "max_val_acc": max(accs) if accs else None,
                "final_val_acc": accs[-1] if accs else None,
            }
        )
    return rows


def trains(row: dict) -> bool:
    """Completed, and still above chance at the end (a rate whose net rises for a moment and
    then dies, its ReLUs silent, does not train)."""
    return row["status"] == "completed" and not at_chance(row["final_val_acc"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, help="the search's collected runs")
    parser.add_argument("--out", type=Path, help="where lr_search.{png,md,json} go")
    parser.add_argument("--winner", type=Path, help="print the winning rate of this JSON")
    args = parser.parse_args()
    if args.winner:
        if not args.winner.is_file():
            print(f"error: {args.winner} is missing: run the search first", file=sys.stderr)
            return 2
        print(json.loads(args.winner.read_text())["winner"])
        return 0
    if not (args.runs and args.out):
        parser.error("--runs and --out (or --winner)")
    runs = [r for r in find_runs(args.runs) if r.arm.startswith("lr_search")]
    rows = table(runs)
    trained = [r for r in rows if trains(r)]
    if not trained:
        print(f"error: no rate of {args.runs} trained; widen the grid", file=sys.stderr)
        return 2
    best = max(trained, key=lambda r: r["max_val_acc"])
    failing = [r["lr"] for r in rows if not trains(r)]
    stops = min((lr for lr in failing if lr > best["lr"]), default=None)
    rates = [r["lr"] for r in rows]
    edge = best["lr"] in (rates[0], rates[-1])
    result = {
        "metric": METRIC,
        "rule": "the rate with the best max validation accuracy among those that trained",
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
        points = [(m["step"], m[METRIC]) for m in run.metrics if m.get(METRIC) is not None]
        left.plot(*zip(*points, strict=True), label=f"lr {rate_of(run):g}")
    left.set_xlabel("training step")
    left.set_ylabel("validation accuracy (%)")
    left.set_title("Inception (no BN) at each rate")
    left.legend(fontsize=7)
    right.plot(rates, [r["max_val_acc"] for r in rows], "o-")
    right.axvline(best["lr"], color="grey", linestyle=":", label=f"winner {best['lr']:g}")
    right.set_xscale("log")
    right.set_xlabel("base learning rate")
    right.set_ylabel("max validation accuracy (%)")
    right.set_title(f"{rows[0]['steps']:,} steps, seed {rows[0]['seed']}")
    right.legend(fontsize=8)
    save(fig, args.out / "lr_search.png")

    lines = [
        "# The base learning rate at small scale (Inception without BN)",
        "",
        "![lr search](lr_search.png)",
        "",
        f"Built by `python scripts/make_lr_search.py --runs {args.runs} --out {args.out}` from "
        "`make reproduce-fig2-small` (experiment=fig2_small/lr_search). Rule: "
        f"{result['rule']}. Winner: **{best['lr']:g}**"
        + (" (at the edge of the grid: widen it)" if edge else "")
        + ". The network stops training at "
        + (f"{stops:g}" if stops is not None else "no rate of the grid")
        + ". The paper's Inception rate was 0.0015. Runs made at "
        + ", ".join(result["provenance"]["commits"])
        + " on "
        + ", ".join(result["provenance"]["devices"])
        + ".",
        "",
        "| lr | status | steps | max val acc (%) | final val acc (%) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        status = r["status"] + (f" at {r['diverged_at_step']:,}" if r["diverged_at_step"] else "")
        accs = [
            f"{a:.2f}" if a is not None else "-" for a in (r["max_val_acc"], r["final_val_acc"])
        ]
        lines.append(f"| {r['lr']:g} | {status} | {r['steps']:,} | {accs[0]} | {accs[1]} |")
    (args.out / "lr_search.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out / 'lr_search.png'}, lr_search.md and lr_search.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
