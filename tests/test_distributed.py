"""The distributed path with real processes: torchrun, gloo on CPU, DDP and BN statistics."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bnrepro.infra.checkpoint import load

from .conftest import REPO, run_train

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


def torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TORCHRUN, f"--nproc_per_node={nproc}", *args],
        cwd=REPO,
        env=os.environ | ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_torchrun(*args: str, nproc: int = 2) -> subprocess.Popen:
    return subprocess.Popen(
        [*TORCHRUN, f"--nproc_per_node={nproc}", *args],
        cwd=REPO,
        env=os.environ | ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (from /proc: no psutil here)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_eval(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and f'"step": {step},' in metrics.read_text():
            return
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    raise AssertionError(f"step {step} never reached")


def workers_of(launcher: subprocess.Popen, nproc: int, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(pids := children(launcher.pid)) == nproc:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"torchrun never had {nproc} workers")


def rank_records(out: Path, mode: str) -> list[dict]:
    proc = torchrun("-m", "tests.workers.dist_bn", str(out), mode)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_evaluation_statistics_come_from_every_rank_and_agree(tmp_path):
    ranks = rank_records(tmp_path, "reduce")
    assert ranks[0]["weight"] == ranks[1]["weight"]  # DDP kept the replicas identical
    # DDP must not overwrite the others' buffers with rank 0's (rank-local buffers):
    # while training, each rank's running mean follows its own, shifted data.
    before = [np.array(r["before"]["mean"]) for r in ranks]
    assert np.abs(before[0] - before[1]).min() > 0.1  # DDP's default would make them equal
    for key in ("mean", "var"):
        own = np.array([r["before"][key] for r in ranks])
        for r in ranks:  # identical on every rank, and the average of every rank's estimate
            np.testing.assert_allclose(r["after"][key], own.mean(axis=0), rtol=1e-6)
    assert ranks[0]["after"] == ranks[1]["after"]


@pytest.mark.slow  # make test-full: the reduce mode above is the default and in make test
def test_broadcast_mode_takes_rank_zeros_statistics(tmp_path):
    ranks = rank_records(tmp_path, "broadcast")
    for r in ranks:
        assert r["after"] == ranks[0]["before"]


@pytest.mark.slow  # make test-full; two processes take the same path in make test
def test_one_process_under_torchrun_takes_the_distributed_path(mnist_root, tmp_path):
    run_dir = tmp_path / "one"
    proc = torchrun(
        "-m",
        "bnrepro.train",
        "experiment=mnist/bn",
        "logger=none",
        "trainer.steps=40",
        "trainer.eval_every=20",
        "trainer.progress=false",
        "model.bn.population_batches=2",
        f"paths.data_dir={mnist_root}",
        f"hydra.run.dir={run_dir}",
        nproc=1,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    # world_size and replicas_in_sync are written only when a process group and DDP exist.
    assert summary["world_size"] == 1 and summary["replicas_in_sync"] is True
    assert summary["status"] == "completed" and summary["device"] == "cpu"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.sync_bn=true"], "trainer.sync_bn=true synchronises BN across processes"),
        pytest.param(  # make test-full: the same check as sync_bn's, for the CUDA graph
            ["trainer.cuda_graph=true"],
            "trainer.cuda_graph=true cannot capture this run",
            marks=pytest.mark.slow,
        ),
        (["trainer.dist_bn=mean"], "trainer.dist_bn='mean' is invalid"),
    ],
)
def test_distributed_and_gpu_settings_that_cannot_apply_are_one_line(
    overrides, message, mnist_root, tmp_path
):
    proc = run_train(
        "experiment=mnist/bn",
        "logger=none",
        f"paths.data_dir={mnist_root}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *overrides,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # make test-full: one more one-line error, after the three above
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(mnist_root, tmp_path):
    proc = run_train(
        "experiment=mnist/bn",
        "logger=none",
        "trainer.device=cuda",
        f"paths.data_dir={mnist_root}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: trainer.device=cuda but torch sees no GPU"), proc.stderr[-2000:]


# Dropout (each rank's own stream), and a 2-rank job whose ranks draw their own data orders.
JOB = [
    "experiment=mnist/bn",
    "dropout=inception",
    "logger=none",
    "trainer.eval_every=200",
    "trainer.checkpoint_every=200",
]
RESUMED_RUN = ["-m", "bnrepro.train", *JOB, "trainer.progress=false"]


# make test-full: the quick tier keeps SIGKILL resume of one process (test_faults) and the
# distributed BN statistics under torchrun; this combination costs a minute.
@pytest.mark.slow
def test_torchrun_killed_mid_run_resumes_every_rank_bit_identically(mnist_root, tmp_path):
    """Issue 19: a checkpoint holds every rank's random states, data positions and BN buffers.

    With rank 0's states restored on every rank (the old checkpoint), rank 1 drew rank 0's
    dropout masks and data after a resume, and the metrics left the uninterrupted run's."""
    data = f"paths.data_dir={mnist_root}"
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = [*RESUMED_RUN, "trainer.steps=600", data]
    proc = torchrun(*args, f"hydra.run.dir={whole}")
    assert proc.returncode == 0, proc.stderr[-3000:]

    launcher = start_torchrun(*args, f"hydra.run.dir={cut}")
    workers = workers_of(launcher, 2)
    wait_for_eval(cut / "metrics.jsonl", 200, launcher)
    while not (cut / "checkpoints" / "last.pt").exists():  # the step-200 checkpoint
        assert launcher.poll() is None
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.5))  # somewhere before the step-400 checkpoint
    for pid in [launcher.pid, *workers]:  # all of it, as a node failure would
        os.kill(pid, signal.SIGKILL)
    launcher.wait()
    assert load(cut / "checkpoints" / "last.pt")["step"] < 600
    resumed = torchrun(*args, f"hydra.run.dir={cut}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr

    assert (cut / "metrics.jsonl").read_bytes() == (whole / "metrics.jsonl").read_bytes()
    a, b = load(whole / "checkpoints" / "last.pt"), load(cut / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 600
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert json.loads((cut / "summary.json").read_text())["replicas_in_sync"] is True
    for rank_a, rank_b in zip(a["ranks"], b["ranks"], strict=True):  # every rank's own state
        assert all(
            torch.equal(rank_a["buffers"][k], rank_b["buffers"][k]) for k in rank_a["buffers"]
        )
        assert torch.equal(rank_a["rng"]["torch"], rank_b["rng"]["torch"])
        assert rank_a["train_batches"]["position"] == rank_b["train_batches"]["position"]
    # The two ranks' dropout streams and data orders are their own, after the resume too.
    rank0, rank1 = b["ranks"]
    assert not torch.equal(rank0["rng"]["torch"], rank1["rng"]["torch"])
    assert not torch.equal(
        rank0["train_batches"]["epoch_states"][0], rank1["train_batches"]["epoch_states"][0]
    )
    # Rank r's streams exist only in a job of that size: one process may not continue it.
    longer = run_train(*JOB, "trainer.steps=700", data, f"hydra.run.dir={whole}")
    assert longer.returncode == 2
    last = longer.stderr.strip().splitlines()[-1]
    assert "was written by 2 process(es) and this job has 1" in last, longer.stderr[-2000:]


def test_killing_only_the_launcher_ends_its_workers(mnist_root, tmp_path):
    """A SIGKILLed torchrun cannot stop its workers (they run in sessions of their own); each
    worker has the kernel kill it when its parent dies (infra/launcher_watch.py). Before, they
    trained on to the end of the job, and a resume beside them shared the run directory."""
    run_dir = tmp_path / "run"
    launcher = start_torchrun(
        *RESUMED_RUN,
        "trainer.steps=100000",
        f"paths.data_dir={mnist_root}",
        f"hydra.run.dir={run_dir}",
    )
    workers = workers_of(launcher, 2)
    wait_for_eval(run_dir / "metrics.jsonl", 200, launcher)  # training, not starting up
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 5.0
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = [pid for pid in workers if alive(pid)]
    for pid in survivors:  # leave no process behind, even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"workers {survivors} outlived their launcher by 5 s"
