"""Issue 21's protocol for Figures 2 and 3 at small scale: the validation split, the
interpolated crossing, the plateau rule (and the trainer stopping on it), the speed-up
estimator over both arms' seeds, and the learning-rate search read from its runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnrepro.analysis.stats import crossing_step, difference_of_differences, ratio_interval
from bnrepro.config.schema import PlateauConfig
from bnrepro.data.mnist import indices_digest, load_mnist, validation_split
from bnrepro.errors import DataError
from bnrepro.training.plateau import plateaued

from .conftest import REPO, run_train

# The Fashion-MNIST split of configs/experiment/fig2_small/_base.yaml (val_size 5000,
# val_seed 0), as its summaries record it: a change to the split changes this digest.
FASHION_SPLIT_DIGEST = "bd15133ce702"


def test_crossing_is_interpolated_between_the_evaluations_around_it():
    curve = [(0, 10.0), (100, 50.0), (200, 90.0), (300, 95.0)]
    assert crossing_step(curve, 70.0) == pytest.approx(150.0)
    assert crossing_step(curve, 90.0) == 200.0  # exactly at an evaluation
    assert crossing_step(curve, 5.0) == 0.0  # the first evaluation is already there
    assert crossing_step(curve, 96.0) is None  # never
    # The first crossing counts, not a later one after a dip.
    assert crossing_step([(0, 10.0), (100, 60.0), (200, 40.0), (300, 80.0)], 50.0) == (
        pytest.approx(80.0)
    )


def test_plateau_rule_on_hand_made_curves():
    rule = PlateauConfig(window=0.25, min_gain=0.2, min_steps=400)

    def line(slope: float, until: int) -> list[tuple[int, float]]:
        return [(s, 50.0 + slope * s) for s in range(0, until + 1, 100)]

    # Flat from the start: plateaued once min_steps is reached, not before.
    assert not plateaued(line(0.0, 300), rule)
    assert plateaued(line(0.0, 400), rule)
    # At step 800 the last quarter (600-800) gained 0.22 points: not < 0.2; 0.18: plateaued.
    assert not plateaued(line(0.0011, 800), rule)
    assert plateaued(line(0.0009, 800), rule)
    # The best so far, not the last value: a drop at the end is no gain, a lone spike counts.
    assert plateaued([*line(0.0, 700), (800, 40.0)], rule)
    assert not plateaued([*line(0.0, 700), (800, 51.0)], rule)
    assert not plateaued([], rule)


def test_speedup_interval_uses_every_seed_of_both_arms():
    """Hand-computed: each arm's log steps spread by +-0.2 around ln 1000 and ln 250, so the
    ratio is 4, se = sqrt(0.04 / 3 * 2) = 0.1633 with Welch's df = 4 (t = 2.776): the interval
    is 4 exp(-+0.4534) = [2.542, 6.295]. Without the slow arm's spread it is another one."""
    spread = [0.0, 0.2, -0.2]
    slow = [1000 * math.exp(e) for e in spread]
    fast = [250 * math.exp(e) for e in spread]
    r = ratio_interval(slow, fast)
    assert (r.value, r.low, r.high) == pytest.approx((4.0, 2.542, 6.295), abs=1e-3)
    assert r.n == 3
    fixed = ratio_interval([1000.0] * 3, fast)
    assert fixed.value == pytest.approx(4.0) and (fixed.low, fixed.high) != pytest.approx(
        (r.low, r.high), abs=1e-3
    )
    assert ratio_interval([], fast) is None and ratio_interval(slow, []) is None


def seed(number: int, *, steps: float | None, max_acc: float, final: float, status="completed"):
    return {
        "seed": number,
        "steps_to_target": steps,
        "max_acc": max_acc,
        "final_acc": final,
        "status": status,
    }


