"""The normalisations of models/norms.py: every `norm=` choice on every model, stacked as plain."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from bnrepro.config.schema import NoiseSettings, Norm, choices, parse_config
from bnrepro.errors import ConfigError
from bnrepro.models.batch_renorm import BatchRenorm
from bnrepro.models.mlp import MLP
from bnrepro.models.norms import ActivationNoise, Normalization, StackedGroupNorm, held_noise
from bnrepro.models.stacked_mlp import StackedMLP
from bnrepro.training.loop import member_losses
from bnrepro.training.optim import build_optimizer

CONFIGS = Path(__file__).parents[1] / "configs"
NEW_NORMS = ["batch_renorm", "group_norm", "layer_norm", "noisy_bn"]
BN = {"stats": "ema", "momentum": 0.1, "eps": 1e-5, "population_batches": 5}
SETTINGS = {
    # No warm-up: r and d act from the first step, so stacked and plain really are compared.
    "renorm": {
        "r_max": 3.0,
        "d_max": 5.0,
        "warmup_steps": 0,
        "r_max_steps": 0,
        "d_max_steps": 0,
        "momentum": 0.01,
        "eps": 1e-5,
    },
    "group_norm": {"groups": 32, "eps": 1e-5},
    "noise": {"mean": 1.0, "std": 0.5, "scale": [0.5, 2.0]},
}


def test_every_norm_has_a_config():
    files = {p.stem for p in (CONFIGS / "norm").glob("*.yaml")}
    assert set(choices(Norm)) <= files


@pytest.mark.parametrize("norm", NEW_NORMS)
@pytest.mark.parametrize(
    "experiment", ["mnist/bn", "fig2_small/bn_baseline", "imagenet/bn_baseline", "ics/bn"]
)
def test_every_norm_composes_with_every_model(compose_cfg, experiment, norm):
    """MNIST MLP, small and full BN-Inception: each builds with the norm and trains a step."""
    cfg = compose_cfg(f"experiment={experiment}", f"norm={norm}", "paths.output_dir=/tmp/x")
    run = parse_config(cfg)
    model = instantiate(cfg.model)
    assert model.normalization.kind == norm
    kinds = {type(m) for m in model.modules()}
    expected = {
        "batch_renorm": BatchRenorm,
        "group_norm": nn.GroupNorm,
        "layer_norm": nn.LayerNorm if run.model.target.endswith("MLP") else nn.GroupNorm,
        "noisy_bn": ActivationNoise,
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


def test_a_norm_without_its_settings_is_one_line(compose_cfg):
    cfg = compose_cfg("experiment=mnist/bn", "model.norm=group_norm")
    with pytest.raises(ConfigError, match="model.norm=group_norm needs model.group_norm"):
        parse_config(cfg)
    with pytest.raises(ValueError, match="needs the settings `renorm`"):
        Normalization.from_config("batch_renorm")


def test_group_count_divides_every_width():
    norm = Normalization.from_config("group_norm", group_norm={"groups": 32, "eps": 1e-5})
    for channels, groups in [(64, 32), (100, 4), (48, 16), (24, 8), (7, 1)]:
        layer = norm.layers(channels)["norm"]
        assert (layer.num_groups, layer.num_channels) == (groups, channels)


def kwargs(norm: str) -> dict:
    return {"norm": norm, "bn": BN, **SETTINGS}


@pytest.mark.parametrize("norm", ["none", "bn", "batch_renorm", "group_norm", "layer_norm"])
def test_stacked_members_compute_their_plain_networks(norm):
    mlps = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        mlps.append(MLP(**kwargs(norm)))
    stacked = StackedMLP.from_members(mlps, **kwargs(norm))
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


def test_noisy_bn_moves_each_units_distribution_every_step():
    settings = NoiseSettings(mean=1.0, std=0.5, scale=(0.5, 2.0))
    noise = ActivationNoise(settings)
    z = torch.randn(4000, 3)
    torch.manual_seed(0)
    a, b = noise.train()(z), noise(z)
    # Per unit: the mean moved by the drawn shift, the spread by the drawn scale, each step.
    assert (a.mean(0) - b.mean(0)).abs().max() > 0.1
    assert (a.std(0) / b.std(0) - 1).abs().max() > 0.1
    assert torch.equal(noise.eval()(z), z)  # off at inference
    model = nn.Sequential(noise.train())
    with held_noise(model):
        first, again = model(z), model(z)
    torch.testing.assert_close(first, again)
    stacked = ActivationNoise(settings, stacked=True)
    h = torch.randn(2, 3, 4000)  # (members, units, examples)
    out = stacked.train()(h)
    assert (out[0].mean(1) - out[1].mean(1)).abs().max() > 0.1  # each member its own draw


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
    for model in (MLP(**kwargs("batch_renorm")), StackedMLP(2, **kwargs("layer_norm"))):
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
