"""The device decode path (batched decode + augmentation) against torchvision, and the endless,
per-sample-seeded training batches of both decode paths: agreement, resume, epochs, shards."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from bnrepro.data.device_decode import (
    Augmentation,
    DataStream,
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    decode_and_augment,
    decode_batch,
    flip_batch,
    jitter_batch,
    resized_crops,
)
from bnrepro.data.fake_imagefolder import make_fake_imagefolder
from bnrepro.data.imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncodedImages,
    SeededImages,
    TrainAugmentation,
    build_imagenet,
    build_train_batches,
    collate_encoded,
    read_jpeg,
)

CPU = torch.device("cpu")
SIZE = 32  # output side of the training crops in these tests
GREY = 255 * min(IMAGENET_STD)  # one grey level of a [0, 255] image, in normalised units (max)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 8 train JPEGs of 96x80 (read-only for the tests that share it)."""
    return make_fake_imagefolder(tmp_path_factory.mktemp("imagenet"), size=(96, 80))


@pytest.fixture(scope="module")
def one_per_class(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 classes with one training image each: a batch's labels are its dataset indices."""
    return make_fake_imagefolder(
        tmp_path_factory.mktemp("indexed"), num_classes=10, train_per_class=1, size=(40, 32)
    )


def smooth_image(height: int = 300, width: int = 400) -> torch.Tensor:
    """A uint8 (3, H, W) image of gradients and slow waves: what natural images mostly are."""
    y = torch.linspace(0, 1, height).view(-1, 1)
    x = torch.linspace(0, 1, width).view(1, -1)
    channels = [
        128 + 100 * torch.sin(6 * x + 3 * y),
        255 * x * y,
        128 + 90 * torch.cos(9 * y) * torch.sin(4 * x),
    ]
    return torch.stack(channels).round().clamp(0, 255).to(torch.uint8)


# (a) the same sample seed gives the same augmentation on both paths -------------------------


def apply_drawn(image: Image.Image, params: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """torchvision's functional ops on PIL with the device path's drawn parameters."""
    top, left, height, width = params["boxes"].tolist()
    out = TF.resized_crop(image, top, left, height, width, [size, size], antialias=True)
    if params["flip"]:
        out = TF.horizontal_flip(out)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for op in params["order"].tolist():
        if op < 3:
            out = ops[op](out, params["factors"][op].item())
    return TF.pil_to_tensor(out)


def test_drawn_parameters_are_those_the_workers_transform_uses(root):
    train, _ = build_imagenet(root, SIZE)
    augmentation = TrainAugmentation(SIZE, photometric=1.0)
    workers = SeededImages(train, augmentation.transform())
    device = EncodedImages(train, augmentation)
    flips = set()
    for seed in range(40):
        index = seed % len(train)
        _, params, label = device[index, seed]
        x, workers_label = workers[index, seed]
        with Image.open(train.samples[index][0]) as image:
            expected = apply_drawn(image.convert("RGB"), params, SIZE)
        assert label == workers_label
        assert x.dtype == torch.uint8 and torch.equal(x, expected), seed
        flips.add(bool(params["flip"]))
    assert flips == {False, True}
    # A different seed gives a different crop: the comparison above can fail.
    assert not torch.equal(device[0, 0][1]["boxes"], device[0, 1][1]["boxes"])


def draw_many(augmentation: TrainAugmentation, height: int, width: int, n: int) -> torch.Tensor:
    boxes = []
    for seed in range(n):
        torch.manual_seed(seed)
        boxes.append(augmentation.draw(height, width)["boxes"])
    return torch.stack(boxes).double()  # (n, 4) top, left, height, width


@pytest.mark.parametrize(
    ("scale", "ratio"), [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.3, 0.5), (1.0, 2.0))]
)
def test_crop_area_and_aspect_stay_in_and_cover_the_configured_ranges(scale, ratio):
    height, width = 375, 500
    boxes = draw_many(TrainAugmentation(SIZE, 1.0, scale, ratio), height, width, 1000)
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    area, aspect = h * w / (height * width), w / h
    # w and h are rounded to whole pixels: at most half a pixel off on each side.
    slack_area = (h + w + 1) / (2 * height * width)
    assert (area >= scale[0] - slack_area).all() and (area <= scale[1] + slack_area).all()
    slack_aspect = (0.5 / h) * (1 + aspect)
    assert (aspect >= ratio[0] - slack_aspect).all() and (aspect <= ratio[1] + slack_aspect).all()
    span_area, span_aspect = scale[1] - scale[0], math.log(ratio[1] / ratio[0])
    assert area.min() < scale[0] + 0.05 * span_area and area.max() > scale[1] - 0.05 * span_area
    log_aspect = aspect.log()
    assert log_aspect.min() < math.log(ratio[0]) + 0.05 * span_aspect
    assert log_aspect.max() > math.log(ratio[1]) - 0.05 * span_aspect


