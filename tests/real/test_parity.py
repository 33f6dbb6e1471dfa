"""The kubectl double held to the real API: each scenario runs the deploy script against both,
and the outcomes must agree (exit code, result, rollback, each workload's result). The double
stays the fast embedded default (the demo, the e2e and reliability tiers); this is what keeps it
honest."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from devkit.simulate.cluster import Cluster
from tests.real.plane import (
    API_IMAGE,
    WORKER_IMAGE,
    ControlPlane,
    daemonset_doc,
    job_doc,
    platform_docs,
    redis_volume,
)
from tests.real.script import ScriptHost
from tests.test_deploy_script import Run

# Each scenario: the steps (tag, the entry point), all on one namespace.
SCENARIOS: dict[str, list[tuple[str, str]]] = {
    "first deploy, then an update": [("v1", "deploy"), ("v2", "deploy")],
    "a crash loop is rolled back": [("v1", "deploy"), ("crashloop", "deploy")],
    "an image that cannot be pulled is rolled back": [("v1", "deploy"), ("missing", "deploy")],
    "a config-only change": [("v1", "deploy"), ("v1-config", "deploy")],
    "a dry run changes nothing": [("v1", "deploy"), ("v2", "dry-run")],
    "a crash loop in a first deploy": [("crashloop", "deploy")],
    # TAG-daemonset: the platform at v1 beside a DaemonSet at TAG.
    "a daemonset's update, then its crash loop rolled back": [
        ("v1-daemonset", "deploy"), ("v2-daemonset", "deploy"), ("crashloop-daemonset", "deploy")],
    # TAG-job: the platform and a migration Job, all at TAG. The same Job again is not run; a
    # failing one stops the deploy before the Deployments.
    "a migration job runs, is kept, is replaced, and fails": [
        ("v1-job", "deploy"), ("v1-job", "deploy"), ("v2-job", "dry-run"), ("v2-job", "deploy"),
        ("crashloop-job", "deploy")],
    "a migration job whose image cannot be pulled": [("v1-job", "deploy"), ("missing-job", "deploy")],
}
BROKEN = {"crashloop": "CrashLoopBackOff", "missing": "ImagePullBackOff"}


def outcome(run: Run) -> dict[str, Any]:
    report = run.report
    return {
        "exit": run.code,
        "result": report["result"],
        "rollback": report.get("rollback"),
        "workloads": {w["name"]: w["result"] for w in report.get("workloads", [])},
        "jobs": {j["name"]: j["result"] for j in report.get("jobs", [])},
        "changes": sorted(c for c in report.get("changes", []) if c.startswith("job/")),
    }


def docs_for(ns: str, step: str) -> list[dict[str, Any]]:
    tag, _, change = step.partition("-")
    if change == "daemonset":
        return [*platform_docs(ns, "v1"), daemonset_doc(ns, f"{WORKER_IMAGE}:{tag}")]
    if change == "job":
        return [*platform_docs(ns, tag), job_doc(ns, f"{API_IMAGE}:{tag}")]
    docs = platform_docs(ns, tag)
    if change == "config":
        for doc in docs:
            if doc["kind"] == "ConfigMap":
                doc["data"]["LOG_LEVEL"] = "debug"
    return docs


def run_steps(host: ScriptHost, ns: str, steps: list[tuple[str, str]]) -> list[dict[str, Any]]:
    outcomes = []
    for number, (step, entry) in enumerate(steps):
        docs = docs_for(ns, step)
        if entry == "dry-run":
            outcomes.append(outcome(host.dry_run(docs, f"dry-{number}")))
        else:
            outcomes.append(outcome(host.deploy(docs, f"deploy-{number}")))
    return outcomes


def double_host(root: Path) -> ScriptHost:
    root.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(root / "cluster.json")
    bin_dir = root / "bin"
    cluster.install_kubectl(bin_dir)
    for tag, reason in BROKEN.items():
        for image in (API_IMAGE, WORKER_IMAGE):
            cluster.break_image(f"{image}:{tag}", reason)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBECTL_DOUBLE")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", KUBECTL_DOUBLE_STATE=str(cluster.path))
    return ScriptHost(root / "host", env)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_the_double_and_the_real_api_agree(
    scenario: str, control_plane: ControlPlane, ns: str, tmp_path: Path
) -> None:
    steps = SCENARIOS[scenario]
    redis_volume(control_plane, ns)
    real = run_steps(ScriptHost(tmp_path / "real", control_plane.env()), ns, steps)
    double = run_steps(double_host(tmp_path / "double"), ns, steps)

    assert double == real, f"{scenario}: the double says {double}, the real API {real}"


def secret_lines(diff: str) -> list[str]:
    """The changed lines of a Secret's diff that carry its data: kubectl shows `***` there."""
    return sorted(line for line in diff.splitlines()
                  if line[:1] in "+-" and line[1:].strip().startswith(("password:", "token:")))


