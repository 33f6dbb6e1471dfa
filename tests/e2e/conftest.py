"""End-to-end fixtures: a simulated AWS account with a K3s master, and a workspace of manifests.

The action runs as the runner runs it (its own process, INPUT_* with hyphens, GITHUB_* files);
the master side runs the real deploy script with the real AWS CLI and the kubectl double.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploykit.simulate.aws import Master, SimulatedAWS
from deploykit.simulate.cluster import Cluster
from deploykit.simulate.runner import ActionRun, run_action

API = "docker.io/acme/api"
WORKER = "docker.io/acme/worker"
NS = "production-platform"


def platform_manifests(progress_deadline: int = 3) -> dict[str, str]:
    """The original pipeline's platform, small: namespace, config, redis, api x2, worker x1."""
    def deployment(name: str, image: str, replicas: int) -> str:
        return f"""apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  namespace: {NS}
spec:
  replicas: {replicas}
  progressDeadlineSeconds: {progress_deadline}
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      containers:
        - name: {name}
          image: {image}:latest
"""

    return {
        "namespace.yaml": f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NS}\n",
        "config.yaml": (
            f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app-config\n  namespace: {NS}\n"
            "data:\n  LOG_LEVEL: info\n"
        ),
        "redis.yaml": f"""apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: redis
  namespace: {NS}
spec:
  replicas: 1
  serviceName: redis
  selector:
    matchLabels: {{app: redis}}
  template:
    metadata:
      labels: {{app: redis}}
    spec:
      containers:
        - name: redis
          image: redis:7-alpine
""",
        "api.yaml": deployment("api", API, 2),
        "worker.yaml": deployment("worker", WORKER, 1),
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
        defaults = {"aws-region": self.sim.region, "images": f"{API}\n{WORKER}", "timeout": "60"}
        return run_action(self.sim, {**defaults, **inputs}, self.workspace, self.files, timeout=240)

    def buckets(self) -> list[str]:
        return [b["Name"] for b in self.sim.client("s3").list_buckets().get("Buckets", [])]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with SimulatedAWS(root=tmp_path / "aws") as sim:
        master = sim.add_master("k3s-master")
        workspace = tmp_path / "workspace"
        workspace.mkdir()
        w = World(sim, master, workspace, tmp_path / "file_commands")
        w.write_manifests(platform_manifests())
        yield w
