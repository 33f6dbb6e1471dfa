"""The deploy script, run for real under bash against the kubectl test double.

Each test builds a bundle as docs/internals.md section 1 lays it out, runs the deploy script
(deploykit/scripts/k3s-deploy/, joined as the master gets it) with the double first on PATH,
and checks what a user would: the exit code, the report on stderr, and the cluster left behind.
"""

from __future__ import annotations

import atexit
import functools
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from deploykit import command, render
from deploykit.report import Outcome, summary_markdown
from devkit.simulate.cluster import Cluster


@functools.cache
def script() -> Path:
    """The deploy script joined from its parts (deploykit/command.py), written once per test
    process into a new folder of its own: no test runs a joined file left from older parts, and
    none is rewritten under a bash that is still reading it."""
    folder = Path(tempfile.mkdtemp(prefix="k3s-deploy-script-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return command.write_deploy_script(folder)


NS = "production-platform"
REPORT_BEGIN = "===K3S-DEPLOY-REPORT-BEGIN==="
REPORT_END = "===K3S-DEPLOY-REPORT-END==="
DIFF_BEGIN = "===K3S-DEPLOY-DIFF-BEGIN==="
DIFF_END = "===K3S-DEPLOY-DIFF-END==="
LOCK = ("lease", "kube-system", "k3s-deploy-lock")
TRACE = "k3s-deploy-action/"
PHASE_OF_KIND = {
    "Namespace": "1-namespaces.yaml",
    "CustomResourceDefinition": "1-namespaces.yaml",
    "ConfigMap": "2-config.yaml",
    "Service": "3-services.yaml",
    "StatefulSet": "4-statefulsets.yaml",
    "Job": "5-jobs.yaml",
}


# -- manifests ------------------------------------------------------------------------------------


def namespace(name: str = NS) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def configmap(name: str = "app-config", ns: str = NS, **data: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": ns},
            "data": data or {"LOG_LEVEL": "info"}}


def service(name: str, ns: str = NS) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"app": name}, "ports": [{"port": 80}]}}


def statefulset(name: str = "redis", image: str = "redis:7.2", replicas: int = 1,
                ns: str = NS) -> dict:
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"serviceName": name, "replicas": replicas,
                 "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": name, "image": image}]}}},
    }


def deployment(name: str, image: str, replicas: int = 1, ns: str = NS,
               progress_deadline: int | None = None) -> dict:
    spec: dict = {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                  "template": {"metadata": {"labels": {"app": name}},
                               "spec": {"containers": [{"name": name, "image": image}]}}}
    if progress_deadline is not None:
        spec["progressDeadlineSeconds"] = progress_deadline
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def job(name: str = "migrate", image: str = "api:v1", ns: str = NS, backoff_limit: int = 0) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": ns},
            "spec": {"backoffLimit": backoff_limit, "template": {"spec": {
                "restartPolicy": "Never", "containers": [{"name": name, "image": image}]}}}}


def daemonset(name: str = "log-shipper", image: str = "shipper:v1", ns: str = NS) -> dict:
    return {"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": name, "image": image}]}}}}


def widget_crd() -> dict:
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                     "names": {"kind": "Widget", "plural": "widgets"},
                     "versions": [{"name": "v1", "served": True, "storage": True}]}}


def widget(name: str = "dashboard", ns: str = NS) -> dict:
    return {"apiVersion": "example.com/v1", "kind": "Widget",
            "metadata": {"name": name, "namespace": ns}, "spec": {"size": 3}}


def platform(api_image: str = "api:v1", worker_image: str = "worker:v1",
             redis_image: str = "redis:7.2", progress_deadline: int | None = None) -> list[dict]:
    """The Production Platform: namespace, config, redis, api (2 replicas), worker (1)."""
    return [
        namespace(),
        configmap(),
        service("api"),
        statefulset(image=redis_image),
        deployment("api", api_image, replicas=2, progress_deadline=progress_deadline),
        deployment("worker", worker_image, replicas=1, progress_deadline=progress_deadline),
    ]


def as_yaml(docs: list[dict]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)


def phase_files(docs: list[dict]) -> dict[str, str]:
    """The bundle's entries (docs/internals.md section 1), name -> content."""
    phases: dict[str, list[dict]] = {}
    workloads = []
    jobs = [doc for doc in docs if doc["kind"] == "Job"]
    # Jobs as the action's renderer gives them: stamped with their hash, one file each, and
    # the copies the server-side dry run creates under names the server makes up.
    digests = [render.stamp_job_hash(render.Manifest("test", "Job", doc["metadata"].get("namespace", ""),
                                                     doc["metadata"]["name"], doc)) for doc in jobs]
    for doc in docs:
        phases.setdefault(PHASE_OF_KIND.get(doc["kind"], "6-workloads.yaml"), []).append(doc)
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            workloads.append(f"{doc['kind'].lower()}\t{doc['metadata'].get('namespace', '')}\t"
                             f"{doc['metadata']['name']}\n")
    files = {name: as_yaml(content) for name, content in sorted(phases.items())}
    files["workloads.tsv"] = "".join(workloads)
    if jobs:
        files["jobs.tsv"] = "".join(
            f"{doc['metadata'].get('namespace', '')}\t{doc['metadata']['name']}\t{digest}\n"
            for doc, digest in zip(jobs, digests, strict=True))
        for number, doc in enumerate(jobs, 1):
            files[f"jobs/{number}.yaml"] = as_yaml([doc])
        files["jobs/check.yaml"] = as_yaml([render.job_check_copy(doc) for doc in jobs])
    # A document without a name (a test of kubectl's own refusal) has no line: the action's
    # renderer would have refused it before building a bundle.
    files["objects.tsv"] = "".join(
        f"{doc['kind']}\t{doc['metadata'].get('namespace', '')}\t{doc['metadata']['name']}\t"
        f"{defined_kind(doc)}\n" for doc in docs if doc["metadata"].get("name"))
    return files


def defined_kind(doc: dict) -> str:
    if doc["kind"] != "CustomResourceDefinition":
        return ""
    return (doc.get("spec") or {}).get("names", {}).get("kind", "")


def build_bundle(path: Path, docs: list[dict], options: str | None = None) -> Path:
    files = phase_files(docs)
    if options is not None:
        files["options"] = options
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            data = content.encode()
            info = tarfile.TarInfo(f"bundle/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# -- running the script ---------------------------------------------------------------------------


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def report(self) -> dict:
        lines = self.stderr.splitlines()
        # The report is the only thing on stderr, between its markers.
        assert len(lines) == 3, self.stderr
        assert lines[0] == REPORT_BEGIN and lines[2] == REPORT_END
        return json.loads(lines[1])

    def workload(self, name: str) -> dict:
        return next(w for w in self.report["workloads"] if w["name"] == name)

    @property
    def diff(self) -> str:
        """What the dry run printed between its diff markers."""
        lines = self.stdout.splitlines()
        return "\n".join(lines[lines.index(DIFF_BEGIN) + 1:lines.index(DIFF_END)])


class Master:
    """A K3s master in a temp dir: the kubectl double on PATH, a state dir, a cluster."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.cluster = Cluster(root / "cluster.json")
        self.cluster.install_kubectl(self.bin)
        self.state_root = root / "state"
        self.tmp = root / "tmp"
        self.tmp.mkdir()
        self.bundles = 0

    def env(self, path: str | None = None, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBECTL_DOUBLE")}
        env.update(PATH=path or f"{self.bin}:{os.environ['PATH']}", TMPDIR=str(self.tmp),
                   **extra)
        return env

    def bundle(self, docs: list[dict], options: str | None = None) -> Path:
        self.bundles += 1
        return build_bundle(self.root / f"manifests-{self.bundles}.tar.gz", docs, options)

    def command(self, action: str, deploy_id: str, *args: str, **options: object) -> list[str]:
        argv = ["bash", str(script()), action, "--deploy-id", deploy_id,
                "--state-dir", str(self.state_root), *args]
        for name, value in options.items():
            argv += [f"--{name.replace('_', '-')}", str(value).lower() if isinstance(
                value, bool) else str(value)]
        return argv

    def run(self, argv: list[str], env: dict[str, str] | None = None) -> Run:
        started = time.monotonic()
        done = subprocess.run(argv, env=env or self.env(), capture_output=True, text=True,
                              timeout=90, check=False)
        return Run(done.returncode, done.stdout, done.stderr, time.monotonic() - started)

    def deploy(self, docs: list[dict], deploy_id: str = "deploy-1", **options: object) -> Run:
        options.setdefault("timeout", 30)
        options.setdefault("rollback_timeout", 15)
        return self.run(self.command("deploy", deploy_id, "--bundle", str(self.bundle(docs)),
                                     **options))

    def rollback(self, deploy_id: str, **options: object) -> Run:
        options.setdefault("rollback_timeout", 15)
        return self.run(self.command("rollback", deploy_id, **options))

    def dry_run(self, docs: list[dict], deploy_id: str = "dry-1", **options: object) -> Run:
        options.setdefault("timeout", 30)
        return self.run(self.command("dry-run", deploy_id, "--bundle", str(self.bundle(docs)),
                                     **options))

    def start(self, docs: list[dict], deploy_id: str, **options: object) -> subprocess.Popen:
        """A deploy in the background (its own process group, as under SSM)."""
        options.setdefault("timeout", 30)
        options.setdefault("rollback_timeout", 15)
        argv = self.command("deploy", deploy_id, "--bundle", str(self.bundle(docs)), **options)
        return subprocess.Popen(argv, env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    @staticmethod
    def finished(process: subprocess.Popen) -> Run:
        stdout, stderr = process.communicate(timeout=90)
        return Run(process.returncode, stdout, stderr, 0.0)

    def lock(self) -> dict | None:
        return self.cluster.get(*LOCK)

    def lock_holder(self) -> str | None:
        lease = self.lock()
        return None if lease is None else lease["spec"].get("holderIdentity")

    def wait_for_holder(self, holder: str, seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while self.lock_holder() != holder:
            assert time.monotonic() < deadline, f"{holder} never took the lock"
            time.sleep(0.05)

    def objects(self) -> dict:
        """The cluster's objects, the deploy lock left out (a deploy leaves it released)."""
        return {key: obj for key, obj in self.cluster.objects().items()
                if key != ("Lease", *LOCK[1:])}

    def trace(self, kind: str, name: str) -> dict[str, str]:
        """The workload's traceability annotations."""
        annotations = self.cluster.get(kind, NS, name)["metadata"].get("annotations") or {}
        return {k[len(TRACE):]: v for k, v in annotations.items() if k.startswith(TRACE)}


@pytest.fixture
def master(tmp_path: Path) -> Master:
    return Master(tmp_path)


# -- success --------------------------------------------------------------------------------------


def test_clean_deploy_applies_everything_and_reports_every_workload_ready(master: Master) -> None:
    run = master.deploy(platform(), commit="abc123", run_url="https://github.com/o/r/runs/1")

    assert run.code == 0, run.stdout
    report = run.report
    assert report["result"] == "success"
    assert report["step"] == "done"
    assert report["rollback"] == "not-needed"
    assert report["deploy_id"] == "deploy-1"
    summary = {(w["kind"], w["name"]): (w["ready"], w["desired"], w["updated"], w["result"])
               for w in report["workloads"]}
    assert summary == {
        ("statefulset", "redis"): (1, 1, 1, "ready"),
        ("deployment", "api"): (2, 2, 2, "ready"),
        ("deployment", "worker"): (1, 1, 1, "ready"),
    }
    api = run.workload("api")
    assert (api["namespace"], api["revision_before"], api["revision_after"]) == (NS, "", "1")
    assert run.workload("redis")["revision_after"] == master.cluster.revision(
        "statefulset", NS, "redis")
    assert report["pods"][0].split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert any(line.startswith("redis-0 ") and "Running" in line for line in report["pods"])
    assert report["events"] == []
    assert master.cluster.get("configmap", NS, "app-config")["data"] == {"LOG_LEVEL": "info"}
    assert master.cluster.image_of("deployment", NS, "worker") == "worker:v1"
    # Namespaces are applied before what lives in them, workloads after their config.
    assert run.stdout.index("namespace/production-platform created") < run.stdout.index(
        "configmap/app-config created") < run.stdout.index("deployment.apps/api created")
    assert "abc123" in run.stdout
    # The deploy is over: nothing is left for a rollback, and the lock is free.
    assert sorted(p.name for p in master.state_root.iterdir()) == []
    assert master.lock_holder() == ""
    # Every workload says which commit and run put it there.
    for kind, name in [("statefulset", "redis"), ("deployment", "api"), ("deployment", "worker")]:
        trace = master.trace(kind, name)
        assert trace.pop("deployed-at").endswith("Z")
        assert trace == {"commit-sha": "abc123", "run-url": "https://github.com/o/r/runs/1",
                         "deploy-id": "deploy-1"}


def test_redeploying_the_same_manifests_leaves_every_workload_unchanged(master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))
    revisions = {n: master.cluster.revision(k, NS, n) for k, n in
                 [("statefulset", "redis"), ("deployment", "api"), ("deployment", "worker")]}

    run = master.deploy(platform())

    assert run.code == 0, run.stdout
    assert {w["name"]: w["result"] for w in run.report["workloads"]} == {
        "redis": "unchanged", "api": "unchanged", "worker": "unchanged"}
    for name, revision in revisions.items():
        workload = run.workload(name)
        assert workload["revision_before"] == workload["revision_after"] == revision