# (b) crop + resize with roi_align against v2.functional.resized_crop --------------------------


def test_decode_batch_equals_pil_decoding(root):
    path = sorted((root / "train" / "class_01").iterdir())[0]
    data, (width, height) = read_jpeg(path)
    (decoded,) = decode_batch([data], CPU)
    with Image.open(path) as image:
        pil = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    assert decoded.shape == (3, height, width) and torch.equal(decoded, pil)


# (top, left, height, width): 3.6x and 1.4x smaller, 1.6x larger, and a thin strip.
BOXES = [(0, 0, 300, 400), (40, 60, 200, 180), (100, 150, 40, 50), (10, 20, 120, 31)]


def test_roi_align_crop_matches_antialiased_resized_crop():
    image = smooth_image()
    out = resized_crops([image] * len(BOXES), torch.tensor(BOXES), 64)
    assert out.shape == (len(BOXES), 3, 64, 64) and out.dtype == torch.float32
    for crop, box in zip(out, BOXES, strict=True):
        expected = TF.resized_crop(image, *box, size=[64, 64], antialias=True).float()
        diff = (crop - expected).abs()
        # Measured on this image: max 1.7, mean 0.18-0.27 grey levels (the resize's output is
        # uint8, so up to 0.5 of that is its rounding). The rest: when downscaling roi_align
        # averages a box over each output pixel where the antialiased resize weights a
        # triangle twice as wide; upscaling, both are bilinear.
        assert diff.max() < 2.5 and diff.mean() < 0.4, (box, diff.max(), diff.mean())


def test_canvas_groups_and_padding_do_not_change_the_crops():
    images = [smooth_image(300, 400), smooth_image(90, 70), smooth_image(160, 500)]
    boxes = torch.tensor([(40, 60, 200, 180), (5, 3, 80, 61), (0, 100, 150, 300)])
    together = resized_crops(images, boxes, 48)  # one canvas: smaller crops sit in padding
    apart = resized_crops(images, boxes, 48, max_elements=1)  # one canvas per image
    alone = torch.cat(
        [resized_crops([im], b[None], 48) for im, b in zip(images, boxes, strict=True)]
    )
    # Equal up to float rounding (measured 2e-5 of 255): at the canvas edge roi_align clamps,
    # in the padding it blends the pixel with its repeated copy.
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)
    torch.testing.assert_close(apart, alone, atol=1e-4, rtol=0)


# (c) flip and colour jitter, batched, against torchvision per image -------------------------


def test_flip_batch_flips_only_the_chosen_images():
    x = torch.rand(4, 3, 5, 6)
    flip = torch.tensor([True, False, False, True])
    out = flip_batch(x, flip)
    for i in range(4):
        assert torch.equal(out[i], TF.horizontal_flip(x[i]) if flip[i] else x[i])


def test_batched_jitter_matches_torchvision_per_image():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 20, 24, generator=generator)
    x[0] = 1.0  # saturated pixels: the clamping matters
    factors = 0.6 + 0.8 * torch.rand(8, 3, generator=generator)
    order = torch.stack([torch.randperm(4, generator=generator) for _ in range(8)])
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for fn, op in zip((adjust_brightness, adjust_contrast, adjust_saturation), ops, strict=True):
        out = fn(x, factors[:, 0])
        for i in range(8):
            torch.testing.assert_close(out[i], op(x[i], factors[i, 0].item()), atol=1e-6, rtol=0)
    out = jitter_batch(x, factors, order)
    worst = 0.0
    for i in range(8):
        expected = x[i]
        for step in order[i].tolist():
            if step < 3:
                expected = ops[step](expected, factors[i, step].item())
        worst = max(worst, (out[i] - expected).abs().max().item())
    assert worst < 1e-6  # measured: ~1e-7 (float32 rounding of a per-image vs scalar ratio)
    assert not torch.allclose(out, x, atol=0.01)  # the jitter did something


