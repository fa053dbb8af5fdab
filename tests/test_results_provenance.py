"""Every committed result says which code made it: a commit of this repository's history."""

from __future__ import annotations

import json
import subprocess

import pytest

from .conftest import REPO


def is_ancestor(commit: str) -> bool:
    """Whether `commit` is in HEAD's history."""
    out = subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=REPO)
    return out.returncode == 0


def test_every_committed_summary_names_a_commit_of_main_and_a_torch_version():
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    summaries = sorted((REPO / "results").rglob("summary.json"))
    assert len(summaries) > 300
    commits, missing = {}, []
    for path in summaries:
        origin = json.loads(path.read_text()).get("provenance") or {}
        if not (origin.get("commit") and origin.get("torch")):
            missing.append(path.relative_to(REPO).as_posix())
        else:
            commits.setdefault(origin["commit"], path)
    assert missing == []
    assert {c: p for c, p in commits.items() if not is_ancestor(c)} == {}
