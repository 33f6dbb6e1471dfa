"""Fleet mode, end to end: one run deploys to several simulated K3s masters, SSM (the stand-in)
fans the command out, and each master's cluster is checked afterwards."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.simulate.aws import Master, SimulatedAWS
from devkit.simulate.cluster import Cluster
from tests import markdown
from tests.e2e.conftest import API, NS, World, platform_manifests
from tests.ssm_program import entry_point

pytestmark = pytest.mark.e2e


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[World]:
    """Three masters of their own (Name=k3s-master-a/b/c)."""
    with SimulatedAWS(root=tmp_path / "aws") as sim:
        masters = [sim.add_master(f"k3s-master-{n}") for n in "abc"]
        workspace = tmp_path / "workspace"
        workspace.mkdir()
        world = World(sim, masters[0], workspace, tmp_path / "file_commands")
        world.write_manifests(platform_manifests())
        yield world


def masters(world: World) -> list[Master]:
    return list(world.sim.masters.values())


def api_image(master: Master) -> str | None:
    return Cluster(master.cluster_state_path).image_of("deployment", NS, "api")


def results(run) -> dict[str, dict]:
    return {entry["instance-id"]: entry for entry in json.loads(run.outputs["results"])}


def deploy_script_runs(world: World) -> list[str]:
    """The instances on which a deploy command (not a rollback) ran."""
    return [run["instance_id"] for run in world.sim.commands_run if entry_point(run["script"]) == "deploy"]


def test_fleet_deploys_every_matching_master_by_instance_ids_never_by_tag(fleet: World) -> None:
    """An exact tag value, which SSM's Targets could match: the command still goes to the
    instance ids the action found (#15: SSM resolves Targets when it runs the command, so an
    instance tagged in between would get the script and its presigned URLs)."""
    everyone = masters(fleet)
    for master in everyone:
        fleet.sim.client("ec2").create_tags(
            Resources=[master.instance_id], Tags=[{"Key": "Role", "Value": "k3s"}]
        )

    run = fleet.deploy(
        fleet="true", **{"image-tag": "v1", "instance-tag-key": "Role", "instance-tag": "k3s"}
    )

    assert run.returncode == 0, run.log
    assert run.outputs["status"] == "success"
    assert set(run.outputs["instance-id"].split(",")) == {m.instance_id for m in everyone}
    (command_id,) = run.outputs["command-id"].split(",")
    (sent,) = fleet.sim.sent_commands()
    assert sent["targets"] == []
    assert sorted(sent["instance_ids"]) == sorted(m.instance_id for m in everyone)
    assert (sent["max_concurrency"], sent["max_errors"]) == ("50", "0")
    assert sent["command_id"] == command_id
    found = results(run)
    assert set(found) == {m.instance_id for m in everyone}
    assert all(entry["status"] == "success" and entry["command-id"] == command_id for entry in found.values())
    assert all(api_image(m) == f"{API}:v1" for m in everyone)
    assert "### Instances" in run.summary
    assert all(m.instance_id in run.summary for m in everyone)
    assert fleet.buckets() == []
    # one bundle for the whole fleet
    uploads = [line for line in run.log.splitlines() if line.startswith("Staging in ")]
    assert len(uploads) == 1


def test_a_failed_instance_rolls_back_on_its_own_and_the_others_stay_deployed(fleet: World) -> None:
    first = fleet.deploy(fleet="true", **{"image-tag": "v1", "instance-tag": "k3s-master-*"})
    assert first.outputs["status"] == "success", first.log
    a, b, c = masters(fleet)
    Cluster(b.cluster_state_path).break_image(f"{API}:v2", "CrashLoopBackOff")

    run = fleet.deploy(fleet="true", **{"image-tag": "v2", "instance-tag": "k3s-master-*"})

    assert run.returncode == 1
    assert run.outputs["status"] == "rolled-back"
    assert run.outputs["rolled-back"] == "true"
    found = results(run)
    assert found[b.instance_id]["status"] == "rolled-back"
    assert found[b.instance_id]["rolled-back"] is True
    assert found[b.instance_id]["exit-code"] == 7
    assert {found[m.instance_id]["status"] for m in (a, c)} == {"success"}
    assert api_image(b) == f"{API}:v1"
    assert api_image(a) == api_image(c) == f"{API}:v2"
    # a wildcard pattern: instance ids, one command for the three
    (sent,) = [s for s in fleet.sim.sent_commands() if s["comment"].startswith("k3s-deploy ")][-1:]
    assert sorted(sent["instance_ids"]) == sorted(m.instance_id for m in (a, b, c))
    assert sent["targets"] == []
    assert f"Output of the deploy on {b.instance_id}" in run.log
    assert fleet.buckets() == []


def test_listed_instance_ids_with_max_concurrency_one_deploy_one_at_a_time(fleet: World) -> None:
    a, b, c = masters(fleet)

    run = fleet.deploy(
        fleet="true",
        **{
            "image-tag": "v1",
            "instance-id": f"{a.instance_id}, {b.instance_id}\n{c.instance_id}",
            "max-concurrency": "1",
        },
    )

    assert run.outputs["status"] == "success", run.log
    runs = fleet.sim.commands_run
    spans = sorted((r["started"], r["ended"]) for r in runs)
    assert len(spans) == 3
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    assert fleet.sim.sent_commands()[0]["max_concurrency"] == "1"


def test_max_errors_zero_stops_the_fleet_at_the_first_failure(fleet: World) -> None:
    a, b, c = masters(fleet)
    a.replace_commands_with = "exit 9"  # the first instance fails (nothing rolled back)

    run = fleet.deploy(
        fleet="true",
        **{
            "image-tag": "v1",
            "instance-id": f"{a.instance_id},{b.instance_id},{c.instance_id}",
            "max-concurrency": "1",
            "max-errors": "0",
        },
    )

    assert run.returncode == 1
    assert run.outputs["status"] == "failed"
    found = results(run)
    assert found[a.instance_id]["exit-code"] == 9
    for skipped in (b, c):
        assert found[skipped.instance_id]["status"] == "failed"
        assert "never took the command" in found[skipped.instance_id]["message"]
        assert api_image(skipped) is None  # nothing ran there
    assert [r["instance_id"] for r in fleet.sim.commands_run] == [a.instance_id]  # b, c never ran


def test_an_instance_stopped_mid_deploy_is_rolled_back_by_the_action(fleet: World) -> None:
    fleet.write_manifests(platform_manifests(progress_deadline=600))
    assert fleet.deploy(fleet="true", **{"image-tag": "v1"}).outputs["status"] == "success"
    a, b, c = masters(fleet)
    Cluster(b.cluster_state_path).break_image(f"{API}:v2", "ContainerCreating")
    ssm = fleet.sim.client("ssm")

    def cancel_b_once_v2_is_applied() -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if api_image(b) == f"{API}:v2":
                time.sleep(0.5)
                command_id = fleet.sim.sent_commands()[-1]["command_id"]
                ssm.cancel_command(CommandId=command_id, InstanceIds=[b.instance_id])
                return
            time.sleep(0.1)

    canceller = threading.Thread(target=cancel_b_once_v2_is_applied)
    canceller.start()
    run = fleet.deploy(fleet="true", **{"image-tag": "v2", "timeout": "120"})
    canceller.join()

    assert run.returncode == 1, run.log
    assert run.outputs["status"] == "rolled-back", run.log
    found = results(run)
    assert found[b.instance_id]["status"] == "rolled-back"
    assert "rolled back by the action" in found[b.instance_id]["message"]
    assert api_image(b) == f"{API}:v1"
    assert api_image(a) == api_image(c) == f"{API}:v2"
    rollbacks = [s for s in fleet.sim.sent_commands() if s["comment"].startswith("k3s-deploy rollback")]
    assert [s["instance_ids"] for s in rollbacks] == [[b.instance_id]]
    assert fleet.buckets() == []


def test_several_ids_without_fleet_are_refused(fleet: World) -> None:
    a, b, _ = masters(fleet)
    run = fleet.deploy(**{"image-tag": "v1", "instance-id": f"{a.instance_id},{b.instance_id}"})

    assert run.returncode == 1
    assert "input 'instance-id' takes one instance id unless 'fleet' is true" in run.log
    assert fleet.sim.sent_commands() == []


def test_without_fleet_several_matches_still_mean_one_target(fleet: World) -> None:
    run = fleet.deploy(**{"image-tag": "v1", "instance-tag": "k3s-master-*"})

    assert run.outputs["status"] == "success", run.log
    assert "," not in run.outputs["instance-id"]
    assert len(deploy_script_runs(fleet)) == 1
    assert len(json.loads(run.outputs["results"])) == 1


def test_presigned_delivery_serves_the_whole_fleet(fleet: World) -> None:
    run = fleet.deploy(
        fleet="true", delivery="presigned", **{"image-tag": "v1", "instance-tag": "k3s-master-*"}
    )

    assert run.returncode == 0, run.log
    assert all(entry["status"] == "success" for entry in results(run).values())
    assert all(api_image(m) == f"{API}:v1" for m in masters(fleet))
    (sent,) = fleet.sim.sent_commands()
    assert "curl" in "\n".join(sent["parameters"]["commands"])
    masked = [line for line in run.log.splitlines() if line.startswith("::add-mask::")]
    assert all("X-Amz-Signature" in line for line in masked)
    # The two staged files' GET URLs, and a PUT URL of live progress for each instance.
    assert len([line for line in masked if "/progress/" not in line]) == 2
    assert len([line for line in masked if "/progress/" in line]) == 3


def test_a_dry_run_checks_every_cluster_and_changes_none(fleet: World) -> None:
    run = fleet.deploy(fleet="true", **{"dry-run": "true", "image-tag": "v1", "instance-tag": "k3s-master-*"})

    assert run.returncode == 0, run.log
    assert run.outputs["status"] == "success"
    found = results(run)
    assert len(found) == 3
    assert all(entry["message"] == "dry run passed; nothing changed" for entry in found.values())
    assert all(api_image(m) is None for m in masters(fleet))
    assert "Dry run on all 3 instance(s)" in markdown.shown(run.summary)
