"""action.yml: in step with the code, valid against GitHub's action schema, and wired to an image
that holds its entry points. Also the workflows of .github/ (pinned actions, time limits,
least privilege, actionlint)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploykit.cli import OUTPUTS
from deploykit.inputs import INPUTS

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.y*ml"))


def action() -> dict[str, Any]:
    return yaml.safe_load((REPO / "action.yml").read_text())


def test_inputs_are_exactly_those_of_deploykit_with_the_same_defaults() -> None:
    inputs = action()["inputs"]

    assert list(inputs) == list(INPUTS), "action.yml inputs and deploykit/inputs.py INPUTS differ"
    for name, (default, _help) in INPUTS.items():
        spec = inputs[name]
        assert spec.get("description", "").strip(), f"input {name} has no description"
        assert "default" in spec, f'input {name} has no default (use "" for none)'
        assert str(spec["default"]) == default, f"input {name}: default {spec['default']!r} != {default!r}"
        assert spec.get("required") is False, f"input {name}: every input is optional"


def test_outputs_are_exactly_those_the_action_writes_each_with_a_description() -> None:
    outputs = action()["outputs"]

    assert list(outputs) == list(OUTPUTS)
    for name, spec in outputs.items():
        assert spec.get("description", "").strip(), f"output {name} has no description"


def test_metadata_runs_the_dockerfile_with_a_post_entrypoint_in_the_image() -> None:
    meta = action()
    assert meta["name"] and meta["description"] and meta["author"]
    assert meta["branding"]["icon"] and meta["branding"]["color"]
    runs = meta["runs"]
    assert runs["using"] == "docker"
    assert runs["image"] == "Dockerfile"  # release commits pin docker://ghcr.io/...@sha256 instead
    # The runner passes it as `docker run --entrypoint PATH`: an executable file in the image,
    # copied from the repository root, whose shebang is the image's venv python.
    post = runs["post-entrypoint"]
    source = REPO / Path(post).name
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"COPY {source.name} {Path(post).parent}/" in dockerfile
    assert os.access(source, os.X_OK)
    assert source.read_text().splitlines()[0] == "#!/opt/venv/bin/python"
    assert "python3 -m venv /opt/venv" in dockerfile
    tracked = subprocess.run(
        ["git", "ls-files", "--stage", source.name], capture_output=True, text=True, cwd=REPO, check=False
    ).stdout
    if tracked:  # committed with its executable bit, or a clone would lose it
        assert tracked.startswith("100755"), tracked


def test_action_yml_is_valid_against_githubs_action_schema() -> None:
    proc = subprocess.run(
        [
            str(BIN / "check-jsonschema"),
            "--builtin-schema",
            "vendor.github-actions",
            str(REPO / "action.yml"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_pins_actions_by_sha_limits_time_and_privileges(workflow: Path) -> None:
    text = workflow.read_text()
    data = yaml.safe_load(text)
    assert "permissions" in data, "top-level permissions: least privilege by default"
    for name, job in data["jobs"].items():
        assert isinstance(job.get("timeout-minutes"), int), f"job {name} has no timeout-minutes"
    for uses in re.findall(r"^\s*(?:-\s*)?uses:\s*(\S+)", text, re.M):
        if uses.startswith("./"):
            continue
        assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", uses), f"not pinned by commit SHA: {uses}"


def test_workflows_are_actionlint_clean() -> None:
    assert WORKFLOWS, "no workflow in .github/workflows"
    shellcheck = shutil.which("shellcheck", path=str(BIN)) or ""
    proc = subprocess.run(
        [str(BIN / "actionlint"), "-shellcheck", shellcheck, *map(str, WORKFLOWS)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
