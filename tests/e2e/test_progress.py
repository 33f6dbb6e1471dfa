"""Live progress, end to end: the script on the simulated master puts its step lines to S3 with
the real AWS CLI (or curl) while it runs, and the action prints them before the command ends,
fenced like the rest of the master's output; nothing is left in S3 afterwards."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from devkit.simulate.aws import SimulatedAWS
from devkit.simulate.faults import ACCESS_DENIED, fault_proxy
from devkit.simulate.runner import ActionRun, run_action, run_post_step
from tests.e2e.conftest import API, NS, WORKER, World, platform_manifests

pytestmark = pytest.mark.e2e

WAITING_FOR_API = "==> waiting for deployment/api"


def deploy_timed(world: World, **inputs: str) -> tuple[ActionRun, list[tuple[float, str]]]:
    """world.deploy, with the time (this process's monotonic clock, as the simulated agent's)
    at which each log line arrived."""
    lines: list[tuple[float, str]] = []
    defaults = {"aws-region": world.sim.region, "images": f"{API}\n{WORKER}", "timeout": "60",
                "verify-images": "false", "image-tag": "v1"}
    run = run_action(world.sim, {**defaults, **inputs}, world.workspace, world.files, timeout=240,
                     on_line=lambda line: lines.append((time.monotonic(), line)))
    return run, lines


def fenced(log: str, needle: str) -> bool:
    """Every line holding `needle` lies between a stop-commands line and its closing token."""
    token = None
    found = False
    for line in log.splitlines():
        if token is None:
            match = re.fullmatch(r"::stop-commands::([0-9a-f]{32})", line)
            if match:
                token = match.group(1)
            elif needle in line:
                return False
        elif line == f"::{token}::":
            token = None
        elif needle in line:
            found = True
    return found


def team_bucket(world: World) -> Any:
    """The user's own bucket (input `bucket`), holding a file of theirs; its S3 client."""
    s3 = world.sim.client("s3")
    s3.create_bucket(Bucket="team-artifacts",
                     CreateBucketConfiguration={"LocationConstraint": world.sim.region})
    s3.put_object(Bucket="team-artifacts", Key="keep/me.txt", Body=b"mine")
    return s3


def quick_uploads(world: World) -> None:
    """The script puts its file every second (not 5 s), and the api's rollout may be slow."""
    world.master.env["K3S_DEPLOY_PROGRESS_SECONDS"] = "1"
    world.write_manifests(platform_manifests(progress_deadline=60))


def test_a_slow_rollout_shows_the_masters_steps_before_the_command_ends(world: World) -> None:
    quick_uploads(world)
    world.cluster.slow_rollout("deployment", NS, "api", 10)

    run, lines = deploy_timed(world)

    assert run.returncode == 0, run.log
    (command,) = world.sim.commands_run
    seen = [at for at, line in lines if WAITING_FOR_API in line]
    assert seen, run.log
    assert seen[0] < command["ended"], "the step line came only after the command ended"
    # Before the whole output, which the action gets only at the end.
    output_at = next(at for at, line in lines if "Output of the deploy on the master" in line)
    assert seen[0] < output_at
    assert fenced(run.log, WAITING_FOR_API)
    # Step lines only: no kubectl chatter (applied objects, rollout status lines).
    shown = run.log.split("Output of the deploy on the master")[0]
    assert not re.search(r"^\d\d:\d\d:\d\d \S+/\S+ (created|configured|unchanged)$", shown, re.M)
    assert "rolled out, ready 2/2" in shown
    assert world.buckets() == []


def test_a_hostile_progress_object_issues_no_workflow_command(world: World) -> None:
    """Whatever the object holds (a master that was taken over), it is printed fenced and
    neutralised: no annotation, no stop-commands of its own."""
    quick_uploads(world)
    world.cluster.slow_rollout("deployment", NS, "api", 3)
    s3 = world.sim.client("s3")

    def plant() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not world.sim.commands_run:
            time.sleep(0.1)
        (bucket,) = world.buckets()
        s3.put_object(Bucket=bucket, Key="progress/i-0123456789abcdef0.log",
                      Body=b"::error::x\n::stop-commands::abc\n  ::warning::y\n##[error]z\n")

    planter = threading.Thread(target=plant)
    planter.start()
    run, _ = deploy_timed(world)
    planter.join()

    assert run.returncode == 0, run.log
    lines = run.log.splitlines()
    assert not any(line.lstrip().startswith(("::error::x", "::stop-commands::abc", "::warning::y"))
                   for line in lines)
    assert "##[error]z" not in run.log
    # Shown, neutralised (a zero-width space between the colons), and inside a fence.
    assert fenced(run.log, ":\u200b:error:\u200b:x") and fenced(run.log, ":\u200b:warning:\u200b:y"), run.log
    assert world.buckets() == []


