"""The deploy through the custom SSM Command document (input `ssm-document`), end to end: the
document is created in moto from examples/iam/k3s-deploy-document.json, the SSM agent stand-in
checks every parameter against its allowedPattern or allowedValues as SSM does, fills the
document's program in and runs it with the real AWS CLI and the real deploy script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.e2e.conftest import API, NS, WORKER, World, platform_manifests

pytestmark = pytest.mark.e2e

DOCUMENT = Path(__file__).resolve().parents[2] / "examples" / "iam" / "k3s-deploy-document.json"
NAME = "k3s-deploy"


def create_document(world: World, content: dict | None = None) -> None:
    world.sim.client("ssm").create_document(
        Content=json.dumps(content or json.loads(DOCUMENT.read_text())),
        Name=NAME,
        DocumentType="Command",
        DocumentFormat="JSON",
    )


def sent_documents(world: World) -> list[str]:
    return [sent["document_name"] for sent in world.sim.sent_commands()]


@pytest.mark.parametrize("delivery", ["s3", "presigned"])
def test_a_deploy_through_the_custom_document_makes_every_workload_ready(world: World, delivery: str) -> None:
    create_document(world)

    run = world.deploy(**{"image-tag": "v1", "ssm-document": NAME, "delivery": delivery})

    assert run.returncode == 0, run.log
    assert run.outputs["status"] == "success"
    assert world.cluster.image_of("deployment", NS, "api") == f"{API}:v1"
    assert world.cluster.image_of("deployment", NS, "worker") == f"{WORKER}:v1"
    sent = world.sim.sent_commands()
    assert [s["document_name"] for s in sent] == [NAME]
    parameters = sent[0]["parameters"]
    # Only the staged objects' location and sums, the entry point and the limits: no program.
    assert "commands" not in parameters
    assert parameters["entryPoint"] == ["deploy"] and parameters["delivery"] == [delivery]
    assert set(parameters) <= set(json.loads(DOCUMENT.read_text())["parameters"])
    assert world.buckets() == []
    assert list(world.master.state_dir.iterdir()) == []
    assert list(world.master.tmp_dir.iterdir()) == []


def test_the_rollback_command_goes_through_the_custom_document_too(world: World) -> None:
    """SSM stops the deploy mid-rollout; the action's rollback command (the script's rollback
    entry point, with the options the deploy kept) runs through the same document."""
    create_document(world)
    world.write_manifests(platform_manifests(progress_deadline=600))
    assert world.deploy(**{"image-tag": "v1", "ssm-document": NAME}).outputs["status"] == "success"
    world.cluster.break_image(f"{API}:v2", "ContainerCreating")
    with world.cancelling_once_applied(f"{API}:v2"):
        run = world.deploy(**{"image-tag": "v2", "timeout": "120", "ssm-document": NAME})

    assert run.returncode == 1
    assert run.outputs["status"] == "rolled-back", run.log
    assert world.cluster.image_of("deployment", NS, "api") == f"{API}:v1"
    assert sent_documents(world) == [NAME, NAME, NAME]
    assert world.sim.sent_commands()[-1]["parameters"]["entryPoint"] == ["rollback"]
    assert list(world.master.state_dir.iterdir()) == []
    assert world.buckets() == []


def test_a_document_of_another_version_stops_the_deploy_before_anything_is_staged(world: World) -> None:
    stale = json.loads(DOCUMENT.read_text())
    stale["parameters"]["documentVersion"] |= {"allowedValues": ["0"], "default": "0"}
    create_document(world, stale)

    run = world.deploy(**{"image-tag": "v1", "ssm-document": NAME})

    assert run.returncode == 1
    assert f"SSM document {NAME} is not the one this version of the action runs" in run.log
    assert "documentVersion 0" in run.log and "k3s-deploy-document.json" in run.log
    assert world.sim.sent_commands() == []
    assert world.buckets() == []


def test_a_missing_document_names_the_input(world: World) -> None:
    run = world.deploy(**{"image-tag": "v1", "ssm-document": NAME})

    assert run.returncode == 1
    assert f"SSM document {NAME} does not exist in this account and region" in run.log
    assert "docs/iam-setup.md" in run.log
    assert world.sim.sent_commands() == [] and world.buckets() == []


@pytest.mark.parametrize(
    ("parameter", "value"),
    [
        ("deployId", "x';touch /tmp/pwned;'"),
        ("prefix", "k3s-deploy/a/$(touch pwned)/"),
        ("bucket", "b`touch pwned`"),
        ("entryPoint", "deploy; touch pwned"),
        ("scriptUrl", "https://h/a'b"),
    ],
)
def test_the_agent_stand_in_refuses_what_the_document_does_not_allow(
    world: World, parameter: str, value: str
) -> None:
    create_document(world)
    parameters = {"entryPoint": ["rollback"], "deployId": ["20250304-050607-0a1b2c3d"], parameter: [value]}
    with pytest.raises(ClientError) as refused:
        world.sim.client("ssm").send_command(
            InstanceIds=[world.master.instance_id], DocumentName=NAME, Parameters=parameters
        )
    assert refused.value.response["Error"]["Code"] == "InvalidParameters"
    assert world.sim.sent_commands() == []
    assert not list(world.master.path.rglob("pwned"))
