"""The GPU path on a real GPU (`make test-gpu`; skipped without CUDA): every experiment on
cuda, the CPU's numbers from the GPU, exact resume, the distributed path with NCCL.

Tolerances: the same seed on CPU and GPU runs the same float32 arithmetic in another order
(other kernels), so after a few hundred steps the numbers agree to rounding, not to the bit.
The issue that asked for this measured 3 of 1,010 Figure-1 evaluations differing by 0.01
point over whole runs; these short runs allow 0.1 point of test accuracy, 1e-3 relative on
losses and 1e-2 absolute on the percentiles.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from bnrepro.analysis.runs import find_runs, read_metrics
from bnrepro.infra.checkpoint import load
from bnrepro.models.batchnorm import BNStats, recompute_population_stats
from bnrepro.models.mlp import MLP
from bnrepro.models.norms import Normalization

from .conftest import REPO, run_train
from .test_distributed import RESUMED_RUN, start_torchrun, torchrun, wait_for_eval, workers_of
from .test_faults import assert_same_run, start_train, wait_for_step

pytestmark = pytest.mark.gpu

MNIST_EXPERIMENTS = sorted(p.stem for p in (REPO / "configs/experiment/mnist").glob("[!_]*.yaml"))
IMAGENET_EXPERIMENTS = sorted(
    p.stem for p in (REPO / "configs/experiment/imagenet").glob("[!_]*.yaml")
)
SMALL_IMAGENET = [
    "++data.image_size=64",
    "++data.batch_size=8",
    "++data.workers=2",
    "++model.num_classes=3",
    "++trainer.probe.num_images=6",
    "++model.bn.population_batches=2",
]


def completed(sweep: Path) -> list[dict]:
    summaries = [r.summary for r in find_runs(sweep)]
    assert summaries and all(s["status"] == "completed" for s in summaries), summaries
    assert all(s["device"].startswith("cuda") for s in summaries)
    return summaries


def test_every_mnist_experiment_on_cuda(mnist_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-m",
        "experiment=" + ",".join(f"mnist/{e}" for e in MNIST_EXPERIMENTS),
        "trainer.device=cuda",
        "trainer.steps=200",
        "trainer.eval_every=100",
        "logger=none",
        f"paths.data_dir={mnist_root}",
        f"hydra.sweep.dir={sweep}",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(completed(sweep)) == len(MNIST_EXPERIMENTS)
    # The default cuda_graph=auto captured the steps of these constant-rate runs.
    assert "CUDA graph" in (next(sweep.glob("*/train.log"))).read_text()


@pytest.mark.parametrize("decode", ["device", "workers"])
def test_every_imagenet_experiment_on_cuda(decode, fake_imagenet, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-m",
        "experiment=" + ",".join(f"imagenet/{e}" for e in IMAGENET_EXPERIMENTS),
        f"paths.imagenet_dir={fake_imagenet}",
        *SMALL_IMAGENET,
        f"++data.decode={decode}",
        "trainer.steps=6",
        "trainer.eval_every=3",
        "logger=none",
        f"hydra.sweep.dir={sweep}",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(completed(sweep)) == len(IMAGENET_EXPERIMENTS)  # bf16 autocast, channels_last


def test_compiled_bn_inception_trains_on_cuda(fake_imagenet, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(
        "experiment=imagenet/bn_x30",
        f"paths.imagenet_dir={fake_imagenet}",
        *SMALL_IMAGENET,
        "trainer.compile=true",
        "trainer.steps=4",
        "trainer.eval_every=2",
        "logger=none",
        f"hydra.run.dir={run_dir}",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert completed(run_dir)


def seed_metrics_on_cpu_and_cuda(
    tmp_path: Path, *overrides: str, cuda_only: tuple[str, ...] = ()
) -> dict[str, dict[int, list[dict]]]:
    """The same 2-seed stacked run on the CPU and on CUDA (`cuda_only` added there): each
    device's metrics per seed."""
    runs = {}
    for device in ("cpu", "cuda"):
        run_dir = tmp_path / device
        proc = run_train(
            *overrides,
            "seeds=[1,2]",
            f"trainer.device={device}",
            *(cuda_only if device == "cuda" else ()),
            "logger=none",
            f"hydra.run.dir={run_dir}",
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[device] = {s: read_metrics(run_dir / f"seed{s}" / "metrics.jsonl") for s in (1, 2)}
    return runs


def test_stacked_mnist_on_cuda_matches_the_cpu(mnist_root, tmp_path):
    runs = seed_metrics_on_cpu_and_cuda(
        tmp_path,
        "experiment=mnist/bn",
        "trainer.steps=500",
        "trainer.eval_every=100",
        "model.bn.population_batches=20",
        f"paths.data_dir={mnist_root}",
    )
    for seed in (1, 2):
        for cpu, gpu in zip(runs["cpu"][seed], runs["cuda"][seed], strict=True):
            assert cpu["step"] == gpu["step"]
            assert abs(cpu["test/acc"] - gpu["test/acc"]) <= 0.1
            for key in ("test/loss", "train/loss"):
                if key in cpu:
                    assert gpu[key] == pytest.approx(cpu[key], rel=1e-3)
            for key in (k for k in cpu if k.startswith("act/")):
                assert abs(cpu[key] - gpu[key]) <= 1e-2, key


@pytest.mark.parametrize("compiled", [False, True])
def test_stacked_bn_inception_on_cuda_matches_the_cpu(compiled, fashion_root, tmp_path):
    """Issue 20: the stacked conv net (seeds=[1,2], grouped convolutions) on CUDA, eager and
    torch.compiled, against the same run on the CPU: cuDNN's kernels sum in another order, so
    20 steps agree to about 1e-2 relative in the losses, not to the bit."""
    runs = seed_metrics_on_cpu_and_cuda(
        tmp_path,
        "experiment=fig2_small/bn_x5",
        "trainer.steps=20",
        "trainer.eval_every=10",
        f"paths.data_dir={fashion_root}",
        cuda_only=("trainer.compile=true",) if compiled else (),
    )
    for seed in (1, 2):
        for cpu, gpu in zip(runs["cpu"][seed], runs["cuda"][seed], strict=True):
            assert cpu["step"] == gpu["step"]
            for key in ("val/loss", "train/loss"):
                if key in cpu:
                    assert gpu[key] == pytest.approx(cpu[key], rel=2e-2), (seed, key)


def test_population_statistics_on_cuda_equal_the_cpus():
    torch.manual_seed(0)
    bn = BNStats(stats="population", momentum=0.1, eps=1e-5, population_batches=50)
    model = MLP(norm=Normalization("bn", bn=bn))
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.rand(60, 784, generator=generator), None) for _ in range(50)]
    stats = {}
    for device in ("cpu", "cuda"):
        model = model.to(device)
        on_device = iter([(x.to(device), y) for x, y in batches])
        recompute_population_stats(model, on_device, num_batches=50)
        stats[device] = {k: v.cpu() for k, v in model.state_dict().items() if "running" in k}
    for key, cpu in stats["cpu"].items():
        torch.testing.assert_close(stats["cuda"][key], cpu, rtol=1e-5, atol=1e-6)


