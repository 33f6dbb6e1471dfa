"""Start-up pays only for what the run uses: the Docker SDK is imported only when building or
checking images, and nothing of the test simulation (moto) is ever imported by the action."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_modules(env: dict[str, str]) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(REPO / "entrypoint.py")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # bad input: failed, outputs written
    assert "input 'timeout'" in proc.stdout, proc.stdout
    # -X importtime lines: "import time: self [us] | cumulative | imported package"
    return {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def test_a_run_with_bad_input_imports_neither_docker_nor_moto(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "GITHUB_OUTPUT": str(tmp_path / "output"),
        "GITHUB_WORKSPACE": str(tmp_path),
        "INPUT_AWS-REGION": "eu-west-1",
        "INPUT_TIMEOUT": "abc",
    }
    modules = imported_modules(env)

    assert "deploykit.cli" in modules  # the measurement itself works
    tops = {name.split(".")[0] for name in modules}
    assert not tops & {"docker", "moto"}, sorted(m for m in modules if m.split(".")[0] in ("docker", "moto"))
    assert "status=failed" in (tmp_path / "output").read_text()
