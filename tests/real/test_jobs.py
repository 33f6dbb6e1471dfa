"""Migration Jobs on the real API, through the whole action (`transport: local`, real kubectl, a
real API server with the Job controller and garbage collector, kwok as the kubelet): a Job whose
image follows the commit runs on every deploy that changes it, after the StatefulSet it migrates
is ready and before any Deployment changes; a Job that fails stops the deploy there, with its
pod's log in the summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests import markdown
from tests.real.plane import ControlPlane
from tests.real.test_action import ActionRun, run_local

APP = "example.test/shop/app"


def documents(ns: str, setting: str) -> dict[str, dict[str, Any]]:
    def pod(image: str, **spec: Any) -> dict[str, Any]:
        return {"containers": [{"name": "main", "image": image}], **spec}

    return {
        "namespace": {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
        "settings": {"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": "settings", "namespace": ns}, "data": {"setting": setting}},
        "db": {
            "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db", "namespace": ns},
            "spec": {"serviceName": "db", "replicas": 1, "selector": {"matchLabels": {"app": "db"}},
                     "template": {"metadata": {"labels": {"app": "db"}},
                                  "spec": pod("example.test/shop/db:v1")}},
        },
        # backoffLimit 0: a migration that fails is not tried again by the Job controller.
        "migrate": {
            "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "migrate", "namespace": ns},
            "spec": {"backoffLimit": 0,
                     "template": {"spec": pod(f"{APP}:v0", restartPolicy="Never")}},
        },
        "web": {
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": ns},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}}, "spec": pod(f"{APP}:v0")}},
        },
    }


def write(folder: Path, docs: dict[str, dict[str, Any]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.yaml"):
        old.unlink()
    for name, doc in docs.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def live(plane: ControlPlane, kind: str, ns: str, name: str) -> dict[str, Any]:
    obj = plane.get(kind, ns, name)
    assert obj is not None, f"{kind}/{name} is gone"
    return obj


def job(plane: ControlPlane, ns: str) -> dict[str, Any]:
    return live(plane, "job", ns, "migrate")


def web(plane: ControlPlane, ns: str) -> dict[str, Any]:
    return live(plane, "deployment", ns, "web")


def image_of(obj: dict[str, Any]) -> str:
    return obj["spec"]["template"]["spec"]["containers"][0]["image"]


def conditions(obj: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in obj.get("status", {}).get("conditions", [])}


def test_a_migration_job_runs_on_each_deploy_that_changes_it_and_a_failing_one_stops_the_deploy(
    control_plane: ControlPlane, ns: str, tmp_path: Path
) -> None:
    workspace = tmp_path / "workspace"
    write(workspace / "k8s", documents(ns, "one"))

    def deploy(tag: str, **inputs: str) -> ActionRun:
        return run_local(control_plane, workspace, tmp_path / "files",
                         {"manifests": "k8s", "images": APP, "image-tag": tag, "timeout": "120", **inputs})

    first = deploy("v1")
    assert first.outputs["status"] == "success", first.log
    ran = job(control_plane, ns)
    assert conditions(ran)["Complete"] == "True"
    assert image_of(ran) == f"{APP}:v1" and image_of(web(control_plane, ns)) == f"{APP}:v1"
    # In order: the StatefulSet ready, then the Job complete, only then the Deployment applied.
    log = first.log
    assert log.index("statefulset/db in") < log.index("waiting for job/migrate")
    assert log.index("job/migrate in " + ns + ": completed") < log.index("deployment.apps/web created")

    assert "### Jobs" in first.summary
    assert f"{ns}/job/migrate ran, completed" in " ".join(markdown.shown(first.summary).split())

    # The dry run says the Job would run again, and changes nothing (nor does its server-side
    # check of the new Job, made under a name the server makes up).
    planned = deploy("v2", **{"dry-run": "true"})
    assert planned.outputs["status"] == "success", planned.log
    assert "job/migrate in " + ns + " (would be replaced and run again)" in markdown.shown(planned.summary)
    assert job(control_plane, ns)["metadata"]["uid"] == ran["metadata"]["uid"]
    jobs = control_plane.kubectl("get", "jobs", "-n", ns, "-o", "name").stdout.split()
    assert jobs == ["job.batch/migrate"]

    second = deploy("v2")
    assert second.outputs["status"] == "success", second.log
    replaced = job(control_plane, ns)
    assert replaced["metadata"]["uid"] != ran["metadata"]["uid"], "the Job was not run again"
    assert image_of(replaced) == f"{APP}:v2" and conditions(replaced)["Complete"] == "True"
    assert image_of(web(control_plane, ns)) == f"{APP}:v2"
    assert "replacing job/migrate" in second.log

    same = deploy("v2")
    assert same.outputs["status"] == "success", same.log
    assert job(control_plane, ns)["metadata"]["uid"] == replaced["metadata"]["uid"]
    assert "completed with this spec before; not run again" in same.log
    assert "not run again: completed with this spec before" in markdown.shown(same.summary)
    web_before = web(control_plane, ns)

    # The migration of the next commit fails: the config of that deploy is applied (its phase
    # comes first), the Deployment is not touched, and the Job's pod log is in the summary.
    write(workspace / "k8s", documents(ns, "three"))
    failed = deploy("crashloop")
    assert failed.returncode != 0
    assert failed.outputs["status"] == "failed", failed.log
    assert failed.outputs["rolled-back"] == "false"
    after = web(control_plane, ns)
    assert image_of(after) == f"{APP}:v2"
    assert after["metadata"]["generation"] == web_before["metadata"]["generation"]
    assert (after["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
            == web_before["metadata"]["annotations"]["deployment.kubernetes.io/revision"])
    settings = live(control_plane, "configmap", ns, "settings")
    assert settings["data"] == {"setting": "three"}
    broken = job(control_plane, ns)
    assert image_of(broken) == f"{APP}:crashloop" and conditions(broken)["Failed"] == "True"
    shown = markdown.shown(failed.summary)
    assert "job/migrate" in shown and "BackoffLimitExceeded" in shown
    assert "were not applied" in shown
    # kwok serves every container this log (tests/cluster/README.md)
    assert "k3s-deploy-test: container started" in shown


def test_a_job_whose_image_cannot_be_pulled_fails_the_deploy_at_once_not_at_the_timeout(
    control_plane: ControlPlane, ns: str, tmp_path: Path
) -> None:
    """The Job controller never counts a pod that cannot start as a failed attempt: without the
    deploy's own check, a never-pushed migration image would hold the deploy for its timeout."""
    workspace = tmp_path / "workspace"
    write(workspace / "k8s", documents(ns, "one"))
    run = run_local(control_plane, workspace, tmp_path / "files",
                    {"manifests": "k8s", "images": APP, "image-tag": "missing", "timeout": "300"})
    assert run.outputs["status"] == "failed", run.log
    assert int(run.outputs["duration"]) < 60, run.log
    shown = markdown.shown(run.summary)
    assert "which does not clear by itself" in shown
    assert "ImagePullBackOff" in shown or "ErrImagePull" in shown
    assert "cannot pull an image" in shown  # the advice for it
    # The Deployment was never applied (its namespace is new: it does not exist at all).
    assert control_plane.get("deployment", ns, "web") is None
    assert conditions(job(control_plane, ns)).get("Complete") is None
