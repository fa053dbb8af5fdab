"""MNIST (Section 4.1) and Fashion-MNIST: the whole dataset as tensors in memory, evaluated on
all 10k test images, or, with `data.val_size`, on images held out of the training set at every
evaluation and on the test set once, at the end.

With `seeds` set, the task serves a stacked network (StackedMLP, StackedBNInception): every
batch is (M, B, 784) or (M, B, 1, 28, 28), member i drawing the data order of seed i, and
evaluation returns one record per member.
"""

from __future__ import annotations

from itertools import islice

import torch
import torch.nn.functional as F
from torch import nn

from bnrepro.config.schema import MLPConfig, RunConfig
from bnrepro.data.batches import shuffled_batches, stacked_batches
from bnrepro.data.mnist import indices_digest, load_mnist, validation_split
from bnrepro.errors import DataError
from bnrepro.infra.distributed import DistEnv
from bnrepro.models.batchnorm import BNStats
from bnrepro.tasks.task import (
    POPULATION_SEED_OFFSET,
    PRECISE_SEED_OFFSET,
    Task,
    check_batch_size,
)
from bnrepro.training.placement import Placement


def build_mnist_task(
    cfg: RunConfig, env: DistEnv, placement: Placement, bn: BNStats | None
) -> Task:
    """The whole dataset as tensors on `placement.device` (no loader: nothing to pin), for
    this rank's data order; evaluation in fp32."""
    data = load_mnist(
        cfg.data.root,
        download=cfg.data.download,
        sha256=cfg.data.sha256 if cfg.data.verify_checksums else None,
        raw_train=True,
        dataset=cfg.data.name,
    )
    device = placement.device
    # The MLP takes flat 784-vectors; a convolutional network (BN-Inception scaled down,
    # experiment/fig2_small; the conv net of experiment/batch_size_conv) takes 1x28x28 images.
    shape = (784,) if isinstance(cfg.model, MLPConfig) else (1, 28, 28)
    train_x, train_y = data.train_x, data.train_y
    split = None
    if cfg.data.val_size:
        kept, held = validation_split(train_y, cfg.data.val_size, cfg.data.val_seed)
        val_x = train_x[held].float().div_(255.0)  # raw uint8, as the batches scale them
        val_x, val_y = val_x.view(-1, *shape).to(device), train_y[held].to(device)
        train_x, train_y = train_x[kept], train_y[kept]
        split = {"size": len(held), "seed": cfg.data.val_seed, "digest": indices_digest(held)}
    if cfg.data.train_size:
        if cfg.data.train_size >= train_x.shape[0]:
            raise DataError(
                f"data.train_size={cfg.data.train_size} is not below the {train_x.shape[0]} "
                f"training images left; use a smaller number or 0 (all of them)"
            )
        _, subset = validation_split(train_y, cfg.data.train_size, cfg.data.val_seed)
        train_x, train_y = train_x[subset], train_y[subset]
    check_batch_size(cfg, train_x.shape[0])  # every rank draws from the whole set
    train_x, train_y = train_x.view(-1, *shape).to(device), train_y.to(device)
    test_x, test_y = data.test_x.view(-1, *shape).to(device), data.test_y.to(device)
    # Each replica its own data order (rank 0 = the plain run); each stacked member its seed's.
    seeds = [s + env.rank for s in (cfg.seeds or [cfg.seed])]
    batch, eval_batch = cfg.data.batch_size, cfg.data.eval_batch_size

    def batches(offset: int):
        # CPU generators on every device, so a seed means the same order on CPU and GPU.
        generators = [torch.Generator().manual_seed(s + offset) for s in seeds]
        if cfg.seeds:
            return stacked_batches(train_x, train_y, batch, generators)
        return shuffled_batches(train_x, train_y, batch, generators[0])

    probe = cfg.trainer.bn_stats_probe  # compares estimates, Algorithm 2's among them
    needs_population = bn is not None and (bn.needs_population_batches or probe is not None)
    epoch_batches = None
    if probe is not None:
        precise = batches(PRECISE_SEED_OFFSET)

        def one_epoch():
            return islice(precise, precise.n_batches)  # endless epochs: exactly the next one

        epoch_batches = one_epoch

    @torch.inference_mode()
    def accuracy(model: nn.Module, images, labels, name: str) -> list[dict[str, float]]:
        # In chunks: the whole test set at once makes activations of tens of MB, fresh
        # memory at every evaluation, which was 25% slower here than chunks of 2,000.
        model.eval()
        loss_sum, correct = 0.0, 0
        for x, y in zip(images.split(eval_batch), labels.split(eval_batch), strict=True):
            logits = model(x)
            if logits.dim() == 2:
                logits = logits.unsqueeze(0)  # a plain model is a stack of one
            y = y.expand(logits.shape[0], -1)  # (members, chunk)
            losses = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")
            loss_sum += losses.double().sum(dim=1)
            correct += (logits.argmax(dim=2) == y).sum(dim=1)
        model.train()
        n = labels.numel()
        return [
            {f"{name}/loss": loss / n, f"{name}/acc": 100.0 * right / n}
            for loss, right in zip(loss_sum.tolist(), correct.tolist(), strict=True)
        ]

    n_train_eval = cfg.data.train_eval_size
    train_eval_x = train_x[:n_train_eval].float().div_(255.0)  # raw uint8, as batches scale them
    train_eval_y = train_y[:n_train_eval]

    def evaluate_test(model: nn.Module) -> list[dict[str, float]]:
        records = accuracy(model, test_x, test_y, "test")
        if n_train_eval:
            train = accuracy(model, train_eval_x, train_eval_y, "trainset")
            records = [r | t for r, t in zip(records, train, strict=True)]
        return records

    def evaluate_val(model: nn.Module) -> list[dict[str, float]]:
        return accuracy(model, val_x, val_y, "val")

    return Task(
        train_batches=batches(0),
        population_batches=batches(POPULATION_SEED_OFFSET) if needs_population else None,
        evaluate=evaluate_val if split else evaluate_test,
        probe_x=test_x[: cfg.trainer.probe.num_images],
        monitor="val/acc" if split else "test/acc",
        epoch_batches=epoch_batches,
        evaluate_final=evaluate_test if split else None,
        validation=split,
    )
