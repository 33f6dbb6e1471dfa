"""The deploy script failing at each of its steps on the master: a tool missing, the API down,
the bundle refused, the download failing, apply failing half-way, the rollout failing, the
rollback failing too, the deadline passing. Each must end with the right status and a message
that says what to do, nothing staged left, and one release on every workload."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from devkit.simulate.faults import Call
from tests.reliability import figures
from tests.reliability.conftest import API, Rig

pytestmark = pytest.mark.e2e

# Another deploy, of another run, that holds the cluster's lock.
OTHER = "20261126-101010-0badc0de"


def _note(request: pytest.FixtureRequest, rig: Rig, case: str, status: str) -> None:
    rig.settle()
    figures.note(
        request.node, table="remote", case=case, status=status, left=len(rig.staged_buckets()), other_faults=1
    )


def test_kubectl_missing_changes_nothing(rig: Rig, request: pytest.FixtureRequest) -> None:
    run = rig.deploy(kubectl="kubectl-not-installed")
    _note(request, rig, "tools: kubectl missing (exit 3)", run.outputs["status"])
    assert run.outputs["status"] == "failed", run.log
    assert "kubectl-not-installed" in run.log
    assert rig.assert_one_release(run) == "v1"
    rig.assert_nothing_left(run)


def test_api_down_changes_nothing_and_says_restart_k3s(rig: Rig, request: pytest.FixtureRequest) -> None:
    rig.cluster.set_api_healthy(False)
    run = rig.deploy()
    rig.cluster.set_api_healthy(True)
    _note(request, rig, "API down (exit 4)", run.outputs["status"])
    assert run.outputs["status"] == "failed", run.log
    assert "sudo systemctl restart k3s" in run.log
    assert rig.assert_one_release(run) == "v1"
    rig.assert_nothing_left(run)


def test_lock_held_by_another_deploy_changes_nothing_and_names_it(
    rig: Rig, request: pytest.FixtureRequest
) -> None:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000000Z")
    rig.cluster.seed(
        "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: k3s-deploy-lock\n"
        "  namespace: kube-system\n  annotations:\n"
        '    k3s-deploy-action/run-url: "https://github.com/acme/platform/actions/runs/77"\n'
        f'spec:\n  holderIdentity: "{OTHER}"\n  acquireTime: "{now}"\n  renewTime: "{now}"\n'
        "  leaseDurationSeconds: 600\n"
    )
    run = rig.deploy(**{"lock-timeout": "2"})
    _note(request, rig, "lock held by another deploy (exit 6)", run.outputs["status"])
    assert run.outputs["status"] == "failed", run.log
    assert OTHER in run.log and "actions/runs/77" in run.log
    assert "raise `lock-timeout`" in run.log
    assert rig.cluster.get("lease", "kube-system", "k3s-deploy-lock")["spec"]["holderIdentity"] == OTHER
    assert rig.assert_one_release(run) == "v1"
    rig.assert_nothing_left(run)


def test_bundle_the_cluster_refuses_changes_nothing(rig: Rig, request: pytest.FixtureRequest) -> None:
    rig.write_manifests({"widget.yaml": "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w\n"})
    run = rig.deploy()
    _note(request, rig, "bundle refused before apply (exit 5)", run.outputs["status"])
    assert run.outputs["status"] == "failed", run.log
    assert "Widget" in run.log
    assert rig.assert_one_release(run) == "v1"
    rig.assert_nothing_left(run)


def test_staged_file_gone_before_download_changes_nothing(rig: Rig, request: pytest.FixtureRequest) -> None:
    s3 = rig.sim.client("s3")

    def delete_bundle(_call: Call) -> None:
        bucket = rig.staged_buckets()[0]
        s3.delete_object(Bucket=bucket, Key="manifests.tar.gz")

    rig.on("SendCommand", delete_bundle)
    run = rig.deploy()
    _note(request, rig, "download fails (exit 90)", run.outputs["status"])
    assert run.outputs["status"] == "failed", run.log
    assert "could not download" in run.log and "s3:GetObject" in run.log
    assert rig.assert_one_release(run) == "v1"
    rig.assert_nothing_left(run)


def test_apply_failing_half_way_is_rolled_back(rig: Rig, request: pytest.FixtureRequest) -> None:
    rig.cluster.fail_apply("Deployment", "worker")
    run = rig.deploy()
    _note(request, rig, "apply fails half-way", run.outputs["status"])
    assert run.outputs["status"] in ("rolled-back", "failed"), run.log
    assert rig.assert_one_release(run) == "v1"
    rig.assert_nothing_left(run)


def test_rollout_failing_is_rolled_back(rig: Rig, request: pytest.FixtureRequest) -> None:
    rig.cluster.break_image(f"{API}:v2", "CrashLoopBackOff")
    run = rig.deploy()
    _note(request, rig, "rollout fails (exit 7)", run.outputs["status"])
    assert run.outputs["status"] == "rolled-back", run.log
    assert run.outputs["rolled-back"] == "true"
    assert rig.assert_one_release(run) == "v1"
    rig.assert_nothing_left(run)


def test_rollback_failing_too_is_failed_and_says_so(rig: Rig, request: pytest.FixtureRequest) -> None:
    """`rollout undo` refused (a wrapper on the master): exit 8; the workloads stay on v2."""
    rig.cluster.break_image(f"{API}:v2", "CrashLoopBackOff")
    real = rig.master.bin_dir / "kubectl"
    rig.install_on_master(
        "kubectl-no-undo",
        "#!/bin/sh\n"
        'case " $* " in *" rollout undo "*)\n'
        '  echo "error: undo refused by admission" >&2; exit 1;;\n'
        "esac\n"
        f'exec {real} "$@"\n',
    )
    run = rig.deploy(kubectl="kubectl-no-undo")
    _note(request, rig, "rollout fails, rollback fails too (exit 8)", run.outputs["status"])
    assert run.outputs["status"] == "failed", run.log
    assert run.outputs["rolled-back"] == "false"
    assert "rollback failed" in run.log.lower()
    assert rig.assert_one_release(run) == "v2"
    rig.assert_nothing_left(run)


def test_rollout_past_the_timeout_is_timed_out_and_rolled_back(
    rig: Rig, request: pytest.FixtureRequest
) -> None:
    rig.slow_api_rollout(120)
    run = rig.deploy(timeout="10")
    _note(request, rig, "rollout past 'timeout' (exit 10)", run.outputs["status"])
    assert run.outputs["status"] == "timed-out", run.log
    assert run.outputs["rolled-back"] == "true"
    assert rig.assert_one_release(run) == "v1"
    rig.assert_nothing_left(run)
