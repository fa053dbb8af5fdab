"""`make install` (pyproject.toml) and conda (environment.yml) install the same pins."""

from __future__ import annotations

import re
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
