"""ImageNet (ILSVRC-2012) as in Section 4.2 of the paper, built from torchvision parts only.

The data are read from an ImageFolder tree (`train/<class>/*.JPEG`, `val/<class>/*.JPEG`), the
layout every ImageNet preparation script produces. Training uses the Inception recipe (random-size
crop, horizontal flip, photometric distortion whose strength Section 4.2.1 turns down); evaluation
is the paper's "single crop": resize, then one centre crop.

Training batches are endless (one DataLoader iterator per run) and every image is augmented with
its own seed, so the batches do not depend on the number of workers and resume exactly. Two
decode paths give the same augmentation: "workers" (PIL in DataLoader workers) and "device"
(workers only read bytes; the GPU decodes and augments whole batches, see device_decode.py).
Both hand over uint8 images; `normalize_batch` turns them into normalised floats on the device.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    Sampler,
    SequentialSampler,
    default_collate,
)
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes
from torchvision.transforms import v2

from bnrepro.data.device_decode import Augmentation, DataStream, decode_and_augment
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


# RandomResizedCrop's defaults, the Inception "random-size crop" (the paper gives no ranges).
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def resolve_decode(decode: str, device: torch.device) -> str:
    """`data.decode` (auto, workers or device; checked by bnrepro.config.schema) as "workers" or
    "device": auto decodes on the device when it is a GPU."""
    if decode == "auto":  # batched decoding pays off with nvJPEG; a CPU decodes in the workers
        return "device" if device.type == "cuda" else "workers"
    return decode


def normalize_batch(
    x: torch.Tensor, device: torch.device, channels_last: bool = False
) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> float32 on `device`, scaled to [0, 1] and normalised with the
    ImageNet mean/std: the one conversion both decode paths and validation use.

    The uint8 batch crosses PCIe (4x fewer bytes than float32) and the arithmetic runs on the
    device. Same operations as v2.ToDtype(float32, scale=True) followed by v2.Normalize.
    """
    x = x.to(device, non_blocking=True).to(torch.float32).mul_(1.0 / 255.0)
    mean, std = normalization_constants(device)
    x = x.sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def normalization_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The ImageNet mean and std as (3, 1, 1) float32 tensors on `device`, made once per device
    and kept: `torch.tensor(..., device=)` is a blocking copy, a host sync per batch if made
    per batch. The first call copies (blocking, so the constants are ready for any stream):
    `build_train_batches` makes that call, before any training step."""
    if device not in _CONSTANTS:
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(-1, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(-1, 1, 1)
        _CONSTANTS[device] = (mean, std)
    return _CONSTANTS[device]


def _make_params(transform: v2.Transform, flat_inputs: list[Any]) -> dict[str, Any]:
    """A v2 transform's own parameter sampler: public `make_params` since torchvision 0.21,
    `_get_params` before."""
    sampler = getattr(transform, "make_params", None) or transform._get_params
    return sampler(flat_inputs)


class TrainAugmentation:
    """The Inception training augmentation, applied whole by the workers path (`transform`) or
    only drawn by the device path (`draw`), from the same torchvision transform objects.

    RandomResizedCrop (the "random-size crop" of Inception training; `scale` of the area,
    aspect `ratio`), a horizontal flip, and ColorJitter on brightness, contrast and saturation.
    Section 4.2.1 "reduce[s] the photometric distortions" for the BN networks:
    photometric=1.0 is full strength (ColorJitter 0.4), 0 leaves the ColorJitter out.
    """

    def __init__(
        self,
        image_size: int = 224,
        photometric: float = 1.0,
        scale: Sequence[float] = CROP_SCALE,
        ratio: Sequence[float] = CROP_RATIO,
    ) -> None:
        self.image_size = image_size
        self.crop = v2.RandomResizedCrop(
            image_size, scale=tuple(scale), ratio=tuple(ratio), antialias=True
        )
        self.flip = v2.RandomHorizontalFlip()
        self.jitter: v2.ColorJitter | None = None
        if photometric > 0:
            strength = JITTER_AT_FULL_STRENGTH * photometric
            self.jitter = v2.ColorJitter(
                brightness=strength, contrast=strength, saturation=strength
            )

    def transform(self) -> v2.Compose:
        """PIL image -> augmented (3, S, S) uint8 tensor (normalisation happens on the device)."""
        steps: list[v2.Transform] = [self.crop, self.flip]
        if self.jitter is not None:
            steps.append(self.jitter)
        return v2.Compose([*steps, v2.ToImage(), v2.ToPureTensor()])

    def draw(self, height: int, width: int) -> dict[str, torch.Tensor]:
        """The parameters `transform()` would use on a height x width image, drawn from torch's
        RNG in the same order (crop, flip, jitter) with the transforms' own samplers: the same
        seed gives the same crop, flip and jitter on both paths. Keys: those of
        `device_decode.Augmentation`, one image's row."""
        # A zero-stride stand-in that only carries the size query_size reads (no pixels).
        stand_in = torch.zeros((1, 1, 1), dtype=torch.uint8).expand(3, height, width)
        crop = _make_params(self.crop, [stand_in])
        # _RandomApplyTransform.forward: flipped when torch.rand(1) < p (its params are empty).
        flip = bool(torch.rand(1) < self.flip.p)
        factors, order = torch.ones(3), torch.arange(4)
        if self.jitter is not None:
            params = _make_params(self.jitter, [stand_in])
            order = params["fn_idx"]
            factors = torch.tensor(
                [params[f"{name}_factor"] for name in ("brightness", "contrast", "saturation")]
            )
        return {
            "boxes": torch.tensor([crop["top"], crop["left"], crop["height"], crop["width"]]),
            "flip": torch.tensor(flip),
            "factors": factors.to(torch.float32),
            "order": order.to(torch.int64),
        }


