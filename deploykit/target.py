"""Find the K3s master: by instance id, or by tag among running instances, and check SSM sees it.

Servers of one HA cluster (same value of tag `cluster-tag-key`) are one target: the chosen
server's Online peers stand by in `Master.standby` (see ha.py).
"""

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
    cluster: str = ""  # value of tag cluster-tag-key; "" for a server of its own
    standby: tuple[Master, ...] = ()  # Online servers of the same cluster, in failover order

    @property
    def failover_order(self) -> tuple[Master, ...]:
        """This server, then its standbys: the order a deploy is sent in (ha.py)."""
        return (self, *self.standby)


def tag_value(instance: dict[str, Any], key: str) -> str:
    return next((t["Value"] for t in instance.get("Tags", []) if t["Key"] == key), "")


def rank(instance: dict[str, Any], statuses: dict[str, str]) -> tuple[bool, datetime, str]:
    """The core issue's order: SSM Online first, then the oldest launch, then the lowest id."""
    online = statuses.get(instance["InstanceId"]) == ONLINE
    launched = instance.get("LaunchTime") or datetime.max.replace(tzinfo=UTC)
    return (not online, launched, instance["InstanceId"])


def group_by_cluster(
    instances: list[dict[str, Any]], statuses: dict[str, str], cluster_tag_key: str
) -> list[list[dict[str, Any]]]:
    """The instances by cluster, each cluster's servers ranked, clusters in the order of their
    best server. Instances without the cluster tag are clusters of one."""
    clusters: dict[str, list[dict[str, Any]]] = {}
    for instance in instances:
        name = tag_value(instance, cluster_tag_key)
        clusters.setdefault(name or f"\0{instance['InstanceId']}", []).append(instance)
    groups = [sorted(servers, key=lambda i: rank(i, statuses)) for servers in clusters.values()]
    return sorted(groups, key=lambda servers: rank(servers[0], statuses))


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
    clusters = group_by_cluster(instances, statuses, settings.cluster_tag_key)
    servers = clusters[0]
    chosen = servers[0]
    master = Master(
        chosen["InstanceId"],
        tag_value(chosen, "Name"),
        chosen.get("LaunchTime"),
        statuses.get(chosen["InstanceId"], ""),
        cluster=tag_value(chosen, settings.cluster_tag_key),
        standby=tuple(
            server_of(s, statuses, settings.cluster_tag_key)
            for s in servers[1:]
            if statuses.get(s["InstanceId"]) == ONLINE
        ),
    )
    instances = [server for cluster in clusters for server in cluster]
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
    if master.standby:
        log(
            f"Servers of cluster {master.cluster} ({settings.cluster_tag_key} tag) standing by, in "
            f"failover order: {', '.join(s.instance_id for s in master.standby)}"
        )
    return master


def server_of(instance: dict[str, Any], statuses: dict[str, str], cluster_tag_key: str) -> Master:
    return Master(
        instance["InstanceId"],
        tag_value(instance, "Name"),
        instance.get("LaunchTime"),
        statuses.get(instance["InstanceId"], ""),
        cluster=tag_value(instance, cluster_tag_key),
    )
