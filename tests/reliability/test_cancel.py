"""A cancelled job in each phase: SIGTERM (what the runner sends) while the action looks for the
master, creates the bucket, uploads, sends the command, waits, and cleans up; and SIGKILL while
waiting, the one case that leaves the bucket to the post step and to `sweep`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from deploykit.simulate.aws import PROJECT_ROOT
from tests.reliability import figures
from tests.reliability.conftest import Rig, Started

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
    figures.note(
        request.node,
        table="cancel",
        case=f"SIGTERM while {phase}",
        status=run.outputs.get("status"),
        left=len(rig.staged_buckets()),
        other_faults=1,
    )
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
    env = rig.sim.env(
        {k: v for k, v in os.environ.items() if not k.startswith(("INPUT_", "GITHUB_", "STATE_"))}
    )
    env.update({f"STATE_{name}": value for name, value in run.state.items()})
    env.update({"INPUT_AWS-REGION": rig.sim.region, "PYTHONPATH": str(PROJECT_ROOT)})
    post = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "post.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
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
    assert post.returncode == 0, post.stdout + post.stderr
    assert rig.staged_buckets() == [], post.stdout + post.stderr
    assert rig.assert_one_release(run) == "v2"  # the script finished on its own
