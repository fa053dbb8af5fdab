"""The ImageNet pipeline on tiny fake ImageFolder trees: layout checks, transforms, loaders."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler, TensorDataset
from torchvision.transforms import v2

from bnrepro.data.fake_imagefolder import make_fake_imagefolder
from bnrepro.data.imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_imagenet,
    build_loaders,
    check_imagefolder,
    eval_transform,
    topk_correct,
    train_transform,
)
from bnrepro.errors import DataError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x (8 train + 4 val) JPEGs of 48x40; read-only for the tests that share it."""
    return make_fake_imagefolder(tmp_path_factory.mktemp("fake_imagenet"))


@pytest.fixture
def own_root(fake_root: Path, tmp_path: Path) -> Path:
    """A copy of the fake tree that a test may break."""
    return Path(shutil.copytree(fake_root, tmp_path / "imagenet"))


def a_picture() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), "RGB")


def test_build_imagenet_gives_normalized_crops(fake_root):
    train, val = build_imagenet(fake_root, image_size=32)
    assert len(train) == 24 and len(val) == 12
    assert train.class_to_idx == val.class_to_idx == {"class_00": 0, "class_01": 1, "class_02": 2}
    x, y = train[5]
    assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (3, 32, 32)
    assert 0 <= y < 3
    xv, yv = val[11]
    assert xv.shape == (3, 32, 32) and yv == 2
    assert x.min() < 0 < x.max()  # normalized, not in [0, 1]


def test_fake_images_are_deterministic_and_classes_differ(fake_root, tmp_path):
    again = make_fake_imagefolder(tmp_path / "again")
    first = fake_root / "train" / "class_01" / "img_003.JPEG"
    assert first.read_bytes() == (again / "train" / "class_01" / "img_003.JPEG").read_bytes()
    with Image.open(first) as image:
        assert image.format == "JPEG" and image.size == (48, 40)
    means = [
        np.asarray(Image.open(fake_root / "val" / f"class_0{c}" / "img_000.JPEG"), float).mean(
            axis=(0, 1)
        )
        for c in range(3)
    ]
    assert min(np.abs(means[a] - means[b]).max() for a, b in ((0, 1), (0, 2), (1, 2))) > 50
    with pytest.raises(DataError, match="already holds files"):
        make_fake_imagefolder(again)


def _one_line_error_naming(path: Path, root: Path) -> str:
    with pytest.raises(DataError) as err:
        check_imagefolder(root)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message and "IMAGENET_DIR" in message
    return message


def test_missing_root_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    assert "does not exist" in _one_line_error_naming(missing, missing)


def test_root_without_val_is_named(own_root):
    shutil.rmtree(own_root / "val")
    assert "does not exist" in _one_line_error_naming(own_root / "val", own_root)


def test_val_without_class_folders_is_named(own_root):
    shutil.rmtree(own_root / "val")
    (own_root / "val").mkdir()
    assert "no class folder" in _one_line_error_naming(own_root / "val", own_root)


def test_val_class_that_train_lacks_is_named(own_root):
    (own_root / "val" / "class_99").mkdir()
    message = _one_line_error_naming(own_root / "val", own_root)
    assert "class_99" in message and "train/ lacks" in message


def test_class_folder_without_images_is_a_data_error(own_root):
    for image in (own_root / "train" / "class_01").iterdir():
        image.unlink()
    check_imagefolder(own_root)  # the layout is right; ImageFolder finds the empty class
    with pytest.raises(DataError, match="IMAGENET_DIR"):
        build_imagenet(own_root, image_size=32)


def _jitters(transform: v2.Compose) -> list[v2.ColorJitter]:
    return [t for t in transform.transforms if isinstance(t, v2.ColorJitter)]


def test_photometric_strength_sets_the_color_jitter():
    assert _jitters(train_transform(32, photometric=0.0)) == []
    (full,) = _jitters(train_transform(32, photometric=1.0))
    assert full.brightness == pytest.approx((0.6, 1.4))
    assert full.contrast == pytest.approx((0.6, 1.4))
    assert full.saturation == pytest.approx((0.6, 1.4))
    (half,) = _jitters(train_transform(32, photometric=0.5))
    assert half.brightness == pytest.approx((0.8, 1.2))
    steps = [type(t) for t in train_transform(32).transforms]
    assert steps[:2] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip]
    (normalize,) = [t for t in train_transform(32).transforms if isinstance(t, v2.Normalize)]
    assert tuple(normalize.mean) == IMAGENET_MEAN and tuple(normalize.std) == IMAGENET_STD


