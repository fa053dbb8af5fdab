"""The opt-in MKL vendor check (bnrepro/speedups/mkl_vendor.py): on an AMD CPU it changes MKL's
kernel choice, only when set before torch is imported, and the matmuls it then runs are right."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from bnrepro.speedups import mkl_vendor

pytestmark = pytest.mark.skipif(
    mkl_vendor.cpu_vendor() != "AuthenticAMD", reason="the vendor check matters on AMD CPUs only"
)

# In a fresh interpreter: optionally skip the check, then report MKL's detected code path
# (an MKL-internal number) and the error of a float32 product MKL computes against float64.
PROBE = """
import ctypes, os, sys
from bnrepro.speedups.mkl_vendor import skip_vendor_check
if sys.argv[1] == "skip":
    print(skip_vendor_check())
import torch
lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
print(lib.mkl_serv_cpu_detect())
torch.manual_seed(0)
w, h = torch.randn(5, 100, 784), torch.randn(5, 784, 60)
print((torch.bmm(w, h).double() - torch.bmm(w.double(), h.double())).abs().max().item())
"""


def probe(mode: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split("\n")


@pytest.mark.skipif(
    importlib.util.find_spec(mkl_vendor.LIBRARY) is None, reason="library not built (no compiler)"
)
def test_skipping_the_check_changes_mkl_kernels_and_keeps_products_right():
    default_path, default_error = probe("default")[:2]
    status, skipped_path, skipped_error = probe("skip")[:3]
    assert status.startswith("MKL kernels: chosen by the CPU's features"), status
    assert skipped_path != default_path  # MKL dispatches to other kernels
    # Both are plain float32 sums of 784 products of unit normals: errors of order 1e-5.
    assert float(default_error) < 1e-3 and float(skipped_error) < 1e-3


def test_too_late_once_torch_is_imported():
    import torch  # noqa: F401  (pytest's process: torch is imported by other tests anyway)

    if mkl_vendor._loaded:
        pytest.skip("this process already skipped the check")
    assert "torch was imported before" in mkl_vendor.skip_vendor_check()