def train_transform(
    image_size: int = 224,
    photometric: float = 1.0,
    scale: Sequence[float] = CROP_SCALE,
    ratio: Sequence[float] = CROP_RATIO,
) -> v2.Compose:
    """The workers path's training transform (see TrainAugmentation): PIL -> uint8 tensor."""
    return TrainAugmentation(image_size, photometric, scale, ratio).transform()


def eval_transform(image_size: int = 224, resize_ratio: float = 0.875) -> v2.Compose:
    """One centre crop of a resized image: the paper's "single crop" validation accuracy.

    The shorter side is resized to image_size / resize_ratio (224 -> 256), so the crop keeps the
    central 87.5% of it, the standard single-crop protocol. Ends in uint8, like training:
    `normalize_batch` finishes on the device. Validation always takes this PIL path, so its
    metrics do not depend on the decode mode.
    """
    if not 0 < resize_ratio <= 1:
        raise ConfigError(f"resize_ratio must be in (0, 1], got {resize_ratio}")
    return v2.Compose(
        [
            v2.Resize(int(image_size / resize_ratio)),
            v2.CenterCrop(image_size),
            v2.ToImage(),
            v2.ToPureTensor(),
        ]
    )


def build_imagenet(root: str | Path, image_size: int = 224) -> tuple[ImageFolder, ImageFolder]:
    """The training set of `root` (file list and labels; `build_train_batches` reads and
    augments it) and the validation set with the single-crop transform (uint8 tensors)."""
    check_imagefolder(root)
    root = Path(root)
    sets = []
    for split, transform in (("train", None), ("val", eval_transform(image_size))):
        try:
            sets.append(ImageFolder(str(root / split), transform=transform))
        except FileNotFoundError as exc:  # a class folder with no image file in it
            raise _fail(root / split, f"a class folder holds no image ({exc})") from exc
    return sets[0], sets[1]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of image `index` in `epoch` of a run seeded `seed`.

    A hash, so neighbouring (epoch, index) pairs get unrelated streams; the rank is not an
    input since ranks' shards are disjoint. It does not depend on which worker process reads
    the image, so augmentations are the same for any number of workers, and a resumed run
    recomputes them from the position alone.
    """
    key = f"{seed}/{epoch}/{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class EndlessShards(Sampler[tuple[int, int]]):
    """(index, sample_seed) pairs, epoch after epoch, for one rank, without end.

    Each epoch is torch's DistributedSampler order for that epoch (a permutation seeded with
    seed + epoch, rank r taking every world_size-th index; no process group needed), cut to
    whole batches: the incomplete last batch is dropped, so a batch never spans two epochs and
    every batch has BN's m. Being endless, one DataLoader iterator serves the whole run and
    its workers keep prefetching across epoch boundaries instead of draining.
    """

    def __init__(
        self, size: int, batch_size: int, seed: int, world_size: int = 1, rank: int = 0
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.shard = DistributedSampler(
            range(size), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.seed, self.batch_size = seed, batch_size
        self.batches_per_epoch = len(self.shard) // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the training set gives {len(self.shard)} images per process, fewer than one "
                f"batch of {batch_size}; lower batch_size or use more data"
            )
        self.start = (0, 0)  # (epoch, batch) where the next iteration begins
        self.iterations = 0  # how many times iteration (re)started: once, plus once per resume

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices of `epoch`, in order, whole batches only."""
        self.shard.set_epoch(epoch)
        return list(self.shard)[: self.batches_per_epoch * self.batch_size]

    def start_at(self, epoch: int, batch: int) -> None:
        """Make the next iteration begin at batch `batch` of `epoch` (no data is read)."""
        self.start = (epoch, batch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        self.iterations += 1
        epoch, batch = self.start
        skip = batch * self.batch_size
        while True:
            for index in self.epoch_indices(epoch)[skip:]:
                yield index, sample_seed(self.seed, epoch, index)
            epoch, skip = epoch + 1, 0


class SeededImages(Dataset):
    """Workers path: (index, sample_seed) -> (augmented uint8 (3, S, S), label).

    torch's RNG is seeded with the sample's seed just for the transform (fork_rng restores it
    afterwards, so with workers=0 the main process's RNG, e.g. dropout's, is untouched)."""

    def __init__(self, folder: ImageFolder, transform: v2.Transform) -> None:
        self.samples, self.loader, self.transform = folder.samples, folder.loader, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key
        path, label = self.samples[index]
        image = self.loader(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), label


def read_jpeg(path: str | Path) -> tuple[torch.Tensor, tuple[int, int]]:
    """A file's JPEG bytes as a uint8 tensor, and its (width, height) from the header alone.

    ImageNet's train set holds a few CMYK JPEGs and one PNG named .JPEG; those are re-encoded
    here as RGB JPEGs (quality 95) so that the batched decoder gets only plain JPEGs. (Python
    reads the bytes: torchvision.io.read_file is deprecated in torchvision 0.29.)
    """
    with Image.open(path) as image:  # parses the header; pixels are not decoded
        size = image.size
        if image.format == "JPEG" and image.mode in ("RGB", "L"):
            data = Path(path).read_bytes()
        else:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=95)
            data = buffer.getvalue()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), size


