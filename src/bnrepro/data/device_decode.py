"""Batched JPEG decoding and Inception augmentation on the run's device (GPU, or CPU in tests).

CPU workers that decode, crop and jitter with PIL feed about 2,500 images/s on 16 cores, a third
of what BN-Inception consumes on one H100. Here the workers only read file bytes and draw the
augmentation parameters (see `bnrepro.data.imagenet.TrainAugmentation.draw`); the main process
then decodes the whole batch at once with nvJPEG and crops, resizes, flips and colour-jitters it
with batched tensor ops, never one image at a time in a Python loop over pixels.

The output is a uint8 batch, like the workers path's, so that both go through the same
normalisation (`bnrepro.data.imagenet.normalize_batch`).

No step waits for the host here: a batch's parameters reach the device as one pinned tensor
copied asynchronously (`bnrepro.data.transfer.to_device`), and on a GPU the whole
preprocessing runs on a stream of its own (`DataStream`, which says why: the decoder's stream
race).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from bnrepro.data.transfer import to_device

# Float32 elements one canvas of padded crops may hold (2**27 = 512 MiB). A batch of 256 typical
# ImageNet crops fits in one or two canvases; a group of 2000+ px images gets canvases of its own.
CANVAS_ELEMENTS = 2**27

# ColorJitter's operation ids (the order of v2.ColorJitter's fn_idx); 3, hue, is never used here.
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2

# The columns of a batch's packed parameters (`decode_and_augment`), one row per image: its flip,
# its 3 jitter factors, its 4 jitter steps, then (in canvas-group order, see `_crop_plan`) the
# destination index and roi_align's 5-column box of a crop. float64 holds every value exactly:
# the float32 factors and the integers (pixel sizes and indices, far below 2**53).
FLIP, FACTORS, ORDER, PLAN = 0, slice(1, 4), slice(4, 8), slice(8, 14)

Outputs = TypeVar("Outputs", bound=Sequence[torch.Tensor])


@dataclass
class Augmentation:
    """One batch's augmentation parameters, one row per image, as the workers drew them."""

    boxes: torch.Tensor  # (N, 4) int64: top, left, height, width of the crop in source pixels
    flip: torch.Tensor  # (N,) bool: mirror left-right
    factors: torch.Tensor  # (N, 3) float32: brightness, contrast, saturation factors (1 = none)
    order: torch.Tensor  # (N, 4) int64: ColorJitter's random order of the operations


