"""scripts/bench_gpu.py: its CPU test scale end to end, a failing e2e run recorded rather than
raised, and the GPU-only bookkeeping (targets, peaks, the report) on made-up GPU results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import bench_gpu  # noqa: E402

KEYS = {
    "device",
    "torch",
    "command",
    "targets",
    "figure1_sweep_wall_s",
    "figure1_sweep",
    "synthetic_img_per_s",
    "synthetic",
    "flops_per_image",
    "e2e_cpu_decode_img_per_s",
    "e2e_gpu_decode_img_per_s",
    "e2e",
}


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/bench_gpu.py", "--device", "cpu", "--quick", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


# A benchmark, not a contract of the suite: make test-full runs it (make bench-gpu on a GPU).
@pytest.mark.slow
def test_quick_run_measures_every_section_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    proc = run_bench("--out", str(out), "--scratch", str(tmp_path / "scratch"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "gpu.json").read_text())
    assert r.keys() >= KEYS
    assert r["quick"] and r["device"].startswith("CPU") and r["torch"]
    assert all(f > 0 for f in r["flops_per_image"].values())

    assert {row["model"] for row in r["synthetic"]} == {"bn_inception", "googlenet"}
    for row in r["synthetic"]:
        assert row["status"] == "ok", row
        assert row["images_per_s"] > 0 and row["tflops"] > 0
    assert r["synthetic_img_per_s"] > 0

    sweep = r["figure1_sweep"]
    if sweep["status"] == "skipped":  # no MNIST on this machine: said so, not hidden
        assert "MNIST" in sweep["note"]
    else:
        assert sweep["status"] == "ok", sweep
        assert sweep["all_completed"] and sweep["devices"] == ["cpu"]
        assert r["figure1_sweep_wall_s"] > 0

    [row] = r["e2e"]  # --quick runs the entrypoint once, decoding in workers
    assert row["decode"] == "workers" and row["status"] == "ok", row
    assert len(row["windows_steps_per_s"]) == 2  # compilation's window and the measured one
    assert r["e2e_cpu_decode_img_per_s"] == row["images_per_s"] > 0
    assert r["e2e_gpu_decode_img_per_s"] is None

    # No quick number is compared with a GPU target.
    assert set(r["targets"]) == set(bench_gpu.TARGETS)
    assert {t["status"] for t in r["targets"].values()} == {"not measured"}
    report = (out / "gpu.md").read_text()
    assert "## Targets" in report and "bn_inception" in report
    assert (tmp_path / "scratch").is_dir()  # a given --scratch is kept


@pytest.mark.slow  # a second quick run of the benchmark on CPU (make test-full)
def test_a_failing_e2e_run_is_recorded_and_the_rest_still_runs(tmp_path):
    out = tmp_path / "out"
    proc = run_bench(
        "--out",
        str(out),
        "--sections",
        "synthetic,e2e",
        "--batches",
        "4",
        "--isolate",  # the synthetic row in its own process, as on GPU
        "--e2e-data-dir",
        str(tmp_path / "no_such_imagenet"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "gpu.json").read_text())
    assert [row["status"] for row in r["synthetic"]] == ["ok"]
    assert r["synthetic"][0]["images_per_s"] > 0 and r["synthetic"][0]["process_s"] > 0
    assert r["e2e"] and all(row["status"] == "failed" for row in r["e2e"])
    assert all("ImageNet not usable" in row["error"] for row in r["e2e"])
    assert r["e2e_cpu_decode_img_per_s"] is None and r["e2e_gpu_decode_img_per_s"] is None
    assert r["figure1_sweep"]["status"] == "not run"
    assert "failed" in (out / "gpu.md").read_text()


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_bf16_peaks_by_device_name(name, peak):
    assert bench_gpu.bf16_peak_tflops(name) == peak


def gpu_result(sweep_wall: float, compiled_256: float, e2e_256: float) -> dict:
    """A made-up GPU run in the JSON's shape (what the CPU test cannot produce)."""
    synthetic = [
        {"model": "bn_inception", "batch": 256, "compile": None, "status": "ok",
         "images_per_s": 5000.0, "tflops": 59.4, "share_of_bf16_peak": 0.06,
         "first_step_s": 4.0, "peak_memory_gib": 20.0},
        {"model": "bn_inception", "batch": 256, "compile": "default", "status": "ok",
         "images_per_s": compiled_256, "tflops": 119.0, "share_of_bf16_peak": 0.12,
         "first_step_s": 230.0, "peak_memory_gib": 18.0, "graph_breaks": 0},
        {"model": "bn_inception", "batch": 32, "compile": "reduce-overhead", "status": "ok",
         "images_per_s": 3500.0, "tflops": 41.6, "share_of_bf16_peak": 0.04,
         "first_step_s": 220.0, "peak_memory_gib": 3.0, "cudagraph_skips": 1},
        {"model": "googlenet", "batch": 256, "compile": "default", "status": "failed",
         "error": "worker timed out (budget)"},
    ]  # fmt: skip
    e2e = [
        {"decode": "device", "batch": 256, "compile": True, "status": "ok",
         "images_per_s": e2e_256, "if_queue_was_full_img_per_s": e2e_256 * 0.8,
         "windows_steps_per_s": [5.0, e2e_256 / 256]},
        {"decode": "workers", "batch": 256, "compile": True, "status": "failed",
         "windows_steps_per_s": [], "error": "RuntimeError: DataLoader worker | killed"},
    ]  # fmt: skip
    return {
        "device": "NVIDIA H100 80GB HBM3", "bf16_peak_tflops": 989.0, "torch": "2.11.0",
        "torchvision": "0.26.0", "cuda": "12.8", "cpus": 16, "dev_shm_gib": 64.0,
        "elapsed_s": 530.0, "command": "python scripts/bench_gpu.py", "quick": False,
        "flops_per_image": {"bn_inception": 11.88e9, "googlenet": 8.75e9},
        "settings": {"synthetic": "224x224", "e2e": "experiment=imagenet/bn_x5"},
        "figure1_sweep_wall_s": sweep_wall,
        "figure1_sweep": {"kind": "make reproduce-mnist", "command": "make reproduce-mnist",
                          "status": "ok", "wall_s": sweep_wall, "returncode": 0, "runs": 10,
                          "completed": 10, "all_completed": True, "devices": ["cuda"],
                          "figure": ["figure1.png"]},
        "synthetic": synthetic, "e2e": e2e,
        "e2e_data": {"distinct_train_jpegs": 2560, "size": [400, 300], "train_names": 79360,
                     "classes": 10, "generate_s": 8.0},
        "skipped": [{"job": "e2e device-decode b32", "reason": "needs ~300 s, 10 s left"}],
    }  # fmt: skip


