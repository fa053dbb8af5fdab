"""One placement per run (training/placement.py): what a GPU run does differently from a CPU
run is decided once, from the config and the device, and the network, the task and the CUDA
graph decision follow it.

The CUDA decisions are checked on any machine: a DistEnv naming cuda:0 is only a name, and
deciding touches no GPU. What runs on the CPU here follows a placement built by hand."""

from __future__ import annotations

import pytest
import torch

from bnrepro.config.schema import parse_config
from bnrepro.data.fake_imagefolder import make_fake_imagefolder
from bnrepro.errors import ConfigError
from bnrepro.infra.distributed import DistEnv
from bnrepro.models.norms import Normalization
from bnrepro.tasks import build_task
from bnrepro.training.loop import train_step
from bnrepro.training.placement import Placement, decide_placement
from bnrepro.training.run import build_model, use_cuda_graph

CPU = DistEnv(device=torch.device("cpu"))
GPU = DistEnv(device=torch.device("cuda", 0))


@pytest.fixture
def run_config(compose_cfg):
    def _run(experiment: str, *overrides: str):
        return parse_config(compose_cfg(f"experiment={experiment}", *overrides))

    return _run


def test_the_cpu_runs_fp32_nchw_unpinned_whatever_the_config_asks(run_config):
    imagenet = run_config("imagenet/bn_x30")  # trainer.amp=bf16, channels_last=true
    assert imagenet.trainer.amp == "bf16" and imagenet.trainer.channels_last
    for cfg in (imagenet, run_config("mnist/bn")):
        placement = decide_placement(cfg, CPU)
        assert placement == Placement(torch.device("cpu"), None, torch.contiguous_format, False)
        assert not placement.is_cuda and not placement.channels_last


def test_a_gpu_runs_what_the_config_asks_and_pins(run_config):
    imagenet = decide_placement(run_config("imagenet/bn_x30"), GPU)
    assert imagenet.device == torch.device("cuda", 0) and imagenet.is_cuda
    assert imagenet.autocast_dtype is torch.bfloat16 and imagenet.channels_last
    assert imagenet.pin_memory
    mnist = decide_placement(run_config("mnist/bn"), GPU)  # trainer.amp=null, channels_last=false
    assert (mnist.autocast_dtype, mnist.memory_format, mnist.pin_memory) == (
        None,
        torch.contiguous_format,
        True,
    )
    off = run_config("imagenet/bn_x30", "trainer.amp=null", "trainer.channels_last=false")
    assert decide_placement(off, GPU).autocast_dtype is None
    assert not decide_placement(off, GPU).channels_last


def test_the_cuda_graph_follows_the_placement(run_config):
    mnist = run_config("mnist/bn")  # trainer.cuda_graph=auto
    bn = Normalization.from_model(mnist.model).bn
    assert use_cuda_graph(mnist, GPU, decide_placement(mnist, GPU), bn)
    assert not use_cuda_graph(mnist, CPU, decide_placement(mnist, CPU), bn)
    amp = run_config("mnist/bn", "trainer.amp=bf16")
    assert not use_cuda_graph(amp, GPU, decide_placement(amp, GPU), bn)
    assert not use_cuda_graph(amp, CPU, decide_placement(amp, CPU), bn)  # no CPU graphs anyway
    insist = run_config("mnist/bn", "trainer.amp=bf16", "trainer.cuda_graph=true")
    with pytest.raises(ConfigError, match="cannot capture this run: trainer.amp=bf16;"):
        use_cuda_graph(insist, GPU, decide_placement(insist, GPU), bn)
    with pytest.raises(ConfigError, match="cannot capture this run: the device is not a GPU;"):
        use_cuda_graph(insist, CPU, decide_placement(insist, CPU), bn)


def test_imagenet_is_never_captured_in_a_cuda_graph(run_config):
    """Even with a constant rate and no autocast (the MLP's conditions), an ImageNet run is not
    captured: its loader's pin-memory thread calls CUDA while the capture runs."""
    flat = ("optim.schedule=null", "trainer.amp=null")
    cfg = run_config("imagenet/bn_x30", *flat)
    bn = Normalization.from_model(cfg.model).bn
    assert bn is not None and bn.layer_momentum is not None  # EMA: no BN obstacle
    assert not use_cuda_graph(cfg, GPU, decide_placement(cfg, GPU), bn)
    insist = run_config("imagenet/bn_x30", *flat, "trainer.cuda_graph=true")
    with pytest.raises(ConfigError, match="cannot capture this run: the ImageNet loader's"):
        use_cuda_graph(insist, GPU, decide_placement(insist, GPU), bn)


def test_autocast_is_the_placements_dtype_or_off():
    x = torch.randn(4, 3)
    with Placement(torch.device("cpu"), None, torch.contiguous_format, False).autocast():
        assert (x @ x.T).dtype == torch.float32
    with Placement(torch.device("cpu"), torch.bfloat16, torch.contiguous_format, False).autocast():
        assert (x @ x.T).dtype == torch.bfloat16
    # The loop's step autocasts the same way: bf16 steps lose digits that fp32 steps keep.
    losses = {}
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
        losses[dtype] = float(train_step(model, optimizer, x, y, dtype))
    assert losses[None] != losses[torch.bfloat16]
    assert losses[None] == pytest.approx(losses[torch.bfloat16], rel=2e-2)


def test_the_network_and_the_images_take_the_placements_memory_format(run_config, tmp_path):
    """On a CPU with a channels_last placement (decide_placement never makes one there), the
    network's convolution weights and the task's image batches are NHWC: they follow the
    placement, not the device or the config."""
    root = make_fake_imagefolder(tmp_path, num_classes=3, train_per_class=4, val_per_class=2)
    cfg = run_config(
        "imagenet/bn_x30",
        f"paths.imagenet_dir={root}",
        "++data.image_size=32",
        "++data.batch_size=4",
        "++data.workers=0",
        "++model.num_classes=3",
        "++trainer.probe.num_images=2",
        "trainer.channels_last=false",  # the config says no; the placement decides
    )
    nhwc = Placement(torch.device("cpu"), None, torch.channels_last, False)
    norm = Normalization.from_model(cfg.model)
    network, _ = build_model(cfg, CPU, nhwc, norm)
    convs = [m.weight for m in network.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)  # not 1x1 convolutions only
    task = build_task(cfg, CPU, nhwc, norm.bn)
    x, _ = next(task.train_batches)
    assert x.shape == (4, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    nchw, _ = build_model(cfg, CPU, decide_placement(cfg, CPU), norm)
    assert all(m.weight.is_contiguous() for m in nchw.modules() if isinstance(m, torch.nn.Conv2d))
