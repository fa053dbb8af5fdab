"""One training process per run directory, with real processes: a second launch of a run that
is still training is refused in one line and leaves it alone; a killed holder's run is taken
over and resumed; under torchrun every rank of a refused launch stops."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnrepro.errors import RunHeld
from bnrepro.infra.run_lock import LOCK_NAME, acquire, release

from .conftest import REPO, run_train
from .test_distributed import torchrun
from .test_faults import assert_same_run, start_train, wait_for_step

RUN = [
    "experiment=mnist/bn",
    "trainer.steps=1500",
    "trainer.eval_every=250",
    "trainer.checkpoint_every=250",
    "model.bn.population_batches=5",
    "logger=none",
]


def held_line(run_dir: Path, pid: int, started: str) -> str:
    return (
        f"error: run {run_dir} is held by process {pid} on {socket.gethostname()} (started "
        f"{started}): it is still training; wait for it or stop it"
    )


def files_of(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory but Hydra's log, which each process appends to."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != "train.log"
    }


@pytest.fixture(scope="module")
def undisturbed(mnist_root, tmp_path_factory) -> Path:
    """RUN trained once, alone."""
    run_dir = tmp_path_factory.mktemp("undisturbed") / "run"
    proc = run_train(*RUN, f"paths.data_dir={mnist_root}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_lock_is_exclusive_per_open_and_leaves_no_file(tmp_path):
    fd = acquire(tmp_path)
    record = json.loads((tmp_path / LOCK_NAME).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    # flock belongs to the open file, not the process: the basic launcher's jobs share one.
    with pytest.raises(RunHeld) as refused:
        acquire(tmp_path)
    assert f"error: {refused.value}" == held_line(tmp_path, os.getpid(), record["started"])
    release(tmp_path, fd)
    assert not (tmp_path / LOCK_NAME).exists()
    release(tmp_path, acquire(tmp_path))  # free again


HOLD_AND_FORK = """
import os, sys, time
from pathlib import Path
from bnrepro.infra.run_lock import acquire

acquire(Path(sys.argv[1]))
child = os.fork()
if child == 0:  # inherits the lock, as a DataLoader worker does
    time.sleep(60)
    os._exit(0)
print(os.getpid(), child, flush=True)
time.sleep(60)
"""


def test_lock_outlives_a_killed_holder_only_in_its_children_and_says_so(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_FORK, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    pid, child = map(int, holder.stdout.readline().split())
    holder.kill()
    holder.wait()
    with pytest.raises(RunHeld, match=f"held by child processes of process {pid} on .*: try"):
        acquire(tmp_path)
    os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:  # the kernel drops the lock once the child has exited
        try:
            release(tmp_path, acquire(tmp_path))
            break
        except RunHeld:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_second_process_is_refused_in_one_line_and_the_first_finishes_untouched(
    undisturbed, mnist_root, tmp_path
):
    run_dir = tmp_path / "run"
    args = [*RUN, f"paths.data_dir={mnist_root}", f"hydra.run.dir={run_dir}"]
    first = start_train(*args)
    try:
        wait_for_step(run_dir / "metrics.jsonl", 500, first)
        # Paused, it still holds the run (and writes nothing): no race with the second's start.
        first.send_signal(signal.SIGSTOP)
        record = json.loads((run_dir / LOCK_NAME).read_text())
        assert record["pid"] == first.pid
        before = files_of(run_dir)
        second = run_train(*args)
        assert second.returncode == 2, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        lines = second.stderr.strip().splitlines()
        assert lines[-1] == held_line(run_dir, first.pid, record["started"])
        # Hydra rewrote .hydra/ with the same command's config; nothing else was touched.
        assert files_of(run_dir) == before
    finally:
        first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert_same_run(undisturbed, run_dir)
    assert not (run_dir / LOCK_NAME).exists()  # released: a finished run keeps no lock file


@pytest.mark.slow  # make test-full; SIGKILL-and-resume is in make test (test_faults)
def test_killed_holders_run_is_taken_over_and_resumed(undisturbed, mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    args = [*RUN, f"paths.data_dir={mnist_root}", f"hydra.run.dir={run_dir}"]
    first = start_train(*args)
    wait_for_step(run_dir / "metrics.jsonl", 750, first)  # the step-500 checkpoint exists
    first.kill()
    first.wait()
    # The dead holder's record is still there; the kernel dropped its lock with the process.
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == first.pid
    resumed = run_train(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert_same_run(undisturbed, run_dir)
    assert not (run_dir / LOCK_NAME).exists()


@pytest.mark.slow  # make test-full: the lock's torchrun path (rank 0 holds, all stop)
def test_every_rank_of_a_refused_torchrun_launch_stops(mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fd = acquire(run_dir)  # this test holds the run, as a first launch would
    started = json.loads((run_dir / LOCK_NAME).read_text())["started"]
    try:
        proc = torchrun(
            "-m",
            "bnrepro.train",
            *RUN,
            "trainer.progress=false",
            f"paths.data_dir={mnist_root}",
            f"hydra.run.dir={run_dir}",
            timeout=300,
        )
    finally:
        release(run_dir, fd)
    assert proc.returncode != 0
    # Rank 0 tried the lock and told rank 1: both stop with the line, neither waits.
    line = held_line(run_dir, os.getpid(), started)
    assert proc.stderr.splitlines().count(line) == 2, proc.stderr[-3000:]
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "train.log"]


def sweep_subdir(*overrides: str) -> str:
    """The run directory's name a sweep job with `overrides` gets."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from bnrepro.config.resolvers import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        return cfg.hydra.sweep.subdir


@pytest.mark.slow  # make test-full: the refusal itself is tested above in make test
def test_held_job_of_a_sweep_fails_alone_and_the_sweep_goes_on(mnist_root, tmp_path):
    sweep = tmp_path / "sweep"
    job = ["experiment=mnist/baseline", "trainer.steps=100", "trainer.eval_every=50", "logger=none"]
    held, free = (sweep / sweep_subdir(*job, f"seed={seed}") for seed in (1, 2))
    held.mkdir(parents=True)
    fd = acquire(held)  # as a first sweep's job still training would
    started = json.loads((held / LOCK_NAME).read_text())["started"]
    try:
        proc = run_train(
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "seed=1,2",
            *job,
            f"paths.data_dir={mnist_root}",
            f"hydra.sweep.dir={sweep}",
        )
    finally:
        release(held, fd)
    # The held job said so at once; Hydra ran the other job, then ended the sweep with exit 1,
    # naming the held job and repeating its line (plus its HYDRA_FULL_ERROR hint), no traceback.
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    line = held_line(held, os.getpid(), started)
    report = lines.index(next(x for x in lines if x.startswith("Error executing job with")))
    assert "'seed=1'" in lines[report] and lines[report + 1] == line
    assert line in lines[:report]
    assert json.loads((free / "summary.json").read_text())["status"] == "completed"
    assert sorted(p.name for p in held.iterdir()) == [".hydra", "train.log"]
