"""BN-Inception against the paper's appendix table (Figure 5), and its switches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnrepro.models.batchnorm import BNStats
from bnrepro.models.inception import BNInception
from bnrepro.models.norms import Normalization

# model.bn of configs/model/bn_inception.yaml; models take their normalisation explicitly.
BN_SETTINGS = {"stats": "ema", "momentum": 0.1, "eps": 1e-5, "population_batches": 100}
BN = Normalization("bn", bn=BNStats(**BN_SETTINGS))
NONE = Normalization("none")

STAGES = [
    "conv1", "pool1", "conv2_reduce", "conv2", "pool2",
    "3a", "3b", "3c", "4a", "4b", "4c", "4d", "4e", "5a", "5b",
]  # fmt: skip

# (C, H, W) of every stage for a 224x224 input: the table's printed sizes (proj_4cd = 96).
TABLE_96 = {
    "conv1": (64, 112, 112),
    "pool1": (64, 56, 56),
    "conv2_reduce": (64, 56, 56),
    "conv2": (192, 56, 56),
    "pool2": (192, 28, 28),
    "3a": (256, 28, 28),
    "3b": (320, 28, 28),
    "3c": (576, 14, 14),
    "4a": (576, 14, 14),
    "4b": (576, 14, 14),
    "4c": (576, 14, 14),
    "4d": (576, 14, 14),
    "4e": (1024, 7, 7),
    "5a": (1024, 7, 7),
    "5b": (1024, 7, 7),
}
# With the table's literal "avg + 128" at 4c and 4d: 608 channels there, and 4e passes its
# 608-channel input through: 192 + 256 + 608 = 1056.
TABLE_128 = TABLE_96 | {"4c": (608, 14, 14), "4d": (608, 14, 14), "4e": (1056, 7, 7)}

# This implementation's count (BN, 1000 classes, proj_4cd = 96): 10,150,080 conv weights,
# 19,904 BN gammas and betas, 1,025,000 in the classifier. Change it only with the architecture.
PARAMS_96 = 11_194_984
PARAMS_128 = 11_285_224
PAPER_PARAMS = 13.6e6


def count(model: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("proj_4cd", "table"), [(96, TABLE_96), (128, TABLE_128)])
def test_stage_shapes_match_table(proj_4cd: int, table: dict) -> None:
    model = BNInception(proj_4cd=proj_4cd, norm=BN).eval()
    with torch.no_grad():
        outputs = model.stage_outputs(torch.randn(1, 3, 224, 224))
    assert list(outputs) == STAGES
    assert {name: tuple(out.shape[1:]) for name, out in outputs.items()} == table
    assert model.classifier.in_features == table["5b"][0]


def test_forward_gives_logits() -> None:
    model = BNInception(num_classes=7, norm=BN).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 7)


def test_parameter_count() -> None:
    n96 = num_params(BNInception(proj_4cd=96, norm=BN))
    n128 = num_params(BNInception(proj_4cd=128, norm=BN))
    assert n96 == PARAMS_96
    assert n128 == PARAMS_128
    # The paper states 13.6 M; the table's widths give 10.15 M conv weights (+ 1.03 M in the
    # classifier), so no reading of the table reaches it: we are ~18 % below. Pin that gap.
    assert 0.8 * PAPER_PARAMS < n96 < PAPER_PARAMS


def test_norm_none_has_biases_and_no_bn() -> None:
    model = BNInception(norm=NONE)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert count(model, nn.modules.batchnorm._BatchNorm) == 0
    assert all(c.bias is not None for c in convs)


def test_norm_bn_one_bn_per_conv_no_conv_bias() -> None:
    bn = BNStats(stats="cumulative", momentum=0.3, eps=1e-3, population_batches=1)
    model = BNInception(norm=Normalization("bn", bn=bn))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(c.bias is None for c in convs)
    assert len(bns) == len(convs)
    assert all(b.momentum is None and b.eps == 1e-3 for b in bns)  # cumulative average
    assert all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in bns)


def test_sigmoid_replaces_every_relu() -> None:
    model = BNInception(activation="sigmoid", norm=BN)
    assert count(model, nn.ReLU) == 0
    assert count(model, nn.Sigmoid) == count(model, nn.Conv2d)


def test_lrn_and_dropout_switches() -> None:
    plain = BNInception(norm=BN)
    assert count(plain, nn.LocalResponseNorm) == 0
    assert count(plain, nn.Dropout) == 0
    model = BNInception(lrn=True, dropout=0.4, norm=BN)
    assert count(model, nn.LocalResponseNorm) == 2
    assert count(model, nn.Dropout) == 1
    assert model.dropout.p == 0.4
    # The dropout's output is exactly what the classifier sees.
    seen: dict[str, torch.Tensor] = {}
    model.dropout.register_forward_hook(lambda m, i, o: seen.update(dropout=o))
    model.classifier.register_forward_pre_hook(lambda m, i: seen.update(classifier=i[0]))
    model.train()(torch.randn(2, 3, 64, 64))
    assert seen["classifier"] is seen["dropout"]


@pytest.mark.parametrize(
    ("norm", "activation"), [("bn", "relu"), ("none", "relu"), ("bn", "sigmoid")]
)
def test_training_step_finite(norm: str, activation: str) -> None:
    torch.manual_seed(0)
    norms = {"bn": BN, "none": NONE}
    model = BNInception(num_classes=5, norm=norms[norm], activation=activation).train()
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 5, (4,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_small_inputs_run() -> None:
    model = BNInception(num_classes=5, norm=BN)
    assert model.train()(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)
        assert model(torch.randn(1, 3, 33, 47)).shape == (1, 5)  # odd sides: branches agree


def test_channels_last_matches() -> None:
    model = BNInception(num_classes=5, norm=BN).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_nonlinearity_pre_hooks_fire() -> None:
    model = BNInception(num_classes=5, norm=BN)
    acts = model.nonlinearities()
    assert list(acts) == ["conv1", "conv2", "3c", "4e", "5b"]
    assert len({id(m) for m in acts.values()}) == len(acts)  # separate modules
    seen: dict[str, int] = {}
    for name, module in acts.items():
        module.register_forward_pre_hook(lambda m, i, name=name: seen.update({name: i[0].shape[1]}))
    model(torch.randn(2, 3, 64, 64))
    # Channels at each hooked input: 64, 192, and the 3x3-reduce widths of 3c, 4e, 5b.
    assert seen == {"conv1": 64, "conv2": 192, "3c": 128, "4e": 128, "5b": 192}


def test_bn_settings_reach_every_layer() -> None:
    # The settings themselves are checked once, by bnrepro.config.schema (test_configs.py).
    bn = BNStats(**BN_SETTINGS | {"stats": "population", "population_batches": 3, "eps": 1e-3})
    model = BNInception(num_classes=5, norm=Normalization("bn", bn=bn))
    assert model.normalization.bn.needs_population_batches
    bns = [b for b in model.modules() if isinstance(b, nn.BatchNorm2d)]
    assert bns and all(b.momentum == 0.1 and b.eps == 1e-3 for b in bns)
