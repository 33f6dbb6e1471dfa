"""The action's image, run exactly as the GitHub runner runs it, against a simulated AWS account.

`docker run --network host` lets the container reach the moto server that SimulatedAWS starts on
127.0.0.1 in this test process; the SSM agent stand-in, also in this process, runs what the
container sends on the simulated master (the real deploy script, the real AWS CLI, the kubectl
double). Inputs travel as the runner passes them (`INPUT_AWS-REGION`, hyphens kept), outputs,
state and summary come back through the mounted `/github/file_commands`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from deploykit import stage
from tests.e2e.conftest import API, NS, WORKER, platform_manifests

from .conftest import ActionRun, Launched, RunAction, StartAction, World, docker

pytestmark = pytest.mark.container

# The runner sends SIGINT, then SIGTERM, then kills (about 10 s in all): the action must be gone
# well before, with its outputs written and nothing left in S3.
CANCEL_BUDGET_S = 7.0
# A cancelled command's rollback then runs on the master: how long the test waits for it.
ROLLBACK_WAIT_S = 120.0
# Budgets that survive a loaded CI machine (the vfs storage driver copies the whole image for
# every container): for one `docker run` of a deploy, and for a deploy to reach its rollout.
RUN_TIMEOUT_S = 420.0
APPLY_WAIT_S = 240.0


def wait_until(
    check: Callable[[], Any], what: str, timeout: float = 60, launched: Launched | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if launched is not None and launched.process.poll() is not None:
            run = launched.wait()
            pytest.fail(f"the action ended (exit {run.returncode}) before {what}:\n{run.log}")
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def assert_every_output_written(run: ActionRun) -> None:
    assert {"instance-id", "command-id", "status", "rolled-back", "bucket", "duration"} <= set(run.outputs), (
        run.outputs,
        run.log,
    )
    assert run.outputs["duration"].isdigit()


def test_successful_deploy_through_the_container(world: World, run_action: RunAction) -> None:
    run = run_action(
        world.inputs(**{"image-tag": "v1"}), world.aws_env(), workspace=world.workspace, timeout=RUN_TIMEOUT_S
    )

    assert run.returncode == 0, run.log
    assert_every_output_written(run)
    assert run.outputs["status"] == "success"
    assert run.outputs["rolled-back"] == "false"
    assert run.outputs["instance-id"] == world.master.instance_id
    assert run.outputs["command-id"] == world.deploy_commands()[0]["command_id"]
    assert run.outputs["bucket"].startswith(stage.BUCKET_PREFIX)
    # INPUT_IMAGE-TAG and INPUT_AWS-REGION (hyphens kept) were read: the pins carry v1.
    assert "INPUT_IMAGE-TAG" in run.command and "INPUT_AWS-REGION" in run.command
    assert world.cluster.image_of("deployment", NS, "api") == f"{API}:v1"
    assert world.cluster.image_of("deployment", NS, "worker") == f"{WORKER}:v1"
    assert "2/2" in run.summary
    assert world.buckets() == []
    # Nothing is left for the post-entrypoint: the saved bucket was cleared.
    assert run.state.get("bucket") == ""


def test_failed_deploy_is_rolled_back_through_the_container(world: World, run_action: RunAction) -> None:
    world.seed_v1()
    world.cluster.break_image(f"{API}:v2", "CrashLoopBackOff")

    run = run_action(
        world.inputs(**{"image-tag": "v2"}), world.aws_env(), workspace=world.workspace, timeout=RUN_TIMEOUT_S
    )

    assert run.returncode == 1, run.log
    assert_every_output_written(run)
    assert run.outputs["status"] == "rolled-back"
    assert run.outputs["rolled-back"] == "true"
    assert "::error" in run.stdout
    assert world.cluster.image_of("deployment", NS, "api") == f"{API}:v1"
    assert world.buckets() == []


def start_slow_deploy(world: World, start_action: StartAction) -> Launched:
    """A deploy of v2 whose pods never become ready (and never fail): it waits for its timeout."""
    world.seed_v1(progress_deadline=600)
    world.write_manifests(platform_manifests(progress_deadline=600))
    world.cluster.break_image(f"{API}:v2", "ContainerCreating")
    launched = start_action(
        world.inputs(**{"image-tag": "v2", "timeout": "600"}), world.aws_env(), workspace=world.workspace
    )
    wait_until(
        lambda: world.cluster.image_of("deployment", NS, "api") == f"{API}:v2",
        "the deploy to apply v2 on the master",
        timeout=APPLY_WAIT_S,
        launched=launched,
    )
    return launched


def stop_and_time(launched: Launched, how: str) -> tuple[ActionRun, float]:
    """Signal the action as `how` says; the run, and seconds from the signal to its exit."""
    signalled = time.time()
    # docker stop: SIGTERM, then SIGKILL after 10 s (the runner's own cancel is similar)
    proc = docker("stop", launched.name, timeout=30) if how == "stop" else launched.signal(how)
    assert proc.returncode == 0, proc.stderr
    run = launched.wait(timeout=RUN_TIMEOUT_S)
    elapsed = launched.died_at(signalled) - signalled
    print(f"{how}: the action's container stopped {elapsed:.2f} s after the signal")
    return run, elapsed


@pytest.mark.parametrize("how", ["TERM", "INT", "stop"])
def test_cancel_while_waiting_stops_the_command_rolls_back_and_deletes_the_bucket(
    world: World, start_action: StartAction, how: str
) -> None:
    launched = start_slow_deploy(world, start_action)
    bucket = launched.state().get("bucket")
    assert bucket and bucket in world.buckets()

    run, elapsed = stop_and_time(launched, how)

    assert elapsed < CANCEL_BUDGET_S, f"took {elapsed:.1f} s to stop:\n{run.log}"
    assert run.returncode == 1, run.log
    assert_every_output_written(run)
    assert run.outputs["status"] == "cancelled"
    assert world.buckets() == [], run.log
    (deploy,) = world.deploy_commands()
    assert run.outputs["command-id"] == deploy["command_id"]
    assert wait_until(
        lambda: (
            world.sim.invocation(deploy["command_id"], world.master.instance_id)["Status"]
            in ("Cancelled", "Success", "Failed", "TimedOut")
        ),
        "the deploy command to end",
        timeout=ROLLBACK_WAIT_S,
    )
    assert world.sim.invocation(deploy["command_id"], world.master.instance_id)["Status"] == "Cancelled"
    # The rollback was sent without waiting for it; it undoes v2 on the master afterwards.
    (rollback,) = world.rollback_commands()
    assert rollback["comment"] == deploy["comment"].replace("k3s-deploy ", "k3s-deploy rollback ", 1)
    wait_until(
        lambda: (
            world.sim.invocation(rollback["command_id"], world.master.instance_id)["Status"]
            in ("Success", "Failed", "Cancelled", "TimedOut")
        ),
        "the rollback command to end",
        timeout=ROLLBACK_WAIT_S,
    )
    assert world.cluster.image_of("deployment", NS, "api") == f"{API}:v1"


def test_cancel_with_rollback_off_only_stops_the_command(world: World, start_action: StartAction) -> None:
    world.seed_v1(progress_deadline=600)
    world.write_manifests(platform_manifests(progress_deadline=600))
    world.cluster.break_image(f"{API}:v2", "ContainerCreating")
    launched = start_action(
        world.inputs(**{"image-tag": "v2", "timeout": "600", "rollback": "false"}),
        world.aws_env(),
        workspace=world.workspace,
    )
    wait_until(
        lambda: world.cluster.image_of("deployment", NS, "api") == f"{API}:v2",
        "the deploy to apply v2",
        timeout=APPLY_WAIT_S,
        launched=launched,
    )

    run, elapsed = stop_and_time(launched, "TERM")

    assert elapsed < CANCEL_BUDGET_S, run.log
    assert run.outputs["status"] == "cancelled"
    assert world.rollback_commands() == []
    assert world.buckets() == []


@pytest.fixture
def slow_upload(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Hold moto's S3 PutObject of the deploy script until the test ends (at most 15 s): the
    action is then between creating its bucket and sending the command. The event is set when
    the upload has reached the server."""
    from moto.s3.models import S3Backend

    reached, release = threading.Event(), threading.Event()
    original = S3Backend.put_object

    def put_object(self: S3Backend, bucket_name: str, key_name: str, *args: Any, **kwargs: Any) -> Any:
        if key_name.endswith("k3s-deploy.sh"):
            reached.set()
            release.wait(15)
        return original(self, bucket_name, key_name, *args, **kwargs)

    monkeypatch.setattr(S3Backend, "put_object", put_object)
    yield reached
    release.set()


