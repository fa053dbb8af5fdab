"""The machine's limit for fp32 training work: the best 2-thread sgemm rate any library here
reaches, measured now (the benchmarks divide their FLOPs by it, in the same run).

    python scripts/sgemm_limit.py          # prints the table; bench_mnist.py and bench_conv.py
                                           # import `measure_limit`

Candidates, each a square C = A @ B at sizes 1024-4096, the best of 3 repeats kept:
torch's matmul (MKL as torch ships it), numpy's (its OpenBLAS) and torch's matmul in a fresh
process with MKL's vendor check skipped (bnrepro/speedups/mkl_vendor.py; the same as torch's on
CPUs other than AMD). The limit is the fastest of all: what this machine can do, whichever
library a faster trainer would have to use to get there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

SIZES = (1024, 2048, 4096)
THREADS = 2


def _best_rate(matmul, a, b, n: int) -> float:
    """Best GFLOP/s of `matmul(a, b)` over 3 timed repeats (each a few calls)."""
    matmul(a, b)
    calls = max(1, int(1.2e11 / (2 * n**3)))  # about 0.12 TFLOP per repeat
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            matmul(a, b)
        best = min(best, (time.perf_counter() - start) / calls)
    return 2 * n**3 / best / 1e9


def torch_rates() -> dict[int, float]:
    """torch.matmul's fp32 GFLOP/s per size at THREADS threads."""
    torch.set_num_threads(THREADS)
    out = {}
    for n in SIZES:
        g = torch.Generator().manual_seed(0)
        a, b = torch.rand(n, n, generator=g), torch.rand(n, n, generator=g)
        out[n] = _best_rate(torch.matmul, a, b, n)
    return out


def numpy_rates() -> dict[int, float]:
    """numpy.matmul's float32 GFLOP/s per size (its BLAS threads are set by the environment,
    which `in_fresh_process` fixes before numpy loads)."""
    out = {}
    rng = np.random.default_rng(0)
    for n in SIZES:
        a = rng.random((n, n), dtype=np.float32)
        b = rng.random((n, n), dtype=np.float32)
        out[n] = _best_rate(np.matmul, a, b, n)
    return out


def in_fresh_process(rates: str, skip_mkl_vendor_check: bool = False) -> dict[int, float]:
    """`rates()` of this module in a new process: BLAS thread counts set before any library
    loads and, if asked, MKL's vendor check skipped before torch loads."""
    code = (
        "import json, sys; from bnrepro.speedups.mkl_vendor import skip_vendor_check; "
        f"{'skip_vendor_check(); ' if skip_mkl_vendor_check else ''}"
        "sys.path.insert(0, sys.argv[1]); import sgemm_limit; "
        f"print(json.dumps(sgemm_limit.{rates}()))"
    )
    threads = str(THREADS)
    env = os.environ | {"OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    args = [sys.executable, "-c", code, str(Path(__file__).parent)]
    out = subprocess.run(args, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
    return {int(k): v for k, v in json.loads(out.splitlines()[-1]).items()}


def measure_limit() -> dict:
    """Every candidate's rate per size and the limit: {"gflops", "by", "threads", "rates"}."""
    rates = {
        "torch (MKL as shipped)": in_fresh_process("torch_rates"),
        "numpy (OpenBLAS)": in_fresh_process("numpy_rates"),
        "torch, MKL vendor check skipped": in_fresh_process("torch_rates", True),
    }
    by, best = max(
        ((f"{name}, n={n}", r) for name, per in rates.items() for n, r in per.items()),
        key=lambda item: item[1],
    )
    return {"gflops": best, "by": by, "threads": THREADS, "rates": rates}


def describe(limit: dict) -> str:
    """One line: the limit and every candidate's best rate."""
    each = ", ".join(f"{name} {max(per.values()):.0f}" for name, per in limit["rates"].items())
    return (
        f"sgemm limit {limit['gflops']:.0f} GFLOP/s at {limit['threads']} threads "
        f"({limit['by']}; best of each: {each})"
    )


if __name__ == "__main__":
    print(describe(measure_limit()))