def test_an_arm_that_never_reaches_the_target_is_not_faster_and_chance_is_a_failure():
    """Rows 9 and 12 on hand-made per-seed results: a faster arm none of whose seeds reaches
    the target is "not reproduced" (not "not tested"); Inception-x5 fails when it diverges or
    ends at chance (a dead ReLU network's loss never diverges)."""
    from bnrepro.analysis.claims import faster_than_inception, inception_x5_diverges
    from bnrepro.analysis.stats import NOT_REPRODUCED, PARTLY

    figure3 = {
        "target": 86.0,
        "per_seed": {
            "inception": [seed(i, steps=5000.0 + i, max_acc=87, final=86) for i in (1, 2, 3)],
            "bn_x30": [seed(i, steps=None, max_acc=85, final=84) for i in (1, 2, 3)],
            "inception_x5": [
                seed(1, steps=None, max_acc=57, final=10.0),
                seed(2, steps=None, max_acc=11, final=10.0, status="diverged"),
                seed(3, steps=None, max_acc=68, final=34.8),
            ],
        },
    }
    x30 = faster_than_inception("bn_x30", figure3)
    assert x30.verdict == NOT_REPRODUCED and "no seed of the faster arm reached" in x30.ours
    x5 = inception_x5_diverges(figure3)
    assert x5.verdict == PARTLY and x5.ours.startswith("2 of 3 seeds diverged or ended at chance")


def test_difference_of_differences():
    d = difference_of_differences(
        [2.0, 2.2, 1.8], [1.0, 1.1, 0.9], [0.0, 0.1, -0.1], [2.0, 2.1, 1.9]
    )
    assert d.value == pytest.approx((2.0 - 1.0) - (0.0 - 2.0))
    assert d.low < d.value < d.high and d.n == 3


def test_validation_split_is_fixed_balanced_and_disjoint(fashion_root):
    labels = load_mnist(fashion_root, download=False, dataset="fashion_mnist").train_y
    train, val = validation_split(labels, 5000, 0)
    again_train, again_val = validation_split(labels, 5000, 0)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)
    assert len(val) == 5000 and len(train) == 55_000
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(60_000))
    assert torch.bincount(labels[val]).tolist() == [500] * 10
    assert indices_digest(val) == FASHION_SPLIT_DIGEST
    assert indices_digest(validation_split(labels, 5000, 1)[1]) != FASHION_SPLIT_DIGEST
    with pytest.raises(DataError, match="val_size=5005"):
        validation_split(labels, 5005, 0)


def read_summary(run_dir: Path) -> dict:
    return json.loads(next(run_dir.rglob("summary.json")).read_text())


