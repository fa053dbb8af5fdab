"""Figures 2 and 3 at small scale: BN-Inception scaled by config on real Fashion-MNIST, every
arm composed and trained a few steps, one arm through the entrypoint, and the figure script."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from bnrepro.config.resolvers import register_resolvers
from bnrepro.config.schema import InceptionModule, choices, parse_config
from bnrepro.infra.distributed import DistEnv
from bnrepro.models.batchnorm import BNStats
from bnrepro.models.inception import INCEPTION_TABLE, BNInception
from bnrepro.models.networks import build_network
from bnrepro.models.norms import Normalization
from bnrepro.tasks import build_task
from bnrepro.training.loop import train_step
from bnrepro.training.optim import build_optimizer
from bnrepro.training.placement import decide_placement

from .conftest import REPO, run_train

ARMS = sorted(p.stem for p in (REPO / "configs" / "experiment" / "fig2_small").glob("[!_]*.yaml"))
# What each arm must be (Section 4.2.1/4.2.2): norm, activation, dropout, lr multiplier, recipe.
EXPECTED = {
    "inception": ("none", "relu", 0.4, 1, True),
    "bn_baseline": ("bn", "relu", 0.4, 1, True),
    "bn_x5": ("bn", "relu", 0.0, 5, False),
    "bn_x30": ("bn", "relu", 0.0, 30, False),
    "bn_x5_sigmoid": ("bn", "sigmoid", 0.0, 5, False),
    "inception_x5": ("none", "relu", 0.4, 5, True),
    "inception_sigmoid": ("none", "sigmoid", 0.4, 1, True),
    # The dropout pair's other halves (the "Remove Dropout" control) and the rate search.
    "bn_x5_dropout": ("bn", "relu", 0.4, 5, False),
    "inception_no_dropout": ("none", "relu", 0.0, 1, True),
    "lr_search": ("none", "relu", 0.4, 1, True),
}


def compose_arm(arm: str, data_dir: str):
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment=fig2_small/{arm}", "logger=none"])
    with open_dict(cfg):
        cfg.paths.output_dir = "/unused"
        cfg.data.root = data_dir
    GlobalHydra.instance().clear()
    return cfg


def test_every_arm_is_one_of_these():
    assert set(ARMS) == set(EXPECTED)


@pytest.mark.parametrize("arm", sorted(EXPECTED))
def test_every_arm_composes_and_trains_on_real_fashion_mnist(arm, fashion_root):
    cfg = compose_arm(arm, str(fashion_root))
    run = parse_config(cfg)
    norm, activation, dropout, lr_mult, original = EXPECTED[arm]
    assert (run.model.norm, run.model.activation, run.model.dropout) == (norm, activation, dropout)
    assert run.optim.lr == pytest.approx(0.0015 * lr_mult) and run.data.name == "fashion_mnist"
    # The 4.2.1 recipe acts at small scale as at full scale: LRN, L2 / 5, 6x faster decay.
    assert run.model.lrn is original
    assert run.optim.weight_decay == pytest.approx(4e-5 if original else 4e-5 / 5)
    assert run.optim.schedule.every_steps == pytest.approx(3750 if original else 3750 / 6)
    normalization = Normalization.from_model(run.model)
    task = build_task(run, DistEnv(), decide_placement(run, DistEnv()), normalization.bn)
    torch.manual_seed(0)
    model = build_network(run.model, normalization)
    assert isinstance(model, BNInception) and list(model.stages)[-1] == "5b"
    optimizer = build_optimizer(model, run.optim)
    losses = [float(train_step(model, optimizer, *next(task.train_batches))) for _ in range(3)]
    x, _ = next(task.train_batches)
    assert x.shape == (32, 1, 28, 28) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert all(0 < loss < 10 for loss in losses), losses
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_scaling_is_by_config_and_keeps_every_module():
    bn = BNStats(stats="ema", momentum=0.1, eps=1e-5, population_batches=1)
    full = BNInception(num_classes=10, norm=Normalization("bn", bn=bn))
    small = BNInception(
        num_classes=10,
        norm=Normalization("bn", bn=bn),
        in_channels=1,
        stem="small",
        width_mult=0.125,
    )
    assert tuple(INCEPTION_TABLE) == choices(InceptionModule)  # the schema's module names
    assert [n for n in small.stages if n in INCEPTION_TABLE] == list(INCEPTION_TABLE)
    assert small.stages["3a"].out_channels == 32  # (64 + 64 + 96 + 32) / 8
    assert 150_000 < sum(p.numel() for p in small.parameters()) < 170_000
    assert sum(p.numel() for p in full.parameters()) > 10_000_000
    shapes = {
        name: out.shape[-1] for name, out in small.stage_outputs(torch.rand(2, 1, 28, 28)).items()
    }
    assert (shapes["3a"], shapes["4a"], shapes["5b"]) == (7, 4, 2)
    fewer = BNInception(
        num_classes=10, norm=Normalization("none"), modules=["3a", "3c", "4e", "5b"]
    )
    assert list(fewer.nonlinearities()) == ["conv1", "conv2", "3c", "4e", "5b"]


def test_one_arm_through_the_entrypoint_and_the_figure_script(fashion_root, tmp_path):
    """A real 2-arm sweep of a few steps, each arm's two seeds stacked in one job as
    `make reproduce-fig2-small` runs them, then Figure 2 and the Figure 3 table (one
    evaluation per run: each reads all 10,000 test images)."""
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-m",
        "experiment=fig2_small/inception,fig2_small/bn_x30",
        "seeds=[1,2]",
        f"paths.data_dir={fashion_root}",
        "trainer.steps=4",
        "trainer.eval_every=4",
        "trainer.eval_at_start=false",
        "logger=none",
        f"hydra.sweep.dir={sweep}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summaries = [json.loads(p.read_text()) for p in sweep.rglob("summary.json")]
    assert sorted((s["arm"], s["seed"]) for s in summaries) == [
        ("bn_x30", 1),
        ("bn_x30", 2),
        ("inception", 1),
        ("inception", 2),
    ]
    assert all(s["settings"]["data"] == "fashion_mnist" for s in summaries)
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/make_figure2.py",
            "--small",
            "--runs",
            str(sweep),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "figure2.png").stat().st_size > 10_000
    result = json.loads((out / "figure3.json").read_text())
    assert result["metric"] == "val/acc" and sorted(result["per_seed"]) == ["bn_x30", "inception"]
    # The target is Inception's plateau maximum: the lowest of its seeds' maxima.
    inception = result["per_seed"]["inception"]
    assert result["target"] == pytest.approx(min(s["max_acc"] for s in inception), abs=0.01)
    # Validation on the held-out images at every evaluation, the test set once at the end;
    # 4 steps end at the cap, far below the plateau rule's 2,000.
    assert all(s["final_test_acc"] is not None for s in inception)
    assert {s["stopped_by"] for s in inception} == {"step cap"}
    assert all(s["validation"]["size"] == 5000 for s in summaries)
    table = (out / "figure3.md").read_text()
    assert "| inception |" in table and "31.0M" in table and "trained on cpu" in table
