"""The example platform under examples/: manifests, Dockerfiles and the two tiny apps.

The manifests are checked offline against the Kubernetes OpenAPI schemas that the
kubernetes-validate package ships, in strict mode (a misspelt or unknown field fails), then for
what the schemas cannot see: references between objects, the image repositories the action pins,
the restricted Pod Security settings, and the resource budget documented in
examples/production-platform/k8s/base/README.md.
"""

from __future__ import annotations

import copy
import http.client
import math
import os
import re
import select
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PLATFORM = EXAMPLES / "production-platform"
BASE = PLATFORM / "k8s" / "base"
NAMESPACE = "production-platform"
PART_OF = "app.kubernetes.io/part-of"

# Schemas to validate against: the oldest Kubernetes minor the example supports and a recent
# one (K3s follows upstream minors; its stable channel was on 1.33 when this was written).
KUBERNETES_VERSIONS = ("1.30.0", "1.33.0")

# The repositories the deploy action pins to the commit's tag (see k8s/base/README.md).
PINNED_REPOSITORIES = {
    "api": "docker.io/acme/production-platform-api",
    "worker": "docker.io/acme/production-platform-worker",
}


# ---------------------------------------------------------------------------------------------
# Loading


def manifest_files() -> list[Path]:
    """Kubernetes manifests: YAML under a `k8s` folder (workflows are linted elsewhere)."""
    return sorted(
        p
        for p in EXAMPLES.rglob("*")
        if p.suffix in (".yaml", ".yml") and p.is_file() and "k8s" in p.relative_to(EXAMPLES).parts
    )


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def all_documents(under: Path = EXAMPLES) -> list[tuple[str, dict[str, Any]]]:
    """(label, document) for every non-empty document under `under`."""
    found = []
    for path in manifest_files():
        if not path.is_relative_to(under):
            continue
        try:
            docs = load(path)
        except yaml.YAMLError:
            continue  # test_every_document_parses_as_a_kubernetes_object reports it
        for number, doc in enumerate(docs, start=1):
            if isinstance(doc, dict):
                found.append((f"{path.relative_to(ROOT)}#{number}", doc))
    return found


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def objects(kind: str, under: Path = EXAMPLES) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in all_documents(under) if doc.get("kind") == kind}


def workloads(under: Path = EXAMPLES) -> list[dict[str, Any]]:
    return [doc for _, doc in all_documents(under) if doc.get("kind") in ("Deployment", "StatefulSet")]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def split_image(image: str) -> tuple[str, str]:
    """(repository, tag) of an image reference without a digest."""
    name, _, tag = image.rpartition(":")
    if "/" in tag or not name:  # the colon was a registry port, there is no tag
        return image, ""
    return name, tag


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------------------------------------
# Parsing and schemas


def test_examples_hold_the_expected_manifests() -> None:
    names = {rel(p) for p in manifest_files()}
    base = "examples/production-platform/k8s/base/"
    scale = "examples/production-platform/k8s/scale/"
    expected = {
        *(
            base + f
            for f in (
                "namespace.yaml",
                "configmap.yaml",
                "redis.yaml",
                "api.yaml",
                "api-service.yaml",
                "worker.yaml",
            )
        ),
        *(scale + f for f in ("hpa.yaml", "pdb.yaml", "ingress.yaml")),
    }
    assert expected <= names, f"missing: {sorted(expected - names)}"


@pytest.mark.parametrize("path", manifest_files(), ids=rel)
def test_every_document_parses_as_a_kubernetes_object(path: Path) -> None:
    docs = load(path)
    assert docs, f"{rel(path)} holds no document"
    for number, doc in enumerate(docs, start=1):
        where = f"{rel(path)}, document {number}"
        assert isinstance(doc, dict), f"{where}: not a mapping"
        for field in ("apiVersion", "kind"):
            assert isinstance(doc.get(field), str) and doc[field], f"{where}: no {field}"
        metadata = doc.get("metadata")
        assert isinstance(metadata, dict) and isinstance(metadata.get("name"), str), (
            f"{where}: no metadata.name"
        )


