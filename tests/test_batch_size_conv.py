"""Issue 22's batch-size study: the conv net (models/convnet.py), Batch Renorm over ghost
batches against NumPy, the training subset (data.train_size), the warm-up schedule, and both
designs end to end with their figure."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bnrepro.config.schema import parse_config
from bnrepro.errors import ConfigError
from bnrepro.models.batch_renorm import BatchRenorm, StackedBatchRenorm
from bnrepro.models.convnet import ConvNet, StackedConvNet
from bnrepro.models.networks import build_network
from bnrepro.models.norms import Normalization
from bnrepro.training.optim import WarmupExponentialLR, build_scheduler

from .conftest import REPO
from .test_follow_up_experiments import make_figure

EPS = 1e-5
G = 4


def conv_cfg(compose_cfg, *overrides: str):
    return parse_config(compose_cfg("experiment=batch_size_conv/wu_he", *overrides))


@pytest.mark.parametrize("norm", ["bn", "group_norm", "layer_norm", "batch_renorm_scaled"])
def test_each_stacked_member_computes_its_plain_conv_net(compose_cfg, norm):
    """Member m of a StackedConvNet is the ConvNet it was loaded from, in training mode (batch
    statistics, each member its own batch) and in evaluation; with ghost batches for BN's
    kinds."""
    ghost = ["+model.bn.ghost_batch=4"] if norm in ("bn", "batch_renorm_scaled") else []
    cfg = conv_cfg(compose_cfg, f"norm={norm}", "data.batch_size=8", *ghost)
    norm_ = Normalization.from_model(cfg.model)
    torch.manual_seed(0)
    plain = [build_network(cfg.model, norm_) for _ in range(2)]
    stacked = build_network(cfg.model, norm_, members=2)
    stacked.memory_format = torch.contiguous_format  # exact sums, as the plain networks
    for i, net in enumerate(plain):
        stacked.load_member(i, net)
    x = torch.randn(2, 8, 1, 28, 28)
    out = stacked(x)
    for i, net in enumerate(plain):
        torch.testing.assert_close(out[i], net(x[i]), atol=1e-5, rtol=1e-5)
    stacked.eval()
    for net in plain:
        net.eval()
    out = stacked(x[0])
    for i, net in enumerate(plain):
        torch.testing.assert_close(out[i], net(x[0]), atol=2e-4, rtol=1e-4)


def test_group_norm_gets_wu_and_hes_32_groups(compose_cfg):
    cfg = conv_cfg(compose_cfg, "norm=group_norm")
    net = build_network(cfg.model, Normalization.from_model(cfg.model))
    groups = [m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert groups == [32, 32, 32]  # conv1 has 32 channels, conv2 and conv3 64: 2 per group
    assert isinstance(net, ConvNet)
    assert isinstance(
        build_network(cfg.model, Normalization.from_model(cfg.model), 2), StackedConvNet
    )


def test_widths_and_strides_must_pair(compose_cfg):
    with pytest.raises(ConfigError, match="model.widths has 3 layers but model.strides 2"):
        conv_cfg(compose_cfg, "model.strides=[2,2]")


def np_renorm(x, mean, std, r_max, d_max, gamma, beta):
    """Algorithm 1 of Ioffe 2017 on one (group of) batch (g, C, H, W), in NumPy."""
    dims = (0, 2, 3)
    mu = x.mean(axis=dims)
    sigma = np.sqrt(x.var(axis=dims) + EPS)
    r = np.clip(sigma / std, 1 / r_max, r_max)
    d = np.clip((mu - mean) / std, -d_max, d_max)
    v = lambda a: a.reshape(1, -1, 1, 1)  # noqa: E731
    x_hat = (x - v(mu)) / v(sigma) * v(r) + v(d)
    return v(gamma) * x_hat + v(beta), mu, sigma


def test_ghost_batch_renorm_against_numpy():
    """Each group of 4 renormalised with its own mu_B, sigma_B, r and d against the shared
    moving averages (r, d clipped: limits 1.5 and 0.5 are reached), which move towards the
    groups' average mu_B and sigma_B."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, size=(12, 3, 3, 2)) * np.repeat([0.5, 2.0, 4.0], 4).reshape(12, 1, 1, 1)
    x += np.repeat([-1.0, 0.0, 3.0], 4).reshape(12, 1, 1, 1)
    layer = BatchRenorm(
        3,
        r_max=1.5,
        d_max=0.5,
        warmup_steps=0,
        r_max_steps=0,
        d_max_steps=0,
        momentum=0.1,
        eps=EPS,
        ghost_batch=G,
    ).double()
    mean, std = np.array([0.2, -0.1, 0.5]), np.array([1.0, 2.0, 0.5])
    gamma, beta = np.array([0.5, 1.0, 2.0]), np.array([-1.0, 0.0, 1.0])
    with torch.no_grad():
        layer.running_mean.copy_(torch.from_numpy(mean))
        layer.running_std.copy_(torch.from_numpy(std))
        layer.weight.copy_(torch.from_numpy(gamma))
        layer.bias.copy_(torch.from_numpy(beta))
    out = layer(torch.from_numpy(x)).detach().numpy()
    parts = [np_renorm(x[k : k + G], mean, std, 1.5, 0.5, gamma, beta) for k in range(0, 12, G)]
    np.testing.assert_allclose(out, np.concatenate([p[0] for p in parts]), rtol=1e-10)
    mu_avg = np.mean([p[1] for p in parts], axis=0)
    sigma_avg = np.mean([p[2] for p in parts], axis=0)
    np.testing.assert_allclose(layer.running_mean.numpy(), mean + 0.1 * (mu_avg - mean))
    np.testing.assert_allclose(layer.running_std.numpy(), std + 0.1 * (sigma_avg - std))
    whole = np_renorm(x, mean, std, 1.5, 0.5, gamma, beta)[0]
    assert not np.allclose(out, whole)  # the groups matter


