"""The claims the report tests, as data: one `Claim` record each (its number, text, where it is
made, the published value, the results it reads, its estimator, figure and command) in `CLAIMS`.

An estimator is a small named function: it gets the claim's `results`, loaded, in order (a
figure's JSON as a dict, a folder of runs as a list of RunRecord) and returns our number with
its interval as the table prints it and the verdict by the rule (bnrepro.analysis.stats), or
None when the results hold nothing for the claim. Adding a claim is one record here, plus an
estimator if none of these fits (`functools.partial` binds one to an arm).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bnrepro.analysis.runs import RunRecord, find_runs
from bnrepro.analysis.stats import (
    NOT_REPRODUCED,
    NOT_TESTED,
    at_chance,
    combine,
    crossing_step,
    difference_interval,
    difference_of_differences,
    mean_interval,
    paired,
    ratio_interval,
    trains,
    verdict_difference,
    verdict_no_cost,
    verdict_outcomes,
    verdict_speedup,
    welch,
)


@dataclass(frozen=True)
class Finding:
    """Our side of a claim: the number(s) with intervals as printed, and the verdict."""

    ours: str
    verdict: str


Estimator = Callable[..., Finding | None]


@dataclass(frozen=True)
class Claim:
    """One row of REPORT.md. `number` identifies the claim and stays with it: a new claim takes
    the next free number. `results` are paths under results/ (`*.json`: a figure's numbers;
    anything else: a folder of runs); a claim whose results are missing is not tested, and so
    is one without an estimator (no experiment here)."""

    number: int
    claim: str
    section: str  # where the paper (or, for a follow-up, the later paper) makes it
    paper: str  # the published value
    results: tuple[str, ...]
    estimator: Estimator | None
    figure: str  # a path under results/, or "" where there is none
    command: str
    follow_up: bool = False  # a later paper's finding (the report's second table)


class Results:
    """The committed results under `root`, each file or run folder read once (claims share
    them): `load("mnist/figure1.json")` is the dict, `load("mnist/runs")` the runs; None when
    absent or empty."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._loaded: dict[str, Any] = {}

    def load(self, source: str) -> Any | None:
        if source not in self._loaded:
            path = self.root / source
            if source.endswith(".json"):
                value = json.loads(path.read_text()) if path.is_file() else None
            else:
                value = (find_runs(path) if path.is_dir() else None) or None
            self._loaded[source] = value
        return self._loaded[source]


def assess(claim: Claim, results: Results) -> Finding | None:
    """The claim's finding on these results (None: not tested here)."""
    if claim.estimator is None:
        return None
    loaded = [results.load(source) for source in claim.results]
    if any(data is None for data in loaded):
        return None
    return claim.estimator(*loaded)


# ---------------------------------------------------------------------------------------------
# Estimators: Figure 1 (figure1.json and its runs; MNIST and Fashion-MNIST alike)


def seed_values(figure1: dict, arm: str, key: str) -> list[float] | None:
    """Every seed's value of `key` (final_test_acc, spread_drift ...) in a figure1.json."""
    entry = figure1["arms"].get(arm, {}).get(key)
    return entry.get("values") if entry else None


def _crossings(steps: dict[int, float | None]) -> str:
    """Every seed's step to the target, e.g. 'seed 1: 1,234; seed 2: never'."""
    return "; ".join(
        f"seed {seed}: {'never' if step is None else f'{step:,.0f}'}"
        for seed, step in sorted(steps.items())
    )


def speedup_finding(
    slow: dict[int, float | None], fast: dict[int, float | None], target: float, what: str
) -> Finding | None:
    """The speed-up of `fast` over `slow` (each {seed: interpolated step to `target`, None:
    never}): the ratio of the arms' geometric means with Welch's interval on log steps; seeds
    that never reach the target are named and left out."""
    # Reached after step 0 (a curve that starts above the target has no step on a log scale).
    ratio = ratio_interval([s for s in slow.values() if s], [s for s in fast.values() if s])
    if ratio is None and fast and not any(fast.values()) and any(slow.values()):
        return Finding(
            f"no seed of the faster arm reached {what} {target:.2f} % (the slower arm "
            f"{_crossings(slow)}; the faster {_crossings(fast)})",
            NOT_REPRODUCED,
        )
    if ratio is None:
        return None
    return Finding(
        f"{ratio.text('x')} fewer steps to {what} {target:.2f} % (geometric means; the slower "
        f"arm {_crossings(slow)}; the faster {_crossings(fast)})",
        verdict_speedup(ratio),
    )


