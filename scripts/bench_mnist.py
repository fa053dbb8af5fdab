"""How fast the Figure-1 MLP trains here, all measured in one run so the ratios are fair.

    python scripts/bench_mnist.py            # `make bench`; about 5 minutes on 2 cores

For the network without and with BN, model-steps per second and ms per model-step of
(1) a reference loop over a torchvision DataLoader, (2) a plain in-memory eager loop (the
whole dataset in a tensor, one model, torch's default threads; (1) and (2) are the fastest
of three tries), (3) the project's trainer: the real entrypoint, seeds stacked in one process
and two processes in parallel (what `make reproduce-mnist` runs), read from the steady-state
speed each run logs. Then the wall
time and summed peak memory of the default `make reproduce-mnist` sweep, run into a scratch
directory. Writes results/bench/mnist.json and mnist.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import MNIST

from bnrepro.data.mnist import load_mnist
from bnrepro.models.mlp import MLP
from bnrepro.runs import find_runs, read_metrics

REPO = Path(__file__).resolve().parents[1]
ARMS = {"baseline": "none", "bn": "bn"}


def plain_model(norm: str) -> tuple[MLP, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = MLP(norm=norm, bn={"stats": "ema"})
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def step(model: MLP, optimizer: torch.optim.Optimizer, x, y) -> float:
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def dataloader_loop(root: str, norm: str, steps: int) -> float:
    """Seconds per step of the textbook loop: torchvision dataset, transforms, DataLoader."""
    flatten = transforms.Compose([transforms.ToTensor(), transforms.Lambda(torch.flatten)])
    loader = DataLoader(
        MNIST(root, train=True, transform=flatten), batch_size=60, shuffle=True, drop_last=True
    )
    model, optimizer = plain_model(norm)
    batches = iter(loader)
    for _ in range(20):
        step(model, optimizer, *next(batches))
    start = time.perf_counter()
    for _ in range(steps):
        step(model, optimizer, *next(batches))
    return (time.perf_counter() - start) / steps


def in_memory_loop(root: str, norm: str, steps: int) -> float:
    """Seconds per step of a plain eager loop over tensors held in memory."""
    data = load_mnist(root, download=False)
    model, optimizer = plain_model(norm)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        idx = torch.randint(0, 60000, (60,), generator=generator)
        step(model, optimizer, data.train_x[idx], data.train_y[idx])
    start = time.perf_counter()
    for i in range(steps):
        if i % 1000 == 0:
            order = torch.randperm(60000, generator=generator)
        idx = order[(i % 1000) * 60 : (i % 1000 + 1) * 60]
        step(model, optimizer, data.train_x[idx], data.train_y[idx])
    return (time.perf_counter() - start) / steps


def trainer(root: str, arm: str, steps: int, scratch: Path) -> tuple[float, float]:
    """(seconds per model-step over the whole machine, summed peak RSS in MB) of the trainer:
    two processes of 5 stacked seeds each, in parallel, as `make reproduce-mnist` runs."""
    sweep = scratch / f"trainer-{arm}"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bnrepro.train",
            "--multirun",
            f"experiment=mnist/{arm}",
            "seeds=[1,2,3,4,5],[6,7,8,9,10]",
            f"trainer.steps={steps}",
            f"trainer.eval_every={steps // 2}",
            "trainer.eval_at_start=false",
            "logger=none",
            "trainer.progress=false",
            f"paths.data_dir={root}",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    runs = find_runs(sweep)
    # Speed of the second half (steady state); each member logs its job's steps/s.
    model_steps_per_s = sum(
        read_metrics(r.path / "perf.jsonl")[-1]["perf/steps_per_s"] for r in runs
    )
    peak_mb = sum({r.summary["peak_rss_mb"] for r in runs if r.seed in (1, 6)})
    return 1.0 / model_steps_per_s, peak_mb


def reproduce_wall(root: str, scratch: Path) -> tuple[float, float]:
    """Wall seconds and summed peak RSS (MB) of the sweep `make reproduce-mnist` runs (the
    figure that follows it takes a few seconds more)."""
    sweep = scratch / "reproduce"
    env = os.environ | {"DATA_DIR": root}
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bnrepro.train",
            "--multirun",
            "experiment=mnist/baseline,mnist/bn",
            "seeds=[1,2,3,4,5]",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "trainer.progress=false",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    wall = time.perf_counter() - start
    runs = find_runs(sweep)
    assert len(runs) == 10 and all(r.summary["status"] == "completed" for r in runs)
    return wall, sum({r.summary["peak_rss_mb"] for r in runs if r.seed == 1})


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    cpu = names[0] if names else platform.processor() or platform.machine()
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR", str(REPO / "data")))
    parser.add_argument("--steps", type=int, default=4000, help="trainer steps per job")
    parser.add_argument(
        "--skip-reproduce",
        action="store_true",
        help="do not time the full make reproduce-mnist sweep",
    )
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for arm, norm in ARMS.items():
            # The fastest of three tries: these machines are noisy.
            loader_s = min(dataloader_loop(args.data_dir, norm, 500) for _ in range(3))
            memory_s = min(in_memory_loop(args.data_dir, norm, 3000) for _ in range(3))
            trainer_s, peak_mb = trainer(args.data_dir, arm, args.steps, scratch)
            rows[arm] = {
                "dataloader_ms": loader_s * 1e3,
                "in_memory_ms": memory_s * 1e3,
                "trainer_ms": trainer_s * 1e3,
                "trainer_peak_rss_mb": peak_mb,
                "trainer_vs_in_memory": memory_s / trainer_s,
                "trainer_vs_dataloader": loader_s / trainer_s,
            }
            print(f"{arm}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[arm].items()), flush=True)
        wall, wall_peak = (
            (None, None) if args.skip_reproduce else reproduce_wall(args.data_dir, scratch)
        )
    result = {
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
        "reproduce_mnist_wall_s": wall,
        "reproduce_mnist_peak_rss_mb": wall_peak,
        "command": "make bench",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mnist.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "mnist.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    lines = [
        "# MNIST training speed (Figure-1 MLP, batch 60)",
        "",
        f"Machine: {r['machine']}. Command: `{r['command']}`; all numbers from one run.",
        "",
        "| network | loop | ms per model-step | model-steps/s | trainer is |",
        "|---|---|---|---|---|",
    ]
    names = {
        "dataloader_ms": "torchvision DataLoader, 1 model",
        "in_memory_ms": "in-memory eager, 1 model",
        "trainer_ms": "bnrepro trainer (5 stacked seeds x 2 processes)",
    }
    for arm, row in r["rows"].items():
        for key, name in names.items():
            ratio = {
                "dataloader_ms": row["trainer_vs_dataloader"],
                "in_memory_ms": row["trainer_vs_in_memory"],
            }.get(key)
            lines.append(
                f"| {arm} | {name} | {row[key]:.3f} | {1e3 / row[key]:,.0f} | "
                + (f"{ratio:.2f}x faster |" if ratio else "|")
            )
    if r["reproduce_mnist_wall_s"] is not None:
        lines += [
            "",
            f"Default `make reproduce-mnist` (2 networks x 5 seeds x 50,000 steps, "
            f"evaluations and probes included): {r['reproduce_mnist_wall_s']:.1f} s wall, "
            f"peak RSS {r['reproduce_mnist_peak_rss_mb']:.0f} MB summed over its 2 "
            f"processes.",
        ]
    peaks = ", ".join(f"{a} {row['trainer_peak_rss_mb']:.0f} MB" for a, row in r["rows"].items())
    lines += [f"Trainer peak RSS summed over its 2 processes: {peaks}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
