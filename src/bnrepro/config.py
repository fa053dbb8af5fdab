"""Config helpers: the `repo_root` resolver, and checks that turn bad values into one line."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bnrepro.errors import ConfigError
from bnrepro.models.batchnorm import STATS_MODES
from bnrepro.models.mlp import ACTIVATIONS, NORMS


def repo_root() -> str:
    """BNREPRO_ROOT, else the checkout this package is installed from, else the cwd."""
    if env := os.environ.get("BNREPRO_ROOT"):
        return env
    checkout = Path(__file__).resolve().parents[2]
    return str(checkout if (checkout / "pyproject.toml").is_file() else Path.cwd())


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("repo_root"):
        OmegaConf.register_new_resolver("repo_root", repo_root)


def _require(ok: bool, key: str, value: object, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {what}.")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value of the wrong type or out of range."""
    t, d, m, o = cfg.trainer, cfg.data, cfg.model, cfg.optim
    _require(_is_int(cfg.seed), "seed", cfg.seed, "an integer")
    _require(_is_int(t.steps) and t.steps > 0, "trainer.steps", t.steps, "a positive integer")
    _require(
        _is_int(t.eval_every) and t.eval_every > 0,
        "trainer.eval_every",
        t.eval_every,
        "a positive integer",
    )
    # BN in training mode needs at least two values per activation to have a variance.
    _require(
        _is_int(d.batch_size) and d.batch_size >= 2,
        "data.batch_size",
        d.batch_size,
        "an integer >= 2",
    )
    _require(_is_number(o.lr) and o.lr > 0, "optim.lr", o.lr, "a positive number")
    _require(
        m.activation in ACTIVATIONS, "model.activation", m.activation, " or ".join(ACTIVATIONS)
    )
    _require(m.norm in NORMS, "model.norm", m.norm, " or ".join(NORMS))
    _require(m.bn.stats in STATS_MODES, "model.bn.stats", m.bn.stats, " or ".join(STATS_MODES))
    _require(
        _is_number(m.dropout) and 0 <= m.dropout < 1,
        "model.dropout",
        m.dropout,
        "a number in [0, 1)",
    )
    _require(
        _is_number(m.init_std) and m.init_std > 0, "model.init_std", m.init_std, "a positive number"
    )
    p = t.probe
    _require(
        _is_int(p.unit) and 0 <= p.unit < min(m.hidden),
        "trainer.probe.unit",
        p.unit,
        f"an integer in [0, {min(m.hidden)})",
    )
    _require(
        _is_int(p.num_images) and p.num_images > 0,
        "trainer.probe.num_images",
        p.num_images,
        "a positive integer",
    )
