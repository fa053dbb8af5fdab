"""The normalisations of models/norms.py: one table of norms, every `norm=` choice on every
model, stacked as plain, and a norm added in one place."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import get_type_hints

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnrepro.analysis.runs import find_runs
from bnrepro.config.schema import (
    NORMS,
    GroupNormSettings,
    InceptionConfig,
    MLPConfig,
    NoiseSettings,
    Norm,
    NormKind,
    RenormSettings,
    choices,
    is_bn,
    parse_config,
)
from bnrepro.errors import ConfigError
from bnrepro.models.batch_renorm import BatchRenorm
from bnrepro.models.batchnorm import BNStats
from bnrepro.models.inception import BNInception
from bnrepro.models.mlp import MLP
from bnrepro.models.networks import build_network
from bnrepro.models.norms import (
    NORM_LAYERS,
    ActivationNoise,
    Normalization,
    NormLayers,
    StackedGroupNorm,
    held_noise,
)
from bnrepro.models.stacked_mlp import StackedMLP
from bnrepro.training.loop import member_losses
from bnrepro.training.optim import build_optimizer

CONFIGS = Path(__file__).parents[1] / "configs"
NEW_NORMS = ["batch_renorm", "group_norm", "layer_norm", "noisy_bn"]
BN = BNStats(stats="ema", momentum=0.1, eps=1e-5, population_batches=5)
SETTINGS = {
    # No warm-up: r and d act from the first step, so stacked and plain really are compared.
    "renorm": RenormSettings(
        r_max=3.0,
        d_max=5.0,
        warmup_steps=0,
        r_max_steps=0,
        d_max_steps=0,
        momentum=0.01,
        eps=1e-5,
    ),
    "group_norm": GroupNormSettings(groups=32, eps=1e-5),
    "noise": NoiseSettings(mean=0.5, scale=(1.0, 1.25), scale_std=0.1, shift_spread=0.1),
}


def normalization(norm: str) -> Normalization:
    """The normalisation `norm` with the settings above (a run's comes from its config)."""
    kind = NORMS[norm]
    return Normalization(norm, SETTINGS.get(kind.section), BN if kind.is_bn else None)


def test_every_norm_has_a_config():
    files = {p.stem for p in (CONFIGS / "norm").glob("*.yaml")}
    assert set(choices(Norm)) <= files


def test_one_table_of_norms_on_each_side():
    """The schema's NORMS (torch-free) and the layers' NORM_LAYERS name the same norms; each
    settings section is a field of every model config and a setting of its norm's config."""
    assert tuple(NORMS) == choices(Norm)
    assert NORM_LAYERS.keys() == NORMS.keys()
    for norm, kind in NORMS.items():
        if kind.section is None:
            continue
        for config in (MLPConfig, InceptionConfig):
            assert kind.section in get_type_hints(config)
        assert kind.section in OmegaConf.load(CONFIGS / "norm" / f"{norm}.yaml")


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_is_bn_says_whether_the_layers_are_bn(norm):
    """The torch-free fact agrees with the layers built: BN's kinds, and only they, have
    torch BN layers (whose inference statistics come from model.bn)."""
    model = MLP(hidden=[8, 6], norm=normalization(norm))
    stacked = StackedMLP(2, hidden=[8, 6], norm=normalization(norm))
    for network in (model, stacked):
        assert any(isinstance(m, _BatchNorm) for m in network.modules()) == is_bn(norm)


def test_a_noisy_bn_run_keeps_its_bn_statistics_in_the_analysis(compose_cfg, tmp_path):
    """analysis/runs.py's variant of a run whose summary predates `variant` (read from its
    stored config) is the trainer's own (RunConfig.variant), for noisy BN as for BN."""
    for experiment in ("ics/noisy_bn", "ics/bn", "ics/baseline"):
        cfg = compose_cfg(f"experiment={experiment}", "model.bn.stats=cumulative")
        run = parse_config(cfg)
        run_dir = tmp_path / experiment.replace("/", "_")
        (run_dir / ".hydra").mkdir(parents=True)
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # as Hydra stores it
        summary = {"arm": run.arm, "seed": run.seed}  # an old summary.json: no variant
        (run_dir / "summary.json").write_text(json.dumps(summary))
        (run_dir / "metrics.jsonl").write_text("")
        (record,) = find_runs(run_dir)
        assert record.variant == run.variant
        assert record.variant["bn_stats"] == ("cumulative" if is_bn(run.model.norm) else None)


@dataclass(frozen=True)
class ShiftSettings:
    """The throwaway norm's settings section: its beta's starting value."""

    beta: float


class Shift(nn.Module):
    """A throwaway norm: the identity, plus a learnt beta per feature (per member and feature
    of stacked (M, F, B) activations, member-major as every stacked norm's)."""

    def __init__(self, features: int, beta: float, members: int | None = None) -> None:
        super().__init__()
        self.features, self.members = features, members
        self.bias = nn.Parameter(torch.full(((members or 1) * features,), beta))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.members is not None:
            return h + self.bias.view(self.members, self.features, 1)
        return h + self.bias.view(1, -1, *[1] * (h.dim() - 2))


def test_a_new_norm_is_one_entry_in_each_table(monkeypatch):
    """A norm added in-process (its NORMS and NORM_LAYERS entries, its module and settings
    here) builds MLP, StackedMLP and BN-Inception with no other change, then is gone."""
    shift = NormLayers(
        plain=lambda norm, features, dims: {"norm": Shift(features, norm.settings.beta)},
        stacked=lambda norm, members, features: {
            "norm": Shift(features, norm.settings.beta, members)
        },
    )
    with monkeypatch.context() as patch:
        patch.setitem(NORMS, "shift", NormKind(section="shift", is_bn=False))
        patch.setitem(NORM_LAYERS, "shift", shift)
        norm = Normalization("shift", ShiftSettings(beta=0.5))
        mlps = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            mlps.append(MLP(in_features=12, hidden=[8, 6], norm=norm))
        stacked = StackedMLP.from_members(mlps, in_features=12, hidden=[8, 6], norm=norm)
        inception = BNInception(
            num_classes=3, norm=norm, in_channels=1, stem="small", width_mult=1 / 16,
            modules=["3a", "3c"],
        )  # fmt: skip
        x = torch.rand(2, 5, 12)
        for i, mlp in enumerate(mlps):
            assert [m.features for m in mlp.modules() if isinstance(m, Shift)] == [8, 6]
            assert all(block.linear.bias is None for block in mlp.layers.values())  # beta's
            torch.testing.assert_close(stacked(x)[i], mlp(x[i]))
        convs = [m for m in inception.modules() if isinstance(m, nn.Conv2d)]
        shifts = [m for m in inception.modules() if isinstance(m, Shift)]
        assert len(shifts) == len(convs) > 0 and all(c.bias is None for c in convs)
        assert all(torch.all(s.bias == 0.5) for s in shifts)
        assert inception(torch.rand(2, 1, 28, 28)).shape == (2, 3)
    assert "shift" not in NORMS and "shift" not in NORM_LAYERS


@pytest.mark.parametrize("norm", NEW_NORMS)
@pytest.mark.parametrize(
    "experiment", ["mnist/bn", "fig2_small/bn_baseline", "imagenet/bn_baseline", "ics/bn"]
)
def test_every_norm_composes_with_every_model(compose_cfg, experiment, norm):
    """MNIST MLP, small and full BN-Inception: each builds with the norm and trains a step."""
    cfg = compose_cfg(f"experiment={experiment}", f"norm={norm}", "paths.output_dir=/tmp/x")
    run = parse_config(cfg)
    model = build_network(run.model, Normalization.from_model(run.model))
    assert model.normalization.kind == norm
    kinds = {type(m) for m in model.modules()}
    expected = {
        "batch_renorm": BatchRenorm,
        "group_norm": nn.GroupNorm,
        "layer_norm": nn.LayerNorm if run.model.target.endswith("MLP") else nn.GroupNorm,
        "noisy_bn": ActivationNoise,
        "noise": ActivationNoise,
    }[norm]
    assert expected in kinds
    if run.model.target.endswith("MLP"):
        x = torch.rand(4, 784)
    else:
        side = 28 if run.model.stem == "small" else 64
        x = torch.rand(2, run.model.in_channels, side, side)
    loss = member_losses(model.train()(x), torch.zeros(x.shape[0], dtype=torch.long)).sum()
    loss.backward()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert all(m.bias is None for m in convs[:-1])  # the norm's beta replaces the bias


@pytest.mark.parametrize("norm", [n for n, kind in NORMS.items() if kind.section is not None])
def test_a_norm_without_its_settings_is_one_line(compose_cfg, norm):
    """Checked once, by the schema: the networks take the settings as parsed."""
    cfg = compose_cfg("experiment=mnist/bn", f"model.norm={norm}")
    section = NORMS[norm].section
    with pytest.raises(ConfigError, match=f"model.norm={norm} needs model.{section}"):
        parse_config(cfg)


def test_a_runs_normalization_is_its_model_configs(compose_cfg):
    run = parse_config(compose_cfg("experiment=ics/noisy_bn", "model.bn.stats=ema"))
    norm = Normalization.from_model(run.model)
    assert (norm.kind, norm.settings) == ("noisy_bn", run.model.noise)
    assert isinstance(norm.bn, BNStats) and norm.bn.stats == "ema"
    run = parse_config(compose_cfg("experiment=mnist/bn", "norm=group_norm"))
    assert Normalization.from_model(run.model) == Normalization("group_norm", run.model.group_norm)


def test_group_count_divides_every_width():
    norm = Normalization("group_norm", GroupNormSettings(groups=32, eps=1e-5))
    for channels, groups in [(64, 32), (100, 4), (48, 16), (24, 8), (7, 1)]:
        layer = norm.layers(channels)["norm"]
        assert (layer.num_groups, layer.num_channels) == (groups, channels)


@pytest.mark.parametrize("norm", ["none", "bn", "batch_renorm", "group_norm", "layer_norm"])
def test_stacked_members_compute_their_plain_networks(norm):
    mlps = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        mlps.append(MLP(norm=normalization(norm)))
    stacked = StackedMLP.from_members(mlps, norm=normalization(norm))
    x, y = torch.rand(2, 32, 784), torch.randint(0, 10, (2, 32))
    for _ in range(2):  # the second step sees the running statistics the first one moved
        losses = member_losses(stacked.train()(x), y)
        stacked.zero_grad()
        losses.sum().backward()
        for i, mlp in enumerate(mlps):
            mlp.zero_grad()
            loss = member_losses(mlp.train()(x[i]), y[i])
            loss.backward()
            assert losses[i].item() == pytest.approx(loss.item(), rel=1e-5)
            for name in ("h1", "h3"):
                torch.testing.assert_close(
                    stacked.layers[name].linear.weight.grad[i],
                    mlp.layers[name].linear.weight.grad,
                    atol=1e-6,
                    rtol=1e-4,
                )
    shared = torch.rand(16, 784)
    for i, mlp in enumerate(mlps):
        torch.testing.assert_close(
            stacked.eval()(shared)[i], mlp.eval()(shared), atol=1e-5, rtol=1e-5
        )


ALGORITHM_1 = NoiseSettings(mean=0.5, scale=(1.0, 1.25), scale_std=0.1, shift_spread=0.1)


def test_noisy_bn_draws_as_algorithm_1():
    """Santurkar et al.'s Algorithm 1 (Appendix A.2.1): per unit and step mu ~ U(-0.5, 0.5),
    sigma ~ U(1, 1.25); per example s ~ N(sigma, 0.1), m ~ U(mu - 0.1, mu + 0.1). Checked on
    the moments of many draws: per step, the example mean of s is sigma and of m is mu; over
    steps those follow their uniforms; within a step s has sd 0.1 and m - mu sd 0.1/sqrt(3)."""
    torch.manual_seed(0)
    noise = ActivationNoise(ALGORITHM_1)
    z = torch.zeros(20000, 4, dtype=torch.float64)
    sigmas, mus, s_sd, m_sd = [], [], [], []
    for _ in range(400):
        s, m = noise.draw(z)
        assert s.shape == m.shape == z.shape  # one draw per example and unit
        sigmas.append(s.mean(0))
        mus.append(m.mean(0))
        s_sd.append(s.std(0))
        m_sd.append(m.std(0))
    sigma, mu = torch.stack(sigmas), torch.stack(mus)
    assert sigma.min() > 1.0 - 0.01 and sigma.max() < 1.25 + 0.01
    assert mu.min() > -0.5 - 0.01 and mu.max() < 0.5 + 0.01
    # U(a, b) has mean (a + b) / 2 and sd (b - a) / sqrt(12): over 1,600 draws, within 5 %.
    torch.testing.assert_close(
        sigma.mean(), torch.tensor(1.125, dtype=torch.float64), atol=0.005, rtol=0
    )
    torch.testing.assert_close(
        sigma.std(), torch.tensor(0.25 / 12**0.5, dtype=torch.float64), atol=0.004, rtol=0
    )
    torch.testing.assert_close(mu.mean(), torch.tensor(0.0, dtype=torch.float64), atol=0.02, rtol=0)
    torch.testing.assert_close(
        mu.std(), torch.tensor(1 / 12**0.5, dtype=torch.float64), atol=0.015, rtol=0
    )
    torch.testing.assert_close(
        torch.stack(s_sd).mean(), torch.tensor(0.1, dtype=torch.float64), atol=0.001, rtol=0
    )
    torch.testing.assert_close(
        torch.stack(m_sd).mean(),
        torch.tensor(0.2 / 12**0.5, dtype=torch.float64),
        atol=0.001,
        rtol=0,
    )


def test_noise_is_applied_as_s_z_plus_m_and_held_on_request():
    noise = ActivationNoise(ALGORITHM_1)
    z = torch.randn(4000, 3)
    torch.manual_seed(0)
    a = noise.train()(z)
    s, m = noise._last
    torch.testing.assert_close(a, s * z + m)
    b = noise(z)
    # Per unit: the mean moved by the drawn shift, the spread by the drawn scale, each step.
    assert (a.mean(0) - b.mean(0)).abs().max() > 0.05
    assert torch.equal(noise.eval()(z), z)  # off at inference
    model = nn.Sequential(noise.train())
    with held_noise(model):
        first, again = model(z), model(z)
    torch.testing.assert_close(first, again)
    conv = ActivationNoise(ALGORITHM_1)
    s, m = conv.draw(torch.zeros(5, 3, 4, 4))
    assert s.shape == m.shape == (5, 3, 1, 1)  # a channel is the unit: one draw per example
    stacked = ActivationNoise(ALGORITHM_1, stacked=True)
    h = torch.randn(2, 3, 4000)  # (members, units, examples)
    out = stacked.train()(h)
    assert (out[0].mean(1) - out[1].mean(1)).abs().max() > 0.05  # each member its own draw


def test_new_norms_params_take_the_norm_weight_decay():
    from bnrepro.config.schema import OptimConfig

    cfg = OptimConfig(
        base_lr=0.1,
        lr_mult=1,
        lr=0.1,
        momentum=0.0,
        weight_decay=0.5,
        norm_weight_decay=0.0,
        schedule=None,
    )
    renorm, layer_norm = normalization("batch_renorm"), normalization("layer_norm")
    for model in (MLP(norm=renorm), StackedMLP(2, norm=layer_norm)):
        groups = build_optimizer(model, cfg).param_groups
        norm_params = {id(p) for p in groups[1]["params"]}
        norms = [m for m in model.modules() if isinstance(m, BatchRenorm | StackedGroupNorm)]
        assert norms and all(id(m.weight) in norm_params for m in norms)
        assert groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ("experiment=fig2_small/bn_baseline", "+trainer.ics={every: 10, step_scales: [1.0]}"),
            "trainer.ics measures the layers of the MNIST MLP",
        ),
        (("experiment=bn_stats/bn", "norm=group_norm"), "trainer.bn_stats_probe compares"),
        (("experiment=ics/bn", "trainer.ics.step_scales=[]"), "trainer.ics.step_scales=[]"),
    ],
)
def test_a_probe_that_cannot_apply_is_one_line(compose_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(compose_cfg(*overrides))
