"""Config helpers: the `repo_root` resolver, and checks that turn bad values into one line."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from bnrepro.errors import ConfigError

# The values a config may choose from. This module is free of torch: the launching process
# checks a command line against them before any job starts, without paying for torch's import.
ACTIVATION_NAMES = ("sigmoid", "relu")
NORMS = ("none", "bn")
STATS_MODES = ("ema", "cumulative", "population")  # BN inference statistics (batchnorm.py)
DEVICES = ("auto", "cpu", "cuda")
DIST_BN_MODES = ("reduce", "broadcast")  # BN running statistics across ranks (distributed.py)
# Where ImageNet training JPEGs are decoded and augmented: PIL in the DataLoader workers, or the
# run's device on whole batches (the workers only read bytes); auto = device on CUDA.
DECODE_MODES = ("auto", "workers", "device")


def repo_root() -> str:
    """BNREPRO_ROOT, else the checkout this package is installed from, else the cwd."""
    if env := os.environ.get("BNREPRO_ROOT"):
        return env
    checkout = Path(__file__).resolve().parents[2]
    return str(checkout if (checkout / "pyproject.toml").is_file() else Path.cwd())


def seed_tag(seed: int, seeds: list[int] | None) -> str:
    """The sweep subdirectory's seed part: seed3, or seeds1-2-3 for a stacked job."""
    return "seeds" + "-".join(map(str, seeds)) if seeds else f"seed{seed}"


# Settings that change how fast a run goes, how it reports or where its files are, but not its
# numbers: they are left out of the run directory's hash, so changing them finds the same run.
# Every other key counts, so a new result-defining key added to the configs later changes every
# hash: runs made before it are not found again (and would be retrained). Add speed-only keys here.
NOT_RESULT = (
    "experiment_name",
    "arm",
    "tags",
    "logger",
    "paths",
    "hydra",
    "resume",
    "data.root",
    "data.download",
    "data.workers",
    "data.verify_checksums",
    "data.sha256",
    "data.eval_batch_size",
    "trainer.progress",
    "trainer.num_threads",
    "trainer.checkpoint_every",
    "trainer.sync_every",
    "trainer.cudnn_benchmark",
    "trainer.cuda_graph",
    "trainer.mkl_skip_vendor_check",
)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out |= _flatten(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: node}


def settings_except(cfg: DictConfig, excluded: Iterable[str]) -> dict[str, Any]:
    """The config's values (flattened keys, resolved) except the `excluded` keys and subtrees."""
    excluded = tuple(excluded)
    keys = _flatten(OmegaConf.to_container(cfg, resolve=False))
    kept = [k for k in keys if not any(k == n or k.startswith(n + ".") for n in excluded)]
    values = {k: OmegaConf.select(cfg, k) for k in kept}
    return {k: OmegaConf.to_object(v) if OmegaConf.is_config(v) else v for k, v in values.items()}


def result_hash(cfg: DictConfig) -> str:
    """8 hex digits of the settings that define a run's result (not those in NOT_RESULT)."""
    settings = json.dumps(settings_except(cfg, NOT_RESULT), sort_keys=True, default=str)
    return hashlib.sha256(settings.encode()).hexdigest()[:8]


def run_name(*, _root_: DictConfig) -> str:
    """A run directory's name: readable, and the same whenever the result would be the same,
    e.g. bn-seeds1-2-3-4-5-1a2b3c4d. Re-running a command finds its runs again (bnrepro.run)."""
    return f"{_root_.arm}-{seed_tag(_root_.seed, _root_.seeds)}-{result_hash(_root_)}"


RESOLVERS = {
    "repo_root": repo_root,
    "seed_tag": seed_tag,
    "run_name": run_name,
    # optim.lr = base_lr * lr_mult (x1/x5/x30), weight decay / 5 and faster decay (Section 4.2.1)
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
}


def register_resolvers() -> None:
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive_int(v: object) -> bool:
    return _is_int(v) and v > 0


def _one_of(choices: tuple[str, ...]) -> tuple[Callable[[object], bool], str]:
    return (lambda v: v in choices), " or ".join(choices)


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value of the wrong type or out of range.

    Runs before any data is read or any file written, so a typo costs one line.
    """
    width = min(cfg.model.hidden) if "hidden" in cfg.model else 64  # narrowest probed layer
    checks: list[tuple[str, Callable[[object], bool], str]] = [
        ("seed", _is_int, "an integer"),
        ("trainer.steps", _positive_int, "a positive integer"),
        ("trainer.eval_every", _positive_int, "a positive integer"),
        # BN in training mode needs at least two values per activation to have a variance.
        ("data.batch_size", lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
        ("optim.lr", lambda v: _is_number(v) and v > 0, "a positive number"),
        ("model.activation", *_one_of(ACTIVATION_NAMES)),
        ("model.norm", *_one_of(NORMS)),
        ("model.bn.stats", *_one_of(STATS_MODES)),
        ("model.dropout", lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
        ("trainer.device", *_one_of(DEVICES)),
        ("trainer.dist_bn", *_one_of(DIST_BN_MODES)),
        ("trainer.sync_every", _positive_int, "a positive integer"),
        (
            "trainer.cuda_graph",
            lambda v: v in ("auto", True, False),
            "auto, true or false",
        ),
        (
            "trainer.probe.unit",
            lambda v: _is_int(v) and 0 <= v < width,
            f"an integer in [0, {width})",
        ),
        ("trainer.probe.num_images", _positive_int, "a positive integer"),
        ("trainer.checkpoint_every", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
        (
            "trainer.diverge_loss",
            lambda v: v is None or (_is_number(v) and v > 0),
            "null or a positive number",
        ),
        ("resume", lambda v: isinstance(v, str) and v != "", "auto, never or a checkpoint path"),
    ]
    if cfg.seeds is not None:
        checks.append(
            (
                "seeds",
                lambda v: list(v) and all(_is_int(s) for s in v) and len(set(v)) == len(v),
                "a list of distinct integers",
            )
        )
        if cfg.trainer.sync_bn:
            raise ConfigError(
                "trainer.sync_bn=true does not apply to stacked seeds (seeds=[...]): each "
                "member's BN is its own; drop one of them"
            )
        if "hidden" not in cfg.model:
            raise ConfigError(
                "seeds=[...] (stacked training) needs the MNIST MLP (model=mlp); "
                "run one seed per job instead: -m seed=1,2,3"
            )
    if "decode" in cfg.data:  # ImageNet: where training JPEGs are decoded (data/imagenet.py)
        checks.append(("data.decode", *_one_of(DECODE_MODES)))
    if "init_std" in cfg.model:
        checks.append(("model.init_std", lambda v: _is_number(v) and v > 0, "a positive number"))
    for key, ok, expected in checks:
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}={value!r} is invalid: expected {expected}.")
