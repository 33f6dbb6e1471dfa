"""End-to-end fixtures: a simulated AWS account with a K3s master, and a workspace of manifests.

The action runs as the runner runs it (its own process, INPUT_* with hyphens, GITHUB_* files);
the master side runs the real deploy script with the real AWS CLI and the kubectl double.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devkit.simulate.aws import Master, SimulatedAWS
from devkit.simulate.cluster import Cluster
from devkit.simulate.runner import ActionRun, run_action
from tests import sample_platform as platform
from tests.sample_platform import API, NS, WORKER  # the suites import them from here too


def platform_manifests(progress_deadline: int = 3) -> dict[str, str]:
    """The original pipeline's platform, small: namespace, config, redis, api x2, worker x1."""
    return {
        "namespace.yaml": platform.namespace(),
        "config.yaml": platform.config_map(),
        "redis.yaml": platform.redis(),
        "api.yaml": platform.deployment("api", API, replicas=2, progress_deadline=progress_deadline),
        "worker.yaml": platform.deployment("worker", WORKER, progress_deadline=progress_deadline),
    }


@dataclass
class World:
    sim: SimulatedAWS
    master: Master
    workspace: Path
    files: Path

    @property
    def cluster(self) -> Cluster:
        return Cluster(self.master.cluster_state_path)

    def write_manifests(self, files: dict[str, str], folder: str = "k8s/base") -> None:
        target = self.workspace / folder
        target.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (target / name).write_text(text)

    def deploy(self, **inputs: str) -> ActionRun:
        # The rig's images (acme/*) are in no registry: tests/registry checks them against real ones.
        defaults = {"aws-region": self.sim.region, "images": f"{API}\n{WORKER}", "timeout": "60",
                    "verify-images": "false"}
        return run_action(self.sim, {**defaults, **inputs}, self.workspace, self.files, timeout=240)

    def buckets(self) -> list[str]:
        return [b["Name"] for b in self.sim.client("s3").list_buckets().get("Buckets", [])]

    @contextlib.contextmanager
    def cancelling_once_applied(self, image: str) -> Iterator[None]:
        """While the block runs, CancelCommand the last command sent (as someone in the console
        would, or as SSM does at an execution timeout) half a second after the api Deployment
        runs `image`: the script is stopped mid-rollout, before it can report."""
        ssm = self.sim.client("ssm")

        def cancel() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if self.cluster.image_of("deployment", NS, "api") == image:
                    time.sleep(0.5)
                    ssm.cancel_command(CommandId=self.sim.sent_commands()[-1]["command_id"])
                    return
                time.sleep(0.1)

        canceller = threading.Thread(target=cancel)
        canceller.start()
        try:
            yield
        finally:
            canceller.join()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with SimulatedAWS(root=tmp_path / "aws") as sim:
        master = sim.add_master("k3s-master")
        workspace = tmp_path / "workspace"
        workspace.mkdir()
        w = World(sim, master, workspace, tmp_path / "file_commands")
        w.write_manifests(platform_manifests())
        yield w
