"""GPU benchmark: the Figure-1 sweep, BN-Inception's training throughput, and end to end.

    python scripts/bench_gpu.py                 # `make bench-gpu`: what fits in --budget-s 540
    python scripts/bench_gpu.py --batches 32 --sections synthetic,e2e   # the batch-32 rows
    python scripts/bench_gpu.py --device cpu --quick --out /tmp/bench  # CPU test, ~30 s

Everything is measured in one run, so the ratios are fair. Sections:

- sweep: `make reproduce-mnist DEVICE=cuda` (2 arms x 5 stacked seeds x 50,000 steps and the
  figure) into a scratch dir, timed end to end; every run's summary.json is read back.
- synthetic: BN-Inception and torchvision's GoogLeNet (no aux heads) on one random batch,
  bf16 autocast, channels_last, SGD with momentum: images/s of full training steps after
  warm-up, eager and torch.compile'd (mode "default"; batch 32 also "reduce-overhead", CUDA
  graphs), each row in its own process so a crash, a hang or a slow compile costs only that
  row. FLOPs per image (forward+backward) are counted once with FlopCounterMode on the meta
  device, so TFLOP/s = FLOPs/image x images/s, shown against the device's dense bf16 peak.
- e2e: the real entrypoint, `python -m bnrepro.train experiment=imagenet/bn_x5`, compiled,
  on a generated ImageFolder of 400x300 JPEGs (2,560 distinct files, hard-linked into enough
  names that no run sees an epoch end), decoding in DataLoader workers (data.workers = nproc)
  or on the GPU (++data.decode=device). The rate is perf/steps_per_s x batch of the run's last
  window: evaluation comes at steps/2 and at the end, so the first window holds compilation
  and the last one does not. A failing run is recorded (its stderr tail), not raised.

Jobs run in the order below, most important first; gpu.json and gpu.md are rewritten after
each, so a run killed from outside still leaves what it measured. A job whose estimate (what a
like job took in this run, else the figure below) exceeds what is left of --budget-s is
skipped and listed as such; a job still running when the budget ends is killed (its whole
process group). Estimates on an H100 with torch 2.11 and a cold compile cache (BN-Inception
took ~4 min to compile per shape there):

     20 s  synthetic BN-Inception eager b256
    260 s  synthetic BN-Inception compiled b256
     60 s  sweep (target 20 s; make, its jobs' start-up, collection, the figure)
    130 s  e2e device-decode b256: ~10 s generating the JPEGs, ~30 s start-up, ~20 s of steps
           and the compile, which should come from the inductor cache the synthetic b256 row
           filled (same network, shapes and settings; else +4 min)
    130 s  e2e worker-decode b256 (cache hit; CPU-bound steps)
     40 s  synthetic BN-Inception eager b32, b128
    260 s  synthetic BN-Inception compiled b32, reduce-overhead
    130 s  e2e device-decode b32 (cache hit, as the modes share the cache)
     60 s  synthetic GoogLeNet eager b256, b32, b128
     80 s  synthetic BN-Inception compiled b32, default mode (cache hit)
    260 s  each further compiled row: BN-Inception b128, GoogLeNet b256, b32 (reduce-overhead)
           and b128

So the default 540 s gets, on a cold cache, the b256 rows, the sweep, the e2e b256 runs and
the eager rows; the batch-32 targets need a second run (`--batches 32`, ~8 min), a larger
--budget-s, or a warm cache (it lives in /tmp/torchinductor_$USER across runs on a machine).
Writes results/bench/gpu.json and gpu.md (or --out).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from bench_imagenet import make_model, measure_training  # scripts/ is sys.path[0]
from torch.utils.flop_counter import FlopCounterMode

from bnrepro.analysis.runs import find_runs, read_metrics
from bnrepro.data.fake_imagefolder import make_fake_imagefolder
from bnrepro.data.mnist import RAW_FILES, raw_dir

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("sweep", "synthetic", "e2e")
MODEL = "bn_inception"
RESULT_TAG = "BENCH_GPU_RESULT "  # the worker's last stdout line: this tag, then JSON
TAIL_CHARS = 3000  # of a failed process's output, kept in the JSON
SWEEP_RUNS = 10  # make reproduce-mnist: 2 arms x 5 seeds
TARGETS = {  # (threshold, "min" | "max", description)
    "figure1_sweep_wall_s": (20.0, "max", "`make reproduce-mnist DEVICE=cuda` wall, all runs done"),
    "synthetic_compiled_b256_img_per_s": (10_000.0, "min", "BN-Inception compiled, batch 256"),
    "synthetic_compiled_b32_img_per_s": (3_000.0, "min", "BN-Inception compiled, batch 32"),
    "e2e_device_b256_img_per_s": (8_000.0, "min", "entrypoint, GPU decode, batch 256"),
    "e2e_device_b256_vs_synthetic": (
        0.95,
        "min",
        "entrypoint GPU decode / synthetic compiled (default mode), batch 256",
    ),
    "e2e_device_b32_img_per_s": (3_000.0, "min", "entrypoint, GPU decode, batch 32 (paper's)"),
}


def bf16_peak_tflops(name: str) -> float | None:
    """Dense (not 2:4 sparse) bf16 tensor-core peak from NVIDIA's data sheets; None if unknown."""
    n = name.upper()
    if "H100" in n or "H200" in n:
        if "NVL" in n:  # the NVL cards run lower clocks: 1,671 sparse = 835 dense
            return 835.0
        return 756.0 if "PCIE" in n else 989.0  # SXM (e.g. "H100 80GB HBM3"), H200
    if "A100" in n:
        return 312.0
    return None


