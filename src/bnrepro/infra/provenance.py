"""Where a result came from: the code (git commit, uncommitted changes), the libraries, the
machine and the command. Every summary.json records it (`provenance`), so a number in results/
can be traced to the commit that made it; the figure scripts and the report list the commits
behind each results folder (bnrepro.analysis.runs.provenance_of).
"""

from __future__ import annotations

import functools
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torchvision

from bnrepro.config.resolvers import repo_root


@functools.cache
def code_version(root: str | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout at `root` (default: the one this package runs from);
    (None, None) outside a git checkout. Dirty: tracked files outside results/ differ from the
    commit. Untracked and ignored files (logs/, .venv/) do not count, nor does results/, which
    the suite's own `make reproduce-*` targets rewrite between the sweeps of one session, nor
    Markdown (*.md): documentation, which `make report` rewrites (README's verdict counts)."""
    cwd = root or repo_root()

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise OSError(out.stderr.strip())
        return out.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!results")
        dirty = any(not line.endswith(".md") for line in changed.splitlines())
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def job_command() -> str:
    """The command that re-runs this one job: the entrypoint and the job's own overrides (a
    sweep's job gets its own values, not the sweep's lists); sys.argv outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        overrides = HydraConfig.get().overrides.task
        return " ".join(["python -m bnrepro.train", *map(shlex.quote, overrides)])
    return " ".join(map(shlex.quote, sys.argv))


def provenance(device: torch.device) -> dict[str, Any]:
    """What summary.json records under `provenance`."""
    commit, dirty = code_version()
    record: dict[str, Any] = {
        "commit": commit,
        "dirty": dirty,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "command": job_command(),
    }
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record
