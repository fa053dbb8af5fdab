"""The deep linear network and its landscape measures (bnrepro/measures/deep_linear.py) against
closed forms: the DLN's gradient as a product of matrices, the measures on a quadratic (and a
quartic, where beta depends on the step), and the divergence lr on a quadratic of known
curvature."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bnrepro.measures.deep_linear import (
    DLN,
    DTYPE,
    DLNConfig,
    divergence_lr,
    landscape,
    loss_and_grad,
    make_data,
)

SEEDS = [1, 2]
SMALL = replace(DLNConfig(), examples=64)  # 25 layers of 10x10, as the paper; fewer examples


def closed_form_gradient(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """d/dW_i of ||X P^T - Y||^2 summed over examples, P = W_L ... W_1 (w: (L, d, d), applied
    W_1 first): with R = X P^T - Y, dL/dP = 2 R^T X and dL/dW_i = (W_L..W_i+1)^T dL/dP
    (W_i-1..W_1)^T."""
    layers, d, _ = w.shape
    eye = np.eye(d)
    below = [eye]  # below[i] = W_i-1 ... W_1 (0-based: w[i-1] @ ... @ w[0])
    for i in range(layers):
        below.append(w[i] @ below[-1])
    above = [eye] * (layers + 1)  # above[i] = W_L ... W_i+1 (0-based: w[L-1] @ ... @ w[i+1])
    for i in range(layers - 2, -1, -1):
        above[i] = above[i + 1] @ w[i + 1]
    d_p = 2 * (x @ below[layers].T - y).T @ x
    return np.stack([above[i].T @ d_p @ below[i].T for i in range(layers)])


def test_dln_gradient_matches_closed_form():
    data = make_data(SMALL, SEEDS)
    net = DLN(SMALL, bn=False)
    params = net.init(SEEDS)
    losses, (grad,) = loss_and_grad(net.loss_fn(data), params)
    # The per-example forward, by autograd too: the moment form must not be what agrees.
    per_example = ((net.outputs(params, data.x) - data.y) ** 2).sum(dim=(1, 2))
    (grad_examples,) = torch.autograd.grad(per_example.sum(), params)
    for m in range(len(SEEDS)):
        w, x, y = (t[m].detach().numpy() for t in (params[0], data.x, data.y))
        expected = closed_form_gradient(w, x, y)
        scale = np.abs(expected).max()
        assert np.abs(grad[m].numpy() - expected).max() <= 1e-10 * scale
        assert np.abs(grad_examples[m].numpy() - expected).max() <= 1e-10 * scale
        loss = ((x @ np.linalg.multi_dot(w[::-1]).T - y) ** 2).sum()
        assert losses[m].item() == pytest.approx(loss, rel=1e-10)


@pytest.mark.parametrize("bn_output", [True, False])
def test_bn_moment_form_matches_per_example_forward(bn_output):
    cfg = replace(SMALL, bn_output=bn_output)
    data = make_data(cfg, SEEDS)
    net = DLN(cfg, bn=True)
    params = net.init(SEEDS)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from gamma = 1, beta = 0, so every term is exercised
        params[1].add_(0.3 * torch.randn(params[1].shape, generator=gen, dtype=DTYPE))
        params[2].add_(torch.randn(params[2].shape, generator=gen, dtype=DTYPE))
    losses, grads = loss_and_grad(net.loss_fn(data), params)
    per_example = ((net.outputs(params, data.x) - data.y) ** 2).sum(dim=(1, 2))
    expected = torch.autograd.grad(per_example.sum(), params)
    torch.testing.assert_close(losses, per_example.detach(), rtol=1e-10, atol=0)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9 * want.abs().max().item())
    # BN after the last map pins the output's scale: its gamma and beta must matter.
    assert grads[1][:, -1].abs().max() > 0 and grads[2][:, -1].abs().max() > 0


def quadratic(curvatures: torch.Tensor):
    """L(w) = 0.5 w^T A w per member, A (M, n, n) symmetric."""
    return lambda params: 0.5 * torch.einsum("mi,mij,mj->m", params[0], curvatures, params[0])


def random_spd(eigenvalues: list[list[float]], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for eig in eigenvalues:
        q, _ = torch.linalg.qr(torch.randn(len(eig), len(eig), generator=gen, dtype=DTYPE))
        out.append(q @ torch.diag(torch.tensor(eig, dtype=DTYPE)) @ q.T)
    return torch.stack(out)


def test_landscape_measures_on_a_quadratic():
    a = random_spd([[3.0, 1.0, 0.5, 0.1], [0.9, 0.6, 0.2, 0.05]])
    w = torch.randn(2, 4, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    # Up to 0.6: past eta = 0.4 the first member's loss turns back up, so its lowest loss lies
    # inside the range, not at an end.
    etas = [0.01, 0.1, 0.3, 0.6]
    probe = landscape(quadratic(a), [w], etas)
    for top in (None, 0.3):
        got = probe.measures(top)
        used = [e for e in etas if top is None or e <= top]
        for m in range(2):
            am, wm = a[m].numpy(), w[m].numpy()
            g = am @ wm
            loss = [0.5 * v @ am @ v for v in [wm] + [wm - e * g for e in used]]
            ag, gn = np.linalg.norm(am @ g), np.linalg.norm(g)
            # grad L(w - eta g) - g = -eta A g exactly.
            assert got["loss_range"][m].item() == pytest.approx(max(loss) - min(loss), rel=1e-12)
            assert got["grad_change"][m].item() == pytest.approx(max(used) * ag, rel=1e-12)
            assert got["grad_change_rel"][m].item() == pytest.approx(max(used) * ag / gn, rel=1e-12)
            beta = max(np.linalg.norm(am @ (e * g)) / np.linalg.norm(e * g) for e in used)
            assert got["beta"][m].item() == pytest.approx(beta, rel=1e-12)
            assert got["grad_norm"][m].item() == pytest.approx(gn, rel=1e-12)


def test_beta_is_the_max_over_step_sizes():
    """On a quadratic beta is the same at every step size; on L = sum w^4 / 4 it is not, so
    this is where a min, a mean or the last step size would show."""
    w = torch.tensor([[1.0, -0.5, 0.25], [2.0, 0.3, -1.0]], dtype=DTYPE)
    etas = [0.05, 0.2, 0.4]
    got = landscape(lambda p: (p[0] ** 4).sum(dim=1) / 4, [w], etas).measures()
    for m in range(2):
        wm = w[m].numpy()
        g = wm**3
        betas = [np.linalg.norm((wm - e * g) ** 3 - g) / (e * np.linalg.norm(g)) for e in etas]
        assert len({round(b, 6) for b in betas}) == len(betas)  # it does depend on eta
        assert got["beta"][m].item() == pytest.approx(max(betas), rel=1e-12)


def test_divergence_lr_is_the_first_grid_lr_above_two_over_lambda_max():
    # GD on a quadratic diverges iff lr > 2 / lambda_max: 0.667 for the first member, 2.857
    # for the second. The grid 0.004 x 2^k holds 0.512 and 1.024, 2.048 and 4.096.
    a = random_spd([[3.0, 1.0, 0.1], [0.7, 0.2, 0.05]])
    w = torch.randn(2, 3, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    div = divergence_lr(quadratic(a), [w], lr_start=0.004, steps=100, blowup=100.0)
    for m in range(2):
        lam = torch.linalg.eigvalsh(a[m]).max().item()
        first_above = min(lr for lr in div.grid if lr > 2 / lam)
        assert div.lr[m].item() == pytest.approx(first_above, rel=1e-12)
    assert div.lr.tolist() == pytest.approx([1.024, 4.096], rel=1e-12)
    assert div.largest_stable == pytest.approx(0.512, rel=1e-12)


def test_script_runs_at_toy_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The real entrypoint, in this process (no second torch import), 20 steps: it writes the
    JSON, the table and the figure."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    import deep_linear as script  # scripts/deep_linear.py

    argv = ["deep_linear.py", "--out", str(tmp_path), "--seeds", "1", "--steps", "20"]
    monkeypatch.setattr(sys, "argv", [*argv, "--every", "10", "--divergence-steps", "5"])
    threads = torch.get_num_threads()
    try:
        script.main()
    finally:
        torch.set_num_threads(threads)  # main() sets 1: not for the rest of the session
    record = json.loads((tmp_path / "deep_linear.json").read_text())
    assert record["config"]["layers"] == 25 and record["traces"]["bn"]["steps"] == [0, 10, 20]
    assert "| BN | rule |" in (tmp_path / "deep_linear.md").read_text()
    assert (tmp_path / "deep_linear.png").stat().st_size > 10_000