def test_custom_resources_deploy_with_their_definition_in_the_same_bundle(
        master: Master) -> None:
    run = master.deploy([*platform(), widget_crd(), widget()])

    assert run.code == 0, run.stdout
    assert "customresourcedefinition.apiextensions.k8s.io/widgets.example.com condition met" in (
        run.stdout)
    assert master.cluster.get("widget", NS, "dashboard")["spec"] == {"size": 3}


def test_configmap_only_deploy_succeeds_with_a_multi_word_kubectl(master: Master) -> None:
    # `k3s kubectl` as on a K3s master: the kubectl option is split into words.
    k3s = master.bin / "k3s"
    k3s.write_text('#!/bin/sh\n[ "$1" = kubectl ] || exit 64\nshift\n'
                   f'exec "{master.bin}/kubectl" "$@"\n')
    k3s.chmod(0o755)
    master.cluster.seed(as_yaml([namespace()]))

    run = master.deploy([configmap(LOG_LEVEL="debug")], kubectl="k3s kubectl", namespace=NS)

    assert run.code == 0, run.stdout
    assert run.report["result"] == "success"
    assert run.report["workloads"] == []
    assert master.cluster.get("configmap", NS, "app-config")["data"] == {"LOG_LEVEL": "debug"}


def _k3s(master: Master) -> None:
    """`k3s kubectl` as on a K3s master, logging each call to bin/k3s.log."""
    k3s = master.bin / "k3s"
    k3s.write_text('#!/bin/sh\n[ "$1" = kubectl ] || exit 64\nshift\n'
                   f'echo "$1" >> "{master.bin}/k3s.log"\nexec "{master.bin}/kubectl" "$@"\n')
    k3s.chmod(0o755)


def test_the_options_in_the_bundle_drive_the_deploy_and_its_later_rollback(master: Master) -> None:
    """The action's way: the command line names the entry point, the bundle, the deploy id and
    the state folder; every option comes from the verified bundle, and the deploy keeps them
    for the rollback entry point, which is given none either."""
    _k3s(master)
    master.cluster.seed(as_yaml(platform()))
    options = ("kubectl=k3s kubectl\nnamespace=shop\ntimeout=120\nrollback=true\n"
               "rollback-timeout=15\nlock-timeout=5\nserver-dry-run=true\nrequest-timeout=30s\n"
               "validate=false\ncommit=0123abc\nrun-url=https://ci.example/run/1\n")
    bundle = master.bundle(platform(api_image="api:v2", worker_image="worker:v2"), options)
    master.cluster.slow_rollout("deployment", NS, "worker", 120)
    argv = ["bash", str(script()), "deploy", "--bundle", str(bundle), "--deploy-id", "opt-1",
            "--state-dir", str(master.state_root)]
    process = subprocess.Popen(argv, env=master.env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while master.cluster.revision("deployment", NS, "worker") != "2":
            assert time.monotonic() < deadline, "the deploy never applied"
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert "commit=0123abc\n" in (master.state_root / "opt-1" / "deploy.txt").read_text()
    kept = (master.state_root / "opt-1" / "options").read_text()
    assert "kubectl=k3s kubectl\n" in kept and "rollback-timeout=15\n" in kept
    calls = (master.bin / "k3s.log").read_text().splitlines()
    assert calls and "apply" in calls
    (master.bin / "k3s.log").unlink()

    run = master.run(["bash", str(script()), "rollback", "--deploy-id", "opt-1",
                      "--state-dir", str(master.state_root)])

    assert run.code == 10, run.stdout
    assert master.cluster.image_of("deployment", NS, "worker") == "worker:v1"
    assert "rollout" in (master.bin / "k3s.log").read_text().splitlines()


@pytest.mark.parametrize(("options", "code", "says"), [
    ("colour=red\n", 5, "options line 1 is not a known NAME=VALUE option"),
    ("timeout=600\nstate-dir=/tmp/elsewhere\n", 5, "options line 2 is not a known"),
    ("timeout=600\ndeploy-id=other\n", 5, "options line 2 is not a known"),
    ("kubectl=kubectl $(touch pwned)\n", 2, "--kubectl must be words"),
    ("rollback=yes\n", 2, "--rollback must be true or false"),
    ("prune=maybe\n", 2, "--prune must be false, true or all"),
    ("prune=true\nrelease=nothex\nrelease-name=acme/shop:k8s\n", 2, "--prune needs --release (20 hex"),
    ("prune=true\nrelease=0123456789abcdef0123\nrelease-name=$(touch pwned)\n", 2, "--prune needs --release"),
    # a bundle made without prune has no inventory to compare with: refused before any change
    ("prune=true\nrelease=0123456789abcdef0123\nrelease-name=acme/shop:k8s\n", 5,
     "--prune true needs bundle/inventory.tsv, which this bundle lacks"),
    # live progress (55-progress.sh): the action sends only values these patterns accept
    ("progress-to=s3://Bad_Bucket/progress/\nprogress-region=eu-west-1\nprogress-owner=123456789012\n", 2,
     "--progress-to must be s3://BUCKET/ or s3://BUCKET/PREFIX/"),
    ("progress-to=s3://k3s-deploy-x/progress/$(touch pwned)/\nprogress-region=eu-west-1\n"
     "progress-owner=123456789012\n", 2, "--progress-to must be s3://BUCKET/"),
    ("progress-to=s3://k3s-deploy-x/progress/\n", 2, "--progress-to needs --progress-region"),
    ("progress-to=s3://k3s-deploy-x/progress/\nprogress-region=eu-west-1\nprogress-owner=1234\n", 2,
     "--progress-to needs --progress-region (an AWS region) and --progress-owner"),
    ("progress-url-i-0123456789abcdef0=https://s3.example/p\n", 2,
     "--progress-url-INSTANCE needs --progress-owner"),
    ("progress-owner=123456789012\nprogress-url-i-0123456789abcdef0=https://s3.example/p'$(touch pwned)'\n",
     2,
     "--progress-url-INSTANCE must name an instance id and be an https:// URL"),
    ("progress-owner=123456789012\nprogress-url-i-0123456789abcdef0=http://s3.example/p\n", 2,
     "--progress-url-INSTANCE must name an instance id and be an https:// URL"),
    ("progress-owner=123456789012\nprogress-url-master=https://s3.example/p\n", 2,
     "--progress-url-INSTANCE must name an instance id"),
])
def test_a_bad_options_file_in_the_bundle_changes_nothing(master: Master, options: str, code: int,
                                                           says: str) -> None:
    master.cluster.seed(as_yaml(platform()))
    before = master.objects()
    bundle = master.bundle(platform(api_image="api:v2"), options)

    run = master.run(["bash", str(script()), "deploy", "--bundle", str(bundle), "--deploy-id", "o-2",
                      "--state-dir", str(master.state_root)])

    assert run.code == code, run.stdout
    assert says in run.stdout
    assert master.objects() == before
    assert not list(master.root.rglob("pwned"))


def test_the_report_names_what_the_deploy_changed_outside_its_namespaces(master: Master) -> None:
    """#15 finding 6: cluster-scoped objects (the kinds `kubectl api-resources --namespaced=false`
    lists) and kube-system objects the deploy created or changed are named in the report; an
    apply that leaves them as they were names nothing."""
    def docs(verbs: list[str]) -> list[dict]:
        return [
            namespace(),
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": {"name": "shop-reader"},
             "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": verbs}]},
            configmap("shop-extra", ns="kube-system", owner="shop"),
            configmap(LOG_LEVEL="info"),
        ]

    first = master.deploy(docs(["get"]), "wide-1")
    again = master.deploy(docs(["get"]), "wide-2")
    changed = master.deploy(docs(["get", "list"]), "wide-3")

    assert first.code == again.code == changed.code == 0, first.stdout + changed.stdout
    assert sorted(first.report["cluster_changes"]) == [
        "created ClusterRole/shop-reader", "created ConfigMap kube-system/shop-extra",
        f"created Namespace/{NS}"]
    assert "cluster_changes" not in again.report
    assert changed.report["cluster_changes"] == ["changed ClusterRole/shop-reader"]
    assert "cluster-wide and kube-system objects this deploy changed: changed ClusterRole/shop-reader" \
        in changed.stdout


# -- failures before anything changed -------------------------------------------------------------


def path_without(tmp: Path, missing: str, extra_bin: Path) -> str:
    """A PATH holding every command of /usr/bin except `missing`."""
    tools = tmp / "usr-bin"
    tools.mkdir()
    for entry in Path("/usr/bin").iterdir():
        if entry.name != missing:
            (tools / entry.name).symlink_to(entry)
    return f"{extra_bin}:{tools}"


@pytest.mark.parametrize(("missing", "kubectl"), [
    pytest.param("tar", "kubectl", id="tar"),
    pytest.param("", "/opt/k3s/bin/kubectl", id="kubectl"),
])
def test_missing_tool_is_named_and_exits_3(master: Master, missing: str, kubectl: str) -> None:
    before = master.objects()
    bundle = master.bundle(platform())
    env = master.env(path=path_without(master.root, missing, master.bin))

    run = master.run(["/usr/bin/bash", str(script()), "deploy", "--deploy-id", "d1", "--bundle",
                      str(bundle), "--state-dir", str(master.state_root), "--kubectl", kubectl],
                     env=env)

    assert run.code == 3, run.stdout
    assert run.report["step"] == "tools"
    assert (missing or kubectl) in run.report["message"]
    assert master.objects() == before


