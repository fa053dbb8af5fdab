"""The estimates of BN's inference statistics (bnrepro/measures/bn_estimators.py) against NumPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from bnrepro.data.batches import shuffled_batches, stacked_batches
from bnrepro.measures.bn_estimators import StatsEstimators, estimator_names, layer_errors
from bnrepro.models.batchnorm import BNStats
from bnrepro.models.mlp import MLP
from bnrepro.models.norms import Normalization
from bnrepro.models.stacked_mlp import StackedMLP

BN = Normalization("bn", bn=BNStats(stats="ema", momentum=0.1, eps=1e-5, population_batches=4))
KW = {"in_features": 6, "hidden": [5, 4], "num_classes": 3, "norm": BN, "init_std": 0.7}


def model(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(**KW).double()


def data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64) * 2 + 1
    return x, torch.randint(0, 3, (n,), generator=g)


def first_layer_input(net: MLP, x: torch.Tensor) -> np.ndarray:
    """What the first BN layer normalises: the bias-free linear map W x."""
    return (x @ net.layers["h1"].linear.weight.detach().T).numpy()


def test_tracked_estimates_follow_their_recurrences():
    net = model()
    estimators = StatsEstimators(net, [0.1, 0.01], population_batches=4)
    x, _ = data()
    net.train()
    mean_ema = {m: np.zeros(5) for m in (0.1, 0.01)}
    var_ema = {m: np.ones(5) for m in (0.1, 0.01)}
    means, variances = [], []
    for k in range(6):
        xb = x[k * 8 : (k + 1) * 8]
        z = first_layer_input(net, xb)
        mean, var = z.mean(axis=0), z.var(axis=0, ddof=1)  # torch's unbiased batch variance
        means.append(mean)
        variances.append(var)
        for m in mean_ema:
            mean_ema[m] = (1 - m) * mean_ema[m] + m * mean
            var_ema[m] = (1 - m) * var_ema[m] + m * var
        with torch.no_grad():
            net(xb)  # no step: the first layer's input follows the same weights
    for m, stats in zip((0.1, 0.01), estimators.ema, strict=True):
        np.testing.assert_allclose(stats[0][0].numpy(), mean_ema[m], rtol=1e-10)
        np.testing.assert_allclose(stats[0][1].numpy(), var_ema[m], rtol=1e-10)
    cumulative = estimators.cumulative[0]
    np.testing.assert_allclose(cumulative[0].numpy(), np.mean(means, axis=0), rtol=1e-10)
    np.testing.assert_allclose(cumulative[1].numpy(), np.mean(variances, axis=0), rtol=1e-10)
    # The layer's own EMA (momentum 0.1) is what ema_0.1 shadows, in every layer.
    for layer, (mean, var) in zip(estimators.layers, estimators.ema[0], strict=True):
        torch.testing.assert_close(layer.running_mean, mean)
        torch.testing.assert_close(layer.running_var, var)


def test_nothing_is_tracked_in_eval_mode_or_when_paused():
    net = model()
    estimators = StatsEstimators(net, [0.1], population_batches=4)
    x, _ = data()
    with torch.no_grad():
        net.eval()(x)
        net.train()
        with estimators.paused():
            net(x)
    assert estimators.batches_seen == 0
    torch.testing.assert_close(estimators.ema[0][0][0], torch.zeros(5, dtype=torch.float64))


def test_precise_is_the_whole_sets_mean_and_variance():
    net = model()
    estimators = StatsEstimators(net, [0.1], population_batches=4)
    x, y = data(n=64)
    own = estimators.current()
    batches = shuffled_batches(x, y, 16, torch.Generator().manual_seed(0))
    epoch = [next(batches) for _ in range(4)]  # the whole set once
    mean, var = estimators.precise(epoch)[0]
    z = first_layer_input(net, x)
    np.testing.assert_allclose(mean.numpy(), z.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(var.numpy(), z.var(axis=0), rtol=1e-10)  # over all 64 examples
    for (a, b), (c, d) in zip(estimators.current(), own, strict=True):  # buffers put back
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, d)


def test_evaluate_tests_each_estimate_and_restores_the_buffers():
    net = model()
    estimators = StatsEstimators(net, [0.1, 0.01], population_batches=4)
    x, y = data()
    net.train()
    with torch.no_grad():
        for k in range(4):
            net(x[k * 16 : (k + 1) * 16])
    own = estimators.current()
    seen = []

    def evaluate(m):
        seen.append([layer.running_var.clone() for layer in estimators.layers])
        return [{"test/acc": float(len(seen)), "test/loss": 0.5}]

    batches = shuffled_batches(x, y, 16, torch.Generator().manual_seed(1))
    epoch = shuffled_batches(x, y, 16, torch.Generator().manual_seed(2))
    (record,) = estimators.evaluate(evaluate, batches, iter([next(epoch) for _ in range(4)]))
    names = estimator_names([0.1, 0.01])
    assert names == ["ema_0.1", "ema_0.01", "cumulative", "algorithm2", "precise"]
    assert [record[f"bn_stats/{n}/test_acc"] for n in names] == [1.0, 2.0, 3.0, 4.0, 5.0]
    # Each evaluation saw its own estimate, the layers' buffers are as before, and the
    # evaluations tracked nothing.
    assert not torch.equal(seen[0][0], seen[1][0])
    for (a, b), (c, d) in zip(estimators.current(), own, strict=True):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, d)
    assert estimators.batches_seen == 4


def test_stacked_estimates_are_each_members_own():
    nets = [model(s).float() for s in (1, 2)]
    stacked = StackedMLP.from_members(nets, **KW)
    fast = StatsEstimators(stacked, [0.01], population_batches=3)
    plain = [StatsEstimators(n, [0.01], population_batches=3) for n in nets]
    x, y = data(n=96)
    x = x.float()
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    train = stacked_batches(x, y, 16, gens)
    with torch.no_grad():
        for _ in range(4):
            xb, _ = next(train)
            stacked.train()(xb)
            for i, net in enumerate(nets):
                net.train()(xb[i])
    for i, est in enumerate(plain):
        for layer, (m, v) in enumerate(est.ema[0]):
            f = m.numel()
            fm, fv = fast.ema[0][layer]
            torch.testing.assert_close(fm[i * f : (i + 1) * f], m, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(fv[i * f : (i + 1) * f], v, atol=1e-5, rtol=1e-4)

    def epoch():
        order = [torch.Generator().manual_seed(s) for s in (9, 10)]
        batches = stacked_batches(x, y, 16, order)
        return [next(batches) for _ in range(6)]  # one whole epoch of 96 examples

    precise = fast.precise(epoch())
    for i, est in enumerate(plain):
        mine = est.precise([(xb[i], yb[i]) for xb, yb in epoch()])
        for (fm, fv), (m, v) in zip(precise, mine, strict=True):
            f = m.numel()
            torch.testing.assert_close(fm[i * f : (i + 1) * f], m, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(fv[i * f : (i + 1) * f], v, atol=1e-5, rtol=1e-4)
    assert precise[0][1].min().item() > 0


def test_layer_errors_against_precise_statistics_per_member():
    """|mu - mu_p| / sqrt(var_p + eps) and |log(sigma / sigma_p)| per layer, each member's
    block of channels on its own (a stacked layer's M*C channels, member-major)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2), nn.BatchNorm1d(2))
    estimators = StatsEstimators(model, [0.1], population_batches=1, layer_errors=True)
    eps = 1e-5
    precise = [(torch.randn(c), torch.rand(c) + 0.5) for c in (4, 2)]
    # member 0: mean off by 0.5 sigma, sigma x2; member 1: exact.
    shift = [torch.tensor([0.5, 0.5, 0.0, 0.0]), torch.tensor([0.5, 0.0])]
    scale = [torch.tensor([4.0, 4.0, 1.0, 1.0]), torch.tensor([4.0, 1.0])]
    off = [
        (m + s * (v + eps).sqrt(), k * (v + eps) - eps)
        for (m, v), s, k in zip(precise, shift, scale, strict=True)
    ]
    records = layer_errors(estimators, {"ema_0.1": off, "precise": precise}, members=2)
    assert records[0]["bn_stats/ema_0.1/mean_err/00"] == pytest.approx(0.5, rel=1e-5)
    assert records[0]["bn_stats/ema_0.1/std_err/00"] == pytest.approx(math.log(2), rel=1e-5)
    assert records[0]["bn_stats/ema_0.1/mean_err/01"] == pytest.approx(0.5, rel=1e-5)
    assert records[1]["bn_stats/ema_0.1/mean_err/00"] == pytest.approx(0.0, abs=1e-6)
    assert records[1]["bn_stats/ema_0.1/std_err/01"] == pytest.approx(0.0, abs=1e-6)
    assert not any("precise" in key for key in records[0])
    estimators.remove()
