"""Find the K3s master: by instance id, or by tag among running instances, and check SSM sees it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from deploykit.awsapi import aws_call
from deploykit.errors import FIX_SSM_AGENT, TargetNotFound, TargetNotReady
from deploykit.inputs import Settings

ONLINE = "Online"


@dataclass(frozen=True)
class Master:
    instance_id: str
    name: str
    launch_time: datetime | None
    ping_status: str


def ssm_ping_status(ssm: Any, instance_ids: list[str]) -> dict[str, str]:
    """PingStatus by instance id; instances SSM does not know are left out."""
    statuses: dict[str, str] = {}
    with aws_call("read the SSM status of the instances", "ssm:DescribeInstanceInformation"):
        for start in range(0, len(instance_ids), 50):
            chunk = instance_ids[start : start + 50]
            paginator = ssm.get_paginator("describe_instance_information")
            for page in paginator.paginate(Filters=[{"Key": "InstanceIds", "Values": chunk}]):
                for info in page.get("InstanceInformationList", []):
                    statuses[info["InstanceId"]] = info.get("PingStatus", "")
    return statuses


def _tag(instance: dict[str, Any], key: str) -> str:
    return next((t["Value"] for t in instance.get("Tags", []) if t["Key"] == key), "")


def find_master(ec2: Any, ssm: Any, settings: Settings, log: Callable[[str], None]) -> Master:
    if settings.instance_id:
        status = ssm_ping_status(ssm, [settings.instance_id]).get(settings.instance_id, "")
        master = Master(settings.instance_id, "", None, status)
        log(f"Target: {master.instance_id} (given by input 'instance-id')")
    else:
        master = _discover(ec2, ssm, settings, log)
    if master.ping_status != ONLINE:
        seen = f"SSM reports it {master.ping_status}" if master.ping_status else "SSM does not know it"
        raise TargetNotReady(
            f"instance {master.instance_id} is not Online in SSM ({seen})", fix=FIX_SSM_AGENT
        )
    return master


def _discover(ec2: Any, ssm: Any, settings: Settings, log: Callable[[str], None]) -> Master:
    key, pattern = settings.instance_tag_key, settings.instance_tag
    filters = [
        {"Name": f"tag:{key}", "Values": [pattern]},
        {"Name": "instance-state-name", "Values": ["running"]},
    ]
    instances: list[dict[str, Any]] = []
    with aws_call("find the K3s master (ec2:DescribeInstances)", "ec2:DescribeInstances"):
        for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
            for reservation in page.get("Reservations", []):
                instances.extend(reservation.get("Instances", []))
    if not instances:
        raise TargetNotFound(
            f"no running instance has tag {key}={pattern} in {settings.aws_region}",
            fix="Check the 'instance-tag' / 'instance-tag-key' inputs and the region, or give 'instance-id'.",
        )
    statuses = ssm_ping_status(ssm, [i["InstanceId"] for i in instances])

    def rank(instance: dict[str, Any]) -> tuple[bool, datetime, str]:
        online = statuses.get(instance["InstanceId"]) == ONLINE
        launched = instance.get("LaunchTime") or datetime.max.replace(tzinfo=UTC)
        return (not online, launched, instance["InstanceId"])

    instances.sort(key=rank)
    chosen = instances[0]
    master = Master(
        chosen["InstanceId"],
        _tag(chosen, "Name"),
        chosen.get("LaunchTime"),
        statuses.get(chosen["InstanceId"], ""),
    )
    if len(instances) == 1:
        log(f"Target: {master.instance_id} ({master.name or 'no Name tag'}), tag {key}={pattern}")
    else:
        others = ", ".join(i["InstanceId"] for i in instances[1:])
        log(
            f"Target: {master.instance_id} ({master.name or 'no Name tag'}) of {len(instances)} "
            f"running instances with tag {key}={pattern}: chosen because it is "
            f"{'SSM Online' if master.ping_status == ONLINE else 'first'} and launched earliest "
            f"(others: {others}). Give 'instance-id' to choose another."
        )
    return master
