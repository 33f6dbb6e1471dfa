"""A cancelled job in each phase: SIGTERM (what the runner sends) while the action looks for the
master, creates the bucket, uploads, sends the command, waits, and cleans up; and SIGKILL while
waiting, the one case that leaves the bucket to the post step and to `sweep`."""

from __future__ import annotations

import signal
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from devkit.simulate.cluster import Cluster
from devkit.simulate.runner import ActionRun, run_post_step
from tests.reliability import figures
from tests.reliability.conftest import API, NS, WORKER, WORKLOADS, Rig, Started, manifests, release_yaml

pytestmark = pytest.mark.e2e

PHASES = {
    # phase: (operation the signal arrives with, matching calls let through first)
    "finding the master": ("DescribeInstances", 0),
    "creating the bucket": ("CreateBucket", 0),
    "uploading": ("PutObject", 1),
    "sending the command": ("SendCommand", 0),
    "waiting": ("GetCommandInvocation", 2),
    "cleaning up": ("DeleteObjects", 0),
}


def _note_cancel(request: pytest.FixtureRequest, rig: Rig, run: ActionRun, case: str) -> None:
    """The row of this test in the cancel table of docs/RELIABILITY.md (the signal: one fault)."""
    figures.note(
        request.node,
        table="cancel",
        case=case,
        status=run.outputs.get("status"),
        left=len(rig.staged_buckets()),
        other_faults=1,
    )


@pytest.mark.parametrize("phase", list(PHASES))
def test_sigterm_in_each_phase(rig: Rig, phase: str, request: pytest.FixtureRequest) -> None:
    operation, after = PHASES[phase]
    if phase == "waiting":
        rig.slow_api_rollout(20)
    holder: list[Started] = []
    rig.on(operation, lambda _call: holder[0].signal(signal.SIGTERM), after=after)
    holder.append(rig.start())

    run = holder[0].wait(timeout=60)

    rig.settle()
    _note_cancel(request, rig, run, f"SIGTERM while {phase}")
    if phase == "cleaning up":
        # the deploy had finished: the cancel only stops the run after its cleanup
        assert run.outputs["status"] in ("cancelled", "success"), run.log
    else:
        assert run.outputs["status"] == "cancelled", run.log
    assert run.returncode in (0, 1)
    assert len(rig.deploy_runs()) <= 1
    rig.assert_one_release(run)
    rig.assert_nothing_left(run)


def test_sigkill_while_waiting_leaves_the_bucket_to_the_post_step(
    rig: Rig, request: pytest.FixtureRequest
) -> None:
    """SIGKILL cannot be handled: the bucket stays. The runner's post step (post.py, from the
    state the main step saved) deletes it; `sweep` would find it otherwise."""
    rig.slow_api_rollout(3)
    holder: list[Started] = []
    rig.on("GetCommandInvocation", lambda _call: holder[0].signal(signal.SIGKILL), after=1)
    holder.append(rig.start())

    run = holder[0].wait(timeout=60)
    rig.settle()
    left = rig.staged_buckets()
    assert run.returncode == -signal.SIGKILL
    assert len(left) == 1 and run.state.get("bucket") == left[0]

    from deploykit import sweep

    listed = sweep.find_leftovers(rig.sim.client("s3"), rig.sim.account_id, older_than=0)
    assert [leftover.bucket for leftover in listed] == left and listed[0].ours
    log = run_post_step(rig.sim, run.state, {"aws-region": rig.sim.region})
    figures.note(
        request.node,
        table="kill",
        case="SIGKILL while waiting, then the post step",
        status="killed",
        left=len(left),
        left_because="after a SIGKILL (deleted by the post step)",
        left_after_sweep=len(rig.staged_buckets()),
        other_faults=1,
    )
    assert rig.staged_buckets() == [], log
    assert rig.assert_one_release(run) == "v2"  # the script finished on its own


