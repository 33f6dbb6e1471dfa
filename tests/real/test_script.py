"""The deploy script's scenarios on the real API (the script run as the staged command lines
run it: bash, its options, a state dir; real kubectl, a real API server and controllers)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.real.plane import (
    API_IMAGE,
    LOCK,
    WORKER_IMAGE,
    ControlPlane,
    daemonset_doc,
    platform_docs,
    redis_volume,
)
from tests.real.script import ScriptHost

# How long a crash loop may run before the deploy says so: the kubelet restarts a crashing
# container after 10 s, and the script calls it a loop at its second restart.
FAIL_FAST_BOUND_S = 40


@pytest.fixture
def host(control_plane: ControlPlane, tmp_path: Path) -> ScriptHost:
    return ScriptHost(tmp_path, control_plane.env())


def workload_results(run: Any) -> dict[str, str]:
    return {w["name"]: w["result"] for w in run.report["workloads"]}


def test_example_platform_first_deploy_update_and_crash_loop_rolled_back(
    control_plane: ControlPlane, host: ScriptHost, ns: str
) -> None:
    redis_volume(control_plane, ns)

    first = host.deploy(platform_docs(ns, "v1"), "first")
    assert first.code == 0, first.stdout
    assert first.report["result"] == "success"
    assert workload_results(first) == {"redis": "ready", "api": "ready", "worker": "ready"}
    assert control_plane.image_of("deployment", ns, "api") == f"{API_IMAGE}:v1"

    update = host.deploy(platform_docs(ns, "v2"), "update")
    assert update.code == 0, update.stdout
    assert control_plane.image_of("deployment", ns, "api") == f"{API_IMAGE}:v2"
    assert control_plane.revision("deployment", ns, "api") == "2"
    assert control_plane.lock_holder() == ""

    process = host.start(platform_docs(ns, "crashloop"), "crash")
    applied, undone = _watch_image(control_plane, ns, "api", f"{API_IMAGE}:crashloop")
    crash = host.finished(process)
    assert crash.code == 7, crash.stdout
    report = crash.report
    assert report["rollback"] == "done"
    assert report["failure"]["reason"] == "CrashLoopBackOff", report
    assert report["failure"]["log"], report
    # Rolled back to v2 (the undo restores the template, under a new revision).
    assert control_plane.image_of("deployment", ns, "api") == f"{API_IMAGE}:v2"
    assert control_plane.image_of("deployment", ns, "worker") == f"{WORKER_IMAGE}:v2"
    assert control_plane.lock_holder() == ""
    print(f"crash loop: applied -> undone in {undone - applied:.1f} s")
    assert undone - applied < FAIL_FAST_BOUND_S, crash.stdout


def _watch_image(plane: ControlPlane, ns: str, name: str, image: str) -> tuple[float, float]:
    """When the Deployment got `image` and when it lost it again (monotonic seconds)."""
    applied = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        now = time.monotonic()
        current = plane.image_of("deployment", ns, name)
        if applied is None and current == image:
            applied = now
        elif applied is not None and current != image:
            return applied, now
        time.sleep(0.2)
    raise AssertionError(f"deployment/{name} never went to {image} and back")


AGENT_IMAGE = "docker.io/acme/node-agent"


def _agent_docs(ns: str, tag: str) -> list[dict[str, Any]]:
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {
        "pod-security.kubernetes.io/enforce": "restricted"}}}
    return [namespace, daemonset_doc(ns, f"{AGENT_IMAGE}:{tag}")]


def _agent_pods(plane: ControlPlane, ns: str) -> dict[str, tuple[str, bool]]:
    """node -> (image, ready) of the DaemonSet's pods that are not on their way out."""
    return {p["spec"].get("nodeName", ""): (
        p["spec"]["containers"][0]["image"],
        all(s.get("ready") for s in p["status"].get("containerStatuses") or [{}]))
        for p in plane.items("pods", ns) if not p["metadata"].get("deletionTimestamp")}