def bn_trains_faster(figure1: dict, runs: list[RunRecord]) -> Finding | None:
    """Steps to the baseline's final accuracy, every seed of both arms: the target is the
    lowest final test accuracy of the baseline's seeds, which each of them reached."""
    base_final = seed_values(figure1, "baseline", "final_test_acc")
    if not base_final:
        return None
    target = min(base_final)
    steps: dict[str, dict[int, float | None]] = {"baseline": {}, "bn": {}}
    for r in runs:
        if r.arm in steps and r.summary["status"] == "completed":
            points = [(m["step"], m["test/acc"]) for m in r.metrics if "test/acc" in m]
            steps[r.arm][r.seed] = crossing_step(points, target)
    return speedup_finding(steps["baseline"], steps["bn"], target, "the baseline's lowest final")


def bn_higher_accuracy(figure1: dict) -> Finding | None:
    """BN's final test accuracy minus the baseline's, Welch's interval over seeds."""
    bn = seed_values(figure1, "bn", "final_test_acc")
    base = seed_values(figure1, "baseline", "final_test_acc")
    if not (bn and base):
        return None
    diff = difference_interval(bn, base)
    return Finding(
        f"{diff.text(' points')} final test accuracy, BN - baseline", verdict_difference(diff)
    )


def bn_stable_distribution(figure1: dict) -> Finding:
    """Figure 1 (b, c): how far the last hidden unit's input distribution moved, baseline - BN,
    for the 15-85 spread and the median."""
    parts, texts = [], []
    for key, name in (("spread_drift", "15-85 spread"), ("p50_drift", "median")):
        base, bn = seed_values(figure1, "baseline", key), seed_values(figure1, "bn", key)
        d = difference_interval(base, bn) if base and bn else None
        parts.append(verdict_difference(d))
        texts.append(f"{name}: {d.text()}" if d else f"{name}: -")
    return Finding(
        "drift (first to last evaluation) of the last hidden unit's input, baseline - BN; "
        + "; ".join(texts),
        combine(parts),
    )


# ---------------------------------------------------------------------------------------------
# Estimators: Figures 2 and 3 at small scale (fig2_small/figure3.json)


def faster_than_inception(arm: str, figure3: dict) -> Finding | None:
    """Steps to Inception's plateau maximum (figure3.json's target), every seed of Inception
    and of `arm`: the interpolated steps the figure script stored per seed."""
    seeds = figure3["per_seed"]
    if "inception" not in seeds or arm not in seeds:
        return None

    def steps(name: str) -> dict[int, float | None]:
        return {s["seed"]: s["steps_to_target"] for s in seeds[name]}

    return speedup_finding(
        steps("inception"), steps(arm), figure3["target"], "Inception's plateau maximum"
    )


def _metric_name(figure3: dict) -> str:
    return {"val/acc": "validation accuracy", "test/acc": "test accuracy"}.get(
        figure3.get("metric", ""), figure3.get("metric", "accuracy")
    )


def _max_accs(figure3: dict, arm: str) -> list[float]:
    return [s["max_acc"] for s in figure3["per_seed"].get(arm, []) if s["max_acc"] is not None]


def bn_x30_higher_accuracy(figure3: dict) -> Finding | None:
    """BN-x30's max accuracy minus Inception's (figure3.json's metric: validation accuracy at
    small scale), Welch's interval over seeds."""
    bn_x30, inception = _max_accs(figure3, "bn_x30"), _max_accs(figure3, "inception")
    if not (bn_x30 and inception):
        return None
    d = difference_interval(bn_x30, inception)
    return Finding(
        f"{d.text(' points')} max {_metric_name(figure3)}, BN-x30 - Inception",
        verdict_difference(d),
    )