def test_kill_and_resume_on_cuda_gives_identical_metrics(mnist_root, tmp_path):
    args = [
        "experiment=mnist/bn",
        "seeds=[1,2]",
        "trainer.device=cuda",
        "trainer.steps=6000",
        "trainer.eval_every=500",
        "trainer.checkpoint_every=1000",
        "model.bn.population_batches=20",
        "logger=none",
        f"paths.data_dir={mnist_root}",
    ]
    reference = tmp_path / "reference"
    proc = run_train(*args, f"hydra.run.dir={reference}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "killed"
    proc = start_train(*args, f"hydra.run.dir={run_dir}")
    wait_for_step(run_dir / "seed1" / "metrics.jsonl", 2000, proc)
    time.sleep(random.uniform(0.0, 0.3))
    proc.kill()
    proc.wait()
    resumed = run_train(*args, f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert_same_run(reference, run_dir)


def test_torchrun_resume_on_cuda_restores_every_ranks_gpu_stream(mnist_root, tmp_path):
    """Issue 19 on NCCL: the ranks' states are gathered to rank 0 by a collective on the GPU,
    each rank's CUDA random state (its dropout masks) comes back onto its own device, and the
    resumed run's metrics equal the uninterrupted run's. As many ranks as GPUs, at most 2."""
    nproc = min(2, torch.cuda.device_count())
    args = [*RESUMED_RUN, "trainer.device=cuda", "trainer.steps=6000"]
    args.append(f"paths.data_dir={mnist_root}")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    proc = torchrun(*args, f"hydra.run.dir={whole}", nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    launcher = start_torchrun(*args, f"hydra.run.dir={cut}", nproc=nproc)
    workers = workers_of(launcher, nproc)
    wait_for_eval(cut / "metrics.jsonl", 400, launcher)
    time.sleep(random.uniform(0.0, 0.3))
    for pid in [launcher.pid, *workers]:
        os.kill(pid, signal.SIGKILL)
    launcher.wait()
    resumed = torchrun(*args, f"hydra.run.dir={cut}", nproc=nproc)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert (cut / "metrics.jsonl").read_bytes() == (whole / "metrics.jsonl").read_bytes()
    final = load(cut / "checkpoints" / "last.pt")
    assert len(final["ranks"]) == nproc and all("cuda" in r["rng"] for r in final["ranks"])
    reference = load(whole / "checkpoints" / "last.pt")
    for a, b in zip(reference["ranks"], final["ranks"], strict=True):
        assert torch.equal(a["rng"]["cuda"], b["rng"]["cuda"])


def test_one_process_under_torchrun_uses_nccl_ddp_and_syncbn(fake_imagenet, tmp_path):
    run_dir = tmp_path / "run"
    proc = torchrun(
        "-m",
        "bnrepro.train",
        "experiment=imagenet/bn_baseline",
        f"paths.imagenet_dir={fake_imagenet}",
        *SMALL_IMAGENET,
        "trainer.sync_bn=true",
        "trainer.steps=4",
        "trainer.eval_every=2",
        "trainer.progress=false",
        "logger=none",
        f"hydra.run.dir={run_dir}",
        nproc=1,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = (run_dir / "train.log").read_text()
    assert "distributed: nccl backend, 1 process(es), DDP with SyncBatchNorm" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["replicas_in_sync"] is True


def test_more_processes_than_gpus_is_one_line(mnist_root, tmp_path):
    nproc = torch.cuda.device_count() + 1
    proc = torchrun(
        "-m",
        "bnrepro.train",
        "experiment=mnist/bn",
        "logger=none",
        f"paths.data_dir={mnist_root}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "trainer.device=auto",
        nproc=nproc,
    )
    assert proc.returncode != 0
    assert f"start at most {nproc - 1} process(es) per node" in proc.stderr


def test_gpu_suite_is_not_empty():
    # A guard for `make test-gpu`: on a GPU machine this module must have found CUDA.
    assert torch.cuda.is_available()
    subprocess.run(["nvidia-smi", "-L"], check=True)