def test_unhealthy_api_exits_4_without_applying(master: Master) -> None:
    master.cluster.set_api_healthy(False)
    before = master.objects()

    run = master.deploy(platform())

    assert run.code == 4, run.stdout
    assert (run.report["result"], run.report["step"]) == ("failed", "api")
    assert "not healthy" in run.report["message"]
    assert master.objects() == before
    assert not (master.state_root / "deploy-1").exists()


def test_namespaced_object_without_its_namespace_is_rejected_before_anything_changes(
        master: Master) -> None:
    before = master.objects()
    # The bundle creates one namespace but not the one its config and workload live in.
    docs = [namespace("monitoring"), configmap(), deployment("api", "api:v1")]

    run = master.deploy(docs)

    assert run.code == 5, run.stdout
    assert (run.report["step"], run.report["rollback"]) == ("check", "not-needed")
    assert 'namespaces "production-platform" not found' in run.report["message"]
    assert "configmap/app-config" in run.report["message"]
    assert master.objects() == before
    assert master.cluster.get("namespace", "", "monitoring") is None


def test_a_bundle_holding_the_deploy_lock_is_rejected_before_anything_changes(
        master: Master) -> None:
    """#15: applying the lock's own Lease would hand it to whoever the manifest names."""
    master.cluster.seed(as_yaml([namespace()]))
    before = master.objects()
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
             "metadata": {"name": "k3s-deploy-lock", "namespace": "kube-system"},
             "spec": {"holderIdentity": "someone-else", "leaseDurationSeconds": 1}}

    run = master.deploy([configmap(), lease, deployment("api", "api:v1")])

    assert run.code == 5, run.stdout
    assert (run.report["step"], run.report["rollback"]) == ("check", "not-needed")
    assert "Lease kube-system/k3s-deploy-lock, the deploy lock itself" in run.report["message"]
    assert master.objects() == before
    assert master.lock_holder() in (None, "")


def test_malformed_manifest_is_rejected_before_anything_changes(master: Master) -> None:
    master.cluster.seed(as_yaml([namespace()]))
    before = master.objects()
    nameless = configmap()
    del nameless["metadata"]["name"]

    run = master.deploy([configmap("ok"), nameless, deployment("api", "api:v1")])

    assert run.code == 5, run.stdout
    assert "resource name may not be empty" in run.stdout
    assert master.objects() == before


@pytest.mark.parametrize("args", [
    ["deploy", "--deploy-id", "d1"],
    ["deploy", "--deploy-id", "d1", "--bundle", "b.tgz", "--timeout", "10m"],
    ["deploy", "--deploy-id", "d1", "--bundle", "b.tgz", "--rollback", "yes"],
    ["deploy", "--deploy-id", "../etc", "--bundle", "b.tgz"],
    ["deploy", "--deploy-id", "d1", "--bundle", "b.tgz", "--colour", "red"],
    ["redeploy", "--deploy-id", "d1"],
])
def test_bad_arguments_exit_2(master: Master, args: list[str]) -> None:
    run = master.run(["bash", str(script()), *args])

    assert run.code == 2, run.stdout
    assert run.report["result"] == "failed"


@pytest.mark.parametrize("kubectl", [
    "kubectl; touch {marker}",
    "kubectl $(touch {marker})",
    "kubectl `touch {marker}`",
    "kubectl\ntouch {marker}",
    "kubectl | touch {marker}",
    "kubectl --kubeconfig='{marker}'",
])
def test_kubectl_with_shell_metacharacters_is_refused_and_runs_nothing(
        master: Master, kubectl: str) -> None:
    marker = master.root / "pwned"
    calls = master.root / "kubectl-calls.jsonl"
    state_before = (master.root / "cluster.json").read_bytes()

    run = master.run(master.command("deploy", "d1", "--bundle", str(master.bundle(platform())),
                                    kubectl=kubectl.format(marker=marker)),
                     env=master.env(KUBECTL_DOUBLE_LOG=str(calls)))

    assert run.code == 2, run.stdout
    assert "--kubectl" in run.report["message"]
    assert not marker.exists()
    assert not calls.exists()  # kubectl never ran
    assert (master.root / "cluster.json").read_bytes() == state_before


# -- failures after changes -----------------------------------------------------------------------


def test_rollout_failure_rolls_back_only_the_changed_workload(master: Master) -> None:
    master.cluster.seed(as_yaml(platform(progress_deadline=2)))
    master.cluster.break_image("api:v2")

    run = master.deploy(platform(api_image="api:v2", progress_deadline=2))

    assert run.code == 7, run.stdout
    report = run.report
    assert (report["result"], report["step"], report["rollback"]) == (
        "failed", "rollout", "done")
    assert 'deployment "api" exceeded its progress deadline' in report["message"]
    api = run.workload("api")
    assert (api["result"], api["revision_before"], api["revision_after"]) == (
        "rolled-back", "1", "2")
    assert (api["ready"], api["desired"]) == (2, 2)
    # The undo restored v1 under a new revision, as Kubernetes does.
    assert master.cluster.image_of("deployment", NS, "api") == "api:v1"
    assert master.cluster.revision("deployment", NS, "api") == "3"
    # The worker did not change: it keeps its revision, nothing undid it.
    worker = run.workload("worker")
    assert (worker["result"], worker["revision_before"], worker["revision_after"]) == (
        "unchanged", "1", "1")
    assert master.cluster.revision("deployment", NS, "worker") == "1"
    assert run.workload("redis")["result"] == "unchanged"
    assert any("BackOff" in event for event in report["events"])
    assert "deployment.apps/api rolled back" in run.stdout
    assert not (master.state_root / "deploy-1").exists()


def test_rollback_off_leaves_the_failed_rollout_in_place(master: Master) -> None:
    master.cluster.seed(as_yaml(platform(progress_deadline=2)))
    master.cluster.break_image("api:v2")

    run = master.deploy(platform(api_image="api:v2", progress_deadline=2), rollback=False)

    assert run.code == 9, run.stdout
    assert (run.report["result"], run.report["rollback"]) == ("failed", "off")
    assert run.workload("api")["result"] == "failed"
    assert master.cluster.image_of("deployment", NS, "api") == "api:v2"
    assert master.cluster.revision("deployment", NS, "api") == "2"


def test_configmap_only_deploy_that_fails_rolls_nothing_back(master: Master) -> None:
    master.cluster.seed(as_yaml([namespace(), deployment("api", "api:v1"),
                                 deployment("api", "api:v2")]))
    # Refused at apply time only: the server-side dry run passed.
    master.cluster.fail_apply("configmap", "app-config", on_dry_run=False)

    run = master.deploy([configmap()], namespace=NS)

    assert run.code == 9, run.stdout
    assert (run.report["step"], run.report["rollback"]) == ("apply", "nothing-changed")
    assert "denied the request" in run.stdout
    # An undo here would have put api back to v1.
    assert master.cluster.image_of("deployment", NS, "api") == "api:v2"
    assert master.cluster.revision("deployment", NS, "api") == "2"


def test_failed_new_workload_is_reported_not_undone_and_the_report_stays_small(
        master: Master) -> None:
    master.cluster.seed(as_yaml([namespace()]))
    # Many pods and events, and a reason with characters JSON must escape.
    master.cluster.break_image("api:v1", reason='Crash"Loop\\\x01\tBackOff')

    run = master.deploy([deployment("api", "api:v1", replicas=150, progress_deadline=1)])

    assert run.code == 9, run.stdout
    report = run.report
    assert len(run.stderr.splitlines()[1]) <= 7500
    assert report["rollback"] == "nothing-changed"
    assert "no rollout history found" in run.stdout
    assert run.workload("api")["result"] == "failed"
    assert any('Crash"Loop\\\x01\tBackOff' in pod for pod in report["pods"])
    assert 1 < len(report["pods"]) < 151  # trimmed, header kept
    assert master.cluster.image_of("deployment", NS, "api") == "api:v1"


def test_slow_rollout_times_out_and_is_rolled_back(master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))
    master.cluster.slow_rollout("deployment", NS, "api", 60)

    # The budget leaves room for the API check and the applies on a loaded machine; the
    # 60 s rollout cannot fit in it.
    run = master.deploy(platform(api_image="api:v2"), timeout=12)

    assert run.code == 10, run.stdout
    assert (run.report["result"], run.report["rollback"]) == ("timed-out", "done")
    assert run.workload("api")["result"] == "rolled-back"
    assert master.cluster.image_of("deployment", NS, "api") == "api:v1"


def test_statefulset_with_a_bad_image_fails_fast_and_is_rolled_back(master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))
    before = master.cluster.revision("statefulset", NS, "redis")
    master.cluster.break_image("redis:7.2-typo", reason="ImagePullBackOff")

    # A StatefulSet has no progress deadline: without the pod check this would wait 60 s.
    run = master.deploy(platform(redis_image="redis:7.2-typo"), timeout=60)

    assert run.code == 7, run.stdout
    assert "ImagePullBackOff" in run.report["message"]
    redis = run.workload("redis")
    assert (redis["result"], redis["revision_before"], redis["ready"]) == (
        "rolled-back", before, 1)
    assert master.cluster.revision("statefulset", NS, "redis") == before
    # The pod stuck on the bad revision had to be deleted for the old one to come back.
    assert "deleting pod redis-0" in run.stdout
    assert all(p["status"]["containerStatuses"][0]["ready"] for p in master.cluster.pods(NS))


def test_a_daemonset_is_waited_for_in_apply_order_and_reported_by_its_nodes(
        master: Master) -> None:
    # Listed between the two Deployments: phase 5 applies it there, so it is waited for there.
    docs = [*platform()[:5], daemonset(), platform()[5]]
    master.cluster.seed(as_yaml(docs))
    before = master.cluster.revision("daemonset", NS, "log-shipper")

    run = master.deploy([*platform()[:5], daemonset(image="shipper:v2"), platform()[5]])

    assert run.code == 0, run.stdout
    assert [w["name"] for w in run.report["workloads"]] == ["redis", "api", "log-shipper",
                                                            "worker"]
    shipper = run.workload("log-shipper")
    after = master.cluster.revision("daemonset", NS, "log-shipper")
    assert before.startswith("log-shipper-") and after != before
    assert (shipper["kind"], shipper["desired"], shipper["ready"], shipper["updated"],
            shipper["revision_before"], shipper["revision_after"], shipper["result"]) == (
        "daemonset", 1, 1, 1, before, after, "ready")
    assert "waiting for daemonset/log-shipper in production-platform" in run.stdout
    assert 'daemon set "log-shipper" successfully rolled out' in run.stdout
    assert "daemonset/log-shipper in production-platform: healthy, 1/1 ready" in run.stdout
    assert (master.state_root / "deploy-1").exists() is False


