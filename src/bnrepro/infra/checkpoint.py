"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the network, optimizer, scheduler, the loop's state (step, metrics so far,
which members are still training) and the W&B run ids, and for every rank of a torchrun job
what is that rank's own: its CPU and CUDA random states (its dropout and augmentation streams),
its data iterators' positions and its BN buffers (rank-local under DDP until an evaluation
averages them). Rank 0 gathers these and writes one file; on resume each rank takes its own
entry, the CUDA state onto its own device. It is written atomically (temporary file, fsync,
rename), so a kill during a write leaves the previous checkpoint intact.

A resume with another number of processes stops with one line (CheckpointError): rank r's
streams and data shard have no counterpart in a job of another size, so no rule would continue
the same run. The number of GPUs on the machine does not matter, only the number of ranks.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from bnrepro.config.resolvers import settings_except
from bnrepro.errors import UserError
from bnrepro.infra.distributed import DistEnv, gather_to_main

# 2: per-rank states in "ranks". Version 1 (one "rng", rank 0's) still loads for one process.
FORMAT_VERSION = 2
# What a resumed run may change: how long it trains, how it reports, where files go.
NOT_IDENTITY = {
    "trainer.steps",
    "trainer.progress",
    "trainer.num_threads",
    "trainer.checkpoint_every",
    "trainer.sync_every",
    "trainer.sync_debug",
    "logger",
    "paths",
    "hydra",
    "resume",
    "tags",
    "data.root",
    "data.download",
    "data.workers",
    "data.eval_batch_size",  # images per evaluation forward: speed only, as in the run hash
}


class CheckpointError(UserError):
    """A checkpoint that cannot be used: unreadable, or written by another config."""


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """torch.save through a temporary file, fsync and rename (then fsync the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def load(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - truncated, garbage, wrong format: one message
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}); delete it to start "
            f"over, or pass resume=never or a new hydra.run.dir"
        ) from exc
    if not isinstance(payload, dict) or payload.get("version") not in (1, FORMAT_VERSION):
        raise CheckpointError(
            f"{path} is not a bnrepro checkpoint (format {FORMAT_VERSION}); "
            f"pass resume=never or a new hydra.run.dir"
        )
    if payload["version"] == 1:  # one process's states at the top level: that one rank's
        payload["ranks"] = [
            {
                "rng": payload.pop("rng"),
                "train_batches": payload.pop("train_batches"),
                "population_batches": payload.pop("population_batches"),
                "buffers": None,
            }
        ]
    return payload


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The config values a checkpoint must agree on to be resumed."""
    return settings_except(cfg, NOT_IDENTITY)


def _counts(key: str) -> bool:
    return not any(key == n or key.startswith(n + ".") for n in NOT_IDENTITY)


