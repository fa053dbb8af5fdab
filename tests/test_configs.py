"""Every config composes, the documented overrides exist, and bad values get one clear line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bnrepro.config.schema import (
    Activation,
    BNSettings,
    ImageNetData,
    InceptionConfig,
    MLPConfig,
    choices,
    parse_config,
)
from bnrepro.errors import ConfigError
from bnrepro.models.networks import build_network
from bnrepro.models.norms import Normalization

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(
    str(p.relative_to(CONFIGS / "experiment").with_suffix(""))
    for p in (CONFIGS / "experiment").rglob("*.yaml")
    if not p.name.startswith("_")  # _base.yaml: what a family's experiments share
)
BASES = sorted(
    str(p.relative_to(CONFIGS / "experiment").with_suffix(""))
    for p in (CONFIGS / "experiment").rglob("_base.yaml")
)
# The groups that make the paper's variants (README): an experiment file sets these and its names.
VARIANT_GROUPS = {"norm", "activation", "dropout", "lr_mult", "recipe"}


def test_there_are_experiments():
    assert {"mnist/baseline", "mnist/bn"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds(compose_cfg, experiment):
    cfg = compose_cfg(f"experiment={experiment}", "paths.output_dir=/tmp/x")
    run = parse_config(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    model = build_network(run.model, Normalization.from_model(run.model))
    instantiate(cfg.optim, params=model.parameters())
    assert cfg.logger.project  # experiments log to W&B by default


def test_experiments_set_only_their_variant_deltas():
    """Each experiment is its family's _base plus variant-group overrides and its names."""
    assert {"mnist/_base", "imagenet/_base"} <= set(BASES)
    for name in EXPERIMENTS:
        path = CONFIGS / "experiment" / f"{name}.yaml"
        assert path.read_text().startswith("# @package _global_\n"), name
        cfg = OmegaConf.to_container(OmegaConf.load(path))
        family = name.split("/")[0]
        assert set(cfg) == {"defaults", "experiment_name", "arm", "tags"}, name
        assert cfg["experiment_name"] == name, name
        defaults = cfg["defaults"]
        # The base first: Hydra wants a defaults list's overrides after its other entries.
        assert defaults[0] == f"/experiment/{family}/_base", name
        overrides = [d for d in defaults[1:] if d != "_self_"]
        assert all(isinstance(d, dict) and len(d) == 1 for d in overrides), name
        groups = [next(iter(d)) for d in overrides]
        assert all(g.startswith("override /") for g in groups), name
        groups = [g.removeprefix("override /") for g in groups]
        assert len(set(groups)) == len(groups) and set(groups) <= VARIANT_GROUPS, name


@pytest.mark.parametrize("base", BASES)
def test_a_base_is_not_an_experiment(compose_cfg, base):
    with pytest.raises(ConfigCompositionException, match="You must specify"):
        compose_cfg(f"experiment={base}")


def test_command_line_variants_beat_the_experiment(compose_cfg):
    overrides = ("norm=bn", "lr_mult=x30", "activation=relu", "dropout=inception")
    for experiment in ("mnist/grid", "mnist/baseline"):
        cfg = compose_cfg(f"experiment={experiment}", *overrides)
        assert (cfg.model.norm, cfg.model.activation, cfg.model.dropout) == ("bn", "relu", 0.4)
        assert cfg.optim.lr_mult == 30
    assert compose_cfg("experiment=mnist/grid", *overrides).arm == "bn_x30_relu_drop0.4"


def test_figure1_arms_follow_the_paper(compose_cfg):
    base = compose_cfg("experiment=mnist/baseline")
    bn = compose_cfg("experiment=mnist/bn")
    assert list(base.model.hidden) == [100, 100, 100] and base.model.activation == "sigmoid"
    assert base.trainer.steps == 50_000 and base.data.batch_size == 60
    assert (base.model.norm, bn.model.norm) == ("none", "bn")
    # The two arms differ in normalisation only (and in their names).
    diff = {k for k in ("data", "optim", "trainer") if base[k] != bn[k]}
    assert not diff


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("seed=7", "seed", 7),
        ("trainer.steps=123", "trainer.steps", 123),
        ("trainer.eval_every=11", "trainer.eval_every", 11),
        ("data.batch_size=32", "data.batch_size", 32),
        ("optim.lr=0.1", "optim.lr", 0.1),
        ("model.activation=relu", "model.activation", "relu"),
        ("model.dropout=0.2", "model.dropout", 0.2),
        ("model.norm=bn", "model.norm", "bn"),
        ("model.bn.stats=cumulative", "model.bn.stats", "cumulative"),
        ("paths.data_dir=/somewhere", "paths.data_dir", "/somewhere"),
        ("logger=none", "logger", {}),
    ],
)
def test_documented_overrides(compose_cfg, override, key, value):
    cfg = compose_cfg("experiment=mnist/bn", override)
    assert OmegaConf.select(cfg, key) == value
    parse_config(cfg)