def test_a_crash_looping_daemonset_fails_fast_and_goes_back_to_its_revision(
        master: Master) -> None:
    docs = [*platform(), daemonset()]
    master.cluster.seed(as_yaml(docs))
    before = master.cluster.revision("daemonset", NS, "log-shipper")
    master.cluster.break_image("shipper:v2", reason="CrashLoopBackOff")

    # A DaemonSet has no progress deadline either: without the pod check this would wait 60 s.
    run = master.deploy([*platform(), daemonset(image="shipper:v2")], timeout=60)

    assert run.code == 7, run.stdout
    assert run.seconds < 45, run.stdout
    report = run.report
    assert report["failure"]["workload"] == "daemonset/log-shipper"
    assert report["failure"]["reason"] == "CrashLoopBackOff"
    assert "daemonset/log-shipper in production-platform: pod log-shipper-" in report["message"]
    shipper = run.workload("log-shipper")
    assert (shipper["result"], shipper["revision_before"], shipper["ready"]) == (
        "rolled-back", before, 1)
    assert master.cluster.revision("daemonset", NS, "log-shipper") == before
    assert master.cluster.image_of("daemonset", NS, "log-shipper") == "shipper:v1"
    assert {w["name"]: w["result"] for w in report["workloads"]} == {
        "redis": "unchanged", "api": "unchanged", "worker": "unchanged",
        "log-shipper": "rolled-back"}
    # The action's summary reads the same report: a row like any workload's.
    from tests import markdown
    summary = summary_markdown(Outcome(status="rolled-back", rolled_back=True, message="m",
                                       report=report), "eu-west-1")
    rendered = markdown.render(summary)
    assert (f"<td>{NS}/daemonset/log-shipper</td>\n<td>1/1</td>\n<td>1</td>\n"
            f"<td>{before} → {shipper['revision_after']}</td>\n<td>rolled-back</td>") in rendered, (
        rendered)
    assert all(p["status"]["containerStatuses"][0]["ready"] for p in master.cluster.pods(NS))


def test_a_new_daemonset_that_fails_is_left_as_applied_with_no_history(master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))
    master.cluster.break_image("shipper:v2", reason="ImagePullBackOff")

    run = master.deploy([*platform(), daemonset(image="shipper:v2")], timeout=60)

    assert run.code == 9, run.stdout
    assert "ImagePullBackOff" in run.report["message"]
    assert "daemonset/log-shipper: no earlier revision (new in this deploy), left as applied" in (
        run.stdout)
    assert run.workload("log-shipper")["result"] == "failed"


def test_a_daemonset_goes_back_to_the_exact_revision_recorded_before(master: Master) -> None:
    """As the StatefulSet's: someone moved the DaemonSet to v3 and back to this deploy's v2
    (the same ControllerRevision, renumbered); the rollback must give the v1 it recorded."""
    master.cluster.seed(as_yaml([*platform(), daemonset()]))
    before = master.cluster.revision("daemonset", NS, "log-shipper")
    _kill_once_recorded(master, "deploy-d", "daemonset", "log-shipper",
                        [*platform(), daemonset(image="shipper:v2")])
    master.cluster.seed(as_yaml([daemonset(image="shipper:v3")]))
    master.cluster.seed(as_yaml([daemonset(image="shipper:v2")]))

    run = master.rollback("deploy-d")

    assert run.code == 10, run.stdout
    assert run.workload("log-shipper")["result"] == "rolled-back"
    assert master.cluster.image_of("daemonset", NS, "log-shipper") == "shipper:v1"
    assert master.cluster.revision("daemonset", NS, "log-shipper") == before


def test_a_daemonset_someone_else_changed_since_is_left_alone(master: Master) -> None:
    master.cluster.seed(as_yaml([*platform(), daemonset()]))
    _kill_once_recorded(master, "deploy-e", "daemonset", "log-shipper",
                        [*platform(), daemonset(image="shipper:v2")])
    applied = (master.state_root / "deploy-e" / "applied.tsv").read_text()
    mine = master.cluster.revision("daemonset", NS, "log-shipper")
    assert applied == f"daemonset/{NS}/log-shipper\t{mine}\n"
    master.cluster.seed(as_yaml([daemonset(image="shipper:v3")]))

    run = master.rollback("deploy-e")

    assert run.code == 12, run.stdout
    assert run.workload("log-shipper")["result"] == "changed-by-another"
    assert master.cluster.image_of("daemonset", NS, "log-shipper") == "shipper:v3"