def test_ghost_batch_renorm_gradients_are_each_groups_own():
    """Backprop through ghost Batch Renorm: each group's input gradient is a plain layer's on
    that group alone (test_batch_renorm.py checks those against Algorithm 1), and gamma's and
    beta's gradients are the groups' sum; a channels_last input keeps its layout."""
    torch.manual_seed(0)
    settings = dict(r_max=1.5, d_max=0.5, warmup_steps=0, r_max_steps=0, d_max_steps=0, eps=EPS)
    x = (torch.randn(8, 3, 4, 5, dtype=torch.float64) * 2 + 1).contiguous(
        memory_format=torch.channels_last
    )
    g = torch.randn(8, 3, 4, 5, dtype=torch.float64)

    def prepared(layer: BatchRenorm) -> BatchRenorm:
        with torch.no_grad():  # moving averages away from the batches': r and d do work
            layer.running_mean.copy_(torch.tensor([0.5, -0.5, 1.0]))
            layer.running_std.copy_(torch.tensor([0.5, 2.0, 1.0]))
            layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            layer.bias.copy_(torch.tensor([-1.0, 0.0, 1.0]))
        return layer

    ghost = prepared(BatchRenorm(3, ghost_batch=G, **settings).double())
    xg = x.clone().requires_grad_()
    out = ghost(xg)
    assert out.is_contiguous(memory_format=torch.channels_last)
    (out * g).sum().backward()
    weight_grad, bias_grad = (
        torch.zeros(3, dtype=torch.float64),
        torch.zeros(3, dtype=torch.float64),
    )
    for k in range(0, 8, G):
        plain = prepared(BatchRenorm(3, **settings).double())
        xk = x[k : k + G].clone().requires_grad_()
        yk = plain(xk)
        (yk * g[k : k + G]).sum().backward()
        torch.testing.assert_close(out[k : k + G], yk, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xg.grad[k : k + G], xk.grad, rtol=1e-10, atol=1e-10)
        weight_grad += plain.weight.grad
        bias_grad += plain.bias.grad
    torch.testing.assert_close(ghost.weight.grad, weight_grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ghost.bias.grad, bias_grad, rtol=1e-10, atol=1e-10)


def test_stacked_ghost_batch_renorm_is_each_members_own():
    torch.manual_seed(0)
    stacked = StackedBatchRenorm(2, 3, warmup_steps=0, r_max_steps=0, d_max_steps=0, ghost_batch=G)
    h = torch.randn(2, 3, 8) * 3 + 1
    out = stacked(h)
    for m in range(2):
        plain = BatchRenorm(3, warmup_steps=0, r_max_steps=0, d_max_steps=0, ghost_batch=G)
        torch.testing.assert_close(out[m], plain(h[m].T).T)
        torch.testing.assert_close(stacked.running_mean.view(2, 3)[m], plain.running_mean)


