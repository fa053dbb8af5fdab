"""seeds=[...] for BN-Inception: a StackedBNInception computes what its plain networks compute
(every norm, both activations, LRN, both memory formats), through the real entrypoint too,
and resumes bit-identically after SIGKILL."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
import torch
from torch import nn

from bnrepro.analysis.runs import find_runs
from bnrepro.config.schema import (
    NORMS,
    GroupNormSettings,
    NoiseSettings,
    NormKind,
    RenormSettings,
    parse_config,
)
from bnrepro.errors import ConfigError
from bnrepro.infra.distributed import DistEnv
from bnrepro.measures.probes import nonlinearity_input_percentiles
from bnrepro.models.batchnorm import BNStats
from bnrepro.models.inception import BNInception
from bnrepro.models.networks import network_arguments
from bnrepro.models.norms import NORM_LAYERS, ActivationNoise, Normalization, NormLayers
from bnrepro.models.stacked_inception import StackedBNInception
from bnrepro.training.loop import member_losses
from bnrepro.training.placement import decide_placement
from bnrepro.training.run import build_model, seed_everything

from .conftest import run_train
from .test_faults import assert_same_run, start_train

SETTINGS = {
    # No warm-up: r and d act from the first step, so stacked and plain really are compared.
    "renorm": RenormSettings(
        r_max=3.0, d_max=5.0, warmup_steps=0, r_max_steps=0, d_max_steps=0, momentum=0.01,
        eps=1e-5,
    ),
    "group_norm": GroupNormSettings(groups=4, eps=1e-5),  # several groups per member
    "noise": NoiseSettings(mean=0.5, scale=(1.0, 1.25), scale_std=0.1, shift_spread=0.1),
}  # fmt: skip
BN = BNStats(stats="ema", momentum=0.1, eps=1e-5, population_batches=5)
# Tolerances, relative to each tensor's largest value. The structure (which channels are whose)
# is checked in float64, where any mix-up is 1e10 times the tolerance. In float32, NCHW: sums
# in another order (grouped convolutions); channels_last: PyTorch's NHWC BN kernel also sums
# its statistics in float (models/stacked_inception.py), about 1e-4 on a batch variance.
TOL = {torch.float64: {False: 1e-9, True: 1e-9}, torch.float32: {False: 2e-5, True: 2e-3}}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks gain nothing from a second thread, and while `make test`'s other worker
    keeps the second core busy, two OpenMP threads made these tests 10-30x slower here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def normalization(norm: str) -> Normalization:
    kind = NORMS[norm]
    return Normalization(norm, SETTINGS.get(kind.section), BN if kind.is_bn else None)


def tiny(norm: str = "bn", **kwargs: Any) -> dict[str, Any]:
    """BNInception's arguments for a network of a few thousand weights on 28x28 images, with a
    module of each kind: avg-pool (3a), stride 2 (3c), max-pool with projection (5b)."""
    return {
        "num_classes": 5,
        "norm": normalization(norm),
        "in_channels": 1,
        "stem": "small",
        "width_mult": 1 / 16,
        "modules": ["3a", "3c", "5b"],
    } | kwargs


def plain_networks(kwargs: dict[str, Any], seeds=(1, 2, 3)) -> list[BNInception]:
    networks = []
    for seed in seeds:
        torch.manual_seed(seed)
        networks.append(BNInception(**kwargs))
    return networks


def assert_close(
    stacked: torch.Tensor, plain: torch.Tensor, tol: float, what: str, floor: float = 0.0
) -> None:
    """Equal up to `tol` times the plain tensor's largest value (at least `floor`: a gradient
    that is zero up to rounding, as BN's beta's before a BN, has no scale of its own)."""
    scale = max(plain.abs().max().item(), floor) or 1.0
    error = (stacked - plain).abs().max().item() / scale
    assert error <= tol, f"{what}: relative error {error:.2e} > {tol:.0e}"


def test_the_trainer_starts_each_member_where_its_plain_run_starts(compose_cfg):
    """seeds=[...] on the conv net builds a StackedBNInception whose member i holds exactly
    the initial weights of the plain run of seed i (training/run.build_model)."""
    cfg = parse_config(compose_cfg("experiment=fig2_small/bn_x5", "seeds=[3,1,2]"))
    norm = Normalization.from_model(cfg.model)
    network, _ = build_model(cfg, DistEnv(), decide_placement(cfg, DistEnv()), norm)
    assert isinstance(network, StackedBNInception) and network.members == 3
    for i, seed in enumerate([3, 1, 2]):
        seed_everything(seed)
        plain = BNInception(norm=norm, **network_arguments(cfg.model)).state_dict()
        member = network.member_state_dict(i)
        assert member.keys() == plain.keys()
        assert all(torch.equal(member[k], plain[k]) for k in plain), seed


def test_load_member_gives_each_member_its_networks_weights():
    kwargs = tiny("bn", lrn=True, dropout=0.4)
    networks = plain_networks(kwargs)
    stacked = StackedBNInception.from_members(networks, **kwargs)
    for i, network in enumerate(networks):
        member = stacked.member_state_dict(i)
        plain = network.state_dict()
        assert member.keys() == plain.keys()
        assert all(torch.equal(member[k], plain[k]) for k in plain), i
        again = BNInception(**kwargs)
        again.load_state_dict(member)  # a member is a plain network again
        assert all(torch.equal(again.state_dict()[k], plain[k]) for k in plain)
    # Writing member 1 changed no other member.
    stacked.load_member(1, networks[2])
    first, second = stacked.member_state_dict(0), stacked.member_state_dict(1)
    assert all(torch.equal(first[k], v) for k, v in networks[0].state_dict().items())
    assert torch.equal(second["classifier.weight"], networks[2].classifier.weight)


@pytest.mark.parametrize(
    "other",
    [
        {"width_mult": 1 / 8},
        {"modules": ["3a", "3b", "5b"]},
        {"norm": normalization("none")},
        {"norm": normalization("group_norm")},
        {"activation": "sigmoid"},
        {"lrn": True},
        {"dropout": 0.4},
        {"num_classes": 6},
    ],
)
def test_load_member_rejects_a_network_built_otherwise(other):
    stacked = StackedBNInception(2, **tiny())
    stacked.load_member(0, BNInception(**tiny()))
    with pytest.raises(ValueError, match="member 1"):
        stacked.load_member(1, BNInception(**tiny() | other))


def hold_same_noise(stacked: StackedBNInception, networks: list[BNInception]) -> None:
    """Give the stack's noise layers (noisy_bn) the draws its members' layers made last, in
    each member's channel block, and hold them: noise drawn for M*C channels at once cannot
    equal M draws of C, but the layers must apply it to the right channels."""
    for name, module in stacked.named_modules():
        if isinstance(module, ActivationNoise):
            draws = [dict(n.named_modules())[name]._last for n in networks]
            module._last = tuple(torch.cat(parts, dim=1) for parts in zip(*draws, strict=True))
            module.hold = True


def compare_one_step(
    kwargs: dict[str, Any], channels_last: bool, dtype: torch.dtype = torch.float64
) -> None:
    """One training step and one evaluation of 3 members against their plain networks:
    logits, every gradient and buffer (the moved running statistics), eval logits."""
    tol = TOL[dtype][channels_last]
    networks = [network.to(dtype) for network in plain_networks(kwargs)]
    stacked = StackedBNInception.from_members(networks, channels_last=channels_last, **kwargs)
    stacked.to(dtype)
    torch.manual_seed(0)
    x, y = torch.rand(3, 6, 1, 28, 28, dtype=dtype), torch.randint(0, 5, (3, 6))
    plain_logits = [network(x[i]) for i, network in enumerate(networks)]
    hold_same_noise(stacked, networks)
    logits = stacked(x)
    assert logits.shape == (3, 6, 5)
    member_losses(logits, y).sum().backward()
    for i, network in enumerate(networks):
        assert_close(logits[i], plain_logits[i], tol, f"member {i} logits")
        member_losses(plain_logits[i], y[i]).backward()
        grads = {n: p.grad for n, p in network.named_parameters()}
        largest = max(g.abs().max().item() for g in grads.values())
        stacked_grads = {n: p.grad for n, p in stacked.named_parameters()}
        for name, grad in grads.items():
            whole = stacked_grads[name]
            member_grad = whole[i] if name.startswith("classifier.") else whole.chunk(3)[i]
            assert_close(member_grad, grad, tol, f"member {i} grad {name}", 1e-2 * largest)
        member = stacked.member_state_dict(i)
        for name, buffer in network.named_buffers():
            assert_close(member[name].double(), buffer.double(), tol, f"member {i} {name}")
    stacked.eval()
    shared = torch.rand(4, 1, 28, 28, dtype=dtype)
    eval_logits = stacked(shared)
    for i, network in enumerate(networks):
        assert_close(eval_logits[i], network.eval()(shared), tol, f"member {i} eval logits")


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_every_norm_stacks_as_its_plain_networks(norm):
    compare_one_step(tiny(norm), channels_last=True)


@pytest.mark.parametrize(
    "norm, activation, lrn, channels_last",
    [
        ("bn", "sigmoid", False, True),
        ("none", "sigmoid", False, True),
        ("none", "relu", True, True),  # LRN per member, in NHWC
        ("bn", "relu", True, False),  # NCHW, and LRN
        ("none", "sigmoid", False, False),
        ("group_norm", "relu", False, False),
    ],
)
def test_stacked_matches_plain_for_activation_lrn_and_layout(norm, activation, lrn, channels_last):
    compare_one_step(tiny(norm, activation=activation, lrn=lrn), channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("norm", ["bn", "none"])  # the paper's networks
def test_float32_as_trained(norm, channels_last):
    """The dtype runs train in: oneDNN's grouped convolutions and the NHWC kernels."""
    compare_one_step(tiny(norm), channels_last, torch.float32)


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_member_m_gets_its_images_in_channel_block_m(channels_last, channels):
    stacked = StackedBNInception(
        3, **tiny("none", in_channels=channels), channels_last=channels_last
    )
    x = torch.rand(3, 4, channels, 28, 28)  # (M, B, C, H, W)
    h = stacked.member_channels(x)
    assert h.shape == (4, 3 * channels, 28, 28)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert h.is_contiguous(memory_format=layout)
    for m in range(3):
        assert torch.equal(h[:, m * channels : (m + 1) * channels], x[m])
    shared = stacked.member_channels(x[1])  # one batch for every member
    assert shared.is_contiguous(memory_format=layout)
    assert all(torch.equal(shared[:, m * channels : (m + 1) * channels], x[1]) for m in range(3))


