"""The terraform example under examples/infra/terraform/k3s: checkov finds nothing, and the master
it describes is one the action can reach (the tag it looks for, SSM, no way in from outside).

No terraform binary can be installed here, so this is static: checkov (in its own venv, see the
Makefile) and a few reads of the files.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "examples" / "infra" / "terraform" / "k3s"
TF_FILES = sorted(MODULE.glob("*.tf"))


def checkov_binary() -> str:
    for candidate in (ROOT / ".venv-checkov" / "bin" / "checkov", shutil.which("checkov")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    if os.environ.get("CI"):
        pytest.fail("checkov is not installed: `make setup` creates .venv-checkov")
    pytest.skip("checkov is not installed: run `make setup`")


def run_checkov(directory: Path) -> dict[str, Any]:
    result = subprocess.run(
        [
            checkov_binary(),
            "--directory",
            str(directory),
            "--framework",
            "terraform",
            "--quiet",
            "--compact",
            "--skip-download",  # no network here: do not fetch guidelines from the vendor's API
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode in (0, 1), result.stderr[-2000:]
    return json.loads(result.stdout)


def failed_check_ids(report: dict[str, Any]) -> set[str]:
    return {check["check_id"] for check in report["results"].get("failed_checks", [])}


def source(name: str) -> str:
    return (MODULE / name).read_text(encoding="utf-8")


def variable_default(name: str) -> str:
    block = re.search(rf'variable "{name}" {{(.*?)\n}}', source("variables.tf"), re.S)
    assert block, f"variable {name} not found"
    default = re.search(r'^\s*default\s*=\s*"([^"]*)"', block[1], re.M)
    assert default, f"variable {name} has no string default"
    return default[1]


def test_module_has_its_files() -> None:
    assert [p.name for p in TF_FILES] == ["main.tf", "outputs.tf", "variables.tf", "versions.tf"]
    assert (MODULE / "user_data.sh.tftpl").is_file()
    assert (MODULE / "README.md").is_file()


def test_checkov_finds_no_failed_check() -> None:
    report = run_checkov(MODULE)
    summary = report["summary"]
    assert summary["parsing_errors"] == 0
    assert summary["resource_count"] >= 7, summary
    assert summary["passed"] > 0, summary
    failed = [
        f"{check['check_id']} {check['resource']}: {check['check_name']}"
        for check in report["results"].get("failed_checks", [])
    ]
    assert not failed, "\n".join(failed)


def test_checkov_fails_an_insecure_copy(tmp_path: Path) -> None:
    """The harness can fail: IMDSv1 and an unencrypted root volume are caught."""
    for path in MODULE.iterdir():
        shutil.copy(path, tmp_path / path.name)
    main = (tmp_path / "main.tf").read_text(encoding="utf-8")
    insecure = re.sub(r'(http_tokens\s*=\s*)"required"', r'\1"optional"', main)
    insecure = re.sub(r"(encrypted\s*=\s*)true", r"\1false", insecure)
    assert insecure != main
    (tmp_path / "main.tf").write_text(insecure, encoding="utf-8")
    assert {"CKV_AWS_79", "CKV_AWS_8"} <= failed_check_ids(run_checkov(tmp_path))


def test_every_skipped_check_says_why() -> None:
    for path in TF_FILES:
        for line in path.read_text(encoding="utf-8").splitlines():
            if "checkov:skip=" in line:
                assert re.search(r"checkov:skip=CKV2?_AWS_\d+:\s*\S.{10,}", line), (
                    f"{path.name}: a skip needs a reason: {line.strip()}"
                )


def test_the_action_finds_the_master_by_its_name_tag() -> None:
    from deploykit.inputs import INPUTS

    assert INPUTS["instance-tag-key"][0] == "Name"
    assert fnmatch.fnmatchcase(variable_default("name"), INPUTS["instance-tag"][0])
    assert "Name = var.name" in source("main.tf")


def test_the_master_is_reached_through_ssm_only() -> None:
    code = "\n".join(line for line in source("main.tf").splitlines() if not line.lstrip().startswith("#"))
    assert "AmazonSSMManagedInstanceCore" in code
    assert "systemctl enable --now amazon-ssm-agent" in source("user_data.sh.tftpl")
    # No inbound rule of any kind: not SSH, not the Kubernetes API (6443).
    assert "ingress" not in code
    assert "6443" not in code
    assert variable_default("instance_type") == "t3.micro"


def resource_block(kind: str, name: str) -> str:
    block = re.search(rf'^resource "{kind}" "{name}" {{\n(.*?)^}}', source("main.tf"), re.S | re.M)
    assert block, f"resource {kind}.{name} not found in main.tf"
    return block[1]


def file_read_by(block: str) -> Path:
    """The file a block reads with file("${path.module}/...")."""
    match = re.search(r'file\("\$\{path\.module\}/([^"]+)"\)', block)
    assert match, f"no file() in {block!r}"
    return (MODULE / match[1]).resolve()


def test_the_instance_role_uses_the_example_iam_policy() -> None:
    policy = file_read_by(resource_block("aws_iam_role_policy", "staged_files"))
    assert policy == ROOT / "examples" / "iam" / "k3s-master-role-policy.json"
    assert json.loads(policy.read_text(encoding="utf-8"))["Statement"]


def custom_document_policy_statements() -> list[dict[str, Any]]:
    path = ROOT / "examples" / "iam" / "deploy-role-policy-custom-document.json"
    return json.loads(path.read_text(encoding="utf-8"))["Statement"]


def test_the_ssm_document_is_the_example_document() -> None:
    """The terraform example creates the action's custom SSM document from the same file the
    action's own code generates (examples/iam/k3s-deploy-document.json), as a Command document,
    named as the custom-document deploy role policy expects."""
    from deploykit.command import document_content

    block = resource_block("aws_ssm_document", "k3s_deploy")
    document = file_read_by(block)
    assert document == ROOT / "examples" / "iam" / "k3s-deploy-document.json"
    assert json.loads(document.read_text(encoding="utf-8")) == document_content()
    assert re.search(r'^\s*document_type\s*=\s*"Command"$', block, re.M)
    assert re.search(r'^\s*document_format\s*=\s*"JSON"$', block, re.M)
    assert re.search(r"^\s*name\s*=\s*var\.ssm_document_name$", block, re.M)
    documents = {
        statement["Resource"]
        for statement in custom_document_policy_statements()
        if ":document/" in statement["Resource"]
    }
    assert documents == {f"arn:aws:ssm:*:123456789012:document/{variable_default('ssm_document_name')}"}
    assert "aws_ssm_document.k3s_deploy.name" in source("outputs.tf")


def test_the_master_carries_the_deploy_target_tag_of_the_custom_document_policy() -> None:
    """The custom-document policy allows SendCommand only on instances tagged
    k3s-deploy-target=true: the example's master has that tag unless the key is set empty."""
    key = variable_default("deploy_target_tag_key")
    conditions = [
        statement["Condition"]
        for statement in custom_document_policy_statements()
        if statement["Action"] == "ssm:SendCommand" and "Condition" in statement
    ]
    assert conditions == [{"StringEquals": {f"ssm:resourceTag/{key}": "true"}}]
    assert re.search(r'compact\(\[var\.deploy_target_tag_key\]\)\s*:\s*key\s*=>\s*"true"', source("main.tf"))
    assert "local.deploy_target_tag" in resource_block("aws_instance", "k3s_master")


def test_user_data_placeholders_are_the_template_variables() -> None:
    """templatefile() fails on a ${...} it was not given: only the two variables may appear."""
    template = source("user_data.sh.tftpl")
    placeholders = set(re.findall(r"(?<!\$)\$\{([^}]*)\}", template))
    assert placeholders == {"k3s_version", "swap_size_mb"}
    given = re.search(r"templatefile\([^,]+,\s*\{(.*?)\}\)", source("main.tf"), re.S)
    assert given, "templatefile() call not found"
    assert set(re.findall(r"^\s*(\w+)\s*=", given[1], re.M)) == placeholders
