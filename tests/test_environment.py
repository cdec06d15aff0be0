"""environment.yml (conda) must list the same runtime dependencies as pyproject.toml."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

# PyPI name -> conda-forge name, where they differ.
CONDA_NAMES = {"torch": "pytorch"}


def _name(requirement: str) -> str:
    """The normalised package name of a requirement string such as 'torch>=2.4'."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"cannot parse requirement {requirement!r}"
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _environment() -> dict:
    with open(ROOT / "environment.yml", encoding="utf-8") as f:
        return yaml.safe_load(f)


def _conda_packages(env: dict) -> dict[str, str]:
    return {_name(d): d for d in env["dependencies"] if isinstance(d, str)}


def _pip_section(env: dict) -> list[str]:
    sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, "environment.yml needs exactly one pip section"
    return sections[0]


def test_runtime_dependencies_match():
    runtime = {_name(r) for r in _pyproject()["project"]["dependencies"]}
    expected = {CONDA_NAMES.get(name, name) for name in runtime}
    conda = set(_conda_packages(_environment())) - {"python", "pip"}
    assert expected - conda == set(), "runtime dependencies missing from environment.yml"
    assert conda - expected == set(), "environment.yml has packages pyproject.toml lacks"


def test_torch_is_pytorch_with_the_same_floor():
    conda = _conda_packages(_environment())
    assert "torch" not in conda, "conda-forge calls torch 'pytorch'"
    (torch,) = [r for r in _pyproject()["project"]["dependencies"] if _name(r) == "torch"]
    floor = torch[len("torch") :].strip()
    assert conda["pytorch"].replace(" ", "") == f"pytorch{floor}"


def test_python_pip_and_editable_install():
    env = _environment()
    conda = _conda_packages(env)
    assert env["name"] == "lemmse"
    assert "conda-forge" in env["channels"]
    assert conda["python"].startswith("python=3.")
    assert "pip" in conda
    assert "-e .[dev]" in _pip_section(env)
