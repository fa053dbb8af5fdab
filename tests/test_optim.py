"""The optimiser leaves BN's gamma and beta undecayed; the schedule decays every N steps."""

from __future__ import annotations

import pytest
import torch

from bnrepro.config.schema import OptimConfig, parse
from bnrepro.models.batchnorm import BNStats
from bnrepro.models.mlp import MLP
from bnrepro.models.norms import Normalization
from bnrepro.training.optim import build_optimizer, build_scheduler

SETTINGS = {
    "base_lr": 0.1,
    "lr_mult": 1,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "norm_weight_decay": 0.0,
    "schedule": {"name": "exponential", "gamma": 0.5, "base_every_steps": 3, "every_steps": 3},
}


def optim(**changes: object) -> OptimConfig:
    """The `optim` settings, checked as a composed config's are."""
    return parse(OptimConfig, SETTINGS | changes, "optim")


CFG = optim()
BN = Normalization("bn", bn=BNStats(stats="ema", momentum=0.1, eps=1e-5, population_batches=100))


def test_no_weight_decay_on_bn_parameters():
    model = MLP(norm=BN)
    optimizer = build_optimizer(model, CFG)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            want = 0.0 if isinstance(module, torch.nn.BatchNorm1d) else 1e-4
            assert decay[id(p)] == want, name
    assert len(decay) == len(list(model.parameters()))


def test_exponential_decay_every_n_steps():
    optimizer = build_optimizer(MLP(), CFG)
    scheduler = build_scheduler(optimizer, CFG)
    lrs = []
    for _ in range(7):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step_batch()
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025])
    assert build_scheduler(optimizer, optim(schedule=None)) is None


def test_fused_sgd_gives_the_same_weights_as_the_loop():
    # configs/optim/sgd.yaml turns on the fused update for speed; it must not move a bit.
    weights = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = MLP(norm=BN)
        optimizer = build_optimizer(model, optim(momentum=0.0, fused=fused))
        assert optimizer.defaults["fused"] is (True if fused else None)
        for _ in range(5):
            x, y = torch.rand(60, 784), torch.randint(0, 10, (60,))
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