def test_targets_on_a_made_up_gpu_run():
    t = bench_gpu.targets(gpu_result(sweep_wall=18.0, compiled_256=10_500.0, e2e_256=9_000.0))
    assert t["figure1_sweep_wall_s"]["status"] == "met"
    assert t["synthetic_compiled_b256_img_per_s"] == {
        **t["synthetic_compiled_b256_img_per_s"],
        "value": 10_500.0,
        "status": "met",
    }
    assert t["synthetic_compiled_b32_img_per_s"]["value"] == 3500.0  # reduce-overhead counts
    assert t["e2e_device_b256_img_per_s"]["status"] == "met"
    ratio = t["e2e_device_b256_vs_synthetic"]
    assert ratio["value"] == pytest.approx(9000 / 10500) and ratio["status"] == "missed"
    assert t["e2e_device_b32_img_per_s"]["status"] == "not measured"

    slow = bench_gpu.targets(gpu_result(sweep_wall=25.0, compiled_256=9_000.0, e2e_256=8_900.0))
    assert slow["figure1_sweep_wall_s"]["status"] == "missed"
    assert slow["synthetic_compiled_b256_img_per_s"]["status"] == "missed"
    assert slow["e2e_device_b256_vs_synthetic"]["status"] == "met"


def test_report_of_a_made_up_gpu_run_has_every_table():
    r = gpu_result(sweep_wall=18.0, compiled_256=10_500.0, e2e_256=9_000.0)
    r["targets"] = bench_gpu.targets(r)
    report = bench_gpu.markdown(r)
    assert "dense bf16 peak 989 TFLOP/s" in report
    assert "| bn_inception | 32 | reduce-overhead | 3,500 |" in report
    assert "CUDA graphs skipped x1" in report
    assert "| device | 256 | True | 9,000 | 7,200 |" in report
    assert "DataLoader worker / killed" in report  # a | in an error cannot break the table
    assert "e2e device-decode b32: needs ~300 s" in report
    assert report.count("**missed**") == 1


def test_plan_puts_the_batch_256_numbers_first_and_filters():
    jobs = bench_gpu.plan(quick=False, sections=set(bench_gpu.SECTIONS), batches=None)
    assert [j.name for j in jobs[:4]] == [
        "bn_inception b256 eager",
        "bn_inception b256 default",
        "sweep",
        "e2e device-decode b256",
    ]
    only_32 = bench_gpu.plan(quick=False, sections={"synthetic", "e2e"}, batches={32})
    assert only_32 and all(j.params["batch"] == 32 for j in only_32)
    assert any(j.params.get("compile") == "reduce-overhead" for j in only_32)