def _outcome(
    figure3: dict, arm: str, ok: Callable[[dict], bool], what: str, finals: bool = False
) -> Finding | None:
    """How many seeds of `arm` show the paper's outcome `ok`, with their max accuracies (and,
    with `finals`, their final ones); None without runs of `arm`."""
    seeds = figure3["per_seed"].get(arm, [])
    if not seeds:
        return None
    hits = sum(ok(s) for s in seeds)
    accs = ", ".join(f"{s['max_acc']:.1f}" for s in seeds if s["max_acc"] is not None)
    ends = ", ".join(f"{s['final_acc']:.1f}" for s in seeds) if finals else ""
    text = f"{hits} of {len(seeds)} seeds {what} (max acc {accs} %"
    text += f"; at the end {ends} %)" if finals else ")"
    return Finding(text, verdict_outcomes(hits, len(seeds)))


def _trains(figure3: dict) -> Callable[[dict], bool]:
    return lambda s: trains(s["max_acc"], s["status"], figure3["target"])


def trains_at_high_rates(figure3: dict) -> Finding | None:
    """BN-x5 and BN-x30: every seed trains (an arm without runs: that part not tested)."""
    parts = {
        name: _outcome(figure3, arm, _trains(figure3), "train")
        for name, arm in (("BN-x5", "bn_x5"), ("BN-x30", "bn_x30"))
    }
    if not any(parts.values()):
        return None
    return Finding(
        "; ".join(f"{name}: {f.ours if f else 'no runs'}" for name, f in parts.items()),
        combine([f.verdict if f else NOT_TESTED for f in parts.values()]),
    )


def inception_x5_diverges(figure3: dict) -> Finding | None:
    """Training fails: the loss diverged (the loop's rule), or the network ended at chance
    (its ReLUs dead: the loss stays at log 10 and never diverges) - the learning-rate search's
    "stops training"."""
    return _outcome(
        figure3,
        "inception_x5",
        lambda s: s["status"] == "diverged" or at_chance(s["final_acc"]),
        "diverged or ended at chance",
        finals=True,
    )


def bn_sigmoid_trains(figure3: dict) -> Finding | None:
    return _outcome(figure3, "bn_x5_sigmoid", _trains(figure3), "train")


def sigmoid_stays_at_chance(figure3: dict) -> Finding | None:
    return _outcome(
        figure3, "inception_sigmoid", lambda s: at_chance(s["max_acc"]), "stay at chance"
    )


# ---------------------------------------------------------------------------------------------
# Estimators: the MNIST grid and BN's inference statistics


def dropout_removable_with_bn(figure3: dict) -> Finding | None:
    """Section 4.2.1's "Remove Dropout" at small scale, with its control: the max validation
    accuracy without - with 40 % dropout for BN-x5 (bn_x5 - bn_x5_dropout) and for Inception
    without BN (inception_no_dropout - inception); the verdict reads the difference of the two
    differences (does BN make dropout removable, beyond what removing it does without BN),
    with the BN pair's own difference under the no-cost rule beside it."""
    arms = ("bn_x5", "bn_x5_dropout", "inception_no_dropout", "inception")
    accs = [_max_accs(figure3, arm) for arm in arms]
    if not all(accs):
        return None
    bn_pair = difference_interval(accs[0], accs[1])
    control = difference_interval(accs[2], accs[3])
    d = difference_of_differences(*accs)
    return Finding(
        f"max validation accuracy without - with dropout: BN-x5 {bn_pair.text(' points')}; "
        f"Inception (no BN, the control) {control.text(' points')}; difference of the two "
        f"{d.text(' points')}",
        combine([verdict_no_cost(bn_pair), verdict_difference(d)]),
    )


