"""Batch renorm as the module computes it, against Algorithm 1 of Ioffe (2017) in NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnrepro.models.batch_renorm import BatchRenorm, StackedBatchRenorm

EPS = 1e-5
# A short schedule so that a few steps cover the warmup, both ramps and the plateau.
SCHEDULE = dict(r_max=3.0, d_max=5.0, warmup_steps=3, r_max_steps=7, d_max_steps=5)


def expected_limits(t, r_max, d_max, warmup_steps, r_max_steps, d_max_steps):
    """(r_max_t, d_max_t) after t training batches: fixed, then linear, then the final limit."""
    if t < warmup_steps:
        return 1.0, 0.0

    def ramp(start, end, end_step):
        if t >= end_step:
            return end
        return start + (end - start) * (t - warmup_steps) / (end_step - warmup_steps)

    return ramp(1.0, r_max, r_max_steps), ramp(0.0, d_max, d_max_steps)


def channels_last(x):
    """(N, C, *) -> (N * prod(*), C): one row per value of every channel."""
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])


def from_channels_last(rows, shape):
    return np.moveaxis(rows.reshape(shape[0], *shape[2:], shape[1]), -1, 1)


def np_renorm_train(x, gamma, beta, mean, std, r_max, d_max, momentum, eps=EPS):
    """Algorithm 1 on (m, C) rows: output, new moving averages and what the backward needs."""
    mu = x.mean(axis=0)
    sigma = np.sqrt(((x - mu) ** 2).mean(axis=0) + eps)
    r = np.clip(sigma / std, 1.0 / r_max, r_max)
    d = np.clip((mu - mean) / std, -d_max, d_max)
    x_norm = (x - mu) / sigma
    y = gamma * (x_norm * r + d) + beta
    new_mean = mean + momentum * (mu - mean)
    new_std = std + momentum * (sigma - std)
    return y, new_mean, new_std, dict(x_norm=x_norm, sigma=sigma, r=r, d=d)


def np_renorm_backward(g, gamma, cache):
    """Gradients of sum(y * g) with r and d constants: BN's backward through mu_B, sigma_B."""
    m = g.shape[0]
    x_norm, sigma, r, d = cache["x_norm"], cache["sigma"], cache["r"], cache["d"]
    dbeta = g.sum(axis=0)
    dgamma = (g * (x_norm * r + d)).sum(axis=0)
    gn = g * gamma * r  # gradient w.r.t. x_norm = (x - mu_B) / sigma_B
    dx = (m * gn - gn.sum(axis=0) - x_norm * (gn * x_norm).sum(axis=0)) / (m * sigma)
    return dx, dgamma, dbeta


def test_numpy_backward_matches_finite_differences():
    """The reference backward itself, against central differences with r and d held fixed."""
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, (5, 3))
    gamma, beta, g = rng.normal(size=3), rng.normal(size=3), rng.normal(size=(5, 3))
    mean, std = np.array([0.0, 5.0, -1.0]), np.array([1.0, 0.5, 2.0])
    _, _, _, cache = np_renorm_train(x, gamma, beta, mean, std, 2.0, 1.0, 0.1)
    r, d = cache["r"], cache["d"]

    def loss(x, gamma, beta):
        mu = x.mean(axis=0)
        sigma = np.sqrt(((x - mu) ** 2).mean(axis=0) + EPS)
        return ((gamma * ((x - mu) / sigma * r + d) + beta) * g).sum()

    def numeric(f, a, h=1e-6):
        grad = np.zeros_like(a)
        for i in np.ndindex(a.shape):
            up, down = a.copy(), a.copy()
            up[i] += h
            down[i] -= h
            grad[i] = (f(up) - f(down)) / (2 * h)
        return grad

    dx, dgamma, dbeta = np_renorm_backward(g, gamma, cache)
    np.testing.assert_allclose(dx, numeric(lambda a: loss(a, gamma, beta), x), atol=1e-7)
    np.testing.assert_allclose(dgamma, numeric(lambda a: loss(x, a, beta), gamma), atol=1e-7)
    np.testing.assert_allclose(dbeta, numeric(lambda a: loss(x, gamma, a), beta), atol=1e-7)


