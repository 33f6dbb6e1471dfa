"""What SSM can answer about a command, each once: every Status value, an invocation that does not
exist yet, output past SSM's limits, an instance that drops off mid-command, a command never
delivered, an agent killed mid-command. The action must reach the right status, say what
happened, leave nothing staged, and leave every workload on one release."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from devkit.simulate.faults import Call
from tests.reliability import figures
from tests.reliability.conftest import NS, Rig

pytestmark = pytest.mark.e2e


def _note(request: pytest.FixtureRequest, rig: Rig, case: str, status: str, other_faults: int = 1) -> None:
    rig.settle()
    figures.note(
        request.node,
        table="ssm",
        case=case,
        status=status,
        left=len(rig.staged_buckets()),
        other_faults=other_faults,
    )


def _wait_for_v2(rig: Rig, seconds: float = 30) -> None:
    """Until the deploy has applied the new api (so there is something to undo)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if rig.cluster.image_of("deployment", NS, "api") == "docker.io/acme/api:v2":
            return
        time.sleep(0.1)


def _later(seconds: float, action) -> None:
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.start()


def test_success(rig: Rig, request: pytest.FixtureRequest) -> None:
    run = rig.deploy()
    _note(request, rig, "Success", run.outputs["status"], other_faults=0)
    assert run.returncode == 0 and run.outputs["status"] == "success", run.log
    assert rig.assert_one_release(run) == "v2"
    rig.assert_nothing_left(run)


def test_pending_until_the_master_comes_back_is_delivered_late(
    rig: Rig, request: pytest.FixtureRequest
) -> None:
    """Pending: the agent is offline when the command is sent and back 3 s later."""

    def offline_for_a_while(_call: Call) -> None:
        rig.master.set_online(False)
        _later(3, lambda: rig.master.set_online(True))

    rig.on("SendCommand", offline_for_a_while)
    run = rig.deploy()
    _note(request, rig, "Pending (agent offline 3 s), then delivered", run.outputs["status"])
    assert run.outputs["status"] == "success", run.log
    assert rig.assert_one_release(run) == "v2"
    rig.assert_nothing_left(run)


def test_delayed_keeps_the_action_waiting(rig: Rig, request: pytest.FixtureRequest) -> None:
    """Delayed (the agent is busy with another document): not an end; keep polling."""

    def delayed(status: int, body: bytes) -> tuple[int, bytes]:
        answer = json.loads(body)
        answer.update(Status="Delayed", StatusDetails="Delayed", StandardOutputContent="")
        return status, json.dumps(answer).encode()

    rig.proxy.add("GetCommandInvocation", "rewrite", rewrite=delayed, times=3)
    run = rig.deploy()
    _note(request, rig, "Delayed for 3 polls", run.outputs["status"])
    assert run.outputs["status"] == "success", run.log
    assert rig.assert_one_release(run) == "v2"
    rig.assert_nothing_left(run)


def test_cancelled_by_someone_else_is_rolled_back_by_the_action(
    rig: Rig, request: pytest.FixtureRequest
) -> None:
    """Cancelling, then Cancelled: someone cancels the command in the console mid-rollout."""
    rig.slow_api_rollout(30)
    ssm = rig.sim.client("ssm")

    def cancel_it(_call: Call) -> None:
        _wait_for_v2(rig)
        ssm.cancel_command(CommandId=rig.sim.sent_commands()[-1]["command_id"])

    rig.on("GetCommandInvocation", cancel_it, after=3)
    run = rig.deploy()
    _note(request, rig, "Cancelling, then Cancelled (by someone else)", run.outputs["status"])
    assert run.outputs["status"] == "rolled-back", run.log
    assert run.outputs["rolled-back"] == "true"
    assert rig.assert_one_release(run) == "v1"
    rig.assert_nothing_left(run)


def test_timed_out_execution_is_rolled_back(rig: Rig, request: pytest.FixtureRequest) -> None:
    """TimedOut (ExecutionTimedOut): SSM kills the script. The SendCommand on the wire asks
    for a 12 s executionTimeout, so the kill comes mid-rollout without waiting minutes."""
    rig.slow_api_rollout(30)

    def short_execution_timeout(call: Call) -> bytes:
        body = json.loads(call.body)
        body["Parameters"]["executionTimeout"] = ["12"]
        return json.dumps(body).encode()

    rig.on("SendCommand", short_execution_timeout)
    run = rig.deploy()
    _note(request, rig, "TimedOut (ExecutionTimedOut)", run.outputs["status"])
    assert run.outputs["status"] == "timed-out", run.log
    assert run.outputs["rolled-back"] == "true", run.log
    assert rig.assert_one_release(run) == "v1"
    rig.assert_nothing_left(run)


