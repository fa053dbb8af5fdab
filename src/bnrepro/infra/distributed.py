"""Multi-process training under torchrun (env://): one process per GPU, or CPU with gloo.

A job started by torchrun (or a multi-task submitit job) always takes the distributed path,
with one process as with many: process group, DDP, SyncBN when asked. A one-GPU machine then
exercises the multi-GPU code. A plain `python -m bnrepro.train` runs without any of it.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from bnrepro.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    # Launched by torchrun (or submitit): a process group exists and collectives run (DDP,
    # all-reduce), however many ranks there are, one included.
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """`auto` takes this process's GPU when there is one, else the CPU. A GPU asked for but
    missing, or more processes on a node than it has GPUs, is a ConfigError (one line)."""
    available = torch.cuda.is_available()
    if requested == "auto":
        requested = "cuda" if available else "cpu"
    if requested != "cuda":
        return torch.device(requested)
    if not available:
        raise ConfigError(
            "trainer.device=cuda but torch sees no GPU here; use trainer.device=auto or cpu "
            "(or check CUDA_VISIBLE_DEVICES and the driver)"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"this process has local rank {local_rank} but the node has {count} GPU(s); start "
            f"at most {count} process(es) per node (torchrun --nproc_per_node={count})"
        )
    return torch.device("cuda", local_rank)


def device_name(device: torch.device) -> str:
    """What summaries record as the device that made a result, e.g. 'cuda (NVIDIA H100 ...)'."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


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
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = pick_device(device, local_rank)
    if "WORLD_SIZE" not in os.environ:  # a plain process: no launcher, no process group
        return DistEnv(device=torch_device)
    # The device is checked here, not in a Placement: the process group comes before a run's
    # Placement (training/placement.py, made from this DistEnv); NCCL runs on GPUs only.
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if not dist.is_initialized():
        # On a GPU, device_id binds the group to this process's GPU: NCCL forms its
        # communicator now (an NCCL problem fails here, not at the first all-reduce) and never
        # guesses the device from the rank.
        cuda = torch_device.type == "cuda"
        dist.init_process_group(
            backend="nccl" if cuda else "gloo", device_id=torch_device if cuda else None
        )
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, torch_device, True)


def shutdown(env: DistEnv, finished: bool = True) -> None:
    """Leave the process group. After a finished run, wait for every rank first: a rank that
    tears its gloo connections down while a peer is still using them can abort that peer
    (seen once in CI: SIGABRT, "terminate called without an active exception"). After a
    failure, leave at once: the other ranks may never reach the barrier, and torchrun stops
    them when this one exits.
    """
    if env.enabled and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def broadcast_object(env: DistEnv, value: object) -> object:
    """Rank 0's value on every rank (e.g. the run directory, whose name holds a timestamp)."""
    if not env.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(env: DistEnv, value: object) -> list[object] | None:
    """Every rank's `value` (picklable, CPU tensors) as a list on rank 0, in rank order; None on
    the other ranks. A collective: every rank calls it at the same point."""
    if not env.enabled:
        return [value]
    gathered: list[object] | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def sum_across_ranks(env: DistEnv, values: torch.Tensor) -> list[float]:
    """The sum over ranks of `values` (a 1-d float64 tensor on this rank's device, summed in
    place), read on the host: the one deliberate sync of, e.g., a whole evaluation."""
    if env.enabled:
        dist.all_reduce(values)
    return values.tolist()


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


def sync_bn_buffers(env: DistEnv, model: nn.Module, mode: str = "reduce") -> None:
    """Make every rank's BN running statistics the same before evaluating (timm's --dist-bn).

    DDP keeps buffers rank-local (`wrap_model`), so during training each replica's running
    statistics follow its own mini-batches, as the paper's per-replica BN computes them.
    `reduce` averages them over ranks: the mean of the replicas' estimates, each an average of
    per-batch means and unbiased variances of m images, is Algorithm 2's E_B[mu_B] and
    m/(m-1) E_B[var_B] over every rank's batches. `broadcast` takes rank 0's (the statistics
    of 1/world_size of the data; what DDP's default buffer broadcast amounts to).
    """
    if not env.enabled:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                if mode == "broadcast":
                    dist.broadcast(buffer, src=0)
                else:
                    dist.all_reduce(buffer)
                    buffer.div_(env.world_size)


# Rank-local BN buffers under DDP. torch 2.14 renames broadcast_buffers to
# forward_sync_buffers (the old name warns); the GPU machine's torch 2.11 has only the old
# one. The new name still syncs buffers once at wrap time, harmless here: every rank builds
# the network from the same seed, so the buffers are equal then anyway.
_RANK_LOCAL_BUFFERS = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def wrap_model(model: nn.Module, env: DistEnv, sync_bn: bool) -> nn.Module:
    """DDP around `model` when launched by torchrun (one process too); SyncBatchNorm first if
    asked (then BN normalises over the global batch instead of each replica's 32 images).

    The SyncBatchNorm conversion replaces the layers inside `model`, so callers must keep
    the returned module's `.module` as the network. Buffers stay rank-local: every rank keeps
    its own running statistics until `sync_bn_buffers` combines them before an evaluation
    (with DDP's default, rank 0's buffers overwrite the others' at every forward).
    """
    if sync_bn and not env.enabled:
        raise ConfigError(
            "trainer.sync_bn=true synchronises BN across processes: launch the job with "
            "torchrun (e.g. torchrun --nproc_per_node=8 -m bnrepro.train ...), or drop it"
        )
    if sync_bn and env.device.type != "cuda":
        raise ConfigError(
            "trainer.sync_bn=true needs GPUs (torch's SyncBatchNorm runs on CUDA only); "
            "drop it on CPU, where each replica normalises its own batch as in the paper"
        )
    if not env.enabled:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [env.device.index] if env.device.type == "cuda" else None  # DDP's rule for GPUs
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **_RANK_LOCAL_BUFFERS)
