"""The simulated AWS account: real boto3 clients against moto's server, real `sh` processes.

These tests prove the SSM agent stand-in behaves like the parts of AWS the action relies on,
so that the end-to-end tests built on it mean something.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from moto.ssm.responses import SimpleSystemManagerResponse

from devkit.simulate import SimulatedAWS, SimulationError, find_aws_cli

TERMINAL = {"Success", "Failed", "TimedOut", "Cancelled"}


@pytest.fixture
def sim():
    with SimulatedAWS() as simulated:
        yield simulated


@pytest.fixture
def ssm(sim):
    return sim.client("ssm")


def send(ssm, instance_id: str, *commands: str, **extra: Any) -> str:
    parameters = extra.pop("parameters", {})
    response = ssm.send_command(
        InstanceIds=[instance_id],
        DocumentName="AWS-RunShellScript",
        Parameters={"commands": list(commands), **parameters},
        **extra,
    )
    return response["Command"]["CommandId"]


def invocation(ssm, command_id: str, instance_id: str) -> dict[str, Any]:
    return ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)


def wait_until(ssm, command_id: str, instance_id: str, statuses, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        found = invocation(ssm, command_id, instance_id)
        if found["Status"] in statuses:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"still {found['Status']} after {timeout} s: {found}")
        time.sleep(0.05)


def wait_for_file(path: Path, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} was not written")
        time.sleep(0.05)
    return path.read_text().strip()


def process_is_gone(pid: int) -> bool:
    # A killed child of a dead shell may stay a zombie until init reaps it: gone all the same.
    stat = Path(f"/proc/{pid}/stat")
    try:
        state = stat.read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def gone_soon(pid: int, timeout: float = 2.0) -> bool:
    # A signal is delivered at once, but the process may take a moment to die.
    deadline = time.monotonic() + timeout
    while not process_is_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return process_is_gone(pid)


def error_code(excinfo: pytest.ExceptionInfo[ClientError]) -> str:
    return excinfo.value.response["Error"]["Code"]


def test_a_command_runs_in_the_master_folder_with_the_master_environment(sim, ssm):
    master = sim.add_master()
    command_id = send(
        ssm,
        master.instance_id,
        "echo ran > proof.txt",
        'echo "$HOME|$TMPDIR|$K3S_DEPLOY_STATE_DIR|$KUBECTL_DOUBLE_STATE"',
        "command -v kubectl; command -v aws",
        "echo to-stderr >&2",
        Comment="deploy-42",
    )

    found = wait_until(ssm, command_id, master.instance_id, TERMINAL)

    assert (master.path / "proof.txt").read_text() == "ran\n"
    assert found["Status"] == "Success"
    assert found["StatusDetails"] == "Success"
    assert found["ResponseCode"] == 0
    lines = found["StandardOutputContent"].splitlines()
    assert lines[0] == (f"{master.path}|{master.tmp_dir}|{master.state_dir}|{master.cluster_state_path}")
    assert lines[1] == str(master.bin_dir / "kubectl")
    assert lines[2] == str(find_aws_cli())
    assert found["StandardErrorContent"] == "to-stderr\n"
    assert found["ExecutionStartDateTime"] and found["ExecutionEndDateTime"]
    listed = ssm.list_commands(CommandId=command_id)["Commands"][0]
    assert (listed["Status"], listed["Comment"]) == ("Success", "deploy-42")
    [run] = sim.commands_run
    assert run["command_id"] == command_id
    assert run["instance_id"] == master.instance_id
    assert run["exit_code"] == 0
    assert "echo ran > proof.txt\n" in run["script"]
    assert sim.sent_commands()[0]["comment"] == "deploy-42"


def test_output_is_empty_until_the_command_ends(sim, ssm):
    master = sim.add_master()
    command_id = send(ssm, master.instance_id, "echo early", "echo x > started", "sleep 1")

    wait_for_file(master.path / "started")
    running = invocation(ssm, command_id, master.instance_id)
    assert running["Status"] == "InProgress"
    assert running["StandardOutputContent"] == ""
    assert ssm.list_commands(CommandId=command_id)["Commands"][0]["Status"] == "InProgress"
    done = wait_until(ssm, command_id, master.instance_id, TERMINAL)
    assert done["StandardOutputContent"] == "early\n"


def test_a_non_zero_exit_is_failed_with_its_exit_code(sim, ssm):
    master = sim.add_master()
    command_id = send(ssm, master.instance_id, "echo before", "exit 3", "echo never")

    found = wait_until(ssm, command_id, master.instance_id, TERMINAL)

    assert (found["Status"], found["StatusDetails"], found["ResponseCode"]) == (
        "Failed",
        "Failed",
        3,
    )
    assert found["StandardOutputContent"] == "before\n"
    assert ssm.list_commands(CommandId=command_id)["Commands"][0]["Status"] == "Failed"
    assert sim.commands_run[0]["exit_code"] == 3


def test_output_is_truncated_as_aws_does(sim, ssm):
    master = sim.add_master()
    command_id = send(
        ssm,
        master.instance_id,
        "head -c 30000 /dev/zero | tr '\\0' o",
        "head -c 10000 /dev/zero | tr '\\0' e >&2",
    )

    found = wait_until(ssm, command_id, master.instance_id, TERMINAL)

    assert found["StandardOutputContent"] == "o" * 24_000
    assert found["StandardErrorContent"] == "e" * 8_000
    listed = ssm.list_command_invocations(CommandId=command_id, Details=True)
    [plugin] = listed["CommandInvocations"][0]["CommandPlugins"]
    assert plugin["Output"] == "o" * 2_500


def test_execution_timeout_kills_the_command(sim, ssm):
    master = sim.add_master()
    started = time.monotonic()
    command_id = send(
        ssm,
        master.instance_id,
        "sleep 30 & echo $! > sleep.pid",
        "wait",
        parameters={"executionTimeout": ["1"]},
    )

    found = wait_until(ssm, command_id, master.instance_id, TERMINAL)

    assert time.monotonic() - started < 5
    assert (found["Status"], found["StatusDetails"]) == ("TimedOut", "ExecutionTimedOut")
    assert found["ResponseCode"] == 137
    assert gone_soon(int((master.path / "sleep.pid").read_text()))


def test_cancel_stops_a_running_command_and_its_children(sim, ssm):
    master = sim.add_master()
    command_id = send(ssm, master.instance_id, "sleep 60 & echo $! > sleep.pid", "wait")
    sleep_pid = int(wait_for_file(master.path / "sleep.pid"))

    ssm.cancel_command(CommandId=command_id)
    found = wait_until(ssm, command_id, master.instance_id, TERMINAL)

    assert (found["Status"], found["StatusDetails"]) == ("Cancelled", "Cancelled")
    assert found["ResponseCode"] == 137
    assert ssm.list_commands(CommandId=command_id)["Commands"][0]["Status"] == "Cancelled"
    assert gone_soon(sleep_pid)


def test_cancel_kills_a_command_that_ignores_sigterm_after_the_grace(sim, ssm):
    master = sim.add_master()
    command_id = send(ssm, master.instance_id, "trap '' TERM", "echo $$ > sh.pid", "sleep 60")
    shell_pid = int(wait_for_file(master.path / "sh.pid"))

    ssm.cancel_command(CommandId=command_id)
    during_grace = invocation(ssm, command_id, master.instance_id)
    found = wait_until(ssm, command_id, master.instance_id, TERMINAL, timeout=6)

    assert during_grace["Status"] == "Cancelling"
    assert found["Status"] == "Cancelled"
    assert gone_soon(shell_pid)


def test_cancel_of_an_undelivered_command_is_immediate(sim, ssm):
    master = sim.add_master(online=False)
    command_id = send(ssm, master.instance_id, "echo x > ran.txt", TimeoutSeconds=60)

    ssm.cancel_command(CommandId=command_id)
    found = invocation(ssm, command_id, master.instance_id)
    master.set_online(True)
    time.sleep(0.3)

    assert (found["Status"], found["ResponseCode"]) == ("Cancelled", -1)
    assert not (master.path / "ran.txt").exists()
    assert sim.commands_run == []


def test_cancel_of_an_unknown_command_is_an_error(sim, ssm):
    with pytest.raises(ClientError) as excinfo:
        ssm.cancel_command(CommandId="00000000-0000-0000-0000-000000000000")
    assert error_code(excinfo) == "InvalidCommandId"


def test_an_offline_master_never_gets_the_command(sim, ssm):
    master = sim.add_master(online=False)
    sim.delivery_timeout_scale = 0.02  # 30 s -> 0.6 s
    command_id = send(ssm, master.instance_id, "echo x > ran.txt", TimeoutSeconds=30)

    found = wait_until(ssm, command_id, master.instance_id, TERMINAL, timeout=5)

    assert (found["Status"], found["StatusDetails"], found["ResponseCode"]) == (
        "TimedOut",
        "DeliveryTimedOut",
        -1,
    )
    master.set_online(True)
    time.sleep(0.3)
    assert not (master.path / "ran.txt").exists()
    listed = ssm.list_commands(CommandId=command_id)["Commands"][0]
    assert (listed["Status"], listed["DeliveryTimedOutCount"]) == ("TimedOut", 1)


def test_a_master_back_online_before_the_deadline_runs_the_command(sim, ssm):
    master = sim.add_master(online=False)
    command_id = send(ssm, master.instance_id, "echo x > ran.txt", TimeoutSeconds=30)
    time.sleep(0.3)
    assert invocation(ssm, command_id, master.instance_id)["Status"] == "Pending"

    master.set_online(True)
    found = wait_until(ssm, command_id, master.instance_id, TERMINAL)

    assert found["Status"] == "Success"
    assert (master.path / "ran.txt").exists()


def test_only_the_requested_instances_get_invocations(sim, ssm):
    target = sim.add_master("k3s-master", tags={"Role": "k3s"})
    bystander = sim.add_master("bystander")
    command_id = send(ssm, target.instance_id, "echo x > ran.txt")
    wait_until(ssm, command_id, target.instance_id, TERMINAL)

    with pytest.raises(ClientError) as excinfo:
        invocation(ssm, command_id, bystander.instance_id)
    assert error_code(excinfo) == "InvocationDoesNotExist"
    assert ssm.list_commands(InstanceId=bystander.instance_id)["Commands"] == []
    assert not (bystander.path / "ran.txt").exists()
    assert [run["instance_id"] for run in sim.commands_run] == [target.instance_id]

    by_tag = ssm.send_command(
        Targets=[{"Key": "tag:Role", "Values": ["k3s"]}],
        DocumentName="AWS-RunShellScript",
        Parameters={"commands": ["echo tagged > tagged.txt"]},
    )["Command"]
    reached = ssm.list_command_invocations(CommandId=by_tag["CommandId"])["CommandInvocations"]
    assert [i["InstanceId"] for i in reached] == [target.instance_id]
    wait_until(ssm, by_tag["CommandId"], target.instance_id, TERMINAL)
    assert (target.path / "tagged.txt").exists()
    assert not (bystander.path / "tagged.txt").exists()


def test_an_instance_without_an_agent_is_refused(sim, ssm):
    sim.add_master()
    plain = sim.client("ec2").run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1)
    instance_id = plain["Instances"][0]["InstanceId"]

    with pytest.raises(ClientError) as excinfo:
        send(ssm, instance_id, "true")
    assert error_code(excinfo) == "InvalidInstanceId"


def test_describe_instance_information_reports_ping_status(sim, ssm):
    up = sim.add_master("up")
    down = sim.add_master("down", online=False)

    both = ssm.describe_instance_information()["InstanceInformationList"]
    by_filters = ssm.describe_instance_information(
        Filters=[{"Key": "InstanceIds", "Values": [down.instance_id]}], MaxResults=5
    )["InstanceInformationList"]
    by_list = ssm.describe_instance_information(
        InstanceInformationFilterList=[{"key": "InstanceIds", "valueSet": [up.instance_id]}]
    )["InstanceInformationList"]

    assert {(i["InstanceId"], i["PingStatus"]) for i in both} == {
        (up.instance_id, "Online"),
        (down.instance_id, "ConnectionLost"),
    }
    assert [(i["InstanceId"], i["PingStatus"]) for i in by_filters] == [(down.instance_id, "ConnectionLost")]
    assert [(i["InstanceId"], i["PlatformType"]) for i in by_list] == [(up.instance_id, "Linux")]


def test_invocation_delay_hides_a_new_invocation_for_a_while(ssm, sim):
    sim.invocation_delay = 0.5
    master = sim.add_master()
    command_id = send(ssm, master.instance_id, "true")

    with pytest.raises(ClientError) as excinfo:
        invocation(ssm, command_id, master.instance_id)
    assert error_code(excinfo) == "InvocationDoesNotExist"
    time.sleep(0.6)
    assert wait_until(ssm, command_id, master.instance_id, TERMINAL)["Status"] == "Success"


def test_the_real_aws_cli_on_the_master_downloads_from_s3(sim, ssm):
    master = sim.add_master()
    s3 = sim.client("s3")
    s3.create_bucket(Bucket="k3s-deploy-test", CreateBucketConfiguration={"LocationConstraint": sim.region})
    s3.put_object(Bucket="k3s-deploy-test", Key="bundles/b.tar.gz", Body=b"bundle bytes")
    command_id = send(
        ssm,
        master.instance_id,
        "set -e",
        'aws s3api get-object --bucket k3s-deploy-test --key bundles/b.tar.gz "$TMPDIR/b.tar.gz" > /dev/null',
        'cat "$TMPDIR/b.tar.gz"',
    )

    found = wait_until(ssm, command_id, master.instance_id, TERMINAL, timeout=20)

    assert found["Status"] == "Success", found["StandardErrorContent"]
    assert (master.tmp_dir / "b.tar.gz").read_bytes() == b"bundle bytes"
    assert found["StandardOutputContent"] == "bundle bytes"


def test_the_simulation_can_be_opened_again_and_undoes_its_patches():
    with SimulatedAWS() as first:
        first.add_master()
        first_ssm = first.client("ssm")
        send(first_ssm, next(iter(first.masters)), "true")
    assert "cancel_command" not in SimpleSystemManagerResponse.__dict__

    with SimulatedAWS(region="us-east-1") as second:
        ssm = second.client("ssm")
        assert ssm.list_commands()["Commands"] == []
        assert second.client("ec2").describe_instances()["Reservations"] == []
        assert ssm.describe_instance_information()["InstanceInformationList"] == []


def test_only_one_simulation_at_a_time(sim):
    with pytest.raises(SimulationError), SimulatedAWS():
        pass
    # The refused one must not have undone the open one's patches.
    assert "cancel_command" in SimpleSystemManagerResponse.__dict__


def test_a_master_is_a_running_tagged_instance(sim):
    launched = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    master = sim.add_master("k3s-master", tags={"Env": "prod"}, launch_time=launched)

    [reservation] = sim.client("ec2").describe_instances()["Reservations"]
    [instance] = reservation["Instances"]
    assert instance["InstanceId"] == master.instance_id
    assert instance["State"]["Name"] == "running"
    assert instance["LaunchTime"] == launched
    assert {t["Key"]: t["Value"] for t in instance["Tags"]} == {
        "Name": "k3s-master",
        "Env": "prod",
    }
    wrapper = (master.bin_dir / "kubectl").read_text()
    assert wrapper.startswith("#!/bin/sh\nexec ")
    assert wrapper.rstrip().endswith('kubectl_double.py "$@"')


def test_env_points_at_the_simulation_and_drops_other_aws_settings(sim):
    env = sim.env({"AWS_PROFILE": "prod", "AWS_SESSION_TOKEN": "x", "PATH": "/bin"})

    assert env["AWS_ENDPOINT_URL"] == sim.endpoint_url
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert env["AWS_ACCESS_KEY_ID"] == "testing"
    assert "AWS_PROFILE" not in env and "AWS_SESSION_TOKEN" not in env
    assert env["PATH"] == "/bin"


def test_a_missing_aws_cli_says_to_run_make_setup(sim, monkeypatch, tmp_path):
    monkeypatch.setenv("K3S_SIM_AWS_CLI", str(tmp_path / "no-aws"))

    with pytest.raises(SimulationError, match="make setup"):
        sim.add_master()