def test_ghost_batch_reaches_batch_renorm_only_with_its_norm(compose_cfg):
    cfg = conv_cfg(compose_cfg, "norm=batch_renorm_scaled", "+model.bn.ghost_batch=4")
    net = build_network(cfg.model, Normalization.from_model(cfg.model))
    assert {m.ghost_batch for m in net.modules() if isinstance(m, BatchRenorm)} == {4}
    with pytest.raises(ConfigError, match="model.norm=layer_norm is not BN"):
        conv_cfg(compose_cfg, "norm=layer_norm", "+model.bn.ghost_batch=4")


def test_warmup_then_exponential_decay():
    """lr * min(1, (s+1)/W) * gamma ** (s // every) at step s."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.8)
    sched = WarmupExponentialLR(opt, gamma=0.5, every_steps=4, warmup_steps=5)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step_batch()
    expected = [0.8 * min(1, (s + 1) / 5) * 0.5 ** (s // 4) for s in range(10)]
    assert seen == pytest.approx(expected)
    assert seen[0] == pytest.approx(0.16) and seen[4] == pytest.approx(0.4)


def test_the_large_batch_experiment_sets_the_new_keys(compose_cfg):
    """warmup_steps, train_size and layer_errors are absent from every other config (the
    pinned hashes of tests/test_run_hashes.py stay): bn_stats_large sets them."""
    cfg = compose_cfg("experiment=bn_stats_large/bn")
    assert cfg.optim.schedule.warmup_steps == 20 and cfg.trainer.bn_stats_probe.layer_errors
    parsed = parse_config(cfg)
    assert build_scheduler(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), parsed.optim
    )
    assert parsed.optim.lr == pytest.approx(0.012 * 2048 / 32)


def test_train_size_takes_a_class_balanced_subset(compose_cfg, fashion_root):
    """data.train_size: that many of the images left after the validation split, the same
    number per class; one epoch of batches is drawn from them alone."""
    from omegaconf import open_dict

    from bnrepro.errors import DataError
    from bnrepro.infra.distributed import DistEnv
    from bnrepro.tasks import build_task
    from bnrepro.training.placement import decide_placement

    def task(*overrides: str):
        cfg = compose_cfg("experiment=batch_size_conv/wu_he", "logger=none", *overrides)
        with open_dict(cfg):
            cfg.data.root = str(fashion_root)
        run = parse_config(cfg)
        return build_task(run, DistEnv(), decide_placement(run, DistEnv()), None)

    batches = task("data.batch_size=200").train_batches
    assert batches.n_batches == 6000 // 200
    labels = torch.cat([next(batches)[1] for _ in range(batches.n_batches)])
    assert torch.bincount(labels, minlength=10).tolist() == [600] * 10
    with pytest.raises(DataError, match="data.train_size=55000 is not below the 55000"):
        task("data.train_size=55000")


def test_linear_scaling_of_the_designs(compose_cfg):
    """Wu & He's design: lr x B/32 and 5 epochs of steps; the ghost design: batch 32."""
    for batch in (2, 32):
        cfg = conv_cfg(compose_cfg, f"data.batch_size={batch}")
        assert cfg.optim.lr == pytest.approx(0.1 * batch / 32)
        assert cfg.trainer.steps == 5 * (6000 // batch)
    ghost = parse_config(compose_cfg("experiment=batch_size_conv/ghost", "+model.bn.ghost_batch=4"))
    assert ghost.data.batch_size == 32 and ghost.arm == "bn_g4"
    assert parse_config(compose_cfg("experiment=batch_size_conv/ghost")).arm == "bn_g32"


def test_committed_batch_size_conv_numbers_are_rebuilt_from_the_committed_run_logs(tmp_path):
    name = "batch_size_conv"
    results = REPO / "results" / name
    if not (results / "runs").is_dir():
        pytest.fail("results/batch_size_conv/runs is missing: run make reproduce-batch-size")
    make_figure("make_batch_size_conv_figure.py", results / "runs", tmp_path)
    assert (tmp_path / f"{name}.json").read_bytes() == (results / f"{name}.json").read_bytes()
    data = json.loads((tmp_path / f"{name}.json").read_text())
    for design, sizes in (
        ("wu_he", {"2", "4", "8", "16", "32"}),
        ("ghost", {"2", "4", "8", "16", "32"}),
    ):
        for norm, rows in data["designs"][design].items():
            assert set(rows) == sizes, (design, norm)
            assert all(len(r["values"]) == 3 and math.isfinite(r["mean"]) for r in rows.values())
