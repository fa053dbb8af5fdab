"""ImageNet (Section 4.2): ImageFolder data through DataLoaders, sharded across replicas."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from bnrepro.data.imagenet import build_imagenet, build_loaders, topk_correct
from bnrepro.distributed import DistEnv, sum_across_ranks
from bnrepro.tasks import POPULATION_SEED_OFFSET, Batches, Task


def on_device(loader: DataLoader, device: torch.device, channels_last: bool) -> Batches:
    """One pass over `loader`, each batch moved to `device` (NHWC when channels_last)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for x, y in loader:
        yield (
            x.to(device, non_blocking=True, memory_format=memory_format),
            y.to(device, non_blocking=True),
        )


class EpochBatches:
    """Endless batches, epoch after epoch, with a position that checkpoints can save.

    Resuming replays the saved epoch's order (DistributedSampler: from its epoch number;
    single process: from the samplers' generator states at the epoch's start) and skips the
    batches already served; skipping reads those images again, so it costs time, not
    correctness.
    """

    def __init__(
        self,
        loader: DataLoader,
        sampler: DistributedSampler | None,
        device: torch.device,
        channels_last: bool,
    ) -> None:
        self.loader, self.sampler = loader, sampler
        self.device, self.channels_last = device, channels_last
        self.epoch, self.position, self.skip = 0, 0, 0
        self.iterator: Batches | None = None
        self.start_states: list[torch.Tensor] = []

    def _generators(self) -> list[torch.Generator]:
        found = [self.loader.generator, getattr(self.loader.sampler, "generator", None)]
        return [g for g in found if g is not None]

    def __iter__(self) -> EpochBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            if self.iterator is None:
                self.start_states = [g.get_state() for g in self._generators()]
                if self.sampler is not None:
                    self.sampler.set_epoch(self.epoch)  # else every epoch repeats the first
                self.iterator = on_device(self.loader, self.device, self.channels_last)
            try:
                batch = next(self.iterator)
            except StopIteration:
                self.iterator, self.epoch, self.position = None, self.epoch + 1, 0
                continue
            self.position += 1
            if self.skip:
                self.skip -= 1
                continue
            return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "start_states": self.start_states}

    def load_state_dict(self, state: dict) -> None:
        for g, saved in zip(self._generators(), state["start_states"], strict=False):
            g.set_state(saved)
        self.epoch, self.skip, self.position, self.iterator = (
            state["epoch"],
            state["position"],
            0,
            None,
        )


def build_imagenet_task(cfg: DictConfig, env: DistEnv) -> Task:
    d, t = cfg.data, cfg.trainer
    train_set, val_set = build_imagenet(d.root, image_size=d.image_size, photometric=d.photometric)
    common = dict(
        batch_size=d.batch_size,
        workers=d.workers,
        world_size=env.world_size,
        rank=env.rank,
        pin_memory=env.device.type == "cuda",
    )
    train_loader, val_loader, sampler = build_loaders(train_set, val_set, seed=cfg.seed, **common)
    channels_last = t.channels_last and env.device.type == "cuda"
    population = None
    if cfg.model.norm == "bn" and cfg.model.bn.stats == "population":
        pop_loader, _, pop_sampler = build_loaders(
            train_set, val_set, seed=cfg.seed + POPULATION_SEED_OFFSET, **common
        )
        population = EpochBatches(pop_loader, pop_sampler, env.device, channels_last)
    amp = t.amp == "bf16" and env.device.type == "cuda"

    @torch.inference_mode()
    def evaluate(model: nn.Module) -> list[dict[str, float]]:
        model.eval()
        loss_sum, top1, top5, n = 0.0, 0, 0, 0
        for x, y in on_device(val_loader, env.device, channels_last):
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
            correct = topk_correct(logits, y, (1, 5))
            top1, top5, n = top1 + correct[1], top5 + correct[5], n + y.numel()
        model.train()
        loss_sum, top1, top5, n = sum_across_ranks(env, [loss_sum, top1, top5, n])
        return [{"val/loss": loss_sum / n, "val/top1": 100 * top1 / n, "val/top5": 100 * top5 / n}]

    probe_x = torch.stack([val_set[i][0] for i in range(min(t.probe.num_images, len(val_set)))])
    return Task(
        train_batches=EpochBatches(train_loader, sampler, env.device, channels_last),
        population_batches=population,
        evaluate=evaluate,
        probe_x=probe_x.to(env.device),
        monitor="val/top1",
    )
