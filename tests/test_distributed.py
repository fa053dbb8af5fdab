"""The distributed path with real processes: torchrun, gloo on CPU, DDP and BN statistics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import REPO, run_train


def torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    env = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return subprocess.run(
        [*command, f"--nproc_per_node={nproc}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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
