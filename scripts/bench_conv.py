"""How much cheaper a model-step of the conv net is stacked: BN-Inception /8 (fig2_small).

    python scripts/bench_conv.py                  # about 3.5 minutes on 2 cores
    python scripts/bench_conv.py --members 2,3,4,6,8 --nchw --vmap --compile

First the machine's limit, the best 2-thread sgemm rate any library here reaches
(scripts/sgemm_limit.py); each row's GFLOP/s is also given as a multiple of it. All rows in
one run, so the ratios are fair: the training step (forward, backward, SGD as
`experiment=fig2_small/bn_x5` configures it: batch 32, lr, momentum, weight decay) of

- today's eager single network (`seed=k`), 1 thread (the trainer's default num_threads),
  2 threads (one job on the whole machine), and two 1-thread jobs side by side (what
  `make reproduce-fig2-small` runs: JOBS=2);
- the stacked network (`seeds=[...]`, models/stacked_inception.py) for each member count,
  the same three ways; optionally compiled (--compile: torch.compile, CPU Inductor, as
  `trainer.compile=true`; the largest member count, 1 thread, minutes of compilation; run
  apart from `make bench` as `--compile --members 8 --name conv_compile`), with NCHW
  activations instead of channels_last (--nchw), and torch.func's `stack_module_state` +
  `vmap` over plain networks (--vmap).

Timing: rounds of `--steps` steps after warm-up, the configurations taking turns, the best
round of each kept (another process on the machine only ever slows a round down). A side-by-
side row starts two worker processes of 1 thread each, lets them warm up, starts their timed
steps together and divides the wall time by both jobs' model-steps: the machine's cost of one
model-step, memory bandwidth shared as in a sweep. GFLOP/s counts the convolutions' and matrix
products' multiply-adds (torch.utils.flop_counter) of one step, forward and backward. Synthetic
images (uniform in [0, 1)): the speed does not depend on the pixels (denormals are flushed, as
the trainer does). The machine should be otherwise idle: the load average is printed.
Compilation takes about 4-5 minutes per member count here the first time, seconds once
Inductor's on-disk cache (/tmp/torchinductor_<user>) holds the graphs; on the channels_last
stack it gained nothing measurable (it did on NCHW, whose layout Inductor changes itself), so
it is not a default row.

Each row's "vs eager" is the eager single network's 2-thread step (one job on the whole
machine, the issue's baseline) over the row's machine cost per model-step; "like for like"
compares with the eager network run the same way (same threads, or side by side).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from sgemm_limit import describe, measure_limit
from torch.utils.flop_counter import FlopCounterMode

from bnrepro.config.resolvers import register_resolvers
from bnrepro.config.schema import RunConfig, parse_config
from bnrepro.infra.provenance import code_version, cpu_model
from bnrepro.models.networks import build_network
from bnrepro.models.norms import Normalization
from bnrepro.training.loop import member_losses, train_step
from bnrepro.training.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "fig2_small/bn_x5"
TARGET = 5.0  # issue 20: a stacked model-step at most 1/5 of the eager single step


def run_config() -> RunConfig:
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={EXPERIMENT}", "logger=none"])
    return parse_config(cfg)


Step = Callable[[], torch.Tensor]


def make_step(variant: str, members: int, cfg: RunConfig) -> tuple[Step, int]:
    """One training step of `variant` (eager, stacked, nchw, vmap, compiled) with `members`
    networks (1 for eager), and its multiply-add FLOPs x 2."""
    norm = Normalization.from_model(cfg.model)
    batch = cfg.data.batch_size
    torch.manual_seed(0)
    if variant == "eager":
        model = build_network(cfg.model, norm)
        x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    elif variant == "vmap":
        return vmap_step(members, cfg)
    else:
        model = build_network(cfg.model, norm, members=members)
        if variant == "nchw":
            model.memory_format = torch.contiguous_format
        x, y = torch.rand(members, batch, 1, 28, 28), torch.randint(0, 10, (members, batch))
    optimizer = build_optimizer(model, cfg.optim)
    trained = torch.compile(model) if variant == "compiled" else model
    flops = count_flops(lambda: member_losses(model(x), y).sum().backward())
    model.zero_grad(set_to_none=True)
    return (lambda: train_step(trained, optimizer, x, y)), flops


def vmap_step(members: int, cfg: RunConfig) -> tuple[Step, int]:
    """torch.func's model ensembling: the plain networks' parameters and buffers stacked
    (stack_module_state), one functional_call vmapped over them. BN's running statistics are
    stacked buffers, updated in place under vmap."""
    from torch.func import functional_call, stack_module_state, vmap

    norm = Normalization.from_model(cfg.model)
    networks = [build_network(cfg.model, norm) for _ in range(members)]
    params, buffers = stack_module_state(networks)
    base = copy.deepcopy(networks[0]).to("meta")

    def one(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (x,))

    batch = cfg.data.batch_size
    x, y = torch.rand(members, batch, 1, 28, 28), torch.randint(0, 10, (members, batch))
    optimizer = torch.optim.SGD(
        list(params.values()),
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
    )

    def step() -> torch.Tensor:
        losses = member_losses(vmap(one)(params, buffers, x), y)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()
        return losses.detach()

    flops = count_flops(lambda: member_losses(vmap(one)(params, buffers, x), y).sum().backward())
    return step, flops


def count_flops(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed_round(step: Step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def in_process(rows: list[dict], cfg: RunConfig, steps: int, rounds: int) -> None:
    """Time the in-process rows (`threads` set per row), configurations taking turns."""
    built = []
    for row in rows:
        torch.set_num_threads(row["threads"])
        start = time.perf_counter()
        step, flops = make_step(row["variant"], row["members"], cfg)
        step()  # warm-up (and compilation)
        row["first_step_s"] = time.perf_counter() - start
        for _ in range(2):
            step()
        built.append((row, step))
        row["gflop_per_step"] = flops / 1e9
    for _ in range(rounds):
        for row, step in built:
            torch.set_num_threads(row["threads"])
            seconds = timed_round(step, steps)
            row["step_ms"] = min(row.get("step_ms", float("inf")), seconds * 1e3)
    for row in rows:
        row["machine_ms_per_model_step"] = row["step_ms"] / row["members"]


def side_by_side(row: dict, steps: int, rounds: int) -> None:
    """Two 1-thread worker processes of `row`'s configuration, timed steps started together:
    the machine's ms per model-step is the wall time over both jobs' model-steps."""
    command = [sys.executable, __file__, "--worker", row["variant"], str(row["members"])]
    command += ["--steps", str(steps), "--rounds", str(rounds)]
    workers = [
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    best = float("inf")
    for _ in range(rounds):
        for w in workers:
            assert w.stdout.readline().strip() == "ready"
        start = time.perf_counter()
        for w in workers:
            w.stdin.write("go\n")
            w.stdin.flush()
        for w in workers:
            assert w.stdout.readline().strip() == "done"
        best = min(best, time.perf_counter() - start)
    flops = json.loads(workers[0].stdout.readline())["flops"]
    for w in workers:
        w.wait()
    row["step_ms"] = best / steps * 1e3  # each job's step, both running
    row["machine_ms_per_model_step"] = row["step_ms"] / (2 * row["members"])
    row["gflop_per_step"] = flops / 1e9


def worker(variant: str, members: int, steps: int, rounds: int) -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    step, flops = make_step(variant, members, run_config())
    for _ in range(3):
        step()
    for _ in range(rounds):
        print("ready", flush=True)
        sys.stdin.readline()
        timed_round(step, steps)
        print("done", flush=True)
    print(json.dumps({"flops": flops}), flush=True)


def machine() -> str:
    commit, dirty = code_version()
    code = f"commit {commit[:10]}{' (with changes)' if dirty else ''}" if commit else "no commit"
    command = "python " + " ".join(["scripts/bench_conv.py", *sys.argv[1:]])
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {code}; "
        f"command: `{command}` (make bench)"
    )


def label(row: dict) -> str:
    name = {
        "eager": "eager single network",
        "stacked": f"stacked, {row['members']} seeds",
        "nchw": f"stacked NCHW, {row['members']} seeds",
        "vmap": f"torch.func vmap, {row['members']} seeds",
        "compiled": f"stacked + torch.compile, {row['members']} seeds",
    }[row["variant"]]
    how = "2 jobs x 1 thread" if row["jobs"] == 2 else f"{row['threads']} thread(s)"
    return f"{name}, {how}"


def markdown(result: dict) -> str:
    rows = result["rows"]
    eager = {(r["threads"], r["jobs"]): r for r in rows if r["variant"] == "eager"}
    baseline = eager[(2, 1)]["machine_ms_per_model_step"]
    lines = [
        f"# BN-Inception /8 training step, stacked seeds ({EXPERIMENT}, batch 32)",
        "",
        f"Machine: {result['machine']}; load average at start {result['load']}. "
        f"Best of {result['rounds']} rounds of {result['steps']} steps per row.",
        "",
        f'Limit: {describe(result["sgemm_limit"])}; a row\'s "x limit" is that rate over the '
        "row's machine GFLOP/s (how many times its step takes the time the limit would).",
        "",
        "| configuration | ms/step | machine ms per model-step | GFLOP/s | x limit "
        "| vs eager (2 threads) | like for like |",
        "|---|---|---|---|---|---|---|",
    ]
    limit = result["sgemm_limit"]["gflops"]
    for r in rows:
        same = eager[(r["threads"], r["jobs"])]["machine_ms_per_model_step"]
        gflops = r["gflop_per_step"] * r["jobs"] / r["step_ms"] * 1e3  # the machine's rate
        lines.append(
            f"| {label(r)} | {r['step_ms']:.1f} | {r['machine_ms_per_model_step']:.2f} | "
            f"{gflops:.1f} | {limit / gflops:.1f}x | "
            f"{baseline / r['machine_ms_per_model_step']:.2f}x | "
            f"{same / r['machine_ms_per_model_step']:.2f}x |"
        )
    best = min(r["machine_ms_per_model_step"] for r in rows if r["variant"] != "eager")
    verdict = "met" if baseline / best >= TARGET else "**not met**"
    sweep = eager[(1, 2)]["machine_ms_per_model_step"] if (1, 2) in eager else None
    lines += [
        "",
        f"Target: a stacked model-step at most 1/{TARGET:g} of the eager single step "
        f"({baseline:.1f} ms at 2 threads): best {best:.2f} ms, "
        f"{baseline / best:.2f}x: {verdict}.",
    ]
    if sweep is not None:
        lines.append(
            f"Against today's sweep (eager, 2 jobs x 1 thread: {sweep:.2f} ms per model-step "
            f"of the machine): {sweep / best:.2f}x."
        )
    compiled = [r for r in rows if r["variant"] == "compiled" and "first_step_s" in r]
    for r in compiled:
        lines.append(
            f"torch.compile, {r['members']} seeds: first step {r['first_step_s']:.0f} s "
            f"(compilation; Inductor's on-disk cache makes a later process's seconds)."
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", default="3,8", help="seed counts to stack")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also torch.compile (minutes)")
    parser.add_argument("--nchw", action="store_true", help="also NCHW activations")
    parser.add_argument("--vmap", action="store_true", help="also torch.func's vmap route")
    parser.add_argument("--out", type=Path, help="also write NAME.json and NAME.md here")
    parser.add_argument("--name", default="conv", help="file name stem of --out's files")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.steps, args.rounds)
        return 0
    torch.set_flush_denormal(True)  # as the trainer (trainer.flush_denormal)
    cfg = run_config()
    counts = [int(m) for m in args.members.split(",")]
    largest = max(counts)
    rows = [{"variant": "eager", "members": 1, "threads": t, "jobs": 1} for t in (1, 2)]
    for threads in (1, 2):
        rows += [
            {"variant": "stacked", "members": m, "threads": threads, "jobs": 1} for m in counts
        ]
    # Compilation takes minutes per member count: the largest only, in this process.
    if args.compile:
        rows.append({"variant": "compiled", "members": largest, "threads": 1, "jobs": 1})
    if args.nchw:
        rows.append({"variant": "nchw", "members": largest, "threads": 1, "jobs": 1})
    if args.vmap:
        rows.append({"variant": "vmap", "members": largest, "threads": 1, "jobs": 1})
    print("measuring the sgemm limit (scripts/sgemm_limit.py)", flush=True)
    limit = measure_limit()
    print(describe(limit), flush=True)
    load = os.getloadavg()[0]
    print(f"load average {load:.2f}" + (" (busy: numbers will be slow)" if load > 1.5 else ""))
    in_process(rows, cfg, args.steps, args.rounds)
    pairs = [{"variant": "eager", "members": 1, "threads": 1, "jobs": 2}]
    pairs += [{"variant": "stacked", "members": m, "threads": 1, "jobs": 2} for m in counts]
    for row in pairs:
        side_by_side(row, args.steps, args.rounds)
    rows += pairs
    result = {
        "machine": machine(),
        "load": round(load, 2),
        "steps": args.steps,
        "rounds": args.rounds,
        "experiment": EXPERIMENT,
        "sgemm_limit": limit,
        "rows": rows,
    }
    text = markdown(result)
    print(text)
    if args.out:  # make bench: results/bench/, as bench_mnist.py's mnist.json and .md
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / f"{args.name}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