def test_a_master_that_may_not_put_the_object_deploys_and_says_progress_is_off(world: World) -> None:
    quick_uploads(world)
    world.cluster.slow_rollout("deployment", NS, "api", 6)
    with fault_proxy(world.sim.endpoint_url) as proxy:
        # The master's S3 calls go through the proxy, which refuses every PutObject.
        world.master.env["AWS_ENDPOINT_URL"] = proxy.url
        proxy.add("PutObject", ACCESS_DENIED, times=None)

        run, _ = deploy_timed(world)

        puts = proxy.calls_to("PutObject")
    assert run.returncode == 0, run.log
    assert run.outputs["status"] == "success"
    off = "live progress is off: the upload failed 3 times"
    said = [line for line in run.log.splitlines() if off in line]
    assert len(said) == 1 and "AccessDenied" in said[0], run.log
    assert len(puts) == 3  # bounded, and no last put once it is off
    assert WAITING_FOR_API not in run.log.split("Output of the deploy on the master")[0]
    assert world.buckets() == []


def test_progress_in_a_given_bucket_goes_with_the_prefix(world: World) -> None:
    quick_uploads(world)
    world.cluster.slow_rollout("deployment", NS, "api", 6)
    s3 = team_bucket(world)

    run, _ = deploy_timed(world, bucket="team-artifacts")

    assert run.returncode == 0, run.log
    assert WAITING_FOR_API in run.log.split("Output of the deploy on the master")[0]
    assert "from s3://team-artifacts/k3s-deploy/" in run.log
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="team-artifacts").get("Contents", [])]
    assert keys == ["keep/me.txt"]


def test_progress_off_sends_no_option_and_reads_nothing(world: World) -> None:
    run, _ = deploy_timed(world, progress="false")

    assert run.returncode == 0, run.log
    assert "Live progress" not in run.log
    assert "live progress is off" not in run.log


def test_presigned_delivery_puts_progress_with_curl(world: World) -> None:
    """curl, with the URL the action signed for this instance. Its content type is set: curl's
    default for a body (a form) had the object stored empty, so that no line ever showed."""
    quick_uploads(world)
    world.cluster.slow_rollout("deployment", NS, "api", 6)

    run, lines = deploy_timed(world, delivery="presigned")

    assert run.returncode == 0, run.log
    (command,) = world.sim.commands_run
    seen = [at for at, line in lines if WAITING_FOR_API in line]
    assert seen and seen[0] < command["ended"], run.log
    assert fenced(run.log, WAITING_FOR_API)
    assert "live progress is off" not in run.log and "Live progress off" not in run.log
    # The upload URL is masked before it could show anywhere else.
    masks = [line for line in run.log.splitlines() if line.startswith("::add-mask::")]
    assert any("/progress/" in line for line in masks), run.log
    assert world.buckets() == []


@pytest.fixture
def fleet(tmp_path: Path):
    with SimulatedAWS(root=tmp_path / "aws") as sim:
        masters = [sim.add_master(f"k3s-master-{n}") for n in "ab"]
        workspace = tmp_path / "workspace"
        workspace.mkdir()
        world = World(sim, masters[0], workspace, tmp_path / "file_commands")
        world.write_manifests(platform_manifests())
        yield world


def test_fleet_mode_shows_each_instances_lines_under_its_id(fleet: World) -> None:
    masters = list(fleet.sim.masters.values())
    for master in masters:
        master.env["K3S_DEPLOY_PROGRESS_SECONDS"] = "1"

    run, _ = deploy_timed(fleet, fleet="true", **{"instance-tag": "k3s-master-*"})

    assert run.returncode == 0, run.log
    for master in masters:
        first = rf"^{master.instance_id}: \d\d:\d\d:\d\d k3s-deploy: deploy "
        assert re.search(first, run.log, re.M), run.log
        assert f"{master.instance_id}: " in run.log
    assert fleet.buckets() == []


