"""ImageNet (Section 4.2): ImageFolder data, endless training batches sharded across replicas."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnrepro.config.schema import RunConfig
from bnrepro.data.imagenet import (
    TrainAugmentation,
    build_imagenet,
    build_train_batches,
    build_val_loader,
    normalize_batch,
    resolve_decode,
    topk_hits,
)
from bnrepro.infra.distributed import DistEnv, sum_across_ranks
from bnrepro.models.batchnorm import BNStats
from bnrepro.tasks.task import POPULATION_SEED_OFFSET, Task, check_batch_size
from bnrepro.training.placement import Placement


def build_imagenet_task(
    cfg: RunConfig, env: DistEnv, placement: Placement, bn: BNStats | None
) -> Task:
    """This rank's shard of the training batches and of validation, normalised on
    `placement.device` in its memory format; validation's forward pass in its autocast."""
    d, t = cfg.data, cfg.trainer
    device = placement.device
    decode = resolve_decode(d.decode, device)  # a bad value fails before any file is read
    augmentation = TrainAugmentation(
        d.image_size, d.photometric, scale=list(d.crop_scale), ratio=list(d.crop_ratio)
    )
    train_set, val_set = build_imagenet(d.root, image_size=d.image_size)
    # Each rank draws from its own shard (EndlessShards): len // world_size images.
    check_batch_size(cfg, len(train_set) // env.world_size, per_process=env.world_size > 1)
    common = dict(
        decode=decode,
        batch_size=d.batch_size,
        workers=d.workers,
        device=device,
        channels_last=placement.channels_last,
        world_size=env.world_size,
        rank=env.rank,
        pin_memory=placement.pin_memory,
    )
    train_batches = build_train_batches(train_set, augmentation, seed=cfg.seed, **common)
    population = None
    if bn is not None and bn.needs_population_batches:
        population = build_train_batches(
            train_set, augmentation, seed=cfg.seed + POPULATION_SEED_OFFSET, **common
        )
    val_loader = build_val_loader(
        val_set,
        batch_size=d.batch_size,
        workers=d.workers,
        world_size=env.world_size,
        rank=env.rank,
        pin_memory=placement.pin_memory,
    )

    @torch.inference_mode()
    def evaluate(model: nn.Module) -> list[dict[str, float]]:
        model.eval()
        # Loss sum, top-1 and top-5 counts and images, summed on the device in float64 (exact
        # for the counts; the float32 batch losses add as they did on the host) and read once
        # at the end: one deliberate sync per evaluation instead of three per batch.
        totals = torch.zeros(4, dtype=torch.float64, device=device)
        for images, labels in val_loader:
            x = normalize_batch(images, device, placement.channels_last)
            y = labels.to(device, non_blocking=True)
            with placement.autocast():
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
            hits = topk_hits(logits, y, (1, 5))
            count = torch.full((), y.numel(), dtype=torch.float64, device=device)  # no copy
            totals += torch.stack([loss.double(), hits[1].double(), hits[5].double(), count])
        model.train()
        loss_sum, top1, top5, n = sum_across_ranks(env, totals)
        return [{"val/loss": loss_sum / n, "val/top1": 100 * top1 / n, "val/top5": 100 * top5 / n}]

    probe = torch.stack([val_set[i][0] for i in range(min(t.probe.num_images, len(val_set)))])
    return Task(
        train_batches=train_batches,
        population_batches=population,
        evaluate=evaluate,
        probe_x=normalize_batch(probe, device),
        monitor="val/top1",
    )
