"""Issue 13's experiments end to end, shortened: the entrypoint's sweep, the run logs, the
figure scripts' PNG and JSON. The make targets run the same commands at full length."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bnrepro.analysis.runs import find_runs

from .conftest import REPO, run_train

SHORT = ("logger=none", "trainer.eval_at_start=true")


def make_figure(script: str, runs, out) -> dict:
    proc = subprocess.run(
        [sys.executable, f"scripts/{script}", "--runs", str(runs), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(next(out.glob("*.json")).read_text())


# 25-65 s: in make test-full, to keep make test within 5 minutes (issue 21 added tests)
@pytest.mark.slow
def test_ics_experiment_logs_the_measures_and_plots_them(tmp_path, mnist_root):
    sweep = tmp_path / "ics"
    proc = run_train(
        "-m",
        "experiment=ics/baseline,ics/bn,ics/noisy_bn",
        "seeds=[1,2]",
        "trainer.steps=40",
        "trainer.eval_every=20",
        "++trainer.ics.every=10",  # ++: the first composition (no experiment yet) has no ics
        f"paths.data_dir={mnist_root}",
        f"hydra.sweep.dir={sweep}",
        *SHORT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = find_runs(sweep)
    assert sorted({r.arm for r in runs}) == ["baseline", "bn", "noisy_bn"] and len(runs) == 6
    measured = [m["step"] for m in runs[0].metrics if "ics/h2/l2" in m]
    assert measured == [0, 10, 20, 30]
    data = make_figure("make_ics_figure.py", sweep, tmp_path / "out")
    assert (tmp_path / "out" / "ics.png").stat().st_size > 10_000
    bn = data["arms"]["bn"]
    assert len(bn["per_seed_mean"]["beta"]["values"]) == 2
    assert all(0 < c <= 1 for c in bn["per_seed_mean"]["ics_cos"]["values"])


COMMON = ("seeds=[1,2]", "epochs=1", "train_examples=1200")


# 25-65 s: in make test-full, to keep make test within 5 minutes (issue 21 added tests)
@pytest.mark.slow
def test_bn_stats_experiment_evaluates_every_estimate_and_plots(tmp_path, mnist_root):
    """Two batch sizes; the estimates are all evaluated, precise BN's gap is 0."""
    stats_sweep = tmp_path / "bn_stats"
    proc = run_train(
        "-m",
        "experiment=bn_stats/bn",
        "data.batch_size=150,600",  # a precise-BN pass: 400 and 100 batches
        f"hydra.sweep.dir={stats_sweep}",
        "trainer.bn_stats_probe.population_batches=3",
        "trainer.eval_every=25",  # at step 0 and the end: a precise-BN pass is 60,000 images
        *COMMON,
        f"paths.data_dir={mnist_root}",
        *SHORT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = make_figure("make_bn_stats_figure.py", stats_sweep, tmp_path / "stats_out")
    assert set(data["batch_sizes"]) == {"150", "600"}
    estimates = data["batch_sizes"]["150"]["estimates"]
    assert set(estimates) == {"ema_0.1", "ema_0.01", "cumulative", "algorithm2", "precise"}
    assert estimates["precise"]["final_gap"]["values"] == [0.0, 0.0]
    # The run's own evaluation uses torch's EMA 0.1: the probe's ema_0.1 matches it.
    for run in find_runs(stats_sweep):
        last = run.metrics[-1]
        assert last["bn_stats/ema_0.1/test_acc"] == pytest.approx(last["test/acc"], abs=0.02)


# The training path is every other MNIST run's with another norm (tests/test_norms.py): the
# sweep and its figure only in `make test-full`, for CI time.
@pytest.mark.slow
def test_batch_size_experiment_runs_and_plots(tmp_path, mnist_root):
    size_sweep = tmp_path / "batch_size"
    proc = run_train(
        "-m",
        "experiment=batch_size/grid",
        "data.batch_size=8,32",
        "norm=batch_renorm_scaled,layer_norm",
        f"hydra.sweep.dir={size_sweep}",
        *COMMON,
        f"paths.data_dir={mnist_root}",
        *SHORT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = make_figure("make_batch_size_figure.py", size_sweep, tmp_path / "size_out")
    assert set(data["norms"]) == {"batch_renorm", "layer_norm"}
    assert set(data["norms"]["layer_norm"]) == {"8", "32"}
    assert data["epochs_and_lr_at_60"] == [[1, 0.1]]
    steps = {r.arm: r.summary["steps"] for r in find_runs(size_sweep)}
    assert steps["batch_renorm_b8"] == 150 and steps["layer_norm_b32"] == 37  # 1200 examples' worth


def test_committed_batch_size_numbers_are_rebuilt_from_the_committed_run_logs(tmp_path):
    """What `make figures` does (the sweep's own test is slow): the plotted numbers come back
    byte for byte from runs/. The other two scripts run on fresh sweeps above."""
    name = "batch_size"
    results = REPO / "results" / name
    make_figure("make_batch_size_figure.py", results / "runs", tmp_path)
    assert (tmp_path / f"{name}.json").read_bytes() == (results / f"{name}.json").read_bytes()
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000


# Issue 22's designs, shortened: the conv net in both designs, and BN-Inception's statistics at
# a large batch. In `make test-full` (each about a minute on 2 cores).
CONV_SHORT = ("seeds=[1,2]", "epochs=1", "data.train_size=400", "data.val_size=200")


@pytest.mark.slow
def test_batch_size_conv_designs_run_and_plot(tmp_path, fashion_root):
    sweep = tmp_path / "batch_size_conv"
    data_dir = f"paths.data_dir={fashion_root}"
    for overrides in (
        ("experiment=batch_size_conv/wu_he", "data.batch_size=4,32", "norm=bn,group_norm"),
        (
            "experiment=batch_size_conv/ghost",
            "norm=bn,batch_renorm_scaled",
            "+model.bn.ghost_batch=4",
        ),
    ):
        proc = run_train(
            "-m", *overrides, f"hydra.sweep.dir={sweep}", *CONV_SHORT, data_dir, *SHORT
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    data = make_figure("make_batch_size_conv_figure.py", sweep, tmp_path / "out")
    wu_he, ghost = data["designs"]["wu_he"], data["designs"]["ghost"]
    assert set(wu_he) == {"bn", "group_norm"} and set(wu_he["bn"]) == {"4", "32"}
    # The ghost design's g = 32 is Wu & He's batch-32 run; g = 4 its own.
    assert set(ghost["bn"]) == {"4", "32"} and set(ghost["batch_renorm"]) == {"4"}
    assert ghost["bn"]["32"] == wu_he["bn"]["32"]
    assert data["epochs_train_size_lr_at_32"] == [[1, 400, 0.1]]
    steps = {r.arm: r.summary["steps"] for r in find_runs(sweep)}
    assert steps["bn_b4"] == 100 and steps["bn_g4"] == steps["group_norm_b32"] == 12


@pytest.mark.slow
def test_bn_stats_at_a_large_batch_records_layer_errors_and_plots(tmp_path, fashion_root):
    sweep = tmp_path / "bn_stats_large"
    proc = run_train(
        "-m",
        "experiment=bn_stats_large/bn",
        "seeds=[1,2]",
        "data.batch_size=64",
        "data.train_size=640",
        "data.val_size=200",
        "trainer.steps=6",
        "trainer.eval_every=2",
        "optim.schedule.warmup_steps=3",
        "trainer.bn_stats_probe.population_batches=2",
        f"hydra.sweep.dir={sweep}",
        f"paths.data_dir={fashion_root}",
        *SHORT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = make_figure("make_bn_stats_large_figure.py", sweep, tmp_path / "out")
    assert data["high_rate_steps"] == [4, 6] and data["warmup_steps"] == 3
    est = data["estimates"]
    assert est["precise"]["gap_high_rate"]["values"] == [0.0, 0.0]
    layers = len(est["ema_0.1"]["mean_err"]["per_layer_high_rate"][0])
    assert layers == 69  # every BN layer of the scaled BN-Inception
    # The cumulative average and Algorithm 2 sit far closer to precise BN than the EMAs right
    # after the start (every layer's EMA still holds most of its initial 0 / 1).
    assert (
        est["cumulative"]["mean_err"]["high_rate_median"]["mean"]
        < est["ema_0.01"]["mean_err"]["high_rate_median"]["mean"]
    )


def test_committed_bn_stats_large_numbers_are_rebuilt_from_the_committed_run_logs(tmp_path):
    """`make figures` on the committed BN-Inception runs at batch 2048 gives their JSON back."""
    results = REPO / "results" / "bn_stats" / "large"
    make_figure("make_bn_stats_large_figure.py", results / "runs", tmp_path)
    name = "bn_stats_large.json"
    assert (tmp_path / name).read_bytes() == (results / name).read_bytes()
    data = json.loads((tmp_path / name).read_text())
    assert data["batch_size"] == 2048 and len(data["seeds"]) == 3
    assert len(data["estimates"]["ema_0.1"]["mean_err"]["per_layer_high_rate"][0]) == 69
