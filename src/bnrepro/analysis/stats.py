"""The report's arithmetic: 95 % intervals over seeds (Student t, Welch, paired, ratios) and the
verdict rule with its constants. The figure scripts store their per-seed numbers with
`seed_summary`; the claims (bnrepro.analysis.claims) turn them into verdicts with the
`verdict_*` functions. Nothing here reads files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scipy.stats import t as student_t

REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_TESTED = (
    "reproduced",
    "partly",
    "not reproduced",
    "not tested here",
)
VERDICTS = (REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_TESTED)

# The rule's constants; REPORT.md prints each one (CONSTANTS below) beside the rule.
CONFIDENCE = 0.95  # two-sided coverage of every interval
MIN_SEEDS = 2  # one seed has no interval, so it can never be more than "partly"
CHANCE = 10.0  # % accuracy of a guess among MNIST's and Fashion-MNIST's 10 classes
NO_COST_MARGIN = 0.5  # accuracy points: "costs nothing" tolerates a loss smaller than this
TRAINS_FRACTION = 0.9  # "trains": a max accuracy of at least this share of Inception's best
CHANCE_MARGIN = 1.0  # "never above chance": max accuracy within this of chance

# (name, value, meaning): the constants as REPORT.md lists them, values taken from above.
CONSTANTS: tuple[tuple[str, float, str], ...] = (
    ("CONFIDENCE", CONFIDENCE, "coverage of every interval (two-sided Student t)"),
    ("MIN_SEEDS", MIN_SEEDS, "fewest seeds for *reproduced* (one seed has no interval)"),
    ("NO_COST_MARGIN", NO_COST_MARGIN, "accuracy points a *no cost* claim may lose"),
    ("TRAINS_FRACTION", TRAINS_FRACTION, "share of Inception's best accuracy that *trains*"),
    ("CHANCE", CHANCE, "% accuracy of a guess among 10 classes"),
    ("CHANCE_MARGIN", CHANCE_MARGIN, "accuracy points above chance that still count as chance"),
)

VERDICT_RULE = f"""\
Every number is over the seeds of the committed runs; intervals are 95 % Student-t
intervals (Welch's for a difference of two arms, paired where the runs pair up).

- **Difference** ("BN gives higher accuracy", "BN's input distribution drifts less"): the
  interval of the difference lies wholly on the paper's side of 0: *reproduced*; the estimate
  is on the paper's side but the interval reaches 0: *partly*; otherwise *not reproduced*.
- **Speed-up** (fewer steps to a target accuracy): each seed's step at which its curve crosses
  the target, read by linear interpolation between the two evaluations around the crossing;
  the ratio of the two arms' geometric mean steps (slow / fast), its interval Welch's on the
  log steps of every seed of both arms, so it is never below 0. A seed that never reaches the
  target is reported as such and left out of the ratio. Interval above 1: *reproduced*;
  estimate above 1: *partly*; otherwise *not reproduced*.
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
        """'value [low, high] (n=...)' as the report prints it."""
        if self.n < 2:
            return f"{self.value:.{digits}f}{unit} (n={self.n}, no interval)"
        return (
            f"{self.value:.{digits}f}{unit} [{self.low:.{digits}f}, {self.high:.{digits}f}] "
            f"(n={self.n})"
        )


def _t_quantile(df: float) -> float:
    """The Student-t quantile that gives a two-sided CONFIDENCE interval."""
    return float(student_t.ppf((1 + CONFIDENCE) / 2, df))


def mean_interval(values: Sequence[float]) -> Interval:
    """The mean of `values` with its Student-t 95 % interval."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, mean, mean, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = _t_quantile(n - 1) * sd / math.sqrt(n)
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
    half = _t_quantile(df) * se
    return Interval(diff, diff - half, diff + half, n)


def paired(a: Sequence[float], b: Sequence[float]) -> Interval:
    """mean(a - b) over pairs (the same seed's weights) with its 95 % interval."""
    return mean_interval([x - y for x, y in zip(a, b, strict=True)])


def welch(a: dict, b: dict) -> Interval:
    """Welch's interval of mean(a) - mean(b) for two JSON entries with per-seed "values"."""
    return difference_interval(a["values"], b["values"])


def steps_to(points: Sequence[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step whose accuracy reaches `target` (None: never)."""
    return next((step for step, acc in points if acc >= target), None)


def crossing_step(points: Sequence[tuple[int, float]], target: float) -> float | None:
    """The step at which the curve `points` ((step, accuracy), in step order) first reaches
    `target`, by linear interpolation between the evaluation before and the first at or above
    it (that evaluation's own step when it is the first). None: never reached."""
    previous = None
    for step, acc in points:
        if acc >= target:
            if previous is None:
                return float(step)
            s0, a0 = previous
            return s0 + (target - a0) / (acc - a0) * (step - s0)
        previous = (step, acc)
    return None


def ratio_interval(slow: Sequence[float], fast: Sequence[float]) -> Interval | None:
    """The speed-up slow / fast as the ratio of the arms' geometric mean steps, with the 95 %
    interval of Welch's test on log steps (every seed of both arms), exponentiated. None when
    an arm has no step (no seed reached the target); n is the smaller arm's seed count."""
    if not slow or not fast or min(*slow, *fast) <= 0:
        return None
    d = difference_interval([math.log(s) for s in slow], [math.log(f) for f in fast])
    return Interval(math.exp(d.value), math.exp(d.low), math.exp(d.high), d.n)


def difference_of_differences(
    a: Sequence[float], b: Sequence[float], c: Sequence[float], d: Sequence[float]
) -> Interval:
    """(mean(a) - mean(b)) - (mean(c) - mean(d)) over four independent arms, with a Welch-
    Satterthwaite 95 % interval (each arm's own variance)."""
    arms = [a, b, c, d]
    value = sum(s * sum(x) / len(x) for s, x in zip((1, -1, -1, 1), arms, strict=True))
    n = min(len(x) for x in arms)
    if n < 2:
        return Interval(value, value, value, n)
    terms = [sum((v - sum(x) / len(x)) ** 2 for v in x) / (len(x) - 1) / len(x) for x in arms]
    se = math.sqrt(sum(terms))
    if se == 0:
        return Interval(value, value, value, n)
    df = se**4 / sum(t**2 / (len(x) - 1) for t, x in zip(terms, arms, strict=True))
    half = _t_quantile(df) * se
    return Interval(value, value - half, value + half, n)


def verdict_above(estimate: Interval | None, threshold: float) -> str:
    """The paper's claim is `estimate > threshold`: reproduced when the whole interval is
    (over MIN_SEEDS seeds or more), partly when only the estimate is."""
    if estimate is None:
        return NOT_TESTED
    if estimate.low > threshold and estimate.n >= MIN_SEEDS:
        return REPRODUCED
    return PARTLY if estimate.value > threshold else NOT_REPRODUCED


def verdict_difference(estimate: Interval | None) -> str:
    """The paper's direction is positive (pass the difference that way round)."""
    return verdict_above(estimate, 0.0)


def verdict_speedup(ratio: Interval | None) -> str:
    """The paper's claim is a speed-up: a ratio of steps above 1."""
    return verdict_above(ratio, 1.0)


def verdict_outcomes(matches: int, total: int) -> str:
    """`matches` of `total` seeds show the paper's outcome (diverged, trained, at chance)."""
    if total == 0:
        return NOT_TESTED
    if matches == total:
        return REPRODUCED
    return PARTLY if matches else NOT_REPRODUCED


def verdict_no_cost(estimate: Interval | None) -> str:
    """`estimate` is (without - with): negative means removing it costs accuracy."""
    if estimate is None:
        return NOT_TESTED
    if estimate.low > -NO_COST_MARGIN and estimate.n >= MIN_SEEDS:
        return REPRODUCED
    return NOT_REPRODUCED if estimate.high < -NO_COST_MARGIN else PARTLY


def trains(max_acc: float | None, status: str, best: float) -> bool:
    """The outcome "trains": completed, with a max accuracy of TRAINS_FRACTION of `best`."""
    return status == "completed" and (max_acc or 0) >= TRAINS_FRACTION * best


def at_chance(max_acc: float | None) -> bool:
    """The outcome "never above chance": a max accuracy within CHANCE_MARGIN of CHANCE."""
    return (max_acc or 0) <= CHANCE + CHANCE_MARGIN


def combine(verdicts: Sequence[str]) -> str:
    """A claim of several parts: reproduced when all are, not reproduced when none is."""
    tested = [v for v in verdicts if v != NOT_TESTED]
    if not tested:
        return NOT_TESTED
    if len(tested) == len(verdicts) and all(v == REPRODUCED for v in tested):
        return REPRODUCED
    if all(v == NOT_REPRODUCED for v in tested):
        return NOT_REPRODUCED
    return PARTLY