def test_a_daemonset_reaches_every_node_and_a_crash_loop_goes_back_to_its_revision(
    control_plane: ControlPlane, host: ScriptHost, ns: str
) -> None:
    first = host.deploy(_agent_docs(ns, "v1"), "agent-1")
    assert first.code == 0, first.stdout
    agent = first.workload("node-agent")
    assert (agent["kind"], agent["desired"], agent["ready"], agent["updated"], agent["result"]) == (
        "daemonset", 2, 2, 2, "ready"), first.stdout
    assert agent["revision_after"] == control_plane.revision("daemonset", ns, "node-agent")
    assert _agent_pods(control_plane, ns) == {
        "kwok-node-0": (f"{AGENT_IMAGE}:v1", True), "kwok-node-1": (f"{AGENT_IMAGE}:v1", True)}

    update = host.deploy(_agent_docs(ns, "v2"), "agent-2")
    assert update.code == 0, update.stdout
    before = control_plane.revision("daemonset", ns, "node-agent")
    assert update.workload("node-agent")["revision_after"] == before != agent["revision_after"]

    crash = host.deploy(_agent_docs(ns, "crashloop"), "agent-3")

    assert crash.code == 7, crash.stdout
    report = crash.report
    assert (report["rollback"], report["failure"]["reason"]) == ("done", "CrashLoopBackOff"), report
    assert report["failure"]["workload"] == "daemonset/node-agent"
    assert report["failure"]["log"] == ["k3s-deploy-test: container crashed (exit 1)"]
    rolled = crash.workload("node-agent")
    assert (rolled["result"], rolled["revision_before"], rolled["ready"], rolled["desired"]) == (
        "rolled-back", before, 2, 2), crash.stdout
    # Back to v2 (the revision recorded before), not merely "previous", on both nodes.
    assert control_plane.image_of("daemonset", ns, "node-agent") == f"{AGENT_IMAGE}:v2"
    assert control_plane.revision("daemonset", ns, "node-agent") == before
    status = (control_plane.get("daemonset", ns, "node-agent") or {})["status"]
    assert (status["desiredNumberScheduled"], status["numberReady"],
            status["updatedNumberScheduled"], status["numberAvailable"]) == (2, 2, 2, 2), status
    control_plane.wait_for("the crashed pod to be gone", lambda: _agent_pods(control_plane, ns) == {
        "kwok-node-0": (f"{AGENT_IMAGE}:v2", True), "kwok-node-1": (f"{AGENT_IMAGE}:v2", True)})
    assert control_plane.lock_holder() == ""


def test_a_new_daemonset_that_crash_loops_is_left_as_applied_with_no_history(
    control_plane: ControlPlane, host: ScriptHost, ns: str
) -> None:
    """kubectl's undo of a DaemonSet with one ControllerRevision says "no last revision to roll
    back to", as a StatefulSet's does: the script reads it as nothing to go back to."""
    run = host.deploy(_agent_docs(ns, "crashloop"), "agent-new")

    assert run.code == 9, run.stdout
    assert run.report["failure"]["reason"] == "CrashLoopBackOff", run.report
    assert "daemonset/node-agent: no earlier revision (new in this deploy), left as applied" in (
        run.stdout)
    assert run.workload("node-agent")["result"] == "failed"
    assert control_plane.image_of("daemonset", ns, "node-agent") == f"{AGENT_IMAGE}:crashloop"
    assert control_plane.lock_holder() == ""


def test_bundle_whose_phases_hold_several_documents_deploys_into_new_namespaces(
    control_plane: ControlPlane, host: ScriptHost, namespaces: Any
) -> None:
    """Real kubectl lists a multi-document file back as ONE v1 List: the check must not rely
    on it (finding 1). Two new namespaces, so the namespaces, config, services and workloads
    phases all hold several documents."""
    first, second = namespaces("a"), namespaces("b")
    docs: list[dict[str, Any]] = []
    for name in (first, second):
        docs += [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
            {"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": "settings", "namespace": name}, "data": {"A": "1"}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": name},
             "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}},
            _deployment("web", name, "nginx:1"),
            _deployment("jobs", name, "nginx:1"),
        ]

    run = host.deploy(docs, "multi")

    assert run.code == 0, run.stdout
    assert len(run.report["workloads"]) == 4
    for name in (first, second):
        assert control_plane.get("deployment", name, "web") is not None


def _deployment(name: str, namespace: str, image: str, replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": name, "image": image}]}}},
    }


