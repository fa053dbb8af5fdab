"""The reproduction report: each claim of the paper, our number with a 95 % confidence interval
over seeds, and a verdict by a stated rule (`make report` writes results/REPORT.md).

It reads only the committed results (results/*/figure*.json and the run logs stored beside
them); it trains nothing, and the same results give the same report byte for byte. The rule
lives in `VERDICT_RULE` and in the `verdict_*` functions below, which tests/test_report.py
checks on hand-made results; nobody picks a verdict by hand.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy import stats

from bnrepro.analysis.runs import find_runs

REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_TESTED = (
    "reproduced",
    "partly",
    "not reproduced",
    "not tested here",
)
CHANCE = 10.0  # % accuracy of a guess among MNIST's and Fashion-MNIST's 10 classes
NO_COST_MARGIN = 0.5  # accuracy points: "costs nothing" tolerates a loss smaller than this
TRAINS_FRACTION = 0.9  # "trains": a max accuracy of at least this share of Inception's best
CHANCE_MARGIN = 1.0  # "never above chance": max accuracy within this of chance

VERDICT_RULE = f"""\
Every number is over the seeds of the committed runs; intervals are 95 % Student-t
intervals (Welch's for a difference of two arms, paired where the runs pair up).

- **Difference** ("BN gives higher accuracy", "BN's input distribution drifts less"): the
  interval of the difference lies wholly on the paper's side of 0: *reproduced*; the estimate
  is on the paper's side but the interval reaches 0: *partly*; otherwise *not reproduced*.
- **Speed-up** (fewer steps to a target accuracy): per seed of the faster arm, the other arm's
  steps to the target divided by this seed's (a seed that never reaches it counts as 0).
  Interval above 1: *reproduced*; mean above 1: *partly*; otherwise *not reproduced*.
- **Outcome** (diverges; trains, i.e. reaches {TRAINS_FRACTION:.0%} of Inception's best
  accuracy; stays within {CHANCE_MARGIN:g} point of chance, {CHANCE:g} %): every seed shows
  the paper's outcome: *reproduced*; some do: *partly*; none: *not reproduced*.
- **No cost** (removing dropout costs nothing; noisy BN trains as well as BN; moving averages
  serve as well as Algorithm 2): the interval of (the cheaper or perturbed arm - the other)
  lies above -{NO_COST_MARGIN:g} points: *reproduced*; it lies wholly below: *not reproduced*;
  otherwise *partly*.
- A claim with several parts is *reproduced* when all parts are, *not reproduced* when none
  is, and *partly* otherwise. No committed result for it: *not tested here*.
"""


@dataclass(frozen=True)
class Interval:
    """An estimate with its 95 % interval (low == high == value when n < 2 or no spread)."""

    value: float
    low: float
    high: float
    n: int

    def text(self, unit: str = "", digits: int = 2) -> str:
        if self.n < 2:
            return f"{self.value:.{digits}f}{unit} (n={self.n}, no interval)"
        return (
            f"{self.value:.{digits}f}{unit} [{self.low:.{digits}f}, {self.high:.{digits}f}] "
            f"(n={self.n})"
        )


def mean_interval(values: Sequence[float]) -> Interval:
    """The mean of `values` with its Student-t 95 % interval."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, mean, mean, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def seed_summary(values: Sequence[float]) -> dict[str, Any]:
    """Every seed's value with their mean and 95 % interval, as the figure scripts' JSON holds
    them (and the report reads back: "values")."""
    ci = mean_interval(values)
    return {"values": list(values), "mean": ci.value, "low": ci.low, "high": ci.high}


def difference_interval(a: Sequence[float], b: Sequence[float]) -> Interval:
    """mean(a) - mean(b) with Welch's 95 % interval (unequal variances)."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    diff, n = ma - mb, min(len(a), len(b))
    if len(a) < 2 or len(b) < 2:
        return Interval(diff, diff, diff, n)
    va = sum((v - ma) ** 2 for v in a) / (len(a) - 1) / len(a)
    vb = sum((v - mb) ** 2 for v in b) / (len(b) - 1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Interval(diff, diff, diff, n)
    df = se**4 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.975, df) * se
    return Interval(diff, diff - half, diff + half, n)


def verdict_above(estimate: Interval | None, threshold: float) -> str:
    """The paper's claim is `estimate > threshold`: reproduced when the whole interval is
    (over 2 seeds or more), partly when only the estimate is."""
    if estimate is None:
        return NOT_TESTED
    if estimate.low > threshold and estimate.n >= 2:
        return REPRODUCED
    return PARTLY if estimate.value > threshold else NOT_REPRODUCED


def verdict_difference(estimate: Interval | None) -> str:
    """The paper's direction is positive (pass the difference that way round)."""
    return verdict_above(estimate, 0.0)


def verdict_speedup(ratio: Interval | None) -> str:
    return verdict_above(ratio, 1.0)


def verdict_outcomes(matches: int, total: int) -> str:
    if total == 0:
        return NOT_TESTED
    if matches == total:
        return REPRODUCED
    return PARTLY if matches else NOT_REPRODUCED


def verdict_no_cost(estimate: Interval | None) -> str:
    """`estimate` is (without - with): negative means removing it costs accuracy."""
    if estimate is None:
        return NOT_TESTED
    if estimate.low > -NO_COST_MARGIN and estimate.n >= 2:
        return REPRODUCED
    return NOT_REPRODUCED if estimate.high < -NO_COST_MARGIN else PARTLY


def combine(verdicts: Sequence[str]) -> str:
    tested = [v for v in verdicts if v != NOT_TESTED]
    if not tested:
        return NOT_TESTED
    if len(tested) == len(verdicts) and all(v == REPRODUCED for v in tested):
        return REPRODUCED
    if all(v == NOT_REPRODUCED for v in tested):
        return NOT_REPRODUCED
    return PARTLY


@dataclass(frozen=True)
class Row:
    claim: str
    section: str
    paper: str
    ours: str
    verdict: str
    figure: str  # a path relative to results/, or "" where there is none
    command: str


# ---------------------------------------------------------------------------------------------
# Reading the committed results


def load_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def seed_values(figure1: dict, arm: str, key: str) -> list[float] | None:
    """Every seed's value of `key` (final_test_acc, spread_drift ...) in a figure1.json."""
    entry = figure1["arms"].get(arm, {}).get(key)
    return entry.get("values") if entry else None


def steps_to(points: Sequence[tuple[int, float]], target: float) -> int | None:
    return next((step for step, acc in points if acc >= target), None)


def speedups(slow_steps: int | None, fast_seeds: Sequence[int | None]) -> Interval | None:
    """Per fast seed: slow_steps / its steps to the target (0 where it never got there)."""
    if slow_steps is None or not fast_seeds:
        return None
    return mean_interval([slow_steps / s if s else 0.0 for s in fast_seeds])


# ---------------------------------------------------------------------------------------------
# The claims


def figure1_rows(results: Path, folder: str, dataset: str, command: str) -> list[Row]:
    """Faster training, higher accuracy and stable distributions on one Figure 1 dataset."""
    figure1 = load_json(results / folder / "figure1.json")
    link = f"{folder}/figure1.png"
    section = "4.1, Fig. 1"
    # The paper's Figure 1 is MNIST only; Fashion-MNIST asks whether its claims carry over.
    paper_faster, paper_higher = (
        ("faster (Fig. 1a, no number)", "higher (Fig. 1a, no number)")
        if dataset == "MNIST"
        else ("no Fashion-MNIST in the paper (MNIST: faster)", "no Fashion-MNIST (MNIST: higher)")
    )
    if figure1 is None:
        return [
            Row(
                f"BN trains faster ({dataset})", section, paper_faster, "-", NOT_TESTED, "", command
            ),
            Row(
                f"BN reaches higher accuracy ({dataset})",
                section,
                paper_higher,
                "-",
                NOT_TESTED,
                "",
                command,
            ),
        ]
    runs = find_runs(results / folder / "runs")
    rows = []
    # Faster: each BN seed's steps to the baseline's mean final accuracy, against the step at
    # which the baseline's mean curve first reached it.
    base_final = seed_values(figure1, "baseline", "final_test_acc") or []
    target = sum(base_final) / len(base_final) if base_final else None
    plotted = figure1["plotted"]["baseline"]
    slow = steps_to(
        list(zip(plotted["steps"], plotted["test_acc_mean"], strict=True)), target or math.inf
    )
    fast = [
        steps_to([(m["step"], m["test/acc"]) for m in r.metrics if "test/acc" in m], target)
        for r in runs
        if r.arm == "bn" and r.summary["status"] == "completed"
    ]
    ratio = speedups(slow, fast) if target is not None else None
    ours = (
        f"{ratio.text('x')} fewer steps to the baseline's final {target:.2f} % "
        f"(the baseline: step {slow:,})"
        if ratio
        else "-"
    )
    rows.append(
        Row(
            f"BN trains faster ({dataset})",
            section,
            paper_faster,
            ours,
            verdict_speedup(ratio),
            link,
            command,
        )
    )
    bn_acc = seed_values(figure1, "bn", "final_test_acc")
    diff = difference_interval(bn_acc, base_final) if bn_acc and base_final else None
    ours = f"{diff.text(' points')} final test accuracy, BN - baseline" if diff else "-"
    rows.append(
        Row(
            f"BN reaches higher accuracy ({dataset})",
            section,
            paper_higher,
            ours,
            verdict_difference(diff),
            link,
            command,
        )
    )
    # Figure 1 (b, c): how far the last hidden unit's input distribution moved.
    parts, texts = [], []
    for key, name in (("spread_drift", "15-85 spread"), ("p50_drift", "median")):
        base, bn = seed_values(figure1, "baseline", key), seed_values(figure1, "bn", key)
        d = difference_interval(base, bn) if base and bn else None
        parts.append(verdict_difference(d))
        texts.append(f"{name}: {d.text()}" if d else f"{name}: -")
    rows.append(
        Row(
            f"BN keeps a unit's input distribution stable ({dataset})",
            "4.1, Fig. 1b,c",
            "without BN mean and spread drift; with BN stable"
            if dataset == "MNIST"
            else "no Fashion-MNIST (MNIST: stable with BN)",
            f"drift (first to last evaluation) of the last hidden unit's input, baseline - "
            f"BN; {'; '.join(texts)}",
            combine(parts),
            link,
            command,
        )
    )
    return rows


Claim = tuple[str, str, str]  # the claim, where it is made, what was published


def untested(claims: list[Claim], command: str) -> list[Row]:
    """A row per claim for an experiment whose results are not there yet."""
    return [Row(c, s, p, "-", NOT_TESTED, "", command) for c, s, p in claims]


def found(
    claims: list[Claim], findings: list[tuple[str, str]], figure: str, command: str
) -> list[Row]:
    """A row per claim, each with our finding: its text and its verdict."""
    return [
        Row(c, s, p, text, verdict, figure, command)
        for (c, s, p), (text, verdict) in zip(claims, findings, strict=True)
    ]


def fig2_rows(results: Path) -> list[Row]:
    figure3 = load_json(results / "fig2_small" / "figure3.json")
    command = "make reproduce-fig2-small"
    link = "fig2_small/figure2.png"
    claims = [
        ("BN-Baseline trains faster than Inception", "4.2.2, Fig. 3", "2.3x (31.0M / 13.3M)"),
        ("BN-x5 trains faster than Inception", "4.2.2, Fig. 3", "14.8x (31.0M / 2.1M)"),
        ("BN-x30 trains faster than Inception", "4.2.2, Fig. 3", "11.5x (31.0M / 2.7M)"),
        ("BN-x30 reaches higher accuracy than Inception", "4.2.2, Fig. 3", "+2.6 points"),
        ("Higher learning rates train with BN (x5, x30)", "4.2.1, 4.2.2", "BN-x5, BN-x30 train"),
        ("Without BN, x5 diverges", "4.2.2", "Inception-x5 diverged"),
        ("With BN, sigmoids train", "4.2.2", "BN-x5-Sigmoid 69.8 % (Inception 72.2 %)"),
        ("Without BN, sigmoids do not train", "4.2.2", "never above chance (0.1 %)"),
    ]
    if figure3 is None:
        return untested(claims, command)
    seeds: dict[str, list[dict]] = figure3["per_seed"]
    rows_by_arm = {row["arm"]: row for row in figure3["rows"]}
    target = figure3["target"]
    inception_at = rows_by_arm.get("inception", {}).get("steps_to_target")
    rows = []

    def speed(arm: str) -> tuple[str, str]:
        ratio = speedups(inception_at, [s["steps_to_target"] for s in seeds.get(arm, [])])
        if ratio is None:
            return "-", NOT_TESTED
        return (
            f"{ratio.text('x')} fewer steps to Inception's best {target:g} % (Inception: "
            f"step {inception_at:,})",
            verdict_speedup(ratio),
        )

    for (claim, section, paper), arm in zip(
        claims[:3], ("bn_baseline", "bn_x5", "bn_x30"), strict=True
    ):
        ours, verdict = speed(arm)
        rows.append(Row(claim, section, paper, ours, verdict, link, command))

    def max_accs(arm: str) -> list[float]:
        return [s["max_acc"] for s in seeds.get(arm, []) if s["max_acc"] is not None]

    d = (
        difference_interval(max_accs("bn_x30"), max_accs("inception"))
        if max_accs("bn_x30") and max_accs("inception")
        else None
    )
    claim, section, paper = claims[3]
    ours = f"{d.text(' points')} max test accuracy, BN-x30 - Inception" if d else "-"
    rows.append(Row(claim, section, paper, ours, verdict_difference(d), link, command))

    def outcome(arm: str, ok: Callable[[dict], bool], what: str) -> tuple[str, str]:
        runs = seeds.get(arm, [])
        hits = sum(ok(s) for s in runs)
        accs = ", ".join(f"{s['max_acc']:.1f}" for s in runs if s["max_acc"] is not None)
        return f"{hits} of {len(runs)} seeds {what} (max acc {accs} %)", verdict_outcomes(
            hits, len(runs)
        )

    def trains(s: dict) -> bool:
        return s["status"] == "completed" and (s["max_acc"] or 0) >= TRAINS_FRACTION * target

    parts = [outcome(arm, trains, "train") for arm in ("bn_x5", "bn_x30")]
    claim, section, paper = claims[4]
    rows.append(
        Row(
            claim,
            section,
            paper,
            "; ".join(f"{a}: {t}" for a, (t, _) in zip(("BN-x5", "BN-x30"), parts, strict=True)),
            combine([v for _, v in parts]),
            link,
            command,
        )
    )
    claim, section, paper = claims[5]
    text, verdict = outcome("inception_x5", lambda s: s["status"] == "diverged", "diverged")
    rows.append(Row(claim, section, paper, text, verdict, link, command))
    claim, section, paper = claims[6]
    text, verdict = outcome("bn_x5_sigmoid", trains, "train")
    rows.append(Row(claim, section, paper, text, verdict, link, command))
    claim, section, paper = claims[7]
    text, verdict = outcome(
        "inception_sigmoid",
        lambda s: (s["max_acc"] or 0) <= CHANCE + CHANCE_MARGIN,
        "stay at chance",
    )
    rows.append(Row(claim, section, paper, text, verdict, link, command))
    return rows


def dropout_row(results: Path) -> Row:
    """BN as a regulariser: on the MNIST grid, each BN variant without dropout against the
    same variant with it (pairs over learning rate and activation)."""
    grid = load_json(results / "mnist" / "grid.json")
    claim = "With BN, dropout can be removed at no cost"
    section, paper, command = (
        "3.4, 4.2.1",
        "dropout removed (BN-x5 and up)",
        ("make reproduce-mnist-grid"),
    )
    if grid is None:
        return Row(claim, section, paper, "-", NOT_TESTED, "", command)
    accs = {row["arm"]: row["max_acc"] for row in grid["rows"]}
    pairs = [
        (accs[arm], accs[arm.replace("drop0.0", "drop0.4")])
        for arm in sorted(accs)
        if arm.startswith("bn_") and "drop0.0" in arm and arm.replace("drop0.0", "drop0.4") in accs
    ]
    if not pairs:
        return Row(claim, section, paper, "-", NOT_TESTED, "", command)
    d = mean_interval([without - with_ for without, with_ in pairs])
    ours = (
        f"{d.text(' points')} MNIST max test accuracy without - with dropout 0.4, paired over "
        f"the BN variants of the grid (1 seed each)"
    )
    return Row(claim, section, paper, ours, verdict_no_cost(d), "mnist/grid.png", command)


def untested_rows() -> list[Row]:
    return [
        Row(
            "BN-Inception ensemble: 4.9 % top-5 error on ImageNet",
            "4.2.3, Fig. 4",
            "4.82 % (test server)",
            "-",
            NOT_TESTED,
            "",
            "needs ImageNet: experiment=imagenet/...",
        ),
    ]


def paired(a: Sequence[float], b: Sequence[float]) -> Interval:
    """mean(a - b) over pairs (the same seed's weights) with its 95 % interval."""
    return mean_interval([x - y for x, y in zip(a, b, strict=True)])


def welch(a: dict, b: dict) -> Interval:
    """Welch's interval of mean(a) - mean(b) for two JSON entries with per-seed "values"."""
    return difference_interval(a["values"], b["values"])


def algorithm2_row(results: Path) -> Row:
    """Section 3.1: the moving averages used in practice serve as well as Algorithm 2's
    population statistics (same weights, the paper's batch size 60)."""
    claim = "Moving averages serve at inference as well as Algorithm 2's population statistics"
    section, paper, command = (
        "3.1, Alg. 2",
        "moving averages usable instead",
        "make reproduce-bn-stats",
    )
    data = load_json(results / "bn_stats" / "bn_stats.json")
    entry = data and data["batch_sizes"].get("60")
    if not entry:
        return Row(claim, section, paper, "-", NOT_TESTED, "", command)
    est = entry["estimates"]
    d = paired(est["ema_0.1"]["final_acc"]["values"], est["algorithm2"]["final_acc"]["values"])
    ours = (
        f"{d.text(' points')} final test accuracy, EMA (0.1) - Algorithm 2, same weights, batch 60"
    )
    return Row(claim, section, paper, ours, verdict_no_cost(d), "bn_stats/bn_stats.png", command)


# ---------------------------------------------------------------------------------------------
# Follow-up claims: what later papers found, on the same networks (issue 13)


def ics_rows(results: Path) -> list[Row]:
    """Santurkar et al. 2018: noisy BN, ICS with and without BN, the landscape's smoothness."""
    source, command, figure = "Santurkar et al. 2018", "make reproduce-ics", "ics/ics.png"
    claims = [
        (
            "Noisy BN (unstable distributions) trains about as well as BN, better than no BN",
            f"{source}, Sec. 2.1, Fig. 2",
            "noisy BN close to BN, above no BN (VGG, CIFAR-10)",
        ),
        (
            "BN does not reduce internal covariate shift",
            f"{source}, Sec. 2.2, Fig. 5",
            "ICS with BN no lower, often higher: larger l2, lower cosine",
        ),
        (
            "BN makes the loss landscape smoother",
            f"{source}, Sec. 3.1, Fig. 4",
            "less loss variation, more predictive gradients, lower beta-smoothness",
        ),
    ]
    data = load_json(results / "ics" / "ics.json")
    arms = data["arms"] if data else {}
    if not {"baseline", "bn", "noisy_bn"} <= set(arms):
        return untested(claims, command)
    base, bn, noisy = arms["baseline"], arms["bn"], arms["noisy_bn"]
    acc_same = welch(noisy["final_test_acc"], bn["final_test_acc"])
    acc_above = welch(noisy["final_test_acc"], base["final_test_acc"])
    trains = (
        f"final test accuracy, noisy BN - BN: {acc_same.text(' points')}; "
        f"noisy BN - no BN: {acc_above.text(' points')}"
    )
    trains_verdict = combine([verdict_no_cost(acc_same), verdict_difference(acc_above)])

    def mean(arm: dict, key: str) -> dict:
        return arm["per_seed_mean"][key]

    l2 = welch(mean(bn, "ics_l2"), mean(base, "ics_l2"))
    cos = welch(mean(base, "ics_cos"), mean(bn, "ics_cos"))
    ics = (
        f"mean over the run and the layers; BN - no BN, l2: {l2.text(digits=4)}; "
        f"no BN - BN, cosine: {cos.text(digits=4)}"
    )
    ics_verdict = combine([verdict_difference(l2), verdict_difference(cos)])
    parts = {
        key: welch(mean(base, key), mean(bn, key)) for key in ("loss_range", "grad_change", "beta")
    }
    names = {"loss_range": "loss variation", "grad_change": "gradient change", "beta": "beta"}
    smooth = "mean over the run, no BN - BN; " + "; ".join(
        f"{names[k]}: {v.text(digits=3)}" for k, v in parts.items()
    )
    smooth_verdict = combine([verdict_difference(v) for v in parts.values()])
    ours = [(trains, trains_verdict), (ics, ics_verdict), (smooth, smooth_verdict)]
    return found(claims, ours, figure, command)


def bn_stats_rows(results: Path) -> list[Row]:
    """Wu & Johnson 2021: EMA against precise BN, through training and at small batches."""
    source, command, figure = (
        "Wu & Johnson 2021",
        "make reproduce-bn-stats",
        "bn_stats/bn_stats.png",
    )
    claims = [
        (
            "EMA statistics trail the weights: precise BN tests better through training",
            f"{source}, Sec. 3",
            "EMA inaccurate while weights move; PreciseBN more accurate and stable",
        ),
        (
            "With small batches, precise BN beats EMA at the end of training",
            f"{source}, Sec. 3",
            "EMA's estimate worse when batch statistics are noisy",
        ),
    ]
    data = load_json(results / "bn_stats" / "bn_stats.json")
    batches = data["batch_sizes"] if data else {}
    if "60" not in batches:
        return untested(claims, command)
    through = batches["60"]["estimates"]["ema_0.1"]["gap_through_training"]["values"]
    d1 = mean_interval([-g for g in through])
    text1 = (
        f"{d1.text(' points')} test accuracy, precise BN - EMA (0.1), mean over the "
        f"evaluations, batch 60"
    )
    smallest = min(batches, key=int)
    final = batches[smallest]["estimates"]["ema_0.1"]["final_gap"]["values"]
    d2 = mean_interval([-g for g in final])
    text2 = f"{d2.text(' points')} final test accuracy, precise BN - EMA (0.1), batch {smallest}"
    ours = [(text1, verdict_difference(d1)), (text2, verdict_difference(d2))]
    return found(claims, ours, figure, command)


def batch_size_rows(results: Path) -> list[Row]:
    """Wu & He 2018 and Ioffe 2017: test error against batch size for each normalisation."""
    command, figure = "make reproduce-batch-size", "batch_size/batch_size.png"
    claims = [
        (
            "BN's error rises as the batch shrinks; GroupNorm's does not",
            "Wu & He 2018, Fig. 1",
            "ResNet-50, ImageNet: GN flat over batch 32..2; at batch 2 GN 10.6 points below BN",
        ),
        (
            "Batch Renorm beats BN with small batches",
            "Ioffe 2017, Sec. 4.3",
            "Inception-v3, minibatches of 4: Batch Renorm well above BN",
        ),
        (
            "At the usual batch size BN is at least as good as GroupNorm and LayerNorm",
            "Wu & He 2018, Fig. 1, Table 1",
            "batch 32: BN slightly better than GN, GN better than LN",
        ),
    ]
    data = load_json(results / "batch_size" / "batch_size.json")
    norms = data["norms"] if data else {}
    needed = {"bn", "batch_renorm", "group_norm", "layer_norm"}
    if not needed <= set(norms) or not {"2", "32"} <= set(norms["bn"]):
        return untested(claims, command)
    bn, gn, brn, ln = norms["bn"], norms["group_norm"], norms["batch_renorm"], norms["layer_norm"]
    vs_gn, rises = welch(bn["2"], gn["2"]), welch(bn["2"], bn["32"])
    text1 = (
        f"test error, points; batch 2, BN - GN: {vs_gn.text()}; BN at batch 2 - at 32: "
        f"{rises.text()}"
    )
    renorm = welch(bn["2"], brn["2"])
    text2 = f"test error, BN - Batch Renorm, batch 2: {renorm.text(' points')}"
    gn_32, ln_32 = welch(gn["32"], bn["32"]), welch(ln["32"], bn["32"])
    text3 = f"test error at batch 32, points; GN - BN: {gn_32.text()}; LN - BN: {ln_32.text()}"
    ours = [
        (text1, combine([verdict_difference(vs_gn), verdict_difference(rises)])),
        (text2, verdict_difference(renorm)),
        (text3, combine([verdict_difference(gn_32), verdict_difference(ln_32)])),
    ]
    return found(claims, ours, figure, command)


def follow_up_rows(results: Path) -> list[Row]:
    return [*ics_rows(results), *bn_stats_rows(results), *batch_size_rows(results)]


def build_rows(results: Path) -> list[Row]:
    return [
        *figure1_rows(results, "mnist", "MNIST", "make reproduce-mnist"),
        *figure1_rows(results, "fashion_mnist", "Fashion-MNIST", "make reproduce-fashion"),
        *fig2_rows(results),
        dropout_row(results),
        algorithm2_row(results),
        *untested_rows(),
    ]


def table(rows: Sequence[Row], source: str, finding: str, start: int = 1) -> list[str]:
    """One markdown table row per claim (links relative to results/)."""
    lines = [
        f"| # | claim | {source} | {finding} | ours (95 % interval) | verdict | figure | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(rows, start=start):
        figure = f"[{Path(row.figure).name}]({row.figure})" if row.figure else "-"
        cells = [
            str(i),
            row.claim,
            row.section,
            row.paper,
            row.ours,
            f"**{row.verdict}**",
            figure,
            f"`{row.command}`",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def counts(rows: Sequence[Row]) -> str:
    tally = {
        v: sum(r.verdict == v for r in rows)
        for v in (REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_TESTED)
    }
    return "Verdicts: " + ", ".join(f"{n} {v}" for v, n in tally.items()) + "."


def render(rows: Sequence[Row], follow_up: Sequence[Row] = ()) -> str:
    """REPORT.md: the rule, the paper's claims, then the follow-up claims of later work."""
    lines = [
        "# Reproduction report",
        "",
        "Generated by `make report` (`scripts/make_report.py`) from the committed results in",
        "`results/` only; no training. Do not edit by hand: change the results or the rule",
        "(`src/bnrepro/analysis/report.py`) and run `make report` again.",
        "",
        "## The verdict rule",
        "",
        VERDICT_RULE.rstrip(),
        "",
        "## The paper's claims",
        "",
        *table(rows, "section", "paper"),
        "",
        counts(rows),
        "",
    ]
    if follow_up:
        lines += [
            "## Follow-up claims",
            "",
            "What later papers found about BN, tested on this suite's MNIST network with the same",
            'verdict rule (README, "Beyond the paper"). The published numbers are for their',
            "networks and data, not ours: the verdict is about the direction of the finding.",
            "",
            *table(follow_up, "source", "published", start=len(rows) + 1),
            "",
            counts(follow_up),
            "",
        ]
    return "\n".join(lines)


def build_report(results: Path) -> str:
    return render(build_rows(results), follow_up_rows(results))
