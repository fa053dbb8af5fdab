"""The MNIST variant grid: the groups compose into one sweep, and its figure script builds the
Figure 3-style table from the logs of those real runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bnrepro.analysis.runs import find_runs

from .conftest import REPO, run_train


# 28 s: in make test-full, to keep make test within 5 minutes
@pytest.mark.slow
def test_grid_sweep_and_table(mnist_root, tmp_path):
    sweep, stored, out = tmp_path / "sweep", tmp_path / "runs", tmp_path / "out"
    proc = run_train(
        "-m",
        "experiment=mnist/grid",
        "norm=none,bn",
        "lr_mult=x1,x30",
        "activation=relu",
        "trainer.steps=300",
        "trainer.eval_every=100",
        "logger=none",
        "model.bn.population_batches=5",
        f"paths.data_dir={mnist_root}",
        f"hydra.sweep.dir={sweep}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = find_runs(sweep)
    assert sorted(r.arm for r in runs) == [
        "bn_x1_relu_drop0.0",
        "bn_x30_relu_drop0.0",
        "none_x1_relu_drop0.0",
        "none_x30_relu_drop0.0",
    ]
    lrs = {r.arm: r.metrics[-1]["train/lr"] for r in runs if r.summary["status"] == "completed"}
    assert lrs["bn_x30_relu_drop0.0"] == 30 * lrs["bn_x1_relu_drop0.0"]

    python = sys.executable
    subprocess.run(
        [python, "scripts/collect_runs.py", str(sweep), str(stored)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    build = subprocess.run(
        [
            python,
            "scripts/make_mnist_grid.py",
            "--runs",
            str(stored),
            "--out",
            str(out),
            "--target",
            "90",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    assert (out / "grid.png").stat().st_size > 10_000
    rows = {row["arm"]: row for row in json.loads((out / "grid.json").read_text())["rows"]}
    for run in runs:
        row = rows[run.arm]
        assert row["diverged"] == (run.summary["status"] == "diverged")
        accs = [m["test/acc"] for m in run.metrics if m.get("test/acc") is not None]
        assert row["max_acc"] == max(accs)
        reached = [m["step"] for m in run.metrics if (m.get("test/acc") or 0) >= 90]
        assert row["steps_to_target"] == (reached[0] if reached else None)
    assert "| bn_x1_relu_drop0.0 |" in (out / "grid.md").read_text()
