"""Santurkar, Tsipras, Ilyas & Madry (2018)'s deep linear network (DLN) and its loss landscape
along the gradient, with and without BN, trained by full-batch gradient descent.

The set-up (their Appendix A.1, A.2.2 and Figure 4's DLN panels, read second-hand: our digest
of the paper and a published summary of it; the paper's own text was not reachable from
here): 25 layers of 10x10 weight matrices, no biases, no nonlinearity; 1,000 synthetic
Gaussian examples, x ~ N(0, I); the objective ||W_1 ... W_25 x - A x||^2 with A a random
10x10 Gaussian matrix (we draw its entries N(0, 1)); full-batch gradient descent at lr 1e-6
for 10,000 steps; the landscape measured along the gradient at step sizes [1/100, 30] x lr,
the top just below the lr at which the network without BN diverges.

Where the paper is silent we chose, and each choice is a field of `DLNConfig`:

- ``init``: "glorot", W ~ N(0, 2 / (fan_in + fan_out)) = N(0, 1/10), the init the paper
  names for its VGG; it names none for the DLN. We tried three on seeds 1-3 (full-batch GD at
  lr 1e-6, the loss at step 2,000, and the lr at which GD without BN diverges):
  "glorot": no BN 2.0e4-2.8e4, BN 2.9e3-1.2e4, divergence at 4-8 x lr: BN trains faster, as
  the paper finds. "orthogonal" (random orthogonal W, so the product is orthogonal): no BN
  0.02-15, BN 18-28, divergence at 8-16 x lr: the plain network is perfectly conditioned and
  beats BN, against the paper. "torch_default" (nn.Linear's U(-1/sqrt(10), 1/sqrt(10)), gain
  0.58 a layer, 0.58^25 ~ 1e-6 in all): the plain network does not move in 2,000 steps and
  diverges only at 4096-8192 x lr. None puts the divergence just above 30 x lr, where the
  paper's range implies theirs was; scripts/deep_linear.py therefore also applies the paper's
  rule (top just below the measured divergence lr) beside the paper's numbers.
- ``reduction``: "sum": the loss is summed over the 1,000 examples (the paper's per-example
  ||.||^2, added up); "mean" divides by the number of examples, which moves every learning rate
  up by 1,000x (their lr 1e-6 fits the sum).
- ``bn_output``: BN follows every linear map, the last one included (True), or every one but
  the last (False). BN's affine gamma (start 1) and beta (start 0) are trained with the weights;
  ``bn_eps`` = 1e-5 (torch's default).
- the data, A and the initial weights are drawn per seed; both arms of one seed start from the
  same data, A and weights.

BN uses training-mode statistics over the full batch (biased variance), as torch's BatchNorm1d
does in training. Because the network is linear, the full-batch loss and every BN statistic
depend on the data only through its mean and covariance: `DLN.losses` therefore runs on 10x10
matrices (the 1,000 examples cost nothing per step), `DLN.outputs` is the ordinary per-example
forward, and tests/test_deep_linear.py checks the two agree. All tensors carry a leading
*member* dimension, one member per seed, so the seeds train side by side in one graph (each
member's loss depends on its own parameters only, so the gradient of the summed loss is each
member's own gradient).

Landscape measures at weights theta with gradient g, over eta in {lr * s for s in scales}
(`landscape`): ``loss_range`` = max - min of L(theta - eta g) over the etas and eta = 0;
``grad_change`` = max over eta of ||grad L(theta - eta g) - g|| (their "gradient
predictiveness"); ``grad_change_rel`` = that over ||g||, which does not change when the loss is
scaled; ``beta`` = max over eta of ||grad L(theta - eta g) - g|| / ||eta g|| (their "effective
beta-smoothness": change of the gradient per distance moved).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Sequence[Tensor]], Tensor]  # parameters (each (M, ...)) -> losses (M,)
DTYPE = torch.float64  # 10x10 matrices: double costs nothing; 25-fold products stay accurate


@dataclass(frozen=True)
class DLNConfig:
    """One DLN experiment. Defaults: the paper's numbers; `init`, `reduction`, `bn_output`
    and `bn_eps` are our choices (the module docstring says why)."""

    layers: int = 25
    width: int = 10
    examples: int = 1000
    lr: float = 1e-6
    steps: int = 10_000
    scales: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
    init: Literal["orthogonal", "glorot", "torch_default"] = "glorot"
    reduction: Literal["sum", "mean"] = "sum"
    bn_output: bool = True
    bn_eps: float = 1e-5


@dataclass(frozen=True)
class Data:
    """Each member's examples x (M, n, d), targets y = x A^T and the map A (M, d, d), with the
    moments the fast loss uses: K (M, d, d) with K K^T = the biased covariance of x (a
    Cholesky factor), `moments` = [K | mean of x] (M, d, d + 1) and `target_moments` = A
    `moments`."""

    x: Tensor
    y: Tensor
    target: Tensor
    cov_root: Tensor
    moments: Tensor
    target_moments: Tensor


def make_data(cfg: DLNConfig, seeds: Sequence[int]) -> Data:
    """Gaussian examples and a Gaussian target map for each seed (the data's own stream, so the
    weights' draw does not shift it)."""
    xs, maps = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        xs.append(torch.randn(cfg.examples, cfg.width, generator=gen, dtype=DTYPE))
        maps.append(torch.randn(cfg.width, cfg.width, generator=gen, dtype=DTYPE))
    x, target = torch.stack(xs), torch.stack(maps)
    mean = x.mean(dim=1)
    centred = x - mean[:, None, :]
    cov_root = torch.linalg.cholesky(centred.mT @ centred / cfg.examples)
    moments = torch.cat([cov_root, mean[..., None]], dim=-1)
    return Data(x, x @ target.mT, target, cov_root, moments, target @ moments)


def initial_weights(cfg: DLNConfig, seeds: Sequence[int]) -> Tensor:
    """(M, layers, d, d), from a stream per seed apart from the data's."""
    d = cfg.width
    out = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(10_000 + seed)
        w = torch.randn(cfg.layers, d, d, generator=gen, dtype=DTYPE)
        if cfg.init == "orthogonal":
            q, r = torch.linalg.qr(w)
            # Sign fix so Q is Haar-distributed, not biased by QR's sign convention.
            w = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
        elif cfg.init == "glorot":
            w = w * math.sqrt(2.0 / (d + d))
        elif cfg.init == "torch_default":
            # nn.Linear's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            w = (torch.rand(w.shape, generator=gen, dtype=DTYPE) * 2 - 1) / math.sqrt(d)
        else:
            raise ValueError(f"unknown init {cfg.init!r}")
        out.append(w)
    return torch.stack(out)


@dataclass(frozen=True)
class DLN:
    """The network of `cfg`, with BN (`bn`) or without. Parameters are a list: [W (M, L, d, d)]
    without BN, [W, gamma (M, B, d), beta (M, B, d)] with it (B = the number of BN layers)."""

    cfg: DLNConfig
    bn: bool

    @property
    def bn_layers(self) -> int:
        return (self.cfg.layers if self.cfg.bn_output else self.cfg.layers - 1) if self.bn else 0

    def init(self, seeds: Sequence[int]) -> list[Tensor]:
        """Leaf tensors that require grad; both arms of one seed share the weights."""
        w = initial_weights(self.cfg, seeds)
        params = [w]
        if self.bn:
            shape = (len(seeds), self.bn_layers, self.cfg.width)
            params += [torch.ones(shape, dtype=DTYPE), torch.zeros(shape, dtype=DTYPE)]
        return [p.requires_grad_() for p in params]

    def outputs(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        """The per-example forward (M, n, d): the reference `losses` is checked against."""
        h = x
        for i, w in enumerate(params[0].unbind(dim=1)):
            h = h @ w.mT
            if i < self.bn_layers:
                mu = h.mean(dim=1, keepdim=True)
                var = h.var(dim=1, unbiased=False, keepdim=True)
                h = (h - mu) / torch.sqrt(var + self.cfg.bn_eps)
                h = h * params[1][:, i, None, :] + params[2][:, i, None, :]
        return h

    def losses(self, params: Sequence[Tensor], data: Data) -> Tensor:
        """Each member's full-batch squared loss (M,), from the data's moments.

        The network is affine in x: h = (x - mean) M^T + m. We track Z = [M K | m], d x (d + 1),
        which every linear layer maps by W (one product per layer). BN's batch mean is m and
        its batch variances are the squared row norms of M K, so BN rescales the rows of M K
        and sets m to beta; the BN layers come first, so the mean column is attached after the
        last of them. With T = [A K | A mean] for the target map, the loss
        sum_i ||h_i - A x_i||^2 is n ||Z - T||^2: the cross term vanishes because the centred
        examples sum to zero."""
        weights = params[0].unbind(dim=1)
        b = self.bn_layers
        if b:
            d = self.cfg.width
            # BN of the rows of M K, as torch's fused layer_norm over the rows of [M K, -M K]:
            # their mean is 0 (to rounding) and their variance ||row of M K||^2 / d, so with eps / d
            # the layer norm is sqrt(d) x BN's normalisation; gamma / sqrt(d) undoes the sqrt(d).
            # One fused op (and backward) per layer instead of five: the hot path costs by the
            # op, not by the flop.
            gammas = (params[1] / math.sqrt(d))[..., None].unbind(dim=1)  # (M, d, 1): rows
            z = torch.cat([data.cov_root, -data.cov_root], dim=-1)
            for w, gamma in zip(weights[:b], gammas, strict=True):
                z = F.layer_norm(torch.bmm(w, z), (2 * d,), eps=self.cfg.bn_eps / d) * gamma
            z = torch.cat([z[..., :d], params[2][:, -1, :, None]], dim=-1)  # the last BN's beta
        else:
            z = data.moments
        for w in weights[b:]:
            z = torch.bmm(w, z)
        total = (z - data.target_moments).square().sum(dim=(1, 2))
        # sum over examples = n x the per-example mean; "mean" keeps the per-example mean.
        return total * self.cfg.examples if self.cfg.reduction == "sum" else total

    def loss_fn(self, data: Data) -> LossFn:
        return lambda params: self.losses(params, data)


def member_norm(tensors: Sequence[Tensor]) -> Tensor:
    """The l2 norm of each member's part of all the tensors together: (M,)."""
    members = tensors[0].shape[0]
    return torch.cat([t.reshape(members, -1) for t in tensors], dim=1).norm(dim=1)


def loss_and_grad(loss_fn: LossFn, params: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """(losses (M,), the gradient of each member's loss w.r.t. its parameters), by autograd.
    A parameter the loss does not use (an inner BN's beta: the next BN removes it) gets zeros."""
    leaves = [p.detach().requires_grad_() for p in params]
    losses = loss_fn(leaves)
    grads = torch.autograd.grad(losses.sum(), leaves, allow_unused=True, materialize_grads=True)
    return losses.detach(), list(grads)


@dataclass(frozen=True)
class Probe:
    """The landscape along -g from one theta: each member's loss there and ||g|| (M,), and at
    each step size eta (ascending) the loss L(theta - eta g) and the gradient change
    ||grad L(theta - eta g) - g|| (E, M). `measures` reduces them over the step sizes up to a
    top, so one probe serves several ranges."""

    step_sizes: tuple[float, ...]
    loss: Tensor
    grad_norm: Tensor
    moved_loss: Tensor
    grad_change: Tensor

    def measures(self, top: float | None = None) -> dict[str, Tensor]:
        """The measures of the module docstring over the step sizes <= top (all if None)."""
        keep = [i for i, eta in enumerate(self.step_sizes) if top is None or eta <= top * 1.0001]
        if not keep:
            raise ValueError(f"no step size <= {top}")
        etas = torch.tensor([self.step_sizes[i] for i in keep], dtype=DTYPE)[:, None]
        losses = torch.cat([self.loss[None], self.moved_loss[keep]])
        change = self.grad_change[keep]
        return {
            "loss": self.loss,
            "grad_norm": self.grad_norm,
            "loss_range": losses.max(dim=0).values - losses.min(dim=0).values,
            "grad_change": change.max(dim=0).values,
            "grad_change_rel": change.max(dim=0).values / self.grad_norm,
            "beta": (change / (etas * self.grad_norm)).max(dim=0).values,  # moved eta ||g||
        }


def landscape(loss_fn: LossFn, params: Sequence[Tensor], step_sizes: Sequence[float]) -> Probe:
    """Probe the landscape along -g from `params` at each step size (any order)."""
    step_sizes = tuple(sorted(step_sizes))
    loss0, g = loss_and_grad(loss_fn, params)
    losses, changes = [], []
    for eta in step_sizes:
        moved = [p.detach() - eta * d for p, d in zip(params, g, strict=True)]
        loss, g_moved = loss_and_grad(loss_fn, moved)
        losses.append(loss)
        changes.append(member_norm([a - b for a, b in zip(g_moved, g, strict=True)]))
    return Probe(step_sizes, loss0, member_norm(g), torch.stack(losses), torch.stack(changes))


def train(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    lr: float,
    steps: int,
    every: int,
    step_sizes: Sequence[float],
    progress: Callable[[int, Tensor], None] | None = None,
    progress_every: int = 1000,
) -> tuple[list[Tensor], list[int], list[Probe]]:
    """Full-batch GD for `steps` steps at `lr`, the landscape probed before step 0, every
    `every` steps and after the last step. Returns the final parameters, the probed steps and
    their probes. Probing does not move the run: each probe starts from a copy of theta."""
    params = [p.detach().clone() for p in params]
    probed, probes = [], []
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            probed.append(step)
            probes.append(landscape(loss_fn, params, step_sizes))
        if step == steps:
            break
        losses, grads = loss_and_grad(loss_fn, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(lr * g)
        if progress is not None and step % progress_every == 0:
            progress(step, losses)
    return params, probed, probes


@dataclass(frozen=True)
class Divergence:
    """`lr` (M,): each member's smallest lr on `grid` (ascending) at which GD diverged, inf
    where none did; `steps` and `blowup`: the rule (see `divergence_lr`)."""

    lr: Tensor
    grid: list[float]
    steps: int
    blowup: float
    seconds: float

    @property
    def largest_stable(self) -> float:
        """The largest grid lr below every member's divergence lr: the top of a landscape
        range chosen "just below the lr at which the network diverges"."""
        first = float(self.lr.min())
        below = [lr for lr in self.grid if lr < first]
        if not below:
            raise ValueError("GD diverged at the first lr of the grid")
        return below[-1]


def divergence_lr(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    lr_start: float,
    steps: int = 1000,
    blowup: float = 100.0,
    doublings: int = 12,
) -> Divergence:
    """GD from `params` at lr_start x 2^k, k = 0..doublings: a member diverges at an lr when,
    within `steps` steps, its loss becomes non-finite or exceeds `blowup` x its starting loss.
    Returns each member's smallest such lr. A factor, not any rise: GD near the stability edge
    can rise for a while and come back down, while past the edge the loss explodes. A member
    with its answer stops stepping, and the grid stops once every member has one."""
    start = time.perf_counter()
    members = params[0].shape[0]
    found = torch.full((members,), math.inf, dtype=DTYPE)
    grid: list[float] = []
    for k in range(doublings + 1):
        lr = lr_start * 2.0**k
        grid.append(lr)
        live = torch.isinf(found)
        theta = [p.detach().clone() for p in params]
        loss0 = None
        for _ in range(steps + 1):
            losses, grads = loss_and_grad(loss_fn, theta)
            loss0 = losses if loss0 is None else loss0
            bad = live & (~torch.isfinite(losses) | (losses > blowup * loss0))
            found[bad] = lr
            live &= ~bad
            if not live.any():
                break
            with torch.no_grad():
                for p, g in zip(theta, grads, strict=True):
                    # Only live members move, so a diverged one's NaNs and infs stay put.
                    mask = live.reshape(-1, *([1] * (p.dim() - 1)))
                    p.copy_(torch.where(mask, p - lr * g, p))
        if torch.isfinite(found).all():
            break
    return Divergence(found, grid, steps, blowup, time.perf_counter() - start)
