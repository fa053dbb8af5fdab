"""Tiny ImageFolder trees of random JPEGs, shaped like ImageNet, for tests and smoke tests.

A cluster set-up (paths, workers, JPEG decoding, DistributedSampler) can then be checked in
seconds before pointing IMAGENET_DIR at the real 150 GB. Each class has its own mean colour, so a
few training steps on the fake data already beat chance: a smoke test that sees the loss fall
knows the labels reach the model.

    python -m bnrepro.data.fake_imagefolder /tmp/fake_imagenet --classes 10
"""

from __future__ import annotations

import argparse
import colorsys
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bnrepro.errors import ConfigError, DataError, UserError

NOISE_STD = 40.0  # grey levels; large enough that no two images are alike, small next to colours
SPLITS = ("train", "val")


def class_colour(index: int, num_classes: int) -> np.ndarray:
    """Evenly spaced hues, fully saturated: the classes are as far apart as colours can be."""
    red, green, blue = colorsys.hsv_to_rgb(index / num_classes, 0.8, 0.85)
    return np.array([red, green, blue]) * 255.0


def make_fake_imagefolder(
    root: str | Path,
    num_classes: int = 3,
    train_per_class: int = 8,
    val_per_class: int = 4,
    size: tuple[int, int] = (48, 40),
    seed: int = 0,
) -> Path:
    """Write root/{train,val}/class_XX/img_YYY.JPEG and return root.

    `size` is (width, height), as in PIL. Every image is its class's colour plus Gaussian noise,
    drawn from a generator keyed by (seed, split, class, image): the same arguments give the same
    pixels, and the training images do not change when val_per_class does. The folders must not
    already hold files, so stale classes from an earlier run cannot mix in.
    """
    width, height = size
    for name, value in (
        ("num_classes", num_classes),
        ("train_per_class", train_per_class),
        ("val_per_class", val_per_class),
        ("width", width),
        ("height", height),
    ):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if seed < 0:  # numpy's SeedSequence takes only non-negative entropy
        raise ConfigError(f"seed must be >= 0, got {seed}")
    root = Path(root)
    for split in SPLITS:
        folder = root / split
        if folder.exists() and any(folder.iterdir()):
            raise DataError(f"{folder} already holds files; choose an empty or new folder")
    class_digits = max(2, len(str(num_classes - 1)))  # zero-padded: sorted names = class order
    image_digits = max(3, len(str(max(train_per_class, val_per_class) - 1)))
    for split_index, (split, per_class) in enumerate(
        zip(SPLITS, (train_per_class, val_per_class), strict=True)
    ):
        for c in range(num_classes):
            folder = root / split / f"class_{c:0{class_digits}d}"
            folder.mkdir(parents=True, exist_ok=True)
            mean = class_colour(c, num_classes)
            for i in range(per_class):
                rng = np.random.default_rng([seed, split_index, c, i])
                pixels = mean + rng.normal(0.0, NOISE_STD, size=(height, width, 3))
                image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")
                image.save(folder / f"img_{i:0{image_digits}d}.JPEG", format="JPEG", quality=90)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bnrepro.data.fake_imagefolder",
        description="Write a tiny ImageFolder dataset of random JPEGs (train/ and val/).",
    )
    parser.add_argument("out_dir", type=Path, help="folder to create (train/ and val/ inside)")
    parser.add_argument("--classes", type=int, default=3, help="number of classes (default 3)")
    parser.add_argument("--train-per-class", type=int, default=8, help="default 8")
    parser.add_argument("--val-per-class", type=int, default=4, help="default 4")
    parser.add_argument(
        "--size", type=int, nargs=2, default=(48, 40), metavar=("W", "H"), help="default 48 40"
    )
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    args = parser.parse_args(argv)
    try:
        root = make_fake_imagefolder(
            args.out_dir,
            num_classes=args.classes,
            train_per_class=args.train_per_class,
            val_per_class=args.val_per_class,
            size=(args.size[0], args.size[1]),
            seed=args.seed,
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.classes} classes x ({args.train_per_class} train + {args.val_per_class} "
        f"val) JPEGs to {root}; use it with IMAGENET_DIR={root}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
