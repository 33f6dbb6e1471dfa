"""Finding the K3s master: by instance id or by tag, and checking that SSM sees it Online.

EC2 is moto's in-process mock (`mock_aws`). moto does not implement DescribeInstanceInformation
(it raises NotImplementedError), so the SSM client is stubbed with botocore's Stubber for that
call, answering per instance id from a table the test sets.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
from botocore.stub import ANY, Stubber
from moto import mock_aws

from deploykit.errors import TargetNotFound, TargetNotReady
from deploykit.inputs import Settings, parse_settings
from deploykit.target import find_master

REGION = "eu-west-1"
T0 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def aws(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_EC2", "AWS_ENDPOINT_URL_SSM", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        yield


@pytest.fixture
def ec2():
    return boto3.client("ec2", region_name=REGION)


def settings_for(tmp_path: Path, **raw: str) -> Settings:
    (tmp_path / "k8s" / "base").mkdir(parents=True, exist_ok=True)
    return parse_settings(raw, {"GITHUB_WORKSPACE": str(tmp_path), "AWS_REGION": REGION})


def launch(
    ec2, monkeypatch, name: str | None, launched: datetime = T0, state: str = "running", **tags: str
) -> str:
    import moto.ec2.models.instances as instances

    monkeypatch.setattr(instances, "utcnow", lambda: launched.replace(tzinfo=None))
    all_tags = {**({"Name": name} if name else {}), **tags}
    spec = [{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in all_tags.items()]}]
    instance_id = ec2.run_instances(
        ImageId="ami-12345678", MinCount=1, MaxCount=1, TagSpecifications=spec if all_tags else []
    )["Instances"][0]["InstanceId"]
    if state == "stopped":
        ec2.stop_instances(InstanceIds=[instance_id])
    return instance_id


class SsmInformation:
    """DescribeInstanceInformation answers: PingStatus per instance id; unknown ids are left out."""

    def __init__(self, statuses: dict[str, str]) -> None:
        self.statuses = statuses
        self.ssm = boto3.client("ssm", region_name=REGION)
        self.stub = Stubber(self.ssm)
        self.stub.activate()
        self.ssm.meta.events.register("provide-client-params.ssm.DescribeInstanceInformation", self._answer)

    def _answer(self, params: dict, **_: object) -> None:
        (instance_filter,) = params["Filters"]
        assert instance_filter["Key"] == "InstanceIds"
        found = [
            {"InstanceId": i, "PingStatus": self.statuses[i]}
            for i in instance_filter["Values"]
            if i in self.statuses
        ]
        self.stub.add_response(
            "describe_instance_information", {"InstanceInformationList": found}, {"Filters": ANY}
        )


def find(ec2, ssm: SsmInformation, settings: Settings):
    logs: list[str] = []
    master = find_master(ec2, ssm.ssm, settings, logs.append)
    return master, logs


# by instance id


def test_an_explicit_instance_id_skips_discovery(tmp_path, ec2):
    settings = settings_for(tmp_path, **{"instance-id": "i-0123456789abcdef0"})
    master, logs = find(ec2, SsmInformation({"i-0123456789abcdef0": "Online"}), settings)
    assert master.instance_id == "i-0123456789abcdef0"
    assert master.ping_status == "Online"
    assert "given by input 'instance-id'" in logs[0]


def test_an_explicit_instance_that_ssm_does_not_know_is_not_ready(tmp_path, ec2):
    settings = settings_for(tmp_path, **{"instance-id": "i-0123456789abcdef0"})
    with pytest.raises(TargetNotReady) as caught:
        find(ec2, SsmInformation({}), settings)
    assert "i-0123456789abcdef0 is not Online in SSM (SSM does not know it)" in caught.value.message
    assert "amazon-ssm-agent" in (caught.value.fix or "")


def test_an_explicit_instance_with_connection_lost_is_not_ready(tmp_path, ec2):
    settings = settings_for(tmp_path, **{"instance-id": "i-0123456789abcdef0"})
    with pytest.raises(TargetNotReady, match="SSM reports it ConnectionLost"):
        find(ec2, SsmInformation({"i-0123456789abcdef0": "ConnectionLost"}), settings)


# discovery by tag


def test_the_one_running_instance_with_the_tag_is_found(tmp_path, ec2, monkeypatch):
    master_id = launch(ec2, monkeypatch, "prod-k3s-master")
    launch(ec2, monkeypatch, "web-server")
    master, logs = find(ec2, SsmInformation({master_id: "Online"}), settings_for(tmp_path))
    assert (master.instance_id, master.name, master.ping_status) == (master_id, "prod-k3s-master", "Online")
    assert "tag Name=*k3s-master*" in logs[0]


def test_stopped_instances_are_not_candidates(tmp_path, ec2, monkeypatch):
    launch(ec2, monkeypatch, "old-k3s-master", T0 - timedelta(days=30), state="stopped")
    running = launch(ec2, monkeypatch, "new-k3s-master", T0)
    master, _ = find(ec2, SsmInformation({running: "Online"}), settings_for(tmp_path))
    assert master.instance_id == running


def test_a_custom_tag_key_and_pattern_are_used(tmp_path, ec2, monkeypatch):
    launch(ec2, monkeypatch, "k3s-master")  # right Name, wrong Role
    wanted = launch(ec2, monkeypatch, "box", Role="k3s-server")
    settings = settings_for(tmp_path, **{"instance-tag-key": "Role", "instance-tag": "k3s-*"})
    master, _ = find(ec2, SsmInformation({wanted: "Online"}), settings)
    assert master.instance_id == wanted


def test_several_matches_choose_the_online_one_and_say_why(tmp_path, ec2, monkeypatch):
    oldest = launch(ec2, monkeypatch, "a-k3s-master", T0 - timedelta(days=3))
    online = launch(ec2, monkeypatch, "b-k3s-master", T0)
    unknown = launch(ec2, monkeypatch, "c-k3s-master", T0 - timedelta(days=5))
    ssm = SsmInformation({oldest: "ConnectionLost", online: "Online"})
    master, logs = find(ec2, ssm, settings_for(tmp_path))
    assert master.instance_id == online
    assert "of 3 running instances" in logs[0] and "SSM Online" in logs[0]
    assert oldest in logs[0] and unknown in logs[0]


def test_several_online_matches_choose_the_oldest_launch(tmp_path, ec2, monkeypatch):
    ids = [
        launch(ec2, monkeypatch, f"k3s-master-{n}", T0 + timedelta(hours=offset))
        for n, offset in enumerate([5, -2, 3])
    ]
    ssm = SsmInformation(dict.fromkeys(ids, "Online"))
    master, _ = find(ec2, ssm, settings_for(tmp_path))
    assert master.instance_id == ids[1]
    assert master.launch_time == T0 - timedelta(hours=2)


def test_the_choice_is_the_same_every_time(tmp_path, ec2, monkeypatch):
    ids = [launch(ec2, monkeypatch, f"k3s-master-{n}", T0) for n in range(4)]
    statuses = dict.fromkeys(ids, "Online")
    chosen = {find(ec2, SsmInformation(statuses), settings_for(tmp_path))[0].instance_id for _ in range(3)}
    assert chosen == {min(ids)}  # same launch time: the lowest instance id breaks the tie


def test_no_match_is_an_error_naming_the_filter_and_region(tmp_path, ec2, monkeypatch):
    launch(ec2, monkeypatch, "web-server")
    settings = settings_for(tmp_path, **{"instance-tag": "prod-k3s-*"})
    with pytest.raises(TargetNotFound) as caught:
        find(ec2, SsmInformation({}), settings)
    assert caught.value.message == "no running instance has tag Name=prod-k3s-* in eu-west-1"
    assert "'instance-id'" in (caught.value.fix or "")


def test_a_chosen_instance_that_is_not_online_is_not_ready(tmp_path, ec2, monkeypatch):
    first = launch(ec2, monkeypatch, "k3s-master", T0 - timedelta(days=1))
    launch(ec2, monkeypatch, "k3s-master", T0)
    ssm = SsmInformation({first: "ConnectionLost"})
    with pytest.raises(TargetNotReady) as caught:
        find(ec2, ssm, settings_for(tmp_path))
    assert caught.value.message == f"instance {first} is not Online in SSM (SSM reports it ConnectionLost)"
