"""`make install` (pyproject.toml) and conda (environment.yml) install the same pins."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^\s*-\s*([A-Za-z0-9_.\-]+==[^\s#]+)")


def pyproject_pins() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])


def conda_pins() -> set[str]:
    return {
        m.group(1)
        for line in (REPO / "environment.yml").read_text().splitlines()
        if (m := PIN.match(line))
    }


def test_every_dependency_is_pinned_exactly():
    assert pyproject_pins() and all("==" in pin for pin in pyproject_pins())


def test_environment_yml_matches_pyproject():
    assert conda_pins() == pyproject_pins()


def test_torch_pins_are_the_ones_that_import_together():
    pins = pyproject_pins()
    assert {"torch==2.14.1", "torchvision==0.29.1"} <= pins
    assert "python=3.11" in (REPO / "environment.yml").read_text()


def make_dry_run(*targets: str) -> str:
    """What `make -n TARGETS` would run (PY set, so nothing is installed)."""
    out = subprocess.run(
        ["make", "-n", "PY=python", *targets], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_every_results_folder_has_a_reproduce_target_and_a_figure():
    """The Makefile's one template: each results folder with runs is made by a reproduce-*
    target (a sweep, collected there, drawn from there) and redrawn by `make figures`."""
    folders = sorted((REPO / "results").glob("*/*runs")) + [REPO / "results/bn_stats/large/runs"]
    assert len(folders) >= 8
    figures = make_dry_run("figures")
    experiments = re.search(r"^EXPERIMENTS := (.+)$", (REPO / "Makefile").read_text(), re.M)
    targets = [f"reproduce-{e}" for e in experiments.group(1).split()]
    # bn-stats' large-batch run is its own experiment with its own target (each within 20 min).
    reproduce = make_dry_run(*targets, "reproduce-bn-stats-large")
    for folder in folders:
        runs = folder.relative_to(REPO).as_posix()
        assert f"--runs {runs} --out" in figures, runs
        assert "collect_runs.py" in reproduce and f" {runs}\n" in reproduce, runs
    # One sweep per experiment and the large-batch run; before their sweeps, the learning-rate
    # searches of fig2-small, ics and batch-size, and batch-size's ghost design.
    assert reproduce.count("-m bnrepro.train --multirun") == len(experiments.group(1).split()) + 5