@pytest.mark.parametrize("lrn", [False, True])
def test_channels_last_holds_through_the_network(lrn):
    """Every unit, pool, LRN and concatenation keeps NHWC (a layout lost on the way costs a
    conversion at every later op and silently runs the slow NCHW kernels)."""
    stacked = StackedBNInception(2, **tiny("bn", lrn=lrn))
    layouts = {}

    def record(name: str):
        def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            nhwc = out.is_contiguous(memory_format=torch.channels_last)
            layouts[name] = nhwc and (out.shape[-1] * out.shape[-2] == 1 or not out.is_contiguous())

        return hook

    for name, stage in stacked.stages.items():
        stage.register_forward_hook(record(name))
    stacked(torch.rand(2, 4, 1, 28, 28))
    assert layouts and all(layouts.values()), layouts


def test_a_fresh_stack_draws_each_members_weights_with_its_own_fan():
    """He-normal from each member's (C_out, C_in, k, k) block: with fan_out, a fan over all
    M*C_out outputs of the grouped convolution would give weights M times too small in
    variance."""
    stacked = StackedBNInception(4, **tiny("bn", width_mult=1 / 4), init_mode="fan_out")
    ratios = []
    for module in stacked.modules():
        if isinstance(module, nn.Conv2d) and module.weight.numel() > 2000:
            out_per_member = module.weight.shape[0] // 4
            expected = 2.0 / (out_per_member * module.weight[0, 0].numel())  # relu gain^2 / fan
            ratios.append(module.weight.var().item() / expected)
    assert len(ratios) > 5 and 0.85 < sum(ratios) / len(ratios) < 1.15, ratios
    assert stacked.classifier.weight.std().item() == pytest.approx(0.01, rel=0.2)