def test_sigterm_while_a_fleet_deploys_rolls_every_master_back(
    rig: Rig, request: pytest.FixtureRequest
) -> None:
    """Fleet mode (one command for every master with the tag): a cancel stops the command on
    every master and sends each the rollback. Every master ends on one release, none keeps
    the deploy's state or files, and nothing staged is left."""
    masters = [rig.master, *(rig.sim.add_master(f"k3s-master-{n}") for n in "bc")]
    rig.sim.client("ec2").create_tags(
        Resources=[m.instance_id for m in masters], Tags=[{"Key": "Role", "Value": "k3s"}]
    )
    clusters = [Cluster(m.cluster_state_path) for m in masters]
    for cluster in clusters[1:]:
        cluster.seed(release_yaml("v1"))
    rig.write_manifests(manifests(progress_deadline=600))
    for cluster in clusters:
        cluster.slow_rollout("deployment", NS, "api", 30)
    started = rig.start(fleet="true", **{"instance-tag-key": "Role", "instance-tag": "k3s"})

    def cancel_once_every_master_applied() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and started.process.poll() is None:
            if all(c.revision("deployment", NS, "api") == "2" for c in clusters):
                for cluster in clusters:  # the old release comes back quickly
                    cluster.slow_rollout("deployment", NS, "api", 0)
                started.signal(signal.SIGTERM)
                return
            time.sleep(0.1)

    trigger = threading.Thread(target=cancel_once_every_master_applied, daemon=True)
    trigger.start()
    run = started.wait(timeout=120)
    trigger.join(timeout=5)

    rig.settle()
    _note_cancel(request, rig, run, "SIGTERM while a fleet of 3 masters rolls out")
    assert run.outputs["status"] == "cancelled", run.log
    rollbacks = rig.rollback_runs()
    assert sorted(r["instance_id"] for r in rollbacks) == sorted(m.instance_id for m in masters), run.log
    for master, cluster in zip(masters, clusters, strict=True):
        images = {cluster.image_of(*workload) for workload in WORKLOADS}
        assert images == {f"{API}:v1", f"{WORKER}:v1"}, (master.name, images, rig.master_log())
        assert list(master.state_dir.iterdir()) == [], f"{master.name} kept a deploy's state"
        assert list(master.tmp_dir.iterdir()) == [], f"{master.name} kept a download folder"
    assert rig.staged_buckets() == []


def test_sigterm_while_sending_to_the_next_ha_server_stops_the_deploy_there(
    rig: Rig, request: pytest.FixtureRequest
) -> None:
    """HA: the first server never takes the command, the action fails over, and the job is
    cancelled while that second SendCommand is on its way. The command did go out: the action
    must find it on the server it went to, stop it there and roll back through that server."""
    rig.sim.delivery_timeout_scale = 0.05  # SSM's 120 s delivery timeout -> 6 s
    first = datetime(2024, 1, 1, tzinfo=UTC)
    wedged, healthy = (
        rig.sim.add_master(
            f"prod-k3s-master-{n}", tags={"k3s-cluster": "prod"}, launch_time=first + timedelta(days=n)
        )
        for n in range(2)
    )
    for server in (wedged, healthy):  # one cluster: the rig's, already on v1
        server.env["KUBECTL_DOUBLE_STATE"] = str(rig.master.cluster_state_path)
    wedged.accepts_commands = False  # Online, but its agent never picks a command up
    rig.slow_api_rollout(30)
    holder: list[Started] = []
    rig.on("SendCommand", lambda _call: holder[0].signal(signal.SIGTERM), after=1)
    holder.append(rig.start(**{"instance-tag": "prod-k3s-master-*"}))

    run = holder[0].wait(timeout=120)

    rig.settle()
    _note_cancel(request, rig, run, "SIGTERM while failing over to the next HA server")
    assert run.outputs["status"] == "cancelled", run.log
    deploys = [s for s in rig.sim.sent_commands() if not s["comment"].startswith("k3s-deploy rollback ")]
    assert [s["instance_ids"] for s in deploys] == [[wedged.instance_id], [healthy.instance_id]], run.log
    assert run.outputs["instance-id"] == healthy.instance_id, run.log
    assert run.outputs["command-id"] == deploys[1]["command_id"], run.log
    stopped = rig.sim.invocation(deploys[1]["command_id"], healthy.instance_id)
    assert stopped["Status"] == "Cancelled", (stopped["Status"], rig.master_log())
    assert rig.assert_one_release(run) in ("v1", "v2")
    assert rig.images()[("deployment", NS, "api")] == f"{API}:v1", rig.master_log()
    for server in (wedged, healthy):
        assert list(server.state_dir.iterdir()) == [], f"{server.name} kept a deploy's state"
        assert list(server.tmp_dir.iterdir()) == [], f"{server.name} kept a download folder"
    assert rig.staged_buckets() == []
