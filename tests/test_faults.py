"""Faults and bad input, with real processes and real signals: exact resume after SIGKILL,
preemption by SIGTERM/SIGUSR1, divergence, and one-line errors for bad command lines."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bnrepro.data.mnist import RAW_FILES, raw_dir
from bnrepro.infra.checkpoint import FORMAT_VERSION, load, save_atomic
from bnrepro.infra.preemption import EXIT_PREEMPTED

from .conftest import REPO, run_train

# Dropout and population statistics on: every RNG and both data iterators must be restored.
RUN = [
    "experiment=mnist/bn",
    "dropout=inception",
    "trainer.steps=3000",
    "trainer.eval_every=250",
    "trainer.checkpoint_every=500",
    "model.bn.population_batches=20",
]
VARIANTS = {"plain": ["logger=wandb"], "stacked": ["seeds=[1,2]", "logger=none"]}


def start_train(*overrides: str) -> subprocess.Popen:
    env = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.Popen(
        [sys.executable, "-m", "bnrepro.train", "trainer.progress=false", *overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and f'"step": {step},' in metrics.read_text():
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    raise AssertionError(f"step {step} never reached")


def metrics_files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("metrics.jsonl")}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load(run_dir / "checkpoints" / "last.pt")["model"]


def assert_same_run(a: Path, b: Path) -> None:
    assert metrics_files(a) == metrics_files(b) and metrics_files(a)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def uninterrupted(mnist_root, tmp_path_factory) -> Callable[[str], Path]:
    """A variant run from scratch, made when a test first asks for it (`make test` skips the
    slow stacked case and its runs). That the same config and seed give identical files is
    shown by tests/test_idempotent.py (uninterrupted jobs of two sweeps, byte for byte)."""
    dirs: dict[str, Path] = {}

    def run_dir_of(name: str) -> Path:
        if name not in dirs:
            dirs[name] = tmp_path_factory.mktemp(name) / "run"
            proc = run_train(
                *RUN, *VARIANTS[name], f"paths.data_dir={mnist_root}", f"hydra.run.dir={dirs[name]}"
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
        return dirs[name]

    return run_dir_of


# make test runs the plain one (39 s here); make test-full the stacked one too, and the 2-rank
# torchrun kill (tests/test_distributed.py), which covers more state and costs a minute.
@pytest.mark.parametrize("variant", ["plain", pytest.param("stacked", marks=pytest.mark.slow)])
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(
    variant, uninterrupted, mnist_root, tmp_path
):
    run_dir = tmp_path / "run"
    args = [*RUN, *VARIANTS[variant], f"paths.data_dir={mnist_root}", f"hydra.run.dir={run_dir}"]
    proc = start_train(*args)
    metrics = run_dir / ("metrics.jsonl" if variant == "plain" else "seed1/metrics.jsonl")
    wait_for_step(metrics, 1000, proc)
    time.sleep(random.uniform(0.0, 0.6))  # somewhere in the next ~1,000 steps
    proc.kill()
    proc.wait()
    assert (run_dir / "checkpoints" / "last.pt").exists()
    resumed = run_train(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert_same_run(uninterrupted(variant), run_dir)
    if variant == "plain":  # the W&B run continues under the same id
        ids = {p.name.rsplit("-", 1)[1] for p in run_dir.glob("wandb/offline-run-*")}
        assert len(list(run_dir.glob("wandb/offline-run-*"))) == 2 and len(ids) == 1


# Preemption (SIGTERM, and SIGUSR1 on the same path, preemption.py) in make test-full; the
# bit-identical resume it relies on is in make test (SIGKILL above).
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_checkpoints_and_exits_for_requeue(
    sig, uninterrupted, mnist_root, tmp_path
):
    run_dir = tmp_path / "run"
    args = [*RUN, "logger=none", f"paths.data_dir={mnist_root}", f"hydra.run.dir={run_dir}"]
    proc = start_train(*args)
    wait_for_step(run_dir / "metrics.jsonl", 750, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    checkpoint = load(run_dir / "checkpoints" / "last.pt")
    assert summary["status"] == "preempted" and summary["steps"] == checkpoint["step"] >= 750
    resumed = run_train(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert metrics_files(run_dir) == {
        "metrics.jsonl": (uninterrupted("plain") / "metrics.jsonl").read_bytes()
    }


def test_divergence_threshold_and_the_sweep_goes_on(mnist_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-m",
        "experiment=mnist/baseline",
        "trainer.diverge_loss=5",
        "optim.lr=100,0.1",  # at lr 100 the loss jumps to ~150: finite, but a blow-up
        "trainer.steps=200",
        "trainer.eval_every=100",
        "logger=none",
        f"paths.data_dir={mnist_root}",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {p.parent: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}
    by_lr = {s["settings"]["lr"]: (d, s) for d, s in runs.items()}
    assert {lr: s["status"] for lr, (_, s) in by_lr.items()} == {100: "diverged", 0.1: "completed"}
    run_dir, diverged = by_lr[100]
    assert diverged["diverged_at_step"] >= 1
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == diverged["diverged_at_step"] and last["train/loss"] > 5


def test_atomic_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"version": FORMAT_VERSION, "step": 1}, path)

    def torn_save(payload, f):
        f.write(b"half a checkpoint")
        raise OSError("killed mid-write")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError):
        save_atomic({"version": FORMAT_VERSION, "step": 2}, path)
    assert load(path)["step"] == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.foo=1"], "error: Could not override 'trainer.foo'."),
        (["model=foo"], "error: In 'train': Could not find 'model/foo' (available: bn_inception"),
        (["optim.lr=abc"], "error: optim.lr='abc' is invalid: expected a positive number."),
        (["data.batch_size=0"], "error: data.batch_size=0 is invalid: expected an integer >= 2."),
        (["trainer.steps=-5"], "error: trainer.steps=-5 is invalid: expected a positive integer."),
        (["model.bn.stats=foo"], "error: model.bn.stats='foo' is invalid: expected ema or"),
        (["seed=1,2"], "error: seed=1,2 sweeps several values; add -m"),
        (["-m", "optim.lr=0.1,0"], "error: optim.lr=0 is invalid"),
        (["hydra.run.dir={file}/run"], "error: cannot create the run directory {file}/run"),
        (["hydra.run.dir=/proc/bnrepro/run"], "error: cannot create the run directory /proc/"),
        (["-m", "hydra.sweep.dir=/proc/bnrepro", "seed=1,2"], "error: cannot create the run"),
        (["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=abc"], "error: Error merging"),
    ],
)
def test_bad_command_lines_are_one_line_and_start_nothing(overrides, message, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    overrides = [o.format(file=a_file) for o in overrides]
    if not any(o.startswith("hydra.") for o in overrides):
        overrides += [f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'run'}"]
    script = shutil.which("bnrepro-train", path=str(Path(sys.executable).parent))
    proc = subprocess.run(
        [script, *overrides], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(file=a_file)), proc.stderr
    assert not (tmp_path / "run").exists()


def test_truncated_idx_file_names_the_file_and_checksum(mnist_root, tmp_path):
    raw = raw_dir(tmp_path)
    raw.mkdir(parents=True)
    for name in RAW_FILES:
        (raw / name).symlink_to(raw_dir(mnist_root) / name)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    (raw / "t10k-labels-idx1-ubyte").write_bytes(
        (raw_dir(mnist_root) / "t10k-labels-idx1-ubyte").read_bytes()[:5000]
    )
    proc = run_train(
        "experiment=mnist/bn", f"paths.data_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "t10k-labels-idx1-ubyte is corrupt" in last
    assert "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2" in last
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# 25-65 s: in make test-full, to keep make test within 5 minutes (issue 21 added tests)
@pytest.mark.slow
def test_truncated_or_foreign_checkpoint_is_one_line(mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "experiment=mnist/bn",
        "debug=default",
        "trainer.steps=50",
        "trainer.eval_every=50",
        "logger=none",
        f"paths.data_dir={mnist_root}",
        f"hydra.run.dir={run_dir}",
    ]
    assert run_train(*args).returncode == 0
    other = run_train(*args, "optim.lr=0.5")
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint {run_dir}/checkpoints/last.pt was written by a different config "
        f"(optim.lr: 0.1 there, 0.5 now); use a new hydra.run.dir, or resume=never to overwrite"
    )
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    (run_dir / "summary.json").unlink()  # unfinished: a finished run would be skipped
    broken = run_train(*args)
    assert broken.returncode == 2
    assert (
        broken.stderr.strip().splitlines()[-1].startswith(f"error: checkpoint {last} is unreadable")
    )
    assert run_train(*args, "resume=never").returncode == 0  # the way out the message names


@pytest.mark.parametrize("batch_size, returncode", [(12, 0), (13, 2)])
def test_batch_larger_than_the_training_set_is_one_line_before_training(
    batch_size, returncode, tiny_mnist, tmp_path
):
    """12 training images: a batch of 12 trains (population statistics too, over several
    epochs); a batch of 13 stops before any step, where it used to be an IndexError."""
    root, _ = tiny_mnist
    run_dir = tmp_path / "run"
    proc = run_train(
        "experiment=mnist/bn",
        f"data.batch_size={batch_size}",
        "data.download=false",
        "data.verify_checksums=false",
        "trainer.steps=2",
        "trainer.eval_every=1",
        "model.bn.population_batches=3",
        "logger=none",
        f"paths.data_dir={root}",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == returncode, proc.stderr[-3000:]
    if returncode:
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == (
            "error: data.batch_size=13 is larger than the training set (12 images in mnist): "
            "no batch can be drawn; use data.batch_size<=12"
        )
        # Only what Hydra writes before any job starts: no metrics, summary or checkpoint.
        assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "train.log"]


@pytest.mark.parametrize(
    "tools, missing",
    [((), "sbatch and srun are"), (("sbatch",), "srun is"), (("sbatch", "srun"), None)],
)
def test_slurm_launcher_needs_slurm_here(tools, missing, tmp_path, monkeypatch):
    """Checked on PATH (stand-ins here: this machine's own SLURM, if any, must not count)."""
    from bnrepro.config.resolvers import register_resolvers
    from bnrepro.errors import ConfigError
    from bnrepro.infra.preflight import preflight

    register_resolvers()  # as the entrypoint does on import: run directories are named by them
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        (bin_dir / tool).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    argv = ["-m", "hydra/launcher=slurm", "seed=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    if missing is None:
        preflight(argv, str(REPO / "configs"))
        preflight(argv[1:-2], str(REPO / "configs"))  # a single run ignores the launcher
        return
    with pytest.raises(ConfigError, match=f"but {missing} not on PATH here"):
        preflight(argv, str(REPO / "configs"))
    preflight(argv[1:-2], str(REPO / "configs"))


@pytest.mark.parametrize("launcher", ["slurm", "submitit_slurm"])
def test_slurm_sweep_without_slurm_is_one_line_and_starts_nothing(launcher, tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "bnrepro.train", "-m", f"hydra/launcher={launcher}", "seed=1,2"]
        + [f"hydra.sweep.dir={sweep}"],
        cwd=REPO,
        env=os.environ | {"PATH": str(tmp_path)},  # no sbatch, whatever this machine has
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: hydra/launcher={launcher} submits the jobs to SLURM, but sbatch and srun are "
        f"not on PATH here (no SLURM on this machine); run the sweep on a SLURM login node, or "
        f"here with hydra/launcher=joblib or hydra/launcher=local_procs"
    ]
    assert not sweep.exists()


def test_a_format_1_checkpoint_loads_as_one_ranks(tmp_path):
    """Checkpoints written before per-rank states (format 1: rank 0's states at the top) still
    resume a one-process run: load() reads them as the states of one rank."""
    path = tmp_path / "last.pt"
    rng = {"torch": torch.get_rng_state()}
    save_atomic(
        {
            "version": 1,
            "step": 3,
            "rng": rng,
            "train_batches": {"position": 3},
            "population_batches": None,
        },
        path,
    )
    payload = load(path)
    assert FORMAT_VERSION == 2 and len(payload["ranks"]) == 1
    (own,) = payload["ranks"]
    assert torch.equal(own["rng"]["torch"], rng["torch"]) and own["train_batches"]["position"] == 3
    assert own["buffers"] is None and "rng" not in payload