def flops_per_image(name: str, size: int) -> float:
    """Forward+backward FLOPs of one training step per image (FLOPs are linear in batch),
    counted on the meta device: no memory, no time, any machine."""
    with torch.device("meta"):
        model = make_model(name).train()
        x = torch.randn(2, 3, size, size)  # 2: BN in training mode refuses a batch of one
        y = torch.randint(0, 1000, (2,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / 2


def nproc() -> int:
    """CPUs this process may use (what `nproc` prints), not all the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_data_dir() -> Path:
    """DATA_DIR, else the first of data/ and ../shared/data that holds MNIST."""
    if "DATA_DIR" in os.environ:
        return Path(os.environ["DATA_DIR"])
    for candidate in (REPO / "data", REPO / "shared" / "data", REPO.parent / "shared" / "data"):
        if all((raw_dir(candidate) / name).is_file() for name in RAW_FILES):
            return candidate
    return REPO / "data"


def tail(text: str) -> str:
    return text[-TAIL_CHARS:]


# --- processes ----------------------------------------------------------------------------


def run_logged(
    command: list[str], log: Path, timeout: float | None, env: dict[str, str] | None = None
) -> tuple[int | None, float, str]:
    """Run `command` in REPO, output to `log`; (return code or None on timeout, wall s, output).

    Its own session, so a timeout (or this script being stopped) kills the whole group:
    make's and joblib's children, torch.compile's compile workers."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return code, time.perf_counter() - start, log.read_text(errors="replace")


def stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds: run_logged kills its child, main writes results


# --- synthetic ----------------------------------------------------------------------------


def synthetic_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One synthetic row, measured in this process (the worker process on GPU)."""
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result = measure_training(
        spec["model"],
        device,
        spec["batch"],
        spec["size"],
        spec["compile"],
        warmup=spec["warmup"],
        steps=spec["steps"],
        seconds=spec["seconds"],
    )
    try:  # how the compile went: graph breaks split the graph, skipped CUDA graphs run eager
        from torch._dynamo.utils import counters

        result["graph_breaks"] = sum(counters["graph_break"].values())
        result["cudagraph_skips"] = sum(
            v for k, v in counters["inductor"].items() if "cudagraph_skip" in k
        )
    except Exception:  # private API; the numbers do not depend on it
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        result["device"] = torch.cuda.get_device_name(device)
        result["device_detail"] = {
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
        }
    return result


# --- the run ------------------------------------------------------------------------------


@dataclass
class Job:
    section: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def compiles(self) -> bool:
        return bool(self.params.get("compile"))


def plan(quick: bool, sections: set[str], batches: set[int] | None) -> list[Job]:
    """Every job, most important first (see the module docstring for the estimates)."""

    def syn(model: str, batch: int, mode: str | None) -> Job:
        label = mode or "eager"
        return Job(
            "synthetic",
            f"{model} b{batch} {label}",
            {"model": model, "batch": batch, "compile": mode},
        )

    def e2e(decode: str, batch: int) -> Job:
        return Job(
            "e2e",
            f"e2e {decode}-decode b{batch}",
            {"decode": decode, "batch": batch, "compile": not quick},
        )

    gn = "googlenet"
    if quick:  # tiny and eager: the same code paths, in well under a minute on 2 cores
        # One e2e run: the decode mode is just an override's value to this script, and each
        # run costs ~10 s of imports here; GPU decoding is for the GPU anyway.
        jobs = [syn(MODEL, 2, None), syn(gn, 4, None), Job("sweep", "sweep"), e2e("workers", 4)]
    else:
        jobs = [syn(MODEL, 256, None), syn(MODEL, 256, "default"), Job("sweep", "sweep")]
        jobs += [e2e("device", 256), e2e("workers", 256)]
        jobs += [syn(MODEL, 32, None), syn(MODEL, 128, None)]
        jobs += [syn(MODEL, 32, "reduce-overhead"), e2e("device", 32)]
        jobs += [syn(gn, 256, None), syn(gn, 32, None), syn(gn, 128, None)]
        jobs += [syn(MODEL, 32, "default"), syn(MODEL, 128, "default")]
        jobs += [syn(gn, 256, "default"), syn(gn, 32, "reduce-overhead"), syn(gn, 128, "default")]
    return [
        j
        for j in jobs
        if j.section in sections and (batches is None or j.params.get("batch", 0) in batches | {0})
    ]


class Bench:
    """The run's state: settings, results so far, and the budget."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.device = args.device
        self.cuda = self.device == "cuda"
        self.scratch = args.scratch
        self.started = time.perf_counter()
        self.size = 32 if self.quick else 224  # synthetic input side
        self.e2e_size = 32 if self.quick else 224
        self.workers = 2 if self.quick else nproc()
        self.isolate = self.cuda if args.isolate is None else args.isolate
        self.observed: dict[str, float] = {}  # wall seconds of finished jobs, by kind
        self.compiled: set[tuple[str, int]] = set()  # (model, batch) compiled in this run
        self.e2e_dir: Path | None = args.e2e_data_dir
        self.e2e_batches: set[int] = {32, 256}  # run() narrows it to the planned e2e jobs
        self.r: dict[str, Any] = self.header()

    # - bookkeeping

    def header(self) -> dict[str, Any]:
        shm = shutil.disk_usage("/dev/shm").total / 2**30 if Path("/dev/shm").exists() else None
        name = self.gpu_name_from_smi() if self.cuda else self.cpu_name()
        peak = bf16_peak_tflops(name) if self.cuda else None
        flops: dict[str, float | None] = {}
        for model in (MODEL, "googlenet"):
            try:
                flops[model] = flops_per_image(model, self.size)
            except Exception as exc:  # then no TFLOP/s, but every rate still
                print(f"counting {model}'s FLOPs failed: {exc!r}", file=sys.stderr)
                flops[model] = None
        return {
            "device": name,
            "device_detail": {},
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "cpus": nproc(),
            "dev_shm_gib": round(shm, 1) if shm is not None else None,
            "command": "python scripts/bench_gpu.py " + " ".join(sys.argv[1:]),
            "quick": self.quick,
            "budget_s": self.args.budget_s,
            "elapsed_s": 0.0,
            "bf16_peak_tflops": peak,
            "flops_per_image": flops,
            "settings": {
                "synthetic": f"{self.size}x{self.size}, "
                + ("bf16 autocast, channels_last, cudnn.benchmark" if self.cuda else "fp32")
                + ", SGD momentum 0.9, one random batch",
                "flops": "forward+backward per image, torch.utils.flop_counter on meta",
                "e2e": f"experiment=imagenet/bn_x5, data.workers={self.workers}, image "
                f"{self.e2e_size}, rate = last perf.jsonl window x batch",
            },
            "figure1_sweep_wall_s": None,
            "figure1_sweep": {"status": "not run"},
            "synthetic_img_per_s": None,
            "synthetic_best": None,
            "synthetic": [],
            "e2e_cpu_decode_img_per_s": None,
            "e2e_cpu_decode_best": None,
            "e2e_gpu_decode_img_per_s": None,
            "e2e_gpu_decode_best": None,
            "e2e": [],
            "e2e_data": None,
            "skipped": [],
            "targets": {},
        }

    @staticmethod
    def gpu_name_from_smi() -> str:
        """The GPU's name without a CUDA context in this process (the workers need the GPU);
        the first worker replaces it with torch.cuda.get_device_name's."""
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout
            return out.strip().splitlines()[0] if out.strip() else "unknown GPU"
        except (OSError, subprocess.SubprocessError):
            return "unknown GPU"

    @staticmethod
    def cpu_name() -> str:
        cpuinfo = Path("/proc/cpuinfo")
        lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        return f"CPU {names[0] if names else platform.machine()}"

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self) -> float | None:
        return self.args.budget_s - self.elapsed() if self.args.budget_s else None

    def estimate(self, job: Job) -> float:
        """Seconds `job` should take: what a like job took in this run, else the docstring's."""
        if job.section == "sweep":
            return 60.0
        compile_s = self.observed.get("compile", 240.0)  # a cold compile, process included
        # A shape compiled before in this run is in inductor's cache (modes share it: on CPU
        # a reduce-overhead compile after a default one took 2 s instead of 29).
        warm = (job.params.get("model", MODEL), job.params["batch"]) in self.compiled
        if job.section == "synthetic":
            if not job.compiles:
                return self.observed.get("eager", 20.0)
            return compile_s * (0.25 if warm else 1.0) + 20.0
        extra = 15.0 if self.e2e_dir is None else 0.0  # generating the JPEGs first
        like = self.observed.get(f"e2e b{job.params['batch']}")
        if like is not None:
            return like + 30.0 + extra
        if not job.compiles:
            return 60.0 + extra
        return 60.0 + extra + (0.25 if warm else 1.0) * compile_s

    def write(self) -> None:
        self.r["elapsed_s"] = round(self.elapsed(), 1)
        self.r["targets"] = targets(self.r)
        out = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu.json").write_text(json.dumps(self.r, indent=2) + "\n")
        (out / "gpu.md").write_text(markdown(self.r))

    def say(self, message: str) -> None:
        print(f"[{self.elapsed():6.0f} s] {message}", flush=True)

    # - the loop

    def run(self, jobs: list[Job]) -> None:
        self.e2e_batches = {j.params["batch"] for j in jobs if j.section == "e2e"} or {1}
        self.write()
        for job in jobs:
            remaining = self.remaining()
            estimate = self.estimate(job)
            if remaining is not None and estimate > remaining:
                reason = f"needs ~{estimate:.0f} s, {max(remaining, 0):.0f} s of budget left"
                self.r["skipped"].append({"job": job.name, "reason": reason})
                self.say(f"skip {job.name}: {reason}")
                self.write()
                continue
            self.say(f"{job.name} (estimate {estimate:.0f} s)")
            start = time.perf_counter()
            if job.section == "synthetic":
                self.synthetic(job, remaining)
            elif job.section == "sweep":
                self.sweep(remaining)
            else:
                self.e2e(job, remaining)
            self.write()
            wall = time.perf_counter() - start
            shape = (job.params.get("model", MODEL), job.params.get("batch"))
            if job.section == "synthetic" and not job.compiles:
                self.observed["eager"] = max(self.observed.get("eager", 0.0), wall)
            elif job.section == "synthetic" and shape not in self.compiled:  # a cold compile
                self.observed["compile"] = max(self.observed.get("compile", 0.0), wall)
            elif job.section == "e2e":
                key = f"e2e b{job.params['batch']}"
                self.observed[key] = max(self.observed.get(key, 0.0), wall)
            rows = self.r["synthetic"] if job.section == "synthetic" else self.r["e2e"]
            if job.compiles and rows and rows[-1].get("status") == "ok":
                self.compiled.add(shape)

    # - sections

    def synthetic(self, job: Job, timeout: float | None) -> None:
        p = job.params
        spec = {
            "model": p["model"],
            "batch": p["batch"],
            "compile": p["compile"],
            "device": self.device,
            "size": self.size,
            "warmup": 1 if self.quick else 5,
            "steps": 1 if self.quick else None,
            "seconds": 3.0,
            # One thread at test scale: tiny ops on a busy 2-core machine otherwise spend
            # seconds in OpenMP barriers waiting for a descheduled thread (100x slower).
            "threads": 1 if self.quick else None,
        }
        row: dict[str, Any] = {"model": p["model"], "batch": p["batch"], "compile": p["compile"]}
        try:
            row |= {"status": "ok"} | self.synthetic_result(job, spec, timeout)
        except Exception as exc:  # recorded; the other rows still run
            row |= {"status": "failed", "error": tail(str(exc))}
        if "device" in row:  # torch's name for the GPU, which the peak table keys on
            self.r["device"], self.r["device_detail"] = row.pop("device"), row.pop("device_detail")
            self.r["bf16_peak_tflops"] = bf16_peak_tflops(self.r["device"])
        ips = row.get("images_per_s")
        flops = self.r["flops_per_image"].get(p["model"])
        if ips:
            tflops = flops * ips / 1e12 if flops else None
            peak = self.r["bf16_peak_tflops"]
            row["tflops"] = tflops
            row["share_of_bf16_peak"] = tflops / peak if tflops and peak else None
            rate = f"{tflops:.1f} TFLOP/s" if tflops else "FLOPs not counted"
            share = f", {100 * tflops / peak:.1f} % of the bf16 peak" if tflops and peak else ""
            self.say(f"  {ips:,.0f} img/s, {rate}{share}; first step {row['first_step_s']:.1f} s")
        else:
            self.say(f"  {row['status']}: {row.get('error', '')[-300:]}")
        self.r["synthetic"].append(row)
        measured = [r for r in self.r["synthetic"] if r["model"] == MODEL and r.get("images_per_s")]
        if measured:
            best = max(measured, key=lambda r: r["images_per_s"])
            self.r["synthetic_img_per_s"] = best["images_per_s"]
            self.r["synthetic_best"] = {k: best[k] for k in ("model", "batch", "compile")}

    def synthetic_result(
        self, job: Job, spec: dict[str, Any], timeout: float | None
    ) -> dict[str, Any]:
        if not self.isolate:
            return synthetic_worker(spec)
        slug = job.name.replace(" ", "_")
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        code, wall, output = run_logged(command, self.scratch / f"{slug}.log", timeout)
        lines = [line for line in output.splitlines() if line.startswith(RESULT_TAG)]
        if code == 0 and lines:
            return json.loads(lines[-1][len(RESULT_TAG) :]) | {"process_s": wall}
        why = "timed out (budget)" if code is None else f"exit code {code}"
        raise RuntimeError(f"worker {why} after {wall:.0f} s; output tail:\n{tail(output)}")

    def sweep(self, timeout: float | None) -> None:
        data_dir = self.args.data_dir
        sweep_dir, results = self.scratch / "sweep", self.scratch / "mnist_results"
        env = os.environ | {"DATA_DIR": str(data_dir)}
        env.setdefault("WANDB_MODE", "offline")  # no network on a compute node
        info: dict[str, Any]
        if not all((raw_dir(data_dir) / name).is_file() for name in RAW_FILES):
            # Not left to the trainer: it would try to download, and a compute node may hang
            # on that until the budget is gone.
            note = f"skipped: MNIST not found in {raw_dir(data_dir)} (set DATA_DIR)"
            self.r["figure1_sweep"] = {"status": "skipped", "note": note}
            self.say(f"  {note}")
            return
        if self.quick:
            expected = 2
            command = [sys.executable, "-m", "bnrepro.train", "--multirun", "experiment=mnist/bn"]
            command += ["seeds=[1,2]", "trainer.steps=20", "trainer.eval_every=10"]
            command += [f"trainer.device={self.device}", "trainer.progress=false", "logger=none"]
            command += [f"hydra.sweep.dir={sweep_dir}"]
            kind = "quick: 1 arm x 2 stacked seeds x 20 steps, no figure; not the target"
        else:
            expected = SWEEP_RUNS
            command = ["make", "--no-print-directory", "reproduce-mnist", f"DEVICE={self.device}"]
            command += [f"SWEEP_DIR={sweep_dir}", f"MNIST_RESULTS={results}"]
            # This Python, as for everything else here (the Makefile then installs nothing:
            # a lent GPU machine brings its packages and cannot reach a package index).
            command += [f"PY={sys.executable}"]
            kind = "make reproduce-mnist"
        self.say("  " + " ".join(command))
        try:
            code, wall, output = run_logged(command, self.scratch / "sweep.log", timeout, env)
        except OSError as exc:  # e.g. no `make`
            code, wall, output = -1, 0.0, f"{type(exc).__name__}: {exc}"
        info = {"kind": kind, "command": " ".join(command), "wall_s": wall, "returncode": code}
        try:
            runs = find_runs(sweep_dir)
        except Exception as exc:  # half-written runs after a failure
            runs, info["read_error"] = [], f"{type(exc).__name__}: {exc}"
        completed = sum(r.summary.get("status") == "completed" for r in runs)
        devices = sorted({str(r.summary["device"]) for r in runs if "device" in r.summary})
        info |= {
            "runs": len(runs),
            "completed": completed,
            "all_completed": len(runs) == expected and completed == expected,
            "devices": devices or None,
            "figure": sorted(p.name for p in results.glob("figure1.*")) or None,
        }
        ok = code == 0 and info["all_completed"]
        info["status"] = "ok" if ok else ("timed out (budget)" if code is None else "failed")
        if not ok:
            info["output_tail"] = tail(output)
        self.r["figure1_sweep"] = info
        self.r["figure1_sweep_wall_s"] = wall if code == 0 else None
        self.say(
            f"  {info['status']}: {wall:.1f} s, {completed}/{expected} runs completed"
            + (f", device {', '.join(devices)}" if devices else "")
        )

    def e2e_data(self) -> Path:
        """The generated ImageFolder (once per run), or --e2e-data-dir as given."""
        if self.e2e_dir is not None:
            return self.e2e_dir
        root = self.scratch / "imagefolder"
        start = time.perf_counter()
        if self.quick:
            classes, unique, size, val = 2, 8, (64, 48), 2
        else:
            classes, unique, size, val = 10, 256, (400, 300), 8
        # Enough names that the longest run never reaches an epoch end (the restart of the
        # loader would be a stall real ImageNet, 5,000 batches an epoch, hardly has).
        needed = max(s * b for s, b in map(self.e2e_steps, self.e2e_batches))
        per_class = math.ceil(needed / classes) + 256
        generate_imagefolder(root, classes, unique, per_class, val, size, self.workers)
        self.r["e2e_data"] = {
            "dir": str(root),
            "classes": classes,
            "distinct_train_jpegs": classes * unique,
            "train_names": classes * per_class,
            "val_per_class": val,
            "size": list(size),
            "generate_s": round(time.perf_counter() - start, 1),
        }
        self.say(
            f"  generated {classes * unique:,} JPEGs {size[0]}x{size[1]} as "
            f"{classes * per_class:,} names in {time.perf_counter() - start:.1f} s"
        )
        self.e2e_dir = root
        return root

    def e2e_steps(self, batch: int) -> tuple[int, int]:
        """(steps, batch): 2 windows, the last long enough to time (b256: ~4 s at 9k img/s)."""
        if self.quick:
            return 4, batch
        return (300 if batch >= 128 else 600), batch

    def e2e(self, job: Job, timeout: float | None) -> None:
        decode, batch = job.params["decode"], job.params["batch"]
        steps, _ = self.e2e_steps(batch)
        row: dict[str, Any] = {
            "decode": decode,
            "batch": batch,
            "steps": steps,
            "compile": job.params["compile"],
            "workers": self.workers,
        }
        try:
            data = self.e2e_data()
        except Exception as exc:
            row |= {"status": "failed", "error": f"generating the JPEGs: {exc}"}
            self.r["e2e"].append(row)
            self.say(f"  failed: {row['error']}")
            return
        run_dir = self.scratch / f"e2e_{decode}_b{batch}"
        shutil.rmtree(run_dir, ignore_errors=True)  # else the trainer would resume from it
        overrides = [
            "experiment=imagenet/bn_x5",
            f"paths.imagenet_dir={data}",
            f"data.batch_size={batch}",
            f"++data.decode={decode}",
            f"data.workers={self.workers}",
            f"trainer.compile={str(job.params['compile']).lower()}",
            f"trainer.steps={steps}",
            f"trainer.eval_every={steps // 2}",
            f"trainer.device={self.device}",
            "trainer.progress=false",
            "logger=none",
            f"hydra.run.dir={run_dir}",
        ]
        if self.quick:
            overrides += [f"data.image_size={self.e2e_size}", "trainer.probe.num_images=4"]
            overrides += ["trainer.num_threads=1"]  # as the synthetic rows (see there)
        overrides += self.args.e2e_override
        command = [sys.executable, "-m", "bnrepro.train", *overrides]
        row["command"] = "python -m bnrepro.train " + " ".join(overrides)
        env = os.environ | {"WANDB_MODE": "offline"}
        code, wall, output = run_logged(
            command, self.scratch / f"e2e_{decode}_b{batch}.log", timeout, env
        )
        row["wall_s"] = wall
        perf_path = run_dir / "perf.jsonl"
        windows = read_metrics(perf_path) if perf_path.exists() else []
        row["windows_steps_per_s"] = [w.get("perf/steps_per_s") for w in windows]
        summary_path = run_dir / "summary.json"
        if summary_path.exists():  # the device the run trained on, when the trainer says
            row["run_device"] = json.loads(summary_path.read_text()).get("device")
        if code == 0 and windows:
            row["status"] = "ok"
            row["images_per_s"] = windows[-1]["perf/steps_per_s"] * batch
            # While the evaluation before the last window ran, the loader's workers could
            # fill their queue (workers x prefetch_factor 2 batches): if the loader is what
            # limits the rate, the window is up to that many batches too quick.
            window = steps - windows[-2]["step"] if len(windows) > 1 else steps
            queued = 2 * self.workers
            row["if_queue_was_full_img_per_s"] = (
                row["images_per_s"] * (window - queued) / window if window > queued else None
            )
            if len(windows) < 2:
                row["note"] = "one window only: includes compilation"
        else:
            row["status"] = "timed out (budget)" if code is None else "failed"
            row["returncode"] = code
            row["error"] = tail(output)
        self.r["e2e"].append(row)
        if row["status"] == "ok":
            windows_text = ", ".join(f"{w * batch:,.0f}" for w in row["windows_steps_per_s"])
            self.say(
                f"  {row['images_per_s']:,.0f} img/s (windows: {windows_text}), {wall:.0f} s in all"
            )
        else:
            self.say(f"  {row['status']} after {wall:.0f} s: {output[-400:]}")
        for decode_mode, key in (("workers", "e2e_cpu_decode"), ("device", "e2e_gpu_decode")):
            done = [
                r for r in self.r["e2e"] if r["decode"] == decode_mode and r.get("images_per_s")
            ]
            if done:
                best = max(done, key=lambda r: r["images_per_s"])
                self.r[f"{key}_img_per_s"] = best["images_per_s"]
                self.r[f"{key}_best"] = {k: best[k] for k in ("decode", "batch", "workers")}


def _generate_chunk(args: tuple[Path, int, int, int, tuple[int, int], int]) -> Path:
    root, classes, per_class, val, size, seed = args
    return make_fake_imagefolder(root, classes, per_class, val, size, seed=seed)


def generate_imagefolder(
    root: Path,
    classes: int,
    unique: int,
    per_class: int,
    val: int,
    size: tuple[int, int],
    workers: int,
) -> None:
    """root/{train,val}/class_XX: `unique` distinct JPEGs per class, generated in parallel
    chunks (one seed each), then hard-linked under `per_class` names per class. The decoder
    sees the same work per image either way; the disk cache holds the few distinct files."""
    chunks = max(1, min(workers, unique))
    sizes = [unique // chunks + (i < unique % chunks) for i in range(chunks)]
    jobs = [  # chunk 0's validation images are the ones used
        (root / "chunks" / str(i), classes, n, val if i == 0 else 1, size, i)
        for i, n in enumerate(sizes)
        if n
    ]
    if len(jobs) == 1:
        made = [_generate_chunk(jobs[0])]
    else:  # fork: the JPEG writer needs nothing of torch; spawn would re-import it per worker
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(len(jobs), mp_context=context) as pool:
            made = list(pool.map(_generate_chunk, jobs))
    link: Callable[[Path, Path], None] = os.link
    for split in ("train", "val"):
        for class_dir in sorted((made[0] / split).iterdir()):
            if split == "val":  # chunk 0's validation images suffice
                shutil.copytree(class_dir, root / split / class_dir.name)
                continue
            sources = sorted(
                p for chunk in made for p in (chunk / split / class_dir.name).iterdir()
            )
            target = root / split / class_dir.name
            target.mkdir(parents=True)
            for i in range(per_class):
                dest = target / f"img_{i:06d}.JPEG"
                try:
                    link(sources[i % len(sources)], dest)
                except OSError:  # a filesystem without hard links
                    link = shutil.copyfile  # type: ignore[assignment]
                    link(sources[i % len(sources)], dest)


# --- targets and the report ---------------------------------------------------------------


def targets(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target: its threshold, this run's value and met / missed / not measured."""

    def synthetic(batch: int, modes: tuple[str, ...]) -> float | None:
        rates = [
            row["images_per_s"]
            for row in r["synthetic"]
            if row["model"] == MODEL
            and row["batch"] == batch
            and row["compile"] in modes
            and row.get("images_per_s")
        ]
        return max(rates) if rates else None

    def e2e(batch: int) -> float | None:
        rates = [
            row["images_per_s"]
            for row in r["e2e"]
            if row["decode"] == "device" and row["batch"] == batch and row.get("images_per_s")
        ]
        return max(rates) if rates else None

    sweep = r["figure1_sweep"]
    values: dict[str, float | None] = {
        "figure1_sweep_wall_s": sweep.get("wall_s")
        if sweep.get("kind", "").startswith("make") and sweep.get("returncode") == 0
        else None,
        "synthetic_compiled_b256_img_per_s": synthetic(256, ("default", "reduce-overhead")),
        "synthetic_compiled_b32_img_per_s": synthetic(32, ("default", "reduce-overhead")),
        "e2e_device_b256_img_per_s": e2e(256),
        "e2e_device_b32_img_per_s": e2e(32),
    }
    reference = synthetic(256, ("default",))  # the trainer compiles in the default mode
    values["e2e_device_b256_vs_synthetic"] = (
        values["e2e_device_b256_img_per_s"] / reference
        if reference and values["e2e_device_b256_img_per_s"]
        else None
    )
    out = {}
    for key, (threshold, sense, description) in TARGETS.items():
        value = values[key]
        if value is None:
            status = "not measured"
        else:
            ok = value <= threshold if sense == "max" else value >= threshold
            if key == "figure1_sweep_wall_s" and not sweep.get("all_completed"):
                ok = False
            status = "met" if ok else "missed"
        out[key] = {
            "target": f"{'<=' if sense == 'max' else '>='} {threshold:,g}",
            "description": description,
            "value": value,
            "status": status,
        }
    return out


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def gflops(per_image: dict[str, float | None]) -> str:
    return ", ".join(f"{m} {_num(f / 1e9 if f else None, 2)}" for m, f in per_image.items())


def markdown(r: dict[str, Any]) -> str:
    peak = r["bf16_peak_tflops"]
    lines = [
        "# GPU benchmark: Figure-1 sweep, BN-Inception training throughput, end to end",
        "",
        f"Device: {r['device']}"
        + (f" (dense bf16 peak {peak:g} TFLOP/s)" if peak else " (bf16 peak unknown)")
        + f"; torch {r['torch']}, torchvision {r['torchvision']}, CUDA {r['cuda']}, "
        f"{r['cpus']} CPUs, /dev/shm {r['dev_shm_gib']} GiB. All numbers from one run "
        f"({r['elapsed_s']:.0f} s).",
        f"Command: `{r['command'].strip()}`"
        + (" (**--quick: tiny CPU test scale**)" if r["quick"] else ""),
        "",
        "## Targets",
        "",
        "| target | this run | |",
        "|---|---|---|",
    ]
    for key, t in r["targets"].items():
        digits = 2 if key.endswith("vs_synthetic") else 1 if key.endswith("wall_s") else 0
        value = _num(t["value"], digits)
        verdict = {"met": "met", "missed": "**missed**"}.get(t["status"], t["status"])
        lines.append(f"| {t['description']} {t['target']} | {value} | {verdict} |")

    s = r["figure1_sweep"]
    lines += ["", "## Figure-1 sweep", ""]
    if "wall_s" in s:
        lines.append(
            f"`{s['command']}` ({s['kind']}): {s['status']}, {s['wall_s']:.1f} s wall, "
            f"{s['completed']}/{s['runs']} runs completed"
            + (f", device {', '.join(s['devices'])}" if s.get("devices") else "")
            + (f", figure {', '.join(s['figure'])}" if s.get("figure") else "")
            + "."
        )
    else:
        lines.append(s.get("note", s["status"]) + ".")

    flops = gflops(r["flops_per_image"])
    lines += [
        "",
        "## Synthetic input (training steps of one random batch)",
        "",
        f"{r['settings']['synthetic']}. GFLOP per image, forward+backward: {flops}. "
        "reduce-overhead = torch.compile with CUDA graphs.",
        "",
        "| model | batch | torch.compile | images/s | TFLOP/s | % of bf16 peak | first step s "
        "| peak GiB | |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["synthetic"]:
        share = row.get("share_of_bf16_peak")
        note = "" if row["status"] == "ok" else row["status"]
        if row.get("error"):
            note += ": " + " ".join(row["error"].split())[-150:].replace("|", "/")
        if row.get("cudagraph_skips"):
            note += f" CUDA graphs skipped x{row['cudagraph_skips']}"
        if row.get("graph_breaks"):
            note += f" {row['graph_breaks']} graph breaks"
        lines.append(
            f"| {row['model']} | {row['batch']} | {row['compile'] or 'no'} | "
            f"{_num(row.get('images_per_s'))} | {_num(row.get('tflops'), 1)} | "
            f"{_num(100 * share if share else None, 1)} | {_num(row.get('first_step_s'), 1)} | "
            f"{_num(row.get('peak_memory_gib'), 1)} | {note.strip()} |"
        )

    lines += [
        "",
        "## End to end: `python -m bnrepro.train experiment=imagenet/bn_x5`",
        "",
        f"{r['settings']['e2e']}.",
    ]
    d = r["e2e_data"]
    if d:
        lines.append(
            f"Data: {d['distinct_train_jpegs']:,} distinct {d['size'][0]}x{d['size'][1]} JPEGs "
            f"hard-linked as {d['train_names']:,} training images in {d['classes']} classes "
            f"(generated in {d['generate_s']} s; read from the page cache, so this times "
            "decoding and augmentation, not the disk)."
        )
    lines += [
        "",
        "| decode | batch | compile | images/s (last window) | if the queue was full [1] "
        "| windows, images/s | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["e2e"]:
        windows = ", ".join(f"{w * row['batch']:,.0f}" for w in row.get("windows_steps_per_s", []))
        status = row["status"]
        if row.get("error"):
            status += ": " + " ".join(row["error"].split())[-200:].replace("|", "/")
        lines.append(
            f"| {row['decode']} | {row['batch']} | {row['compile']} | "
            f"{_num(row.get('images_per_s'))} | {_num(row.get('if_queue_was_full_img_per_s'))} | "
            f"{windows or '-'} | {status} |"
        )
    lines += [
        "",
        "[1] The last window starts after an evaluation, during which the loader's workers can "
        "queue workers x 2 batches; were they the bottleneck, the window's rate is that much "
        "too high, and this column is the rate without them.",
    ]
    if r["skipped"]:
        lines += ["", "## Skipped", ""]
        lines += [f"- {s['job']}: {s['reason']}" for s in r["skipped"]]
    return "\n".join(lines) + "\n"


# --- entry point --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny scale, no compile: the test")
    parser.add_argument("--out", type=Path, help="default results/bench (required with --quick)")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    parser.add_argument("--batches", help="only jobs at these batch sizes, e.g. 32 or 256,128")
    parser.add_argument(
        "--budget-s",
        type=float,
        help="skip jobs that would not fit, kill any still running at the end; 0: no limit "
        "(default 540, --quick 240)",
    )
    parser.add_argument("--data-dir", type=Path, help="MNIST root for the sweep (DATA_DIR)")
    parser.add_argument(
        "--e2e-data-dir", type=Path, help="an ImageFolder (train/, val/) instead of generated JPEGs"
    )
    parser.add_argument(
        "--e2e-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Hydra override added to every e2e run (repeatable), e.g. trainer.cuda_graph=false",
    )
    parser.add_argument("--scratch", type=Path, help="work dir (default: a new temporary one)")
    parser.add_argument("--keep-scratch", action="store_true", help="keep logs and run dirs")
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each synthetic row in its own process (default: on GPU only)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # JSON spec of one synthetic row
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu" and not args.quick:
        parser.error("this is a GPU benchmark; on CPU only the test scale runs (--quick --out DIR)")
    if args.quick and args.out is None:
        parser.error("--quick needs --out, so its numbers cannot replace results/bench/gpu.*")
    args.out = args.out or REPO / "results" / "bench"
    if args.budget_s is None:
        args.budget_s = 240.0 if args.quick else 540.0
    wanted = {s.strip() for s in args.sections.split(",") if s.strip()}
    if not wanted or wanted - set(SECTIONS):
        parser.error(f"--sections takes a comma-separated subset of {SECTIONS}")
    args.sections = wanted
    args.batches = {int(b) for b in args.batches.split(",")} if args.batches else None
    args.data_dir = args.data_dir or default_data_dir()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:  # one synthetic row; the parent reads the tagged line
        result = synthetic_worker(json.loads(args.worker))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    own_scratch = args.scratch is None
    args.scratch = args.scratch or Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    args.scratch.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    jobs = plan(args.quick, args.sections, args.batches)
    flops = gflops(bench.r["flops_per_image"])
    bench.say(
        f"{bench.r['device']}, torch {torch.__version__}; {len(jobs)} jobs, budget "
        f"{args.budget_s:.0f} s; GFLOP/image fwd+bwd: {flops}; scratch {args.scratch}"
    )
    try:
        bench.run(jobs)
    except BaseException:
        bench.r["interrupted"] = traceback.format_exc(limit=3)
        raise
    finally:
        bench.write()
        if own_scratch and not args.keep_scratch:
            shutil.rmtree(args.scratch, ignore_errors=True)
    for key, t in bench.r["targets"].items():
        bench.say(f"target {key} {t['target']}: {_num(t['value'], 2)} {t['status']}")
    bench.say(f"wrote {args.out / 'gpu.json'} and gpu.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
