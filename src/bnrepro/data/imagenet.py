"""ImageNet (ILSVRC-2012) as in Section 4.2 of the paper, built from torchvision parts only.

The data are read from an ImageFolder tree (`train/<class>/*.JPEG`, `val/<class>/*.JPEG`), the
layout every ImageNet preparation script produces. Training uses the Inception recipe (random-size
crop, horizontal flip, photometric distortion whose strength Section 4.2.1 turns down); evaluation
is the paper's "single crop": resize, then one centre crop.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes
from torchvision.transforms import v2

from bnrepro.errors import ConfigError, DataError

# The per-channel statistics of the ImageNet training set that every torchvision model uses.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ColorJitter strength at photometric=1.0 (the common Inception-style setting).
JITTER_AT_FULL_STRENGTH = 0.4

FIX_HINT = (
    "set IMAGENET_DIR (or paths.imagenet_dir=...) to a folder with train/ and val/ "
    "in ImageFolder layout (one folder per class)"
)


def _fail(where: Path, what: str) -> DataError:
    message = f"ImageNet not usable at {where}: {what}; {FIX_HINT}"
    return DataError(" ".join(message.splitlines()))  # one line even for odd path names


def _class_folders(split: Path) -> list[str]:
    """The class names ImageFolder will see in `split` (torchvision's own rule, not a copy)."""
    if not split.is_dir():
        raise _fail(split, "the folder does not exist")
    try:
        classes, _ = find_classes(str(split))
    except FileNotFoundError as exc:  # torchvision's "Couldn't find any class folder"
        raise _fail(split, "it holds no class folder") from exc
    return classes


def _few(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def check_imagefolder(root: str | Path) -> None:
    """Fail fast, in one line, before a long job starts on a wrong or half-copied ImageNet.

    `root` must hold train/ and val/, each with at least one class folder, and both must name the
    same classes: ImageFolder numbers classes by sorted folder name, so a class missing from either
    side would silently shift every label after it.
    """
    root = Path(root)
    if not root.is_dir():
        raise _fail(root, "the folder does not exist")
    train_classes = _class_folders(root / "train")
    val_classes = _class_folders(root / "val")
    if train_classes != val_classes:
        only_val = set(val_classes) - set(train_classes)
        only_train = set(train_classes) - set(val_classes)
        parts = []
        if only_val:
            parts.append(f"val/ has class folders that train/ lacks: {_few(only_val)}")
        if only_train:
            parts.append(f"train/ has class folders that val/ lacks: {_few(only_train)}")
        raise _fail(root / "val", "; ".join(parts))


# torchvision.transforms.v2 is used: it is stable in torchvision 0.29 and accepts PIL images
# directly. ToImage + ToDtype(float32, scale=True) is v2's replacement for the classic ToTensor
# (same values in [0, 1]); ToPureTensor hands the model a plain torch.Tensor.
def _to_normalized_tensor() -> list[v2.Transform]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.ToPureTensor(),
    ]


def train_transform(image_size: int = 224, photometric: float = 1.0) -> v2.Compose:
    """Inception-style augmentation; `photometric` scales the colour distortion.

    RandomResizedCrop (8%-100% of the area, aspect 3/4-4/3) is the "random-size crop" of Inception
    training. Section 4.2.1 "reduce[s] the photometric distortions" for the BN networks, which
    train faster and so should see fewer distorted images: photometric=1.0 is full strength
    (ColorJitter 0.4 on brightness, contrast and saturation), 0 leaves the ColorJitter out.
    """
    if photometric < 0:
        raise ConfigError(f"photometric must be >= 0 (0 = off, 1 = full), got {photometric}")
    steps: list[v2.Transform] = [v2.RandomResizedCrop(image_size), v2.RandomHorizontalFlip()]
    if photometric > 0:
        strength = JITTER_AT_FULL_STRENGTH * photometric
        steps.append(v2.ColorJitter(brightness=strength, contrast=strength, saturation=strength))
    return v2.Compose(steps + _to_normalized_tensor())


def eval_transform(image_size: int = 224, resize_ratio: float = 0.875) -> v2.Compose:
    """One centre crop of a resized image: the paper's "single crop" validation accuracy.

    The shorter side is resized to image_size / resize_ratio (224 -> 256), so the crop keeps the
    central 87.5% of it, the standard single-crop protocol.
    """
    if not 0 < resize_ratio <= 1:
        raise ConfigError(f"resize_ratio must be in (0, 1], got {resize_ratio}")
    return v2.Compose(
        [v2.Resize(int(image_size / resize_ratio)), v2.CenterCrop(image_size)]
        + _to_normalized_tensor()
    )


def build_imagenet(
    root: str | Path, image_size: int = 224, photometric: float = 1.0
) -> tuple[ImageFolder, ImageFolder]:
    """The training and validation sets of `root`, with the paper's transforms."""
    check_imagefolder(root)
    root = Path(root)
    sets = []
    for split, transform in (
        ("train", train_transform(image_size, photometric)),
        ("val", eval_transform(image_size)),
    ):
        try:
            sets.append(ImageFolder(str(root / split), transform=transform))
        except FileNotFoundError as exc:  # a class folder with no image file in it
            raise _fail(root / split, f"a class folder holds no image ({exc})") from exc
    return sets[0], sets[1]


def build_loaders(
    train_set: Dataset,
    val_set: Dataset,
    *,
    batch_size: int,
    workers: int,
    seed: int,
    world_size: int = 1,
    rank: int = 0,
    drop_last: bool = True,
    pin_memory: bool = False,
) -> tuple[DataLoader, DataLoader, DistributedSampler | None]:
    """Training and validation loaders, single-process or one shard of a distributed job.

    `batch_size` is per process. With world_size > 1 each rank reads its own shard through a
    DistributedSampler built from the explicit world_size/rank (no process group is needed to
    build it). That sampler is returned: the caller must call `sampler.set_epoch(epoch)` before
    every epoch, or every epoch repeats the first one's order. With world_size == 1 the training
    order comes from a RandomSampler on a generator seeded with `seed`, and None is returned.

    The last incomplete training batch is dropped (drop_last) so every batch has the same m: BN
    computes its statistics over the batch, and a batch of one has no variance to normalise by.

    Validation is in file order. Distributed, DistributedSampler pads the shards to equal length by
    repeating the first few images, so a sum over ranks counts at most world_size - 1 images twice.

    The loader's generator (seed + rank) seeds the worker processes, so the augmentation of a run
    is repeatable with workers > 0; with workers == 0 it draws from the global torch RNG.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    train_sampler: Sampler[int]
    if world_size > 1:
        dist_sampler = DistributedSampler(
            train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        val_sampler: Sampler[int] = DistributedSampler(
            val_set, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False
        )
        train_sampler, returned = dist_sampler, dist_sampler
    else:
        train_sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(seed))
        val_sampler = SequentialSampler(val_set)
        returned = None
    per_rank = len(train_sampler)
    if drop_last and per_rank < batch_size:
        raise DataError(
            f"the training set gives {per_rank} images per process, fewer than one batch of "
            f"{batch_size}; lower batch_size or use more data"
        )
    common = {
        "batch_size": batch_size,
        "num_workers": workers,
        "pin_memory": pin_memory,
        "persistent_workers": workers > 0,
    }
    train_loader = DataLoader(
        train_set,
        sampler=train_sampler,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed + rank),
        **common,
    )
    val_loader = DataLoader(val_set, sampler=val_sampler, drop_last=False, **common)
    return train_loader, val_loader, returned


def topk_correct(
    logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[int, int]:
    """How many samples have their target among the k highest logits, for each k in `ks`.

    Counts rather than rates, so shards and batches can be summed before dividing. A k above the
    number of classes is clipped to it (every sample is then correct), keeping the keys of `ks`.
    """
    if logits.ndim != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be (N, C) and target (N,), got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {tuple(ks)}")
    if not ks:
        return {}
    clipped = {k: min(k, logits.shape[1]) for k in ks}
    top = logits.topk(max(clipped.values()), dim=1).indices  # (N, maxk), best first
    hits = top.eq(target.reshape(-1, 1))
    return {k: int(hits[:, :kk].any(dim=1).sum().item()) for k, kk in clipped.items()}
