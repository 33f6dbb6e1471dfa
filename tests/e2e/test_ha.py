"""HA K3s, end to end: servers of one cluster (same `k3s-cluster` tag) share one cluster state; a
deploy goes through exactly one of them, and fails over to the next only when the first never
took the command."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from devkit.simulate.aws import Master, SimulatedAWS
from devkit.simulate.cluster import Cluster
from tests.e2e.conftest import API, NS, World, platform_manifests
from tests.ssm_program import entry_point

pytestmark = pytest.mark.e2e

T0 = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimulatedAWS]:
    with SimulatedAWS(root=tmp_path / "aws") as simulated:
        yield simulated


def world_of(sim: SimulatedAWS, tmp_path: Path, first: Master) -> World:
    workspace = tmp_path / "workspace"
    workspace.mkdir(exist_ok=True)
    world = World(sim, first, workspace, tmp_path / "file_commands")
    world.write_manifests(platform_manifests())
    return world


def ha_cluster(sim: SimulatedAWS, cluster: str, count: int, **extra_tags: str) -> list[Master]:
    """`count` servers of one cluster, oldest first, all serving the first one's cluster state."""
    servers = [
        sim.add_master(
            f"{cluster}-k3s-master-{n}",
            tags={"k3s-cluster": cluster, **extra_tags},
            launch_time=T0 + timedelta(days=n),
        )
        for n in range(count)
    ]
    for server in servers[1:]:
        server.env["KUBECTL_DOUBLE_STATE"] = str(servers[0].cluster_state_path)
    return servers


def deploys_on(sim: SimulatedAWS, servers: list[Master]) -> list[str]:
    """The servers among `servers` on which a deploy command started."""
    ids = {s.instance_id for s in servers}
    return [
        run["instance_id"]
        for run in sim.commands_run
        if run["instance_id"] in ids and entry_point(run["script"]) == "deploy"
    ]


def api_image(server: Master) -> str | None:
    return Cluster(server.env["KUBECTL_DOUBLE_STATE"]).image_of("deployment", NS, "api")


def test_deploy_goes_through_one_online_server_and_fails_over_when_it_never_takes_the_command(
    sim: SimulatedAWS, tmp_path: Path
) -> None:
    sim.delivery_timeout_scale = 0.05  # SSM's 120 s delivery timeout -> 6 s
    lost, wedged, healthy = ha_cluster(sim, "prod", 3)
    lost.set_online(False)  # the oldest: not Online, never chosen
    wedged.accepts_commands = False  # Online, but its agent never picks a command up
    world = world_of(sim, tmp_path, healthy)

    run = world.deploy(**{"image-tag": "v1"})

    assert run.returncode == 0, run.log
    assert run.outputs["status"] == "success"
    assert run.outputs["instance-id"] == healthy.instance_id
    assert f"standing by, in failover order: {healthy.instance_id}" in run.log
    assert f"Server {wedged.instance_id} of cluster prod did not take command" in run.log
    assert f"failing over to {healthy.instance_id}" in run.log
    # the deploy ran once, through the healthy server: never through two servers of the cluster
    assert deploys_on(sim, [lost, wedged, healthy]) == [healthy.instance_id]
    sent_to = [s["instance_ids"] for s in sim.sent_commands()]
    assert sent_to == [[wedged.instance_id], [healthy.instance_id]]
    assert api_image(healthy) == f"{API}:v1"
    assert world.buckets() == []


def test_a_server_that_goes_offline_before_taking_the_command_is_passed_over_quickly(
    sim: SimulatedAWS, tmp_path: Path
) -> None:
    first, second = ha_cluster(sim, "prod", 2)
    first.accepts_commands = False
    world = world_of(sim, tmp_path, first)

    def lose_first_once_sent() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not sim.sent_commands():
            time.sleep(0.05)
        first.set_online(False)

    losing = threading.Thread(target=lose_first_once_sent)
    losing.start()
    started = time.monotonic()
    run = world.deploy(**{"image-tag": "v1"})
    losing.join()

    assert run.outputs["status"] == "success", run.log
    assert run.outputs["instance-id"] == second.instance_id
    assert f"Server {first.instance_id} is no longer Online in SSM" in run.log
    # SSM's delivery timeout (120 s here) was not waited out
    assert time.monotonic() - started < 90
    cancelled = sim.invocation(sim.sent_commands()[0]["command_id"], first.instance_id)
    assert (cancelled["Status"], cancelled["ResponseCode"]) == ("Cancelled", -1)
    assert deploys_on(sim, [first, second]) == [second.instance_id]


def test_a_command_that_started_is_never_passed_to_another_server(sim: SimulatedAWS, tmp_path: Path) -> None:
    first, _ = ha_cluster(sim, "prod", 2)
    first.replace_commands_with = "exit 4"  # it ran, and failed: no failover, no second apply
    world = world_of(sim, tmp_path, first)

    run = world.deploy(**{"image-tag": "v1"})

    assert run.returncode == 1
    assert run.outputs["instance-id"] == first.instance_id
    assert [s["instance_ids"] for s in sim.sent_commands()] == [[first.instance_id]]
    assert "failing over" not in run.log


def test_fleet_deploys_once_per_cluster_and_fails_over_inside_a_cluster(
    sim: SimulatedAWS, tmp_path: Path
) -> None:
    sim.delivery_timeout_scale = 0.05
    prod = ha_cluster(sim, "prod", 3)
    staging = ha_cluster(sim, "staging", 2)
    lone = sim.add_master("lone-k3s-master")
    prod[0].accepts_commands = False  # prod's first choice never takes it: prod[1] must
    world = world_of(sim, tmp_path, lone)

    run = world.deploy(fleet="true", **{"image-tag": "v1"})

    assert run.returncode == 0, run.log
    assert run.outputs["status"] == "success"
    results = {r["instance-id"]: r for r in json.loads(run.outputs["results"])}
    assert results[prod[0].instance_id]["status"] == "failed-over"
    assert f"deployed through {prod[1].instance_id}" in results[prod[0].instance_id]["message"]
    for server in (prod[1], staging[0], lone):
        assert results[server.instance_id]["status"] == "success"
        assert results[server.instance_id]["cluster"] in ("prod", "staging", "")
    assert prod[2].instance_id not in results and staging[1].instance_id not in results
    # one server per cluster, each cluster once
    assert deploys_on(sim, prod) == [prod[1].instance_id]
    assert deploys_on(sim, staging) == [staging[0].instance_id]
    assert deploys_on(sim, [lone]) == [lone.instance_id]
    # HA clusters in the fleet: SSM gets instance ids (Targets by tag would reach every server)
    first_round, failover = sim.sent_commands()
    assert first_round["targets"] == [] and failover["targets"] == []
    assert sorted(first_round["instance_ids"]) == sorted(
        [prod[0].instance_id, staging[0].instance_id, lone.instance_id]
    )
    assert failover["instance_ids"] == [prod[1].instance_id]
    assert len(run.outputs["command-id"].split(",")) == 2
    assert api_image(prod[0]) == api_image(staging[0]) == api_image(lone) == f"{API}:v1"
    assert world.buckets() == []