def _terminate_mid_rollout(master: Master, deploy_id: str) -> subprocess.CompletedProcess:
    master.cluster.seed(as_yaml(platform()))
    master.cluster.slow_rollout("deployment", NS, "api", 120)
    argv = master.command("deploy", deploy_id, "--bundle", str(master.bundle(
        platform(api_image="api:v2"))), timeout=120)
    process = subprocess.Popen(argv, env=master.env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 20
    while master.cluster.revision("deployment", NS, "api") != "2":
        assert time.monotonic() < deadline, "the deploy never applied"
        time.sleep(0.1)
    master.cluster.slow_rollout("deployment", NS, "api", 0)
    # As a cancel does: SIGTERM to the command's process group.
    os.killpg(process.pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=20)
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def test_terminated_deploy_undoes_its_changes_and_releases_the_lock(master: Master) -> None:
    """A cancel (SIGTERM) mid-rollout: the script sends the undos itself, at once (the runner
    kills a cancelled job seconds later), releases the lock, and leaves only the word that it
    rolled back for the action's rollback command."""
    run = _terminate_mid_rollout(master, "deploy-8")

    assert run.returncode == 143, run.stdout
    # No report: the action must not take a half-done deploy for a finished one.
    assert run.stderr == ""
    assert "rollback: done (undos sent, not waited for)" in run.stdout
    assert master.cluster.image_of("deployment", NS, "api") == "api:v1"
    assert master.lock_holder() == ""
    state = master.state_root / "deploy-8"
    assert sorted(p.name for p in state.iterdir()) == ["k3s-deploy.sh", "rolled-back.txt"]
    rollback = master.rollback("deploy-8")
    assert rollback.code == 10, rollback.stdout
    assert "rolled back by its own script when it was interrupted" in rollback.stdout
    assert not state.exists()
    assert master.cluster.image_of("deployment", NS, "api") == "api:v1"


@pytest.mark.parametrize("find_first", [True, False], ids=["after-the-cleanup", "before-it"])
def test_a_cancel_killed_while_it_tidies_its_state_still_reads_as_rolled_back(
        master: Master, find_first: bool) -> None:
    """The runner's SIGKILL follows its SIGTERM within seconds, and may land while the trap
    tidies the state dir after sending its undos (found under load in the reliability suite:
    the rollback command then read an emptied state dir as "stopped before applying anything"
    and the action reported failed, not rolled back). The `find` that tidies kills the whole
    group after (or instead of) doing its work; either way the rollback must say it is done."""
    real = shutil.which("find")
    killer = master.root / "killer-bin"
    killer.mkdir()
    wrapper = killer / "find"
    run_it = f'"{real}" "$@"\n' if find_first else ""
    wrapper.write_text(
        "#!/bin/sh\n"
        'case "$*" in *-delete*) ;; *) exec "' + str(real) + '" "$@" ;; esac\n'
        + run_it + "kill -KILL 0\n")
    wrapper.chmod(0o755)
    master.cluster.seed(as_yaml(platform()))
    master.cluster.slow_rollout("deployment", NS, "api", 120)
    argv = master.command("deploy", "deploy-k", "--bundle", str(master.bundle(
        platform(api_image="api:v2"))), timeout=120)
    process = subprocess.Popen(argv, env=master.env(path=f"{killer}:{master.bin}:{os.environ['PATH']}"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 20
    while master.cluster.revision("deployment", NS, "api") != "2":
        assert time.monotonic() < deadline, "the deploy never applied"
        time.sleep(0.1)
    master.cluster.slow_rollout("deployment", NS, "api", 0)
    os.killpg(process.pid, signal.SIGTERM)
    stdout, _ = process.communicate(timeout=20)
    assert process.returncode == -signal.SIGKILL, stdout
    assert "rollback: done (undos sent, not waited for)" in stdout
    assert master.cluster.image_of("deployment", NS, "api") == "api:v1"
    assert (master.state_root / "deploy-k" / "rolled-back.txt").is_file()

    rollback = master.rollback("deploy-k")

    assert rollback.code == 10, rollback.stdout
    assert "rolled back by its own script when it was interrupted" in rollback.stdout
    assert master.cluster.image_of("deployment", NS, "api") == "api:v1"


def test_terminated_deploy_whose_undo_fails_keeps_its_state_and_the_lock_for_the_rollback(
        master: Master) -> None:
    master.cluster.fail_undo("deployment", "api")
    run = _terminate_mid_rollout(master, "deploy-9")

    assert run.returncode == 143, run.stdout
    assert run.stderr == ""
    assert "rollback --deploy-id deploy-9" in run.stdout
    assert (master.state_root / "deploy-9" / "revisions.tsv").exists()
    # The lock stays with the deploy until its rollback (no other deploy may change the
    # workloads in between); that rollback takes it over.
    assert master.lock_holder() == "deploy-9"
    master.cluster.fail_undo("deployment", "api", failing=False)
    rollback = master.rollback("deploy-9")
    assert rollback.code == 10, rollback.stdout
    assert master.cluster.image_of("deployment", NS, "api") == "api:v1"
    assert master.lock_holder() == ""


def _kill_once_applied(master: Master, deploy_id: str, workload: str, docs: list[dict]) -> None:
    """Starts a deploy whose `workload` rolls out slowly and SIGKILLs its process group once
    that Deployment took the new revision, as SSM's executionTimeout does: no trap runs."""
    master.cluster.slow_rollout("deployment", NS, workload, 120)
    argv = master.command("deploy", deploy_id, "--bundle", str(master.bundle(docs)), timeout=120)
    process = subprocess.Popen(argv, env=master.env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while master.cluster.revision("deployment", NS, workload) != "2":
            assert time.monotonic() < deadline, "the deploy never applied"
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_rollback_entry_point_undoes_a_killed_deploy_and_forgets_it(master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))
    _kill_once_applied(master, "deploy-7", "worker",
                       platform(api_image="api:v2", worker_image="worker:v2"))
    assert (master.state_root / "deploy-7" / "revisions.tsv").exists()
    assert (master.state_root / "deploy-7" / "k3s-deploy.sh").exists()

    run = master.rollback("deploy-7")

    assert run.code == 10, run.stdout
    report = run.report
    assert (report["step"], report["rollback"]) == ("rollback", "done")
    assert {w["name"]: w["result"] for w in report["workloads"]} == {
        "redis": "unchanged", "api": "rolled-back", "worker": "rolled-back"}
    assert master.cluster.image_of("deployment", NS, "api") == "api:v1"
    assert master.cluster.image_of("deployment", NS, "worker") == "worker:v1"
    # The killed deploy still held the cluster's lock: its own rollback takes it over.
    assert "lock taken over (it was left by this deploy's own process" in run.stdout
    assert master.lock_holder() == ""
    assert not (master.state_root / "deploy-7").exists()

    again = master.rollback("deploy-7")

    assert again.code == 12, again.stdout
    assert again.report["rollback"] == "nothing-changed"
    assert master.cluster.image_of("deployment", NS, "api") == "api:v1"


def _kill_once_recorded(master: Master, deploy_id: str, kind: str, name: str,
                       docs: list[dict]) -> None:
    """Starts a deploy whose `kind/name` rolls out slowly and SIGKILLs its process group once
    the deploy recorded the revisions it applied (STATE/ID/applied.tsv)."""
    master.cluster.slow_rollout(kind, NS, name, 120)
    argv = master.command("deploy", deploy_id, "--bundle", str(master.bundle(docs)), timeout=120)
    process = subprocess.Popen(argv, env=master.env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (master.state_root / deploy_id / "applied.tsv").exists():
            assert time.monotonic() < deadline, "the deploy never recorded what it applied"
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    master.cluster.slow_rollout(kind, NS, name, 0)


def test_a_rollback_leaves_alone_a_workload_someone_else_changed_since(master: Master) -> None:
    """#15 finding 2: a deploy killed after its apply leaves its state; before its rollback
    runs, another deploy changes the same Deployment. The rollback must not undo that change
    (an undo to "previous" would bring the killed deploy's own template back)."""
    master.cluster.seed(as_yaml(platform()))
    _kill_once_recorded(master, "deploy-a", "deployment", "api", platform(api_image="api:v2"))
    applied = master.state_root / "deploy-a" / "applied.tsv"
    assert applied.read_text() == f"deployment/{NS}/api\t2\n"
    # Someone else's deploy, after the lease ran out: api moves on to v3 (revision 3).
    master.cluster.seed(as_yaml([deployment("api", "api:v3", replicas=2)]))
    assert master.cluster.revision("deployment", NS, "api") == "3"

    run = master.rollback("deploy-a")

    assert run.code == 12, run.stdout
    assert "changed by someone else since this deploy applied it (revision 2, now 3)" in run.stdout
    assert {w["name"]: w["result"] for w in run.report["workloads"]}["api"] == "changed-by-another"
    assert master.cluster.image_of("deployment", NS, "api") == "api:v3"


def test_a_statefulset_goes_back_to_the_exact_revision_recorded_before(master: Master) -> None:
    """#15 finding 2: between a killed deploy and its rollback, someone moved redis to 7.6 and
    back to this deploy's 7.4 (same template, same ControllerRevision, renumbered). `rollout
    undo` to "previous" would now give 7.6; the rollback must give the 7.2 it recorded."""
    master.cluster.seed(as_yaml(platform()))
    _kill_once_recorded(master, "deploy-s", "statefulset", "redis", platform(redis_image="redis:7.4"))
    master.cluster.seed(as_yaml([statefulset(image="redis:7.6")]))
    master.cluster.seed(as_yaml([statefulset(image="redis:7.4")]))

    run = master.rollback("deploy-s")

    assert run.code == 10, run.stdout
    assert {w["name"]: w["result"] for w in run.report["workloads"]}["redis"] == "rolled-back"
    assert master.cluster.image_of("statefulset", NS, "redis") == "redis:7.2"


def test_a_rollback_killed_right_after_an_undo_does_not_undo_it_twice(master: Master) -> None:
    """SIGKILL (SSM's executionTimeout) lands between `rollout undo` and the line that records
    it: the rollback entry point must see that the undo happened. A second undo of a
    Deployment goes back to the failed template."""
    master.cluster.seed(as_yaml(platform()))
    master.cluster.break_image("api:v2", "ImagePullBackOff")
    real = master.bin / "kubectl"
    killer = master.root / "killer-bin"
    killer.mkdir()
    wrapper = killer / "kubectl"
    # After the first undo has gone through, the whole process group dies at once.
    wrapper.write_text(
        "#!/bin/sh\n"
        f'"{real}" "$@"; rc=$?\n'
        'case "$*" in *"rollout undo"*) [ -e "$0.fired" ] || { : >"$0.fired"; kill -KILL 0; } ;; esac\n'
        "exit $rc\n")
    wrapper.chmod(0o755)
    argv = master.command("deploy", "deploy-9", "--bundle", str(master.bundle(
        platform(api_image="api:v2"))), timeout=30, rollback_timeout=15)
    process = subprocess.Popen(argv, env=master.env(path=f"{killer}:{master.bin}:{os.environ['PATH']}"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    stdout, _ = process.communicate(timeout=90)
    assert process.returncode == -signal.SIGKILL, stdout
    assert (killer / "kubectl.fired").exists()
    # The undo went through before the kill.
    assert master.cluster.image_of("deployment", NS, "api") == "api:v1"

    run = master.rollback("deploy-9")

    assert master.cluster.image_of("deployment", NS, "api") == "api:v1", run.stdout
    assert run.report["rollback"] == "done", run.stdout
    assert "already rolled back" in run.stdout
    assert not (master.state_root / "deploy-9").exists()


# -- fail fast: every back-off reason, with what a user needs to fix it ---------------------------

BACKOFF_REASONS = ["CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
                   "ErrImageNeverPull", "CreateContainerConfigError", "CreateContainerError",
                   "RunContainerError"]
PULL_REASONS = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"}


@pytest.mark.parametrize("reason", BACKOFF_REASONS)
def test_each_back_off_reason_fails_fast_naming_pod_container_reason_message_and_log(
        master: Master, reason: str) -> None:
    master.cluster.seed(as_yaml(platform()))
    master.cluster.break_image("api:v2", reason, log="connecting to redis:6379\npanic: boom")

    # No progress deadline to help (600 s): only the pod checks can stop this early.
    run = master.deploy(platform(api_image="api:v2"), timeout=120)

    assert run.code == 7, run.stdout
    report = run.report
    assert (report["step"], report["rollback"]) == ("rollout", "done")
    failure = report["failure"]
    assert failure["workload"] == "deployment/api"
    assert failure["namespace"] == NS
    assert failure["pod"].startswith("api-")
    assert (failure["container"], failure["reason"]) == ("api", reason)
    assert failure["message"]
    for part in (failure["pod"], "container api", reason):
        assert part in report["message"]
    if reason == "CrashLoopBackOff":
        # The crashed container's own last words (kubectl logs --previous).
        assert failure["log"] == ["connecting to redis:6379", "panic: boom"]
        assert "log ends: panic: boom" in report["message"]
        assert "back-off" in failure["message"]
    elif reason in PULL_REASONS:
        assert failure["log"] == []  # no image, no log
    else:
        assert failure["log"] and failure["log"][0].startswith("(no log:")
    assert master.cluster.image_of("deployment", NS, "api") == "api:v1"


def test_crash_loop_with_a_600_s_timeout_fails_after_a_few_pod_checks(master: Master) -> None:
    """The issue's "done when": a 600 s budget, no progress deadline, a crash-looping rollout.
    The outcome is asserted (failed by the pod checks after a few of them, not timed out); the
    seconds are printed for the record, never asserted."""
    master.cluster.seed(as_yaml(platform()))
    master.cluster.break_image("api:v2", "CrashLoopBackOff", log="panic: boom")
    calls = master.root / "calls.jsonl"
    bundle = master.bundle(platform(api_image="api:v2"))

    run = master.run(master.command("deploy", "deploy-1", "--bundle", str(bundle), timeout=600,
                                    rollback_timeout=60),
                     env=master.env(KUBECTL_DOUBLE_LOG=str(calls)))

    assert run.code == 7, run.stdout
    assert (run.report["result"], run.report["step"]) == ("failed", "rollout")
    assert run.report["failure"]["reason"] == "CrashLoopBackOff"
    assert "which does not clear by itself" in run.report["message"]
    assert "was not ready in time" not in run.stdout
    # A few 3 s slices of `rollout status` for the api before it gave up (the undo's own wait
    # comes after): the kubelet needs two restarts (about 10 s) to call it a crash loop.
    argvs = [json.loads(line) for line in calls.read_text().splitlines()]
    first_undo = next(i for i, a in enumerate(argvs) if a[:2] == ["rollout", "undo"])
    checks = [a for a in argvs[:first_undo] if a[:3] == ["rollout", "status", "deployment/api"]]
    assert 2 <= len(checks) <= 10, len(checks)
    print(f"crash loop with timeout 600 s: failed after {len(checks)} pod checks, "
          f"{run.seconds:.1f} s")


def test_progress_deadline_stops_at_once_and_names_the_stuck_pod(master: Master) -> None:
    master.cluster.seed(as_yaml(platform(progress_deadline=2)))
    # Never a back-off: only the Deployment's own deadline says it is stuck.
    master.cluster.break_image("api:v2", "ContainerCreating")

    run = master.deploy(platform(api_image="api:v2", progress_deadline=2), timeout=120)

    assert run.code == 7, run.stdout
    assert "ProgressDeadlineExceeded" in run.report["message"]
    assert run.report["failure"]["reason"] == "ContainerCreating"
    assert run.report["failure"]["pod"].startswith("api-")


def test_an_unchanged_workload_that_crash_loops_fails_fast_too(master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))
    # redis is not part of the change, but its running pod crash-loops: the deploy cannot be
    # called healthy, and there is no new pod to wait for.
    master.cluster.break_image("redis:7.2", "CrashLoopBackOff")

    run = master.deploy(platform(api_image="api:v2"), timeout=120)

    assert run.code == 7, run.stdout
    assert run.report["failure"]["workload"] == "statefulset/redis"
    assert run.workload("redis")["result"] == "failed"
    # api changed (it was applied with the rest) and is undone; redis had nothing to undo.
    assert run.workload("api")["result"] == "rolled-back"


# -- proving health ---------------------------------------------------------------------------


def test_a_workload_that_breaks_after_its_rollout_fails_the_health_check(master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))
    master.cluster.slow_rollout("deployment", NS, "api", 5)
    process = master.start(platform(api_image="api:v2"), "deploy-h", timeout=60)
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(f"statefulset/redis in {NS}: rolled out"):
            break
    # redis has rolled out (unchanged); it breaks while the api is still rolling out.
    master.cluster.break_image("redis:7.2", "CrashLoopBackOff")

    run = master.finished(process)
    run.stdout = "".join(seen) + run.stdout

    assert run.code == 7, run.stdout
    assert run.report["step"] == "verify"
    assert "health check failed: statefulset/redis" in run.report["message"]
    assert run.report["failure"]["reason"] == "CrashLoopBackOff"
    assert run.workload("api")["result"] == "rolled-back"


def test_the_report_lists_desired_ready_updated_and_revisions_per_workload(
        master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))

    run = master.deploy(platform(worker_image="worker:v2"))

    assert run.code == 0, run.stdout
    assert "verifying health" in run.stdout
    workloads = {w["name"]: w for w in run.report["workloads"]}
    assert {n: (w["desired"], w["ready"], w["updated"]) for n, w in workloads.items()} == {
        "redis": (1, 1, 1), "api": (2, 2, 2), "worker": (1, 1, 1)}
    assert (workloads["worker"]["revision_before"], workloads["worker"]["revision_after"],
            workloads["worker"]["result"]) == ("1", "2", "ready")
    assert (workloads["api"]["revision_before"], workloads["api"]["revision_after"],
            workloads["api"]["result"]) == ("1", "1", "unchanged")


# -- the server-side dry run: a bad document fails with nothing applied ---------------------------


def test_server_dry_run_rejects_an_immutable_change_before_anything_is_applied(
        master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))
    before = master.objects()
    docs = platform(api_image="api:v2")
    docs[1] = configmap(LOG_LEVEL="debug")
    moved = docs[4]
    moved["spec"]["selector"]["matchLabels"]["tier"] = "web"  # immutable in a Deployment
    moved["spec"]["template"]["metadata"]["labels"]["tier"] = "web"

    run = master.deploy(docs)

    assert run.code == 5, run.stdout
    assert (run.report["step"], run.report["rollback"]) == ("check", "not-needed")
    assert "server-side dry run rejected bundle/6-workloads.yaml" in run.report["message"]
    assert "field is immutable" in run.report["message"]
    # Not even the ConfigMap of the earlier phase changed.
    assert master.objects() == before
    assert master.lock_holder() == ""


def test_without_the_server_dry_run_the_same_bundle_is_half_applied(master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))
    docs = platform()
    docs[1] = configmap(LOG_LEVEL="debug")
    docs[4]["spec"]["selector"]["matchLabels"]["tier"] = "web"
    docs[4]["spec"]["template"]["metadata"]["labels"]["tier"] = "web"

    run = master.deploy(docs, server_dry_run=False)

    assert run.code == 9, run.stdout
    assert "server-side dry run skipped" in run.stdout
    assert master.cluster.get("configmap", NS, "app-config")["data"] == {"LOG_LEVEL": "debug"}


def test_server_dry_run_rejects_what_an_admission_webhook_refuses(master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))
    before = master.objects()
    master.cluster.fail_apply("deployment", "worker")

    run = master.deploy(platform(api_image="api:v2", worker_image="worker:v2"))

    assert run.code == 5, run.stdout
    assert "denied the request" in run.report["message"]
    assert master.objects() == before


