"""The installed set is the locked, tested one (constraints.txt): speed and numbers must not move
under us because a fresh install resolved a newer library."""

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

LOCK = Path(__file__).resolve().parents[1] / "constraints.txt"
PYPROJECT = LOCK.with_name("pyproject.toml")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: '{line}' is not a 'name==version' pin"
            pins[normalize(name)] = version
    return pins


def public(version: str) -> str:
    return version.split("+", 1)[0]  # torch's local label (+cpu) is the build, not the version


def test_every_dependency_is_locked():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    specs = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    declared = [re.match(r"[A-Za-z0-9_.\-]+", spec).group(0) for spec in specs]
    assert "torch" in declared and "trl" in declared, declared  # both lists were read
    missing = [d for d in declared if normalize(d) not in locked()]
    assert not missing, f"dependencies without a pin in constraints.txt: {missing}"


def test_installed_versions_equal_the_lock():
    differ = []
    for name, version in locked().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name in ("pip",):
                continue
            differ.append(f"{name}: locked {version}, not installed")
            continue
        if public(installed) != version:
            differ.append(f"{name}: locked {version}, installed {installed}")
    if differ:
        pytest.fail("installed packages differ from constraints.txt (run make setup): " + "; ".join(differ))