def test_cancel_before_the_command_is_sent_deletes_the_bucket_and_sends_nothing(
    world: World, start_action: StartAction, slow_upload: threading.Event
) -> None:
    launched = start_action(world.inputs(**{"image-tag": "v1"}), world.aws_env(), workspace=world.workspace)
    wait_until(slow_upload.is_set, "the upload to start", timeout=APPLY_WAIT_S, launched=launched)
    assert len(world.buckets()) == 1

    run, elapsed = stop_and_time(launched, "TERM")

    assert elapsed < CANCEL_BUDGET_S, run.log
    assert run.returncode == 1, run.log
    assert_every_output_written(run)
    assert run.outputs["status"] == "cancelled"
    assert run.outputs["command-id"] == ""
    assert world.buckets() == [], run.log
    assert world.sim.sent_commands() == []


def post_step(world: World, run_action: RunAction, state: dict[str, str], **inputs: str) -> ActionRun:
    """The post-entrypoint as the runner runs it: a new container from the same image, the same
    inputs, `--entrypoint` from action.yml, and the main step's state as STATE_<name>."""
    env = {**world.aws_env(), **{f"STATE_{name}": value for name, value in state.items()}}
    return run_action(
        world.inputs(**inputs),
        env,
        workspace=world.workspace,
        entrypoint="/app/post.py",
        timeout=RUN_TIMEOUT_S,
    )


