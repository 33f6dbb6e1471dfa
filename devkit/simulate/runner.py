"""Run the action the way the GitHub runner does, against a simulated AWS account.

The action runs as its own process (`python entrypoint.py`) with `INPUT_<NAME>` variables whose
names keep their hyphens, `GITHUB_OUTPUT` / `GITHUB_STEP_SUMMARY` / `GITHUB_STATE` files, and
`AWS_ENDPOINT_URL` pointing at the moto server. Used by the demo and the end-to-end tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from devkit.simulate.aws import PROJECT_ROOT, SimulatedAWS

ENTRYPOINT = PROJECT_ROOT / "entrypoint.py"
FAKE_SHA = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class ActionRun:
    returncode: int
    log: str
    outputs: dict[str, str]
    summary: str
    state: dict[str, str]


def parse_key_values(text: str) -> dict[str, str]:
    """Parse a GITHUB_OUTPUT / GITHUB_STATE file (`k=v` and `k<<DELIM ... DELIM`)."""
    values: dict[str, str] = {}
    lines = iter(text.splitlines())
    for line in lines:
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delimiter = line.split("<<", 1)
            body = []
            for inner in lines:
                if inner == delimiter:
                    break
                body.append(inner)
            values[name] = "\n".join(body)
        elif "=" in line:
            name, value = line.split("=", 1)
            values[name] = value
    return values


def runner_env(
    sim: SimulatedAWS, inputs: Mapping[str, str], workspace: Path, files: Path
) -> dict[str, str]:
    """The environment the runner gives a container action, for this account."""
    env = sim.env({k: v for k, v in os.environ.items() if not k.startswith(("INPUT_", "GITHUB_"))})
    files.mkdir(parents=True, exist_ok=True)
    env.update(
        {
            "GITHUB_ACTIONS": "true",
            "GITHUB_WORKSPACE": str(workspace),
            "GITHUB_OUTPUT": str(files / "output"),
            "GITHUB_STEP_SUMMARY": str(files / "summary"),
            "GITHUB_STATE": str(files / "state"),
            "GITHUB_SHA": FAKE_SHA,
            "GITHUB_SERVER_URL": "https://github.com",
            "GITHUB_REPOSITORY": "acme/production-platform",
            "GITHUB_RUN_ID": "1234567890",
            "PYTHONPATH": str(PROJECT_ROOT),
        }
    )
    for name, value in inputs.items():
        env[f"INPUT_{name.upper()}"] = value
    return env


def run_action(
    sim: SimulatedAWS,
    inputs: Mapping[str, str],
    workspace: Path,
    files: Path,
    *,
    timeout: float = 300,
    echo: bool = False,
    on_line: Callable[[str], None] | None = None,
    on_start: Callable[[subprocess.Popen[str]], None] | None = None,
) -> ActionRun:
    """Run the action as the runner does; `on_line` sees each line of its log as it comes, and
    `on_start` the process once started (to signal it, as a cancel would)."""
    env = runner_env(sim, inputs, workspace, files)
    for name in ("output", "summary", "state"):
        (files / name).write_text("")
    process = subprocess.Popen(
        [sys.executable, str(ENTRYPOINT)],
        cwd=workspace,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    if on_start is not None:
        on_start(process)
    watchdog = threading.Timer(timeout, process.kill)  # a hung action must not hang the tests
    watchdog.start()
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line)
            if echo:
                print(line, end="", flush=True)
        returncode = process.wait()
    finally:
        watchdog.cancel()
    return ActionRun(
        returncode=returncode,
        log="".join(lines),
        outputs=parse_key_values((files / "output").read_text()),
        summary=(files / "summary").read_text(),
        state=parse_key_values((files / "state").read_text()),
    )


def run_post_step(sim: SimulatedAWS, state: Mapping[str, str], inputs: Mapping[str, str]) -> str:
    """Run the post step (post.py) as the runner does after the main step, with the state the
    main step saved; its log. It always exits 0 (a backstop never fails the job)."""
    env = sim.env({k: v for k, v in os.environ.items() if not k.startswith(("INPUT_", "GITHUB_", "STATE_"))})
    env.update({f"STATE_{name}": value for name, value in state.items()})
    env.update({f"INPUT_{name.upper()}": value for name, value in inputs.items()})
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    post = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "post.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert post.returncode == 0, post.stdout + post.stderr
    return post.stdout + post.stderr
