"""The example workflow examples/workflows/deploy-aws-k3s.yaml, beyond what the linters check in
`make lint` (actionlint, zizmor, the workflow schema): the shape a user copies must stay safe
and must agree with the action and the example platform it deploys.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "examples" / "workflows" / "deploy-aws-k3s.yaml"
BASE = ROOT / "examples" / "production-platform" / "k8s" / "base"
OUR_ACTION = "org/k3s-deploy-action"
# `uses: owner/repo@<full commit SHA>  # vX.Y.Z`
PINNED = re.compile(r"uses:\s*([\w.-]+/[\w./-]+)@([0-9a-f]{40})\s+#\s*v\d+\.\d+\.\d+\s*$")


def workflow() -> dict[str, Any]:
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


def triggers(document: dict[str, Any]) -> dict[str, Any]:
    # YAML 1.1 reads the key `on` as the boolean true.
    return document.get("on", document.get(True))


def steps_using(job: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    return [step for step in job["steps"] if str(step.get("uses", "")).startswith(prefix)]


def test_every_third_party_action_is_pinned_to_a_commit_with_its_version() -> None:
    lines = [line for line in WORKFLOW.read_text(encoding="utf-8").splitlines() if "uses:" in line]
    lines = [line for line in lines if not line.lstrip().startswith("#")]
    assert len(lines) >= 8
    for line in lines:
        if OUR_ACTION in line:
            continue
        assert PINNED.search(line), f"not pinned to a full SHA with a version comment: {line.strip()}"


def test_the_same_action_is_pinned_to_the_same_commit_everywhere() -> None:
    pins: dict[str, set[str]] = {}
    for line in WORKFLOW.read_text(encoding="utf-8").splitlines():
        match = PINNED.search(line)
        if match:
            pins.setdefault(match[1], set()).add(match[2])
    assert pins and all(len(shas) == 1 for shas in pins.values()), pins


def test_our_action_tells_users_to_pin_it_by_sha() -> None:
    text = WORKFLOW.read_text(encoding="utf-8")
    assert f"uses: {OUR_ACTION}@v1" in text
    assert f"{OUR_ACTION}@<40-hex commit SHA>" in text


def test_manual_trigger_with_the_push_trigger_commented_out() -> None:
    document = workflow()
    assert set(triggers(document)) == {"workflow_dispatch"}
    text = WORKFLOW.read_text(encoding="utf-8")
    for line in ("# push:", "#   branches: [main]", "#     - 'app/**'"):
        assert line in text
    assert "#     - '.github/workflows/deploy-aws-k3s.yaml'" in text


def test_deploys_never_overlap_and_are_never_cancelled_midway() -> None:
    concurrency = workflow()["concurrency"]
    assert concurrency["cancel-in-progress"] is False
    assert "${{" not in concurrency["group"], "one group for the cluster, not one per ref"


def test_every_job_has_a_timeout_and_least_privilege_permissions() -> None:
    document = workflow()
    assert document["permissions"] == {}
    jobs = document["jobs"]
    assert list(jobs) == ["quality", "build", "deploy"]
    for name, job in jobs.items():
        assert 0 < job["timeout-minutes"] <= 30, name
        expected = {"contents": "read", "id-token": "write"} if name == "deploy" else {"contents": "read"}
        assert job["permissions"] == expected, name
    assert jobs["build"]["needs"] == "quality"
    assert jobs["deploy"]["needs"] == "build"
    assert jobs["deploy"]["environment"] == "production"


def test_checkouts_do_not_keep_the_token() -> None:
    for name, job in workflow()["jobs"].items():
        for step in steps_using(job, "actions/checkout@"):
            assert step["with"]["persist-credentials"] is False, name


def test_aws_credentials_come_from_oidc_with_static_keys_only_as_a_comment() -> None:
    deploy = workflow()["jobs"]["deploy"]
    (credentials,) = steps_using(deploy, "aws-actions/configure-aws-credentials@")
    assert "role-to-assume" in credentials["with"]
    assert not {"aws-access-key-id", "aws-secret-access-key"} & set(credentials["with"])
    text = WORKFLOW.read_text(encoding="utf-8")
    assert "#   aws-access-key-id: ${{ secrets.AWS_ACCESS_KEY_ID }}" in text
    assert "#   aws-secret-access-key: ${{ secrets.AWS_SECRET_ACCESS_KEY }}" in text


def test_images_are_tagged_with_the_sha_and_latest_and_cached() -> None:
    build = workflow()["jobs"]["build"]
    (push,) = steps_using(build, "docker/build-push-action@")
    tags = push["with"]["tags"].splitlines()
    assert tags == ["${{ matrix.image }}:${{ github.sha }}", "${{ matrix.image }}:latest"]
    assert push["with"]["cache-from"].startswith("type=gha")
    assert push["with"]["cache-to"].startswith("type=gha")
    assert steps_using(build, "docker/setup-buildx-action@")
    assert steps_using(build, "docker/login-action@")


def test_the_deploy_step_uses_only_inputs_the_action_has() -> None:
    action = yaml.safe_load((ROOT / "action.yml").read_text(encoding="utf-8"))
    (step,) = steps_using(workflow()["jobs"]["deploy"], OUR_ACTION)
    assert set(step["with"]) <= set(action["inputs"])
    assert (ROOT / "examples" / "production-platform" / step["with"]["manifests"]).is_dir()


def test_built_images_are_the_ones_the_deploy_pins_and_the_manifests_use() -> None:
    document = workflow()
    built = {entry["image"] for entry in document["jobs"]["build"]["strategy"]["matrix"]["include"]}
    (step,) = steps_using(document["jobs"]["deploy"], OUR_ACTION)
    pinned = set(step["with"]["images"].split())
    assert built == pinned
    used = set()
    for path in BASE.glob("*.yaml"):
        refs = re.findall(r"image:\s*(\S+)", path.read_text(encoding="utf-8"))
        used |= {ref.rsplit(":", 1)[0] for ref in refs}
    assert pinned <= used, f"{pinned - used} not used by examples/production-platform/k8s/base"
    for entry in document["jobs"]["build"]["strategy"]["matrix"]["include"]:
        assert (ROOT / "examples" / "production-platform" / "app" / entry["app"] / "Dockerfile").is_file()