def test_data_dir_comes_from_env(compose_cfg, monkeypatch):
    monkeypatch.setenv("DATA_DIR", "/from/env")
    assert compose_cfg().paths.data_dir == "/from/env"
    monkeypatch.delenv("DATA_DIR")
    assert compose_cfg().paths.data_dir.endswith("/data")


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=0", "data.batch_size=0 is invalid"),
        ("data.batch_size=1", "data.batch_size=1 is invalid"),
        ("trainer.steps=-5", "trainer.steps=-5 is invalid"),
        ("trainer.eval_every=0", "trainer.eval_every=0 is invalid"),
        ("optim.lr=abc", "optim.lr='abc' is invalid"),
        ("optim.lr=-1", "optim.lr=-1 is invalid"),
        ("model.bn.stats=foo", "model.bn.stats='foo' is invalid"),
        ("model.activation=tanh", "model.activation='tanh' is invalid"),
        ("model.norm=ln", "model.norm='ln' is invalid"),
        ("model.dropout=1.0", "model.dropout=1.0 is invalid"),
        ("trainer.probe.unit=100", "trainer.probe.unit=100 is invalid"),
        ("seeds=[1,1]", "seeds=[1, 1] is invalid"),
        ("seeds=[]", "seeds=[] is invalid"),
        ("seeds=[1,a]", "seeds=[1, 'a'] is invalid"),
        ("trainer.cuda_graph=1", "trainer.cuda_graph=1 is invalid"),
        ("trainer.device=tpu", "trainer.device='tpu' is invalid"),
        ("trainer.dist_bn=mean", "trainer.dist_bn='mean' is invalid"),
        ("trainer.diverge_loss=0", "trainer.diverge_loss=0 is invalid"),
        ("model.hidden=[100,0]", "model.hidden=[100, 0] is invalid"),
        ("model.bn.population_batches=0", "model.bn.population_batches=0 is invalid"),
        ("trainer.eval_at_start=maybe", "trainer.eval_at_start='maybe' is invalid"),
    ],
)
def test_bad_values_are_one_clear_line(compose_cfg, override, message):
    with pytest.raises(ConfigError) as err:
        parse_config(compose_cfg("experiment=mnist/bn", override))
    assert str(err.value).startswith(message) and "expected" in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.decode=gpu", "data.decode='gpu' is invalid: expected auto or workers or device"),
        ("data.crop_scale=[0.5,0.1]", "data.crop_scale=[0.5, 0.1] is invalid"),
        ("data.crop_ratio=[1]", "data.crop_ratio=[1] is invalid"),
        ("data.workers=-1", "data.workers=-1 is invalid"),
        ("model.norm=ln", "model.norm='ln' is invalid"),
        ("model.activation=tanh", "model.activation='tanh' is invalid"),
        ("model.dropout=1.0", "model.dropout=1.0 is invalid"),
        ("model.proj_4cd=0", "model.proj_4cd=0 is invalid"),
        ("optim.schedule.gamma=2", "optim.schedule.gamma=2 is invalid"),
        ("trainer.amp=fp8", "trainer.amp='fp8' is invalid"),
        ("+model.hidden=[10]", "model.hidden is not a setting"),
        ("seeds=[1,2]", "seeds=[...] (stacked training) needs an in-memory dataset"),
    ],
)
def test_bad_imagenet_values_are_one_clear_line(compose_cfg, override, message):
    with pytest.raises(ConfigError) as err:
        parse_config(compose_cfg("experiment=imagenet/bn_baseline", override))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_misspelt_or_missing_key_is_one_line(compose_cfg):
    with pytest.raises(ConfigError, match=r"^model.dropuot is not a setting \(expected one of"):
        parse_config(compose_cfg("experiment=mnist/bn", "+model.dropuot=0.5"))
    with pytest.raises(ConfigError, match=r"^trainer.steps is missing"):
        parse_config(compose_cfg("experiment=mnist/bn", "~trainer.steps"))


TAGS = "mnist or fashion_mnist or imagenet"
TARGETS = (
    "bnrepro.models.mlp.MLP or bnrepro.models.inception.BNInception or "
    "bnrepro.models.convnet.ConvNet"
)


