"""The MNIST loader on small IDX files made here, on broken ones, and on the real files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnrepro.data.batches import ShuffledBatches, shuffled_batches
from bnrepro.data.mnist import load_mnist, raw_dir
from bnrepro.errors import DataError

SHARED_SHA256 = {  # ../shared/data/README.md
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}


def test_loads_small_idx_files(tiny_mnist):
    root, sha = tiny_mnist
    data = load_mnist(root, download=False, sha256=sha)
    assert data.train_x.shape == (12, 784) and data.test_x.shape == (5, 784)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.train_x.min() >= 0.0 and data.train_x.max() <= 1.0
    raw = np.frombuffer((raw_dir(root) / "train-images-idx3-ubyte").read_bytes()[16:], np.uint8)
    np.testing.assert_allclose(data.train_x.numpy().ravel(), raw / 255.0, rtol=1e-6)


def test_corrupt_file_is_named_with_expected_checksum(tiny_mnist):
    root, sha = tiny_mnist
    path = raw_dir(root) / "t10k-images-idx3-ubyte"
    blob = bytearray(path.read_bytes())
    blob[100] ^= 0xFF  # one flipped byte in one image
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError) as err:
        load_mnist(root, download=False, sha256=sha)
    message = str(err.value)
    assert "t10k-images-idx3-ubyte" in message and sha["t10k-images-idx3-ubyte"] in message
    assert "\n" not in message


def test_truncated_file_without_checksums_is_a_clear_error(tiny_mnist):
    root, _ = tiny_mnist
    path = raw_dir(root) / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(DataError, match="could not read MNIST"):
        load_mnist(root, download=False, sha256=None)


def test_missing_files_name_the_directory_and_data_dir(tmp_path):
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path, download=False)
    assert str(raw_dir(tmp_path)) in str(err.value) and "DATA_DIR" in str(err.value)


def test_failed_download_is_one_clear_line(tmp_path, monkeypatch):
    # Point torchvision at an address that refuses at once, so the test needs no network.
    from torchvision.datasets import MNIST

    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path, download=True)
    assert "download failed" in str(err.value) and "\n" not in str(err.value)


def test_real_mnist_matches_published_checksums(mnist_root):
    data = load_mnist(mnist_root, download=False, sha256=SHARED_SHA256)
    assert data.train_x.shape == (60000, 784) and data.test_x.shape == (10000, 784)
    assert torch.bincount(data.test_y).tolist()[:3] == [980, 1135, 1032]


def test_batches_cover_each_epoch_once_and_drop_the_remainder():
    x = torch.arange(130).float().unsqueeze(1)
    batches = shuffled_batches(x, torch.arange(130), 60, torch.Generator().manual_seed(0))
    epoch = [next(batches) for _ in range(2)]
    seen = torch.cat([bx.squeeze(1) for bx, _ in epoch])
    assert len(seen) == 120 and len(set(seen.tolist())) == 120
    assert all(torch.equal(bx.squeeze(1).long(), by) for bx, by in epoch)
    again = shuffled_batches(x, torch.arange(130), 60, torch.Generator().manual_seed(0))
    assert torch.equal(next(again)[0], epoch[0][0])  # same seed, same order


@pytest.mark.parametrize("stacked", [False, True])
def test_batches_resume_at_the_same_position(stacked):
    x = torch.randint(0, 256, (130, 4), dtype=torch.uint8)
    y = torch.arange(130)

    def make():
        gens = [torch.Generator().manual_seed(s) for s in (1, 2)][: 2 if stacked else 1]
        return ShuffledBatches(x, y, 60, gens, stacked=stacked)

    first = make()
    for _ in range(3):  # into the second epoch
        next(first)
    state = first.state_dict()
    expected = [next(first) for _ in range(4)]
    resumed = make()
    resumed.load_state_dict(state)
    for (ex, ey), (rx, ry) in zip(expected, (next(resumed) for _ in range(4)), strict=True):
        assert torch.equal(ex, rx) and torch.equal(ey, ry)
    assert expected[0][0].dtype == torch.float32 and float(expected[0][0].max()) <= 1.0


def test_real_fashion_mnist_matches_the_config_checksums(fashion_root):
    """data=fashion_mnist: every raw file checked against configs/data/fashion_mnist.yaml."""
    from omegaconf import OmegaConf

    from .conftest import REPO

    sha = dict(OmegaConf.load(REPO / "configs" / "data" / "fashion_mnist.yaml").sha256)
    assert len(sha) == 4
    data = load_mnist(fashion_root, download=False, sha256=sha, dataset="fashion_mnist")
    assert data.train_x.shape == (60000, 784) and data.test_x.shape == (10000, 784)
    assert torch.bincount(data.test_y).tolist() == [1000] * 10  # 1,000 test images per class
    # Published mean pixel of the training images: 72.94 (of 255).
    assert float(data.train_x.mean()) * 255 == pytest.approx(72.94, abs=0.01)
    assert not torch.equal(data.test_x[:100], load_mnist(fashion_root, download=False).test_x[:100])


def test_fashion_mnist_files_are_checked_and_named(tmp_path, fashion_root):
    folder = raw_dir(tmp_path, "fashion_mnist")
    folder.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        (folder / name).symlink_to(raw_dir(fashion_root, "fashion_mnist") / name)
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path, download=False, dataset="fashion_mnist")
    message = str(err.value)
    assert message.startswith(f"FashionMNIST not found in {folder} (missing t10k-labels")
    assert "FashionMNIST/raw/" in message and "\n" not in message
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"\0" * 10008)
    with pytest.raises(DataError, match="FashionMNIST file .*t10k-labels-idx1-ubyte is corrupt"):
        load_mnist(
            tmp_path,
            download=False,
            dataset="fashion_mnist",
            sha256={"t10k-labels-idx1-ubyte": "0"},
        )
