"""The deploy script, run for real under bash against the kubectl test double.

Each test builds a bundle as docs/internals.md section 1 lays it out, runs
deploykit/scripts/k3s-deploy.sh with the double first on PATH, and checks what a user would:
the exit code, the report on stderr, and the cluster left behind.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from deploykit.simulate.cluster import Cluster

SCRIPT = Path(__file__).resolve().parents[1] / "deploykit" / "scripts" / "k3s-deploy.sh"
NS = "production-platform"
REPORT_BEGIN = "===K3S-DEPLOY-REPORT-BEGIN==="
REPORT_END = "===K3S-DEPLOY-REPORT-END==="
PHASE_OF_KIND = {
    "Namespace": "1-namespaces.yaml",
    "CustomResourceDefinition": "1-namespaces.yaml",
    "ConfigMap": "2-config.yaml",
    "Service": "3-services.yaml",
    "StatefulSet": "4-statefulsets.yaml",
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
    for doc in docs:
        phases.setdefault(PHASE_OF_KIND.get(doc["kind"], "5-workloads.yaml"), []).append(doc)
        if doc["kind"] in ("Deployment", "StatefulSet"):
            workloads.append(f"{doc['kind'].lower()}\t{doc['metadata'].get('namespace', '')}\t"
                             f"{doc['metadata']['name']}\n")
    files = {name: as_yaml(content) for name, content in sorted(phases.items())}
    files["workloads.tsv"] = "".join(workloads)
    return files


def build_bundle(path: Path, docs: list[dict]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, content in phase_files(docs).items():
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

    def bundle(self, docs: list[dict]) -> Path:
        self.bundles += 1
        return build_bundle(self.root / f"manifests-{self.bundles}.tar.gz", docs)

    def command(self, action: str, deploy_id: str, *args: str, **options: object) -> list[str]:
        argv = ["bash", str(SCRIPT), action, "--deploy-id", deploy_id,
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
    before = master.cluster.objects()
    bundle = master.bundle(platform())
    env = master.env(path=path_without(master.root, missing, master.bin))

    run = master.run(["/usr/bin/bash", str(SCRIPT), "deploy", "--deploy-id", "d1", "--bundle",
                      str(bundle), "--state-dir", str(master.state_root), "--kubectl", kubectl],
                     env=env)

    assert run.code == 3, run.stdout
    assert run.report["step"] == "tools"
    assert (missing or kubectl) in run.report["message"]
    assert master.cluster.objects() == before


def test_unhealthy_api_exits_4_without_applying(master: Master) -> None:
    master.cluster.set_api_healthy(False)
    before = master.cluster.objects()

    run = master.deploy(platform())

    assert run.code == 4, run.stdout
    assert (run.report["result"], run.report["step"]) == ("failed", "api")
    assert "not healthy" in run.report["message"]
    assert master.cluster.objects() == before
    assert not (master.state_root / "deploy-1").exists()


def test_namespaced_object_without_its_namespace_is_rejected_before_anything_changes(
        master: Master) -> None:
    before = master.cluster.objects()
    # The bundle creates one namespace but not the one its config and workload live in.
    docs = [namespace("monitoring"), configmap(), deployment("api", "api:v1")]

    run = master.deploy(docs)

    assert run.code == 5, run.stdout
    assert (run.report["step"], run.report["rollback"]) == ("apply", "not-needed")
    assert 'namespaces "production-platform" not found' in run.report["message"]
    assert "configmap/app-config" in run.report["message"]
    assert master.cluster.objects() == before
    assert master.cluster.get("namespace", "", "monitoring") is None


def test_malformed_manifest_is_rejected_before_anything_changes(master: Master) -> None:
    master.cluster.seed(as_yaml([namespace()]))
    before = master.cluster.objects()
    nameless = configmap()
    del nameless["metadata"]["name"]

    run = master.deploy([configmap("ok"), nameless, deployment("api", "api:v1")])

    assert run.code == 5, run.stdout
    assert "resource name may not be empty" in run.stdout
    assert master.cluster.objects() == before


def test_another_deploy_holding_the_lock_exits_6(master: Master) -> None:
    master.state_root.mkdir()
    # A running deploy (by its command line) holds the lock.
    holder = subprocess.Popen(["bash", "-c", "sleep 30; true", "k3s-deploy.sh"])
    try:
        (master.state_root / ".lock").symlink_to(str(holder.pid))

        run = master.deploy(platform())
    finally:
        holder.kill()
        holder.wait()

    assert run.code == 6, run.stdout
    assert str(holder.pid) in run.report["message"]
    assert master.cluster.get("namespace", "", NS) is None


def test_lock_naming_an_unrelated_process_is_taken_over(master: Master) -> None:
    # After a reboot the PID in a stale lock may belong to anything, here this test.
    master.state_root.mkdir()
    (master.state_root / ".lock").symlink_to(str(os.getpid()))

    run = master.deploy([namespace()])

    assert run.code == 0, run.stdout
    assert "taking over the lock" in run.stdout
    assert not (master.state_root / ".lock").exists()


@pytest.mark.parametrize("args", [
    ["deploy", "--deploy-id", "d1"],
    ["deploy", "--deploy-id", "d1", "--bundle", "b.tgz", "--timeout", "10m"],
    ["deploy", "--deploy-id", "d1", "--bundle", "b.tgz", "--rollback", "yes"],
    ["deploy", "--deploy-id", "../etc", "--bundle", "b.tgz"],
    ["deploy", "--deploy-id", "d1", "--bundle", "b.tgz", "--colour", "red"],
    ["redeploy", "--deploy-id", "d1"],
])
def test_bad_arguments_exit_2(master: Master, args: list[str]) -> None:
    run = master.run(["bash", str(SCRIPT), *args])

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
    master.cluster.fail_apply("configmap", "app-config")

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


def test_terminated_deploy_keeps_its_state_for_the_rollback_and_frees_the_lock(
        master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))
    master.cluster.slow_rollout("deployment", NS, "api", 120)
    argv = master.command("deploy", "deploy-8", "--bundle", str(master.bundle(
        platform(api_image="api:v2"))), timeout=120)
    process = subprocess.Popen(argv, env=master.env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 20
    while master.cluster.revision("deployment", NS, "api") != "2":
        assert time.monotonic() < deadline, "the deploy never applied"
        time.sleep(0.1)

    # As an SSM cancel does: SIGTERM to the command's process group.
    os.killpg(process.pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=20)

    assert process.returncode == 143, stdout
    # No report: the action must not take a half-done deploy for a finished one.
    assert stderr == ""
    assert "rollback --deploy-id deploy-8" in stdout
    assert (master.state_root / "deploy-8" / "revisions.tsv").exists()
    assert not (master.state_root / ".lock").exists()


def test_rollback_entry_point_undoes_a_killed_deploy_and_forgets_it(master: Master) -> None:
    master.cluster.seed(as_yaml(platform()))
    master.cluster.slow_rollout("deployment", NS, "worker", 120)
    argv = master.command("deploy", "deploy-7", "--bundle", str(master.bundle(
        platform(api_image="api:v2", worker_image="worker:v2"))), timeout=120)
    process = subprocess.Popen(argv, env=master.env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while master.cluster.revision("deployment", NS, "worker") != "2":
            assert time.monotonic() < deadline, "the deploy never applied"
            time.sleep(0.1)
    finally:
        # As SSM's executionTimeout does: SIGKILL, no trap runs.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
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
    assert "taking over the lock" in run.stdout
    assert not (master.state_root / "deploy-7").exists()

    again = master.rollback("deploy-7")

    assert again.code == 12, again.stdout
    assert again.report["rollback"] == "nothing-changed"
    assert master.cluster.image_of("deployment", NS, "api") == "api:v1"
