"""BN as torch computes it, against the paper's formulas written out in NumPy (Section 3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bnrepro.errors import ConfigError
from bnrepro.models.batchnorm import BNStats, StackedBatchNorm, recompute_population_stats

EPS = 1e-5
M, F = 60, 7  # the paper's MNIST batch size; a few features
MODEL_CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "model").glob("*.yaml"))


def settings(stats: str, population_batches: int = 100) -> BNStats:
    return BNStats(stats=stats, momentum=0.1, eps=EPS, population_batches=population_batches)


def np_bn_train(x, gamma, beta, eps=EPS):
    """Algorithm 1: biased batch variance."""
    mu = x.mean(axis=0)
    var = ((x - mu) ** 2).mean(axis=0)
    x_hat = (x - mu) / np.sqrt(var + eps)
    return gamma * x_hat + beta, mu, var, x_hat


def np_bn_backward(dy, x_hat, var, gamma, eps=EPS):
    """The gradients of Section 3 (through mu_B and var_B), in closed form."""
    m = dy.shape[0]
    dgamma = (dy * x_hat).sum(axis=0)
    dbeta = dy.sum(axis=0)
    dx = gamma / (m * np.sqrt(var + eps)) * (m * dy - dbeta - x_hat * dgamma)
    return dx, dgamma, dbeta


def random_batches(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Shifted, scaled inputs so that wrong means or variances cannot pass by accident.
    return [rng.normal(2.0, 3.0, size=(M, F)) * np.arange(1, F + 1) for _ in range(n)]


def bn_with_affine(stats: str) -> torch.nn.BatchNorm1d:
    bn = settings(stats).layer(F).double()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, F))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, F))
    return bn


def test_training_forward_and_backward_match_algorithm_1():
    bn = bn_with_affine("ema").train()
    x_np = random_batches(1)[0]
    dy_np = np.random.default_rng(1).normal(size=(M, F))
    x = torch.tensor(x_np, requires_grad=True)
    y = bn(x)
    y.backward(torch.tensor(dy_np))

    gamma, beta = bn.weight.detach().numpy(), bn.bias.detach().numpy()
    y_np, _, var, x_hat = np_bn_train(x_np, gamma, beta)
    dx, dgamma, dbeta = np_bn_backward(dy_np, x_hat, var, gamma)
    np.testing.assert_allclose(y.detach().numpy(), y_np, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(x.grad.numpy(), dx, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(bn.weight.grad.numpy(), dgamma, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(bn.bias.grad.numpy(), dbeta, rtol=1e-8, atol=1e-10)


def expected_running_stats(stats: str, batches: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    means = [b.mean(axis=0) for b in batches]
    unbiased = [b.var(axis=0, ddof=1) for b in batches]
    if stats == "ema":
        mean, var = np.zeros(F), np.ones(F)
        for mu, v in zip(means, unbiased, strict=True):
            mean, var = 0.9 * mean + 0.1 * mu, 0.9 * var + 0.1 * v
        return mean, var
    # cumulative and population: E[x] = E_B[mu_B], Var[x] = m/(m-1) E_B[var_B] (Algorithm 2)
    biased = [b.var(axis=0) for b in batches]
    return np.mean(means, axis=0), M / (M - 1) * np.mean(biased, axis=0)


def np_bn_inference(x, mean, var, gamma, beta, eps=EPS):
    """Algorithm 2, step 11: BN folded into one affine map."""
    scale = gamma / np.sqrt(var + eps)
    return scale * x + (beta - scale * mean)


@pytest.mark.parametrize("stats", ["ema", "cumulative", "population"])
def test_inference_statistics_match_numpy(stats):
    batches = random_batches(12)
    bn = bn_with_affine(stats)
    model = torch.nn.Sequential(bn)
    if stats == "population":
        # Train on other data first: the recompute must forget it entirely.
        model.train()
        for b in random_batches(5, seed=99):
            model(torch.tensor(b) * 10)
        tensors = iter([(torch.tensor(b), torch.zeros(M)) for b in batches])
        recompute_population_stats(model, tensors, num_batches=len(batches))
    else:
        model.train()
        for b in batches:
            model(torch.tensor(b))
    mean, var = expected_running_stats(stats, batches)
    np.testing.assert_allclose(bn.running_mean.numpy(), mean, rtol=1e-10)
    np.testing.assert_allclose(bn.running_var.numpy(), var, rtol=1e-10)

    model.eval()
    x_test = random_batches(1, seed=7)[0]
    gamma, beta = bn.weight.detach().numpy(), bn.bias.detach().numpy()
    with torch.no_grad():
        y = model(torch.tensor(x_test)).numpy()
    np.testing.assert_allclose(y, np_bn_inference(x_test, mean, var, gamma, beta), rtol=1e-9)


def test_population_recompute_restores_mode_and_momentum():
    bn = settings("ema").layer(F).double()
    model = torch.nn.Sequential(bn).eval()
    batches = iter([(torch.tensor(b), None) for b in random_batches(3)])
    recompute_population_stats(model, batches, num_batches=3)
    assert not model.training
    assert bn.momentum == 0.1
    assert int(bn.num_batches_tracked) == 3


@pytest.mark.parametrize(
    ("stats", "momentum"), [("ema", 0.1), ("cumulative", None), ("population", 0.1)]
)
def test_layer_momentum_per_mode(stats, momentum):
    # Only cumulative uses torch's momentum=None (a host sync per step, see batchnorm.py);
    # population trains with the EMA, which each recompute discards.
    bn = BNStats.from_config(
        {"stats": stats, "momentum": 0.1, "eps": 1e-3, "population_batches": 4}
    )
    layer, conv = bn.layer(5), bn.layer(3, dims=2)
    assert type(layer) is torch.nn.BatchNorm1d and type(conv) is torch.nn.BatchNorm2d
    assert layer.num_features == 5 and conv.num_features == 3
    assert layer.momentum == conv.momentum == bn.layer_momentum
    assert layer.momentum == momentum
    assert layer.eps == conv.eps == 1e-3
    assert bn.needs_population_batches is (stats == "population")


@pytest.mark.parametrize("stats", ["ema", "cumulative", "population"])
def test_refresh_recomputes_only_in_population_mode(stats):
    bn_stats = settings(stats, population_batches=3)
    model = torch.nn.Sequential(bn_stats.layer(F).double()).train()
    for b in random_batches(4, seed=5):
        model(torch.tensor(b))
    trained = model[0].running_var.clone()
    batches = iter([(torch.tensor(b), None) for b in random_batches(5)])
    bn_stats.refresh(model.eval(), batches)
    left = len(list(batches))
    if stats == "population":
        _, var = expected_running_stats("population", random_batches(5)[:3])
        np.testing.assert_allclose(model[0].running_var.numpy(), var, rtol=1e-10)
        assert left == 2  # K batches taken, no more
    else:
        assert torch.equal(model[0].running_var, trained)
        assert left == 5  # not even looked at
        bn_stats.refresh(model, None)  # nothing to recompute from, nothing needed
    assert not model.training


def test_refresh_in_population_mode_needs_batches():
    with pytest.raises(ValueError, match="population"):
        settings("population").refresh(torch.nn.Sequential(settings("population").layer(F)), None)


def test_from_config_reads_a_mapping_or_passes_bn_stats_through():
    bn = BNStats.from_config(
        {"stats": "population", "momentum": 1, "eps": 1e-5, "population_batches": 7}
    )
    assert bn == BNStats(stats="population", momentum=1.0, eps=1e-5, population_batches=7)
    assert isinstance(bn.momentum, float)
    assert BNStats.from_config(bn) is bn


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_every_model_config_has_complete_bn_settings(path):
    # The defaults live in the YAML only: each model config must carry every key.
    bn = BNStats.from_config(OmegaConf.load(path).bn)
    assert bn.stats in ("ema", "cumulative", "population")


@pytest.mark.parametrize(
    ("bn", "message"),
    [
        ({"stats": "ema", "momentum": 0.1, "eps": EPS}, "model.bn.population_batches is missing"),
        ({"momentum": 0.1, "eps": EPS, "population_batches": 1}, "model.bn.stats is missing"),
        (
            {"stats": "ema", "momentum": 0.1, "eps": EPS, "population_batches": 1, "mom": 0.2},
            "model.bn.mom is not a setting",
        ),
        (
            {"stats": "foo", "momentum": 0.1, "eps": EPS, "population_batches": 1},
            "model.bn.stats='foo' is invalid: expected ema or cumulative or population",
        ),
        (
            {"stats": "ema", "momentum": 0.1, "eps": EPS, "population_batches": 1.5},
            "model.bn.population_batches=1.5 is invalid",
        ),
    ],
)
def test_from_config_rejects_incomplete_or_unknown_settings(bn, message):
    with pytest.raises(ConfigError, match=message):
        BNStats.from_config(bn)


@pytest.mark.parametrize("stats", ["ema", "cumulative"])
def test_stacked_bn_is_each_members_own_bn(stats):
    """StackedBatchNorm on (M, F, B) activations: member i computes, and keeps as running
    statistics (entries i*F .. (i+1)*F - 1), what its own BN layer does on (B, F)."""
    bn = settings(stats)
    stacked = bn.stacked_layer(2, F)
    assert isinstance(stacked, StackedBatchNorm) and stacked.momentum == bn.layer_momentum
    plain = [bn.layer(F) for _ in range(2)]
    for _ in range(2):  # the second batch sees the running statistics the first one moved
        h = torch.randn(2, F, M) * 3 + 1
        out = stacked.train()(h)
        for i, layer in enumerate(plain):
            torch.testing.assert_close(out[i], layer.train()(h[i].T).T)
    for i, layer in enumerate(plain):
        members = slice(i * F, (i + 1) * F)
        torch.testing.assert_close(stacked.running_mean[members], layer.running_mean)
        torch.testing.assert_close(stacked.running_var[members], layer.running_var)


def test_conv_bn_normalises_each_feature_map_over_batch_and_positions():
    """Section 3.2: one (gamma, beta) per map, statistics over m * p * q values; Algorithm 2's
    correction then uses that effective batch size."""
    rng = np.random.default_rng(3)
    batches = [rng.normal(1.0, 2.0, size=(8, 3, 5, 4)) for _ in range(4)]
    bn = settings("population").layer(3, dims=2).double()
    assert bn.weight.shape == (3,)
    x = torch.tensor(batches[0])
    y = bn.train()(x).detach().numpy()
    mu = batches[0].mean(axis=(0, 2, 3), keepdims=True)
    var = batches[0].var(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(y, (batches[0] - mu) / np.sqrt(var + EPS), rtol=1e-9, atol=1e-12)

    recompute_population_stats(
        torch.nn.Sequential(bn), iter([(torch.tensor(b), None) for b in batches]), num_batches=4
    )
    n = 8 * 5 * 4
    want_var = n / (n - 1) * np.mean([b.var(axis=(0, 2, 3)) for b in batches], axis=0)
    np.testing.assert_allclose(bn.running_var.numpy(), want_var, rtol=1e-10)
