"""Build the action's image once per session and run it the way the GitHub runner does.

These tests need a Docker engine. Starting one is CI's job (`bash .ci/docker-engine.sh`, run
by .ci/run); a missing engine fails the tests, it never skips them. Where no registry can be
pulled from, the image is built on the local stand-in for the official slim Python image made
by `.ci/base-image.sh` (set K3S_DEPLOY_BASE_IMAGE to build on another base, e.g.
python:3.12-slim where it can be pulled).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devkit.simulate.aws import Master, SimulatedAWS
from devkit.simulate.cluster import Cluster
from tests import sample_platform as platform
from tests.e2e.conftest import API, WORKER, platform_manifests

REPO = Path(__file__).resolve().parents[2]
ACTION_IMAGE = "k3s-deploy-action:test"
LOCAL_BASE_IMAGE = "k3s-deploy-base:bookworm"
BUILD_TIMEOUT_S = 900
ENGINE_HINT = "run `bash .ci/docker-engine.sh` (as root) first; .ci/run does it before the tests"

# Where the runner mounts things inside the action's container.
WORKSPACE = "/github/workspace"
FILE_COMMANDS = "/github/file_commands"
GITHUB_HOME = "/github/home"
GITHUB_WORKFLOW_DIR = "/github/workflow"
DOCKER_SOCK = "/var/run/docker.sock"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "container: builds and runs the action's Docker image (needs a Docker engine: "
        "bash .ci/docker-engine.sh)",
    )


def docker(
    *args: str, timeout: float = 300, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the docker CLI and capture its output (never raises on a non-zero exit).

    The default timeout is generous: with the vfs storage driver every `docker run` copies the
    whole image first, which took over 120 s on a CI machine loaded by parallel test runs."""
    exe = shutil.which("docker")
    if exe is None:
        pytest.fail(f"no docker client on PATH: {ENGINE_HINT}", pytrace=False)
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False)


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def image_id(name: str) -> str | None:
    proc = docker("image", "inspect", "--format", "{{.Id}}", name)
    return proc.stdout.strip() if proc.returncode == 0 else None


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """Fail (never skip) when no engine answers."""
    proc = docker("info", timeout=60)
    if proc.returncode != 0:
        pytest.fail(
            f"no Docker engine answers (`docker info`: {tail(proc.stderr, 5).strip()}): {ENGINE_HINT}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def base_image(docker_engine: None) -> str:
    """The image the action's Dockerfile is built FROM in these tests."""
    chosen = os.environ.get("K3S_DEPLOY_BASE_IMAGE", "").strip()
    if chosen:
        return chosen
    if image_id(LOCAL_BASE_IMAGE):
        return LOCAL_BASE_IMAGE
    proc = subprocess.run(
        ["bash", str(REPO / ".ci" / "base-image.sh")],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
        env={**os.environ, "BASE_IMAGE_NAME": LOCAL_BASE_IMAGE},
    )
    if proc.returncode != 0:
        pytest.fail(
            f"bash .ci/base-image.sh failed (exit {proc.returncode}):\n{tail(proc.stderr)}",
            pytrace=False,
        )
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def action_image(base_image: str) -> str:
    """Build the action's image from the repository root, once per session."""
    previous = image_id(ACTION_IMAGE)
    proc = docker(
        "build",
        "--network",
        "host",
        "--build-arg",
        f"BASE_IMAGE={base_image}",
        "-t",
        ACTION_IMAGE,
        str(REPO),
        timeout=BUILD_TIMEOUT_S,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"docker build failed (exit {proc.returncode}):\n{tail(proc.stdout)}\n{tail(proc.stderr)}",
            pytrace=False,
        )
    current = image_id(ACTION_IMAGE)
    if previous and previous != current:
        # The engine stores layers as full copies (vfs): drop our own superseded image.
        docker("image", "rm", previous)
    return ACTION_IMAGE


def parse_file_command(text: str) -> dict[str, str]:
    """Parse a GITHUB_OUTPUT / GITHUB_STATE / GITHUB_ENV file as the runner does.

    Lines are `name=value`, or `name<<DELIMITER`, the value's lines, then `DELIMITER`.
    """
    values: dict[str, str] = {}
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line:
            continue
        eq, heredoc = line.find("="), line.find("<<")
        if heredoc > 0 and (eq < 0 or heredoc < eq):
            name, delimiter = line[:heredoc], line[heredoc + 2 :]
            body: list[str] = []
            while i < len(lines) and lines[i] != delimiter:
                body.append(lines[i])
                i += 1
            if i >= len(lines):
                raise ValueError(f"file command {name!r}: delimiter {delimiter!r} never closed")
            i += 1
            values[name] = "\n".join(body)
        elif eq > 0:
            values[line[:eq]] = line[eq + 1 :]
        else:
            raise ValueError(f"file command line is neither name=value nor name<<DELIM: {line!r}")
    return values


@dataclass
class ActionRun:
    """What a workflow run would show of one step: exit code, log, outputs, summary."""

    returncode: int
    stdout: str
    stderr: str
    outputs: dict[str, str]
    state: dict[str, str]
    env_file: dict[str, str]
    summary: str
    command: list[str] = field(repr=False)

    @property
    def log(self) -> str:
        return self.stdout + self.stderr


def input_variable(name: str) -> str:
    """The runner's name for an input: upper-cased, spaces to `_`, hyphens kept."""
    return "INPUT_" + name.replace(" ", "_").upper()


RunAction = Callable[..., ActionRun]


@dataclass
class Launched:
    """A `docker run` of the action that is still going (see `start_action`)."""

    name: str
    process: subprocess.Popen[str]
    file_commands: Path
    logs: Path
    command: list[str] = field(repr=False)

    def wait(self, timeout: float = 120) -> ActionRun:
        """Wait for the container to end; a container still running after `timeout` is removed."""
        try:
            returncode = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            docker("rm", "--force", self.name)
            self.process.kill()
            self.process.wait()
            raise
        return ActionRun(
            returncode=returncode,
            stdout=(self.logs / "stdout").read_text(errors="replace"),
            stderr=(self.logs / "stderr").read_text(errors="replace"),
            outputs=parse_file_command((self.file_commands / "output").read_text()),
            state=parse_file_command((self.file_commands / "state").read_text()),
            env_file=parse_file_command((self.file_commands / "env").read_text()),
            summary=(self.file_commands / "summary").read_text(),
            command=self.command,
        )

    def state(self) -> dict[str, str]:
        """What the step has saved in GITHUB_STATE so far."""
        return parse_file_command((self.file_commands / "state").read_text())

    def signal(self, sig: str) -> subprocess.CompletedProcess[str]:
        """`docker kill -s SIG`: the signal goes to the container's PID 1, the action."""
        return docker("kill", "--signal", sig, self.name)

    def died_at(self, since: float) -> float:
        """When the container stopped (the engine's `die` event; epoch seconds). The `docker run`
        client returns later, once `--rm` has removed the container: with the vfs storage
        driver of CI machines that takes seconds, on a GitHub runner it does not."""
        proc = docker(
            "events",
            "--since",
            f"{since - 1:.3f}",
            "--until",
            f"{time.time() + 1:.3f}",
            "--filter",
            f"container={self.name}",
            "--filter",
            "event=die",
            "--format",
            "{{.TimeNano}}",
        )
        stamps = [int(line) for line in proc.stdout.split()]
        assert proc.returncode == 0 and stamps, f"no die event for {self.name}: {proc.stderr}"
        return stamps[0] / 1e9


StartAction = Callable[..., Launched]


def _launcher(action_image: str, tmp_path: Path) -> StartAction:
    counter = iter(range(1_000_000))

    def start(
        inputs: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        *,
        workspace: Path | None = None,
        network: str = "host",
        args: Sequence[str] = (),
        entrypoint: str | None = None,
        file_commands: Path | None = None,
    ) -> Launched:
        n = next(counter)
        host = tmp_path / f"runner-{n}"
        workspace = workspace or host / "workspace"
        file_commands = file_commands or host / "file_commands"
        home, workflow, logs = host / "home", host / "workflow", host / "logs"
        for folder in (workspace, file_commands, home, workflow, logs):
            folder.mkdir(parents=True, exist_ok=True)
        (workflow / "event.json").write_text("{}\n")
        files = {
            "GITHUB_OUTPUT": "output",
            "GITHUB_STATE": "state",
            "GITHUB_ENV": "env",
            "GITHUB_PATH": "path",
            "GITHUB_STEP_SUMMARY": "summary",
        }
        for file_name in files.values():
            (file_commands / file_name).touch()  # the runner creates them before the step

        container_env: dict[str, str] = {
            "HOME": GITHUB_HOME,
            "CI": "true",
            "GITHUB_ACTIONS": "true",
            "GITHUB_WORKSPACE": WORKSPACE,
            "GITHUB_EVENT_PATH": f"{GITHUB_WORKFLOW_DIR}/event.json",
            "GITHUB_EVENT_NAME": "workflow_dispatch",
            "GITHUB_REPOSITORY": "octo-org/platform",
            "GITHUB_REPOSITORY_OWNER": "octo-org",
            "GITHUB_SHA": "0123456789abcdef0123456789abcdef01234567",
            "GITHUB_REF": "refs/heads/main",
            "GITHUB_RUN_ID": "4242",
            "GITHUB_RUN_NUMBER": "7",
            "GITHUB_RUN_ATTEMPT": "1",
            "GITHUB_SERVER_URL": "https://github.com",
            "GITHUB_JOB": "deploy",
            "GITHUB_ACTION": "deploy",
            "RUNNER_OS": "Linux",
            "RUNNER_ARCH": "X64",
            "RUNNER_TEMP": "/home/runner/work/_temp",
            **{variable: f"{FILE_COMMANDS}/{name}" for variable, name in files.items()},
        }
        container_env.update(env or {})
        container_env.update({input_variable(k): v for k, v in (inputs or {}).items()})

        name = f"k3s-deploy-test-{uuid.uuid4().hex[:12]}"
        command = [
            "run",
            "--name",
            name,
            "--rm",
            "--network",
            network,
            "--workdir",
            WORKSPACE,
            "-v",
            f"{workspace}:{WORKSPACE}",
            "-v",
            f"{home}:{GITHUB_HOME}",
            "-v",
            f"{workflow}:{GITHUB_WORKFLOW_DIR}",
            "-v",
            f"{file_commands}:{FILE_COMMANDS}",
        ]
        if Path(DOCKER_SOCK).is_socket():
            command += ["-v", f"{DOCKER_SOCK}:{DOCKER_SOCK}"]
        if entrypoint is not None:  # as the runner runs pre- and post-entrypoints
            command += ["--entrypoint", entrypoint]
        for variable in container_env:
            command += ["-e", variable]
        command += [action_image, *args]

        exe = shutil.which("docker")
        if exe is None:
            pytest.fail(f"no docker client on PATH: {ENGINE_HINT}", pytrace=False)
        cli_env = {k: v for k, v in os.environ.items() if k in ("PATH", "DOCKER_HOST", "DOCKER_CONFIG")}
        cli_env.update(container_env)
        with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
            process = subprocess.Popen(
                [exe, *command], stdin=subprocess.DEVNULL, stdout=out, stderr=err, text=True, env=cli_env
            )
        return Launched(name, process, file_commands, logs, ["docker", *command])

    return start


@pytest.fixture
def start_action(action_image: str, tmp_path: Path) -> StartAction:
    """Start the action's image as the runner does and return at once (to signal it, say).

    Same arguments as `run_action`, plus `entrypoint` (the runner's `--entrypoint` for a
    post-entrypoint) and `file_commands` (reuse a step's folder, as the runner does for the
    post step).
    """
    return _launcher(action_image, tmp_path)


@pytest.fixture
def run_action(action_image: str, tmp_path: Path) -> RunAction:
    """Run the action's image with the runner's `docker run` arguments.

    `inputs` uses the names of action.yml (`{"aws-region": "eu-west-1"}`); `env` adds job
    environment (e.g. AWS credentials). Values travel as `-e NAME` with the value in the docker
    CLI's environment, as the runner passes them.
    """
    start = _launcher(action_image, tmp_path / "run")

    def run(*args: object, timeout: float = 120, **kwargs: object) -> ActionRun:
        return start(*args, **kwargs).wait(timeout)  # type: ignore[arg-type]

    return run


def image_config(image: str) -> dict:
    proc = docker("image", "inspect", image)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)[0]