def moving_averages_as_algorithm2(bn_stats: dict) -> Finding | None:
    """Section 3.1: the moving averages used in practice against Algorithm 2's population
    statistics, the same weights, the paper's batch size 60."""
    entry = bn_stats["batch_sizes"].get("60")
    if not entry:
        return None
    est = entry["estimates"]
    d = paired(est["ema_0.1"]["final_acc"]["values"], est["algorithm2"]["final_acc"]["values"])
    return Finding(
        f"{d.text(' points')} final test accuracy, EMA (0.1) - Algorithm 2, same weights, batch 60",
        verdict_no_cost(d),
    )


def precise_bn_through_training(large: dict) -> Finding | None:
    """Wu & Johnson (Section 3): precise BN minus EMA (0.1) on the same weights, where they see
    the EMA fail: batch 2048 with linear lr scaling, mean over the evaluations after the
    warm-up (the high-rate phase), per seed; with EMA (0.01) and the estimates' median
    per-layer error against precise statistics beside it."""
    est = large.get("estimates", {})
    if "ema_0.1" not in est:
        return None
    ema, slow = (est[n]["gap_high_rate"]["values"] for n in ("ema_0.1", "ema_0.01"))
    d, d_slow = mean_interval([-g for g in ema]), mean_interval([-g for g in slow])
    steps = large["high_rate_steps"]
    errors = ", ".join(
        f"{name} {mean_interval(est[name]['mean_err']['high_rate_median']['values']).value:.3g}"
        for name in ("ema_0.1", "ema_0.01", "cumulative", "algorithm2")
    )
    return Finding(
        f"validation accuracy, precise BN - EMA (0.1): {d.text(' points')}; - EMA (0.01): "
        f"{d_slow.text(' points')}; mean of the {len(steps)} evaluations at steps "
        f"{steps[0]}-{steps[-1]} (after the {large['warmup_steps']}-step warm-up), scaled "
        f"BN-Inception, batch {large['batch_size']}, lr {large['peak_lr']:g}; median per-layer "
        f"|mu - mu_precise| / sigma_precise there: {errors}",
        verdict_difference(d),
    )


# ---------------------------------------------------------------------------------------------
# Estimators: Santurkar et al. (ics/ics.json) and batch size (batch_size_conv/batch_size_conv.json)


def _arms(ics: dict, *names: str) -> list[dict] | None:
    arms = ics["arms"]
    return [arms[n] for n in names] if all(n in arms for n in names) else None


def noisy_bn_trains(ics: dict) -> Finding | None:
    """Noisy BN's final test and training accuracy: no worse than BN's (no cost), above no
    BN's; and, the control, above the same noise without BN (what trains is BN's doing)."""
    arms = _arms(ics, "baseline", "bn", "noisy_bn")
    if arms is None:
        return None
    base, bn, noisy = arms
    control = ics["arms"].get("noise")
    parts, verdicts = [], []
    for key, name in (("final_test_acc", "test"), ("final_train_acc", "training")):
        if key not in noisy:
            continue
        same, above = welch(noisy[key], bn[key]), welch(noisy[key], base[key])
        parts.append(
            f"final {name} accuracy, noisy BN - BN: {same.text(' points')}; "
            f"noisy BN - no BN: {above.text(' points')}"
        )
        verdicts += [verdict_no_cost(same), verdict_difference(above)]
        if control is not None and key in control:
            bn_part = welch(noisy[key], control[key])
            parts.append(f"noisy BN - noise without BN: {bn_part.text(' points')}")
            verdicts.append(verdict_difference(bn_part))
    return Finding("; ".join(parts), combine(verdicts))


def ics_not_reduced(ics: dict) -> Finding | None:
    """ICS (mean over the run and the layers): BN's l2 larger, its cosine lower."""
    arms = _arms(ics, "baseline", "bn")
    if arms is None:
        return None
    base, bn = (arm["per_seed_mean"] for arm in arms)
    l2, cos = welch(bn["ics_l2"], base["ics_l2"]), welch(base["ics_cos"], bn["ics_cos"])
    return Finding(
        f"mean over the run and the layers; BN - no BN, l2: {l2.text(digits=4)}; "
        f"no BN - BN, cosine: {cos.text(digits=4)}",
        combine([verdict_difference(l2), verdict_difference(cos)]),
    )