@pytest.mark.parametrize("shape", [(16, 6), (6, 4, 3, 5)])
def test_training_steps_match_algorithm_1(shape):
    """Output, moving averages and gradients over warmup, ramp and plateau steps, in float64."""
    rng = np.random.default_rng(sum(shape))
    c = shape[1]
    momentum = 0.05
    module = BatchRenorm(c, momentum=momentum, eps=EPS, **SCHEDULE).double()
    gamma, beta = rng.normal(1.0, 0.5, c), rng.normal(0.0, 0.5, c)
    mean, std = rng.normal(0.0, 1.0, c), np.exp(rng.normal(0.0, 0.5, c))
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(gamma))
        module.bias.copy_(torch.from_numpy(beta))
        module.running_mean.copy_(torch.from_numpy(mean))
        module.running_std.copy_(torch.from_numpy(std))
    # Batches far from the moving averages at the outer channels and near them at the inner
    # ones, so that r and d are clipped at some channels and not at others.
    scale = std * np.geomspace(0.1, 10.0, c)
    shift = mean + std * np.linspace(-8.0, 8.0, c)
    view = (1, c) + (1,) * (len(shape) - 2)

    mixed = {"r": False, "d": False}  # a step clipped at some channels and not at others
    for t in range(10):
        r_max, d_max = expected_limits(t, **SCHEDULE)
        x = rng.normal(size=shape) * scale.reshape(view) + shift.reshape(view)
        g = rng.normal(size=shape)

        y_ref, mean, std, cache = np_renorm_train(
            channels_last(x), gamma, beta, mean, std, r_max, d_max, momentum
        )
        dx_ref, dgamma_ref, dbeta_ref = np_renorm_backward(channels_last(g), gamma, cache)

        xt = torch.from_numpy(x).requires_grad_()
        module.zero_grad()
        y = module(xt)
        (y * torch.from_numpy(g)).sum().backward()

        tight = dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(y, torch.from_numpy(from_channels_last(y_ref, shape)), **tight)
        torch.testing.assert_close(module.running_mean, torch.from_numpy(mean), **tight)
        torch.testing.assert_close(module.running_std, torch.from_numpy(std), **tight)
        assert module.num_batches_tracked.item() == t + 1
        torch.testing.assert_close(xt.grad, torch.from_numpy(from_channels_last(dx_ref, shape)))
        torch.testing.assert_close(module.weight.grad, torch.from_numpy(dgamma_ref))
        torch.testing.assert_close(module.bias.grad, torch.from_numpy(dbeta_ref))

        if (r_max, d_max) == (1.0, 0.0):  # warmup: plain BN, biased batch variance
            plain = F.batch_norm(
                torch.from_numpy(x), None, None, module.weight, module.bias, True, 0.0, EPS
            )
            torch.testing.assert_close(y, plain, rtol=1e-10, atol=1e-10)
        else:
            r_free = np.abs(np.log(cache["r"])) < np.log(r_max) - 1e-12
            d_free = np.abs(cache["d"]) < d_max - 1e-12
            for key, free in (("r", r_free), ("d", d_free)):
                mixed[key] |= bool(free.any() and (~free).any())
    # Not vacuous: after warmup, r and d were each clipped at some channels and not at others.
    assert mixed == {"r": True, "d": True}


def test_schedule_defaults():
    module = BatchRenorm(3)

    def at(t):
        module.num_batches_tracked.fill_(t)
        r, d = module.limits()
        assert r.device == d.device == module.running_std.device and r.dim() == d.dim() == 0
        return r.item(), d.item()

    assert at(0) == (1.0, 0.0)
    assert at(4999) == (1.0, 0.0)
    assert at(5000) == (1.0, 0.0)  # the ramps start from the plain-BN limits
    assert at(15000) == pytest.approx((1.0 + 2.0 * 10 / 35, 2.5), rel=1e-6)
    assert at(15000)[1] == 2.5  # midway for d
    assert at(22500) == (2.0, 4.375)  # midway for r
    assert at(25000) == pytest.approx((1.0 + 2.0 * 20 / 35, 5.0), rel=1e-6)
    assert at(25000)[1] == 5.0  # d_max_steps
    assert at(40000) == (3.0, 5.0)  # r_max_steps
    assert at(40001) == (3.0, 5.0)
    assert at(10**6) == (3.0, 5.0)


def test_schedule_without_room_for_a_ramp():
    """r_max_steps / d_max_steps <= warmup_steps: the final limits right after warmup."""
    module = BatchRenorm(2, warmup_steps=10, r_max_steps=10, d_max_steps=4, r_max=2.0, d_max=1.5)
    for t, expected in [(0, (1.0, 0.0)), (9, (1.0, 0.0)), (10, (2.0, 1.5)), (99, (2.0, 1.5))]:
        module.num_batches_tracked.fill_(t)
        assert tuple(v.item() for v in module.limits()) == expected
    module = BatchRenorm(2, warmup_steps=0, r_max_steps=0, d_max_steps=0)
    assert tuple(v.item() for v in module.limits()) == (3.0, 5.0)


