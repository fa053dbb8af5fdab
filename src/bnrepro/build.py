"""Building a run's parts from its config: seeds, the network (plain, stacked, DDP), the
loop's settings."""

from __future__ import annotations

import random

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from bnrepro.distributed import DistEnv, wrap_model
from bnrepro.engine import LoopSettings
from bnrepro.errors import ConfigError
from bnrepro.models.stacked_mlp import StackedMLP


def seed_everything(seed: int) -> None:
    """Reset every global RNG: multirun jobs of the basic launcher share one process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loop_settings(cfg: DictConfig, env: DistEnv) -> LoopSettings:
    return LoopSettings(
        steps=cfg.trainer.steps,
        eval_every=cfg.trainer.eval_every,
        eval_at_start=cfg.trainer.eval_at_start,
        probe_unit=cfg.trainer.probe.unit,
        percentiles=list(cfg.trainer.probe.percentiles),
        bn_stats=cfg.model.bn.stats if cfg.model.norm == "bn" else "ema",
        population_batches=cfg.model.bn.population_batches,
        amp=cfg.trainer.amp == "bf16" and env.device.type == "cuda",
        progress=cfg.trainer.progress,
        checkpoint_every=cfg.trainer.checkpoint_every,
        diverge_loss=cfg.trainer.diverge_loss,
        sync_every=cfg.trainer.sync_every,
        cuda_graph=use_cuda_graph(cfg, env),
        dist_bn=cfg.trainer.dist_bn,
        progress_desc=f"{cfg.arm} seed{'s' if cfg.seeds else ''} "
        + ",".join(map(str, cfg.seeds or [cfg.seed])),
    )


def use_cuda_graph(cfg: DictConfig, env: DistEnv) -> bool:
    """Whether the training step is captured in a CUDA graph (graph_step.py says what that
    needs): `auto` where it can be, `true` insists (one line when it cannot), `false` never."""
    wanted = cfg.trainer.cuda_graph
    if wanted is False:
        return False
    obstacles = [
        (env.device.type != "cuda", "the device is not a GPU"),
        (env.enabled, "the job runs under torchrun (DDP)"),
        (cfg.trainer.compile, "trainer.compile=true"),
        (env.device.type == "cuda" and cfg.trainer.amp == "bf16", "trainer.amp=bf16"),
        (bool(cfg.optim.get("schedule")), "the learning rate follows a schedule"),
        (
            cfg.model.norm == "bn" and cfg.model.bn.stats == "cumulative",
            "model.bn.stats=cumulative reads its momentum on the host",
        ),
    ]
    reasons = [why for present, why in obstacles if present]
    if reasons and wanted is True:
        raise ConfigError(
            f"trainer.cuda_graph=true cannot capture this run: {reasons[0]}; "
            f"use trainer.cuda_graph=auto (captures when it can) or false"
        )
    return not reasons


def build_model(cfg: DictConfig, env: DistEnv) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The network (same initial weights on every rank; with `seeds`, one StackedMLP member
    per seed, each initialised as its plain run would be) and what trains it (DDP, compiled)."""
    members = []
    for seed in cfg.seeds or [cfg.seed]:
        seed_everything(seed)
        members.append(instantiate(cfg.model))
    network = StackedMLP.from_members(members) if cfg.seeds else members[0]
    network = network.to(env.device)
    if cfg.trainer.channels_last and env.device.type == "cuda":
        network = network.to(memory_format=torch.channels_last)
    trained = wrap_model(network, env, cfg.trainer.sync_bn)
    # Per-rank streams for dropout and augmentation; rank 0 keeps the single-process stream.
    seed_everything(cfg.seed + env.rank)
    return network, torch.compile(trained) if cfg.trainer.compile else trained