def test_kubectl_log_lines_on_stderr_neither_break_the_deploy_nor_keep_the_lock(
    control_plane: ControlPlane, host: ScriptHost, ns: str
) -> None:
    """Finding 2: kubectl writes klog lines to stderr ("E1201 ... memcache.go:265] couldn't get
    resource list ..." on K3s while metrics-server is down after a reboot); the script once
    took them for data (the lock's resourceVersion: exit 4; or a release that failed and kept
    the lock for its whole lease).

    An APIService whose service has no endpoints is registered as the issue describes, but
    kubectl 1.37 against this API server (aggregated discovery marks the group Stale, with no
    resources) prints nothing for it: seen here, not assumed. So kubectl is also made to log
    on every call (`-v=1`, the same klog lines on the same stream)."""
    control_plane.apply([
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "metrics-stand-in", "namespace": "kube-system"},
         "spec": {"ports": [{"port": 443}]}},
        {"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
         "metadata": {"name": "v1beta1.metrics.example.com"},
         "spec": {"group": "metrics.example.com", "version": "v1beta1",
                  "service": {"name": "metrics-stand-in", "namespace": "kube-system"},
                  "insecureSkipTLSVerify": True, "groupPriorityMinimum": 100,
                  "versionPriority": 100}},
    ])
    try:
        noisy = control_plane.kubectl("-v=1", "get", "lease", "-n", "kube-system", check=False)
        assert re.search(r"^I\d{4} ", noisy.stderr, re.M), noisy.stderr
        redis_volume(control_plane, ns)

        run = host.deploy(platform_docs(ns, "v1"), "noisy", kubectl="kubectl -v=1")

        assert run.code == 0, run.stdout
        assert "kubectl: I" in run.stdout  # logged, not parsed
        assert control_plane.lock_holder() == ""
        again = host.deploy(platform_docs(ns, "crashloop"), "noisy-2", kubectl="kubectl -v=1")
        assert again.code == 7, again.stdout
        assert again.report["failure"]["log"] == ["k3s-deploy-test: container crashed (exit 1)"]
        assert control_plane.lock_holder() == ""
    finally:
        control_plane.kubectl("delete", "apiservice", "v1beta1.metrics.example.com",
                              "--ignore-not-found", check=False)
        control_plane.kubectl("delete", "service", "metrics-stand-in", "-n", "kube-system",
                              "--ignore-not-found", check=False)


def test_pods_left_in_phase_failed_do_not_fail_the_next_deploy(
    control_plane: ControlPlane, host: ScriptHost, ns: str
) -> None:
    """An evicted pod stays, phase Failed, owned by its ReplicaSet, until pod garbage collection
    (finding 3): it is not one of the workload's pods that must be healthy."""
    redis_volume(control_plane, ns)
    assert host.deploy(platform_docs(ns, "v1"), "before").code == 0
    pod = control_plane.items("pods", ns)
    evicted = next(p["metadata"]["name"] for p in pod if p["metadata"]["name"].startswith("api-"))
    control_plane.kubectl(
        "patch", "pod", evicted, "-n", ns, "--subresource=status", "--type=merge", "-p",
        json.dumps({"status": {"phase": "Failed", "reason": "Evicted",
                               "message": "The node was low on resource: memory."}}))
    control_plane.wait_for("the evicted pod's replacement", lambda: _ready(control_plane, ns))

    run = host.deploy(platform_docs(ns, "v2"), "after")

    assert run.code == 0, run.stdout
    phases = {p["metadata"]["name"]: p["status"]["phase"] for p in control_plane.items("pods", ns)}
    assert phases[evicted] == "Failed"


def _ready(plane: ControlPlane, ns: str) -> bool:
    api = plane.get("deployment", ns, "api") or {}
    return api.get("status", {}).get("readyReplicas") == 2


def test_a_pod_whose_owner_reference_is_crafted_runs_nothing_on_the_master(
    control_plane: ControlPlane, host: ScriptHost, ns: str, tmp_path: Path
) -> None:
    """Security finding 1: anyone who may create pods in a watched namespace can write any text
    into a pod's ownerReferences (the API server only wants them non-empty). The script once
    split such text out of a line and evaluated a field in bash arithmetic: root on the master."""
    marker = tmp_path / "pwned"
    redis_volume(control_plane, ns)
    assert host.deploy(platform_docs(ns, "v1"), "before").code == 0
    rs = next(r for r in control_plane.items("replicasets", ns)
              if r["metadata"]["name"].startswith("api-"))
    # In the kind: the garbage collector cannot map it, so it leaves the pod alone (an owner
    # name it cannot find would make it delete the pod as an orphan).
    payload = (f"ReplicaSet|api-x|2999-01-01T00:00:00Z|x||Running|false|"
               f"BASH_VERSINFO[$(touch${{IFS}}{marker})]|")
    control_plane.apply([{
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "planted", "namespace": ns, "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": payload, "name": "api-x",
            "uid": rs["metadata"]["uid"], "controller": False}]},
        "spec": {"containers": [{"name": "c", "image": "nginx:1", "securityContext": {
                     "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
                 "securityContext": {"runAsNonRoot": True, "runAsUser": 1000,
                                     "seccompProfile": {"type": "RuntimeDefault"}}},
    }])
    # A rollout long enough for the fail-fast check (every 3 s) to list the pods.
    docs = platform_docs(ns, "v2")
    for doc in docs:
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "api":
            doc["spec"]["minReadySeconds"] = 8

    run = host.deploy(docs, "after")

    assert not marker.exists(), "a pod's metadata ran a command on the master"
    assert run.code == 0, run.stdout
    # The watch did list the pods while the rollout went on, and the planted pod was there
    # (else this proves nothing).
    assert "Waiting for deployment \"api\" rollout to finish" in run.stdout, run.stdout
    assert control_plane.get("pod", ns, "planted") is not None


