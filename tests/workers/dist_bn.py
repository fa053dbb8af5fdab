"""Run under torchrun (gloo, CPU) by tests/test_distributed.py: each rank trains a tiny BN
network on data only it sees, then the BN running statistics are combined as before an
evaluation. Writes each rank's statistics before and after to <out>/rank<r>.json.

    python -m torch.distributed.run --standalone --nproc_per_node=2 \
        -m tests.workers.dist_bn <out> reduce|broadcast
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from bnrepro.infra.distributed import init_distributed, shutdown, sync_bn_buffers, wrap_model
from bnrepro.models.batchnorm import BNStats


def main(out: Path, mode: str) -> None:
    env = init_distributed("cpu")
    torch.manual_seed(0)  # the same initial weights on every rank
    bn = BNStats(stats="ema", momentum=0.1, eps=1e-5, population_batches=1)
    network = nn.Sequential(nn.Linear(3, 4), bn.layer(4))
    model = wrap_model(network, env, sync_bn=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    data = torch.Generator().manual_seed(100 + env.rank)
    for _ in range(5):
        # Each rank's inputs are shifted by 10 * rank: its statistics are unmistakably its own.
        x = torch.randn(8, 3, generator=data) + 10.0 * env.rank
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    bn = network[1]
    before = {"mean": bn.running_mean.tolist(), "var": bn.running_var.tolist()}
    sync_bn_buffers(env, network, mode)
    after = {"mean": bn.running_mean.tolist(), "var": bn.running_var.tolist()}
    weight = network[0].weight.flatten().tolist()
    record = {"world_size": env.world_size, "before": before, "after": after, "weight": weight}
    (out / f"rank{env.rank}.json").write_text(json.dumps(record))
    # DDP's reducer holds the process group and a gloo thread: free it before the group goes,
    # or its destructor can abort at exit ("terminate called without an active exception").
    del model, optimizer
    shutdown(env)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    # The records are written and the group is gone; skip the interpreter's teardown, where a
    # gloo thread still joinable now and then aborts the process (about 1 run in 20 here),
    # which would fail the test on something it does not test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
