"""Santurkar et al. (2018)'s deep linear network (DLN): the loss landscape along the gradient
with and without BN, beside our MLP one (results/ics/).

    python scripts/deep_linear.py --out results/ics/deep_linear --seeds 1 2 3 --steps 10000

First measures the lr at which the DLN without BN diverges (full-batch GD from its start, a
2x grid from the training lr up), then trains both arms, all seeds side by side, for --steps
steps at lr 1e-6, probing the landscape every --every steps at step sizes lr x scales. Two
ranges are reduced from the same probes: the paper's numbers, [1/100, 30] x lr, and the
paper's rule, [1/100, top] x lr with top the largest grid lr at which no seed diverged. Writes
deep_linear.json (every constant, the divergence lr, each seed's traces and phase means),
deep_linear.md (the table, the command, the commit, the machine) and deep_linear.png. What
is measured and every choice where the paper is silent: src/bnrepro/measures/deep_linear.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from bnrepro.analysis.plots import save
from bnrepro.infra.provenance import code_version, cpu_model
from bnrepro.measures.deep_linear import DLN, DLNConfig, Probe, divergence_lr, make_data, train

ARMS = {"no_bn": ("no BN", False, "tab:blue"), "bn": ("BN", True, "tab:red")}
# Each measure: (title of its panel and table column, y-axis label).
MEASURES = {
    "loss_range": ("loss range along the gradient", "max - min of L(theta - eta g)"),
    "grad_change_rel": (
        "relative gradient change",
        "max ||grad L(theta - eta g) - g|| / ||g||",
    ),
    "beta": ("effective beta-smoothness", "max ||grad L(theta - eta g) - g|| / ||eta g||"),
}
SUMMARISED = ("loss_range", "grad_change", "grad_change_rel", "beta", "grad_norm")  # in the JSON


def seed_spread(values: np.ndarray) -> dict[str, object]:
    """Each seed's value with their mean and the seed range [min, max]."""
    return {
        "values": [float(v) for v in values],
        "mean": float(values.mean()),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def curves(probes: list[Probe], top: float) -> dict[str, np.ndarray]:
    """Each measure over the probed steps, (steps, seeds), for the range up to `top`."""
    rows = [probe.measures(top) for probe in probes]
    return {name: torch.stack([r[name] for r in rows]).numpy() for name in rows[0]}


def cell(summary: dict) -> str:
    return f"{summary['mean']:.3g} [{summary['min']:.3g}, {summary['max']:.3g}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/ics/deep_linear"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=DLNConfig.steps)
    parser.add_argument("--every", type=int, default=100, help="probe every this many steps")
    parser.add_argument(
        "--divergence-steps", type=int, default=1000, help="GD steps per lr of the search"
    )
    args = parser.parse_args()
    # 10x10 matrices: more threads only add overhead (and the machine is shared).
    torch.set_num_threads(1)
    start = time.perf_counter()
    cfg = replace(DLNConfig(), steps=args.steps)
    data = make_data(cfg, args.seeds)

    # The lr at which the DLN without BN diverges, from its start (the same start as training).
    plain = DLN(cfg, bn=False)
    div = divergence_lr(plain.loss_fn(data), plain.init(args.seeds), cfg.lr, args.divergence_steps)
    for seed, lr in zip(args.seeds, div.lr.tolist(), strict=True):
        print(f"no BN, seed {seed}: diverges at lr {lr:.3g} = {lr / cfg.lr:g} x lr")
    rule_top = div.largest_stable
    tops = {"paper": max(cfg.scales) * cfg.lr, "rule": rule_top}
    print(
        f"divergence search {div.seconds:.1f} s; landscape tops: paper {tops['paper']:.3g}, "
        f"rule {rule_top:.3g} (= {rule_top / cfg.lr:g} x lr, the largest grid lr no seed "
        "diverged at)",
        flush=True,
    )
    scales = sorted({*cfg.scales, rule_top / cfg.lr})
    step_sizes = [cfg.lr * s for s in scales]

    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    for arm, (label, bn, _) in ARMS.items():
        net = DLN(cfg, bn)
        arm_start = time.perf_counter()

        def progress(
            step: int, losses: torch.Tensor, label: str = label, arm_start: float = arm_start
        ) -> None:
            elapsed = time.perf_counter() - arm_start
            shown = ", ".join(f"{v:.4g}" for v in losses.tolist())
            print(f"{label}: step {step}/{cfg.steps}, loss per seed {shown} ({elapsed:.0f} s)")

        _, probed, probes = train(
            net.loss_fn(data), net.init(args.seeds), cfg.lr, cfg.steps, args.every, step_sizes,
            progress=progress, progress_every=max(cfg.steps // 5, 1),
        )  # fmt: skip
        seconds[arm] = time.perf_counter() - arm_start
        print(f"{label}: {seconds[arm]:.1f} s", flush=True)
        results[arm] = {"steps": probed, "ranges": {r: curves(probes, t) for r, t in tops.items()}}

    # Phase means per seed: the first tenth of training and the whole run.
    early_end = cfg.steps / 10
    summary: dict[str, dict] = {}
    for arm, res in results.items():
        steps = np.array(res["steps"])
        phases = {"early": steps < early_end, "whole": np.ones_like(steps, dtype=bool)}
        summary[arm] = {
            "loss_start": seed_spread(res["ranges"]["paper"]["loss"][0]),
            "loss_final": seed_spread(res["ranges"]["paper"]["loss"][-1]),
        }
        # The mean over a phase's probes, as the MLP's table; the median beside it, because a
        # few probes past the plain network's divergence lr can outweigh all the others.
        stats = {"mean": np.mean, "median": np.median}
        for rng, curve in res["ranges"].items():
            summary[arm][rng] = {
                stat: {
                    phase: {m: seed_spread(reduce(curve[m][mask], axis=0)) for m in SUMMARISED}
                    for phase, mask in phases.items()
                }
                for stat, reduce in stats.items()
            }

    wall = time.perf_counter() - start
    command = " ".join(["python", *map(shlex.quote, sys.argv)])
    commit, dirty = code_version()
    machine = {
        "cpu": cpu_model(),
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "config": {**asdict(cfg), "scales_probed": scales, "every": args.every},
        "seeds": args.seeds,
        "divergence": {
            "lr_per_seed": div.lr.tolist(),
            "lr_min": float(div.lr.min()),
            "grid": div.grid,
            "steps": div.steps,
            "blowup": div.blowup,
            "rule": "smallest grid lr at which the loss turns non-finite or exceeds blowup x "
            "its start within `steps` full-batch GD steps from the initialisation",
        },
        "ranges": {
            name: {
                "top": top,
                "top_over_lr": top / cfg.lr,
                "scales": [s for s in scales if s * cfg.lr <= top * 1.0001],
            }
            for name, top in tops.items()
        },  # fmt: skip
        "early_phase": f"probed steps < {early_end:g} (the first tenth of training)",
        "summary": summary,
        "traces": {
            arm: {
                "steps": res["steps"],
                **{
                    rng: {m: curve[m].T.tolist() for m in curve}  # [seed][probe]
                    for rng, curve in res["ranges"].items()
                },
            }
            for arm, res in results.items()
        },
        "provenance": {
            "command": command,
            "commit": commit[:7] if commit else "unknown",
            "uncommitted": bool(dirty),  # code or configs differ from the commit
            **machine,
            "seconds": {"total": round(wall, 1), **{k: round(v, 1) for k, v in seconds.items()}},
        },
    }
    (args.out / "deep_linear.json").write_text(json.dumps(record, indent=1) + "\n")
    write_markdown(args.out / "deep_linear.md", record, cfg, div.lr.tolist())
    write_figure(args.out / "deep_linear.png", results, tops, cfg)
    print(f"wrote {args.out}/deep_linear.{{json,md,png}} in {wall:.0f} s")


def write_markdown(path: Path, record: dict, cfg: DLNConfig, div_lrs: list[float]) -> None:
    prov, summary, ranges = record["provenance"], record["summary"], record["ranges"]
    seeds = record["seeds"]
    lines = [
        "# Deep linear network: the landscape along the gradient (Santurkar et al. 2018)",
        "",
        "![DLN landscape](deep_linear.png)",
        "",
        "Set-up (their Appendix A.1, A.2.2, read second-hand): "
        f"{cfg.layers} layers of {cfg.width}x{cfg.width} weight matrices, no biases, "
        f"{cfg.examples:,} examples x ~ N(0, I), the objective "
        "||W_1 ... W_25 x - A x||^2 with A a random Gaussian 10x10 matrix, full-batch "
        f"gradient descent at lr {cfg.lr:g} for {cfg.steps:,} steps; BN after each linear map "
        "with the full batch's statistics. Our choices where the paper is silent: "
        f"`init={cfg.init}`, `reduction={cfg.reduction}`, `bn_output={cfg.bn_output}`, "
        f"`bn_eps={cfg.bn_eps:g}`, A's entries N(0, 1); BN's gamma and beta trained; data, A "
        "and initial weights drawn per seed, the same for both arms. Why, and what the other "
        "inits do (orthogonal W: the plain network is perfectly conditioned and trains faster "
        "than with BN, against the paper; torch's default: the plain network does not train): "
        f"the docstring of `src/bnrepro/measures/deep_linear.py`. Seeds "
        f"{', '.join(map(str, seeds))}.",
        "",
        "**Divergence lr of the network without BN** (full-batch GD from its start, "
        f"{record['divergence']['steps']} steps per lr, diverged = non-finite or "
        f"{record['divergence']['blowup']:g}x its starting loss; a 2x grid from lr up): "
        + ", ".join(
            f"seed {s}: {lr:.3g} ({lr / cfg.lr:g} x lr)"
            for s, lr in zip(seeds, div_lrs, strict=True)
        )
        + ".",
        "",
        "Landscape step sizes eta = lr x scales, two ranges from the same probes: "
        f"**paper**: [{min(ranges['paper']['scales']):g}, {ranges['paper']['top_over_lr']:g}] "
        "x lr, the paper's numbers; **rule**: "
        f"[{min(ranges['rule']['scales']):g}, {ranges['rule']['top_over_lr']:g}] x lr, the "
        "paper's rule (top just below the lr at which the network without BN diverges) "
        "applied to our network: the largest grid lr at which no seed diverged. Scales probed: "
        f"{', '.join(f'{s:g}' for s in record['config']['scales_probed'])}.",
        "",
        "Each cell: the mean over seeds of each seed's mean (first table) or median (second) "
        "over the phase's probes, [lowest seed, highest seed]. Early: "
        f"{record['early_phase']}; whole: every probe, steps 0 to {cfg.steps:,} every "
        f"{record['config']['every']}. Loss: summed over the {cfg.examples:,} examples.",
    ]
    header = [
        "| arm | range | loss range, early | loss range, whole | relative gradient change, "
        "early | relative gradient change, whole | beta, early | beta, whole |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for stat in ("mean", "median"):
        lines += ["", f"{stat.capitalize()} over the phase:", "", *header]
        for arm, (label, _, _) in ARMS.items():
            for rng in ranges:
                row = [label, rng]
                for m in MEASURES:
                    row += [cell(summary[arm][rng][stat][phase][m]) for phase in ("early", "whole")]
                lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "| arm | loss at step 0 | loss at the end |",
        "|---|---|---|",
    ]
    for arm, (label, _, _) in ARMS.items():
        s = summary[arm]
        lines.append(f"| {label} | {cell(s['loss_start'])} | {cell(s['loss_final'])} |")
    lines += [
        "",
        f"For scale: 2 / lr = {2 / cfg.lr:.3g} is the curvature along g at which GD at this lr "
        "stops converging; a beta pinned there means the run sits at that stability edge.",
        "",
        "Relative gradient change = the gradient change over ||g||: it does not change when "
        "the loss is scaled, while the loss range, the absolute change and beta do "
        "(`deep_linear.json` has the absolute change and ||g|| too).",
        "",
        f"Made by `{prov['command']}` at commit {prov['commit']}"
        + (" (with uncommitted changes to code or configs)" if prov["uncommitted"] else "")
        + f", on {prov['device']} ({prov['cpu']}, {prov['threads']} torch thread, load average "
        f"{prov['load_average_at_end'][0]} at the end"
        # More than this run's own thread busy: other work shared the cores, and the time.
        + (": the machine was shared" if prov["load_average_at_end"][0] > 1.5 else "")
        + f"), torch {prov['torch']}: {prov['seconds']['total']:.0f} s wall clock.",
        "",
    ]
    path.write_text("\n".join(lines))


def write_figure(path: Path, results: dict, tops: dict[str, float], cfg: DLNConfig) -> None:
    """One column per measure, one row per range of step sizes, against the step: the mean
    over seeds with the seed range shaded, both arms."""
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.4), sharex=True)
    for row, (rng, top) in zip(axes, tops.items(), strict=True):
        which = "the paper's numbers" if rng == "paper" else "the paper's rule"
        for ax, (m, (title, ylabel)) in zip(row, MEASURES.items(), strict=True):
            for arm, (label, _, color) in ARMS.items():
                steps, values = results[arm]["steps"], results[arm]["ranges"][rng][m]
                ax.plot(steps, values.mean(axis=1), color=color, label=f"{label} (mean)")
                ax.fill_between(
                    steps, values.min(axis=1), values.max(axis=1), color=color, alpha=0.2,
                    linewidth=0, label=f"{label} (seed range)",
                )  # fmt: skip
            ax.set_yscale("log")
            ax.set_title(f"{title}\neta up to {top / cfg.lr:g} x lr ({which})", fontsize=10)
            ax.set_xlabel("training step")
            ax.set_ylabel(ylabel, fontsize=9)
            ax.legend(fontsize=8)
    fig.suptitle(
        f"Deep linear network ({cfg.layers} layers, {cfg.width}x{cfg.width}), full-batch GD at "
        f"lr {cfg.lr:g}, {len(next(iter(results.values()))['ranges']['paper']['loss'][0])} "
        "seeds"
    )
    save(fig, path)


if __name__ == "__main__":
    main()
