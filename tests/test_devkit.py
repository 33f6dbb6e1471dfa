"""The product apart from its rig: the demo and the benchmark are `python -m devkit` commands,
the action's own command line no longer knows them, and the wheel packages `deploykit` alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    # devkit is never installed: the project root on PYTHONPATH finds it (and this checkout's
    # deploykit), whatever an editable install points at.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_devkit_runs_the_demo_and_the_benchmark() -> None:
    done = run("-m", "devkit", "--help")
    assert done.returncode == 0, done.stderr
    assert "demo" in done.stdout and "bench" in done.stdout
    bench = run("-m", "devkit", "bench", "--help")
    assert bench.returncode == 0 and "--quick" in bench.stdout, bench.stderr


def test_the_action_command_line_knows_neither_demo_nor_bench() -> None:
    done = run("-m", "deploykit", "--help")
    assert done.returncode == 0, done.stderr
    assert "deploy" in done.stdout and "sweep" in done.stdout
    assert "demo" not in done.stdout and "bench" not in done.stdout
    for command in ("demo", "bench"):
        refused = run("-m", "deploykit", command)
        assert refused.returncode == 2 and "invalid choice" in refused.stderr, refused.stderr


def test_the_wheel_and_the_product_package_hold_no_rig() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["packages"] == ["deploykit"]
    assert not (ROOT / "deploykit" / "simulate").exists()
    assert not {"bench.py", "demo.py", "release.py"} & {path.name for path in (ROOT / "deploykit").iterdir()}
    # The action never imports the rig.
    sources = "\n".join(path.read_text() for path in (ROOT / "deploykit").rglob("*.py"))
    assert "devkit" not in sources