class EncodedImages(Dataset):
    """Device path: (index, sample_seed) -> (JPEG bytes, drawn augmentation parameters, label).

    The worker reads the file and draws the parameters with the sample's seed
    (TrainAugmentation.draw, the workers path's own order of draws); decoding and augmenting
    happen later, batched, on the device (device_decode.decode_and_augment)."""

    def __init__(self, folder: ImageFolder, augmentation: TrainAugmentation) -> None:
        self.samples, self.augmentation = folder.samples, augmentation

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(
        self, key: tuple[int, int]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        index, seed = key
        path, label = self.samples[index]
        data, (width, height) = read_jpeg(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            params = self.augmentation.draw(height, width)
        return data, params, label


def collate_encoded(
    samples: list[tuple[torch.Tensor, dict[str, torch.Tensor], int]],
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Byte strings of different lengths stay a list; parameters and labels are stacked."""
    data = [s[0] for s in samples]
    params, labels = default_collate([(s[1], s[2]) for s in samples])
    return data, params, labels


Prepare = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]


class EndlessBatches:
    """Endless (x, y) batches on the device from one DataLoader iterator, with a position
    that checkpoints save.

    The position is (epoch, batch within it), counted in batches handed out (the workers'
    prefetching runs ahead of it). `load_state_dict` makes the next iterator start its sampler
    right there: nothing skipped is read, and the per-sample seeds make the batches that
    follow bit-identical to those of the uninterrupted run.
    """

    def __init__(self, loader: DataLoader, sampler: EndlessShards, prepare: Prepare) -> None:
        self.loader, self.sampler, self.prepare = loader, sampler, prepare
        self.epoch, self.position = 0, 0
        self.iterator: Iterator[Any] | None = None

    def __iter__(self) -> EndlessBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.iterator is None:  # once per run (and once after a load_state_dict)
            self.sampler.start_at(self.epoch, self.position)
            self.iterator = iter(self.loader)
        batch = self.prepare(next(self.iterator))
        self.position += 1
        if self.position == self.sampler.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.iterator = None  # the next batch starts a fresh iteration at the saved position


def build_train_batches(
    train_set: ImageFolder,
    augmentation: TrainAugmentation,
    *,
    decode: str,
    batch_size: int,
    workers: int,
    seed: int,
    device: torch.device,
    channels_last: bool = False,
    world_size: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
) -> EndlessBatches:
    """Endless augmented training batches of one rank, decoded by `decode` ("workers" or
    "device", see resolve_decode), normalised on `device`.

    `batch_size` is per process. The DataLoader gets its own generator (seeded from `seed`)
    for the workers' base seeds, so creating its iterator does not draw from the global RNG
    that the model's dropout uses.
    """
    sampler = EndlessShards(len(train_set), batch_size, seed, world_size, rank)
    normalization_constants(device)  # made now, outside the training steps
    common = {
        "batch_size": batch_size,
        "sampler": sampler,
        "num_workers": workers,
        "pin_memory": pin_memory,
        "persistent_workers": workers > 0,
        "generator": torch.Generator().manual_seed(seed),
    }
    if decode == "workers":
        loader = DataLoader(SeededImages(train_set, augmentation.transform()), **common)

        def prepare(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = batch
            return normalize_batch(x, device, channels_last), y.to(device, non_blocking=True)

    elif decode == "device":
        dataset = EncodedImages(train_set, augmentation)
        loader = DataLoader(dataset, collate_fn=collate_encoded, **common)
        jitter = augmentation.jitter is not None
        stream = DataStream(device)  # this iterator's own (GPU), see DataStream for why

        def prepare(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            data, params, y = batch

            def work() -> tuple[torch.Tensor, torch.Tensor]:
                x = decode_and_augment(
                    data, Augmentation(**params), augmentation.image_size, device, jitter
                )
                return normalize_batch(x, device, channels_last), y.to(device, non_blocking=True)

            return stream.run(work)

    else:
        raise ConfigError(f"decode must be 'workers' or 'device' here, got {decode!r}")
    return EndlessBatches(loader, sampler, prepare)


def build_val_loader(
    val_set: Dataset,
    *,
    batch_size: int,
    workers: int,
    world_size: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Validation in file order, uint8 batches (normalize_batch finishes on the device).

    Distributed, DistributedSampler pads the shards to equal length by repeating the first few
    images, so a sum over ranks counts at most world_size - 1 images twice.
    """
    sampler: Sampler[int]
    if world_size > 1:
        sampler = DistributedSampler(
            val_set, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False
        )
    else:
        sampler = SequentialSampler(val_set)
    return DataLoader(
        val_set,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
    )


def topk_hits(
    logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[int, torch.Tensor]:
    """`topk_correct`'s counts as 0-dim int64 tensors on the logits' device, read by nobody:
    no host sync, so an evaluation can sum them on the device and read the totals once."""
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
    return {k: hits[:, :kk].any(dim=1).sum() for k, kk in clipped.items()}


def topk_correct(
    logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[int, int]:
    """How many samples have their target among the k highest logits, for each k in `ks`.

    Counts rather than rates, so shards and batches can be summed before dividing. A k above the
    number of classes is clipped to it (every sample is then correct), keeping the keys of `ks`.
    """
    return {k: int(count.item()) for k, count in topk_hits(logits, target, ks).items()}