# Santurkar et al.'s three landscape measures, scale-free where they can be (the change of the
# gradient over its norm; beta is a change per distance moved), and the phases compared.
LANDSCAPE = {
    "loss_range": "loss variation",
    "grad_change_rel": "relative gradient change",
    "beta": "beta",
}
PHASES = {
    "per_seed_early": "first tenth of training",
    "per_seed_matched": "matched training loss",
    "per_seed_mean": "whole run",
}


def _landscape_phase(label: str, base: dict, bn: dict, digits: dict[str, int]) -> tuple[str, str]:
    """One phase's no BN - BN of the LANDSCAPE measures (per-seed entries of each arm): its
    text, and its verdict, which combines the three measures."""
    parts = {k: welch(base[k], bn[k]) for k in LANDSCAPE}
    verdict = combine([verdict_difference(v) for v in parts.values()])
    measures = ", ".join(f"{LANDSCAPE[k]} {v.text(digits=digits[k])}" for k, v in parts.items())
    return f"{label}: {measures} ({verdict})", verdict


def smoother_landscape(ics: dict) -> Finding | None:
    """Loss variation, relative gradient change and beta-smoothness, no BN - BN, in each
    phase (ics.json: the first tenth, matched training loss, the whole run); a phase's verdict
    combines its three measures, the claim's combines the phases."""
    arms = _arms(ics, "baseline", "bn")
    if arms is None:
        return None
    base, bn = arms
    texts, verdicts = [], []
    for phase, label in PHASES.items():
        if not all(k in base.get(phase, {}) and k in bn.get(phase, {}) for k in LANDSCAPE):
            continue
        if phase == "per_seed_matched":
            low, high = ics["matched_loss_band"]
            label += f" (batch loss {low:.3g}-{high:.3g})"
        text, verdict = _landscape_phase(label, base[phase], bn[phase], dict.fromkeys(LANDSCAPE, 3))
        texts.append(text)
        verdicts.append(verdict)
    if not texts:
        return None
    return Finding("no BN - BN; " + "; ".join(texts), combine(verdicts))


def smoother_deep_linear(dln: dict) -> Finding | None:
    """Santurkar et al.'s deep linear network (ics/deep_linear/deep_linear.json): no BN - BN,
    per seed's mean over a phase, of loss variation, relative gradient change and beta, over
    the step range their rule gives for our network (up to the largest rate at which no seed
    of the network without BN diverged); each phase's verdict combines its three measures, the
    claim's the two phases. The paper's own range (its top past our network's divergence rate)
    is in deep_linear.md, not judged here."""
    summary = dln["summary"]
    digits = {"loss_range": 0, "grad_change_rel": 3, "beta": 0}  # losses are sums here
    texts, verdicts = [], []
    for phase, label in (("early", "first tenth"), ("whole", "whole run")):
        base, bn = (summary[arm]["rule"]["mean"][phase] for arm in ("no_bn", "bn"))
        text, verdict = _landscape_phase(label, base, bn, digits)
        texts.append(text)
        verdicts.append(verdict)
    rule = dln["ranges"]["rule"]
    scales = f"steps {min(rule['scales']):g}-{rule['top_over_lr']:g} x lr"
    return Finding(f"no BN - BN, {scales}; " + "; ".join(texts), combine(verdicts))


def _errors(batch_size: dict, design: str, *cells: tuple[str, str]) -> list[dict] | None:
    """The per-seed test errors of each (norm, batch) of one design (wu_he: the SGD batch;
    ghost: the ghost batch within an SGD batch of 32), or None if one is missing."""
    norms = batch_size.get("designs", {}).get(design, {})
    if not all(b in norms.get(n, {}) for n, b in cells):
        return None
    return [norms[n][b] for n, b in cells]


