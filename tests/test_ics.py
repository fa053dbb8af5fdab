"""ICS and the loss landscape (bnrepro/measures/ics.py) against finite differences and closed
forms."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bnrepro.config.schema import NoiseSettings
from bnrepro.measures.ics import layer_parameters, measured_step
from bnrepro.models.batchnorm import BNStats
from bnrepro.models.mlp import MLP
from bnrepro.models.norms import Normalization
from bnrepro.models.stacked_mlp import StackedMLP
from bnrepro.training.loop import member_losses, train_step

BN = BNStats(stats="ema", momentum=0.1, eps=1e-5, population_batches=5)
NORMS = {
    "none": Normalization("none"),
    "bn": Normalization("bn", bn=BN),
    "noisy_bn": Normalization(
        "noisy_bn", NoiseSettings(mean=0.5, scale=(1.0, 1.25), scale_std=0.1, shift_spread=0.1), BN
    ),
}
SCALES = [0.5, 1.0, 2.0]


def tiny_mlp(norm: str, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    model = MLP(in_features=3, hidden=[5, 4], num_classes=3, norm=NORMS[norm], init_std=0.8)
    return model.double()


def batch(seed: int = 1, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def loss_at(model: nn.Module, params: list[torch.Tensor], x, y) -> float:
    """The training-mode loss with the parameters set to `params` (buffers restored)."""
    probe = copy.deepcopy(model).train()
    with torch.no_grad():
        for p, v in zip(probe.parameters(), params, strict=True):
            p.copy_(v)
        return member_losses(probe(x), y).sum().item()


def fd_grad(model: nn.Module, params: list[torch.Tensor], index: int, x, y, h=1e-6) -> np.ndarray:
    """Central finite differences of the loss with respect to params[index]."""
    base = [p.clone() for p in params]
    grad = np.zeros(base[index].numel())
    for j in range(base[index].numel()):
        for sign in (1, -1):
            moved = [p.clone() for p in base]
            moved[index].view(-1)[j] += sign * h
            grad[j] += sign * loss_at(model, moved, x, y) / (2 * h)
    return grad


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_ics_matches_finite_differences(norm):
    model = tiny_mlp(norm)
    reference = copy.deepcopy(model)
    x, y = batch()
    lr = 0.7
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    _, (record,) = measured_step(model, optimizer, x, y, SCALES, member_losses)

    before = [p.detach().clone() for p in reference.parameters()]
    grads = [fd_grad(reference, before, i, x, y) for i in range(len(before))]
    after = [p - lr * torch.from_numpy(g).view_as(p) for p, g in zip(before, grads, strict=True)]
    names = list(layer_parameters(reference))
    sizes = [len(group) for group in layer_parameters(reference).values()]
    starts = np.cumsum([0, *sizes[:-1]])
    for name, first in zip(names[1:], starts[1:], strict=True):
        mixed = [*after[:first], *before[first:]]
        shifted = fd_grad(reference, mixed, first, x, y)
        original = grads[first]
        l2 = np.linalg.norm(original - shifted)
        cos = original @ shifted / (np.linalg.norm(original) * np.linalg.norm(shifted))
        assert record[f"ics/{name}/l2"] == pytest.approx(l2, rel=1e-5, abs=1e-9)
        assert record[f"ics/{name}/cos"] == pytest.approx(cos, rel=1e-7)
        assert l2 > 1e-3  # the earlier layers' step did move this layer's gradient
    # The step taken is the ordinary step: the model ends at theta - lr g.
    for p, want in zip(model.parameters(), after, strict=True):
        torch.testing.assert_close(p.detach(), want, atol=1e-7, rtol=1e-6)


def test_landscape_of_a_quadratic_matches_its_closed_form():
    """A linear classifier with squared loss: L(theta - eta g) and grad L(theta - eta g) are
    known exactly, and the effective beta-smoothness is ||H g|| / ||g|| for every step size."""
    torch.manual_seed(0)
    model = MLP(in_features=4, hidden=[], num_classes=2, init_std=0.5).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    t = torch.randn(16, 2, dtype=torch.float64)

    def squared(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((logits - target) ** 2).sum(dim=-1).mean().reshape(1) / 2

    lr = 0.3
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    W = model.classifier.weight.detach().numpy().copy()
    b = model.classifier.bias.detach().numpy().copy()
    _, (record,) = measured_step(model, optimizer, x, t, SCALES, squared)

    X = np.hstack([x.numpy(), np.ones((16, 1))])  # bias as a last input of 1
    theta = np.hstack([W, b[:, None]])
    T = t.numpy()

    def loss(th):
        return ((X @ th.T - T) ** 2).sum() / 32

    def grad(th):
        return (X @ th.T - T).T @ X / 16

    g = grad(theta)
    Hg = g @ X.T @ X / 16
    losses = [loss(theta)] + [loss(theta - lr * s * g) for s in SCALES]
    changes = [np.linalg.norm(grad(theta - lr * s * g) - g) for s in SCALES]
    assert record["landscape/loss_range"] == pytest.approx(max(losses) - min(losses), rel=1e-9)
    assert record["landscape/grad_change"] == pytest.approx(max(changes), rel=1e-9)
    beta = np.linalg.norm(Hg) / np.linalg.norm(g)
    assert record["landscape/beta"] == pytest.approx(beta, rel=1e-9)
    assert record["landscape/grad_norm"] == pytest.approx(np.linalg.norm(g), rel=1e-9)
    # Scale-free: the change relative to ||g|| is eta_max ||H g|| / ||g||.
    relative = lr * max(SCALES) * np.linalg.norm(Hg) / np.linalg.norm(g)
    assert record["landscape/grad_change_rel"] == pytest.approx(relative, rel=1e-9)
    assert record["landscape/loss"] == pytest.approx(loss(theta), rel=1e-9)
    assert changes[-1] == pytest.approx(lr * SCALES[-1] * np.linalg.norm(Hg), rel=1e-9)


@pytest.mark.parametrize("norm", ["none", "bn", "noisy_bn"])
def test_no_step_no_shift(norm):
    """With a zero learning rate nothing moves: every layer's ICS is 0 and its cosine 1 (for
    noisy BN only if the noise is held across the measurement's passes)."""
    model = tiny_mlp(norm)
    x, y = batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    _, (record,) = measured_step(model, optimizer, x, y, SCALES, member_losses)
    for name in ("h2", "classifier"):
        assert record[f"ics/{name}/l2"] == 0.0
        assert record[f"ics/{name}/cos"] == pytest.approx(1.0, abs=1e-12)
    assert record["landscape/loss_range"] == 0.0


