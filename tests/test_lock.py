"""The pinned test set-up (requirements/test.txt, made by scripts/lock) agrees with pyproject.toml.

A fresh machine installs the pins, so a dependency's new release cannot break the suite
overnight; these tests make sure the pins cannot drift from what pyproject.toml declares.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "test.txt"


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + project["optional-dependencies"]["test"]
    return [Requirement(line) for line in lines]


def pinned() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"requirements/test.txt: not an exact pin: {line!r} (run scripts/lock)"
        pins[canonicalize_name(name)] = Version(version.split(";", 1)[0].strip())
    return pins


def test_every_declared_dependency_is_pinned_within_its_range() -> None:
    pins = pinned()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not pinned: run scripts/lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} is outside pyproject.toml's {requirement}: run scripts/lock"
        )


def test_the_pins_pyproject_asks_for_are_exactly_its_dependencies() -> None:
    """uv notes `via backer (pyproject.toml)` under each direct pin: a dependency added to or
    dropped from pyproject.toml without scripts/lock shows up here."""
    asked_for: set[str] = set()
    current = ""
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            current = canonicalize_name(line.partition("==")[0])
        elif "backer (pyproject.toml)" in line:
            asked_for.add(current)
    assert asked_for == {canonicalize_name(r.name) for r in declared()}, "run scripts/lock"


def test_scripts_test_installs_the_pins() -> None:
    script = (ROOT / "scripts" / "test").read_text()
    assert "-c requirements/test.txt" in script
