"""The action, start to end, against the real API: the example platform's first deploy into its
new namespace, an update, and a crash-looping release rolled back within the fail-fast bound.

Twice: through SSM (the simulated AWS account sends the staged command lines to a simulated
master, whose AWS CLI fetches the bundle and whose kubectl is the real one) and through
`transport: local` (the script on the runner, against a kubeconfig)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from devkit.simulate.aws import SimulatedAWS
from devkit.simulate.runner import ActionRun, parse_key_values, run_action
from tests import markdown
from tests.real.plane import (
    API_IMAGE,
    WORKER_IMAGE,
    ControlPlane,
    platform_docs,
    redis_volume,
)
from tests.runner import named

REPO = Path(__file__).resolve().parents[2]
# The kubelet restarts a crashing container after 10 s; the script calls it a loop at its
# second restart and checks every 3 s.
FAIL_FAST_BOUND_S = 40
IMAGES = f"{API_IMAGE}\n{WORKER_IMAGE}"


def write_workspace(workspace: Path, ns: str) -> None:
    """The example platform's manifests, moved to the test's namespace (tags as in the example:
    the action pins them)."""
    folder = workspace / "k8s" / "base"
    folder.mkdir(parents=True, exist_ok=True)
    for doc in platform_docs(ns, "latest"):
        name = f"{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"
        (folder / name).write_text(yaml.safe_dump(doc, sort_keys=False))


def watch_image(plane: ControlPlane, ns: str, image: str) -> Callable[[], tuple[float, float]]:
    """Watches deployment/api in the background; the returned call gives when it got `image`
    and when it lost it again (monotonic seconds)."""
    seen: dict[str, float] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            current = plane.image_of("deployment", ns, "api")
            now = time.monotonic()
            if "applied" not in seen and current == image:
                seen["applied"] = now
            elif "applied" in seen and current != image:
                seen["undone"] = now
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()

    def result() -> tuple[float, float]:
        thread.join(timeout=30)
        stop.set()
        assert "undone" in seen, f"deployment/api never went to {image} and back: {seen}"
        return seen["applied"], seen["undone"]

    return result


def check_three_deploys(plane: ControlPlane, ns: str, deploy: Callable[[str], ActionRun]) -> None:
    first = deploy("v1")
    assert first.returncode == 0, first.log
    assert first.outputs["status"] == "success", first.log
    assert plane.image_of("deployment", ns, "api") == f"{API_IMAGE}:v1"
    assert plane.get("namespace", "", ns) is not None

    update = deploy("v2")
    assert update.outputs["status"] == "success", update.log
    assert plane.image_of("deployment", ns, "worker") == f"{WORKER_IMAGE}:v2"

    timing = watch_image(plane, ns, f"{API_IMAGE}:crashloop")
    crash = deploy("crashloop")
    applied, undone = timing()
    assert crash.returncode == 1, crash.log
    assert crash.outputs["status"] == "rolled-back", crash.log
    assert "CrashLoopBackOff" in crash.summary, crash.summary
    assert plane.image_of("deployment", ns, "api") == f"{API_IMAGE}:v2"
    assert plane.image_of("deployment", ns, "worker") == f"{WORKER_IMAGE}:v2"
    assert plane.lock_holder() == ""
    print(f"crash loop: applied -> undone in {undone - applied:.1f} s")
    assert undone - applied < FAIL_FAST_BOUND_S, crash.log


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimulatedAWS]:
    with SimulatedAWS(root=tmp_path / "aws") as account:
        yield account


def test_example_platform_through_ssm_on_the_real_api(
    control_plane: ControlPlane, sim: SimulatedAWS, ns: str, tmp_path: Path
) -> None:
    master = sim.add_master("k3s-master")
    # The master's kubectl is the real one, and its kubeconfig the control plane's.
    (master.bin_dir / "kubectl").unlink()
    (master.bin_dir / "kubectl").symlink_to(control_plane.kubectl_path)
    master.env.pop("KUBECTL_DOUBLE_STATE", None)
    master.env["KUBECONFIG"] = str(control_plane.kubeconfig)
    workspace = tmp_path / "workspace"
    write_workspace(workspace, ns)
    redis_volume(control_plane, ns)

    runs: dict[str, ActionRun] = {}

    def deploy(tag: str) -> ActionRun:
        inputs = {"aws-region": sim.region, "images": IMAGES, "image-tag": tag,
                  "timeout": "180", "manifests": "k8s/base", "verify-images": "false"}
        runs[tag] = run_action(sim, inputs, workspace, tmp_path / "files", timeout=400)
        return runs[tag]

    check_three_deploys(control_plane, ns, deploy)
    assert [b["Name"] for b in sim.client("s3").list_buckets().get("Buckets", [])] == []
    # Live progress (on by default, every 5 s): the master's step lines on the real API showed
    # while the crash-looping release was being watched, before SSM gave the whole output.
    crash = runs["crashloop"]
    before_output = crash.log.split("Output of the deploy on the master")[0]
    assert "Live progress: the master's step lines appear here" in before_output, crash.log
    assert f"==> waiting for deployment/api in {ns}" in before_output, crash.log
    assert "live progress is off" not in crash.log and "Live progress not shown" not in crash.log


def run_local(plane: ControlPlane, workspace: Path, files: Path, inputs: dict[str, str]) -> ActionRun:
    """The action as the runner starts it, with `transport: local` against the control plane's
    kubeconfig (copied into the workspace) and no AWS at all."""
    if not (workspace / ".kube" / "config").exists():
        (workspace / ".kube").mkdir(parents=True, exist_ok=True)
        shutil.copy(plane.kubeconfig, workspace / ".kube" / "config")
    files.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "LC_ALL", "TMPDIR")}
    env.update(
        PATH=f"{plane.kubectl_path.parent}:{os.environ['PATH']}",
        PYTHONPATH=str(REPO), GITHUB_ACTIONS="true", GITHUB_WORKSPACE=str(workspace),
        GITHUB_SHA="0123456789abcdef0123456789abcdef01234567",
        GITHUB_SERVER_URL="https://github.com", GITHUB_REPOSITORY="acme/production-platform",
        GITHUB_RUN_ID="77", GITHUB_OUTPUT=str(files / "output"),
        GITHUB_STEP_SUMMARY=str(files / "summary"), GITHUB_STATE=str(files / "state"),
        # Any AWS call would fail: nowhere to connect, nothing to sign with.
        AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=str(files / "none"), AWS_SHARED_CREDENTIALS_FILE=str(files / "none"),
    )
    # kwok pulls nothing: the images named here are in no registry (tests/registry has real ones)
    inputs = {"transport": "local", "kubeconfig": ".kube/config", "verify-images": "false", **inputs}
    env.update({f"INPUT_{k.upper()}": v for k, v in inputs.items()})
    for name in ("output", "summary", "state"):
        (files / name).write_text("")
    done = subprocess.run([sys.executable, str(REPO / "entrypoint.py")], cwd=workspace,
                          env=env, capture_output=True, text=True, timeout=400, check=False)
    return ActionRun(done.returncode, done.stdout + done.stderr,
                     parse_key_values((files / "output").read_text()),
                     (files / "summary").read_text(),
                     parse_key_values((files / "state").read_text()))


def test_example_platform_through_transport_local_on_the_real_api(
    control_plane: ControlPlane, ns: str, tmp_path: Path
) -> None:
    workspace = tmp_path / "workspace"
    write_workspace(workspace, ns)
    redis_volume(control_plane, ns)

    def deploy(tag: str) -> ActionRun:
        inputs = {"images": IMAGES, "image-tag": tag, "timeout": "180", "manifests": "k8s/base"}
        return run_local(control_plane, workspace, tmp_path / "files", inputs)

    check_three_deploys(control_plane, ns, deploy)


HOSTILE_NS = "k3s-deploy-hostile"  # tests/cluster/kwok.yaml serves pod hostile-0 a hostile log
HOSTILE_TEXT = (
    "line one\n::pwned::by a LF\r::pwned::by a CR $(touch {marker}) `touch {marker}` "
    "\x1b[31m::pwned::after an ANSI escape | [click](https://evil.example/x) "
    "![i](https://evil.example/i.png) <img src=x> **bold** ##[pwned]old form"
)


def test_hostile_logs_and_events_run_nothing_issue_nothing_and_render_nothing(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """#15: what the cluster says is data. A crash-looping pod whose log and whose warning
    events hold CR, LF, ANSI escapes, workflow commands, shell syntax and Markdown: the deploy
    shows them, and nothing runs, no workflow command is issued, nothing renders."""
    marker = control_plane.kubeconfig.parent / "pwned"
    marker.unlink(missing_ok=True)
    control_plane.kubectl("delete", "namespace", HOSTILE_NS, "--ignore-not-found", "--timeout=60s",
                          check=False)
    control_plane.kubectl("create", "namespace", HOSTILE_NS)
    hostile = HOSTILE_TEXT.format(marker=marker)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    control_plane.apply([{
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"hostile.{i}", "namespace": HOSTILE_NS},
        "involvedObject": {"kind": "Pod", "name": "hostile-0", "namespace": HOSTILE_NS},
        "reason": reason, "message": hostile, "type": "Warning", "count": 1,
        "firstTimestamp": now, "lastTimestamp": now, "source": {"component": "kubelet"},
    } for i, reason in enumerate(["Pwned$(id)|x", "Pwned`id`"])])
    workspace = tmp_path / "workspace"
    (workspace / "k8s").mkdir(parents=True)
    (workspace / "k8s" / "hostile.yaml").write_text(yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": HOSTILE_NS}},
        {"apiVersion": "apps/v1", "kind": "StatefulSet",
         "metadata": {"name": "hostile", "namespace": HOSTILE_NS},
         "spec": {"serviceName": "hostile", "replicas": 1,
                  "selector": {"matchLabels": {"app": "hostile"}},
                  "template": {"metadata": {"labels": {"app": "hostile"}},
                               "spec": {"containers": [
                                   {"name": "app", "image": "docker.io/acme/hostile:v1"}]}}}},
    ]))
    try:
        run = run_local(control_plane, workspace, tmp_path / "files", {
            "images": "docker.io/acme/hostile", "image-tag": "crashloop", "timeout": "120",
            "manifests": "k8s", "namespace": HOSTILE_NS})
    finally:
        control_plane.release_lock()

    assert run.outputs["status"] in ("failed", "rolled-back"), run.log
    assert "CrashLoopBackOff" in run.log
    assert "by a CR" in run.log and "after an ANSI escape" in run.log  # the log was shown...
    assert "Pwned$(id)|x" in run.log and "Pwned`id`" in run.log  # ...and the events
    assert named(run.log, "pwned") == [], "the cluster's text issued a workflow command"
    assert not marker.exists(), "the cluster's text ran a command"
    rendered = markdown.render(run.summary)
    assert markdown.tags(rendered) <= markdown.SUMMARY_TAGS, rendered
    assert "<a " not in rendered, rendered
    shown = markdown.text(rendered)
    assert "[click](https://evil.example/x)" in shown and "CrashLoopBackOff" in shown
    assert "Pwned$(id)|x" in shown  # the events, in the summary too
    control_plane.kubectl("delete", "namespace", HOSTILE_NS, "--wait=false", check=False)


def test_a_dry_run_never_shows_secret_data(control_plane: ControlPlane, ns: str,
                                           tmp_path: Path) -> None:
    """#15: the dry run's diff goes to the log and the summary; a Secret's values, old and new,
    must be in neither (real kubectl masks them: this holds it to that)."""
    old_value, new_value = "old-password-4f1d", "new-password-9c2e"
    workspace = tmp_path / "workspace"
    (workspace / "k8s").mkdir(parents=True)

    def write(value: str) -> None:
        (workspace / "k8s" / "app.yaml").write_text(yaml.safe_dump_all([
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db", "namespace": ns},
             "stringData": {"password": value}},
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "api", "namespace": ns},
             "data": {"token": base64.b64encode(value.encode()).decode()}},
        ]))

    inputs = {"timeout": "60", "manifests": "k8s", "namespace": ns}
    write(old_value)
    first = run_local(control_plane, workspace, tmp_path / "files", inputs)
    assert first.outputs["status"] == "success", first.log
    write(new_value)

    dry = run_local(control_plane, workspace, tmp_path / "files", {**inputs, "dry-run": "true"})

    assert dry.outputs["status"] == "success", dry.log
    assert "### Diff" in dry.summary and "Secret" in dry.log
    for value in (old_value, new_value):
        encoded = base64.b64encode(value.encode()).decode()
        for where, text in (("log", dry.log), ("summary", dry.summary)):
            assert value not in text and encoded not in text, f"{value} in the {where}"
    assert "***" in dry.summary  # the diff is there, masked
