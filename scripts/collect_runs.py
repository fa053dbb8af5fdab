"""Copy the small, plottable part of a sweep's run directories into results/.

    python scripts/collect_runs.py logs/reproduce-mnist results/mnist/runs

Each run becomes <arm>-seed<seed>/ with metrics.jsonl, summary.json and the composed config,
so `make figures` can rebuild the figures on a fresh clone without re-training. Only finished
runs (completed or diverged) are collected: one stopped by a signal, or failed, is named and
left for the same `make reproduce-*` command to resume.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from bnrepro.analysis.runs import find_runs
from bnrepro.training.run import FINISHED

# Source -> name in the collection; the first source found for a name wins. config.yaml and
# overrides.yaml are what the run was trained with (training/run.member_runs); Hydra's .hydra/
# copies are rewritten at every launch, so they are only the fallback, for older runs.
KEEP = {
    "metrics.jsonl": "metrics.jsonl",
    "summary.json": "summary.json",
    "config.yaml": "config.yaml",
    ".hydra/config.yaml": "config.yaml",
    "overrides.yaml": "overrides.yaml",
    ".hydra/overrides.yaml": "overrides.yaml",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("dest", type=Path)
    args = parser.parse_args()
    found = find_runs(args.sweep_dir)
    runs = [r for r in found if r.summary.get("status") in FINISHED]
    for run in found:
        if run not in runs:
            print(f"not collected ({run.summary.get('status')}, unfinished): {run.path}")
    if not runs:
        print(f"error: no run directories (summary.json) under {args.sweep_dir}", file=sys.stderr)
        return 2
    seen: dict[tuple[str, int], Path] = {}
    for run in runs:
        other = seen.setdefault((run.arm, run.seed), run.path)
        if other != run.path:  # the same arm and seed trained with other settings
            print(
                f"error: {other} and {run.path} are both {run.arm} seed {run.seed} (made with "
                f"different settings); move one away or collect from a new sweep directory",
                file=sys.stderr,
            )
            return 2
    if args.dest.exists():
        shutil.rmtree(args.dest)
    for run in runs:
        target = args.dest / f"{run.arm}-seed{run.seed}"
        target.mkdir(parents=True)
        for source, name in KEEP.items():
            if (run.path / source).is_file() and not (target / name).exists():
                shutil.copy2(run.path / source, target / name)
    print(f"collected {len(runs)} runs into {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
