"""MNIST and Fashion-MNIST as four in-memory tensors, read by torchvision, verified by sha256.

Both come as the same four IDX files (28x28 grey, 10 classes); `dataset` names which, as the
config's `data.name` does: "mnist" (<root>/MNIST/raw) or "fashion_mnist" (<root>/FashionMNIST/raw).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchvision.datasets import MNIST, FashionMNIST

from bnrepro.errors import DataError

RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class MnistTensors:
    """Images flattened to 784 (float32 in [0, 1], or the raw uint8), labels as int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


# data.name -> torchvision's class; its name is the folder under the data root.
DATASETS: dict[str, type[MNIST]] = {"mnist": MNIST, "fashion_mnist": FashionMNIST}


def raw_dir(root: str | Path, dataset: str = "mnist") -> Path:
    return Path(root) / DATASETS[dataset].__name__ / "raw"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksums(root: str | Path, expected: Mapping[str, str], dataset: str = "mnist") -> None:
    """Raise DataError naming the first raw file whose sha256 differs from `expected`."""
    for name, want in expected.items():
        path = raw_dir(root, dataset) / name
        got = sha256_of(path)
        if got != want:
            raise DataError(
                f"{DATASETS[dataset].__name__} file {path} is corrupt: sha256 {got}, "
                f"expected {want}. Delete it and download again (or point DATA_DIR at a good copy)."
            )


def ensure_raw_files(root: str | Path, download: bool, dataset: str = "mnist") -> None:
    """Make sure the four raw IDX files exist, downloading them when allowed and possible."""
    folder, cls = raw_dir(root, dataset), DATASETS[dataset]
    missing = [name for name in RAW_FILES if not (folder / name).is_file()]
    if not missing:
        return
    hint = (
        f"{cls.__name__} not found in {folder} (missing {', '.join(missing)}). "
        f"Set DATA_DIR (or paths.data_dir=...) to a folder holding {cls.__name__}/raw/"
    )
    if not download:
        raise DataError(hint + ", or allow data.download=true.")
    # torchvision prints every mirror it tries; keep that noise out of the one-line error.
    noise = io.StringIO()
    try:
        with contextlib.redirect_stdout(noise):
            cls(str(root), train=True, download=True)
    except Exception as exc:  # noqa: BLE001 - any failure to fetch means the same to the user
        raise DataError(hint + f"; the download failed ({type(exc).__name__}).") from exc


def load_mnist(
    root: str | Path,
    *,
    download: bool = True,
    sha256: Mapping[str, str] | None = None,
    raw_train: bool = False,
    dataset: str = "mnist",
) -> MnistTensors:
    """Load `dataset` (mnist or fashion_mnist) from `root`/<MNIST|FashionMNIST>/raw into
    memory, after checking every raw file.

    raw_train=True keeps the training images as uint8 (47 MB instead of 188 MB); the batch
    iterator scales them per batch to the same floats."""
    ensure_raw_files(root, download, dataset)
    if sha256:
        verify_checksums(root, sha256, dataset)
    cls = DATASETS[dataset]
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    except Exception as exc:  # noqa: BLE001 - torchvision raises bare AssertionError etc.
        raise DataError(
            f"could not read {cls.__name__} from {raw_dir(root, dataset)} "
            f"({type(exc).__name__}: {exc}); replace the raw files with the original IDX files."
        ) from exc
    return MnistTensors(
        train_x=train.data.reshape(len(train.data), -1) if raw_train else _as_float(train.data),
        train_y=train.targets.long(),
        test_x=_as_float(test.data),
        test_y=test.targets.long(),
    )


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.reshape(images.shape[0], -1).float().div_(255.0)


def validation_split(labels: torch.Tensor, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """(train, validation) indices into the training set: `size` images held out, the same
    number from each class (size must divide by the class count), drawn by a generator seeded
    with `seed`, so the split is fixed. Both sorted; together they are every index once."""
    classes = int(labels.max()) + 1
    if size % classes or size // classes > int(torch.bincount(labels).min()):
        raise DataError(
            f"data.val_size={size} cannot be split evenly over {classes} classes of this "
            f"training set; use a multiple of {classes} up to {classes} x the smallest class"
        )
    generator = torch.Generator().manual_seed(seed)
    held = []
    for c in range(classes):
        members = (labels == c).nonzero().flatten()
        held.append(members[torch.randperm(len(members), generator=generator)[: size // classes]])
    val = torch.cat(held).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val] = False
    return keep.nonzero().flatten(), val


def indices_digest(indices: Tensor) -> str:
    """12 hex digits of sha256 over the indices (int64): what summaries record of a split."""
    return hashlib.sha256(indices.to(torch.int64).numpy().tobytes()).hexdigest()[:12]
