"""Multi-process training under torchrun (env://): one process per GPU, or CPU with gloo."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """`auto` takes this process's GPU when there is one, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def export_submitit_env() -> None:
    """Inside a multi-task submitit job (the SLURM launcher), set the variables torchrun would
    have set, with submitit's own helper, so that one code path serves both launchers."""
    if "WORLD_SIZE" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks > 1:
        # Keep every GPU visible: the local rank picks the device (pick_device).
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group torchrun (or a multi-task submitit job) describes in the
    environment; single process otherwise. NCCL on GPUs, gloo on CPUs (what the multi-process
    tests use).
    """
    export_submitit_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = pick_device(device, local_rank)
    if world_size == 1:
        return DistEnv(device=torch_device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo")
    return DistEnv(dist.get_rank(), world_size, local_rank, torch_device)


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(env: DistEnv, value: object) -> object:
    """Rank 0's value on every rank (e.g. the run directory, whose name holds a timestamp)."""
    if not env.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_across_ranks(env: DistEnv, values: list[float]) -> list[float]:
    if not env.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def replicas_in_sync(env: DistEnv, model: nn.Module) -> bool:
    """Whether every rank holds bit-identical parameters and buffers (DDP's promise).

    Compares exact float64 fingerprints gathered from every rank, not the tensors themselves.
    """
    if not env.enabled:
        return True
    tensors = [
        t.detach().double().flatten() for t in model.state_dict().values() if t.is_floating_point()
    ]
    flat = torch.cat(tensors)
    weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
    fingerprint = torch.stack([(flat * weights).sum(), flat.abs().sum()])
    gathered = [torch.empty_like(fingerprint) for _ in range(env.world_size)]
    dist.all_gather(gathered, fingerprint)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def average_bn_buffers(env: DistEnv, model: nn.Module) -> None:
    """Average BN running statistics over ranks before evaluating (timm's --dist-bn reduce):
    without it each replica evaluates with the statistics of its own share of the data."""
    if not env.enabled:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                dist.all_reduce(buffer)
                buffer.div_(env.world_size)


def wrap_model(model: nn.Module, env: DistEnv, sync_bn: bool) -> nn.Module:
    """DDP around `model` when distributed; SyncBatchNorm first if asked (then BN normalises
    over the global batch instead of each replica's 32 images)."""
    if not env.enabled:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