def test_post_entrypoint_deletes_the_bucket_of_a_killed_run(
    world: World, start_action: StartAction, run_action: RunAction
) -> None:
    launched = start_slow_deploy(world, start_action)
    state = wait_until(lambda: launched.state().get("bucket") and launched.state(), "the saved bucket")
    assert launched.signal("KILL").returncode == 0
    killed = launched.wait(timeout=RUN_TIMEOUT_S)
    assert killed.returncode != 0
    assert world.buckets() == [state["bucket"]]  # SIGKILL: no cleanup ran

    post = post_step(world, run_action, state)

    assert post.returncode == 0, post.log
    assert f"Deleted s3://{state['bucket']}" in post.stdout, post.log
    assert world.buckets() == []
    # Run again (a retried job): already clean is fine.
    again = post_step(world, run_action, state)
    assert again.returncode == 0 and "::warning" not in again.stdout, again.log


@pytest.mark.parametrize(
    ("bucket", "tags"),
    [
        ("k3s-deploy-20250101-000000-deadbeef", None),  # our name, no tags
        ("k3s-deploy-20250101-000000-deadbee0", {"team": "data"}),  # our name, not our tag
        ("acme-production-data", {stage.MANAGED_TAG: "staging"}),  # our tag, not our name
    ],
)
def test_post_entrypoint_leaves_a_bucket_that_is_not_ours_alone(
    world: World, run_action: RunAction, bucket: str, tags: dict[str, str] | None
) -> None:
    s3 = world.sim.client("s3")
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": world.sim.region})
    s3.put_object(Bucket=bucket, Key="precious.txt", Body=b"keep me")
    if tags:
        s3.put_bucket_tagging(
            Bucket=bucket, Tagging={"TagSet": [{"Key": k, "Value": v} for k, v in tags.items()]}
        )

    post = post_step(world, run_action, {"bucket": bucket, "prefix": ""})

    assert post.returncode == 0, post.log
    assert "::warning" in post.stdout and "Left alone" in post.stdout, post.log
    assert world.buckets() == [bucket]
    assert s3.get_object(Bucket=bucket, Key="precious.txt")["Body"].read() == b"keep me"
