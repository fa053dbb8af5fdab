"""What makes a checkout "dirty" in a run's provenance: code and configs, not docs or results."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bnrepro.infra.provenance import code_version


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def checkout(root: Path) -> Path:
    root.mkdir()
    git(root, "init", "-q")
    for name in ("train.py", "README.md", "results/table.md"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x\n")
    git(root, "add", ".")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    return root


def test_docs_and_results_leave_a_checkout_clean_code_does_not(tmp_path):
    docs = checkout(tmp_path / "docs")
    (docs / "README.md").write_text("verdict counts\n")
    (docs / "results" / "table.md").write_text("new numbers\n")
    (docs / "notes.py").write_text("untracked\n")
    commit, dirty = code_version(str(docs))
    assert len(commit) == 40 and dirty is False
    code = checkout(tmp_path / "code")
    (code / "train.py").write_text("y\n")
    assert code_version(str(code))[1] is True