# -- the simulated account these tests deploy to ------------------------------------------------


@dataclass
class World:
    sim: SimulatedAWS
    master: Master
    workspace: Path

    @property
    def cluster(self) -> Cluster:
        return Cluster(self.master.cluster_state_path)

    def aws_env(self) -> dict[str, str]:
        """The job environment the container gets: endpoint, credentials, region (AWS_* only)."""
        return {k: v for k, v in self.sim.env({}).items() if k.startswith("AWS_")}

    def inputs(self, **more: str) -> dict[str, str]:
        # the rig's images are in no registry (tests/registry checks real ones)
        return {"aws-region": self.sim.region, "images": f"{API}\n{WORKER}", "timeout": "240",
                "verify-images": "false", **more}

    def buckets(self) -> list[str]:
        return [b["Name"] for b in self.sim.client("s3").list_buckets().get("Buckets", [])]

    def deploy_commands(self) -> list[dict[str, Any]]:
        return [c for c in self.sim.sent_commands() if not c["comment"].startswith("k3s-deploy rollback ")]

    def rollback_commands(self) -> list[dict[str, Any]]:
        return [c for c in self.sim.sent_commands() if c["comment"].startswith("k3s-deploy rollback ")]

    def seed_v1(self, progress_deadline: int = 3) -> None:
        """The platform as a deploy of v1 left it a while ago (revision history included)."""
        manifests = platform_manifests(progress_deadline)
        self.cluster.seed(platform.pinned(manifests, "v1"))
        self.write_manifests(manifests)

    def write_manifests(self, files: dict[str, str]) -> None:
        target = self.workspace / "k8s" / "base"
        target.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (target / name).write_text(text)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with SimulatedAWS(root=tmp_path / "aws") as sim:
        master = sim.add_master("k3s-master")
        w = World(sim, master, tmp_path / "checkout")
        w.write_manifests(platform_manifests())
        yield w
