"""Every config composes, the documented overrides exist, and bad values get one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bnrepro.config import check_config, register_resolvers
from bnrepro.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(
    str(p.relative_to(CONFIGS / "experiment").with_suffix(""))
    for p in (CONFIGS / "experiment").rglob("*.yaml")
)


@pytest.fixture
def compose_cfg():
    register_resolvers()

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()


def test_there_are_experiments():
    assert {"mnist/baseline", "mnist/bn"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds(compose_cfg, experiment):
    cfg = compose_cfg(f"experiment={experiment}", "paths.output_dir=/tmp/x")
    check_config(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    model = instantiate(cfg.model)
    instantiate(cfg.optim, params=model.parameters())
    assert cfg.logger.project  # experiments log to W&B by default


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
    check_config(cfg)


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
    ],
)
def test_bad_values_are_one_clear_line(compose_cfg, override, message):
    with pytest.raises(ConfigError) as err:
        check_config(compose_cfg("experiment=mnist/bn", override))
    assert str(err.value).startswith(message) and "expected" in str(err.value)
