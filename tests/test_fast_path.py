"""The fast path (seeds stacked in one StackedMLP) computes what the plain path computes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bnrepro.analysis.runs import find_runs
from bnrepro.config.schema import parse_config
from bnrepro.data.batches import shuffled_batches, stacked_batches
from bnrepro.measures.probes import nonlinearity_input_percentiles
from bnrepro.models.batchnorm import BNStats
from bnrepro.models.mlp import MLP
from bnrepro.models.networks import build_network
from bnrepro.models.norms import Normalization
from bnrepro.models.stacked_mlp import StackedMLP
from bnrepro.training.loop import member_losses

from .conftest import run_train

# Stated tolerance: float32 sums in another order (batched vs plain matmuls). Over 1,000 real
# MNIST steps the paths were measured to differ by < 2e-6; accuracy counts must be equal.
TOL = 1e-4


def mlp_kwargs(norm: str, stats: str = "ema") -> dict[str, Any]:
    bn = BNStats(stats=stats, momentum=0.1, eps=1e-5, population_batches=5)
    return {"norm": Normalization(norm, bn=bn if norm == "bn" else None)}


def plain_mlps(kwargs: dict[str, Any]) -> list[MLP]:
    mlps = []
    for seed in (11, 12, 13):
        torch.manual_seed(seed)
        mlps.append(MLP(**kwargs))
    return mlps


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_stacked_forward_backward_match_each_member(norm):
    kwargs = mlp_kwargs(norm)
    mlps = plain_mlps(kwargs)
    stacked = StackedMLP.from_members(mlps, **kwargs)
    x = torch.rand(3, 60, 784)
    y = torch.randint(0, 10, (3, 60))
    losses = member_losses(stacked(x), y)
    losses.sum().backward()
    for i, mlp in enumerate(mlps):
        loss = member_losses(mlp(x[i]), y[i])
        loss.backward()
        assert losses[i].item() == pytest.approx(loss.item(), abs=1e-6)
        pairs = [(stacked.layers[n].linear, mlp.layers[n].linear) for n in ("h1", "h2", "h3")]
        for fast, plain in [*pairs, (stacked.classifier, mlp.classifier)]:
            grad = fast.weight.grad[i]
            torch.testing.assert_close(grad, plain.weight.grad, atol=1e-6, rtol=1e-4)
    stacked.eval()
    shared = torch.rand(50, 784)
    for i, mlp in enumerate(mlps):
        torch.testing.assert_close(stacked(shared)[i], mlp.eval()(shared), atol=1e-5, rtol=1e-5)


def test_stacked_population_stats_and_probes_match_each_member():
    kwargs = mlp_kwargs("bn", stats="population")
    mlps = plain_mlps(kwargs)
    stacked = StackedMLP.from_members(mlps, **kwargs)
    data_x, data_y = torch.rand(600, 784), torch.randint(0, 10, (600,))
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    stacked.normalization.bn.refresh(stacked, stacked_batches(data_x, data_y, 60, gens))
    probe_x = torch.rand(200, 784)
    stacked_probes = nonlinearity_input_percentiles(
        stacked, stacked.nonlinearities(), probe_x, 7, [15, 50, 85]
    )
    for i, mlp in enumerate(mlps):
        gen = torch.Generator().manual_seed(i + 1)
        mlp.normalization.bn.refresh(mlp, shuffled_batches(data_x, data_y, 60, gen))
        bn, f = stacked.layers["h2"].bn, 100
        torch.testing.assert_close(
            bn.running_var[i * f : (i + 1) * f],
            mlp.layers["h2"].bn.running_var,
            atol=1e-5,
            rtol=1e-5,
        )
        (plain,) = nonlinearity_input_percentiles(
            mlp, mlp.nonlinearities(), probe_x, 7, [15, 50, 85]
        )
        assert plain.keys() == stacked_probes[i].keys()
        for key, value in plain.items():
            assert stacked_probes[i][key] == pytest.approx(value, abs=1e-5)


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_stack_built_from_the_model_config(compose_cfg, norm):
    """What the trainer does with `seeds`: the stack and each member come from one config."""
    run = parse_config(compose_cfg("experiment=mnist/bn", f"norm={norm}", "model.dropout=0.2"))
    normalization = Normalization.from_model(run.model)
    stacked = build_network(run.model, normalization, members=2)
    assert isinstance(stacked, StackedMLP)
    mlps = []
    for i, seed in enumerate((11, 12)):
        torch.manual_seed(seed)
        mlps.append(build_network(run.model, normalization))
        stacked.load_member(i, mlps[-1])
    assert stacked.normalization == mlps[0].normalization
    assert [type(m) for m in stacked.modules()].count(torch.nn.Dropout) == 3
    x = torch.rand(2, 60, 784)
    stacked.eval()
    for i, mlp in enumerate(mlps):
        torch.testing.assert_close(stacked(x)[i], mlp.eval()(x[i]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "other",
    [
        {"hidden": [100, 50, 100]},
        {"activation": "relu"},
        {"dropout": 0.1},
        mlp_kwargs("none"),
        mlp_kwargs("bn", stats="cumulative"),
    ],
)
def test_load_member_rejects_an_mlp_built_otherwise(other):
    kwargs = mlp_kwargs("bn")
    stacked = StackedMLP(2, **kwargs)
    stacked.load_member(0, MLP(**kwargs))
    with pytest.raises(ValueError, match="member 1"):
        stacked.load_member(1, MLP(**kwargs | other))


def test_stacked_batches_give_each_member_its_seeds_order():
    x, y = torch.arange(300.0).unsqueeze(1), torch.arange(300)
    stacked = stacked_batches(x, y, 60, [torch.Generator().manual_seed(s) for s in (4, 5)])
    plain = [shuffled_batches(x, y, 60, torch.Generator().manual_seed(s)) for s in (4, 5)]
    for _ in range(7):  # across an epoch boundary
        sx, sy = next(stacked)
        for i, batches in enumerate(plain):
            px, py = next(batches)
            assert torch.equal(sx[i], px) and torch.equal(sy[i], py)


def test_trainer_fast_path_matches_plain_path(mnist_root, tmp_path):
    common = [
        "experiment=mnist/baseline,mnist/bn",
        "trainer.steps=500",
        "trainer.eval_every=250",
        "logger=none",
        f"paths.data_dir={mnist_root}",
    ]
    plain = run_train("-m", *common, "seed=1,2", f"hydra.sweep.dir={tmp_path / 'plain'}")
    assert plain.returncode == 0, plain.stderr[-3000:]
    fast = run_train("-m", *common, "seeds=[1,2]", f"hydra.sweep.dir={tmp_path / 'fast'}")
    assert fast.returncode == 0, fast.stderr[-3000:]
    plain_runs = {(r.arm, r.seed): r for r in find_runs(tmp_path / "plain")}
    fast_runs = {(r.arm, r.seed): r for r in find_runs(tmp_path / "fast")}
    assert plain_runs.keys() == fast_runs.keys() and len(plain_runs) == 4
    for key, run in plain_runs.items():
        fast_run = fast_runs[key]
        assert fast_run.path.name == f"seed{key[1]}"  # its own run directory
        assert (fast_run.path / ".hydra" / "config.yaml").is_file()
        assert fast_run.summary["status"] == "completed" and fast_run.summary["steps"] == 500
        assert fast_run.summary["final_test_acc"] == run.summary["final_test_acc"]
        assert len(fast_run.metrics) == len(run.metrics) == 3
        for a, b in zip(run.metrics, fast_run.metrics, strict=True):
            assert a["step"] == b["step"] and a["test/acc"] == b["test/acc"]
            for name in a:
                if name.startswith(("act/", "train/loss", "test/loss")):
                    assert b[name] == pytest.approx(a[name], abs=TOL), (key, a["step"], name)


@pytest.mark.slow  # make test-full; one W&B run per job of a multirun is in make test
def test_fast_path_gives_each_seed_its_own_wandb_run(mnist_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(
        "experiment=mnist/bn",
        "seeds=[3,4]",
        "debug=default",
        f"paths.data_dir={mnist_root}",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    wandb_files = [
        sorted((run_dir / f"seed{s}").glob("wandb/offline-run-*/run-*.wandb")) for s in (3, 4)
    ]
    assert [len(f) for f in wandb_files] == [1, 1]
    assert wandb_files[0][0].name != wandb_files[1][0].name
    assert sorted(r.seed for r in find_runs(run_dir)) == [3, 4]
