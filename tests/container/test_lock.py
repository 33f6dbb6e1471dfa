"""The image's lock file matches the runtime dependencies declared in pyproject.toml.

No Docker engine needed: this guards the inputs of the image build.
"""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import REPO


def requirements(lines: str) -> dict[str, Requirement]:
    reqs = [Requirement(line.split("#")[0]) for line in lines.splitlines() if line.split("#")[0].strip()]
    return {canonicalize_name(r.name): r for r in reqs}


def test_requirements_in_lists_the_runtime_dependencies_of_pyproject() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    from_pyproject = requirements("\n".join(declared))
    from_in = requirements((REPO / "requirements.in").read_text())
    assert {n: str(r.specifier) for n, r in from_in.items()} == {
        n: str(r.specifier) for n, r in from_pyproject.items()
    }


def test_lock_pins_every_requirement_within_its_range_with_hashes() -> None:
    text = (REPO / "requirements.lock").read_text()
    pins = {
        canonicalize_name(name): version
        for name, version in re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)", text, re.M)
    }
    for name, req in requirements((REPO / "requirements.in").read_text()).items():
        assert name in pins, f"{name} missing from requirements.lock: regenerate it"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {req}"
    # Every pinned distribution carries at least one hash (pip --require-hashes needs them).
    blocks = re.split(r"^(?=[A-Za-z0-9_.-]+==)", text, flags=re.M)[1:]
    assert len(blocks) == len(pins)
    for block in blocks:
        assert "--hash=sha256:" in block, block.splitlines()[0]