def test_measuring_leaves_the_run_as_an_ordinary_step_would():
    """Parameters, BN running statistics and the returned loss equal those of train_step."""
    model = tiny_mlp("bn")
    plain = copy.deepcopy(model)
    x, y = batch()
    losses, _ = measured_step(
        model, torch.optim.SGD(model.parameters(), lr=0.5), x, y, SCALES, member_losses
    )
    expected = train_step(plain, torch.optim.SGD(plain.parameters(), lr=0.5), x, y)
    torch.testing.assert_close(losses, expected)
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_stacked_members_are_measured_as_their_plain_networks():
    mlps = [tiny_mlp("bn", seed=s).float() for s in (3, 4)]
    kwargs = {"in_features": 3, "hidden": [5, 4], "num_classes": 3, "norm": NORMS["bn"]}
    stacked = StackedMLP.from_members(mlps, **kwargs)
    x, y = batch(n=8)
    xs, ys = torch.stack([x, x + 0.5]).float(), torch.stack([y, y.flip(0)])
    opt = torch.optim.SGD(stacked.parameters(), lr=0.5)
    _, records = measured_step(stacked, opt, xs, ys, SCALES, member_losses)
    for i, mlp in enumerate(mlps):
        opt = torch.optim.SGD(mlp.parameters(), lr=0.5)
        _, (plain,) = measured_step(mlp, opt, xs[i], ys[i], SCALES, member_losses)
        assert records[i].keys() == plain.keys()
        for key, value in plain.items():
            assert records[i][key] == pytest.approx(value, rel=2e-3, abs=1e-5), key
