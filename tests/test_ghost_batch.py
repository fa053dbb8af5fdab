"""Ghost batches (model.bn.ghost_batch, models/batchnorm.py) against NumPy over the groups.

A batch of N examples is normalised as N/g consecutive groups of g, each with its own mean and
biased variance; the running statistics take the groups' average mean and average unbiased
variance; Algorithm 2 averages them over all groups of K batches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnrepro.config.resolvers import result_hash
from bnrepro.config.schema import parse_config
from bnrepro.errors import ConfigError
from bnrepro.measures.bn_estimators import batch_stats
from bnrepro.models.batchnorm import (
    BNStats,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    StackedBatchNorm,
    recompute_population_stats,
)
from bnrepro.models.mlp import MLP
from bnrepro.models.networks import build_network
from bnrepro.models.norms import Normalization
from bnrepro.models.stacked_mlp import StackedMLP
from bnrepro.training.loop import member_losses

from .test_batchnorm import np_bn_backward
from .test_run_hashes import PINNED

EPS = 1e-5
N, C, G = 12, 3, 4  # 3 ghost batches of 4
SHAPES = {"linear": (N, C), "conv": (N, C, 3, 2)}
DIMS = {"linear": 1, "conv": 2}  # BNStats.layer's dims


def settings(ghost: int | None = G, stats: str = "ema", momentum: float = 0.1) -> BNStats:
    return BNStats(stats=stats, momentum=momentum, eps=EPS, population_batches=3, ghost_batch=ghost)


def with_affine(layer: _BatchNorm) -> _BatchNorm:
    layer = layer.double()
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, layer.num_features))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, layer.num_features))
    return layer


def batch(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    # Each group its own offset and scale, so that whole-batch statistics cannot pass.
    rng = np.random.default_rng(seed)
    groups = shape[0] // G
    offset = np.repeat(rng.normal(0.0, 5.0, size=groups), G).reshape(-1, *[1] * (len(shape) - 1))
    scale = np.repeat(rng.uniform(0.5, 4.0, size=groups), G).reshape(offset.shape)
    return rng.normal(1.0, 2.0, size=shape) * scale + offset


def grouped(x: np.ndarray, g: int = G) -> np.ndarray:
    """(n, g, C, ...): group k's examples in row k."""
    return x.reshape(x.shape[0] // g, g, *x.shape[1:])


def stat_axes(x: np.ndarray) -> tuple[int, ...]:
    """Per group and channel of `grouped(x)`: over the g examples and every position."""
    return (1, *range(3, x.ndim + 1))


def np_group_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Each group's per-channel mean and biased variance, (n, C); values per channel."""
    xg = grouped(x)
    axes = stat_axes(x)
    m = G * int(np.prod(x.shape[2:], dtype=int))
    return xg.mean(axis=axes), xg.var(axis=axes), m


def np_ghost_train(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Algorithm 1 on each group of G examples."""
    xg = grouped(x)
    axes = stat_axes(x)
    mu, var = xg.mean(axis=axes, keepdims=True), xg.var(axis=axes, keepdims=True)
    shape = (1, 1, -1, *[1] * (x.ndim - 2))
    y = gamma.reshape(shape) * (xg - mu) / np.sqrt(var + EPS) + beta.reshape(shape)
    return y.reshape(x.shape)


@pytest.mark.parametrize("kind", SHAPES)
def test_training_output_normalises_each_group(kind):
    x_np = batch(SHAPES[kind])
    layer = with_affine(settings().layer(C, dims=DIMS[kind])).train()
    assert type(layer) is {"linear": GhostBatchNorm1d, "conv": GhostBatchNorm2d}[kind]
    x = torch.tensor(x_np, requires_grad=True)
    y = layer(x)
    gamma, beta = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    np.testing.assert_allclose(y.detach().numpy(), np_ghost_train(x_np, gamma, beta), atol=1e-10)

    if kind == "linear":  # the gradient: each group's Section 3 closed form, gamma's summed
        dy_np = np.random.default_rng(1).normal(size=x_np.shape)
        y.backward(torch.tensor(dy_np))
        dx, dgamma, dbeta = [], 0.0, 0.0
        for xk, dyk in zip(grouped(x_np), grouped(dy_np), strict=True):
            mu, var = xk.mean(axis=0), xk.var(axis=0)
            x_hat = (xk - mu) / np.sqrt(var + EPS)
            dxk, dgk, dbk = np_bn_backward(dyk, x_hat, var, gamma)
            dx, dgamma, dbeta = [*dx, dxk], dgamma + dgk, dbeta + dbk
        np.testing.assert_allclose(x.grad.numpy(), np.concatenate(dx), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(layer.weight.grad.numpy(), dgamma, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(layer.bias.grad.numpy(), dbeta, rtol=1e-8, atol=1e-10)


def test_channels_last_input_keeps_its_layout():
    x = torch.tensor(batch(SHAPES["conv"])).contiguous(memory_format=torch.channels_last)
    layer = settings().layer(C, dims=2).double().train()
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, layer(x.contiguous()))


@pytest.mark.parametrize("stats", ["ema", "cumulative"])
@pytest.mark.parametrize("kind", SHAPES)
def test_running_statistics_after_one_step_average_the_groups(kind, stats):
    """From torch's initial (0, 1): the EMA moves 0.1 of the way to the groups' average mean
    and average unbiased variance; the cumulative average is them."""
    x_np = batch(SHAPES[kind])
    bn = settings(stats=stats)
    layer = bn.layer(C, dims=DIMS[kind]).double().train()
    layer(torch.tensor(x_np))
    means, biased, m = np_group_stats(x_np)
    mean, var = means.mean(axis=0), m / (m - 1) * biased.mean(axis=0)
    if stats == "ema":
        mean, var = 0.1 * mean, 0.9 + 0.1 * var
    np.testing.assert_allclose(layer.running_mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), var, rtol=1e-12)
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("kind", SHAPES)
def test_population_statistics_are_algorithm_2_over_every_group(kind):
    """E[x] = the mean of all K*N/g group means; Var[x] = m/(m-1) times the mean of their
    biased variances, m = g examples (times H*W positions for a feature map)."""
    batches = [batch(SHAPES[kind], seed=s) for s in range(4)]
    layer = with_affine(settings(stats="population").layer(C, dims=DIMS[kind]))
    model = nn.Sequential(layer).train()
    for b in batches:  # training on other data first: the recompute forgets it
        model(torch.tensor(b) * 10 + 3)
    recompute_population_stats(
        model.eval(), iter([(torch.tensor(b), None) for b in batches]), num_batches=4
    )
    stats = [np_group_stats(b) for b in batches]
    m = stats[0][2]
    mean = np.mean([means for means, _, _ in stats], axis=(0, 1))
    var = m / (m - 1) * np.mean([biased for _, biased, _ in stats], axis=(0, 1))
    np.testing.assert_allclose(layer.running_mean.numpy(), mean, rtol=1e-10)
    np.testing.assert_allclose(layer.running_var.numpy(), var, rtol=1e-10)
    assert not model.training and layer.momentum == 0.1

    # Inference: one affine map of every example with those statistics, no groups.
    x_test = batch(SHAPES[kind], seed=9)
    shape = (1, -1, *[1] * (x_test.ndim - 2))
    gamma, beta = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    scale = (gamma / np.sqrt(var + EPS)).reshape(shape)
    want = scale * (x_test - mean.reshape(shape)) + beta.reshape(shape)
    with torch.no_grad():
        np.testing.assert_allclose(model(torch.tensor(x_test)).numpy(), want, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", SHAPES)
def test_one_ghost_batch_of_the_whole_batch_is_plain_bn_exactly(kind, dtype):
    """g = N: outputs and gradients bit for bit torch's BN, two training steps and evaluation."""
    dims = DIMS[kind]
    ghost = with_affine(settings(ghost=N).layer(C, dims)).to(dtype).train()
    plain = with_affine(settings(ghost=None).layer(C, dims)).to(dtype).train()
    assert type(plain) in (nn.BatchNorm1d, nn.BatchNorm2d)
    for seed in range(2):  # the second step moves the statistics the first one moved
        x = torch.tensor(batch(SHAPES[kind], seed=seed), dtype=dtype)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [ghost(xs[0]), plain(xs[1])]
        assert torch.equal(ys[0], ys[1])
        for y in ys:
            y.pow(2).sum().backward()
        assert torch.equal(xs[0].grad, xs[1].grad)
    assert torch.equal(ghost.num_batches_tracked, plain.num_batches_tracked)
    for name in ("running_mean", "running_var"):
        if dtype == torch.float64:
            assert torch.equal(getattr(ghost, name), getattr(plain, name)), name
        else:  # torch's CPU kernel moves float32 statistics from its float64 sums: to rounding
            torch.testing.assert_close(getattr(ghost, name), getattr(plain, name))
    for name in ("weight", "bias"):
        assert torch.equal(getattr(ghost, name).grad, getattr(plain, name).grad), name
    ghost.eval(), plain.eval()
    if dtype == torch.float64:
        assert torch.equal(ghost(x), plain(x))
    else:  # from the running statistics, equal to rounding (above)
        torch.testing.assert_close(ghost(x), plain(x))


@pytest.mark.parametrize("kind", SHAPES)
def test_a_batch_the_ghost_batch_does_not_divide_is_an_error(kind):
    layer = settings().layer(C, dims=DIMS[kind]).train()
    x = torch.randn(N - 2, *SHAPES[kind][1:])
    with pytest.raises(ValueError, match="model.bn.ghost_batch=4: use a batch size"):
        layer(x)
    layer.eval()(x)  # inference uses the running statistics: any batch size
    stacked = settings().stacked_layer(2, C).train()
    with pytest.raises(ValueError, match="ghost batches of model.bn.ghost_batch=4"):
        stacked(torch.randn(2, C, N - 2))


@pytest.mark.parametrize("stats", ["ema", "cumulative"])
def test_stacked_bn_is_each_members_own_ghost_bn(stats):
    """StackedBatchNorm on (M, F, B) with ghost batches: member i computes, and keeps as
    running statistics, what its own GhostBatchNorm1d does on (B, F)."""
    bn = settings(stats=stats)
    stacked = bn.stacked_layer(2, C)
    assert isinstance(stacked, StackedBatchNorm) and stacked.ghost_batch == G
    plain = [bn.layer(C) for _ in range(2)]
    with torch.no_grad():
        for layer in (stacked, *plain):
            layer.weight.uniform_(0.5, 2.0)
            layer.bias.uniform_(-1.0, 1.0)
        for i, layer in enumerate(plain):
            layer.weight.copy_(stacked.weight[i * C : (i + 1) * C])
            layer.bias.copy_(stacked.bias[i * C : (i + 1) * C])
    for seed in range(2):
        h = torch.tensor(np.stack([batch((N, C), seed=seed + 10 * i).T for i in range(2)]))
        out = stacked.train()(h.float())
        for i, layer in enumerate(plain):
            torch.testing.assert_close(out[i], layer.train()(h[i].T.float()).T)
    for i, layer in enumerate(plain):
        torch.testing.assert_close(stacked.running_mean[i * C : (i + 1) * C], layer.running_mean)
        torch.testing.assert_close(stacked.running_var[i * C : (i + 1) * C], layer.running_var)


def test_stacked_mlp_members_compute_their_plain_ghost_networks():
    norm = Normalization("bn", bn=settings())
    mlps = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        mlps.append(MLP(hidden=[20, 20], norm=norm))
    stacked = StackedMLP.from_members(mlps, hidden=[20, 20], norm=norm)
    x, y = torch.rand(2, N, 784), torch.randint(0, 10, (2, N))
    losses = member_losses(stacked.train()(x), y)
    losses.sum().backward()
    for i, mlp in enumerate(mlps):
        loss = member_losses(mlp.train()(x[i]), y[i])
        loss.backward()
        assert losses[i].item() == pytest.approx(loss.item(), rel=1e-5)
        torch.testing.assert_close(
            stacked.layers["h1"].linear.weight.grad[i], mlp.layers["h1"].linear.weight.grad
        )
        torch.testing.assert_close(
            stacked.layers["h2"].bn.running_var[i * 20 : (i + 1) * 20],
            mlp.layers["h2"].bn.running_var,
        )


def test_stacked_inception_channel_blocks_are_each_members_ghost_bn():
    """The stacked BN-Inception's (B, M*C, H, W) layer: channel block m normalises as member
    m's own GhostBatchNorm2d over C channels."""
    norm = Normalization("bn", bn=settings())
    layer = norm.member_layers(2, C)["bn"].double().train()
    assert isinstance(layer, GhostBatchNorm2d) and layer.num_features == 2 * C
    x = torch.tensor(np.concatenate([batch(SHAPES["conv"], seed=s) for s in (0, 1)], axis=1))
    out = layer(x)
    for m in range(2):
        own = norm.layers(C, dims=2)["bn"].double().train()
        block = slice(m * C, (m + 1) * C)
        torch.testing.assert_close(out[:, block], own(x[:, block]))
        torch.testing.assert_close(layer.running_var[block], own.running_var)


def test_bn_stats_probe_tracks_what_the_layer_averages():
    """bn_estimators.batch_stats of a ghost layer: the groups' averages, which a layer with
    momentum 1 keeps as its running statistics."""
    for dims, shape in ((1, SHAPES["linear"]), (2, SHAPES["conv"])):
        layer = settings(momentum=1.0).layer(C, dims).double().train()
        x = torch.tensor(batch(shape))
        layer(x)
        mean, var = batch_stats(layer, x)
        torch.testing.assert_close(mean, layer.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var, layer.running_var, rtol=1e-12, atol=1e-12)
    stacked = settings(momentum=1.0).stacked_layer(2, C).double().train()
    h = torch.tensor(np.stack([batch((N, C), seed=s).T for s in (0, 1)]))
    stacked(h)
    mean, var = batch_stats(stacked, h)
    torch.testing.assert_close(var, stacked.running_var, rtol=1e-12, atol=1e-12)


def test_an_absent_ghost_batch_leaves_every_result_hash_as_it_was(compose_cfg):
    """No committed config sets model.bn.ghost_batch, so every hash stays as pinned; null is
    the same run as absent; a value is a new run."""
    absent = compose_cfg("experiment=mnist/bn")
    assert "ghost_batch" not in absent.model.bn
    assert result_hash(absent) == PINNED["experiment=mnist/bn"]
    null = compose_cfg("experiment=mnist/bn", "+model.bn.ghost_batch=null")
    assert "ghost_batch" in null.model.bn and result_hash(null) == result_hash(absent)
    set_ = compose_cfg("experiment=mnist/bn", "+model.bn.ghost_batch=4")
    assert result_hash(set_) != result_hash(absent)
    assert result_hash(compose_cfg("experiment=mnist/bn", "+model.bn.ghost_batch=6")) not in (
        result_hash(set_),
        result_hash(absent),
    )
    assert parse_config(absent).model.bn.ghost_batch is None
    assert parse_config(null).model.bn.ghost_batch is None
    assert parse_config(set_).model.bn.ghost_batch == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("+model.bn.ghost_batch=7",), "ghost_batch=7 does not divide data.batch_size=60"),
        (("+model.bn.ghost_batch=1",), "model.bn.ghost_batch=1 is invalid: expected null or"),
        (("+model.bn.ghost_batch=4.0",), "model.bn.ghost_batch=4.0 is invalid"),
        (("+model.bn.ghost_batch=4", "norm=group_norm"), "model.norm=group_norm is not BN"),
        (("+model.bn.ghost_batch=4", "trainer.sync_bn=true"), "trainer.sync_bn=true"),
    ],
)
def test_ghost_batch_config_errors(compose_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(compose_cfg("experiment=mnist/bn", *overrides))


@pytest.mark.parametrize(
    ("experiment", "members"),
    [
        ("mnist/bn", None),
        ("mnist/bn", 2),
        ("fig2_small/bn_baseline", None),
        ("fig2_small/bn_baseline", 2),
    ],
)
def test_every_network_gets_ghost_bn_from_the_config(compose_cfg, experiment, members):
    """MLP, StackedMLP, BN-Inception and StackedBNInception built from a config with
    +model.bn.ghost_batch=4: every BN layer splits its batch (a batch of 6 fails)."""
    run = parse_config(compose_cfg(f"experiment={experiment}", "+model.bn.ghost_batch=4"))
    model = build_network(run.model, Normalization.from_model(run.model), members)
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert layers and all(layer.ghost_batch == 4 for layer in layers)
    mlp = run.model.target.endswith("MLP")
    example = (784,) if mlp else (run.model.in_channels, 28, 28)
    lead = () if members is None else (members,)  # stacked: member m's batch in row m
    x, y = torch.rand(*lead, 8, *example), torch.zeros(*lead, 8, dtype=torch.long)
    member_losses(model.train()(x), y).sum().backward()
    with pytest.raises(ValueError, match="ghost_batch=4"):
        model(x.narrow(len(lead), 0, 6))
