"""The reproduction report: intervals against scipy's, the verdict rule on hand-made results
(a diverged run, a claim without data), a claim added as one record, the constants and the
provenance it prints, and `make report` reproducing the committed report and README's counts."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from scipy import stats

from bnrepro.analysis import stats as stats_module
from bnrepro.analysis.claims import CLAIMS, Claim, Finding, faster_than_inception
from bnrepro.analysis.report import (
    README_BEGIN,
    README_END,
    assess_claims,
    build_report,
    provenance,
    with_readme_counts,
)
from bnrepro.analysis.stats import (
    CONSTANTS,
    NOT_REPRODUCED,
    NOT_TESTED,
    PARTLY,
    REPRODUCED,
    Interval,
    combine,
    difference_interval,
    mean_interval,
    verdict_difference,
    verdict_no_cost,
    verdict_outcomes,
    verdict_speedup,
)
from bnrepro.errors import UserError

from .conftest import REPO


def test_mean_interval_by_hand():
    # mean 2, sd 1, t(0.975, 2) = 4.3027: half-width 4.3027 / sqrt(3) = 2.4842.
    est = mean_interval([1.0, 2.0, 3.0])
    assert (est.value, est.n) == (2.0, 3)
    assert est.high - est.value == pytest.approx(2.4842, abs=1e-4)
    assert mean_interval([5.0]) == Interval(5.0, 5.0, 5.0, 1)


def test_difference_interval_is_welchs():
    a, b = [97.1, 97.5, 97.3, 97.6, 97.2], [97.9, 98.1, 98.0, 97.8]
    est = difference_interval(a, b)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (est.low, est.high) == pytest.approx((ci.low, ci.high))
    assert est.value == pytest.approx(sum(a) / 5 - sum(b) / 4)


@pytest.mark.parametrize(
    "estimate, verdict",
    [
        (Interval(0.6, 0.3, 0.9, 5), REPRODUCED),
        (Interval(0.6, -0.1, 1.3, 5), PARTLY),
        (Interval(-0.2, -0.5, 0.1, 5), NOT_REPRODUCED),
        (Interval(0.6, 0.6, 0.6, 1), PARTLY),  # one seed: never more than partly
        (None, NOT_TESTED),
    ],
)
def test_difference_rule(estimate, verdict):
    assert verdict_difference(estimate) == verdict


def test_speedup_outcome_no_cost_and_combined_rules():
    assert verdict_speedup(Interval(3.0, 2.0, 4.0, 3)) == REPRODUCED
    assert verdict_speedup(Interval(1.5, 0.5, 2.5, 3)) == PARTLY
    assert verdict_speedup(Interval(0.8, 0.5, 1.1, 3)) == NOT_REPRODUCED
    assert [verdict_outcomes(m, 3) for m in (3, 1, 0)] == [REPRODUCED, PARTLY, NOT_REPRODUCED]
    assert verdict_outcomes(0, 0) == NOT_TESTED
    assert verdict_no_cost(Interval(-0.1, -0.4, 0.2, 6)) == REPRODUCED
    assert verdict_no_cost(Interval(-0.4, -0.9, 0.1, 6)) == PARTLY
    assert verdict_no_cost(Interval(-1.0, -1.4, -0.6, 6)) == NOT_REPRODUCED
    assert combine([REPRODUCED, REPRODUCED]) == REPRODUCED
    assert combine([REPRODUCED, NOT_REPRODUCED]) == PARTLY
    assert combine([NOT_REPRODUCED, NOT_TESTED]) == NOT_REPRODUCED
    assert combine([REPRODUCED, NOT_TESTED]) == PARTLY
    assert combine([NOT_TESTED]) == NOT_TESTED


def seed(s: int, max_acc: float, steps: int | None, status: str = "completed") -> dict:
    return {
        "seed": s,
        "status": status,
        "diverged_at_step": 300 if status == "diverged" else None,
        "max_acc": max_acc,
        "final_acc": max_acc,
        "steps_to_target": steps,
    }


def write_figure3(results: Path) -> None:
    """A hand-made small-scale Figure 3: Inception's plateau maximum 80 % (seeds 1 and 3
    reach it at step 1000, seed 2 never)."""
    per_seed = {
        "inception": [seed(1, 80.0, 1000), seed(2, 79.0, None), seed(3, 81.0, 1000)],
        "bn_baseline": [seed(1, 84.0, 500), seed(2, 85.0, 500), seed(3, 84.5, 250)],
        "bn_x5": [seed(1, 86.0, 250), seed(2, 86.5, 240), seed(3, 86.0, 260)],
        "bn_x30": [seed(1, 87.0, 250), seed(2, 88.0, 250), seed(3, 87.5, 250)],
        "bn_x5_sigmoid": [seed(1, 82.0, 750), seed(2, 60.0, None), seed(3, 83.0, 500)],
        # One seed diverged at step 300, two did not: the paper's outcome in 1 of 3.
        "inception_x5": [seed(1, 30.0, None, "diverged"), seed(2, 70.0, None), seed(3, 71.0, None)],
        "inception_sigmoid": [seed(1, 10.0, None), seed(2, 10.5, None), seed(3, 10.0, None)],
        # The dropout pair: removing dropout costs BN-x5 nothing, Inception 2 points.
        "bn_x5_dropout": [seed(1, 85.9, 300), seed(2, 86.2, 300), seed(3, 86.1, 300)],
        "inception_no_dropout": [seed(1, 78.0, None), seed(2, 77.5, None), seed(3, 78.5, None)],
    }
    rows = [{"arm": "inception", "steps_to_target": 1000}]
    (results / "fig2_small").mkdir(parents=True)
    (results / "fig2_small" / "figure3.json").write_text(
        json.dumps(
            {
                "metric": "val/acc",
                "target": 80.0,
                "rows": rows,
                "per_seed": per_seed,
                "design": "a hand-made design",
            }
        )
    )


def test_the_report_states_each_experiments_design(tmp_path):
    write_figure3(tmp_path)
    report = build_report(tmp_path)
    claims = "7, 8, 9, 10, 11, 12, 13, 14, 15"
    assert f"- Claims {claims} (`fig2_small/figure3.json`): a hand-made design" in report
    assert report.index("a hand-made design") < report.index("| 7 | BN-Baseline trains faster")


def test_verdicts_on_hand_made_results(tmp_path):
    write_figure3(tmp_path)
    rows = {row.claim.claim: row for row in assess_claims(tmp_path)}
    # No MNIST, Fashion-MNIST or grid results here: those claims are not tested.
    assert rows["BN reaches higher accuracy (MNIST)"].verdict == NOT_TESTED
    assert rows["BN trains faster (Fashion-MNIST)"].verdict == NOT_TESTED
    # Geometric means 1000 (seed 2 never reached 80 %) and (500 * 500 * 250)^(1/3) = 396.9:
    # 2.52x; Welch on log steps (df 2) gives [0.93, 6.81], which reaches below 1.
    baseline = rows["BN-Baseline trains faster than Inception"]
    assert baseline.verdict == PARTLY
    assert "2.52x [0.93, 6.81] (n=2)" in baseline.ours and "seed 2: never" in baseline.ours
    assert rows["BN-x5 trains faster than Inception"].verdict == REPRODUCED  # about 4x
    # BN-x5 loses 0.1 points without dropout, Inception 2: difference of differences 2.1.
    dropout = rows["With BN, dropout can be removed at no cost"]
    assert dropout.verdict == REPRODUCED
    assert "difference of the two 2.10 points [" in dropout.ours
    assert rows["BN-x30 reaches higher accuracy than Inception"].verdict == REPRODUCED
    assert rows["Higher learning rates train with BN (x5, x30)"].verdict == REPRODUCED
    diverged = rows["Without BN, x5 diverges"]
    assert diverged.verdict == PARTLY and diverged.ours.startswith("1 of 3 seeds diverged")
    # 60 % is below 90 % of Inception's 80 %: 2 of 3 seeds train.
    assert rows["With BN, sigmoids train"].verdict == PARTLY
    assert rows["Without BN, sigmoids do not train"].verdict == REPRODUCED
    moving = "Moving averages serve at inference as well as Algorithm 2's population statistics"
    assert rows[moving].verdict == NOT_TESTED


def spread(mean: float) -> dict:
    """A JSON entry of three seeds around `mean` (sd 0.1)."""
    return {"values": [mean - 0.1, mean, mean + 0.1]}


def follow_up_rows(results: Path) -> list:
    return [row for row in assess_claims(results) if row.claim.follow_up]


def test_follow_up_verdicts_on_hand_made_results(tmp_path):
    assert {r.verdict for r in follow_up_rows(tmp_path)} == {NOT_TESTED}
    (tmp_path / "ics").mkdir()
    arms = {}
    # Landscape per phase, (loss range, relative gradient change, beta): BN (the second arm)
    # smoother on all three in the first tenth, on two at matched loss, on none over the run.
    phases = {
        "per_seed_early": {"baseline": (2.0, 2.0, 4.0), "bn": (1.0, 1.0, 1.0)},
        "per_seed_matched": {"baseline": (2.0, 2.0, 1.0), "bn": (1.0, 1.0, 1.0)},
        "per_seed_mean": {"baseline": (1.0, 1.0, 1.0), "bn": (1.0, 1.0, 2.0)},
    }
    for arm, acc, train, l2, cos in [
        ("baseline", 97.0, 98.0, 0.010, 0.99),
        ("bn", 98.0, 99.5, 0.020, 0.98),
        ("noisy_bn", 97.8, 99.4, 0.030, 0.97),  # 0.2 below BN: within the no-cost margin
        ("noise", 95.0, 96.0, 0.030, 0.97),  # the control: the noise without BN
    ]:
        arms[arm] = {
            "final_test_acc": spread(acc),
            "final_train_acc": spread(train),
            "per_seed_mean": {
                "ics_l2": {"values": [l2, l2 * 1.01, l2 * 0.99]},
                "ics_cos": {"values": [cos, cos + 0.001, cos - 0.001]},
            },
        }
        for phase, by_arm in phases.items():
            values = by_arm.get(arm, (1.0, 1.0, 1.0))
            keys = ("loss_range", "grad_change_rel", "beta")
            measures = {k: spread(v) for k, v in zip(keys, values, strict=True)}
            arms[arm].setdefault(phase, {}).update(measures)
    ics = {"arms": arms, "matched_loss_band": [0.05, 0.1]}
    (tmp_path / "ics" / "ics.json").write_text(json.dumps(ics))
    estimates = {
        name: {
            "final_acc": spread(acc),
            "final_gap": spread(acc - 98.0),
            "gap_through_training": spread(gap),
        }
        for name, acc, gap in [("ema_0.1", 97.9, -0.5), ("algorithm2", 98.0, 0.0)]
    }
    (tmp_path / "bn_stats").mkdir()
    (tmp_path / "bn_stats" / "bn_stats.json").write_text(
        json.dumps({"batch_sizes": {"8": {"estimates": estimates}, "60": {"estimates": estimates}}})
    )
    large = {
        name: {"gap_high_rate": spread(gap), "mean_err": {"high_rate_median": spread(err)}}
        for name, gap, err in [
            ("ema_0.1", -2.0, 0.3),
            ("ema_0.01", -4.0, 0.5),
            ("cumulative", -6.0, 0.6),
            ("algorithm2", -0.1, 0.01),
        ]
    }
    (tmp_path / "bn_stats" / "large").mkdir()
    (tmp_path / "bn_stats" / "large" / "bn_stats_large.json").write_text(
        json.dumps(
            {
                "estimates": large,
                "high_rate_steps": [24, 32, 120],
                "warmup_steps": 20,
                "batch_size": 2048,
                "peak_lr": 0.768,
            }
        )
    )
    errors = {"bn": (30.0, 3.0), "batch_renorm": (10.0, 3.1), "group_norm": (5.0, 3.2)}
    wu_he = {n: {"2": spread(e2), "32": spread(e32)} for n, (e2, e32) in errors.items()}
    wu_he["layer_norm"] = {"2": spread(6.0), "32": spread(3.0)}  # equal to BN's at 32
    ghost = {
        "bn": {"2": spread(20.0), "4": spread(12.0), "32": spread(3.0)},
        "batch_renorm": {"2": spread(9.0), "4": spread(5.0), "32": spread(3.1)},
    }
    (tmp_path / "batch_size_conv").mkdir()
    (tmp_path / "batch_size_conv" / "batch_size_conv.json").write_text(
        json.dumps({"designs": {"wu_he": wu_he, "ghost": ghost}})
    )

    rows = {r.claim.claim: r for r in follow_up_rows(tmp_path)}
    noisy = rows["Noisy BN (unstable distributions) trains about as well as BN, better than no BN"]
    assert noisy.verdict == REPRODUCED
    assert rows["BN does not reduce internal covariate shift"].verdict == REPRODUCED
    smoother = rows["BN makes the loss landscape smoother"]
    assert smoother.verdict == PARTLY  # one phase of three reproduced, one partly, one not
    assert "first tenth of training: " in smoother.ours and "(reproduced)" in smoother.ours
    assert "matched training loss (batch loss 0.05-0.1)" in smoother.ours
    assert "whole run: " in smoother.ours and "(not reproduced)" in smoother.ours
    assert "noisy BN - noise without BN: 2.80 points" in noisy.ours
    assert (
        rows["EMA statistics trail the weights: precise BN tests better through training"].verdict
        == REPRODUCED
    )
    ema = rows["EMA statistics trail the weights: precise BN tests better through training"]
    assert "mean of the 3 evaluations at steps 24-120 (after the 20-step warm-up)" in ema.ours
    renorm = rows["Batch Renorm beats BN with small batches"]
    assert renorm.verdict == REPRODUCED and "micro-batches of 4: 7.00" in renorm.ours
    assert rows["BN's error rises as the batch shrinks; GroupNorm's does not"].verdict == REPRODUCED
    usual = rows["At the usual batch size BN is at least as good as GroupNorm and LayerNorm"]
    assert usual.verdict == PARTLY and "LN - BN: 0.00" in usual.ours
    moving = "Moving averages serve at inference as well as Algorithm 2's population statistics"
    assert {r.claim.claim: r for r in assess_claims(tmp_path)}[moving].verdict == REPRODUCED


def test_make_report_reproduces_the_committed_report_and_readme_counts(tmp_path):
    """`make report` on the committed results gives the committed REPORT.md byte for byte, and
    rewrites a stale README block into the committed README's: its counts are current."""
    readme = (REPO / "README.md").read_text()
    begin, end = readme.index(README_BEGIN), readme.index(README_END)
    stale = readme[: begin + len(README_BEGIN)] + "\n- 99 reproduced\n" + readme[end:]
    (tmp_path / "README.md").write_text(stale)
    out = tmp_path / "results" / "REPORT.md"  # as results/REPORT.md lies beside README.md
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/make_report.py",
            "--results",
            "results",
            "--out",
            str(out),
            "--readme",
            str(tmp_path / "README.md"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == (REPO / "results" / "REPORT.md").read_bytes()
    assert (tmp_path / "README.md").read_text() == readme
    assert "10 reproduced, 4 partly, 2 not reproduced, 1 not tested here" in readme


def test_report_lists_every_constant_of_the_rule():
    report = (REPO / "results" / "REPORT.md").read_text()
    names = {name for name, _, _ in CONSTANTS}
    # Every upper-case number in stats.py is a constant of the rule: none left out of the list.
    assert names == {
        k for k, v in vars(stats_module).items() if k.isupper() and isinstance(v, int | float)
    }
    for name, value, _ in CONSTANTS:
        assert getattr(stats_module, name) == value
        assert f"- `{name}` = {value!r}: " in report


def test_a_claim_added_in_process_is_rendered(tmp_path):
    """Adding a claim is one record: here one reusing an estimator, and one with its own."""
    write_figure3(tmp_path)
    new = [
        Claim(
            96,
            "BN-x5-Sigmoid trains faster than Inception",
            "4.2.2, Fig. 3",
            "no number",
            ("fig2_small/figure3.json",),
            partial(faster_than_inception, "bn_x5_sigmoid"),
            "fig2_small/figure2.png",
            "make reproduce-fig2-small",
        ),
        Claim(
            97,
            "Inception's best is at least 80 %",
            "made up",
            "80 %",
            ("fig2_small/figure3.json",),
            lambda figure3: Finding(f"{figure3['target']:g} %", REPRODUCED),
            "",
            "make reproduce-fig2-small",
            follow_up=True,
        ),
    ]
    report = build_report(tmp_path, [*CLAIMS, *new])
    # 1000 / sqrt(750 * 500) = 1.63 (seed 2 never reached 80 %): above 1, its interval not.
    assert (
        "| 96 | BN-x5-Sigmoid trains faster than Inception | 4.2.2, Fig. 3 | no number | 1.63x "
    ) in report
    row_27 = "| 97 | Inception's best is at least 80 % | made up | 80 % | 80 % | **reproduced** |"
    assert row_27 in report
    # The counts include them: 9 claims from figure3.json above, plus 96 (partly).
    paper, follow_up = report.split("## Follow-up claims")
    assert "Verdicts: 6 reproduced, 4 partly, 0 not reproduced, 8 not tested here." in paper
    assert "Verdicts: 1 reproduced, 0 partly, 0 not reproduced, 8 not tested here." in follow_up
    assert "| `fig2_small/` | 7, 8, 9, 10, 11, 12, 13, 14, 15, 96, 97 | 0 |" in report
    with pytest.raises(ValueError, match="claim number 96 is used twice"):
        build_report(tmp_path, [*CLAIMS, new[0], new[0]])


def test_provenance_names_each_folders_commits(tmp_path):
    """Per results folder, the commits of its runs' summaries; older runs: "not recorded"."""
    for name, origin in [
        ("a", {"commit": "abc1234", "dirty": True, "torch": "2.5.1"}),
        ("b", {"commit": "def5678", "dirty": False, "torch": "2.5.1"}),
        ("c", None),  # a run made before summaries recorded provenance
    ]:
        run = tmp_path / "ics" / "runs" / name
        run.mkdir(parents=True)
        summary = {"arm": "bn", "seed": 1, "status": "completed", "device": "cpu"}
        (run / "summary.json").write_text(json.dumps(summary | {"provenance": origin}))
        (run / "metrics.jsonl").write_text("")
    rows = {line.split(" | ")[0]: line for line in provenance(tmp_path)}
    assert rows["| `ics/`"] == (
        "| `ics/` | 18, 19, 20, 26 | 3 | abc1234+dirty, def5678, not recorded "
        "| 2.5.1, not recorded | cpu |"
    )
    assert rows["| `mnist/`"].endswith("| 0 | - | - | - |")  # no runs there


def test_readme_without_the_block_is_one_line_error():
    with pytest.raises(UserError, match="README has no verdict-count block"):
        with_readme_counts("# a README\n", "- 1 reproduced")
    assert with_readme_counts(f"a\n{README_BEGIN}\nold\n{README_END}\nb\n", "new") == (
        f"a\n{README_BEGIN}\nnew\n{README_END}\nb\n"
    )