@pytest.mark.parametrize(
    "overrides, line",
    [
        # Strict types: true is not an integer, nor is 2.0; 1 is not true.
        (["trainer.steps=true"], "trainer.steps=True is invalid: expected a positive integer."),
        (["trainer.steps=2.0"], "trainer.steps=2.0 is invalid: expected a positive integer."),
        (["seed=1.5"], "seed=1.5 is invalid: expected an integer."),
        (["optim.lr=true"], "optim.lr=True is invalid: expected a positive number."),
        (["data.download=1"], "data.download=1 is invalid: expected true or false."),
        (
            ["trainer.cuda_graph=0"],
            "trainer.cuda_graph=0 is invalid: expected auto or true or false.",
        ),
        (["optim.lr_mult=false"], "optim.lr_mult=False is invalid: expected a positive number."),
        # An unknown key in a nested section, named with the section's settings.
        (
            ["+model.bn.moment=0.1"],
            "model.bn.moment is not a setting (expected one of stats, momentum, eps, "
            "population_batches, ghost_batch); check its spelling",
        ),
        (
            ["norm=noisy_bn", "+model.noise.shift=1"],
            "model.noise.shift is not a setting (expected one of mean, scale, scale_std, "
            "shift_spread); check its spelling",
        ),
        # A union's tag (data.name, model._target_) that names no section, or none at all.
        (["data.name=cifar10"], f"data.name='cifar10' is invalid: expected {TAGS}."),
        (["model._target_=x.MLP"], f"model._target_='x.MLP' is invalid: expected {TARGETS}."),
        (["~data.name"], "data.name is missing; every config of data sets it"),
        (["~model._target_"], "model._target_ is missing; every config of model sets it"),
        # A section's own checks; a section that is not a mapping.
        (
            ["norm=noisy_bn", "model.noise.scale=[2,1]"],
            "model.noise.scale=[2, 1] is invalid: expected [low, high] with 0 < low.",
        ),
        (["model.bn=5"], "model.bn=5 is invalid: expected a mapping of settings."),
        (["~model.bn.eps"], "model.bn.eps is missing; every config of model.bn sets it"),
    ],
)
def test_a_bad_value_is_one_exact_line(compose_cfg, overrides, line):
    """The key in full, the value as given and what it must be: pydantic's first error."""
    with pytest.raises(ConfigError) as err:
        parse_config(compose_cfg("experiment=mnist/bn", *overrides))
    assert str(err.value) == line


def test_values_take_their_declared_types(compose_cfg):
    """An int given for a float is that float, a list for a [low, high] pair a tuple; lr_mult
    keeps the type given (x5 is an int); keys starting with `_` are Hydra's, not settings."""
    cfg = compose_cfg(
        "experiment=mnist/bn",
        "optim.lr=1",
        "norm=noisy_bn",
        "model.noise.scale=[1,2]",
        "+model.bn._note_=x",
    )
    assert cfg.model._convert_ == "all"  # ignored, as _target_ is not (the tag of model)
    run = parse_config(cfg)
    assert run.optim.lr == 1.0 and type(run.optim.lr) is float
    assert run.model.noise.scale == (1.0, 2.0)
    assert [type(v) for v in run.model.noise.scale] == [float, float]
    assert type(run.optim.lr_mult) is int and type(run.model.bn.momentum) is float
    imagenet = parse_config(compose_cfg("experiment=imagenet/bn_baseline"))
    assert type(imagenet.data.crop_scale) is tuple and len(imagenet.data.crop_scale) == 2


def test_the_typed_config_is_what_the_code_reads(compose_cfg):
    """One object: checked values with their types, the variant, and the source config."""
    cfg = compose_cfg("experiment=mnist/bn_x5", "seeds=[1,2]")
    run = parse_config(cfg)
    assert isinstance(run.model, MLPConfig) and isinstance(run.model.bn, BNSettings)
    assert run.optim.lr == pytest.approx(0.5) and isinstance(run.optim.lr, float)
    assert run.variant == {
        "norm": "bn",
        "activation": "sigmoid",
        "dropout": 0.0,
        "lr_mult": 5,
        "bn_stats": "population",
    }
    assert run.source is cfg and run.seeds == [1, 2]
    imagenet = parse_config(compose_cfg("experiment=imagenet/bn_x30"))
    assert isinstance(imagenet.model, InceptionConfig) and isinstance(imagenet.data, ImageNetData)
    assert imagenet.optim.schedule.every_steps == pytest.approx(80000 / 6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.trainer.steps = 1  # type: ignore[misc]


def test_the_models_choices_are_the_schemas():
    from bnrepro.models.mlp import ACTIVATIONS

    assert tuple(ACTIVATIONS) == choices(Activation)


def test_sync_debug_is_a_checked_switch_outside_the_runs_identity(compose_cfg):
    """trainer.sync_debug (null | warn | error) is parsed, and neither names a different result
    (the run directory's hash) nor stops a resume (a checkpoint's identity): it only debugs."""
    from bnrepro.config.resolvers import result_hash
    from bnrepro.infra.checkpoint import identity

    plain = compose_cfg("experiment=imagenet/bn_x30")
    assert parse_config(plain).trainer.sync_debug is None  # off by default
    for mode in ("warn", "error"):
        cfg = compose_cfg("experiment=imagenet/bn_x30", f"trainer.sync_debug={mode}")
        assert parse_config(cfg).trainer.sync_debug == mode
        assert result_hash(cfg) == result_hash(plain)
        assert identity(cfg) == identity(plain)
    # The hash does see settings that change results: the equalities above can fail.
    other = compose_cfg("experiment=imagenet/bn_x30", "trainer.steps=7")
    assert result_hash(other) != result_hash(plain)
    with pytest.raises(ConfigError) as err:
        parse_config(compose_cfg("experiment=mnist/bn", "trainer.sync_debug=raise"))
    assert str(err.value).startswith(
        "trainer.sync_debug='raise' is invalid: expected null or warn or error"
    )
    assert "\n" not in str(err.value)