def test_the_double_masks_secret_data_in_a_diff_as_kubectl_does(
    control_plane: ControlPlane, ns: str, tmp_path: Path
) -> None:
    """#15: a dry run's diff never shows a Secret's values. Real kubectl masks them; the
    double (the demo's and the fast tests' cluster) must too, the same way: a changed value as
    `*** (before)` / `*** (after)`, a new key as `***`. stringData is written into data."""
    def secret(**data: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db", "namespace": ns},
                "stringData": data}

    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
    seen = {}
    for name, host in (("real", ScriptHost(tmp_path / "real", control_plane.env())),
                       ("double", double_host(tmp_path / "double"))):
        assert host.deploy([namespace, secret(password="old-9f2")], "secret-1").code == 0
        dry = host.dry_run([namespace, secret(password="new-4c1", token="tok-7e3")], "dry-1")
        assert dry.code == 0, dry.stdout
        assert not any(value in dry.stdout for value in ("old-9f2", "new-4c1", "tok-7e3")), name
        seen[name] = secret_lines(dry.diff)

    assert seen["real"] == ["+  password: '*** (after)'", "+  token: '***'",
                            "-  password: '*** (before)'"], seen["real"]
    assert seen["double"] == seen["real"]


def wide_docs(ns: str, verbs: list[str]) -> list[dict[str, Any]]:
    """A namespace of the deploy's own, a ConfigMap in it, and two objects whose change reaches
    past it: a ClusterRole and a ConfigMap in kube-system."""
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": f"{ns}-reader"},
         "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": verbs}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{ns}-extra",
                                                              "namespace": "kube-system"},
         "data": {"owner": ns}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app", "namespace": ns},
         "data": {"LOG_LEVEL": "info"}},
    ]


def test_the_report_names_the_cluster_wide_and_kube_system_objects_a_deploy_changed(
    control_plane: ControlPlane, ns: str, tmp_path: Path
) -> None:
    """#15 finding 6: a deploy that creates or changes cluster-scoped objects (a Namespace, a
    ClusterRole) or objects in kube-system says so; one that leaves them as they are does not.
    The API says which kinds are cluster-scoped (kubectl api-resources); the double agrees."""
    steps = [["get"], ["get"], ["get", "list"]]
    expected = [
        [f"created ClusterRole/{ns}-reader", f"created ConfigMap kube-system/{ns}-extra",
         f"created Namespace/{ns}"],
        [],
        [f"changed ClusterRole/{ns}-reader"],
    ]
    seen = {}
    try:
        for name, host in (("real", ScriptHost(tmp_path / "real", control_plane.env())),
                           ("double", double_host(tmp_path / "double"))):
            seen[name] = []
            for number, verbs in enumerate(steps):
                run = host.deploy(wide_docs(ns, verbs), f"wide-{number}")
                assert run.code == 0, run.stdout
                seen[name].append(sorted(run.report.get("cluster_changes", [])))
    finally:
        control_plane.kubectl("delete", "clusterrole", f"{ns}-reader", "--ignore-not-found")
        control_plane.kubectl("delete", "configmap", "-n", "kube-system", f"{ns}-extra",
                              "--ignore-not-found")
    assert seen["real"] == expected, seen["real"]
    assert seen["double"] == seen["real"]


def test_the_double_knows_which_kinds_are_cluster_scoped_as_the_api_does(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """The script reads the cluster-scoped kinds from `kubectl api-resources`: every kind the
    double serves must be namespaced or not exactly as on the real API."""
    def scoped(env: dict[str, str]) -> dict[str, str]:
        kinds: dict[str, str] = {}
        for namespaced in ("true", "false"):
            done = subprocess.run(["kubectl", "api-resources", f"--namespaced={namespaced}",
                                   "--no-headers"], env=env, capture_output=True, text=True,
                                  timeout=60, check=True)
            for line in done.stdout.splitlines():
                kinds[line.split()[-1]] = namespaced
        return kinds

    real = scoped(control_plane.env())
    double = scoped(double_host(tmp_path / "double").env())
    assert double, "the double lists no kinds"
    assert {kind: real.get(kind) for kind in double} == double
