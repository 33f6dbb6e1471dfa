"""Transport `local`: the action runs the deploy script itself against the job's kubeconfig.

The action runs as the runner starts it (its own process, INPUT_* with hyphens, GITHUB_* files)
with the kubectl test double first on PATH as "the cluster of the kubeconfig", and with no AWS
environment at all: no credentials, no region, and an AWS endpoint that refuses connections, so
any AWS call would fail the run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploykit import command, contract, local
from deploykit.inputs import parse_settings
from devkit.simulate.cluster import Cluster
from devkit.simulate.runner import parse_key_values
from tests import markdown
from tests import sample_platform as platform
from tests.e2e.conftest import API, NS, WORKER, platform_manifests
from tests.runner import named

ROOT = Path(__file__).resolve().parents[1]
SHA = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class LocalRun:
    returncode: int
    log: str
    outputs: dict[str, str]
    summary: str


class Job:
    """A runner job: a workspace with manifests and a kubeconfig, and the cluster behind it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.workspace = root / "workspace"
        (self.workspace / "k8s" / "base").mkdir(parents=True)
        for name, text in platform_manifests(progress_deadline=600).items():
            (self.workspace / "k8s" / "base" / name).write_text(text)
        (self.workspace / ".kube").mkdir()
        # The double ignores it; real kubectl would read it. It must exist all the same.
        (self.workspace / ".kube" / "config").write_text("apiVersion: v1\nkind: Config\n")
        self.cluster = Cluster(root / "cluster.json")
        self.bin = root / "bin"
        self.cluster.install_kubectl(self.bin)
        self.files = root / "file_commands"
        self.files.mkdir()
        self.runs = 0

    def env(self, inputs: dict[str, str]) -> dict[str, str]:
        keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
        env = {k: v for k, v in os.environ.items() if k in keep}
        env.update(
            PATH=f"{self.bin}:{os.environ['PATH']}",
            PYTHONPATH=str(ROOT),
            GITHUB_ACTIONS="true",
            GITHUB_WORKSPACE=str(self.workspace),
            GITHUB_SHA=SHA,
            GITHUB_SERVER_URL="https://github.com",
            GITHUB_REPOSITORY="acme/production-platform",
            GITHUB_RUN_ID="77",
            GITHUB_OUTPUT=str(self.files / "output"),
            GITHUB_STEP_SUMMARY=str(self.files / "summary"),
            GITHUB_STATE=str(self.files / "state"),
            # Any AWS call would fail: nowhere to connect, nothing to sign with.
            AWS_ENDPOINT_URL="http://127.0.0.1:9",
            AWS_CONFIG_FILE=str(self.root / "no-aws-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(self.root / "no-aws-credentials"),
            AWS_EC2_METADATA_DISABLED="true",
        )
        env.update({f"INPUT_{name.upper()}": value for name, value in inputs.items()})
        return env

    def start(self, **inputs: str) -> subprocess.Popen[str]:
        inputs = {"transport": "local", "kubeconfig": ".kube/config", "images": f"{API}\n{WORKER}",
                  "image-tag": "v1", "verify-images": "false", **inputs}  # images in no registry
        for name in ("output", "summary", "state"):
            (self.files / name).write_text("")
        env = self.env(inputs)
        assert not any(k.startswith("AWS_") and k not in (
            "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
            "AWS_EC2_METADATA_DISABLED") for k in env)
        return subprocess.Popen([sys.executable, str(ROOT / "entrypoint.py")], cwd=self.workspace,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    def finished(self, process: subprocess.Popen[str]) -> LocalRun:
        log, _ = process.communicate(timeout=240)
        return LocalRun(process.returncode, log,
                        parse_key_values((self.files / "output").read_text()),
                        (self.files / "summary").read_text())

    def deploy(self, **inputs: str) -> LocalRun:
        return self.finished(self.start(**inputs))


@pytest.fixture
def job(tmp_path: Path) -> Job:
    return Job(tmp_path)


def test_local_deploy_succeeds_with_no_aws_at_all(job: Job) -> None:
    run = job.deploy()

    assert run.returncode == 0, run.log
    assert run.outputs["status"] == "success"
    assert (run.outputs["instance-id"], run.outputs["command-id"], run.outputs["bucket"]) == (
        "", "", "")
    assert "Transport local" in run.log and "no AWS call" in run.log
    assert job.cluster.image_of("deployment", NS, "api") == f"{API}:v1"
    assert "2/2" in run.summary and "all 3 workload(s) ready and healthy" in markdown.shown(run.summary)
    api = job.cluster.get("deployment", NS, "api")["metadata"]["annotations"]
    assert api["k3s-deploy-action/commit-sha"] == SHA
    assert api["k3s-deploy-action/run-url"] == "https://github.com/acme/production-platform/actions/runs/77"


def test_local_crash_loop_is_rolled_back_and_the_summary_shows_what_failed(job: Job) -> None:
    assert job.deploy().outputs["status"] == "success"
    job.cluster.break_image(f"{API}:v2", "CrashLoopBackOff", log="listening on :8080\npanic: boom")

    run = job.deploy(images=f"{API}:v2\n{WORKER}:v1", timeout="600")

    assert run.returncode == 1
    assert run.outputs["status"] == "rolled-back", run.log
    assert run.outputs["rolled-back"] == "true"
    assert "### What failed" in run.summary
    assert "**CrashLoopBackOff**" in run.summary
    assert "panic: boom" in run.summary
    assert job.cluster.image_of("deployment", NS, "api") == f"{API}:v1"


def test_local_dry_run_puts_the_diff_in_the_summary_and_changes_nothing(job: Job) -> None:
    assert job.deploy().outputs["status"] == "success"
    before = job.cluster.objects()

    run = job.deploy(images=f"{API}:v2\n{WORKER}:v1", **{"dry-run": "true"})

    assert run.returncode == 0, run.log
    assert run.outputs["status"] == "success"
    assert "Dry run: nothing was changed" in run.summary
    assert "### Diff" in run.summary and "```diff" in run.summary
    assert f"+      - image: {API}:v2" in run.summary
    assert "1 object(s) would change" in markdown.shown(run.summary)
    assert job.cluster.objects() == before


def test_local_transport_without_a_kubeconfig_fails_before_anything_runs(job: Job) -> None:
    run = job.deploy(kubeconfig="no/such/file")

    assert run.returncode == 1
    assert run.outputs["status"] == "failed"
    assert "input 'kubeconfig' names no file in the workspace" in run.log
    assert job.cluster.get("namespace", "", NS) is None


def test_local_arguments_and_options_are_the_ones_the_ssm_command_passes(tmp_path: Path) -> None:
    import dataclasses
    import shlex

    (tmp_path / "k8s").mkdir()
    settings = parse_settings({"aws-region": "eu-west-1", "manifests": "k8s", "dry-run": "false",
                               "lock-timeout": "42", "server-dry-run": "false"},
                              {"GITHUB_WORKSPACE": str(tmp_path), "GITHUB_SHA": SHA})
    from deploykit.stage import Staging

    staging = Staging("bucket-1", "", "123456789012", True)
    line = next(li for li in command.deploy_lines(settings, staging, "d-1", "0" * 64, "1" * 64)
                if li.startswith("bash ./"))
    ssm_words = shlex.split(line.replace('"$entry"', "deploy").replace('"$id"', "d-1")
                            .replace('"$state"', "STATE"))[2:-2]
    local_words = contract.script_arguments("deploy", "d-1", "STATE", "manifests.tar.gz")
    assert ssm_words == local_words == ["deploy", "--bundle", "manifests.tar.gz", "--deploy-id",
                                        "d-1", "--state-dir", "STATE"]
    # The options travel in the bundle: the same, but the local run's diff size limit.
    local_options = command.bundle_options(dataclasses.replace(settings, transport="local"))
    ssm_options = command.bundle_options(settings)
    assert local_options.pop("max-diff-bytes") == str(command.LOCAL_MAX_DIFF_BYTES)
    assert local_options == ssm_options
    assert ssm_options["lock-timeout"] == "42" and ssm_options["server-dry-run"] == "false"


def test_local_deploy_cancelled_mid_rollout_undoes_what_it_changed(job: Job) -> None:
    """SIGTERM (the runner's cancel) while the new api rolls out: the script is stopped, and the
    rollback entry point gets its few seconds to send the undos before the action exits."""
    job.cluster.seed(platform.pinned(platform_manifests(), "v1"))
    job.cluster.slow_rollout("deployment", NS, "api", 120)
    process = job.start(**{"image-tag": "v2"})
    deadline = time.monotonic() + 60
    while job.cluster.revision("deployment", NS, "api") != "2":
        assert process.poll() is None and time.monotonic() < deadline, "the deploy never applied"
        time.sleep(0.1)
    job.cluster.slow_rollout("deployment", NS, "api", 0)  # the old release comes back at once

    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    run = job.finished(process)
    took = time.monotonic() - signalled

    assert run.returncode == 1, run.log
    assert run.outputs["status"] == "cancelled", run.log
    # The runner kills the step about 10 s after its first signal: the undos and the lock's
    # release are done, and the action gone, well before that.
    assert took < local.CANCEL_BUDGET + 2, f"the action took {took:.1f} s to stop\n{run.log}"
    assert "undos sent, not waited for" in run.log, run.log
    assert job.cluster.image_of("deployment", NS, "api") == f"{API}:v1", run.log
    assert job.cluster.image_of("deployment", NS, "worker") == f"{WORKER}:v1", run.log
    lease = job.cluster.get("lease", "kube-system", "k3s-deploy-lock")
    assert lease is None or not lease["spec"].get("holderIdentity"), "the lock was left held"


def test_a_container_log_cannot_issue_workflow_commands_through_the_script_output(job: Job) -> None:
    """The script prints the failing container's log; under transport local that output goes
    to the runner as it comes, so it is fenced and each line defused (#15, finding 3)."""
    assert job.deploy().outputs["status"] == "success"
    job.cluster.break_image(
        f"{API}:v2", "CrashLoopBackOff",
        log="10%\r::pwned::by a CR\nok\r\n::pwned title=x::by a CRLF\n##[pwned name=status;]old form",
    )

    run = job.deploy(images=f"{API}:v2\n{WORKER}:v1", timeout="600")

    assert run.outputs["status"] == "rolled-back", run.log
    assert "by a CRLF" in run.log  # the log is shown...
    assert named(run.log, "pwned") == []  # ...and issues nothing
    assert named(run.log, "error"), "the action's own error is kept"


def test_the_script_sees_none_of_the_jobs_credentials_or_file_commands(job: Job) -> None:
    """#15 finding 6: under transport local the script (and every kubectl it runs) gets the
    environment kubectl needs, not the job's AWS credentials, tokens or GITHUB_* files."""
    seen = job.root / "seen-env"
    spy = job.bin / "kubectl-spy"
    spy.write_text(f'#!/bin/sh\nenv >> {seen}\nexec "{job.bin}/kubectl" "$@"\n')
    spy.chmod(0o755)

    run = job.deploy(kubectl=str(spy))

    assert run.outputs["status"] == "success", run.log
    names = {line.split("=", 1)[0] for line in seen.read_text().splitlines() if "=" in line}
    leaked = {n for n in names if n.startswith(("AWS_", "GITHUB_", "INPUT_", "ACTIONS_"))}
    assert leaked == set(), leaked
    assert {"PATH", "HOME", "KUBECONFIG", "TMPDIR"} <= names


def test_a_kubeconfig_with_a_credential_plugin_gets_the_cloud_credentials(tmp_path: Path) -> None:
    """`aws eks get-token` and its kin need their cloud's variables: they pass only when a
    user of the kubeconfig runs such a plugin; GITHUB_* files never do."""
    base = {"PATH": "/usr/bin", "HOME": str(tmp_path), "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
            "AWS_SESSION_TOKEN": "tok", "GITHUB_OUTPUT": "/runner/output",
            "GITHUB_TOKEN": "ghs_x", "INPUT_REGISTRY-PASSWORD": "pw", "ACTIONS_RUNTIME_TOKEN": "t",
            "HTTPS_PROXY": "http://proxy:3128", "LC_ALL": "C.UTF-8"}
    plain = tmp_path / "plain.yaml"
    plain.write_text("apiVersion: v1\nkind: Config\nusers:\n- name: u\n  user: {token: x}\n")
    eks = tmp_path / "eks.yaml"
    eks.write_text("apiVersion: v1\nkind: Config\nusers:\n- name: u\n  user:\n    exec:\n"
                   "      apiVersion: client.authentication.k8s.io/v1beta1\n      command: aws\n"
                   "      args: [eks, get-token, --cluster-name, prod]\n")
    (tmp_path / "k8s").mkdir()
    for kubeconfig, cloud in ((plain, False), (eks, True)):
        settings = parse_settings({"transport": "local", "kubeconfig": kubeconfig.name,
                                   "manifests": "k8s"},
                                  {"GITHUB_WORKSPACE": str(tmp_path), "GITHUB_SHA": SHA})
        (tmp_path / kubeconfig.stem).mkdir()
        got = local.script_env(settings, tmp_path / kubeconfig.stem, base)
        assert ("AWS_ACCESS_KEY_ID" in got) is cloud and ("AWS_SESSION_TOKEN" in got) is cloud
        assert not any(k.startswith(("GITHUB_", "INPUT_", "ACTIONS_")) for k in got), got
        assert got["HTTPS_PROXY"] == "http://proxy:3128" and got["LC_ALL"] == "C.UTF-8"
        assert got["KUBECONFIG"] == str(kubeconfig)


@pytest.mark.parametrize(("case", "code", "advice"), [
    ("a tool the script needs is missing", 3, "set the `kubectl` input to a command"),
    ("the bundle is rejected before anything changed", 5, "Nothing was changed."),
])
def test_local_advice_follows_the_exit_code(job: Job, case: str, code: int, advice: str) -> None:
    """#13: with transport local, exit 3 (a tool missing) and exit 5 (the bundle rejected,
    nothing changed) gave the advice for a stuck rollout (check the pods' logs)."""
    inputs: dict[str, str] = {}
    if code == 3:
        inputs["kubectl"] = "no-such-kubectl"
    else:
        (job.workspace / "k8s" / "base" / "orphan.yaml").write_text(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: orphan\n  namespace: nowhere\n")

    run = job.deploy(**inputs)

    assert run.returncode == 1, run.log
    assert run.outputs["status"] == "failed", case
    how = [line for line in run.log.splitlines() if "How to fix:" in line]
    assert how and advice in how[0], (case, how)
    assert "A rollout did not become ready" not in run.log