def schema_errors(doc: dict[str, Any], version: str) -> str | None:
    """None when `doc` is valid for Kubernetes `version` in strict mode, else the error."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        return f"{path or '<root>'}: {exc.message}"
    except kubernetes_validate.SchemaNotFoundError as exc:
        return exc.message
    return None


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("label", "doc"), all_documents(), ids=[label for label, _ in all_documents()])
def test_manifest_is_valid_for_kubernetes(label: str, doc: dict[str, Any], version: str) -> None:
    error = schema_errors(doc, version)
    assert error is None, f"{label} is not a valid {doc.get('kind')} for Kubernetes {version}: {error}"


def test_the_schema_check_rejects_broken_manifests() -> None:
    """The validation above is strict: typos, wrong types and missing fields all fail."""
    api = objects("Deployment")["api"]
    version = KUBERNETES_VERSIONS[-1]
    assert schema_errors(api, version) is None

    typo = copy.deepcopy(api)
    typo["spec"]["template"]["spec"]["containers"][0]["resourcse"] = {}
    assert "resourcse" in (schema_errors(typo, version) or "")

    wrong_type = copy.deepcopy(api)
    wrong_type["spec"]["replicas"] = "two"
    assert schema_errors(wrong_type, version) is not None

    missing = copy.deepcopy(api)
    del missing["spec"]["selector"]
    assert schema_errors(missing, version) is not None

    unknown_kind = {"apiVersion": "apps/v1", "kind": "Deployent", "metadata": {"name": "x"}}
    assert schema_errors(unknown_kind, version) is not None


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_schemas_of_that_version_are_shipped(version: str) -> None:
    """kubernetes-validate falls back to an older minor it has; make sure it has this one."""
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    used = kubernetes_validate.validate(namespace, version, strict=True)
    assert used == version.rsplit(".", 1)[0], f"kubernetes-validate {kubernetes_validate.__version__}"


# ---------------------------------------------------------------------------------------------
# Conventions and cross-references


@pytest.mark.parametrize(("label", "doc"), all_documents(), ids=[label for label, _ in all_documents()])
def test_object_is_in_the_namespace_and_labelled(label: str, doc: dict[str, Any]) -> None:
    metadata = doc["metadata"]
    if doc["kind"] == "Namespace":
        assert metadata["name"] == NAMESPACE
    else:
        assert metadata.get("namespace") == NAMESPACE, f"{label}: metadata.namespace"
    assert (metadata.get("labels") or {}).get(PART_OF) == NAMESPACE, f"{label}: label {PART_OF}"


def test_api_and_worker_images_use_the_pinned_repositories() -> None:
    deployments = objects("Deployment")
    for name, repository in PINNED_REPOSITORIES.items():
        images = [c["image"] for c in containers(deployments[name])]
        assert [split_image(image)[0] for image in images] == [repository], (name, images)


def test_other_images_are_pinned_to_a_tag() -> None:
    for workload in workloads():
        for container in containers(workload):
            repository, tag = split_image(container["image"])
            if repository in PINNED_REPOSITORIES.values():
                continue  # the action sets the tag at deploy time
            assert tag and tag != "latest", f"{workload['metadata']['name']}: {container['image']}"


def test_selectors_services_and_references_agree() -> None:
    pod_labels = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in workloads()}
    ports = {
        w["metadata"]["name"]: {p.get("name") for c in containers(w) for p in c.get("ports", [])}
        | {p["containerPort"] for c in containers(w) for p in c.get("ports", [])}
        for w in workloads()
    }
    configmaps = objects("ConfigMap")
    services = objects("Service")

    for workload in workloads():
        name = workload["metadata"]["name"]
        assert matches(workload["spec"]["selector"]["matchLabels"], pod_labels[name]), name
        for container in containers(workload):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps, (name, source)

    for name, service in services.items():
        targets = [w for w, labels in pod_labels.items() if matches(service["spec"]["selector"], labels)]
        assert targets, f"Service {name} selects no pod template"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert all(target in ports[w] for w in targets), f"Service {name}: targetPort {target}"

    for name, statefulset in objects("StatefulSet").items():
        service = services[statefulset["spec"]["serviceName"]]
        assert service["spec"].get("clusterIP") == "None", f"{name}: its Service must be headless"

    for name, hpa in objects("HorizontalPodAutoscaler").items():
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["name"] in objects(ref["kind"]), f"HPA {name} targets a missing {ref}"

    for name, pdb in objects("PodDisruptionBudget").items():
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(matches(selector, labels) for labels in pod_labels.values()), f"PDB {name}"

    for name, ingress in objects("Ingress").items():
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                service = services[backend["name"]]
                port_names = {p.get("name") for p in service["spec"]["ports"]}
                port_numbers = {p["port"] for p in service["spec"]["ports"]}
                assert backend["port"].get("name") in port_names or (
                    backend["port"].get("number") in port_numbers
                ), f"Ingress {name}: {backend}"


@pytest.mark.parametrize("workload", workloads(), ids=lambda w: w["metadata"]["name"])
def test_workload_is_restricted_probed_and_bounded(workload: dict[str, Any]) -> None:
    """The namespace enforces the restricted Pod Security Standard; these settings meet it."""
    name = workload["metadata"]["name"]
    pod = workload["spec"]["template"]["spec"]
    pod_security = pod.get("securityContext", {})
    assert pod_security.get("runAsNonRoot") is True, name
    assert pod_security.get("runAsUser", 1) != 0, name
    assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
    for container in containers(workload):
        where = f"{name}/{container['name']}"
        security = container.get("securityContext", {})
        assert security.get("allowPrivilegeEscalation") is False, where
        assert security.get("readOnlyRootFilesystem") is True, where
        assert security.get("capabilities", {}).get("drop") == ["ALL"], where
        assert "readinessProbe" in container and "livenessProbe" in container, where
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{where}: {bound}"


def test_api_deployment_rolls_out_without_losing_capacity() -> None:
    api = objects("Deployment")["api"]
    spec = api["spec"]
    assert spec["replicas"] == 2
    assert spec["progressDeadlineSeconds"] == 300
    assert spec["revisionHistoryLimit"] >= 1
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    (container,) = spec["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        port = container[probe]["httpGet"]["port"]
        assert named.get(port, port) == 8080, probe


def test_redis_keeps_its_data_on_the_default_storage_class() -> None:
    redis = objects("StatefulSet")["redis"]
    assert redis["spec"]["replicas"] == 1
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert "storageClassName" not in claim["spec"], "leave it unset: K3s' default is local-path"
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert split_image(container["image"])[0] == "redis"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts.get(claim["metadata"]["name"]) == "/data"
    for probe in ("readinessProbe", "livenessProbe"):
        assert "redis-cli ping" in " ".join(container[probe]["exec"]["command"]), probe


# ---------------------------------------------------------------------------------------------
# The resource budget of k8s/base/README.md


def cpu_millis(value: str | int | float) -> int:
    text = str(value)
    return int(text[:-1]) if text.endswith("m") else round(float(text) * 1000)


def mebibytes(value: str | int) -> int:
    text = str(value)
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return round(float(text[: -len(suffix)]) * factor)
    return round(int(text) / 1024 / 1024)


def surge(workload: dict[str, Any]) -> int:
    """Extra pods a rolling update may add (Kubernetes' default maxSurge is 25%, rounded up)."""
    if workload["kind"] != "Deployment":
        return 0  # StatefulSets replace pods one at a time, never above `replicas`
    strategy = workload["spec"].get("strategy", {})
    if strategy.get("type") == "Recreate":
        return 0
    value = strategy.get("rollingUpdate", {}).get("maxSurge", "25%")
    replicas = workload["spec"].get("replicas", 1)
    if isinstance(value, str) and value.endswith("%"):
        return math.ceil(replicas * int(value[:-1]) / 100)
    return int(value)


def test_base_fits_the_documented_budget() -> None:
    """Sums the base's requests and limits; k8s/base/README.md shows the same numbers."""
    totals = dict.fromkeys(
        ("cpu_req", "mem_req", "mem_lim", "peak_cpu_req", "peak_mem_req", "peak_mem_lim"), 0
    )
    for workload in workloads(BASE):
        steady = workload["spec"].get("replicas", 1)
        peak = steady + surge(workload)
        for container in workload["spec"]["template"]["spec"]["containers"]:
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            for prefix, count in (("", steady), ("peak_", peak)):
                totals[prefix + "cpu_req"] += count * cpu_millis(requests["cpu"])
                totals[prefix + "mem_req"] += count * mebibytes(requests["memory"])
                totals[prefix + "mem_lim"] += count * mebibytes(limits["memory"])
    expected = {
        "cpu_req": 175,
        "mem_req": 224,
        "mem_lim": 448,
        "peak_cpu_req": 250,
        "peak_mem_req": 320,
        "peak_mem_lim": 640,
    }
    assert totals == expected, "resources changed: update the sizing section of k8s/base/README.md"
    readme = (BASE / "README.md").read_text(encoding="utf-8")
    for figure in ("175m", "224Mi", "448Mi", "250m / 320Mi", "640Mi"):
        assert figure in readme, f"k8s/base/README.md no longer shows {figure}"


# ---------------------------------------------------------------------------------------------
# Dockerfiles


DOCKERFILES = sorted((PLATFORM / "app").glob("*/Dockerfile"))


def tool(name: str) -> str:
    """A console script installed next to this interpreter (the project venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed: run `make setup` (it is in the dev extras)"
    return found


def test_both_apps_have_a_dockerfile() -> None:
    assert [p.parent.name for p in DOCKERFILES] == ["api", "worker"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "style", dockerfile.name],
        cwd=dockerfile.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_builds_offline_and_runs_as_the_manifest_user(dockerfile: Path) -> None:
    lines = [
        line.strip()
        for line in dockerfile.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines[0] == "ARG BASE_IMAGE=python:3.12-slim"
    assert lines[1] == "FROM ${BASE_IMAGE}"
    assert not [line for line in lines if line.split()[0] in ("RUN", "ADD")], (
        "the build must need no network: no RUN or ADD"
    )
    for line in lines:
        if line.startswith("COPY "):
            source = line.split()[1]
            assert (dockerfile.parent / source).is_file(), line
    (user,) = [line.split()[1] for line in lines if line.startswith("USER ")]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root user lets the kubelet check runAsNonRoot"
    deployment = objects("Deployment")[dockerfile.parent.name]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)
    (cmd,) = [line for line in lines if line.startswith("CMD ")]
    assert re.fullmatch(r'CMD \[(".*?",\s*)*".*?"\]', cmd), f"exec form expected: {cmd}"


# ---------------------------------------------------------------------------------------------
# The apps


class FakeRedis(socketserver.ThreadingTCPServer):
    """Answers +PONG to whatever it receives, like Redis to PING."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                if self.request.recv(64):
                    self.request.sendall(b"+PONG\r\n")

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def fake_redis() -> Iterator[FakeRedis]:
    server = FakeRedis()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def free_port_address() -> str:
    """An address on which nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def app_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "HTTP_", "HEARTBEAT_"))}
    env.update(PYTHONDONTWRITEBYTECODE="1", LOG_LEVEL="debug", **extra)
    return env


def start(script: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(proc: subprocess.Popen[str]) -> int:
    """SIGTERM, as the kubelet sends it; the exit code (the process is killed after 10 s)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_api_serves_health_and_readiness(fake_redis: FakeRedis) -> None:
    api = start(
        PLATFORM / "app" / "api" / "server.py",
        app_env(HTTP_HOST="127.0.0.1", HTTP_PORT="0", REDIS_ADDR=fake_redis.addr),
    )
    try:
        ready, _, _ = select.select([api.stdout], [], [], 10)
        line = api.stdout.readline() if ready else ""
        assert line.startswith("LISTENING "), f"no LISTENING line: {line!r}"
        port = int(line.split()[1])
        assert get(port, "/healthz") == 200
        assert get(port, "/readyz") == 200
        assert get(port, "/") == 200
        assert get(port, "/nope") == 404
        # Redis gone: not ready, but still alive (a restart would not bring Redis back).
        fake_redis.shutdown()
        fake_redis.server_close()
        assert get(port, "/readyz") == 503
        assert get(port, "/healthz") == 200
    finally:
        code = stop(api)
    assert code == 0, api.stderr.read() if api.stderr else ""


def test_api_is_not_ready_without_redis() -> None:
    api = start(
        PLATFORM / "app" / "api" / "server.py",
        app_env(HTTP_HOST="127.0.0.1", HTTP_PORT="0", REDIS_ADDR=free_port_address()),
    )
    try:
        ready, _, _ = select.select([api.stdout], [], [], 10)
        line = api.stdout.readline() if ready else ""
        port = int(line.split()[1])
        assert get(port, "/readyz") == 503
        assert get(port, "/healthz") == 200
    finally:
        assert stop(api) == 0


def test_worker_writes_its_heartbeat_once(tmp_path: Path, fake_redis: FakeRedis) -> None:
    heartbeat = tmp_path / "heartbeat"
    result = subprocess.run(
        [sys.executable, str(PLATFORM / "app" / "worker" / "worker.py"), "--once"],
        env=app_env(HEARTBEAT_FILE=str(heartbeat), REDIS_ADDR=fake_redis.addr),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert heartbeat.is_file()
    assert "PONG" in result.stderr


def test_worker_keeps_beating_without_redis_and_stops_on_sigterm(tmp_path: Path) -> None:
    heartbeat = tmp_path / "heartbeat"
    worker = start(
        PLATFORM / "app" / "worker" / "worker.py",
        app_env(
            HEARTBEAT_FILE=str(heartbeat),
            REDIS_ADDR=free_port_address(),
            WORKER_INTERVAL_SECONDS="0.1",
        ),
    )
    try:
        deadline = time.monotonic() + 10
        while not heartbeat.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert heartbeat.exists(), "no heartbeat"
        first = heartbeat.stat().st_mtime_ns
        while heartbeat.stat().st_mtime_ns == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert heartbeat.stat().st_mtime_ns != first, "the heartbeat is not refreshed"
    finally:
        code = stop(worker)
    assert code == 0
    assert "unreachable" in (worker.stderr.read() if worker.stderr else "")


# ---------------------------------------------------------------------------------------------
# YAML style


def test_yaml_is_yamllint_clean() -> None:
    result = subprocess.run(
        [tool("yamllint"), "--strict", "-c", str(ROOT / ".yamllint.yaml"), str(EXAMPLES)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
