"""The real entrypoint in subprocesses: run-directory contract, W&B offline runs, multirun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torchvision as tv

from bnrepro.analysis.runs import read_metrics

from .conftest import REPO, run_train

LAYER_KEYS = {f"act/h{i}/p{q}" for i in (1, 2, 3) for q in (15, 50, 85)}
SUMMARY_KEYS = {"status", "steps", "final_test_acc", "best_test_acc", "wall_seconds"}


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def test_single_run_writes_the_run_directory_contract(mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(
        "experiment=mnist/bn",
        f"paths.data_dir={mnist_root}",
        "trainer.steps=300",
        "trainer.eval_every=100",
        "model.bn.population_batches=5",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert (run_dir / ".hydra" / "config.yaml").is_file()
    # What the run trained with, kept beside it: Hydra rewrites .hydra/ at every launch.
    for name in ("config.yaml", "overrides.yaml"):
        assert (run_dir / name).read_text() == (run_dir / ".hydra" / name).read_text(), name
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 100, 200, 300]
    for record in records[1:]:
        assert {"step", "train/loss", "test/acc"} | LAYER_KEYS <= set(record)
        assert 0.0 <= record["test/acc"] <= 100.0
    assert records[-1]["test/acc"] > 80.0  # it learned something

    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    assert summary["status"] == "completed" and summary["steps"] == 300
    assert summary["final_test_acc"] == records[-1]["test/acc"]
    assert summary["best_test_acc"] == max(r["test/acc"] for r in records)
    assert (summary["arm"], summary["seed"]) == ("bn", 1)
    # Where the result came from: this checkout's commit, the libraries, the job's command.
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    origin = summary["provenance"]
    assert origin["commit"] == head.stdout.strip() and isinstance(origin["dirty"], bool)
    assert (origin["torch"], origin["torchvision"]) == (torch.__version__, tv.__version__)
    assert origin["cpu"] and origin["threads"] >= 1
    command = origin["command"].split()
    assert command[:3] == ["python", "-m", "bnrepro.train"]
    assert {"experiment=mnist/bn", "trainer.steps=300"} <= set(command)

    wandb_files = offline_runs(run_dir)
    assert len(wandb_files) == 1 and wandb_files[0].stat().st_size > 0
    assert (run_dir / "run.png").stat().st_size > 0
    assert "MKL kernels:" in (run_dir / "train.log").read_text()  # the kernel choice, logged


def test_multirun_gives_one_directory_and_one_wandb_run_per_job(mnist_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-m",
        "experiment=mnist/baseline",
        "seed=1,2",
        "trainer.steps=100",
        "trainer.eval_every=50",
        f"paths.data_dir={mnist_root}",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = sorted(p.parent for p in sweep.glob("*/summary.json"))
    # Named by arm, seed and the hash of their settings (configs/hydra/default.yaml).
    assert [p.name[:-9] for p in run_dirs] == ["baseline-seed1", "baseline-seed2"]
    runs = [offline_runs(d) for d in run_dirs]
    assert all(len(r) == 1 for r in runs)
    assert runs[0][0].name != runs[1][0].name  # two W&B runs, not one reused
    first, second = (read_metrics(d / "metrics.jsonl") for d in run_dirs)
    assert first[-1]["train/loss"] != second[-1]["train/loss"]  # seeds really differ


def test_console_script_and_bad_override(tmp_path):
    script = shutil.which("bnrepro-train", path=str(Path(os.sys.executable).parent))
    assert script, "the bnrepro-train console script is not installed"
    proc = subprocess.run(
        [script, "data.batch_size=0", f"hydra.run.dir={tmp_path / 'r'}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: data.batch_size=0 is invalid: expected an integer >= 2."
    )
    assert not (tmp_path / "r" / "metrics.jsonl").exists()  # nothing started


def test_missing_data_is_one_line_before_training(tmp_path):
    proc = run_train(
        f"paths.data_dir={tmp_path}", "data.download=false", f"hydra.run.dir={tmp_path / 'r'}"
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: MNIST not found in") and "DATA_DIR" in last


@pytest.fixture(scope="module")
def figure1_runs(mnist_root, tmp_path_factory) -> Path:
    """Both Figure-1 arms, 2 seeds, 2,000 real MNIST steps each, in one real multirun."""
    sweep = tmp_path_factory.mktemp("figure1") / "sweep"
    proc = run_train(
        "-m",
        "experiment=mnist/baseline,mnist/bn",
        "seed=1,2",
        "trainer.steps=2000",
        "trainer.eval_every=500",
        "logger=none",
        "model.bn.population_batches=20",
        f"paths.data_dir={mnist_root}",
        f"hydra.sweep.dir={sweep}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


def test_bn_beats_baseline_after_2000_steps(figure1_runs):
    finals = {}
    for summary_path in figure1_runs.glob("*/summary.json"):
        summary = json.loads(summary_path.read_text())
        finals.setdefault(summary["arm"], []).append(summary["final_test_acc"])
    assert len(finals["bn"]) == len(finals["baseline"]) == 2
    assert min(finals["bn"]) > max(finals["baseline"]), finals


def test_figure1_script_builds_from_run_logs(figure1_runs, tmp_path):
    stored, out = tmp_path / "runs", tmp_path / "out"
    python = os.sys.executable
    collect = subprocess.run(
        [python, "scripts/collect_runs.py", str(figure1_runs), str(stored)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert collect.returncode == 0, collect.stderr
    assert sorted(p.name for p in stored.iterdir()) == [
        "baseline-seed1",
        "baseline-seed2",
        "bn-seed1",
        "bn-seed2",
    ]
    build = subprocess.run(
        [python, "scripts/make_figure1.py", "--runs", str(stored), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    assert (out / "figure1.png").stat().st_size > 10_000
    result = json.loads((out / "figure1.json").read_text())
    assert result["layer"] == "h3"
    for arm in ("baseline", "bn"):
        stats = result["arms"][arm]
        assert stats["final_test_acc"]["n"] == 2
        for key in ("p50_drift", "spread_drift", "p50_range", "spread_range"):
            assert stats[key]["mean"] >= 0
        assert stats["p50_range"]["mean"] >= stats["p50_drift"]["mean"]
        assert len(result["plotted"][arm]["steps"]) == 5  # steps 0, 500, ..., 2000
    assert result["bn_steps_to_baseline_final_acc"] <= 2000


@pytest.mark.slow  # make test-full: W&B's online mode without credentials
def test_wandb_online_without_credentials_falls_back_to_offline(mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    env = {"WANDB_MODE": "online", "HOME": str(tmp_path), "WANDB_API_KEY": ""}
    proc = run_train(
        "experiment=mnist/bn",
        "debug=default",
        f"paths.data_dir={mnist_root}",
        f"hydra.run.dir={run_dir}",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "W&B" in line]
    assert len(warnings) == 1 and "logging offline instead" in warnings[0]
    assert len(offline_runs(run_dir)) == 1
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 100, 200, 300]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow  # make test-full; a blow-up in a multirun is recorded in make test (test_faults)
def test_divergence_is_recorded_not_raised(mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(
        "experiment=mnist/baseline",
        "logger=none",
        "activation=relu",
        "optim.lr=1000",
        "trainer.steps=500",
        "trainer.eval_every=100",
        f"paths.data_dir={mnist_root}",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert (
        1 <= summary["diverged_at_step"] < 500 and summary["steps"] == summary["diverged_at_step"]
    )
    last = read_metrics(run_dir / "metrics.jsonl")[-1]
    assert last["step"] == summary["diverged_at_step"] and last["train/loss"] is None
