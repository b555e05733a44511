"""The dependency locks: complete, hashed, consistent with pyproject.toml, and installed.

A fresh machine installs exactly requirements/*.lock (scripts/bootstrap, the Dockerfile),
so a lock that misses a dependency, loses a hash or drifts from pyproject.toml's ranges
would make a new clone differ from the machine the suite last passed on.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9_.\[\]-]+)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def pins(lock: str) -> dict[str, tuple[Version, str | None, int]]:
    """name -> (version, marker, number of hashes) for every pin in a lock file."""
    found: dict[str, tuple[Version, str | None, int]] = {}
    name = None
    for line in (ROOT / "requirements" / lock).read_text().splitlines():
        match = PIN.match(line)
        if match:
            name = canonicalize_name(re.sub(r"\[.*\]", "", match.group(1)))
            found[name] = (Version(match.group(2)), match.group(3), 0)
        elif name and line.strip().startswith("--hash=sha256:"):
            version, marker, hashes = found[name]
            found[name] = (version, marker, hashes + 1)
    return found


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("lock,requirements", [
    ("runtime.lock", lambda p: p["dependencies"]),
    ("test.lock", lambda p: p["dependencies"] + p["optional-dependencies"]["test"]),
])
def test_every_dependency_is_pinned_within_its_range_with_hashes(lock, requirements):
    locked = pins(lock)
    assert locked and all(hashes for _, _, hashes in locked.values()), lock
    for text in requirements(project()):
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is not in requirements/{lock}: run scripts/lock"
        assert locked[name][0] in requirement.specifier, (
            f"requirements/{lock} pins {name}=={locked[name][0]}, outside {requirement}")


def test_runtime_and_test_locks_agree_on_every_shared_package():
    runtime, test = pins("runtime.lock"), pins("test.lock")
    assert set(runtime) <= set(test)
    assert {n: v for n, (v, _, _) in runtime.items()} == {n: test[n][0] for n in runtime}


def test_this_environment_runs_exactly_the_test_lock():
    environment = default_environment()
    for name, (version, marker, _) in pins("test.lock").items():
        if marker and not Requirement(f"x; {marker}").marker.evaluate(environment):
            continue
        assert Version(metadata.version(name)) == version, (
            f"{name} {metadata.version(name)} is installed, the lock says {version}")
