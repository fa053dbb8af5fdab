"""Idempotent runs and sweeps, with real processes: a run directory is named by what defines
its result, so the same command run again skips finished runs, resumes unfinished ones from
their checkpoints and starts missing ones."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, run_train
from .test_faults import metrics_files

SWEEP = [
    "-m",
    "experiment=mnist/bn",
    "seed=1,2,3,4",
    "trainer.steps=400",
    "trainer.eval_every=100",
    "trainer.checkpoint_every=100",
    "model.bn.population_batches=10",
    "logger=wandb",
]


def job_dir(sweep: Path, seed: int) -> Path:
    (found,) = sweep.glob(f"bn-seed{seed}-*")
    return found


def wait_for(path_glob: tuple[Path, str], text: str, proc: subprocess.Popen, timeout=300) -> None:
    folder, pattern = path_glob
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in p.read_text() for p in folder.glob(pattern) if p.is_file()):
            return
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {folder}/{pattern}")


def test_same_settings_same_directory_and_speed_settings_do_not_count(tmp_path):
    from hydra import compose, initialize_config_dir

    from bnrepro.config.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):

        def run_dir(*overrides: str) -> str:
            overrides = ("experiment=mnist/bn", *overrides)
            return compose(
                "train", overrides=list(overrides), return_hydra_config=True
            ).hydra.run.dir

        base = run_dir()
        assert Path(base).name.startswith("bn-seed1-")
        assert run_dir("trainer.progress=false", "trainer.num_threads=2", "logger=none") == base
        assert run_dir(f"paths.data_dir={tmp_path}") == base
        for changed in ("seed=2", "optim.lr=0.5", "trainer.steps=10", "model.bn.stats=ema"):
            assert run_dir(changed) != base, changed


# 25-65 s: in make test-full, to keep make test within 5 minutes (issue 21 added tests)
@pytest.mark.slow
def test_killed_sweep_resumes_without_retraining_finished_jobs(mnist_root, tmp_path):
    data = f"paths.data_dir={mnist_root}"
    reference = tmp_path / "reference"
    proc = run_train(*SWEEP, data, f"hydra.sweep.dir={reference}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    sweep = tmp_path / "sweep"
    args = [*SWEEP, data, f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(  # -m must come before the overrides
        [sys.executable, "-m", "bnrepro.train", *args, "trainer.progress=false"],
        cwd=REPO,
        env=os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for((sweep, "bn-seed3-*/metrics.jsonl"), '"step": 200,', proc)
    proc.kill()
    proc.wait()
    finished = {s: (job_dir(sweep, s) / "metrics.jsonl").stat().st_mtime_ns for s in (1, 2)}
    assert not list(sweep.glob("bn-seed4-*/summary.json"))  # killed before the last job

    rerun = run_train(*args, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = rerun.stdout + rerun.stderr
    assert log.count("already finished") == 2 and log.count("resuming from") == 1
    for seed, mtime in finished.items():  # not retrained, not even rewritten
        assert (job_dir(sweep, seed) / "metrics.jsonl").stat().st_mtime_ns == mtime
    for seed in (1, 2, 3, 4):  # every job as an uninterrupted sweep made it, to the byte
        assert metrics_files(job_dir(sweep, seed)) == metrics_files(job_dir(reference, seed))
    # The interrupted job's W&B run continued under its id.
    runs = list(job_dir(sweep, 3).glob("wandb/offline-run-*"))
    assert len(runs) == 2 and len({p.name.rsplit("-", 1)[1] for p in runs}) == 1

    again = run_train(*args, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("already finished") == 4


def make_reproduce(tmp_path: Path, mnist_root: Path) -> list[str]:
    return [
        "make",
        "--no-print-directory",
        "reproduce-mnist",
        f"SWEEP_DIR={tmp_path / 'sweep'}",
        f"MNIST_RESULTS={tmp_path / 'results'}",
        "SEEDS=[1,2]",
        "JOBS=1",
        f"PY={sys.executable}",
        "ARGS=trainer.steps=900 trainer.eval_every=300 trainer.checkpoint_every=300 "
        f"logger=none trainer.progress=false paths.data_dir={mnist_root}",
    ]


# The killed-sweep test above checks the same contract in-process, faster (make test).
@pytest.mark.slow
def test_make_reproduce_mnist_after_a_kill_and_again(mnist_root, tmp_path):
    command = make_reproduce(tmp_path, mnist_root)
    env = os.environ | {"WANDB_MODE": "offline"}
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL
    )
    sweep = tmp_path / "sweep"
    # Step 600 is logged after the step-300 checkpoint was written: there is one to resume.
    wait_for((sweep, "bn-seeds1-2-*/seed1/metrics.jsonl"), '"step": 600,', proc)
    os.killpg(proc.pid, signal.SIGKILL)  # make, the launcher and its worker
    proc.wait()
    (baseline,) = sweep.glob("baseline-seeds1-2-*")
    mtime = (baseline / "seed1" / "metrics.jsonl").stat().st_mtime_ns

    for expected in ("resuming from", "already finished"):
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        log = done.stdout + done.stderr
        assert expected in log and "wrote" in log  # the figure is rebuilt every time
        assert (baseline / "seed1" / "metrics.jsonl").stat().st_mtime_ns == mtime
    assert log.count("already finished") == 2
    assert (tmp_path / "results" / "figure1.png").is_file()
