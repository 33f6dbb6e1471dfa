"""The IAM examples under examples/iam/: linted with parliament, and the deploy role policy kept in
step with the AWS calls deploykit really makes.

The drift check reads deploykit's source (not a list kept by hand): every boto3 operation called
on an EC2, SSM, S3 or STS client, directly (`s3.put_object(`) or through a paginator
(`get_paginator("list_object_versions")`), must be granted by the deploy role policy, and the
policy must grant nothing that no call needs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
IAM = ROOT / "examples" / "iam"
DEPLOY_POLICY = IAM / "deploy-role-policy.json"
MASTER_POLICY = IAM / "k3s-master-role-policy.json"
TRUST_POLICY = IAM / "github-oidc-trust-policy.json"
POLICIES = sorted(IAM.glob("*.json"))

# The action's own code: the simulator, the demo and the benchmark drive moto, not the user's
# account, and sweep.py runs with an operator's credentials (ListAllMyBuckets), never with the
# deploy role.
NOT_RUN_BY_THE_DEPLOY_ROLE = ("demo.py", "bench.py", "sweep.py")
ACTION_SOURCES = sorted(
    path
    for path in (ROOT / "deploykit").rglob("*.py")
    if "simulate" not in path.relative_to(ROOT / "deploykit").parts
    and path.name not in NOT_RUN_BY_THE_DEPLOY_ROLE
)
SERVICES = ("ec2", "ssm", "s3", "sts")

# The IAM actions each boto3 operation needs. Where the name differs from the API operation,
# the AWS Service Authorization Reference says so (HeadBucket is authorised as s3:ListBucket,
# DeleteObjects as s3:DeleteObject per key, plus s3:DeleteObjectVersion when a VersionId is
# given, as cleanup does). An operation the code calls that is missing here fails the test:
# add it, then grant it in examples/iam/deploy-role-policy.json and examples/iam/README.md.
OPERATION_PERMISSIONS: dict[str, set[str]] = {
    "get_caller_identity": {"sts:GetCallerIdentity"},
    "describe_instances": {"ec2:DescribeInstances"},
    "describe_instance_information": {"ssm:DescribeInstanceInformation"},
    "send_command": {"ssm:SendCommand"},
    "get_command_invocation": {"ssm:GetCommandInvocation"},
    "list_commands": {"ssm:ListCommands"},
    "list_command_invocations": {"ssm:ListCommandInvocations"},
    "cancel_command": {"ssm:CancelCommand"},
    "create_bucket": {"s3:CreateBucket"},
    "head_bucket": {"s3:ListBucket"},
    "list_objects_v2": {"s3:ListBucket"},
    "put_bucket_tagging": {"s3:PutBucketTagging"},
    "get_bucket_tagging": {"s3:GetBucketTagging"},
    "put_public_access_block": {"s3:PutBucketPublicAccessBlock"},
    "put_bucket_encryption": {"s3:PutEncryptionConfiguration"},
    "put_bucket_lifecycle_configuration": {"s3:PutLifecycleConfiguration"},
    "put_object": {"s3:PutObject"},
    "get_object": {"s3:GetObject"},
    "head_object": {"s3:GetObject"},
    "list_object_versions": {"s3:ListBucketVersions"},
    "delete_object": {"s3:DeleteObject", "s3:DeleteObjectVersion"},
    "delete_objects": {"s3:DeleteObject", "s3:DeleteObjectVersion"},
    "delete_bucket": {"s3:DeleteBucket"},
    "list_buckets": {"s3:ListAllMyBuckets"},
}

# Findings parliament reports that are wrong for these documents. Each needs a reason; any other
# finding fails the test.
JUSTIFIED_FINDINGS: dict[tuple[str, str, str], str] = {
    (
        "deploy-role-policy.json",
        "RESOURCE_MISMATCH",
        "RunDeployAndRollbackOnTaggedMasterOnly",
    ): "SendCommand is authorised per resource: the document and each instance. AWS's own "
    "tag-based example splits them into two statements so that the tag condition applies to the "
    "instances only (the AWS-RunShellScript document has no Name tag). parliament checks each "
    "statement alone and wants the document in the instance statement too.",
    (
        "deploy-role-policy.json",
        "PERMISSIONS_MANAGEMENT_ACTIONS",
        "CreateLockedDownStagingBucket",
    ): "A community auditor flags s3:PutBucketPublicAccessBlock as a permissions-management "
    "action. The action uses it to block all public access on the k3s-deploy-* buckets it "
    "creates; the grant is limited to those buckets.",
    (
        "github-oidc-trust-policy.json",
        "MALFORMED",
        "GitHubActionsProductionEnvironmentOnly",
    ): "A role trust policy has a Principal and no Resource; parliament reads every document as "
    "an identity policy.",
    (
        "github-oidc-trust-policy.json",
        "UNKNOWN_FEDERATION_SOURCE",
        "GitHubActionsProductionEnvironmentOnly",
    ): "parliament knows only a fixed list of identity providers; GitHub's OIDC provider "
    "(token.actions.githubusercontent.com) is not on it.",
}


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def statements(path: Path) -> list[dict[str, Any]]:
    return load(path)["Statement"]


def granted_actions(path: Path) -> set[str]:
    return {
        action
        for statement in statements(path)
        if statement["Effect"] == "Allow"
        for action in as_list(statement["Action"])
    }


def statement_at_line(path: Path, line: int | None) -> str:
    """The Sid of the statement that starts at or before `line` (parliament reports lines)."""
    sid = ""
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line is not None and number > line + 3:
            break
        match = re.search(r'"Sid":\s*"([^"]+)"', text)
        if match:
            sid = match[1]
    return sid


def statement_with_action(path: Path, action: str) -> str:
    for statement in statements(path):
        if any(a.lower() == action.lower() for a in as_list(statement["Action"])):
            return statement.get("Sid", "")
    return ""


def parliament_findings(path: Path) -> list[tuple[str, str, str]]:
    from parliament import analyze_policy_string

    policy = analyze_policy_string(path.read_text(encoding="utf-8"), include_community_auditors=True)
    found = []
    for finding in policy.findings:
        location = finding.location or {}
        if "actions" in location:
            sid = statement_with_action(path, location["actions"][0])
        else:
            sid = statement_at_line(path, location.get("line"))
        found.append((path.name, finding.issue, sid))
    return found


# Calls in the action's source


def _operations_of(service: str) -> set[str]:
    import botocore.session
    from botocore import xform_name

    model = botocore.session.get_session().get_service_model(service)
    return {xform_name(name) for name in model.operation_names}


def operations_called() -> dict[str, set[str]]:
    """boto3 operation -> the source files that call it (directly or via a paginator)."""
    known = set().union(*(_operations_of(service) for service in SERVICES))
    called: dict[str, set[str]] = {}
    for path in ACTION_SOURCES:
        text = path.read_text(encoding="utf-8")
        names = set(re.findall(r"\.(\w+)\(", text))
        names |= set(re.findall(r"get_paginator\(\s*[\"'](\w+)[\"']", text))
        for name in names & known:
            called.setdefault(name, set()).add(path.relative_to(ROOT).as_posix())
    return called


def permissions_named_in_source() -> set[str]:
    """Every IAM action deploykit names, mostly in error messages that tell users what to grant
    (`aws_call(..., "s3:PutObject", ...)`, "the instance role needs s3:GetObject")."""
    named = set()
    for path in ACTION_SOURCES:
        named |= set(re.findall(r"\b((?:ec2|ssm|s3|sts):[A-Z][A-Za-z]+)", path.read_text(encoding="utf-8")))
    return named


# Tests


def test_every_example_policy_is_valid_json_with_a_sid_per_statement() -> None:
    assert [p.name for p in POLICIES] == [
        "deploy-role-policy.json",
        "github-oidc-trust-policy.json",
        "k3s-master-role-policy.json",
    ]
    for path in POLICIES:
        document = load(path)
        assert document["Version"] == "2012-10-17", path.name
        sids = [statement.get("Sid", "") for statement in document["Statement"]]
        assert all(re.fullmatch(r"[A-Za-z0-9]+", sid) for sid in sids), f"{path.name}: {sids}"
        assert len(set(sids)) == len(sids), f"{path.name}: duplicate Sid"


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_parliament_finds_nothing_unjustified(path: Path) -> None:
    unexpected = [finding for finding in parliament_findings(path) if finding not in JUSTIFIED_FINDINGS]
    assert not unexpected, f"parliament findings in {path.name}: {unexpected}"


def test_justified_findings_are_still_reported() -> None:
    """An ignore whose finding is gone is stale: remove it so the list stays honest."""
    reported = {finding for path in POLICIES for finding in parliament_findings(path)}
    stale = set(JUSTIFIED_FINDINGS) - reported
    assert not stale, f"no longer reported, remove from JUSTIFIED_FINDINGS: {sorted(stale)}"


def test_parliament_catches_a_broken_policy() -> None:
    from parliament import analyze_policy_string

    broken = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::bucket"}],
    }
    issues = {f.issue for f in analyze_policy_string(json.dumps(broken)).findings}
    assert "RESOURCE_MISMATCH" in issues


def test_the_source_scan_sees_the_calls_of_each_step() -> None:
    """Guards the scan itself: if these vanish, the regexes no longer read the code."""
    called = operations_called()
    for operation in ("describe_instances", "send_command", "get_command_invocation", "put_object"):
        assert operation in called, f"{operation} not found in deploykit's source"


def test_every_aws_call_in_deploykit_is_granted_by_the_deploy_role() -> None:
    granted = granted_actions(DEPLOY_POLICY)
    problems = []
    for operation, files in sorted(operations_called().items()):
        if operation not in OPERATION_PERMISSIONS:
            problems.append(f"{operation} ({', '.join(sorted(files))}): add it to OPERATION_PERMISSIONS")
            continue
        missing = OPERATION_PERMISSIONS[operation] - granted
        if missing:
            problems.append(
                f"{operation} ({', '.join(sorted(files))}) needs {sorted(missing)}: "
                "grant it in examples/iam/deploy-role-policy.json"
            )
    assert not problems, "\n".join(problems)


def test_deploy_role_grants_nothing_the_code_does_not_call() -> None:
    needed = set().union(*(OPERATION_PERMISSIONS.get(op, set()) for op in operations_called()))
    extra = granted_actions(DEPLOY_POLICY) - needed
    assert not extra, f"granted but never called by deploykit: {sorted(extra)}"


def test_permissions_named_in_messages_are_in_the_example_policies() -> None:
    named = permissions_named_in_source()
    assert {"ssm:SendCommand", "s3:GetObject"} <= named  # the scan works
    missing = named - granted_actions(DEPLOY_POLICY) - granted_actions(MASTER_POLICY)
    assert not missing, f"deploykit tells users to grant {sorted(missing)}; examples/iam/ does not"


def test_s3_grants_cover_only_the_action_s_bucket_names() -> None:
    from deploykit.stage import BUCKET_PREFIX

    for path in (DEPLOY_POLICY, MASTER_POLICY):
        for statement in statements(path):
            if not any(a.startswith("s3:") for a in as_list(statement["Action"])):
                continue
            for resource in as_list(statement["Resource"]):
                assert resource in (f"arn:aws:s3:::{BUCKET_PREFIX}*", f"arn:aws:s3:::{BUCKET_PREFIX}*/*"), (
                    f"{path.name} {statement['Sid']}: {resource}"
                )


def test_send_command_is_limited_to_run_shell_script_and_the_tagged_master() -> None:
    from deploykit.inputs import INPUTS

    tag_key, tag_pattern = INPUTS["instance-tag-key"][0], INPUTS["instance-tag"][0]
    sends = [s for s in statements(DEPLOY_POLICY) if "ssm:SendCommand" in as_list(s["Action"])]
    resources = {r for s in sends for r in as_list(s["Resource"])}
    assert resources == {"arn:aws:ssm:*:*:document/AWS-RunShellScript", "arn:aws:ec2:*:*:instance/*"}
    for statement in sends:
        if "arn:aws:ec2:*:*:instance/*" in as_list(statement["Resource"]):
            assert as_list(statement["Action"]) == ["ssm:SendCommand"]
            assert statement["Condition"] == {"StringLike": {f"ssm:resourceTag/{tag_key}": tag_pattern}}


def test_master_role_can_only_read_the_staged_files() -> None:
    assert granted_actions(MASTER_POLICY) == {"s3:GetObject", "s3:ListBucket"}


def test_trust_policy_admits_only_the_production_environment_through_github_oidc() -> None:
    (statement,) = statements(TRUST_POLICY)
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert statement["Principal"]["Federated"].endswith(":oidc-provider/token.actions.githubusercontent.com")
    condition = statement["Condition"]["StringEquals"]
    assert condition["token.actions.githubusercontent.com:aud"] == "sts.amazonaws.com"
    assert condition["token.actions.githubusercontent.com:sub"] == "repo:OWNER/REPO:environment:production"


def test_every_statement_is_explained_in_the_iam_readme() -> None:
    readme = (IAM / "README.md").read_text(encoding="utf-8")
    for path in POLICIES:
        for statement in statements(path):
            assert f"`{statement['Sid']}`" in readme, f"{path.name}: {statement['Sid']} not in README.md"