def test_a_cancel_leaves_the_post_step_to_delete_progress_the_master_puts_late(world: World) -> None:
    """Cancelled while the master still runs: the action deletes its prefix at once, but the
    master's script stops only seconds later, and a progress put may land after that. So the
    post step's state is kept, and the post step (which runs after the main step) deletes what
    came in late. The master's own script puts nothing once it is signalled."""
    quick_uploads(world)
    world.cluster.slow_rollout("deployment", NS, "api", 20)
    s3 = team_bucket(world)
    action: list[subprocess.Popen[str]] = []

    def cancel_on_the_first_live_line(line: str) -> None:
        if WAITING_FOR_API in line and "Output of the deploy" not in line and action:
            action.pop().send_signal(signal.SIGTERM)

    run = run_action(world.sim, {"aws-region": world.sim.region, "images": f"{API}\n{WORKER}",
                                 "timeout": "60", "verify-images": "false", "image-tag": "v1",
                                 "bucket": "team-artifacts"},
                     world.workspace, world.files, timeout=240,
                     on_line=cancel_on_the_first_live_line, on_start=action.append)

    assert run.outputs["status"] == "cancelled", run.log
    prefix = run.state["prefix"]
    assert prefix.startswith("k3s-deploy/") and not run.state.get("bucket"), run.state
    assert "the post step looks again for live progress" in run.log
    world.sim.settle(60)

    def keys() -> list[str]:
        return sorted(o["Key"] for o in s3.list_objects_v2(Bucket="team-artifacts").get("Contents", []))

    # The script stopped its uploader before its rollback: nothing came in after the cleanup.
    assert keys() == ["keep/me.txt"]
    # A put that landed late all the same (one in flight when the signal came):
    s3.put_object(Bucket="team-artifacts", Key=f"{prefix}progress/{world.master.instance_id}.log",
                  Body=b"12:00:00 ==> waiting for deployment/api\n")

    post_inputs = {"aws-region": world.sim.region, "bucket": "team-artifacts"}
    log = run_post_step(world.sim, run.state, post_inputs)

    assert f"Deleted s3://team-artifacts/{prefix}, which the deploy step had left behind (1 file)" in log
    assert keys() == ["keep/me.txt"]
    assert "Nothing was left in" in run_post_step(world.sim, run.state, post_inputs)


def test_a_deploy_that_ends_leaves_the_post_step_nothing(world: World) -> None:
    quick_uploads(world)

    run, _ = deploy_timed(world)

    assert run.returncode == 0, run.log
    assert run.state == {"bucket": "", "prefix": ""}, run.state
    assert "the post step looks again" not in run.log


def test_fleet_mode_warns_about_an_instance_that_deployed_but_put_no_progress(fleet: World) -> None:
    """Only failed instances' whole output is read in fleet mode, so a master that could not
    put (its role lacks s3:PutObject) would go unnoticed: the action names it in one warning."""
    masters = list(fleet.sim.masters.values())
    for master in masters:
        master.env["K3S_DEPLOY_PROGRESS_SECONDS"] = "1"
    denied = masters[1]
    with fault_proxy(fleet.sim.endpoint_url) as proxy:
        denied.env["AWS_ENDPOINT_URL"] = proxy.url
        proxy.add("PutObject", ACCESS_DENIED, times=None)

        run, _ = deploy_timed(fleet, fleet="true", **{"instance-tag": "k3s-master-*"})

    assert run.returncode == 0, run.log
    assert run.outputs["status"] == "success"
    warnings = [line for line in run.log.splitlines() if line.startswith("::warning")]
    (silent,) = [line for line in warnings if "No live progress came from" in line]
    assert f"1 instance(s) that deployed: {denied.instance_id}." in silent, silent
    assert masters[0].instance_id not in silent
    assert re.search(rf"^{masters[0].instance_id}: \d\d:\d\d:\d\d ", run.log, re.M), run.log
