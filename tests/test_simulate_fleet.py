"""The SSM agent stand-in's fan-out: MaxConcurrency and MaxErrors as SSM applies them, and the
knobs the fleet, HA and benchmark tests use (a wedged agent, a replaced remote command)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from devkit.simulate import SimulatedAWS

TERMINAL = {"Success", "Failed", "TimedOut", "Cancelled"}


@pytest.fixture
def sim():
    with SimulatedAWS() as simulated:
        yield simulated


@pytest.fixture
def ssm(sim):
    return sim.client("ssm")


def send(ssm, instance_ids: list[str], *commands: str, **extra: Any) -> str:
    response = ssm.send_command(
        InstanceIds=instance_ids,
        DocumentName="AWS-RunShellScript",
        Parameters={"commands": list(commands)},
        **extra,
    )
    return response["Command"]["CommandId"]


def wait_for_command(ssm, command_id: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        (found,) = ssm.list_commands(CommandId=command_id)["Commands"]
        if found["Status"] in TERMINAL:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"still {found['Status']} after {timeout} s")
        time.sleep(0.05)


def by_instance(ssm, command_id: str) -> dict[str, dict[str, Any]]:
    entries = ssm.list_command_invocations(CommandId=command_id, Details=True)["CommandInvocations"]
    return {entry["InstanceId"]: entry for entry in entries}


def most_at_once(runs: list[dict[str, Any]]) -> int:
    edges = sorted([(r["started"], 1) for r in runs] + [(r["ended"], -1) for r in runs])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def test_max_concurrency_caps_the_instances_running_at_once(sim, ssm):
    masters = [sim.add_master(f"k3s-{n}") for n in range(4)]
    # long enough that two runs overlap even on a loaded machine (the cap must be reached)
    command_id = send(ssm, [m.instance_id for m in masters], "sleep 2", MaxConcurrency="2")

    assert wait_for_command(ssm, command_id)["Status"] == "Success"
    assert len(sim.commands_run) == 4
    assert most_at_once(sim.commands_run) == 2
    # in the order of the command's instances
    started = sorted(sim.commands_run, key=lambda r: r["started"])
    # (the first two start together: which of them starts first is up to the threads)
    assert {r["instance_id"] for r in started[:2]} == {m.instance_id for m in masters[:2]}


def test_a_percentage_of_concurrency_is_of_the_targets_rounded_up(sim, ssm):
    masters = [sim.add_master(f"k3s-{n}") for n in range(3)]
    command_id = send(ssm, [m.instance_id for m in masters], "sleep 2", MaxConcurrency="34%")

    wait_for_command(ssm, command_id)
    assert most_at_once(sim.commands_run) == 2  # 34% of 3 = 1.02, rounded up


def test_max_errors_stops_sending_once_exceeded(sim, ssm):
    masters = [sim.add_master(f"k3s-{n}") for n in range(4)]
    ids = [m.instance_id for m in masters]
    command_id = send(ssm, ids, "exit 3", MaxConcurrency="1", MaxErrors="1")

    command = wait_for_command(ssm, command_id)
    results = by_instance(ssm, command_id)

    assert command["Status"] == "Failed"
    assert [results[i]["Status"] for i in ids] == ["Failed", "Failed", "Cancelled", "Cancelled"]
    assert [results[i]["StatusDetails"] for i in ids[2:]] == ["Terminated", "Terminated"]
    assert [results[i]["CommandPlugins"][0]["ResponseCode"] for i in ids[2:]] == [-1, -1]
    assert [r["instance_id"] for r in sim.commands_run] == ids[:2]


def test_max_errors_zero_stops_after_the_first_error(sim, ssm):
    masters = [sim.add_master(f"k3s-{n}") for n in range(3)]
    ids = [m.instance_id for m in masters]
    command_id = send(ssm, ids, "exit 9", MaxConcurrency="1", MaxErrors="0")

    wait_for_command(ssm, command_id)
    assert [r["instance_id"] for r in sim.commands_run] == ids[:1]


def test_errors_within_max_errors_let_the_rest_run(sim, ssm):
    masters = [sim.add_master(f"k3s-{n}") for n in range(3)]
    failing = masters[0]
    failing.replace_commands_with = "exit 4"
    command_id = send(ssm, [m.instance_id for m in masters], "true", MaxConcurrency="1", MaxErrors="1")

    command = wait_for_command(ssm, command_id)
    results = by_instance(ssm, command_id)

    assert [results[m.instance_id]["Status"] for m in masters] == ["Failed", "Success", "Success"]
    assert command["ErrorCount"] == 1 and command["CompletedCount"] == 3


def test_a_master_that_does_not_take_commands_is_online_but_times_out_delivery(sim, ssm):
    sim.delivery_timeout_scale = 1 / 30  # 30 s -> 1 s
    wedged = sim.add_master("k3s-wedged")
    wedged.accepts_commands = False
    info = ssm.describe_instance_information()["InstanceInformationList"]
    assert [i["PingStatus"] for i in info] == ["Online"]

    command_id = send(ssm, [wedged.instance_id], "touch ran", TimeoutSeconds=30)

    wait_for_command(ssm, command_id)
    result = by_instance(ssm, command_id)[wedged.instance_id]
    assert (result["Status"], result["StatusDetails"]) == ("TimedOut", "DeliveryTimedOut")
    assert not (wedged.path / "ran").exists()


def test_a_replaced_remote_command_runs_instead_of_the_sent_one(sim, ssm):
    master = sim.add_master()
    master.replace_commands_with = "echo light > light.txt"
    command_id = send(ssm, [master.instance_id], "echo heavy > heavy.txt")

    wait_for_command(ssm, command_id)
    assert (master.path / "light.txt").exists()
    assert not (master.path / "heavy.txt").exists()
    assert sim.commands_run[0]["script"].startswith("echo heavy")  # what was sent


def test_every_request_is_reported_to_the_watcher():
    seen: list[str] = []
    with SimulatedAWS(on_request=lambda environ: seen.append(environ["PATH_INFO"])) as sim:
        sim.client("sts").get_caller_identity()
    assert seen