def decode_batch(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Decode a list of JPEG byte tensors (CPU, uint8) into (3, H, W) uint8 images on `device`.

    One call for the whole list: on CUDA torchvision hands it to nvJPEG's batched decoder, which
    is what makes device decoding fast. Grey JPEGs come out as RGB (ImageReadMode.RGB).
    """
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they still work
        # and torchvision 0.26 (the GPU machines') has no replacement, so keep the log clean.
        warnings.simplefilter("ignore", DeprecationWarning)
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return list(images)


def _crops(images: list[torch.Tensor], boxes: torch.Tensor) -> list[torch.Tensor]:
    """Each image cut to its crop box (a view, no copy): the canvases then hold only the crops
    (8-100 % of an image's area), and pixels outside a crop are never read, as with
    v2.functional.resized_crop, which crops first and resizes the crop alone."""
    return [
        image[:, top : top + height, left : left + width]
        for image, (top, left, height, width) in zip(images, boxes.tolist(), strict=True)
    ]


def _groups(shapes: list[tuple[int, int]], max_elements: int) -> list[list[int]]:
    """Indices grouped so that each group's padded canvas (n, 3, max h, max w) stays under
    `max_elements` (a single image larger than that gets a canvas of its own). Sorting by
    height first keeps similar sizes together, so little of a canvas is padding."""
    order = sorted(range(len(shapes)), key=lambda i: shapes[i], reverse=True)
    groups: list[list[int]] = []
    group: list[int] = []
    max_h = max_w = 0
    for i in order:
        h, w = shapes[i]
        new_h, new_w = max(max_h, h), max(max_w, w)
        if group and (len(group) + 1) * 3 * new_h * new_w > max_elements:
            groups.append(group)
            group, new_h, new_w = [], h, w
        group.append(i)
        max_h, max_w = new_h, new_w
    if group:
        groups.append(group)
    return groups


def _crop_plan(
    shapes: list[tuple[int, int]], max_elements: int
) -> tuple[list[list[int]], torch.Tensor]:
    """The canvas groups (`_groups`) of crops of `shapes`, and a (N, 6) float64 plan, the groups'
    crops in order: the crop's index in the batch, then roi_align's box (index into the
    group's canvas, x1, y1, x2, y2), each crop at the canvas's origin. Host arithmetic only."""
    groups = _groups(shapes, max_elements)
    rows = [
        [i, slot, 0, 0, shapes[i][1], shapes[i][0]]
        for group in groups
        for slot, i in enumerate(group)
    ]
    return groups, torch.tensor(rows, dtype=torch.float64)


def _resize_groups(
    crops: list[torch.Tensor], groups: list[list[int]], plan: torch.Tensor, size: int
) -> torch.Tensor:
    """The crops resized by roi_align, group by group: (N, 3, size, size) float32 in [0, 255].
    `plan` (from `_crop_plan`) is already on the crops' device."""
    device = crops[0].device
    shapes = [(c.shape[-2], c.shape[-1]) for c in crops]
    out = torch.empty(len(crops), 3, size, size, dtype=torch.float32, device=device)
    start = 0
    for group in groups:
        rows = plan[start : start + len(group)]
        start += len(group)
        max_h = max(shapes[i][0] for i in group)
        max_w = max(shapes[i][1] for i in group)
        canvas = torch.zeros(len(group), 3, max_h, max_w, dtype=torch.float32, device=device)
        for slot, i in enumerate(group):
            h, w = shapes[i]
            canvas[slot, :, :h, :w].copy_(crops[i])  # uint8 -> float32 in the copy
            # Bilinear samples within half a pixel of the bottom/right edge read one row/column
            # past it (roi_align clamps only at the canvas edge): repeat the edge there, as
            # resize does, instead of reading the padding.
            if h < max_h:
                canvas[slot, :, h, :w] = canvas[slot, :, h - 1, :w]
            if w < max_w:
                canvas[slot, :, : min(h + 1, max_h), w] = canvas[
                    slot, :, : min(h + 1, max_h), w - 1
                ]
        out[rows[:, 0].long()] = roi_align(
            canvas,
            rows[:, 1:].float(),
            output_size=size,
            spatial_scale=1.0,
            sampling_ratio=-1,
            aligned=True,
        )
    return out


def resized_crops(
    images: list[torch.Tensor],
    boxes: torch.Tensor,
    size: int,
    max_elements: int = CANVAS_ELEMENTS,
) -> torch.Tensor:
    """Crop `boxes` (N, 4: top, left, height, width) out of `images` and resize each crop to
    size x size: (N, 3, size, size) float32 in [0, 255] on the images' device.

    torchvision.ops.roi_align does the whole batch at once. aligned=True puts pixel centres at
    half-integers, as resize does. sampling_ratio=-1 lets roi_align average ceil(crop/size)^2
    bilinear samples per output pixel in each box: when downscaling this is a box filter over
    the output pixel's footprint (antialiasing, close to v2's antialiased bilinear resize, whose
    filter is a triangle twice as wide), and when upscaling it is one bilinear sample, i.e.
    plain bilinear interpolation.
    """
    crops = _crops(images, boxes)
    groups, plan = _crop_plan([(c.shape[-2], c.shape[-1]) for c in crops], max_elements)
    return _resize_groups(crops, groups, to_device(plan, crops[0].device), size)


def flip_batch(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images whose `flip` is True (one batched select, no sync)."""
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    # v2.functional.rgb_to_grayscale's float formula (ITU-R 601-2 luma), same order of ops.
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(dim=-3)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    # v2.functional's _blend with a per-image ratio; float images are clamped to [0, 1].
    return x.mul(ratio).add_(other * (1.0 - ratio)).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """v2.functional.adjust_brightness with one factor per image: x (N, 3, H, W) in [0, 1]."""
    return x.mul(factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """v2.functional.adjust_contrast per image: blend with the image's mean grey level."""
    mean = _grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, factor.view(-1, 1, 1, 1))


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """v2.functional.adjust_saturation per image: blend with the image's grey version."""
    return _blend(x, _grayscale(x), factor.view(-1, 1, 1, 1))


def jitter_batch(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """v2.ColorJitter (brightness, contrast, saturation) on a batch in [0, 1], each image with
    its own factors and its own order of operations, as the workers path applies them.

    At each of ColorJitter's four steps every image takes the operation its `order` names
    there: all three are computed for the whole batch and selected per image with torch.where
    (3x the arithmetic of one, cheap next to the network, and no host-device sync).
    """
    factors, order = factors.to(x.device, torch.float32), order.to(x.device)
    for step in range(order.shape[1]):
        op = order[:, step].view(-1, 1, 1, 1)
        bright = adjust_brightness(x, factors[:, BRIGHTNESS])
        contrast = adjust_contrast(x, factors[:, CONTRAST])
        saturated = adjust_saturation(x, factors[:, SATURATION])
        x = torch.where(
            op == BRIGHTNESS,
            bright,
            torch.where(op == CONTRAST, contrast, torch.where(op == SATURATION, saturated, x)),
        )
    return x


def decode_and_augment(
    data: list[torch.Tensor],
    params: Augmentation,
    size: int,
    device: torch.device,
    jitter: bool,
) -> torch.Tensor:
    """JPEG bytes and their drawn parameters -> augmented (N, 3, size, size) uint8 on `device`.

    Decode (batched), crop + resize (roi_align), flip, colour jitter (when `jitter`), then
    round to uint8: the workers path hands over uint8 too, so both share one normalisation.
    Everything the device needs besides the pixels (flips, jitter factors and steps, the crops'
    destinations and boxes) goes over as one packed tensor (columns FLIP ... PLAN), in one
    asynchronous copy; the crop boxes themselves only cut views on the host.
    """
    images = decode_batch(data, device)
    crops = _crops(images, params.boxes)
    groups, plan = _crop_plan([(c.shape[-2], c.shape[-1]) for c in crops], CANVAS_ELEMENTS)
    packed = torch.cat(
        [
            params.flip.to(torch.float64).view(-1, 1),
            params.factors.to(torch.float64),
            params.order.to(torch.float64),
            plan,
        ],
        dim=1,
    )
    packed = to_device(packed, device)
    x = _resize_groups(crops, groups, packed[:, PLAN], size).div_(255.0)
    x = flip_batch(x, packed[:, FLIP] != 0)
    if jitter:
        x = jitter_batch(x, packed[:, FACTORS].float(), packed[:, ORDER].long())
    return x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)


class DataStream:
    """Runs one train-batch iterator's device preprocessing (decode, crop, jitter, normalise)
    on a CUDA stream of its own; on a CPU, `run` is a plain call (no streams).

    Why (pytorch/vision PR #9606; torchcodec PR #1634 fixes the same in its wrapper):
    torchvision's `decode_jpeg(list, device="cuda")` allocates its outputs on the caller's
    current stream but decodes on a private stream that never waits for the caller's stream,
    and nvJPEG's hardware decoder does not even honour the stream it is given. The caching
    allocator hands a block freed on stream S to the next allocation on S at once (later work
    on S is ordered after the earlier), so on the training stream the decoder could be handed
    memory that queued backward kernels still read, and overwrite it: silently wrong
    gradients (the PR measured 134 of 200 iterations corrupted on an H100; draining the
    caller's stream first made it 0 of 200). Here:

    - the decoder's outputs and every intermediate are allocated on this stream, whose only
      work is this preprocessing, so the allocator can hand the decoder only blocks freed on
      it, never the training stream's;
    - before each decode the host waits for this stream's previous batch (an event recorded
      after it): a deliberate wait on our own earlier work, normally long finished, never on
      the training stream. The blocks freed on this stream are then idle, whatever nvJPEG
      does with streams. (torch's sync debug mode does not flag an event wait.)
    - after it the training stream waits for this stream, and every returned tensor is
      `record_stream`ed on the training stream, so that its block goes back to this stream's
      pool only once the training stream's work on it has run.

    `work` must decode before it frees anything on this stream (decode_and_augment does): a
    block freed in the same call could still be read by its queued kernels. One per iterator
    (population batches get their own), created once.
    """

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.done = torch.cuda.Event() if self.stream is not None else None

    def run(self, work: Callable[[], Outputs]) -> Outputs:
        """`work()` (which returns device tensors) on this stream, its results ready for the
        caller's current (training) stream."""
        if self.stream is None or self.done is None:
            return work()
        # The deliberate host wait (see the class docstring); a no-op before the first record.
        self.done.synchronize()
        training = torch.cuda.current_stream(self.stream.device)
        with torch.cuda.stream(self.stream):
            outputs = work()
            self.done.record(self.stream)
        training.wait_stream(self.stream)
        for tensor in outputs:
            tensor.record_stream(training)
        return outputs