def test_trainer_stops_at_a_plateau_and_reads_the_test_set_once(tmp_path):
    """The MLP with a validation split: a plateau rule that always holds ends the run at
    min_steps; one that never holds runs to the cap. Validation at every evaluation, the test
    set at the last one only; a rerun says already finished."""
    common = [
        "experiment=mnist/bn",
        "+data.val_size=5000",  # absent from data/mnist.yaml: Figure 1 has no split
        "trainer.steps=60",
        "trainer.eval_every=20",
        "logger=none",
    ]
    results = {}
    for name, gain in (("plateau", 100.0), ("cap", 0.0)):
        run_dir = tmp_path / name
        args = [
            *common,
            f"+trainer.plateau={{window: 0.25, min_gain: {gain}, min_steps: 40}}",
            f"hydra.run.dir={run_dir}",
        ]
        proc = run_train(*args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = (read_summary(run_dir), args, run_dir)
    summary, args, run_dir = results["plateau"]
    assert (summary["steps"], summary["plateau_step"], summary["stopped_by"]) == (40, 40, "plateau")
    assert summary["validation"]["size"] == 5000 and "best_val_acc" in summary
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [m for m in metrics if "val/acc" in m]
    assert [m["step"] for m in evaluations] == [0, 20, 40]
    assert [m["step"] for m in metrics if "test/acc" in m] == [40]
    assert summary["final_test_acc"] == evaluations[-1]["test/acc"]
    cap = results["cap"][0]
    assert (cap["steps"], cap["plateau_step"], cap["stopped_by"]) == (60, None, "step cap")
    again = run_train(*args)
    assert again.returncode == 0 and "already finished" in again.stderr + again.stdout


def fake_search_run(root: Path, lr: float, accs: list[float], status: str = "completed") -> None:
    run = root / f"lr_search_{lr}-seed1"
    run.mkdir(parents=True)
    summary = {
        "arm": f"lr_search_{lr}",
        "seed": 1,
        "status": status,
        "steps": 100 * (len(accs) - 1),
        "diverged_at_step": 100 * len(accs) if status == "diverged" else None,
        "settings": {"lr": lr},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    lines = [json.dumps({"step": 100 * i, "val/acc": a}) for i, a in enumerate(accs)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_lr_search_winner_is_read_from_its_runs(tmp_path):
    runs = tmp_path / "runs"
    fake_search_run(runs, 0.0015, [10.0, 60.0, 70.0])
    fake_search_run(runs, 0.003, [10.0, 65.0, 78.0])  # the best that trained
    fake_search_run(runs, 0.006, [10.0, 70.0, 75.0])
    fake_search_run(runs, 0.012, [10.0, 80.0], status="diverged")  # higher, but diverged
    fake_search_run(runs, 0.024, [10.0, 10.2, 10.1])  # never above chance
    fake_search_run(runs, 0.048, [10.0, 85.0, 10.0])  # the highest max, but ends at chance
    out = tmp_path / "out"
    script = str(REPO / "scripts" / "make_lr_search.py")
    proc = subprocess.run(
        [sys.executable, script, "--runs", str(runs), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "lr_search.json").read_text())
    assert result["winner"] == 0.003 and result["stops_training_at"] == 0.012
    assert not result["winner_at_grid_edge"]
    assert (out / "lr_search.png").stat().st_size > 10_000
    printed = subprocess.run(
        [sys.executable, script, "--winner", str(out / "lr_search.json")],
        capture_output=True,
        text=True,
    )
    assert printed.stdout.strip() == "0.003"
    # The landscape's step range (the ICS search): from 0.5 x lr, doubling, up to the highest
    # rate that trains below the lowest failing one above the winner (0.006, as 6 x 0.001).
    scales = subprocess.run(
        [sys.executable, script, "--scales", "0.001", str(out / "lr_search.json")],
        capture_output=True,
        text=True,
    )
    assert scales.stdout.strip() == "[0.5,1,2,4,6]", scales.stderr
    missing = subprocess.run(
        [sys.executable, script, "--winner", str(tmp_path / "none.json")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "run the search first" in missing.stderr


def test_the_sweep_takes_its_rate_from_the_search():
    """make reproduce-fig2-small runs the search first and passes its winner on."""
    proc = subprocess.run(
        ["make", "-n", "reproduce-fig2-small", "PY=python3", "INSTALLED="],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    search = next(i for i, line in enumerate(lines) if "experiment=fig2_small/lr_search" in line)
    sweep = next(i for i, line in enumerate(lines) if "fig2_small/bn_x5_dropout" in line)
    assert search < sweep
    assert "optim.base_lr=$(python3 scripts/make_lr_search.py --winner" in lines[sweep]


def test_only_finished_runs_are_collected(tmp_path):
    """A sweep stopped part-way: its finished runs go to results/, a preempted one stays for
    the same command to resume."""
    sweep = tmp_path / "sweep"
    fake_search_run(sweep, 0.003, [10.0, 70.0])
    fake_search_run(sweep, 0.006, [10.0, 70.0], status="diverged")
    fake_search_run(sweep, 0.012, [10.0, 40.0], status="preempted")
    out = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "collect_runs.py"), str(sweep), str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "lr_search_0.003-seed1",
        "lr_search_0.006-seed1",
    ]
    assert "not collected (preempted, unfinished)" in proc.stdout
