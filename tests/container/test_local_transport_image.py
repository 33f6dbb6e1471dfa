"""Transport `local` in the action's image, run as the runner runs it, with no network and no AWS
environment at all: the image holds what the deploy script needs (bash, coreutils, tar, gzip,
diff and kubectl), and the script runs in the container against a kubeconfig from the
workspace (the only folder the container shares with the job).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from devkit.simulate import kubectl_double
from devkit.simulate.cluster import Cluster
from tests import markdown
from tests.e2e.conftest import API, NS, WORKER, platform_manifests

from .conftest import WORKSPACE, RunAction, docker

pytestmark = pytest.mark.container

RUN_TIMEOUT_S = 420.0
# Nothing listens there: a cluster the container cannot reach.
UNREACHABLE = """\
apiVersion: v1
kind: Config
clusters: [{name: ci, cluster: {server: "https://127.0.0.1:9"}}]
contexts: [{name: ci, context: {cluster: ci, user: ci}}]
current-context: ci
users: [{name: ci, user: {token: not-a-secret}}]
"""


def workspace_with_manifests(root: Path) -> Path:
    workspace = root / "workspace"
    (workspace / "k8s" / "base").mkdir(parents=True)
    for name, text in platform_manifests(progress_deadline=600).items():
        (workspace / "k8s" / "base" / name).write_text(text)
    (workspace / ".kube").mkdir()
    (workspace / ".kube" / "config").write_text(UNREACHABLE)
    return workspace


def test_the_image_has_what_the_deploy_script_needs(action_image: str) -> None:
    tools = "bash tar gzip timeout diff wc mktemp date sleep kubectl"
    proc = docker("run", "--rm", "--network", "none", "--entrypoint", "bash", action_image, "-c",
                  f"for t in {tools}; do command -v $t >/dev/null || echo missing $t; done;"
                  " kubectl version --client")
    assert proc.returncode == 0, proc.stderr
    assert "missing" not in proc.stdout, proc.stdout
    assert "Client Version: v1." in proc.stdout


def test_local_deploy_runs_the_script_in_the_container_with_no_aws(
        run_action: RunAction, tmp_path: Path) -> None:
    """The cluster is the kubectl test double, copied into the workspace and run by the image's
    own Python: the real script, the real image, no network."""
    workspace = workspace_with_manifests(tmp_path)
    sim = workspace / ".sim"
    sim.mkdir()
    shutil.copy(kubectl_double.__file__, sim / "kubectl_double.py")
    cluster = Cluster(sim / "cluster.json")
    wrapper = sim / "kubectl"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"KUBECTL_DOUBLE_STATE={WORKSPACE}/.sim/cluster.json exec /opt/venv/bin/python "
        f'{WORKSPACE}/.sim/kubectl_double.py "$@"\n'
    )
    wrapper.chmod(0o755)

    run = run_action(
        {"transport": "local", "kubeconfig": ".kube/config", "kubectl": f"{WORKSPACE}/.sim/kubectl",
         "images": f"{API}\n{WORKER}", "image-tag": "v1"},
        workspace=workspace, network="none", timeout=RUN_TIMEOUT_S)

    assert run.returncode == 0, run.log
    assert run.outputs["status"] == "success"
    assert run.outputs["instance-id"] == run.outputs["bucket"] == ""
    assert cluster.image_of("deployment", NS, "api") == f"{API}:v1"
    # verify-images is left at auto: with no network, Docker Hub cannot be asked, which is a
    # warning (asked once for both images) and the deploy goes on.
    assert run.log.count("::warning title=Image not verified::Could not check the images on docker.io: ") == 1
    assert f"Not checked: {WORKER}:v1" in run.log
    assert "all 3 workload(s) ready and healthy" in markdown.shown(run.summary)
    lease = cluster.get("lease", "kube-system", "k3s-deploy-lock")
    assert lease is not None and lease["spec"]["holderIdentity"] == ""


def test_an_unreachable_cluster_fails_before_anything_with_the_api_check(
        run_action: RunAction, tmp_path: Path) -> None:
    workspace = workspace_with_manifests(tmp_path)

    run = run_action({"transport": "local", "kubeconfig": ".kube/config",
                      "images": f"{API}\n{WORKER}", "image-tag": "v1", "timeout": "30"},
                     workspace=workspace, network="none", timeout=RUN_TIMEOUT_S)

    assert run.returncode == 1
    assert run.outputs["status"] == "failed"
    assert "the Kubernetes API is not healthy" in run.log
    assert "kubectl get --raw=/readyz" in run.log  # the image's own kubectl ran
