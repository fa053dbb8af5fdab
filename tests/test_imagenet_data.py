"""The ImageNet pipeline on tiny fake ImageFolder trees: layout checks, transforms, loaders."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import TensorDataset
from torchvision.transforms import v2

from bnrepro.config.schema import parse_config
from bnrepro.data.fake_imagefolder import make_fake_imagefolder
from bnrepro.data.imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EndlessShards,
    build_imagenet,
    build_val_loader,
    check_imagefolder,
    eval_transform,
    normalize_batch,
    resolve_decode,
    sample_seed,
    topk_correct,
    topk_hits,
    train_transform,
)
from bnrepro.errors import DataError
from bnrepro.infra.distributed import DistEnv
from bnrepro.models.norms import Normalization
from bnrepro.tasks import build_task
from bnrepro.training.placement import decide_placement
from bnrepro.training.run import build_model

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


def test_build_imagenet_gives_files_and_uint8_val_crops(fake_root):
    train, val = build_imagenet(fake_root, image_size=32)
    assert len(train) == 24 and len(val) == 12
    assert train.class_to_idx == val.class_to_idx == {"class_00": 0, "class_01": 1, "class_02": 2}
    assert train.transform is None  # the training batches read and augment the files
    xv, yv = val[11]
    assert type(xv) is torch.Tensor and xv.dtype == torch.uint8 and xv.shape == (3, 32, 32)
    assert yv == 2
    x = normalize_batch(xv[None], torch.device("cpu"))
    assert x.dtype == torch.float32 and x.min() < 0 < x.max()  # normalized, not in [0, 1]


def test_normalize_batch_equals_todtype_and_normalize():
    images = torch.randint(0, 256, (5, 3, 7, 9), dtype=torch.uint8)
    images[0, :, 0, 0] = 0
    images[0, :, 0, 1] = 255
    old = v2.Compose(
        [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    expected = torch.stack([old(image) for image in images])
    x = normalize_batch(images, torch.device("cpu"))
    assert x.dtype == torch.float32 and x.shape == images.shape
    assert (x - expected).abs().max() <= 1e-6
    nhwc = normalize_batch(images, torch.device("cpu"), channels_last=True)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and torch.equal(nhwc, x)


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
    assert steps == [
        v2.RandomResizedCrop,
        v2.RandomHorizontalFlip,
        v2.ColorJitter,
        v2.ToImage,
        v2.ToPureTensor,
    ]  # uint8 out: no ToDtype or Normalize in the workers (normalize_batch does it)
    crop = train_transform(32, scale=(0.3, 0.5)).transforms[0]
    assert isinstance(crop, v2.RandomResizedCrop) and crop.scale == (0.3, 0.5)
    assert crop.ratio == (3 / 4, 4 / 3)


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


def test_epochs_are_cut_to_whole_batches():
    sampler = EndlessShards(24, batch_size=5, seed=0)
    assert sampler.batches_per_epoch == 4
    stream = iter(sampler)
    first = [next(stream) for _ in range(20)]
    assert [index for index, _ in first] == sampler.epoch_indices(0)  # 20 of 24, in order
    assert len({index for index, _ in first}) == 20
    second = [next(stream)[0] for _ in range(20)]
    assert second == sampler.epoch_indices(1) and second != sampler.epoch_indices(0)


def test_same_seed_same_order_other_seed_other_order():
    orders = [EndlessShards(40, 4, seed=s).epoch_indices(0) for s in (7, 7, 8)]
    assert orders[0] == orders[1]
    assert orders[0] != orders[2]
    assert orders[0] != sorted(orders[0])  # shuffled


def test_sample_seeds_depend_on_seed_epoch_and_index_only():
    seeds = {sample_seed(s, e, i) for s in (1, 2) for e in (0, 1) for i in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(1, 0, 3) == sample_seed(1, 0, 3)
    starts = [EndlessShards(40, 4, seed=3, world_size=2, rank=r) for r in (0, 1)]
    for sampler in starts:
        sampler.start_at(2, 1)
        index, seed = next(iter(sampler))
        assert index == sampler.epoch_indices(2)[4] and seed == sample_seed(3, 2, index)


def test_val_loader_keeps_every_image_in_file_order():
    data = indexed(13)
    loader = build_val_loader(data, batch_size=4, workers=0)
    assert labels_of(loader) == list(range(13))
    assert build_val_loader(data, batch_size=4, workers=1).persistent_workers
    shards = [
        labels_of(build_val_loader(data, batch_size=4, workers=0, world_size=2, rank=r))
        for r in (0, 1)
    ]
    assert set(shards[0]) | set(shards[1]) == set(range(13))


def test_too_few_images_for_one_batch_is_a_data_error():
    with pytest.raises(DataError, match="lower batch_size"):
        EndlessShards(5, batch_size=4, seed=0, world_size=2, rank=0)


def test_decode_modes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_decode("auto", cpu) == "workers" and resolve_decode("auto", cuda) == "device"
    assert (
        resolve_decode("device", cpu) == "device" and resolve_decode("workers", cuda) == "workers"
    )


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
    # The device variant: the same counts, as 0-dim int64 tensors (nothing read on the host).
    hits = topk_hits(logits, target)
    assert all(h.shape == () and h.dtype == torch.int64 for h in hits.values())
    assert {k: int(h) for k, h in hits.items()} == {1: 2, 5: 3}
    with pytest.raises(ValueError, match="every k must be >= 1"):
        topk_hits(logits, target, ks=(0,))


def test_validation_summed_on_the_device_equals_the_host_sums(compose_cfg, fake_root):
    """The ImageNet task's evaluation sums loss and top-k counts on the device and reads them
    once; its numbers are those of the per-batch host reads it replaced (a Python float sum of
    each batch's loss, integer counts), exactly, over batches of 5, 5 and 2 images."""
    cfg = parse_config(
        compose_cfg(
            "experiment=imagenet/bn_x30",
            f"paths.imagenet_dir={fake_root}",
            "++data.image_size=32",
            "++data.batch_size=5",
            "++data.workers=0",
            "++model.num_classes=3",
            "++trainer.probe.num_images=2",
        )
    )
    env = DistEnv()
    placement = decide_placement(cfg, env)
    norm = Normalization.from_model(cfg.model)
    network, _ = build_model(cfg, env, placement, norm)
    (record,) = build_task(cfg, env, placement, norm.bn).evaluate(network)
    _, val_set = build_imagenet(fake_root, image_size=32)
    loss_sum, top1, top5, n = 0.0, 0, 0, 0
    network.eval()
    with torch.inference_mode():
        for images, labels in build_val_loader(val_set, batch_size=5, workers=0):
            logits = network(normalize_batch(images, torch.device("cpu")))
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            correct = topk_correct(logits, labels, (1, 5))
            top1, top5, n = top1 + correct[1], top5 + correct[5], n + labels.numel()
    assert n == 12
    expected = {"val/loss": loss_sum / n, "val/top1": 100 * top1 / n, "val/top5": 100 * top5 / n}
    assert record == expected


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
