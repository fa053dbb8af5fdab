"""The percentile probe reads the input of the nonlinearity, unit by unit, in inference mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnrepro.measures.probes import nonlinearity_input_percentiles
from bnrepro.models.batchnorm import BNStats
from bnrepro.models.mlp import MLP
from bnrepro.models.norms import Normalization

PERCENTILES = [15, 50, 85]
BN = BNStats(stats="ema", momentum=0.1, eps=1e-5, population_batches=1)


def identity_mlp(norm: str = "none") -> MLP:
    """Two hidden layers of 4 units whose linear maps are the identity: known pre-activations."""
    model = MLP(
        in_features=4,
        hidden=[4, 4],
        num_classes=3,
        norm=Normalization(norm, bn=BN if norm == "bn" else None),
    )
    with torch.no_grad():
        for block in model.layers.values():
            block.linear.weight.copy_(torch.eye(4))
            if block.linear.bias is not None:
                block.linear.bias.zero_()
    return model.double()


def test_percentiles_of_known_preactivations():
    model = identity_mlp()
    x = torch.tensor(np.random.default_rng(0).normal(1.0, 2.0, size=(501, 4)))
    (out,) = nonlinearity_input_percentiles(model, model.nonlinearities(), x, 2, PERCENTILES)

    h1_input = x[:, 2].numpy()
    h2_input = 1.0 / (1.0 + np.exp(-h1_input))  # h1's sigmoid output feeds h2 unchanged
    for q, want in zip(PERCENTILES, np.percentile(h1_input, PERCENTILES), strict=True):
        assert out[f"act/h1/p{q}"] == pytest.approx(want, rel=1e-12)
    for q, want in zip(PERCENTILES, np.percentile(h2_input, PERCENTILES), strict=True):
        assert out[f"act/h2/p{q}"] == pytest.approx(want, rel=1e-12)
    assert set(out) == {f"act/h{i}/p{q}" for i in (1, 2) for q in PERCENTILES}


def test_bn_probe_reads_after_bn_with_inference_statistics():
    model = identity_mlp(norm="bn")
    bn = model.layers["h1"].bn
    with torch.no_grad():
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(4.0)
    x = torch.tensor(np.random.default_rng(1).normal(size=(200, 4)))
    model.train()  # the probe must switch to inference mode itself, and switch back
    (out,) = nonlinearity_input_percentiles(model, model.nonlinearities(), x, 0, PERCENTILES)
    after_bn = (x[:, 0].numpy() - 3.0) / np.sqrt(4.0 + 1e-5)
    assert out["act/h1/p50"] == pytest.approx(np.percentile(after_bn, 50), rel=1e-9)
    assert model.training
    assert float(bn.running_mean[0]) == 3.0  # inference mode: buffers untouched


def test_hooks_are_removed():
    model = identity_mlp()
    x = torch.zeros(10, 4, dtype=torch.float64)
    nonlinearity_input_percentiles(model, model.nonlinearities(), x, 0, PERCENTILES)
    assert all(not m._forward_pre_hooks for m in model.nonlinearities().values())
