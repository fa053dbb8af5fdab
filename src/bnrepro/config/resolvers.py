"""Config helpers: Hydra resolvers (repo_root, run_name, mul, div, floor_div) and the run's
result hash.

What each key may hold is checked by bnrepro.config.schema."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def repo_root() -> str:
    """BNREPRO_ROOT, else the checkout this package is installed from, else the cwd."""
    if env := os.environ.get("BNREPRO_ROOT"):
        return env
    checkout = Path(__file__).resolve().parents[3]
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
    "trainer.sync_debug",
    "trainer.cudnn_benchmark",
    "trainer.cuda_graph",
    "trainer.mkl_skip_vendor_check",
)


# Optional result-defining keys that no committed config sets, whose null means what their
# absence means (model.bn.ghost_batch: null = the whole batch). An absent key is not hashed;
# a null one is left out too, so `+model.bn.ghost_batch=null,4` finds the runs made without it.
NULL_IS_ABSENT = ("model.bn.ghost_batch",)


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
    """8 hex digits of the settings that define a run's result (not those in NOT_RESULT, nor
    a NULL_IS_ABSENT key that is null)."""
    settings = settings_except(cfg, NOT_RESULT)
    settings = {k: v for k, v in settings.items() if not (k in NULL_IS_ABSENT and v is None)}
    settings = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(settings.encode()).hexdigest()[:8]


def run_name(*, _root_: DictConfig) -> str:
    """A run directory's name: readable, and the same whenever the result would be the same,
    e.g. bn-seeds1-2-3-4-5-1a2b3c4d. Re-running a command finds its runs again
    (bnrepro.training.run)."""
    return f"{_root_.arm}-{seed_tag(_root_.seed, _root_.seeds)}-{result_hash(_root_)}"


RESOLVERS = {
    "repo_root": repo_root,
    "seed_tag": seed_tag,
    "run_name": run_name,
    # optim.lr = base_lr * lr_mult (x1/x5/x30), weight decay / 5 and faster decay (Section 4.2.1)
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    # Integer counts from others: steps per epoch at a batch size (experiment/batch_size.yaml).
    "floor_div": lambda a, b: int(a) // int(b),
}


def register_resolvers() -> None:
    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