def check_identity(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    # A checkpoint written before a key joined NOT_IDENTITY still stores it: ignore it there too.
    keys = {k for k in saved.keys() | current.keys() if _counts(k)}
    differing = sorted(k for k in keys if saved.get(k) != current.get(k))
    if differing:
        key = differing[0]
        raise CheckpointError(
            f"checkpoint {path} was written by a different config ({key}: "
            f"{saved.get(key)!r} there, {current.get(key)!r} now"
            f"{f', and {len(differing) - 1} more' if len(differing) > 1 else ''}); use a new "
            f"hydra.run.dir, or resume=never to overwrite"
        )


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random states: CPU torch, numpy, python, and its own GPU's (not every
    GPU's: under torchrun rank r draws on device r alone, and only its state is its own)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore `rng_state`'s states, the CUDA one onto `device`. A checkpoint written on a CPU
    and resumed on a GPU keeps the GPU's seeded state (seed_everything); one from a GPU resumed
    on a CPU has no GPU stream to restore. Neither is the same run: placement changes numbers."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # format 1 saved every GPU's state; this process used its own
        index = device.index or 0 if device.type == "cuda" else 0
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def find_resume(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: `resume=auto` takes <run_dir>/checkpoints/last.pt when
    it exists, `never` none, anything else is a path that must exist."""
    if resume == "never":
        return None
    if resume == "auto":
        last = checkpoint_dir(run_dir) / "last.pt"
        return last if last.exists() else None
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"resume={resume}: no such checkpoint file")
    return path


class Checkpointer:
    """Writes <run_dir>/checkpoints/last.pt (every checkpoint) and best.pt (the network with
    the best mean `monitor` over the members still training); restores a resumed run."""

    def __init__(
        self,
        run_dir: Path,
        cfg: DictConfig,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        task: Any,
        env: DistEnv,
    ) -> None:
        self.folder = checkpoint_dir(run_dir)
        self.identity = identity(cfg)
        self.network, self.optimizer, self.scheduler, self.task = (
            network,
            optimizer,
            scheduler,
            task,
        )
        self.env = env
        self.trackers: list[Any] = []
        self.wandb_ids: list[str | None] | None = None
        self.best = float("-inf")
        self.last_state: Any = None

    def rank_state(self) -> dict[str, Any]:
        """What is this rank's own: random states, data positions, BN buffers (on the CPU)."""
        task = self.task
        return {
            "rng": rng_state(self.env.device),
            "train_batches": task.train_batches.state_dict(),
            "population_batches": task.population_batches.state_dict()
            if task.population_batches is not None
            else None,
            "buffers": {k: b.detach().cpu() for k, b in self.network.named_buffers()},
        }

    def save(self, state: Any) -> None:
        """Every rank calls this at the same step (a collective gathers the ranks' states);
        rank 0 writes."""
        self.last_state = state
        ranks = gather_to_main(self.env, self.rank_state())
        if not self.env.is_main:
            return
        task = self.task
        payload = {
            "version": FORMAT_VERSION,
            "step": state.step,
            "identity": self.identity,
            "model": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "ranks": ranks,
            "state": state,
            "best": self.best,
            "wandb_ids": [t.wandb_id for t in self.trackers],
        }
        scores = [
            state.results[i].history[-1][task.monitor]
            for i in state.alive
            if state.results[i].history
        ]
        if scores and sum(scores) / len(scores) > self.best:
            self.best = payload["best"] = sum(scores) / len(scores)
            save_atomic(
                {
                    "version": FORMAT_VERSION,
                    "step": state.step,
                    "best": self.best,
                    "model": payload["model"],
                },
                self.folder / "best.pt",
            )
        save_atomic(payload, self.folder / "last.pt")

    def restore(self, path: Path) -> Any:
        """Load `path` into the network, optimizer, scheduler, RNGs and data iterators; return
        the loop state to continue from."""
        payload = load(path)
        check_identity(path, payload["identity"], self.identity)
        env = self.env
        if len(payload["ranks"]) != env.world_size:
            raise CheckpointError(
                f"checkpoint {path} was written by {len(payload['ranks'])} process(es) and this "
                f"job has {env.world_size}: resume it with as many (torchrun "
                f"--nproc_per_node=...), or start over with resume=never or a new hydra.run.dir"
            )
        self.network.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scheduler is not None and payload["scheduler"] is not None:
            self.scheduler.load_state_dict(payload["scheduler"])
        own = payload["ranks"][env.rank]
        if own["buffers"] is not None:  # this rank's running statistics, not rank 0's
            with torch.no_grad():
                for name, buffer in self.network.named_buffers():
                    buffer.copy_(own["buffers"][name])
        set_rng_state(own["rng"], env.device)
        self.task.train_batches.load_state_dict(own["train_batches"])
        if own["population_batches"] is not None and self.task.population_batches is not None:
            self.task.population_batches.load_state_dict(own["population_batches"])
        self.best, self.wandb_ids = payload["best"], payload["wandb_ids"]
        self.last_state = payload["state"]
        return payload["state"]