def bn_small_batch_error(batch_size: dict) -> Finding | None:
    """Wu & He's design: at batch 2, BN's error above GroupNorm's, and BN's rise from batch 32
    to 2 beyond GroupNorm's (GroupNorm uses no batch statistics: the control for what the
    smaller batch and its smaller learning rate do by themselves)."""
    cells = _errors(
        batch_size, "wu_he", ("bn", "2"), ("group_norm", "2"), ("bn", "32"), ("group_norm", "32")
    )
    if cells is None:
        return None
    bn_2, gn_2, bn_32, gn_32 = cells
    vs_gn = welch(bn_2, gn_2)
    rise = difference_of_differences(
        bn_2["values"], bn_32["values"], gn_2["values"], gn_32["values"]
    )
    own = welch(bn_2, bn_32)
    return Finding(
        f"test error, points, SGD batch = normalisation batch (lr x B/32); batch 2, BN - GN: "
        f"{vs_gn.text()}; BN's rise from 32 to 2: {own.text()}, minus GN's: {rise.text()}",
        combine([verdict_difference(vs_gn), verdict_difference(rise)]),
    )


def renorm_small_batch(batch_size: dict) -> Finding | None:
    """Ioffe 2017's design: SGD batch 32, BN and Batch Renorm normalising micro-batches of 4
    (their Section 4.2); BN's error minus Batch Renorm's there, with g = 2 and BN over the
    whole batch beside it."""
    cells = _errors(
        batch_size,
        "ghost",
        ("bn", "4"),
        ("batch_renorm", "4"),
        ("bn", "2"),
        ("batch_renorm", "2"),
        ("bn", "32"),
    )
    if cells is None:
        return None
    bn_4, brn_4, bn_2, brn_2, bn_32 = cells
    at_4, at_2, bn_cost = welch(bn_4, brn_4), welch(bn_2, brn_2), welch(bn_4, bn_32)
    return Finding(
        f"test error, points, SGD batch 32; BN - Batch Renorm over micro-batches of 4: "
        f"{at_4.text()}; of 2: {at_2.text()}; BN over 4 - BN over all 32: {bn_cost.text()}",
        verdict_difference(at_4),
    )


def bn_usual_batch(batch_size: dict) -> Finding | None:
    """At batch 32, GroupNorm's and LayerNorm's errors minus BN's."""
    cells = _errors(batch_size, "wu_he", ("group_norm", "32"), ("layer_norm", "32"), ("bn", "32"))
    if cells is None:
        return None
    gn_32, ln_32, bn_32 = cells
    gn, ln = welch(gn_32, bn_32), welch(ln_32, bn_32)
    return Finding(
        f"test error at batch 32, points; GN - BN: {gn.text()}; LN - BN: {ln.text()}",
        combine([verdict_difference(gn), verdict_difference(ln)]),
    )


# ---------------------------------------------------------------------------------------------
# The claims


def _figure1(start: int, folder: str, dataset: str, command: str) -> list[Claim]:
    """The three Figure 1 claims on one dataset (the paper's Figure 1 is MNIST only:
    Fashion-MNIST asks whether its claims carry over)."""
    mnist = dataset == "MNIST"
    numbers, runs = f"{folder}/figure1.json", f"{folder}/runs"
    common = {"figure": f"{folder}/figure1.png", "command": command}
    return [
        Claim(
            start,
            f"BN trains faster ({dataset})",
            "4.1, Fig. 1",
            "faster (Fig. 1a, no number)"
            if mnist
            else "no Fashion-MNIST in the paper (MNIST: faster)",
            (numbers, runs),
            bn_trains_faster,
            **common,
        ),
        Claim(
            start + 1,
            f"BN reaches higher accuracy ({dataset})",
            "4.1, Fig. 1",
            "higher (Fig. 1a, no number)" if mnist else "no Fashion-MNIST (MNIST: higher)",
            (numbers,),
            bn_higher_accuracy,
            **common,
        ),
        Claim(
            start + 2,
            f"BN keeps a unit's input distribution stable ({dataset})",
            "4.1, Fig. 1b,c",
            "without BN mean and spread drift; with BN stable"
            if mnist
            else "no Fashion-MNIST (MNIST: stable with BN)",
            (numbers,),
            bn_stable_distribution,
            **common,
        ),
    ]