def test_eval_uses_running_mean_and_std_exactly():
    rng = np.random.default_rng(1)
    c = 4
    module = BatchRenorm(c, eps=EPS).double()
    gamma, beta = rng.normal(size=c), rng.normal(size=c)
    # A small std, so that adding eps anywhere would change the output by about 5 %.
    mean, std = rng.normal(size=c), np.array([0.01, 0.02, 1.0, 3.0])
    with torch.no_grad():
        for name, value in [("weight", gamma), ("bias", beta)]:
            getattr(module, name).copy_(torch.from_numpy(value))
        module.running_mean.copy_(torch.from_numpy(mean))
        module.running_std.copy_(torch.from_numpy(std))
    module.num_batches_tracked.fill_(7)
    module.eval()
    x = rng.normal(size=(5, c, 3))
    y = module(torch.from_numpy(x))
    view = (1, c, 1)
    expected = gamma.reshape(view) * (x - mean.reshape(view)) / std.reshape(view)
    expected += beta.reshape(view)
    torch.testing.assert_close(y, torch.from_numpy(expected), rtol=1e-12, atol=1e-12)
    # Evaluation leaves the moving averages and the schedule alone.
    assert torch.equal(module.running_mean, torch.from_numpy(mean))
    assert torch.equal(module.running_std, torch.from_numpy(std))
    assert module.num_batches_tracked.item() == 7
    # One example is fine in eval mode.
    assert module(torch.from_numpy(x[:1, :, :1])).shape == (1, c, 1)


def test_stacked_members_match_plain_batch_renorm():
    members, features, batch = 3, 4, 10
    settings = dict(momentum=0.1, eps=EPS, warmup_steps=1, r_max_steps=2, d_max_steps=2)
    settings |= dict(r_max=1.5, d_max=0.5)
    stacked = StackedBatchRenorm(members, features, **settings).double()
    plains = [BatchRenorm(features, **settings).double() for _ in range(members)]
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        stacked.weight.normal_(1.0, 0.5, generator=gen)
        stacked.bias.normal_(0.0, 0.5, generator=gen)
        stacked.running_mean.normal_(0.0, 1.0, generator=gen)
        stacked.running_std.uniform_(0.5, 2.0, generator=gen)
        for i, plain in enumerate(plains):
            for name in ("weight", "bias", "running_mean", "running_std"):
                getattr(plain, name).copy_(
                    getattr(stacked, name)[i * features : (i + 1) * features]
                )

    member_scale = torch.tensor([0.2, 1.0, 4.0], dtype=torch.float64).view(members, 1, 1)
    for _ in range(3):
        h = torch.randn(members, features, batch, generator=gen, dtype=torch.float64)
        h = h * member_scale + torch.arange(members, dtype=torch.float64).view(members, 1, 1)
        y = stacked(h)
        assert y.shape == h.shape
        for i, plain in enumerate(plains):
            channels = slice(i * features, (i + 1) * features)
            torch.testing.assert_close(y[i], plain(h[i].T).T, rtol=1e-12, atol=1e-12)
            for name in ("running_mean", "running_std"):
                torch.testing.assert_close(
                    getattr(stacked, name)[channels], getattr(plain, name), rtol=1e-12, atol=1e-12
                )
            assert plain.num_batches_tracked.item() == stacked.num_batches_tracked.item()
    assert stacked.num_batches_tracked.item() == 3
    assert "members=3, features=4, 12" in repr(stacked)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_training_needs_more_than_one_value_per_channel(shape):
    module = BatchRenorm(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        module(torch.randn(shape))
    assert module.num_batches_tracked.item() == 0
    module(torch.randn(2, *shape[1:]))  # two values per channel are enough


def test_state_dict_round_trip_keeps_the_schedule():
    module = BatchRenorm(3, warmup_steps=2, r_max_steps=6, d_max_steps=4)
    for _ in range(5):
        module(torch.randn(8, 3))
    state = module.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_std", "num_batches_tracked"}

    resumed = BatchRenorm(3, warmup_steps=2, r_max_steps=6, d_max_steps=4)
    resumed.load_state_dict(state)
    assert resumed.num_batches_tracked.item() == 5
    assert [v.item() for v in resumed.limits()] == [v.item() for v in module.limits()]
    assert resumed.limits()[0].item() == pytest.approx(1.0 + 2.0 * 3 / 4)
    for name in ("running_mean", "running_std"):
        assert torch.equal(getattr(resumed, name), getattr(module, name))
