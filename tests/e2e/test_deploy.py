"""The core contract, end to end: the action process, moto's server, the SSM agent stand-in,
the real deploy script with the real AWS CLI, and the kubectl double holding the cluster."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import API, NS, WORKER, World, platform_manifests

pytestmark = pytest.mark.e2e


def test_clean_deploy_makes_every_workload_ready_and_leaves_no_bucket(world: World) -> None:
    run = world.deploy(**{"image-tag": "v1"})

    assert run.returncode == 0, run.log
    assert run.outputs["status"] == "success"
    assert run.outputs["rolled-back"] == "false"
    assert run.outputs["instance-id"] == world.master.instance_id
    assert run.outputs["command-id"]
    assert run.outputs["bucket"].startswith("k3s-deploy-")
    assert run.outputs["duration"].isdigit()
    cluster = world.cluster
    assert cluster.image_of("deployment", NS, "api") == f"{API}:v1"
    assert cluster.image_of("deployment", NS, "worker") == f"{WORKER}:v1"
    assert cluster.image_of("statefulset", NS, "redis") == "redis:7-alpine"
    assert "api" in run.summary and "2/2" in run.summary and "1/1" in run.summary
    assert world.buckets() == []
    # the master keeps nothing once a deploy is over
    assert list(world.master.state_dir.iterdir()) == []
    assert list(world.master.tmp_dir.iterdir()) == []


def test_failed_rollout_rolls_back_only_the_workloads_it_changed(world: World) -> None:
    assert world.deploy(**{"image-tag": "v1"}).outputs["status"] == "success"
    worker_revision = world.cluster.revision("deployment", NS, "worker")
    # v2 changes only the api: the worker's image reference stays the same
    world.cluster.break_image(f"{API}:v2", "CrashLoopBackOff")

    run = world.deploy(images=f"{API}:v2\n{WORKER}:v1")

    assert run.returncode == 1
    assert run.outputs["status"] == "rolled-back"
    assert run.outputs["rolled-back"] == "true"
    cluster = world.cluster
    assert cluster.image_of("deployment", NS, "api") == f"{API}:v1"
    assert cluster.revision("deployment", NS, "worker") == worker_revision
    assert "::error" in run.log
    assert world.buckets() == []


def test_failed_rollout_with_rollback_off_stays_failed(world: World) -> None:
    assert world.deploy(**{"image-tag": "v1"}).outputs["status"] == "success"
    world.cluster.break_image(f"{API}:v2", "ImagePullBackOff")

    run = world.deploy(**{"image-tag": "v2", "rollback": "false"})

    assert run.returncode == 1
    assert run.outputs["status"] == "failed"
    assert run.outputs["rolled-back"] == "false"
    assert world.cluster.image_of("deployment", NS, "api") == f"{API}:v2"
    assert world.buckets() == []


def test_rollout_past_the_timeout_is_timed_out_and_rolled_back(world: World) -> None:
    world.write_manifests(platform_manifests(progress_deadline=600))
    assert world.deploy(**{"image-tag": "v1"}).outputs["status"] == "success"
    # v2's pods never become ready and never fail: only the deploy's own deadline stops it
    world.cluster.break_image(f"{API}:v2", "ContainerCreating")

    run = world.deploy(**{"image-tag": "v2", "timeout": "20"})

    assert run.returncode == 1
    assert run.outputs["status"] == "timed-out"
    assert run.outputs["rolled-back"] == "true"
    assert world.cluster.image_of("deployment", NS, "api") == f"{API}:v1"
    assert world.buckets() == []


def test_no_matching_instance_fails_naming_the_filter_and_creates_nothing(world: World) -> None:
    run = world.deploy(**{"instance-tag": "*no-such-master*", "image-tag": "v1"})

    assert run.returncode == 1
    assert run.outputs["status"] == "failed"
    assert "tag Name=*no-such-master*" in run.log
    assert world.buckets() == []
    assert world.sim.sent_commands() == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("namespace", "x; touch {canary}"),
        ("kubectl", "kubectl $(touch {canary})"),
        ("kubectl", "kubectl `touch {canary}`"),
        ("image-tag", "v1;touch {canary}"),
        ("request-timeout", "60s && touch {canary}"),
        ("instance-tag", "k3s\n$(touch {canary})"),
    ],
)
def test_shell_metacharacters_in_inputs_are_refused_and_nothing_runs(
    world: World, name: str, value: str
) -> None:
    canary = world.workspace.parent / "canary"
    run = world.deploy(**{"image-tag": "v1", name: value.format(canary=canary)})

    assert run.returncode == 1
    assert run.outputs["status"] == "failed"
    assert f"input '{name}'" in run.log
    assert not canary.exists()
    assert world.sim.sent_commands() == []
    assert world.buckets() == []


def test_bad_input_still_writes_every_output(world: World) -> None:
    run = world.deploy(timeout="10m")

    assert run.returncode == 1
    assert "input 'timeout' must be a whole number of seconds" in run.log
    assert run.outputs["status"] == "failed"
    assert set(run.outputs) >= {"instance-id", "command-id", "status", "rolled-back", "bucket", "duration"}
    assert "Invalid input" in run.log


def test_command_stopped_before_it_could_report_is_rolled_back_by_the_action(world: World) -> None:
    """SSM stops the script mid-rollout (here: someone cancels the command; an SSM execution
    timeout or a lost instance ends the same way). The script cannot roll back any more, so the
    action sends the script's rollback entry point, which works from the state the deploy left
    on the master."""
    world.write_manifests(platform_manifests(progress_deadline=600))
    assert world.deploy(**{"image-tag": "v1"}).outputs["status"] == "success"
    world.cluster.break_image(f"{API}:v2", "ContainerCreating")
    with world.cancelling_once_applied(f"{API}:v2"):
        run = world.deploy(**{"image-tag": "v2", "timeout": "120"})

    assert run.returncode == 1
    assert run.outputs["status"] == "rolled-back", run.log
    assert run.outputs["rolled-back"] == "true"
    assert world.cluster.image_of("deployment", NS, "api") == f"{API}:v1"
    assert list(world.master.state_dir.iterdir()) == []
    assert world.buckets() == []
