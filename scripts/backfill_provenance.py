"""Give committed runs made before summaries recorded provenance the one fact git still knows.

    python scripts/backfill_provenance.py results

Summaries written since commit 8355403 carry `provenance` (bnrepro.infra.provenance): the
commit that ran them, torch, the CPU, the command. Older runs in results/ lack it. For each of
those, this script records the commit that added the run's summary.json to results/ (the run
was made by the code of that commit or of the one before it: each results commit of this
repository carries the code that produced it) and that commit's torch and torchvision pins,
marked `"backfilled"`; what git cannot tell (the CPU, threads, command, uncommitted changes)
stays absent. Runs that have provenance are left alone, so running it twice changes nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

BACKFILLED = (
    "the commit that added this run to results/; the run predates summaries recording "
    "provenance, so torch and torchvision are that commit's pins and the CPU, threads, command "
    "and uncommitted changes were not recorded"
)


def git(*args: str, cwd: Path) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@cache
def pins(commit: str, repo: Path) -> dict[str, str]:
    """The exact `name==version` pins of pyproject.toml at `commit`."""
    project = tomllib.loads(git("show", f"{commit}:pyproject.toml", cwd=repo))["project"]
    found = (re.match(r"([\w.\-]+)==([^\s;]+)", d) for d in project["dependencies"])
    return {m.group(1): m.group(2) for m in found if m}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    repo = Path(git("rev-parse", "--show-toplevel", cwd=args.results))
    changed = 0
    for path in sorted(args.results.rglob("summary.json")):
        summary = json.loads(path.read_text())
        if "provenance" in summary:
            continue
        added = git("log", "--diff-filter=A", "--format=%H", "--", path.name, cwd=path.parent)
        if not added:
            print(f"error: {path} is not committed; commit it first", file=sys.stderr)
            return 2
        commit = added.splitlines()[-1]  # the first commit that added it
        versions = pins(commit, repo)
        summary["provenance"] = {
            "commit": commit,
            "torch": versions["torch"],
            "torchvision": versions["torchvision"],
            "backfilled": BACKFILLED,
        }
        path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        changed += 1
    print(f"backfilled {changed} summaries under {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