def test_probes_read_each_members_units():
    kwargs = tiny("bn")
    networks = plain_networks(kwargs, seeds=(4, 5))
    stacked = StackedBNInception.from_members(networks, **kwargs)
    probe_x = torch.rand(16, 1, 28, 28)
    records = nonlinearity_input_percentiles(
        stacked, stacked.nonlinearities(), probe_x, 1, [15, 50, 85]
    )
    assert len(records) == 2 and list(stacked.nonlinearities()) == ["conv1", "conv2", "3c", "5b"]
    for record, network in zip(records, networks, strict=True):
        (plain,) = nonlinearity_input_percentiles(
            network, network.nonlinearities(), probe_x, 1, [15, 50, 85]
        )
        assert record.keys() == plain.keys()
        for key, value in plain.items():
            assert record[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key


def test_a_norm_that_cannot_stack_is_one_line(monkeypatch):
    """A norm without grouped layers (a new one, say) builds plain networks, and refuses a
    stack with one line instead of computing something else."""
    plain_only = NormLayers(plain=NORM_LAYERS["bn"].plain, stacked=NORM_LAYERS["bn"].stacked)
    monkeypatch.setitem(NORMS, "bn_plain_only", NormKind(section=None, is_bn=True))
    monkeypatch.setitem(NORM_LAYERS, "bn_plain_only", plain_only)
    norm = Normalization("bn_plain_only", bn=BN)
    BNInception(**tiny() | {"norm": norm})
    with pytest.raises(ConfigError) as err:
        StackedBNInception(2, **tiny() | {"norm": norm})
    message = str(err.value)
    assert message.startswith("model.norm=bn_plain_only cannot stack") and "\n" not in message


# Through the entrypoint, BN-x5-Sigmoid. This network amplifies any difference, float rounding
# included: a plain run whose initial weights are changed by 1e-6 (relative) has act/
# percentiles 1e-2 apart at step 100, and the stacked run in NCHW (float rounding only) drifts
# to 5e-4 in loss by step 200; the ReLU arms move 1e-3 within 6 steps. So: losses within 1e-3
# over 100 steps, percentiles at the first steps only.
ENTRY = [
    "experiment=fig2_small/bn_x5_sigmoid",
    "trainer.eval_at_start=false",
    "logger=none",
]


def compare_runs_through_the_entrypoint(
    fashion_root, tmp_path, steps: int, every: int, seeds: str, percentiles: bool
) -> None:
    """`seeds=[1,2]` against plain runs of `seeds` (each evaluation reads 10,000 images)."""
    common = [*ENTRY, f"trainer.steps={steps}", f"trainer.eval_every={every}"]
    common.append(f"paths.data_dir={fashion_root}")
    plain = run_train("-m", *common, f"seed={seeds}", f"hydra.sweep.dir={tmp_path / 'plain'}")
    assert plain.returncode == 0, plain.stderr[-3000:]
    stacked = run_train(*common, "seeds=[1,2]", f"hydra.run.dir={tmp_path / 'stacked'}")
    assert stacked.returncode == 0, stacked.stderr[-3000:]
    plain_runs = {r.seed: r for r in find_runs(tmp_path / "plain")}
    stacked_runs = {r.seed: r for r in find_runs(tmp_path / "stacked")}
    assert stacked_runs.keys() == {1, 2} and plain_runs.keys() == set(map(int, seeds.split(",")))
    compared = ("train/loss", "test/loss", "act/") if percentiles else ("train/loss", "test/loss")
    for seed, run in plain_runs.items():
        member = stacked_runs[seed]
        assert member.path.name == f"seed{seed}" and member.summary["steps"] == steps
        assert len(member.metrics) == len(run.metrics) == steps // every
        for a, b in zip(run.metrics, member.metrics, strict=True):
            assert a["step"] == b["step"] and a.keys() == b.keys()
            names = [name for name in a if name.startswith(compared)]
            assert len(names) >= (17 if percentiles else 2)
            for name in names:
                assert b[name] == pytest.approx(a[name], rel=1e-3, abs=1e-4), (seed, name)
            assert abs(a["test/acc"] - b["test/acc"]) <= 0.2  # 20 of 10,000 images at most


# make test-full: three runs with three evaluations of 10,000 images (~34 s); make test has the
# exact float64 comparisons of every norm and the trainer's member loading above.
@pytest.mark.slow
def test_stacked_run_matches_plain_runs_through_the_entrypoint(fashion_root, tmp_path):
    """Member 2 (its seed's data order and weights, not member 1's) against its plain run."""
    compare_runs_through_the_entrypoint(fashion_root, tmp_path, 10, 10, "2", percentiles=True)


@pytest.mark.slow  # make test-full: 100 steps of 4 networks, 4 evaluations of each
def test_a_100_step_stacked_run_matches_plain_runs(fashion_root, tmp_path):
    compare_runs_through_the_entrypoint(fashion_root, tmp_path, 100, 50, "1,2", percentiles=False)


# Dropout and LRN on (bn_baseline, the original recipe): every RNG and both data orders must
# be restored. One evaluation, at the end: each reads all 10,000 test images.
KILLED = [
    "experiment=fig2_small/bn_baseline",
    "seeds=[1,2]",
    "trainer.steps=60",
    "trainer.eval_every=60",
    "trainer.eval_at_start=false",
    "trainer.checkpoint_every=10",
    "logger=none",
]


@pytest.mark.slow  # make test-full: three stacked runs, ~40 s
def test_sigkill_then_resume_of_a_stacked_conv_run_is_bit_identical(fashion_root, tmp_path):
    args = [*KILLED, f"paths.data_dir={fashion_root}"]
    reference = tmp_path / "reference"
    proc = run_train(*args, f"hydra.run.dir={reference}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "run"
    proc = start_train(*args, f"hydra.run.dir={run_dir}")
    checkpoint = run_dir / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 2.0))  # somewhere in the next ~20 steps
    proc.kill()
    proc.wait()
    resumed = run_train(*args, f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert_same_run(reference, run_dir)
