"""Let MKL use the AVX-512 kernels of an AMD CPU (over 2x faster fp32 matmuls on this machine).

torch's fp32 CPU matmuls (`@`, `bmm`, `nn.Linear`) call MKL's sgemm, and MKL picks its kernels
by CPU vendor: on AMD it runs its AVX2 code even on CPUs with AVX-512 (Zen 4 and 5). It asks
one function, `mkl_serv_intel_cpu_true()`. The C file beside this module defines that function
to answer yes; loaded into the global symbol scope before torch loads MKL, it makes MKL pick
its kernels by the CPU's features, as it does on Intel. On the AMD EPYC (Zen 5) this suite is
benchmarked on, one thread: 215 against 88 GFLOP/s for the MLP's first layer (60x784 @ 784x100)
and 188 against 82 for its 100x100 layers. Only the kernels change, so results change only in
the order of float sums.

Opt-in (`trainer.mkl_skip_vendor_check=true`; off by default: it reaches into MKL's internals,
which the reproduction's numbers should not depend on). With it, `make reproduce-mnist` took
97.9 s on that machine (issue 4's bench, results/bench/mnist.md); the MLP's matmuls were 2.3x
faster. It must run before `import torch` (loaded after, it changed nothing here), so the
trainer calls it first thing in each job, and it is a no-op on other vendors and without the
compiled library (no C compiler at install).
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys

LIBRARY = "bnrepro.speedups._mkl_intel_cpu"
_loaded = False


def cpu_vendor() -> str:
    """The CPU vendor string from /proc/cpuinfo ('AuthenticAMD', 'GenuineIntel'), or ''."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def skip_vendor_check() -> str:
    """On an AMD CPU, make MKL choose its kernels by the CPU's features; returns what
    happened, one line for the log."""
    global _loaded
    if not _loaded:
        if cpu_vendor() != "AuthenticAMD":
            return "MKL kernels: its own choice (not an AMD CPU)"
        if "torch" in sys.modules:
            return "MKL kernels: AVX2 at most (torch was imported before the vendor check)"
        spec = importlib.util.find_spec(LIBRARY)
        if spec is None or spec.origin is None:
            return f"MKL kernels: AVX2 at most ({LIBRARY} was not built: no C compiler?)"
        ctypes.CDLL(spec.origin, mode=ctypes.RTLD_GLOBAL)
        _loaded = True
    return "MKL kernels: chosen by the CPU's features (vendor check skipped on this AMD CPU)"