def test_a_cancel_mid_rollout_undoes_the_change_and_releases_the_lock_at_once(
    control_plane: ControlPlane, host: ScriptHost, ns: str
) -> None:
    redis_volume(control_plane, ns)
    assert host.deploy(platform_docs(ns, "v1"), "before").code == 0
    docs = platform_docs(ns, "v2")
    for doc in docs:
        if doc["kind"] == "Deployment":
            doc["spec"]["minReadySeconds"] = 60
    process = host.start(docs, "cancelled")
    control_plane.wait_for("the deploy to apply",
                           lambda: control_plane.revision("deployment", ns, "worker") == "2")
    time.sleep(1)
    signalled = time.monotonic()
    os.killpg(process.pid, signal.SIGTERM)
    run = host.finished(process, timeout=30)
    took = time.monotonic() - signalled

    assert run.code == 143, run.stdout
    assert "undos sent, not waited for" in run.stdout, run.stdout
    assert took < 7, f"{took:.1f} s\n{run.stdout}"
    assert control_plane.image_of("deployment", ns, "api") == f"{API_IMAGE}:v1"
    assert control_plane.image_of("deployment", ns, "worker") == f"{WORKER_IMAGE}:v1"
    assert control_plane.lock_holder() == ""


def test_two_deploys_racing_for_the_lock_never_both_apply(
    control_plane: ControlPlane, host: ScriptHost, ns: str
) -> None:
    redis_volume(control_plane, ns)
    assert host.deploy(platform_docs(ns, "v1"), "before").code == 0
    runs = [host.start(platform_docs(ns, tag), f"race-{tag}", lock_timeout=0)
            for tag in ("v2", "v3")]

    results = [host.finished(process) for process in runs]

    assert sorted(run.code for run in results) == [0, 6], [run.stdout for run in results]
    winner = next(run for run in results if run.code == 0)
    loser = next(run for run in results if run.code == 6)
    assert f"deploy {winner.report['deploy_id']} since " in loser.report["message"]
    tag = winner.report["deploy_id"].removeprefix("race-")
    assert control_plane.image_of("deployment", ns, "api") == f"{API_IMAGE}:{tag}"
    assert control_plane.lock_holder() == ""