def test_first_deploy_into_a_new_namespace_checks_its_objects_client_side_and_says_so(
        master: Master) -> None:
    run = master.deploy(platform())

    assert run.code == 0, run.stdout
    assert "namespace/production-platform created (server dry run)" in run.stdout
    assert ("namespace production-platform is new: its objects (configmap/app-config, "
            "service/api, statefulset/redis, deployment/api, deployment/worker) had the "
            "client-side check only") in run.stdout


def test_a_configmap_only_deploy_refused_by_the_server_changes_nothing(master: Master) -> None:
    master.cluster.seed(as_yaml([namespace(), deployment("api", "api:v1")]))
    before = master.objects()
    master.cluster.fail_apply("configmap", "app-config")

    run = master.deploy([configmap()], namespace=NS)

    assert run.code == 5, run.stdout
    assert run.report["rollback"] == "not-needed"
    assert master.objects() == before


# -- failing after changes: each step in turn ----------------------------------------------------


def test_apply_failure_rolls_back_the_workload_applied_before_it(master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))
    master.cluster.fail_apply("deployment", "worker", on_dry_run=False)

    run = master.deploy(platform(api_image="api:v2", worker_image="worker:v2"))

    assert run.code == 7, run.stdout
    assert (run.report["step"], run.report["rollback"]) == ("apply", "done")
    assert "kubectl apply -f bundle/6-workloads.yaml failed" in run.report["message"]
    assert run.workload("api")["result"] == "rolled-back"
    assert master.cluster.image_of("deployment", NS, "api") == "api:v1"
    assert master.cluster.revision("deployment", NS, "worker") == "1"


def test_a_failing_undo_is_reported_as_a_failed_rollback(master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))
    master.cluster.break_image("api:v2", "ImagePullBackOff")
    master.cluster.fail_undo("deployment", "api")

    run = master.deploy(platform(api_image="api:v2"))

    assert run.code == 8, run.stdout
    assert (run.report["result"], run.report["rollback"]) == ("failed", "failed")
    assert "rollback failed: deployment/api" in run.report["message"]
    assert master.lock_holder() == ""


# -- traceability ---------------------------------------------------------------------------------


def test_annotations_name_the_deploy_and_never_change_a_revision(master: Master) -> None:
    first = master.deploy(platform(), "deploy-1", commit="c0ffee1", run_url="https://x/runs/1")
    assert first.code == 0, first.stdout
    revisions = {name: master.cluster.revision(kind, NS, name)
                 for kind, name in [("statefulset", "redis"), ("deployment", "api")]}

    again = master.deploy(platform(), "deploy-2", commit="c0ffee2", run_url="https://x/runs/2")

    assert again.code == 0, again.stdout
    for kind, name in [("statefulset", "redis"), ("deployment", "api")]:
        assert master.cluster.revision(kind, NS, name) == revisions[name]
        assert again.workload(name)["result"] == "unchanged"
        trace = master.trace(kind, name)
        assert (trace["commit-sha"], trace["run-url"], trace["deploy-id"]) == (
            "c0ffee2", "https://x/runs/2", "deploy-2")
        # Only the workload's own metadata: the pod template (and so the pods) is untouched.
        template = master.cluster.get(kind, NS, name)["spec"]["template"]
        assert "annotations" not in template["metadata"]


def test_a_rolled_back_workload_gets_its_previous_annotations_back(master: Master) -> None:
    assert master.deploy(platform(), "deploy-1", commit="c0ffee1").code == 0
    master.cluster.break_image("api:v2", "ErrImagePull")

    run = master.deploy(platform(api_image="api:v2"), "deploy-2", commit="c0ffee2")

    assert run.code == 7, run.stdout
    # api runs deploy-1's template again, and says so; worker was applied by deploy-2.
    assert master.trace("deployment", "api")["deploy-id"] == "deploy-1"
    assert master.trace("deployment", "api")["commit-sha"] == "c0ffee1"
    assert master.trace("deployment", "worker")["deploy-id"] == "deploy-2"


# -- one deploy at a time -------------------------------------------------------------------------


def test_a_second_deploy_waits_for_the_lock_then_fails_naming_the_holder(master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))
    master.cluster.slow_rollout("deployment", NS, "api", 6)
    first = master.start(platform(api_image="api:v2"), "deploy-a",
                         run_url="https://github.com/o/r/actions/runs/1")
    master.wait_for_holder("deploy-a")

    second = master.deploy(platform(worker_image="worker:v2"), "deploy-b", lock_timeout=2)

    assert second.code == 6, second.stdout
    assert (second.report["step"], second.report["rollback"]) == ("lock", "not-needed")
    message = second.report["message"]
    assert "another deploy holds the cluster's deploy lock" in message
    assert "deploy deploy-a of https://github.com/o/r/actions/runs/1 since 20" in message
    assert "waited 2s" in message
    assert master.cluster.image_of("deployment", NS, "worker") == "worker:v1"
    done = master.finished(first)
    assert done.code == 0, done.stdout
    assert master.lock_holder() == ""


def test_a_second_deploy_that_may_wait_long_enough_runs_after_the_first(master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))
    master.cluster.slow_rollout("deployment", NS, "api", 4)
    first = master.start(platform(api_image="api:v2"), "deploy-a")
    master.wait_for_holder("deploy-a")

    second = master.deploy(platform(api_image="api:v2", worker_image="worker:v2"), "deploy-b",
                           lock_timeout=60)

    assert second.code == 0, second.stdout
    assert "waiting up to 60s for the deploy lock: held by deploy deploy-a" in second.stdout
    assert "lock taken over (it was released)" in second.stdout
    assert master.finished(first).code == 0
    assert master.cluster.image_of("deployment", NS, "worker") == "worker:v2"


def test_two_deploys_started_at_once_never_both_take_the_lock(master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))
    master.cluster.slow_rollout("deployment", NS, "api", 3)
    runs = [master.start(platform(api_image=f"api:v{n}"), f"deploy-{n}", lock_timeout=0)
            for n in (2, 3)]

    results = [master.finished(process) for process in runs]

    assert sorted(run.code for run in results) == [0, 6], [run.stdout for run in results]
    winner = next(run for run in results if run.code == 0)
    loser = next(run for run in results if run.code == 6)
    assert f": deploy {winner.report['deploy_id']} since " in loser.report["message"]
    version = winner.report["deploy_id"].removeprefix("deploy-")
    assert master.cluster.image_of("deployment", NS, "api") == f"api:v{version}"
    assert master.lock_holder() == ""


def test_an_expired_lock_of_a_dead_deploy_is_taken_over(master: Master) -> None:
    master.cluster.seed(as_yaml([namespace(), {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "k3s-deploy-lock", "namespace": "kube-system"},
        "spec": {"holderIdentity": "crashed-deploy", "leaseDurationSeconds": 60,
                 "acquireTime": "2020-01-01T00:00:00.000000Z",
                 "renewTime": "2020-01-01T00:00:00.000000Z"}}]))

    run = master.deploy([configmap()], lock_timeout=0)

    assert run.code == 0, run.stdout
    assert "lock taken over (it was held by deploy crashed-deploy since 2020-01-01" in run.stdout
    assert master.lock_holder() == ""


def test_a_lease_with_no_renew_time_is_never_taken_over(master: Master) -> None:
    """`date -d ""` succeeds (midnight today): an empty renewTime once made the lease look
    expired, so another deploy's lock was stolen."""
    master.cluster.seed(as_yaml([namespace(), {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "k3s-deploy-lock", "namespace": "kube-system"},
        "spec": {"holderIdentity": "other-deploy", "leaseDurationSeconds": 1}}]))

    run = master.deploy([configmap()], lock_timeout=0)

    assert run.code == 6, run.stdout
    assert master.lock_holder() == "other-deploy"


def test_a_rollback_state_line_without_a_key_is_skipped_not_fatal(master: Master) -> None:
    """A kill can cut undone.tsv / undoing.tsv short: a line with no key once aborted the
    rollback (bash refuses an empty subscript) with no report and the lock held."""
    master.cluster.seed(as_yaml(platform()))
    _kill_once_applied(master, "deploy-k", "api", platform(api_image="api:v2"))
    state = master.state_root / "deploy-k"
    (state / "undone.tsv").write_text("\t3\n")
    (state / "undoing.tsv").write_text("\n\t\n")

    run = master.rollback("deploy-k")

    assert run.code == 10, run.stdout
    assert run.report["rollback"] == "done"
    assert master.cluster.image_of("deployment", NS, "api") == "api:v1"
    assert master.lock_holder() == ""


@pytest.mark.parametrize("code", [4, 5, 7, 9])
def test_the_lock_is_released_on_every_exit_path(master: Master, code: int) -> None:
    master.cluster.seed(as_yaml(platform()))
    options: dict[str, object] = {}
    if code == 4:
        # The API goes away right after the lock was taken.
        master.cluster.set_api_healthy(True)
        docs = platform()
        options["kubectl"] = str(master.bin / "flaky-kubectl")
        (master.bin / "flaky-kubectl").write_text(
            f'#!/bin/sh\nif [ "$1" = get ] && [ "$2" = namespace ]; then exit 1; fi\n'
            f'exec "{master.bin}/kubectl" "$@"\n')
        (master.bin / "flaky-kubectl").chmod(0o755)
    elif code == 5:
        docs = [configmap(), {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}]
    elif code == 7:
        master.cluster.break_image("api:v2", "ImagePullBackOff")
        docs = platform(api_image="api:v2")
    else:
        master.cluster.break_image("api:v2", "ImagePullBackOff")
        docs = platform(api_image="api:v2")
        options["rollback"] = False

    run = master.deploy(docs, **options)

    assert run.code == code, run.stdout
    assert master.lock_holder() == ""
    assert "deploy lock released" in run.stdout


# -- dry run ----------------------------------------------------------------------------------------


