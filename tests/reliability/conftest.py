"""Fixtures of the reliability suite: a simulated account whose API the action reaches through
a fault proxy, a small platform already running release v1, and the checks every fault test
ends with (nothing staged is left; every workload holds one release, old or new).

Each test gets its own account, master, proxy and workspace (ports chosen by the system), so
the tests are independent of one another and of the order they run in.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deploykit import stage
from devkit.simulate.aws import Master, SimulatedAWS
from devkit.simulate.cluster import Cluster
from devkit.simulate.faults import Call, Fault, FaultProxy
from devkit.simulate.runner import ENTRYPOINT, ActionRun, parse_key_values, runner_env
from tests import sample_platform as platform
from tests.reliability import figures
from tests.sample_platform import API, NS, WORKER
from tests.ssm_program import entry_point

WORKLOADS = (("deployment", NS, "api"), ("deployment", NS, "worker"))
# Seconds a test waits at most for commands still running on the master after the action ended
# (a rollback sent while cancelling, a deploy the action lost track of).
SETTLE_SECONDS = 90
# botocore's backoff between retries, compressed for the action processes of this suite (see
# tests/reliability/sitecustomize.py): the retry decisions stay botocore's own.
BACKOFF_SCALE = "0.05"
SITE = Path(__file__).resolve().parent / "site"


def manifests(progress_deadline: int = 3) -> dict[str, str]:
    """Small on purpose: a namespace, a config map and two one-replica deployments. A broken
    image fails the rollout after `progress_deadline` seconds."""
    return {
        "namespace.yaml": platform.namespace(),
        "config.yaml": platform.config_map(),
        "api.yaml": platform.deployment("api", API, progress_deadline=progress_deadline),
        "worker.yaml": platform.deployment("worker", WORKER, progress_deadline=progress_deadline),
    }


def release_yaml(tag: str) -> str:
    """The platform as release `tag` left it (seeded straight into the cluster: no deploy)."""
    return platform.pinned(manifests(), tag)


@dataclass
class Started:
    """An action process that is still running (for signals)."""

    process: subprocess.Popen[str]
    files: Path
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)

    def wait(self, timeout: float = 180) -> ActionRun:
        try:
            returncode = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            returncode = self.process.wait()
            self.lines.append(f"\n[test harness: killed after {timeout} s]\n")
        if self.reader is not None:
            self.reader.join(timeout=10)
        return ActionRun(
            returncode=returncode,
            log="".join(self.lines),
            outputs=parse_key_values((self.files / "output").read_text()),
            summary=(self.files / "summary").read_text(),
            state=parse_key_values((self.files / "state").read_text()),
        )


@dataclass
class Rig:
    """One simulated account and master, reached by the action through `proxy`."""

    sim: SimulatedAWS
    master: Master
    proxy: FaultProxy
    workspace: Path
    tmp: Path
    runs: int = 0

    @property
    def cluster(self) -> Cluster:
        return Cluster(self.master.cluster_state_path)

    def write_manifests(self, files: dict[str, str], folder: str = "k8s/base") -> Path:
        target = self.workspace / folder
        target.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (target / name).write_text(text)
        return target

    def slow_api_rollout(self, seconds: float) -> None:
        """The new api takes `seconds` to become ready, and that is no failure in itself."""
        self.write_manifests(manifests(progress_deadline=600))
        self.cluster.slow_rollout("deployment", NS, "api", seconds)

    def seed_release(self, tag: str = "v1") -> None:
        self.cluster.seed(release_yaml(tag))

    def fault(self, operation: str, kind: str, **kwargs: object) -> Fault:
        return self.proxy.add(operation, kind, **kwargs)  # type: ignore[arg-type]

    def on(
        self, operation: str, hook: Callable[[Call], bytes | None], *, after: int = 0, times: int | None = 1
    ) -> Fault:
        """Run `hook` when the action's call to `operation` arrives (before it is forwarded;
        bytes returned replace the request body)."""
        return self.proxy.add(operation, "hook", hook=hook, after=after, times=times)

    def install_on_master(self, name: str, script: str) -> Path:
        """An executable in the master's bin folder (a kubectl wrapper, say)."""
        path = self.master.bin_dir / name
        path.write_text(script)
        path.chmod(0o755)
        return path

    # -- running the action -------------------------------------------------------------------

    def inputs(self, **inputs: str) -> dict[str, str]:
        defaults = {
            "aws-region": self.sim.region,
            "images": f"{API}\n{WORKER}",
            "image-tag": "v2",
            "timeout": "30",
            "rollback-timeout": "20",
            "verify-images": "false",  # the rig's images are in no registry (tests/registry has real ones)
        }
        return {**defaults, **inputs}

    def start(self, **inputs: str) -> Started:
        self.runs += 1
        files = self.tmp / f"file_commands-{self.runs}"
        env = runner_env(self.sim, self.inputs(**inputs), self.workspace, files)
        env["AWS_ENDPOINT_URL"] = self.proxy.url
        env["PYTHONPATH"] = os.pathsep.join([str(SITE), env["PYTHONPATH"]])
        env["K3S_TEST_BACKOFF_SCALE"] = BACKOFF_SCALE
        for name in ("output", "summary", "state"):
            (files / name).write_text("")
        process = subprocess.Popen(
            [sys.executable, str(ENTRYPOINT)],
            cwd=self.workspace,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        started = Started(process, files)

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                started.lines.append(line)

        started.reader = threading.Thread(target=read, daemon=True)
        started.reader.start()
        return started

    def deploy(self, **inputs: str) -> ActionRun:
        return self.start(**inputs).wait()

    # -- what is left -------------------------------------------------------------------------

    def staged_buckets(self) -> list[str]:
        """Buckets this action made that still exist (looked up without the proxy)."""
        names = [b["Name"] for b in self.sim.client("s3").list_buckets().get("Buckets", [])]
        return [n for n in names if n.startswith(stage.BUCKET_PREFIX)]

    def settle(self, seconds: float = SETTLE_SECONDS) -> None:
        """Wait until every command sent to the master has ended."""
        self.sim.settle(seconds)

    def deploy_runs(self) -> list[dict[str, object]]:
        """Deploy commands (not rollbacks) the master really started."""
        return [run for run in self.sim.commands_run if entry_point(run["script"]) == "deploy"]

    def rollback_runs(self) -> list[dict[str, object]]:
        """Rollback commands the master really started."""
        return [run for run in self.sim.commands_run if entry_point(run["script"]) == "rollback"]

    def images(self) -> dict[tuple[str, str, str], str | None]:
        cluster = self.cluster
        return {w: cluster.image_of(*w) for w in WORKLOADS}

    # -- the checks every fault test ends with -------------------------------------------------

    def assert_nothing_left(self, run: ActionRun) -> None:
        """No staged bucket, no deploy state and no folder on the master: neither the download
        folder nor the script's scratch folder inside it, even after a SIGKILL of the script
        (the rollback command deletes what the kill left)."""
        self.settle()
        left = self.staged_buckets()
        assert left == [], f"staged buckets left behind: {left}\n{run.log}"
        kept = sorted(str(p.relative_to(self.master.state_dir)) for p in self.master.state_dir.rglob("*"))
        assert kept == [], f"the master kept a deploy's state: {kept}\n{self.master_log()}\n{run.log}"
        folders = [p.name for p in self.master.tmp_dir.iterdir()]
        assert folders == [], f"the master kept a download folder: {folders}\n{self.master_log()}"

    def master_log(self, tail: int = 4000) -> str:
        """What every command sent to the master printed (for failure messages)."""
        parts = []
        for sent in self.sim.sent_commands():
            for instance in sent["instance_ids"]:
                record = self.sim.invocation(sent["command_id"], instance)
                invocation = self.sim._invocations[(sent["command_id"], instance)]
                parts.append(
                    f"--- command {sent['command_id']} on {instance}: {record['Status']} "
                    f"(exit {record.get('ResponseCode')})\n"
                    + invocation.output("stdout")[-tail:]
                    + invocation.output("stderr")[-tail:]
                )
        return "\n".join(parts)

    def assert_one_release(self, run: ActionRun, old: str = "v1", new: str = "v2") -> str:
        """Every workload that existed before holds the old or the new release, all the same.
        Returns which."""
        self.settle()
        images = self.images()
        tags = {image.rsplit(":", 1)[1] if image else None for image in images.values()}
        assert len(tags) == 1 and tags <= {old, new}, f"mixed or unknown releases: {images}\n{run.log}"
        return next(iter(tags))  # type: ignore[return-value]


@pytest.fixture
def rig_options() -> dict[str, object]:
    """Keyword arguments of SimulatedAWS (override with @pytest.mark.parametrize indirect, or a
    fixture of the same name in a test module)."""
    return {}


@pytest.fixture
def rig(tmp_path: Path, request: pytest.FixtureRequest, rig_options: dict[str, object]) -> Iterator[Rig]:
    with SimulatedAWS(root=tmp_path / "aws", **rig_options) as sim:  # type: ignore[arg-type]
        master = sim.add_master("k3s-master")
        workspace = tmp_path / "workspace"
        workspace.mkdir()
        with FaultProxy(sim.endpoint_url) as proxy:
            r = Rig(sim, master, proxy, workspace, tmp_path)
            r.write_manifests(manifests())
            r.seed_release("v1")
            yield r
            figures.note_faults(request.node, proxy)


# The figures of docs/RELIABILITY.md: collected from every report, written at the end.
pytest_runtest_logreport = figures.pytest_runtest_logreport
pytest_deselected = figures.pytest_deselected


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    figures.write(session)