@pytest.mark.parametrize("lagging", [False, True], ids=["as-it-comes", "crd-status-lagging"])
def test_a_crd_and_objects_of_its_kind_deploy_in_one_bundle(
    control_plane: ControlPlane, host: ScriptHost, ns: str, tmp_path: Path, lagging: bool
) -> None:
    """`lagging`: right after the create, before any condition is written, real kubectl's `wait
    --for=condition=established` fails at once with ".status.conditions accessor error" (seen
    in a CI run on a loaded machine). The first such wait is made to answer that way."""
    options: dict[str, str] = {}
    if lagging:
        wrapper = tmp_path / "kubectl-lagging"
        once = tmp_path / "answered"
        wrapper.write_text(
            "#!/bin/sh\n"
            f'if [ "$1" = wait ] && [ ! -e {once} ]; then : > {once}; '
            "echo 'error: .status.conditions accessor error: <nil> is of the type <nil>, "
            "expected []interface{}' >&2; exit 1; fi\n"
            f'exec {control_plane.kubectl_path} "$@"\n')
        wrapper.chmod(0o755)
        options["kubectl"] = str(wrapper)
    group = f"{ns}.example.com"
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": f"widgets.{group}"},
           "spec": {"group": group, "scope": "Namespaced",
                    "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
                    "versions": [{"name": "v1", "served": True, "storage": True, "schema": {
                        "openAPIV3Schema": {"type": "object", "properties": {"spec": {
                            "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}}}]}}
    widgets = [{"apiVersion": f"{group}/v1", "kind": "Widget",
                "metadata": {"name": name, "namespace": ns}, "spec": {"size": 3}}
               for name in ("dashboard", "sidebar")]
    redis_volume(control_plane, ns)
    try:
        run = host.deploy([*platform_docs(ns, "v1"), crd, *widgets], "crd", **options)

        assert run.code == 0, run.stdout
        if lagging:
            assert "accessor error" in run.stdout
        got = control_plane.kubectl("get", f"widgets.{group}", "-n", ns, "-o", "name").stdout
        assert sorted(got.split()) == [f"widget.{group}/dashboard", f"widget.{group}/sidebar"]
    finally:
        control_plane.kubectl("delete", "crd", f"widgets.{group}", "--wait=false",
                              "--ignore-not-found", check=False)


def test_a_dry_run_shows_the_diff_and_changes_nothing(
    control_plane: ControlPlane, host: ScriptHost, ns: str
) -> None:
    redis_volume(control_plane, ns)
    assert host.deploy(platform_docs(ns, "v1"), "before").code == 0
    docs = platform_docs(ns, "v2")
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            doc["data"]["LOG_LEVEL"] = "debug"
    before = control_plane.get("deployment", ns, "api")

    run = host.dry_run(docs, "dry")

    assert run.code == 0, run.stdout
    report = run.report
    assert (report["mode"], report["result"]) == ("dry-run", "success")
    assert sorted(report["changes"]) == sorted([
        f"apps.v1.Deployment.{ns}.api", f"apps.v1.Deployment.{ns}.worker",
        f"v1.ConfigMap.{ns}.production-platform-config"]), report["changes"]
    assert f"+        image: {API_IMAGE}:v2" in run.diff, run.diff
    assert "+  LOG_LEVEL: debug" in run.diff, run.diff
    after = control_plane.get("deployment", ns, "api")
    assert after is not None and before is not None
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert control_plane.get(*("lease", "kube-system", "k3s-deploy-lock")) is None or (
        control_plane.lock_holder() == "")


def _kill_once_recorded(host: ScriptHost, docs: list[dict[str, Any]], deploy_id: str) -> None:
    """Starts a deploy and SIGKILLs its process group (SSM's executionTimeout: no trap runs)
    once it recorded the revisions it applied."""
    process = host.start(docs, deploy_id)
    applied = host.state_root / deploy_id / "applied.tsv"
    try:
        deadline = time.monotonic() + 60
        while not applied.exists():
            assert time.monotonic() < deadline, "the deploy never recorded what it applied"
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=30)


def _with(docs: list[dict[str, Any]], kind: str, name: str, image: str | None = None,
          min_ready: int | None = None) -> list[dict[str, Any]]:
    for doc in docs:
        if (doc["kind"], doc["metadata"]["name"]) == (kind, name):
            if image:
                doc["spec"]["template"]["spec"]["containers"][0]["image"] = image
            if min_ready is not None:
                doc["spec"]["minReadySeconds"] = min_ready
    return docs


def _someone_sets(plane: ControlPlane, ns: str, kind: str, name: str, image: str) -> None:
    """Another deploy's change, made after the first one's lease ran out (its own spec: no
    minReadySeconds)."""
    current = plane.get(kind, ns, name)
    assert current is not None
    container = current["spec"]["template"]["spec"]["containers"][0]["name"]
    patch = {"spec": {"minReadySeconds": 0, "template": {"spec": {"containers": [
        {"name": container, "image": image}]}}}}
    plane.kubectl("patch", kind, name, "-n", ns, "--type=strategic", "-p", json.dumps(patch))


def test_a_rollback_leaves_alone_a_deployment_someone_else_changed_since(
    control_plane: ControlPlane, host: ScriptHost, ns: str
) -> None:
    """#15 finding 2 on the real API: deploy A is killed after its apply; deploy B moves api on
    before A's rollback runs. A's rollback must leave B's api as it is."""
    redis_volume(control_plane, ns)
    assert host.deploy(platform_docs(ns, "v1"), "before").code == 0
    docs = _with(platform_docs(ns, "v1"), "Deployment", "api", f"{API_IMAGE}:v2", min_ready=60)
    _kill_once_recorded(host, docs, "deploy-a")
    _someone_sets(control_plane, ns, "deployment", "api", f"{API_IMAGE}:v3")
    control_plane.wait_for("api's revision 3",
                           lambda: control_plane.revision("deployment", ns, "api") == "3")

    run = host.rollback("deploy-a")

    assert run.code == 12, run.stdout
    assert "changed by someone else since this deploy applied it (revision 2, now 3)" in run.stdout
    assert workload_results(run)["api"] == "changed-by-another"
    assert control_plane.image_of("deployment", ns, "api") == f"{API_IMAGE}:v3"
    assert control_plane.lock_holder() == ""


def test_a_statefulset_goes_back_to_the_exact_revision_recorded_before(
    control_plane: ControlPlane, host: ScriptHost, ns: str
) -> None:
    """#15 finding 2 on the real API: between deploy S (killed) and its rollback, someone moves
    redis to r3 and back to S's r2: the same template, so the same ControllerRevision, given
    the next number by the controller. `rollout undo` to "previous" gives r3; the rollback
    must give back r1, the revision it recorded."""
    redis_volume(control_plane, ns)
    images = {tag: f"docker.io/library/redis:{tag}" for tag in ("r1", "r2", "r3")}
    assert host.deploy(_with(platform_docs(ns, "v1"), "StatefulSet", "redis", images["r1"]),
                       "before").code == 0
    docs = _with(platform_docs(ns, "v1"), "StatefulSet", "redis", images["r2"], min_ready=60)
    _kill_once_recorded(host, docs, "deploy-s")
    applied = (host.state_root / "deploy-s" / "applied.tsv").read_text()
    ours = control_plane.revision("statefulset", ns, "redis")
    assert f"statefulset/{ns}/redis\t{ours}\n" in applied, applied
    # Each change seen by the controller (a ControllerRevision each) before the next one.
    _someone_sets(control_plane, ns, "statefulset", "redis", images["r3"])
    control_plane.wait_for("r3's revision",
                           lambda: control_plane.revision("statefulset", ns, "redis") != ours)
    _someone_sets(control_plane, ns, "statefulset", "redis", images["r2"])
    control_plane.wait_for("r2's revision again",
                           lambda: control_plane.revision("statefulset", ns, "redis") == ours)

    run = host.rollback("deploy-s")

    assert run.code == 10, run.stdout
    assert workload_results(run)["redis"] == "rolled-back"
    assert control_plane.image_of("statefulset", ns, "redis") == images["r1"]
    assert control_plane.lock_holder() == ""


def test_the_lease_is_renewed_and_a_deploy_that_loses_it_stops_and_undoes_nothing(
    control_plane: ControlPlane, ns: str, tmp_path: Path
) -> None:
    """#15 finding 2 on the real API: the heartbeat renews the lease (conditional replaces,
    each on the version the one before got); when someone else takes it mid-rollout, the
    deploy stops, undoes nothing and leaves the new holder's lease as it is."""
    host = ScriptHost(tmp_path, {**control_plane.env(), "K3S_DEPLOY_LEASE_RENEW_SECONDS": "1"})
    redis_volume(control_plane, ns)
    assert host.deploy(platform_docs(ns, "v1"), "before").code == 0
    docs = _with(platform_docs(ns, "v1"), "Deployment", "api", f"{API_IMAGE}:v2", min_ready=60)
    process = host.start(docs, "deploy-lost")
    control_plane.wait_for("the deploy to apply",
                           lambda: control_plane.revision("deployment", ns, "api") == "2")
    renewals = set()
    deadline = time.monotonic() + 10
    while len(renewals) < 3 and time.monotonic() < deadline:
        lease = control_plane.get(*LOCK)
        assert lease is not None and lease["spec"]["holderIdentity"] == "deploy-lost"
        renewals.add(lease["spec"]["renewTime"])
        time.sleep(0.3)
    assert len(renewals) >= 3, renewals
    lease = control_plane.get(*LOCK)
    assert lease is not None
    lease["spec"]["holderIdentity"] = "intruder"
    lease["metadata"].pop("annotations", None)
    control_plane.kubectl("replace", "-f", "-", stdin=json.dumps(lease))
    run = host.finished(process, timeout=60)

    assert run.code == 8, run.stdout
    assert "the deploy lock was taken by someone else while waiting for " in run.stdout
    assert "nothing undone" in run.stdout
    assert control_plane.image_of("deployment", ns, "api") == f"{API_IMAGE}:v2"
    assert control_plane.lock_holder() == "intruder"