def test_eval_transform_is_one_deterministic_centre_crop():
    transform = eval_transform(224)
    assert [t.size for t in transform.transforms if isinstance(t, v2.Resize)] == [[256]]
    small = eval_transform(32)
    image = a_picture()
    torch.manual_seed(0)
    first = small(image)
    torch.manual_seed(1)
    assert first.shape == (3, 32, 32) and torch.equal(first, small(image))


def test_train_transform_is_random():
    transform = train_transform(32)
    image = a_picture()
    torch.manual_seed(0)
    first, second = transform(image), transform(image)
    assert first.shape == second.shape == (3, 32, 32)
    assert not torch.equal(first, second)


def indexed(n: int) -> TensorDataset:
    """A dataset whose label is its own index, so a loader's order can be read off the labels."""
    return TensorDataset(torch.zeros(n, 1), torch.arange(n))


def labels_of(loader) -> list[int]:
    return [int(y) for _, batch in loader for y in batch]


def test_train_loader_drops_the_incomplete_batch(fake_root):
    train, val = build_imagenet(fake_root, image_size=32)
    train_loader, val_loader, sampler = build_loaders(train, val, batch_size=5, workers=0, seed=0)
    assert sampler is None
    batches = list(train_loader)
    assert len(batches) == 24 // 5
    assert all(x.shape == (5, 3, 32, 32) and y.shape == (5,) for x, y in batches)
    assert sum(len(y) for _, y in val_loader) == 12  # validation keeps every image


def test_same_seed_same_order_other_seed_other_order():
    data = indexed(40)
    orders = [
        labels_of(build_loaders(data, data, batch_size=4, workers=0, seed=s)[0]) for s in (7, 7, 8)
    ]
    assert orders[0] == orders[1]
    assert orders[0] != orders[2]
    assert orders[0] != sorted(orders[0])  # shuffled
    _, val_loader, _ = build_loaders(data, data, batch_size=4, workers=0, seed=7)
    assert labels_of(val_loader) == list(range(40))  # validation in file order


def test_workers_persist_between_epochs():
    data = indexed(8)
    train_loader, val_loader, _ = build_loaders(data, data, batch_size=2, workers=1, seed=0)
    assert train_loader.persistent_workers and val_loader.persistent_workers
    train_loader, _, _ = build_loaders(data, data, batch_size=2, workers=0, seed=0)
    assert not train_loader.persistent_workers


def test_distributed_shards_are_disjoint_without_a_process_group():
    assert not torch.distributed.is_initialized()
    data = indexed(21)
    shards, val_shards = [], []
    for rank in (0, 1):
        train_loader, val_loader, sampler = build_loaders(
            data, data, batch_size=2, workers=0, seed=3, world_size=2, rank=rank
        )
        assert isinstance(sampler, DistributedSampler) and train_loader.sampler is sampler
        shards.append(labels_of(train_loader))
        val_shards.append(labels_of(val_loader))
        before = list(sampler)
        sampler.set_epoch(1)
        assert list(sampler) != before
    assert len(shards[0]) == len(shards[1]) == 10  # 21 // 2 per rank, 5 full batches of 2
    assert not set(shards[0]) & set(shards[1])
    assert len(set(shards[0]) | set(shards[1])) == 20  # all but the one dropped remainder
    assert set(val_shards[0]) | set(val_shards[1]) == set(range(21))


def test_too_few_images_for_one_batch_is_a_data_error():
    data = indexed(5)
    with pytest.raises(DataError, match="lower batch_size"):
        build_loaders(data, data, batch_size=4, workers=0, seed=0, world_size=2, rank=0)


def test_topk_correct_counts():
    logits = torch.tensor(
        [
            [0.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # target 1: top-1
            [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0],  # target 4: 5th
            [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0],  # target 5: 6th, outside top-5
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],  # target 6: top-1
        ]
    )
    target = torch.tensor([1, 4, 5, 6])
    assert topk_correct(logits, target) == {1: 2, 5: 3}
    assert topk_correct(logits, target, ks=(2,)) == {2: 2}
    three = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    assert topk_correct(three, torch.tensor([2, 1])) == {1: 0, 5: 2}  # k=5 clipped to 3


def test_module_cli_writes_a_tree(tmp_path):
    out = tmp_path / "smoke"
    args = [
        "--classes",
        "2",
        "--train-per-class",
        "3",
        "--val-per-class",
        "1",
        "--size",
        "20",
        "16",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "bnrepro.data.fake_imagefolder", str(out), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (out / "train").iterdir()) == ["class_00", "class_01"]
    assert len(list((out / "train" / "class_01").glob("*.JPEG"))) == 3
    assert len(list((out / "val" / "class_00").glob("*.JPEG"))) == 1
    with Image.open(out / "val" / "class_00" / "img_000.JPEG") as image:
        assert image.size == (20, 16)
    check_imagefolder(out)