def test_dry_run_shows_the_diff_and_changes_nothing(master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))
    before = master.cluster.objects()
    docs = platform(api_image="api:v2")
    docs[1] = configmap(LOG_LEVEL="debug")

    run = master.dry_run(docs)

    assert run.code == 0, run.stdout
    report = run.report
    assert (report["mode"], report["result"], report["step"]) == ("dry-run", "success", "done")
    assert sorted(report["changes"]) == ["apps.v1.Deployment.production-platform.api",
                                         "v1.ConfigMap.production-platform.app-config"]
    assert "2 object(s) would change" in report["message"]
    assert "-      - image: api:v1\n+      - image: api:v2" in run.diff
    assert "-  LOG_LEVEL: info\n+  LOG_LEVEL: debug" in run.diff
    assert "server-side dry run ok" in run.stdout
    # Nothing changed, and no lock was taken.
    assert master.cluster.objects() == before
    assert master.lock() is None


def test_dry_run_needs_no_lock_and_ignores_one_that_is_held(master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))
    master.cluster.slow_rollout("deployment", NS, "api", 5)
    deploy = master.start(platform(api_image="api:v2"), "deploy-a")
    master.wait_for_holder("deploy-a")

    run = master.dry_run(platform(api_image="api:v3"))

    assert run.code == 0, run.stdout
    assert master.lock_holder() == "deploy-a"
    assert master.finished(deploy).code == 0


def test_dry_run_of_a_first_deploy_lists_what_a_new_namespace_would_get(master: Master) -> None:
    run = master.dry_run(platform())

    assert run.code == 0, run.stdout
    changes = run.report["changes"]
    assert "v1.Namespace..production-platform" in changes
    assert "deployment/api in production-platform (new namespace: would be created)" in changes
    assert master.cluster.get("namespace", "", NS) is None


def test_dry_run_with_no_differences_says_so(master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))

    run = master.dry_run(platform())

    assert run.code == 0, run.stdout
    assert run.report["changes"] == []
    assert "already matches" in run.report["message"]
    assert run.diff == ""


def test_dry_run_of_a_bad_document_fails_and_changes_nothing(master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))
    before = master.cluster.objects()
    docs = platform()
    docs[4]["spec"]["selector"]["matchLabels"]["tier"] = "web"
    docs[4]["spec"]["template"]["metadata"]["labels"]["tier"] = "web"

    run = master.dry_run(docs)

    assert run.code == 5, run.stdout
    assert "field is immutable" in run.report["message"]
    assert master.cluster.objects() == before


def test_a_long_diff_is_cut_to_fit(master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))
    docs = platform()
    docs[1] = configmap(**{f"KEY_{i}": "x" * 80 for i in range(100)})

    run = master.dry_run(docs, max_diff_bytes=2000)

    assert run.code == 0, run.stdout
    assert len(run.diff) < 2200
    assert "diff cut at" in run.diff


def test_dry_run_without_diff_on_the_master_names_it(master: Master) -> None:
    env = master.env(path=path_without(master.root, "diff", master.bin))
    bundle = master.bundle(platform())

    run = master.run(["/usr/bin/bash", str(script()), "dry-run", "--deploy-id", "d1", "--bundle",
                      str(bundle), "--state-dir", str(master.state_root)], env=env)

    assert run.code == 3, run.stdout
    assert "missing: diff" in run.report["message"]


# -- hostile cluster content ----------------------------------------------------------------------


def test_a_pod_whose_owner_reference_is_crafted_runs_nothing(master: Master, tmp_path: Path) -> None:
    """Anyone who may create pods in a watched namespace can write any text into a pod's
    ownerReferences. The rollout watch once split it out of a line, and a shifted field reached
    bash arithmetic, which runs `$(...)` in an array subscript: root on the master. Pods are
    now selected by their owner's UID and every field is checked (tests/real has the same test
    on the real API)."""
    marker = tmp_path / "pwned"
    master.cluster.seed(as_yaml(platform()))
    rs_uid = subprocess.run(
        ["kubectl", "get", "replicasets", "-n", NS, "-o",
         "jsonpath={.items[?(@.metadata.labels.app==\"api\")].metadata.uid}"],
        env=master.env(), capture_output=True, text=True, check=True).stdout.split()[0]
    payload = (f"ReplicaSet|api-x|2999-01-01T00:00:00Z|x||Running|false|"
               f"BASH_VERSINFO[$(touch${{IFS}}{marker})]|")
    master.cluster.seed(as_yaml([{
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "planted", "namespace": NS, "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": payload, "name": "api-x", "uid": rs_uid,
            "controller": False}]},
        "spec": {"containers": [{"name": "c", "image": "busybox:1"}]}}]))
    master.cluster.slow_rollout("deployment", NS, "api", 8)

    run = master.deploy(platform(api_image="api:v2"))

    assert not marker.exists(), "a pod's metadata ran a command on the master"
    assert run.code == 0, run.stdout


def test_objects_whose_names_are_not_dns_names_pass_the_check(master: Master) -> None:
    """RBAC names may hold colons and capitals (system:..., acme:Reader): the bundle's index
    carries them as they are."""
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "acme:Reader"}, "rules": []}

    run = master.deploy([namespace(), role, configmap()])

    assert run.code == 0, run.stdout


def _start_with_beat(master: Master, docs: list[dict], deploy_id: str, **options: object
                     ) -> subprocess.Popen:
    """A deploy whose lease heartbeat beats every second (K3S_DEPLOY_LEASE_RENEW_SECONDS)."""
    options.setdefault("timeout", 60)
    options.setdefault("rollback_timeout", 15)
    argv = master.command("deploy", deploy_id, "--bundle", str(master.bundle(docs)), **options)
    return subprocess.Popen(argv, env=master.env(K3S_DEPLOY_LEASE_RENEW_SECONDS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_the_lease_is_renewed_while_the_deploy_runs_and_lasts_the_longest_command(
        master: Master) -> None:
    """#15 finding 2: the lease is held for as long as the deploy runs, however long its calls
    take: a heartbeat renews it; it lasts lock-timeout + timeout + rollback-timeout + 60 s."""
    master.cluster.seed(as_yaml(platform()))
    master.cluster.slow_rollout("deployment", NS, "api", 6)
    process = _start_with_beat(master, platform(api_image="api:v2"), "deploy-beat",
                               lock_timeout=30, timeout=60, rollback_timeout=15)
    master.wait_for_holder("deploy-beat")
    seen: list[tuple[str, str, str]] = []
    while process.poll() is None:
        lease = master.lock()
        if lease and lease["spec"].get("holderIdentity") == "deploy-beat":
            spec = lease["spec"]
            seen.append((spec["acquireTime"], spec["renewTime"], lease["metadata"]["resourceVersion"]))
            assert spec["leaseDurationSeconds"] == 30 + 60 + 15 + 60
        time.sleep(0.2)
    run = master.finished(process)

    assert run.code == 0, run.stdout
    assert len({acquired for acquired, _, _ in seen}) == 1, "a renewal changed acquireTime"
    assert len({renewed for _, renewed, _ in seen}) >= 3, seen  # renewed, not only taken
    assert master.lock_holder() == ""  # released at the version the last renewal left


def test_a_deploy_whose_lease_is_taken_stops_and_undoes_nothing(master: Master) -> None:
    """#15 finding 2: someone takes the lease while the deploy waits for its rollout. The
    deploy must stop, change nothing more (no undo: that would race the new holder), and leave
    the new holder's lease alone."""
    master.cluster.seed(as_yaml(platform()))
    master.cluster.slow_rollout("deployment", NS, "api", 60)
    process = _start_with_beat(master, platform(api_image="api:v2"), "deploy-lost")
    deadline = time.monotonic() + 30
    while master.cluster.revision("deployment", NS, "api") != "2":
        assert time.monotonic() < deadline, "the deploy never applied"
        time.sleep(0.1)
    # The intruder takes the lease as a contender would: read, then a conditional replace, read
    # again when the heartbeat renewed it in between (a Conflict).
    for _ in range(20):
        lease = master.lock()
        assert lease is not None
        lease["spec"]["holderIdentity"] = "intruder"
        lease["metadata"]["annotations"] = {}
        taken = subprocess.run([str(master.bin / "kubectl"), "replace", "-f", "-"],
                               input=json.dumps(lease), env=master.env(), capture_output=True,
                               text=True, check=False)
        if taken.returncode == 0:
            break
        assert "Conflict" in taken.stderr or "modified" in taken.stderr, taken.stderr
    else:
        raise AssertionError("the intruder never took the lease")
    run = master.finished(process)

    assert run.code == 8, run.stdout
    assert "the deploy lock was taken by someone else while waiting for " in run.stdout, run.stdout
    assert "nothing undone" in run.stdout
    assert master.cluster.image_of("deployment", NS, "api") == "api:v2"
    assert master.lock_holder() == "intruder"


# -- migration Jobs -------------------------------------------------------------------------------


def test_a_job_runs_between_the_statefulsets_and_the_deployments(master: Master) -> None:
    run = master.deploy([*platform(), job(image="api:v1")])

    assert run.code == 0, run.stdout
    out = run.stdout
    assert (out.index("waiting for statefulset/redis") < out.index("kubectl apply -f bundle/jobs/1.yaml")
            < out.index("job/migrate in production-platform: completed")
            < out.index("kubectl apply -f bundle/6-workloads.yaml"))
    assert run.report["jobs"] == [{"namespace": NS, "name": "migrate", "result": "completed"}]
    assert "ran job/migrate" in run.report["message"]
    live = master.cluster.get("Job", NS, "migrate")
    assert live["metadata"]["annotations"]["k3s-deploy-action/job-hash"]


def test_a_job_with_the_same_hash_that_completed_is_not_run_again_and_a_changed_one_is_replaced(
        master: Master) -> None:
    assert master.deploy([*platform(), job(image="api:v1")], "deploy-1").code == 0
    first = master.cluster.get("Job", NS, "migrate")["metadata"]["uid"]

    again = master.deploy([*platform(), job(image="api:v1")], "deploy-2")
    assert again.code == 0, again.stdout
    assert again.report["jobs"][0]["result"] == "unchanged"
    assert master.cluster.get("Job", NS, "migrate")["metadata"]["uid"] == first

    changed = master.deploy([*platform(api_image="api:v2"), job(image="api:v2")], "deploy-3")
    assert changed.code == 0, changed.stdout
    assert "replacing job/migrate" in changed.stdout
    replaced = master.cluster.get("Job", NS, "migrate")
    assert replaced["metadata"]["uid"] != first
    assert replaced["spec"]["template"]["spec"]["containers"][0]["image"] == "api:v2"


def test_a_job_left_running_by_a_cancel_is_waited_for_by_the_next_deploy_not_run_again(
        master: Master) -> None:
    """A cancel does not stop a running migration (killing it half-way is worse than letting it
    end); the next deploy with the same Job waits for that run instead of starting another."""
    master.cluster.seed(as_yaml(platform()))
    master.cluster.slow_rollout("job", NS, "migrate", 15)
    docs = [*platform(), job(image="api:v1")]
    process = subprocess.Popen(master.command("deploy", "deploy-c", "--bundle", str(master.bundle(docs)),
                                              timeout=60, rollback_timeout=15),
                               env=master.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + 20
    while master.cluster.job_runs(NS, "migrate") == 0:
        assert time.monotonic() < deadline, "the Job never started"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGTERM)
    assert master.finished(process).code == 143
    running = master.cluster.get("Job", NS, "migrate")
    assert running is not None and not (master.cluster.job_status(NS, "migrate") or {}).get("succeeded")

    run = master.deploy(docs, "deploy-d", timeout=60)

    assert run.code == 0, run.stdout
    assert master.cluster.job_runs(NS, "migrate") == 1
    assert master.cluster.get("Job", NS, "migrate")["metadata"]["uid"] == running["metadata"]["uid"]
    assert master.cluster.job_status(NS, "migrate").get("succeeded") == 1
    assert f"job/migrate in {NS} is still running with this spec" in run.stdout
    assert "replacing job/migrate" not in run.stdout
    assert run.report["jobs"][0]["result"] == "completed", run.report


def test_a_failing_job_stops_the_deploy_before_any_deployment_changes(master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))
    master.cluster.break_image("api:v2", "CrashLoopBackOff", log="migration 0042 failed: no such column")
    before = master.cluster.revision("deployment", NS, "api")

    run = master.deploy([*platform(api_image="api:v2"), job(image="api:v2")])

    assert run.code == 9, run.stdout  # failed, nothing rolled back
    report = run.report
    assert report["result"] == "failed" and report["step"] == "jobs"
    assert report["jobs"] == [{"namespace": NS, "name": "migrate", "result": "failed"}]
    assert report["failure"]["workload"] == "job/migrate"
    assert report["failure"]["log"][-1] == "migration 0042 failed: no such column"
    assert "were not applied" in report["message"]
    assert "kubectl apply -f bundle/6-workloads.yaml" not in run.stdout
    assert master.cluster.revision("deployment", NS, "api") == before
    assert master.cluster.image_of("deployment", NS, "api") == "api:v1"


def test_a_job_whose_image_cannot_be_pulled_fails_fast(master: Master) -> None:
    master.cluster.break_image("api:missing", "ImagePullBackOff")

    run = master.deploy([*platform(), job(image="api:missing")], timeout=60)

    assert run.code == 9, run.stdout
    assert "which does not clear by itself" in run.report["message"]
    assert run.report["failure"]["reason"] in ("ImagePullBackOff", "ErrImagePull")
    assert run.seconds < 30, run.stdout


def test_the_dry_run_says_what_would_happen_to_each_job_and_changes_nothing(master: Master) -> None:
    assert master.deploy([*platform(), job(image="api:v1"), job("seed", "api:v1")]).code == 0
    uid = master.cluster.get("Job", NS, "migrate")["metadata"]["uid"]

    run = master.dry_run([*platform(), job(image="api:v2"), job("seed", "api:v1"), job("reindex")])

    assert run.code == 0, run.stdout
    changes = run.report["changes"]
    assert "job/migrate in production-platform (would be replaced and run again)" in changes
    assert "job/reindex in production-platform (would run)" in changes
    assert not any("seed" in change for change in changes)
    assert master.cluster.get("Job", NS, "migrate")["metadata"]["uid"] == uid
    assert master.cluster.get("Job", NS, "reindex") is None


def test_a_statefulset_that_fails_before_the_jobs_runs_no_job_and_changes_no_deployment(
        master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))
    master.cluster.break_image("redis:8", "CrashLoopBackOff")

    run = master.deploy([*platform(redis_image="redis:8", api_image="api:v2"), job(image="api:v2")])

    assert run.code == 7, run.stdout  # failed, the StatefulSet rolled back
    assert "no Job was run, and the Deployments and DaemonSets were not applied" in run.report["message"]
    assert run.report["jobs"] == [{"namespace": NS, "name": "migrate", "result": "not-run"}]
    assert master.cluster.get("Job", NS, "migrate") is None
    assert master.cluster.image_of("deployment", NS, "api") == "api:v1"
    assert master.cluster.image_of("statefulset", NS, "redis") == "redis:7.2"