@pytest.fixture
def rig_options(request: pytest.FixtureRequest) -> dict[str, object]:
    return getattr(request, "param", {})


@pytest.mark.parametrize("rig_options", [{"invocation_delay": 4.0}], indirect=True, ids=["4s"])
def test_invocation_that_does_not_exist_yet_is_waited_for(rig: Rig, request: pytest.FixtureRequest) -> None:
    run = rig.deploy()
    _note(request, rig, "InvocationDoesNotExist for 4 s", run.outputs["status"])
    assert run.outputs["status"] == "success", run.log
    assert len([c for c in rig.proxy.calls_to("GetCommandInvocation") if c.status == 400]) >= 2
    assert rig.assert_one_release(run) == "v2"
    rig.assert_nothing_left(run)


def test_command_never_delivered_ran_nothing(rig: Rig, request: pytest.FixtureRequest) -> None:
    """The master drops off as the command is sent and never comes back: DeliveryTimedOut.
    (The simulated delivery timeout is scaled down: 120 s becomes 3 s.)"""
    rig.sim.delivery_timeout_scale = 3 / 120
    rig.on("SendCommand", lambda _call: rig.master.set_online(False))
    run = rig.deploy()
    _note(request, rig, "never delivered (DeliveryTimedOut)", run.outputs["status"])
    assert run.returncode == 1
    assert run.outputs["status"] in ("timed-out", "failed"), run.log  # SSM says TimedOut
    assert run.outputs["rolled-back"] == "false"
    assert "did not pick up the command" in run.log and "nothing ran" in run.log
    assert "amazon-ssm-agent" in run.log  # the fix
    assert rig.deploy_runs() == []
    assert rig.assert_one_release(run) == "v1"
    rig.master.set_online(True)
    rig.assert_nothing_left(run)


def test_instance_offline_mid_command_is_waited_for(rig: Rig, request: pytest.FixtureRequest) -> None:
    """ConnectionLost while the script runs: the agent keeps running it and reports when back."""
    rig.slow_api_rollout(3)

    def drop_off(_call: Call) -> None:
        rig.master.set_online(False)
        _later(4, lambda: rig.master.set_online(True))

    rig.on("GetCommandInvocation", drop_off, after=1)
    run = rig.deploy()
    _note(request, rig, "instance offline mid-command for 4 s", run.outputs["status"])
    assert run.outputs["status"] == "success", run.log
    assert rig.assert_one_release(run) == "v2"
    rig.assert_nothing_left(run)


def test_agent_killed_mid_command_is_rolled_back_by_the_action(
    rig: Rig, request: pytest.FixtureRequest
) -> None:
    """The script dies without reporting (instance rebooted, agent restarted: exit -1)."""
    rig.slow_api_rollout(30)

    def kill_the_script(_call: Call) -> None:
        command_id = rig.sim.sent_commands()[0]["command_id"]
        invocation = rig.sim._invocations[(command_id, rig.master.instance_id)]
        _wait_for_v2(rig)
        assert invocation.process is not None
        os.killpg(invocation.process.pid, signal.SIGKILL)

    rig.on("GetCommandInvocation", kill_the_script, after=2)
    run = rig.deploy()
    _note(request, rig, "script killed mid-rollout (no report)", run.outputs["status"])
    assert run.outputs["status"] == "rolled-back", run.log
    assert rig.assert_one_release(run) == "v1"
    rig.assert_nothing_left(run)


def test_output_past_the_limit_is_reported_as_cut(rig: Rig, request: pytest.FixtureRequest) -> None:
    """A chatty kubectl: 30,000 characters of stdout. SSM returns 24,000; the action says so,
    and still reads the report (it is on stderr)."""
    real = rig.master.bin_dir / "kubectl"
    rig.install_on_master(
        "kubectl-chatty",
        "#!/bin/sh\n"
        f'if [ "$1" = apply ]; then head -c 15000 /dev/zero | tr \'\\0\' x; echo; fi\nexec {real} "$@"\n',
    )
    run = rig.deploy(kubectl="kubectl-chatty")
    _note(request, rig, "stdout past 24,000 characters", run.outputs["status"], other_faults=0)
    assert run.outputs["status"] == "success", run.log
    assert "Output truncated" in run.log and "standard output" in run.log
    assert rig.assert_one_release(run) == "v2"
    rig.assert_nothing_left(run)
