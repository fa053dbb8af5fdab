"""Training throughput of BN-Inception against torchvision's GoogLeNet, synthetic input.

    python scripts/bench_imagenet.py                 # GPU if there is one: batch 256, bf16, NHWC
    python scripts/bench_imagenet.py --device cpu    # CPU: batch 4, eager only unless --compile

Measures images/s of full training steps (forward, backward, SGD) after warm-up, eager and
torch.compile, for both networks under the same settings, all in one run so the ratios are
fair. Writes results/bench/imagenet_<device>.md and .json with the machine described.
scripts/bench_gpu.py reuses `measure_training` for its wider GPU benchmark.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.models import googlenet

from bnrepro.models.batchnorm import BNStats
from bnrepro.models.inception import BNInception
from bnrepro.models.norms import Normalization


def make_model(name: str) -> torch.nn.Module:
    if name == "bn_inception":
        bn = BNStats(stats="ema", momentum=0.1, eps=1e-5, population_batches=100)
        return BNInception(num_classes=1000, norm=Normalization("bn", bn=bn))
    return googlenet(weights=None, aux_logits=False, init_weights=True)


def measure_training(
    name: str,
    device: torch.device,
    batch: int,
    size: int,
    compile_mode: str | None = None,
    warmup: int = 10,
    steps: int | None = None,
    seconds: float = 3.0,
) -> dict[str, float]:
    """Images/s of full training steps (forward, backward, SGD with momentum) after warm-up.

    On GPU: bf16 autocast and channels_last, as the trainer runs them. `compile_mode`: None
    (eager) or a torch.compile mode ("default", "reduce-overhead" = CUDA graphs). The first
    step (compilation, cuDNN's algorithm search) is timed on its own as `first_step_s`. With
    `steps` None the timed steps are as many as fill about `seconds` (at least 10).
    """
    cuda = device.type == "cuda"
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    model = make_model(name).to(device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.045, momentum=0.9)
    step_model = model if compile_mode is None else torch.compile(model, mode=compile_mode)
    graphs = compile_mode == "reduce-overhead"
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=memory_format)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        if graphs:  # a new iteration: the previous step's graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(step_model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed(n: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    first = timed(1)  # includes compilation
    rest = timed(warmup - 1) if warmup > 1 else 0.0
    if steps is None:  # calibrate: enough steps to fill `seconds`, timing noise aside
        per_step = timed(5) / 5
        steps = max(10, min(2000, math.ceil(seconds / max(per_step, 1e-6))))
    elapsed = timed(steps)
    return {
        "images_per_s": batch * steps / elapsed,
        "first_step_s": first,
        "warmup_s": first + rest,
        "steps": steps,
        "timed_s": elapsed,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    }


def images_per_second(
    name: str,
    compiled: bool,
    device: torch.device,
    batch: int,
    size: int,
    steps: int,
    warmup: int,
) -> float:
    mode = "default" if compiled else None
    return measure_training(name, device, batch, size, mode, warmup, steps)["images_per_s"]


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch", type=int, help="default: 256 on GPU, 4 on CPU")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, help="timed steps (default: 50 GPU, 3 CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 10 GPU, 1 CPU)")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time torch.compile (default: on GPU only)",
    )
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    args = parser.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    batch = args.batch or (256 if cuda else 4)
    steps = args.steps or (50 if cuda else 3)
    warmup = args.warmup or (10 if cuda else 1)
    modes = [False, True] if (args.compile if args.compile is not None else cuda) else [False]
    if cuda:
        torch.backends.cudnn.benchmark = True

    rows = []
    for compiled in modes:
        for name in ("bn_inception", "googlenet"):
            ips = images_per_second(name, compiled, device, batch, args.image_size, steps, warmup)
            rows.append({"model": name, "compile": compiled, "images_per_s": round(ips, 1)})
            print(f"{name:13s} compile={compiled!s:5s} {ips:10.1f} img/s", flush=True)
    by = {(r["model"], r["compile"]): r["images_per_s"] for r in rows}
    for compiled in modes:
        ratio = by[("bn_inception", compiled)] / by[("googlenet", compiled)]
        print(f"BN-Inception / GoogLeNet (compile={compiled}): {ratio:.2f}")

    settings = (
        f"batch {batch}, {args.image_size}x{args.image_size}, "
        + ("bf16 autocast, channels_last" if cuda else "fp32, contiguous")
        + f", {steps} timed steps after {warmup} warm-up"
    )
    command = "python scripts/bench_imagenet.py " + " ".join(sys.argv[1:])
    lines = [
        f"# BN-Inception training throughput ({device.type})",
        "",
        f"Device: {describe(device)}. Settings: {settings}.",
        f"Command: `{command.strip()}`",
        "",
        "| model | torch.compile | images/s |",
        "|---|---|---|",
    ]
    lines += [f"| {r['model']} | {r['compile']} | {r['images_per_s']:,} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"imagenet_{device.type}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"imagenet_{device.type}.json").write_text(
        json.dumps(
            {
                "device": describe(device),
                "settings": settings,
                "command": command.strip(),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out / f'imagenet_{device.type}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
