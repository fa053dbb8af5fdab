"""Shared fixtures: real MNIST from DATA_DIR, small IDX files, and the entrypoint as a process."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from bnrepro.config.resolvers import register_resolvers
from bnrepro.data.fake_imagefolder import make_fake_imagefolder
from bnrepro.data.mnist import RAW_FILES, raw_dir, sha256_of

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked gpu are skipped, not failed, on a machine without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (make test-gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The real MNIST (DATA_DIR). Skipped on a developer's machine without it; in CI it must be
    there, so a missing DATA_DIR fails instead of silently skipping."""
    root = Path(os.environ.get("DATA_DIR", REPO / "data"))
    if all((raw_dir(root) / name).is_file() for name in RAW_FILES):
        return root
    if os.environ.get("CI"):
        pytest.fail(f"CI needs MNIST in {raw_dir(root)}; set DATA_DIR=../shared/data")
    pytest.skip(f"real MNIST not found in {raw_dir(root)} (set DATA_DIR)")


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write `array` (uint8) in the IDX format of the original MNIST files."""
    magic = 0x0800 | array.ndim  # 0x08 = unsigned byte
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A 12-train / 5-test MNIST in IDX files, and their sha256 digests."""
    rng = np.random.default_rng(0)
    raw = raw_dir(tmp_path)
    raw.mkdir(parents=True)
    for split, n in (("train", 12), ("t10k", 5)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (n,)))
    return tmp_path, {name: sha256_of(raw / name) for name in RAW_FILES}


def run_train(*overrides: str, env: dict[str, str] | None = None, timeout: int = 300):
    """Run the real entrypoint in a subprocess, offline W&B, no progress bar."""
    full_env = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true"} | (env or {})
    flags = [o for o in overrides if o.startswith("-")]  # Hydra wants -m before overrides
    rest = [o for o in overrides if not o.startswith("-")]
    return subprocess.run(
        [sys.executable, "-m", "bnrepro.train", *flags, "trainer.progress=false", *rest],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def compose_cfg():
    """Compose configs/train.yaml with overrides, as the entrypoint does (no job is run)."""
    register_resolvers()

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def fashion_root() -> Path:
    """The real Fashion-MNIST (DATA_DIR/FashionMNIST/raw): as `mnist_root`, required in CI."""
    root = Path(os.environ.get("DATA_DIR", REPO / "data"))
    folder = raw_dir(root, "fashion_mnist")
    if all((folder / name).is_file() for name in RAW_FILES):
        return root
    if os.environ.get("CI"):
        pytest.fail(f"CI needs Fashion-MNIST in {folder}; set DATA_DIR=../shared/data")
    pytest.skip(f"real Fashion-MNIST not found in {folder} (set DATA_DIR)")


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory) -> Path:
    """A 3-class ImageFolder of 96x80 JPEGs (16 per class), for the GPU tests."""
    root = tmp_path_factory.mktemp("imagenet")
    return make_fake_imagefolder(root, num_classes=3, train_per_class=16, size=(96, 80))
