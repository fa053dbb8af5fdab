"""Every ImageNet experiment through the one entrypoint on a generated ImageFolder, single
process and under torchrun (gloo, 2 CPU processes); the launchers; Figures 2 and 3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bnrepro.analysis.runs import find_runs, read_metrics
from bnrepro.data.fake_imagefolder import make_fake_imagefolder

from .conftest import REPO, run_train

IMAGENET_EXPERIMENTS = sorted(
    p.stem for p in (REPO / "configs" / "experiment" / "imagenet").glob("[!_]*.yaml")
)
# Reduced resolution and size: the real pipeline, seconds of CPU. (`++`: a multirun first
# composes the config without the swept experiment, where these keys do not exist yet.)
SMALL = [
    "++data.image_size=32",
    "++data.batch_size=4",
    "++data.workers=0",
    "++model.num_classes=3",
    "++trainer.probe.num_images=6",
    "++model.bn.population_batches=2",
    "++trainer.num_threads=1",
]


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory) -> Path:
    return make_fake_imagefolder(tmp_path_factory.mktemp("imagenet"), num_classes=3)


@pytest.fixture(scope="module")
def imagenet_sweep(fake_imagenet, tmp_path_factory) -> Path:
    """All five Figure 2 variants, 6 steps each, in one real multirun."""
    sweep = tmp_path_factory.mktemp("imagenet_sweep") / "sweep"
    experiments = ",".join(f"imagenet/{name}" for name in IMAGENET_EXPERIMENTS)
    proc = run_train(
        "-m",
        f"experiment={experiments}",
        f"paths.imagenet_dir={fake_imagenet}",
        *SMALL,
        "trainer.steps=6",
        "trainer.eval_every=3",
        f"hydra.sweep.dir={sweep}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return sweep


def test_figure2_variants_exist():
    assert IMAGENET_EXPERIMENTS == ["bn_baseline", "bn_x30", "bn_x5", "bn_x5_sigmoid", "inception"]


def test_every_imagenet_experiment_runs(imagenet_sweep):
    runs = {r.arm: r for r in find_runs(imagenet_sweep)}
    assert sorted(runs) == IMAGENET_EXPERIMENTS
    for run in runs.values():
        assert run.summary["status"] == "completed" and run.summary["steps"] == 6
        assert [m["step"] for m in run.metrics] == [3, 6]
        for m in run.metrics:
            assert {"val/top1", "val/top5", "val/loss", "train/loss", "act/5b/p50"} <= set(m)
            assert 0 <= m["val/top1"] <= m["val/top5"] <= 100
        assert run.summary["final_val_top1"] == run.metrics[-1]["val/top1"]
        assert len(list(run.path.glob("wandb/offline-run-*/run-*.wandb"))) == 1
    # The multipliers and the 4.2.1 recipe reached the optimiser.
    lr = {arm: run.metrics[0]["train/lr"] for arm, run in runs.items()}
    assert lr["inception"] == lr["bn_baseline"] == pytest.approx(0.0015)
    assert lr["bn_x5"] == lr["bn_x5_sigmoid"] == pytest.approx(0.0075)
    assert lr["bn_x30"] == pytest.approx(0.045)


def test_missing_imagenet_is_one_line(tmp_path):
    proc = run_train(
        "experiment=imagenet/bn_x5",
        f"paths.imagenet_dir={tmp_path / 'nope'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ImageNet not usable at") and "IMAGENET_DIR" in last


# With BN and without it in `make test`; the other three arms (the same DDP path with other
# learning rates and a sigmoid) only in `make test-full`, for CI time.
DDP_IN_CI = ("bn_baseline",)  # make test; the other arms in make test-full


@pytest.mark.parametrize(
    "experiment",
    [
        e if e in DDP_IN_CI else pytest.param(e, marks=pytest.mark.slow)
        for e in IMAGENET_EXPERIMENTS
    ],
)
def test_torchrun_two_processes_keep_replicas_identical(experiment, fake_imagenet, tmp_path):
    run_dir = tmp_path / "ddp"
    env = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "bnrepro.train",
            f"experiment=imagenet/{experiment}",
            f"paths.imagenet_dir={fake_imagenet}",
            *SMALL,
            "trainer.steps=4",
            "trainer.eval_every=2",
            "trainer.progress=false",
            "trainer.device=cpu",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replicas_in_sync"] is True
    assert [m["step"] for m in read_metrics(run_dir / "metrics.jsonl")] == [2, 4]  # rank 0 only
    assert len(list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))) == 1


@pytest.mark.slow  # make test-full; the joblib launcher's sweeps run in make test
def test_submitit_local_launcher_runs_a_two_job_sweep(mnist_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-m",
        "hydra/launcher=local_procs",
        "experiment=mnist/bn",
        "seed=1,2",
        "trainer.steps=50",
        "trainer.eval_every=25",
        "logger=none",
        f"paths.data_dir={mnist_root}",
        f"hydra.sweep.dir={sweep}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summaries = sorted(json.loads(p.read_text())["seed"] for p in sweep.glob("*/summary.json"))
    assert summaries == [1, 2]
    assert len(list(sweep.glob(".submitit/*/*_result.pkl"))) == 2  # really ran as submitit jobs


def test_figure2_script_builds_from_real_short_runs(imagenet_sweep, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/make_figure2.py",
            "--runs",
            str(imagenet_sweep),
            "--out",
            str(tmp_path),
            "--target",
            "40",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "figure2.png").stat().st_size > 10_000
    result = json.loads((tmp_path / "figure3.json").read_text())
    rows = {row["arm"]: row for row in result["rows"]}
    assert list(rows) == ["inception", "bn_baseline", "bn_x5", "bn_x30", "bn_x5_sigmoid"]
    for run in find_runs(imagenet_sweep):
        accs = [m["val/top1"] for m in run.metrics]
        assert rows[run.arm]["max_acc"] == pytest.approx(max(accs))
        reached = [m["step"] for m in run.metrics if m["val/top1"] >= 40]
        assert rows[run.arm]["steps_to_target"] == (reached[0] if reached else None)
    table = (tmp_path / "figure3.md").read_text()
    assert "| bn_x30 |" in table and "2.7M" in table and "74.8 %" in table


@pytest.mark.slow  # a benchmark, not a contract: make test-full
def test_imagenet_benchmark_runs_on_cpu_with_a_tiny_batch(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/bench_imagenet.py",
            "--device",
            "cpu",
            "--batch",
            "2",
            "--image-size",
            "64",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "imagenet_cpu.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {"bn_inception", "googlenet"}
    assert all(r["images_per_s"] > 0 for r in rows)