_FIG2 = {
    "results": ("fig2_small/figure3.json",),
    "figure": "fig2_small/figure2.png",
    "command": "make reproduce-fig2-small",
}
_SANTURKAR = "Santurkar et al. 2018"
_ICS = {
    "results": ("ics/ics.json",),
    "figure": "ics/ics.png",
    "command": "make reproduce-ics",
    "follow_up": True,
}
_WU_JOHNSON = "Wu & Johnson 2021"
_BN_STATS = {
    "results": ("bn_stats/bn_stats.json",),
    "figure": "bn_stats/bn_stats.png",
    "command": "make reproduce-bn-stats",
}
_BATCH_SIZE = {
    "results": ("batch_size_conv/batch_size_conv.json",),
    "figure": "batch_size_conv/batch_size_conv.png",
    "command": "make reproduce-batch-size",
    "follow_up": True,
}

CLAIMS: list[Claim] = [
    *_figure1(1, "mnist", "MNIST", "make reproduce-mnist"),
    *_figure1(4, "fashion_mnist", "Fashion-MNIST", "make reproduce-fashion"),
    Claim(
        7,
        "BN-Baseline trains faster than Inception",
        "4.2.2, Fig. 3",
        "2.3x (31.0M / 13.3M)",
        estimator=partial(faster_than_inception, "bn_baseline"),
        **_FIG2,
    ),
    Claim(
        8,
        "BN-x5 trains faster than Inception",
        "4.2.2, Fig. 3",
        "14.8x (31.0M / 2.1M)",
        estimator=partial(faster_than_inception, "bn_x5"),
        **_FIG2,
    ),
    Claim(
        9,
        "BN-x30 trains faster than Inception",
        "4.2.2, Fig. 3",
        "11.5x (31.0M / 2.7M)",
        estimator=partial(faster_than_inception, "bn_x30"),
        **_FIG2,
    ),
    Claim(
        10,
        "BN-x30 reaches higher accuracy than Inception",
        "4.2.2, Fig. 3",
        "+2.6 points",
        estimator=bn_x30_higher_accuracy,
        **_FIG2,
    ),
    Claim(
        11,
        "Higher learning rates train with BN (x5, x30)",
        "4.2.1, 4.2.2",
        "BN-x5, BN-x30 train",
        estimator=trains_at_high_rates,
        **_FIG2,
    ),
    Claim(
        12,
        "Without BN, x5 diverges",
        "4.2.2",
        "Inception-x5 diverged",
        estimator=inception_x5_diverges,
        **_FIG2,
    ),
    Claim(
        13,
        "With BN, sigmoids train",
        "4.2.2",
        "BN-x5-Sigmoid 69.8 % (Inception 72.2 %)",
        estimator=bn_sigmoid_trains,
        **_FIG2,
    ),
    Claim(
        14,
        "Without BN, sigmoids do not train",
        "4.2.2",
        "never above chance (0.1 %)",
        estimator=sigmoid_stays_at_chance,
        **_FIG2,
    ),
    Claim(
        15,
        "With BN, dropout can be removed at no cost",
        "3.4, 4.2.1",
        "dropout removed (BN-x5 and up)",
        estimator=dropout_removable_with_bn,
        **_FIG2,
    ),
    Claim(
        16,
        "Moving averages serve at inference as well as Algorithm 2's population statistics",
        "3.1, Alg. 2",
        "moving averages usable instead",
        estimator=moving_averages_as_algorithm2,
        **_BN_STATS,
    ),
    Claim(
        17,
        "BN-Inception ensemble: 4.9 % top-5 error on ImageNet",
        "4.2.3, Fig. 4",
        "4.82 % (test server)",
        (),
        None,
        "",
        "needs ImageNet: experiment=imagenet/...",
    ),
    # Follow-up claims: what later papers found, on the same networks (issue 13).
    Claim(
        18,
        "Noisy BN (unstable distributions) trains about as well as BN, better than no BN",
        f"{_SANTURKAR}, Sec. 2.1, Fig. 2",
        "noisy BN close to BN in training and test accuracy, above no BN (VGG, CIFAR-10)",
        estimator=noisy_bn_trains,
        **_ICS,
    ),
    Claim(
        19,
        "BN does not reduce internal covariate shift",
        f"{_SANTURKAR}, Sec. 2.2, Fig. 3 (NeurIPS; Fig. 5 in arXiv v1)",
        "ICS with BN no lower, often higher: larger l2, lower cosine",
        estimator=ics_not_reduced,
        **_ICS,
    ),
    Claim(
        20,
        "BN makes the loss landscape smoother",
        f"{_SANTURKAR}, Sec. 3.2, Fig. 4, App. A.2.2",
        "less loss variation, more predictive gradients, lower beta-smoothness; loss and "
        "gradient differ most early in training, beta throughout",
        estimator=smoother_landscape,
        **_ICS,
    ),
    Claim(
        26,
        "BN makes the landscape smoother: the deep linear network",
        f"{_SANTURKAR}, Sec. 3.2, Fig. 4, App. A.1",
        "25-layer linear network, full-batch GD at lr 1e-6: BN smoother (loss, gradient, beta)",
        estimator=smoother_deep_linear,
        results=("ics/deep_linear/deep_linear.json",),
        figure="ics/deep_linear/deep_linear.png",
        command="make reproduce-deep-linear",
        follow_up=True,
    ),
    Claim(
        21,
        "EMA statistics trail the weights: precise BN tests better through training",
        f"{_WU_JOHNSON}, Sec. 3",
        "ResNet-50, batch 8192: EMA (momentum 0.1) inaccurate while the weights move fast; "
        "PreciseBN more accurate and stable through training",
        estimator=precise_bn_through_training,
        results=("bn_stats/large/bn_stats_large.json",),
        figure="bn_stats/large/bn_stats_large.png",
        command="make reproduce-bn-stats-large",
        follow_up=True,
    ),
    # 22 ("with small batches, precise BN beats EMA at the end", attributed to Wu & Johnson's
    # Section 3) is withdrawn: the small-batch effect they describe (Section 4) is a train/test
    # inconsistency that affects precise statistics too, which that row did not test.
    Claim(
        23,
        "BN's error rises as the batch shrinks; GroupNorm's does not",
        "Wu & He 2018, Fig. 1",
        "ResNet-50, ImageNet, 32..2 images per GPU: GN flat; at batch 2 GN 10.6 points below BN "
        "(abstract; 24.1 vs 34.7 % error, Table 2 as quoted by a summary)",
        estimator=bn_small_batch_error,
        **_BATCH_SIZE,
    ),
    Claim(
        24,
        "Batch Renorm beats BN with small batches",
        "Ioffe 2017, Sec. 4.2",
        "Inception-v3, 50 x 32 examples normalised in micro-batches of 4: BN 74.2 % (210k "
        "steps), Batch Renorm 76.5 % (130k); batch-32 BN 78.3 % (top-1)",
        estimator=renorm_small_batch,
        **_BATCH_SIZE,
    ),
    Claim(
        25,
        "At the usual batch size BN is at least as good as GroupNorm and LayerNorm",
        "Wu & He 2018, Fig. 1, Table 1",
        "batch 32: BN slightly better than GN, GN better than LN",
        estimator=bn_usual_batch,
        **_BATCH_SIZE,
    ),
]


def check_claims(claims: Sequence[Claim]) -> None:
    """Numbers identify claims: each used once."""
    seen: set[int] = set()
    for c in claims:
        if c.number in seen:
            raise ValueError(f"claim number {c.number} is used twice ({c.claim!r})")
        seen.add(c.number)