def test_packed_parameters_give_what_each_step_gives_alone(root):
    """decode_and_augment sends the flips, jitter and crop plan as one packed float64 tensor;
    its batch equals the steps run one by one with the parameters as drawn, bit for bit."""
    train, _ = build_imagenet(root, SIZE)
    encoded = EncodedImages(train, TrainAugmentation(SIZE, photometric=1.0))
    data, params, _ = collate_encoded([encoded[i, 100 + i] for i in range(8)])
    assert params["flip"].any() and not params["flip"].all()  # both kinds of image
    assert not torch.equal(params["order"], params["order"][:1].expand(8, 4))  # several orders
    augmentation = Augmentation(**params)
    for jitter in (True, False):
        x = resized_crops(decode_batch(data, CPU), params["boxes"], SIZE)
        x = flip_batch(x.div_(255.0), params["flip"])
        if jitter:
            x = jitter_batch(x, params["factors"], params["order"])
        expected = x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
        out = decode_and_augment(data, augmentation, SIZE, CPU, jitter)
        assert out.dtype == torch.uint8 and torch.equal(out, expected)
    # A mixed-up parameter shows: unflipped images differ.
    unflipped = Augmentation(params["boxes"], ~params["flip"], params["factors"], params["order"])
    assert not torch.equal(
        decode_and_augment(data, unflipped, SIZE, CPU, True),
        decode_and_augment(data, augmentation, SIZE, CPU, True),
    )


def test_the_data_stream_is_a_plain_call_on_a_cpu():
    stream = DataStream(CPU)
    assert stream.stream is None
    x = torch.arange(3)
    out = stream.run(lambda: (x, x + 1))
    assert out[0] is x and torch.equal(out[1], torch.tensor([1, 2, 3]))


# (d) both paths end to end ------------------------------------------------------------------


def first_batches(root: Path, decode: str, seed: int, n: int, workers: int = 0) -> list:
    train, _ = build_imagenet(root, SIZE)
    batches = build_train_batches(
        train,
        TrainAugmentation(SIZE, photometric=1.0),
        decode=decode,
        batch_size=4,
        workers=workers,
        seed=seed,
        device=CPU,
    )
    return [next(batches) for _ in range(n)]


def test_both_paths_give_normalized_batches_that_agree(root):
    low = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
    high = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
    runs = {d: first_batches(root, d, seed=3, n=6) for d in ("workers", "device")}
    for batches in runs.values():
        for x, y in batches:
            assert x.shape == (4, 3, SIZE, SIZE) and x.dtype == torch.float32
            assert y.shape == (4,) and y.dtype == torch.int64
            assert low - 1e-5 <= x.min() < 0 < x.max() <= high + 1e-5
    for (_, y_workers), (_, y_device) in zip(runs["workers"], runs["device"], strict=True):
        assert torch.equal(y_workers, y_device)
    workers = torch.cat([x for x, _ in runs["workers"]])
    device = torch.cat([x for x, _ in runs["device"]])
    mean_grey = (workers - device).abs().mean().item() / (1 / GREY)
    # Same crops, flips and jitter factors; the pixels differ by the resampling filter (box vs
    # PIL's triangle) and PIL's uint8 colour ops, which per-pixel noise of std 40 grey levels
    # (the fake images) shows at its worst. Measured: mean 2.1 grey levels.
    assert mean_grey < 3.5
    other_seed = torch.cat([x for x, _ in first_batches(root, "device", seed=4, n=6)])
    assert (workers - other_seed).abs().mean().item() / (1 / GREY) > 10 * mean_grey


# (e) exact resume, any number of workers ----------------------------------------------------


def make_batches(train, decode: str, workers: int):
    return build_train_batches(
        train,
        TrainAugmentation(SIZE, photometric=1.0),
        decode=decode,
        batch_size=4,
        workers=workers,
        seed=5,
        device=CPU,
    )


@pytest.mark.parametrize("decode", ["workers", "device"])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_bit_identically(root, decode, workers):
    train, _ = build_imagenet(root, SIZE)
    reference = make_batches(train, decode, workers=0)
    expected = [next(reference) for _ in range(9)]  # 6 batches per epoch: crosses a boundary
    original = make_batches(train, decode, workers)
    for i in range(4):
        x, y = next(original)
        assert torch.equal(x, expected[i][0]) and torch.equal(y, expected[i][1])  # any workers
    state = original.state_dict()
    assert state == {"epoch": 0, "position": 4}
    resumed = make_batches(train, decode, workers)
    resumed.load_state_dict(state)
    for i in range(4, 9):
        x, y = next(original)
        xr, yr = next(resumed)
        assert torch.equal(x, expected[i][0]) and torch.equal(xr, x) and torch.equal(yr, y)
    assert resumed.state_dict() == original.state_dict() == {"epoch": 1, "position": 3}