# -- live progress (55-progress.sh) ---------------------------------------------------------------

PROGRESS_OPTIONS = ("progress-to=s3://k3s-deploy-x/k3s-deploy/d-1/progress/\nprogress-region=eu-west-1\n"
                    "progress-owner=123456789012\n")
FAKE_AWS = """#!/bin/bash
# Records each call; copies the body of a put-object to SINK/N.log (FAIL=1: refuses like S3).
sink=$(dirname "$0")/../sink
mkdir -p "$sink"
printf '%s\\n' "$*" >>"$sink/calls"
if [[ -e "$sink/FAIL" ]]; then
  echo "An error occurred (AccessDenied) when calling the PutObject operation: Access Denied" >&2
  exit 254
fi
while (($#)); do
  if [[ "$1" == --body ]]; then cp -- "$2" "$sink/$(wc -l <"$sink/calls").log"; fi
  shift
done
"""


def progress_master(master: Master, fail: bool = False) -> tuple[Path, dict[str, str]]:
    tools = master.root / "aws-cli" / "bin"
    tools.mkdir(parents=True)
    (tools / "aws").write_text(FAKE_AWS)
    (tools / "aws").chmod(0o755)
    sink = master.root / "aws-cli" / "sink"
    sink.mkdir()
    if fail:
        (sink / "FAIL").touch()
    env = master.env(path=f"{tools}:{master.bin}:{os.environ['PATH']}",
                     AWS_SSM_INSTANCE_ID="i-0123456789abcdef0", K3S_DEPLOY_PROGRESS_SECONDS="1")
    return sink, env


def test_progress_puts_the_step_lines_while_the_deploy_runs_and_once_at_the_end(master: Master) -> None:
    sink, env = progress_master(master)
    master.cluster.slow_rollout("deployment", NS, "api", 4)
    bundle = master.bundle(platform(), PROGRESS_OPTIONS)

    run = master.run(master.command("deploy", "d-1", "--bundle", str(bundle), timeout=60,
                                    rollback_timeout=15), env)

    assert run.code == 0, run.stdout
    calls = (sink / "calls").read_text().splitlines()
    assert len(calls) >= 2, calls  # while it ran, and the last one
    assert all("s3api put-object --region eu-west-1 --bucket k3s-deploy-x "
               "--key k3s-deploy/d-1/progress/i-0123456789abcdef0.log" in call for call in calls), calls
    assert all("--expected-bucket-owner 123456789012" in call for call in calls)
    last = (sink / f"{len(calls)}.log").read_text().splitlines()
    # Step lines with the time, the run's summary too; not kubectl's own output.
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d .+", line) for line in last), last
    assert any("==> waiting for deployment/api" in line for line in last), "\n".join(last)
    assert any(f"deployment/api in {NS}: rolled out, ready" in line for line in last), last
    assert any(line.endswith(f" {run.report['message']}") for line in last), last
    assert not any(re.search(r" (created|configured|unchanged)$", line) for line in last), last
    assert "live progress is off" not in run.stdout


def test_refused_uploads_turn_progress_off_once_and_the_deploy_goes_on(master: Master) -> None:
    sink, env = progress_master(master, fail=True)
    master.cluster.slow_rollout("deployment", NS, "api", 6)
    bundle = master.bundle(platform(), PROGRESS_OPTIONS)

    run = master.run(master.command("deploy", "d-1", "--bundle", str(bundle), timeout=60,
                                    rollback_timeout=15), env)

    assert run.code == 0, run.stdout
    assert run.report["result"] == "success"
    said = [line for line in run.stdout.splitlines() if line.startswith("live progress is off:")]
    assert len(said) == 1 and "the upload failed 3 times" in said[0] and "AccessDenied" in said[0], run.stdout
    assert len((sink / "calls").read_text().splitlines()) == 3  # no last put once it is off


def test_progress_without_an_instance_id_is_off_and_changes_nothing_else(master: Master) -> None:
    _, env = progress_master(master)
    del env["AWS_SSM_INSTANCE_ID"]
    bundle = master.bundle(platform(), PROGRESS_OPTIONS)

    run = master.run(master.command("deploy", "d-1", "--bundle", str(bundle), timeout=60,
                                    rollback_timeout=15), env)

    assert run.code == 0, run.stdout
    assert "live progress is off: the SSM agent gave no instance id" in run.stdout


def test_a_signal_stops_progress_before_the_rollback_and_puts_nothing_after(master: Master) -> None:
    """After a cancel the action deletes the staging area while the script is still stopping:
    a put made during the script's rollback would land after that and be left behind. So the
    uploader stops first thing on a signal, with no last put, even when the signal reaches the
    script's shell alone."""
    sink, env = progress_master(master)
    # The undo takes a few of the uploader's 1 s turns, as on a busy API server.
    slow = master.root / "slow-undo-bin"
    slow.mkdir()
    (slow / "kubectl").write_text('#!/bin/sh\ncase "$*" in *"rollout undo"*) sleep 3 ;; esac\n'
                                  f'exec "{master.bin}/kubectl" "$@"\n')
    (slow / "kubectl").chmod(0o755)
    env["PATH"] = f"{slow}:{env['PATH']}"
    master.cluster.seed(as_yaml(platform()))
    master.cluster.slow_rollout("deployment", NS, "api", 120)
    argv = master.command("deploy", "deploy-p", "--bundle", str(master.bundle(
        platform(api_image="api:v2"), PROGRESS_OPTIONS)), timeout=120)
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + 20
    while not list(sink.glob("*.log")) or master.cluster.revision("deployment", NS, "api") != "2":
        assert time.monotonic() < deadline, "the deploy never applied, or never put its progress"
        time.sleep(0.1)
    master.cluster.slow_rollout("deployment", NS, "api", 0)
    # To the script alone (a signal to the whole group would stop the uploader by itself).
    os.kill(process.pid, signal.SIGTERM)
    stdout, _ = process.communicate(timeout=30)

    assert process.returncode == 143, stdout
    assert "rollback: done (undos sent, not waited for)" in stdout
    bodies = [path.read_text() for path in sorted(sink.glob("*.log"))]
    assert bodies and all("==> " in body for body in bodies), bodies
    assert not any("rollback:" in body or "interrupted by SIG" in body for body in bodies), bodies


def test_progress_with_a_presigned_url_puts_with_curl_and_says_its_content_type(master: Master) -> None:
    """delivery presigned: curl PUTs to this instance's URL. Without a content type, curl sends
    its form default, and the S3 of the development rig stored the object empty."""
    tools = master.root / "curl-bin"
    tools.mkdir()
    calls = master.root / "curl.calls"
    (tools / "curl").write_text(f'#!/bin/bash\nprintf "%s\\n" "$*" >>{calls}\n')
    (tools / "curl").chmod(0o755)
    url = "https://k3s-deploy-x.s3.eu-west-1.amazonaws.com/progress/i-0123456789abcdef0.log?X-Amz-Signature=ab"
    options = ("progress-owner=123456789012\n"
               f"progress-url-i-0fedcba9876543210=https://elsewhere.example/x\nprogress-url-i-0123456789abcdef0={url}\n")
    env = master.env(path=f"{tools}:{master.bin}:{os.environ['PATH']}",
                     AWS_SSM_INSTANCE_ID="i-0123456789abcdef0", K3S_DEPLOY_PROGRESS_SECONDS="1")

    run = master.run(master.command("deploy", "d-1", "--bundle", str(master.bundle(platform(), options)),
                                    timeout=60, rollback_timeout=15), env)

    assert run.code == 0, run.stdout
    made = calls.read_text().splitlines()
    assert made and all(call.endswith(f" {url}") for call in made), made  # this instance's URL only
    assert all("-X PUT" in call and "-H x-amz-expected-bucket-owner: 123456789012" in call
               and "-H Content-Type: text/plain; charset=utf-8" in call for call in made), made
    assert "live progress is off" not in run.stdout