@pytest.mark.parametrize("decode", ["workers", "device"])
def test_resume_reads_no_skipped_file(root, tmp_path, decode):
    tree = Path(shutil.copytree(root, tmp_path / "imagenet"))
    train, _ = build_imagenet(tree, SIZE)
    original = make_batches(train, decode, workers=0)
    for _ in range(4):
        next(original)
    state = original.state_dict()
    rest = [next(original) for _ in range(2)]  # the end of epoch 0
    for index in original.sampler.epoch_indices(0)[: 4 * 4]:
        Path(train.samples[index][0]).unlink()  # the images of the 4 batches served
    resumed = make_batches(train, decode, workers=0)
    resumed.load_state_dict(state)
    for x, y in rest:  # would raise FileNotFoundError if a skipped image were read
        xr, yr = next(resumed)
        assert torch.equal(xr, x) and torch.equal(yr, y)


# (f) one iterator, whole epochs; (g) disjoint shards -----------------------------------------


def labels_by_epoch(batches, epochs: int) -> list[list[int]]:
    out = []
    for _ in range(epochs):
        labels: list[int] = []
        for _ in range(batches.sampler.batches_per_epoch):
            labels += next(batches)[1].tolist()
        out.append(labels)
    return out


@pytest.mark.parametrize("decode", ["workers", "device"])
def test_one_loader_iterator_serves_every_epoch_whole(one_per_class, decode):
    train, _ = build_imagenet(one_per_class, SIZE)
    batches = build_train_batches(
        train,
        TrainAugmentation(SIZE),
        decode=decode,
        batch_size=3,
        workers=2,
        seed=0,
        device=CPU,
    )
    assert batches.sampler.batches_per_epoch == 3  # 10 images: 3 whole batches, 1 dropped
    assert batches.iterator is None  # created at the first batch, not before
    epochs = labels_by_epoch(batches, 4)  # the labels are the dataset indices here
    assert batches.state_dict() == {"epoch": 4, "position": 0}
    # Four epochs through one DataLoader iterator and one pass of the endless sampler (an
    # iterator per epoch would restart the sampler, and the workers would drain at each end).
    iterator = batches.iterator
    assert iterator is not None and batches.sampler.iterations == 1
    next(batches)
    assert batches.iterator is iterator and batches.sampler.iterations == 1
    for epoch, labels in enumerate(epochs):
        assert len(labels) == len(set(labels)) == 9  # each index of the shard exactly once
        assert labels == batches.sampler.epoch_indices(epoch), epoch
    assert len({tuple(e) for e in epochs}) == 4  # a new order every epoch


def test_two_ranks_read_disjoint_shards(one_per_class):
    assert not torch.distributed.is_initialized()
    train, _ = build_imagenet(one_per_class, SIZE)
    shards = []
    for rank in (0, 1):
        batches = build_train_batches(
            train,
            TrainAugmentation(SIZE),
            decode="device",
            batch_size=2,
            workers=0,
            seed=0,
            device=CPU,
            world_size=2,
            rank=rank,
        )
        shards.append(labels_by_epoch(batches, 3))  # 5 images per rank: 2 batches of 2
    for epoch in range(3):
        first, second = shards[0][epoch], shards[1][epoch]
        assert len(first) == len(second) == 4
        assert not set(first) & set(second)
    assert shards[0][0] != shards[0][1]


def test_drawn_jitter_follows_photometric():
    torch.manual_seed(0)
    params = TrainAugmentation(SIZE, photometric=0.0).draw(100, 120)
    assert torch.equal(params["factors"], torch.ones(3))
    torch.manual_seed(0)
    full = TrainAugmentation(SIZE, photometric=1.0).draw(100, 120)["factors"]
    assert ((full >= 0.6) & (full <= 1.4)).all() and not torch.equal(full, torch.ones(3))
    assert isinstance(TrainAugmentation(SIZE).crop, v2.RandomResizedCrop)
