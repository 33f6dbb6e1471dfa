"""The IAM examples under examples/iam/: linted with parliament, and the deploy role policy kept in
step with the AWS calls deploykit really makes.

The drift check reads deploykit's source (not a list kept by hand): every boto3 operation called
on an EC2, SSM, S3 or STS client, directly (`s3.put_object(`) or through a paginator
(`get_paginator("list_object_versions")`), must be granted by each deploy role policy, and no
policy may grant anything that no call needs. There are two deploy role policies: the default
one (AWS-RunShellScript) and the one for input `ssm-document` (the custom SSM document). A call
the action makes only with the custom document (DescribeDocument, which checks the document's
version) is required of the custom-document policy only, and the default policy must not grant
it.

examples/iam/k3s-deploy-document.json sits in the same folder but is an SSM Command document, not
an IAM policy: it is generated from deploykit.command.document_content() and checked elsewhere.
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
CUSTOM_DOCUMENT_POLICY = IAM / "deploy-role-policy-custom-document.json"
DEPLOY_POLICIES = (DEPLOY_POLICY, CUSTOM_DOCUMENT_POLICY)
MASTER_POLICY = IAM / "k3s-master-role-policy.json"
TRUST_POLICY = IAM / "github-oidc-trust-policy.json"
# The SSM Command document of input `ssm-document`: JSON in the same folder, but not a policy.
SSM_DOCUMENT = IAM / "k3s-deploy-document.json"
POLICIES = sorted(path for path in IAM.glob("*.json") if path.name != SSM_DOCUMENT.name)

# The custom document as the examples name it (the terraform example's default, docs/iam-setup.md),
# in the account of the placeholder id the examples use (examples/iam/README.md).
EXAMPLE_ACCOUNT = "123456789012"
CUSTOM_DOCUMENT_ARN = f"arn:aws:ssm:*:{EXAMPLE_ACCOUNT}:document/k3s-deploy"
# The dedicated tag key of the custom-document policy (examples/iam/README.md says why).
DEPLOY_TARGET_TAG = ("k3s-deploy-target", "true")
# Every S3 statement is limited to buckets of the caller's own account.
SAME_ACCOUNT_BUCKETS = {"StringEquals": {"s3:ResourceAccount": "${aws:PrincipalAccount}"}}
# The Service Authorization Reference lists no resource type for these: they stay on "*".
SSM_ACTIONS_WITHOUT_RESOURCE_TYPES = (
    "ssm:DescribeInstanceInformation",
    "ssm:GetCommandInvocation",
    "ssm:ListCommands",
    "ssm:ListCommandInvocations",
    "ssm:CancelCommand",
)

# The action's own code (the rig in devkit/ drives moto, not the user's account). sweep.py runs
# with an operator's credentials (ListAllMyBuckets), never with the deploy role.
NOT_RUN_BY_THE_DEPLOY_ROLE = ("sweep.py",)
ACTION_SOURCES = sorted(
    path for path in (ROOT / "deploykit").rglob("*.py") if path.name not in NOT_RUN_BY_THE_DEPLOY_ROLE
)
SERVICES = ("ec2", "ssm", "s3", "sts")

# The IAM actions each boto3 operation needs. Where the name differs from the API operation,
# the AWS Service Authorization Reference says so (HeadBucket is authorised as s3:ListBucket,
# DeleteObjects as s3:DeleteObject per key, plus s3:DeleteObjectVersion when a VersionId is
# given, as cleanup does). An operation the code calls that is missing here fails the test:
# add it, then grant it in both examples/iam/deploy-role-policy*.json and examples/iam/README.md.
OPERATION_PERMISSIONS: dict[str, set[str]] = {
    "get_caller_identity": {"sts:GetCallerIdentity"},
    "describe_instances": {"ec2:DescribeInstances"},
    "describe_instance_information": {"ssm:DescribeInstanceInformation"},
    "send_command": {"ssm:SendCommand"},
    "get_command_invocation": {"ssm:GetCommandInvocation"},
    "list_commands": {"ssm:ListCommands"},
    "list_command_invocations": {"ssm:ListCommandInvocations"},
    "cancel_command": {"ssm:CancelCommand"},
    "describe_document": {"ssm:DescribeDocument"},
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

# IAM actions the action needs only with input `ssm-document` (deploykit/command.py
# check_document reads the custom document's version before anything is staged; with
# AWS-RunShellScript there is no document of ours to check). The default policy must not grant
# them; test_describe_document_is_called_only_for_a_custom_document keeps that true.
ONLY_WITH_CUSTOM_DOCUMENT = {"ssm:DescribeDocument"}


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
    "creates; the grant is limited to those buckets, in the caller's own account.",
    (
        "deploy-role-policy-custom-document.json",
        "RESOURCE_MISMATCH",
        "RunDeployAndRollbackOnDeployTargetsOnly",
    ): "As in deploy-role-policy.json: SendCommand is authorised for the document and for each "
    "instance separately, and the tag condition must apply to the instances only (the k3s-deploy "
    "document has no k3s-deploy-target tag, and must not need one: tagging the document would "
    "become a way to grant it). parliament checks each statement alone and wants the document in "
    "the instance statement too.",
    (
        "deploy-role-policy-custom-document.json",
        "PERMISSIONS_MANAGEMENT_ACTIONS",
        "CreateLockedDownStagingBucket",
    ): "As in deploy-role-policy.json: s3:PutBucketPublicAccessBlock only ever blocks public "
    "access, on the k3s-deploy-* buckets the action creates in the caller's own account.",
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


def needed_by(policy: Path) -> set[str]:
    """The IAM actions of OPERATION_PERMISSIONS that this deploy role policy must grant, given the
    operations deploykit calls."""
    needed = set().union(*(OPERATION_PERMISSIONS.get(op, set()) for op in operations_called()))
    return needed if policy == CUSTOM_DOCUMENT_POLICY else needed - ONLY_WITH_CUSTOM_DOCUMENT


# Tests


def test_every_example_policy_is_valid_json_with_a_sid_per_statement() -> None:
    assert [p.name for p in POLICIES] == [
        "deploy-role-policy-custom-document.json",
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


def test_the_ssm_document_is_left_out_of_the_policies() -> None:
    """k3s-deploy-document.json is an SSM Command document: linting it as an IAM policy makes no
    sense (parliament reads any JSON as one)."""
    document = load(SSM_DOCUMENT)
    assert document["schemaVersion"] and document["mainSteps"]
    assert "Statement" not in document
    assert SSM_DOCUMENT not in POLICIES


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


@pytest.mark.parametrize("policy", DEPLOY_POLICIES, ids=lambda p: p.name)
def test_every_aws_call_in_deploykit_is_granted_by_the_deploy_role(policy: Path) -> None:
    granted = granted_actions(policy)
    needed = needed_by(policy)
    problems = []
    for operation, files in sorted(operations_called().items()):
        if operation not in OPERATION_PERMISSIONS:
            problems.append(f"{operation} ({', '.join(sorted(files))}): add it to OPERATION_PERMISSIONS")
            continue
        missing = (OPERATION_PERMISSIONS[operation] & needed) - granted
        if missing:
            problems.append(
                f"{operation} ({', '.join(sorted(files))}) needs {sorted(missing)}: "
                f"grant it in examples/iam/{policy.name}"
            )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("policy", DEPLOY_POLICIES, ids=lambda p: p.name)
def test_deploy_role_grants_nothing_the_code_does_not_call(policy: Path) -> None:
    """The default policy, in particular, grants no ssm:DescribeDocument: the action calls it only
    with input `ssm-document`."""
    extra = granted_actions(policy) - needed_by(policy)
    assert not extra, f"{policy.name} grants what deploykit never calls with it: {sorted(extra)}"


def test_only_the_custom_document_policy_is_spared_describe_document() -> None:
    """ONLY_WITH_CUSTOM_DOCUMENT lists calls deploykit really makes (or it hides nothing)."""
    called = set().union(*(OPERATION_PERMISSIONS.get(op, set()) for op in operations_called()))
    assert called >= ONLY_WITH_CUSTOM_DOCUMENT
    assert granted_actions(CUSTOM_DOCUMENT_POLICY) >= ONLY_WITH_CUSTOM_DOCUMENT
    assert not ONLY_WITH_CUSTOM_DOCUMENT & granted_actions(DEPLOY_POLICY)


def test_describe_document_is_called_only_for_a_custom_document() -> None:
    """The default policy may omit ssm:DescribeDocument because deploykit reads the document only
    in command.check_document, and calls that only when input `ssm-document` names a document
    other than AWS-RunShellScript. If this fails, the default policy needs the grant too."""
    callers = []
    for path in ACTION_SOURCES:
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            if ".describe_document(" in line:
                callers.append(path.relative_to(ROOT).as_posix())
                assert path.name == "command.py", f"{path.name}:{number + 1} calls DescribeDocument"
            if "check_document(" in line and not line.lstrip().startswith("def "):
                guard = "\n".join(lines[max(0, number - 3) : number])
                assert re.search(r"if [\w.]*ssm_document != [\w.]*RUN_SHELL_SCRIPT", guard), (
                    f"{path.relative_to(ROOT)}:{number + 1}: check_document is called without the "
                    "ssm_document != RUN_SHELL_SCRIPT guard"
                )
    assert callers == ["deploykit/command.py"]


def test_permissions_named_in_messages_are_in_the_example_policies() -> None:
    named = permissions_named_in_source()
    assert {"ssm:SendCommand", "s3:GetObject", "ssm:DescribeDocument"} <= named  # the scan works
    granted = set().union(*(granted_actions(path) for path in (*DEPLOY_POLICIES, MASTER_POLICY)))
    missing = named - granted
    assert not missing, f"deploykit tells users to grant {sorted(missing)}; examples/iam/ does not"


def s3_statements(path: Path) -> list[dict[str, Any]]:
    return [s for s in statements(path) if any(a.startswith("s3:") for a in as_list(s["Action"]))]


def test_s3_grants_cover_only_the_action_s_bucket_names() -> None:
    from deploykit.progress import FOLDER
    from deploykit.stage import BUCKET_PREFIX

    allowed = (
        f"arn:aws:s3:::{BUCKET_PREFIX}*",
        f"arn:aws:s3:::{BUCKET_PREFIX}*/*",
        f"arn:aws:s3:::{BUCKET_PREFIX}*/{FOLDER}*",  # live progress: deploykit/progress.py
    )
    for path in (*DEPLOY_POLICIES, MASTER_POLICY):
        for statement in s3_statements(path):
            for resource in as_list(statement["Resource"]):
                assert resource in allowed, f"{path.name} {statement['Sid']}: {resource}"


def test_live_progress_grants_only_its_folder() -> None:
    """The master may write the progress objects and nothing else: a master that was taken over
    must not be able to replace the staged script or bundle. The deploy role reads them only."""
    from deploykit.progress import FOLDER
    from deploykit.stage import BUCKET_PREFIX

    progress = f"arn:aws:s3:::{BUCKET_PREFIX}*/{FOLDER}*"
    writes = [s for s in s3_statements(MASTER_POLICY) if "s3:PutObject" in as_list(s["Action"])]
    assert [(s["Sid"], as_list(s["Action"]), as_list(s["Resource"])) for s in writes] == [
        ("UploadLiveProgress", ["s3:PutObject"], [progress])
    ]
    for path in DEPLOY_POLICIES:
        reads = [s for s in s3_statements(path) if "s3:GetObject" in as_list(s["Action"])]
        found = [(as_list(s["Action"]), as_list(s["Resource"])) for s in reads]
        assert found == [(["s3:GetObject"], [progress])], path.name


def test_s3_grants_cover_only_buckets_of_the_caller_s_account() -> None:
    """Bucket names are global: k3s-deploy-* may be anyone's. s3:ResourceAccount (listed for every
    S3 action these statements grant, CreateBucket included) limits each grant to buckets the
    role's own account owns, whatever the name; ExpectedBucketOwner on each call does the same
    from the other side."""
    for path in (*DEPLOY_POLICIES, MASTER_POLICY):
        assert s3_statements(path), path.name
        for statement in s3_statements(path):
            if path in DEPLOY_POLICIES and statement["Sid"] == "CheckStagingBucketNameAndOwner":
                # HeadBucket on the name drawn for a new bucket, before it exists: with no bucket
                # there is no resource account, and a 403 there would refuse every name. It
                # only reads, and every call carries ExpectedBucketOwner.
                assert as_list(statement["Action"]) == ["s3:ListBucket"] and "Condition" not in statement
                continue
            assert statement.get("Condition") == SAME_ACCOUNT_BUCKETS, f"{path.name} {statement['Sid']}"


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


def test_custom_document_policy_runs_only_the_k3s_deploy_document_on_deploy_targets() -> None:
    """With input `ssm-document`, the role may send (and describe) the k3s-deploy document of its
    own account, never AWS-RunShellScript, and only to instances tagged k3s-deploy-target=true."""
    document = load(SSM_DOCUMENT)
    assert all(
        parameter.get("allowedPattern") or parameter.get("allowedValues")
        for parameter in document["parameters"].values()
    ), "every parameter of the document must be constrained, or the role can run anything"
    by_action: dict[str, set[str]] = {}
    for statement in statements(CUSTOM_DOCUMENT_POLICY):
        for action in as_list(statement["Action"]):
            by_action.setdefault(action, set()).update(as_list(statement["Resource"]))
    assert by_action["ssm:SendCommand"] == {CUSTOM_DOCUMENT_ARN, "arn:aws:ec2:*:*:instance/*"}
    assert by_action["ssm:DescribeDocument"] == {CUSTOM_DOCUMENT_ARN}
    # An explicit account: with `*` a same-named document another account shares with this one
    # would match too.
    assert CUSTOM_DOCUMENT_ARN.split(":")[4] == EXAMPLE_ACCOUNT
    key, value = DEPLOY_TARGET_TAG
    for statement in statements(CUSTOM_DOCUMENT_POLICY):
        if "arn:aws:ec2:*:*:instance/*" in as_list(statement["Resource"]):
            assert as_list(statement["Action"]) == ["ssm:SendCommand"]
            assert statement["Condition"] == {"StringEquals": {f"ssm:resourceTag/{key}": value}}
    # The same grants otherwise: only the SendCommand targets and DescribeDocument differ.
    extra = granted_actions(CUSTOM_DOCUMENT_POLICY) - granted_actions(DEPLOY_POLICY)
    assert extra == ONLY_WITH_CUSTOM_DOCUMENT
    assert granted_actions(CUSTOM_DOCUMENT_POLICY) >= granted_actions(DEPLOY_POLICY)


def test_ssm_reads_and_cancel_stay_on_star_as_the_reference_allows() -> None:
    """The Service Authorization Reference lists no resource type and no condition key for these
    actions: IAM cannot narrow them. The README records that, per action, with the page."""
    readme = (IAM / "README.md").read_text(encoding="utf-8")
    assert "service-authorization/latest/reference/list_awssystemsmanager.html" in readme
    for path in DEPLOY_POLICIES:
        for statement in statements(path):
            actions = set(as_list(statement["Action"]))
            if actions & set(SSM_ACTIONS_WITHOUT_RESOURCE_TYPES):
                assert actions == set(SSM_ACTIONS_WITHOUT_RESOURCE_TYPES), f"{path.name} {statement['Sid']}"
                assert statement["Resource"] == "*"
                assert "Condition" not in statement
    for action in SSM_ACTIONS_WITHOUT_RESOURCE_TYPES:
        assert re.search(rf"^\| `{action}` \|", readme, re.M), f"{action} not in the README's reference table"


def test_the_tag_guard_example_in_the_readme_lints_clean() -> None:
    """The README's example that keeps the deploy target tag for administrators is a policy too."""
    from parliament import analyze_policy_string

    readme = (IAM / "README.md").read_text(encoding="utf-8")
    (example,) = re.findall(r"```json\n(.*?)```", readme, re.S)
    (statement,) = json.loads(example)["Statement"]
    assert statement["Effect"] == "Deny"
    assert sorted(as_list(statement["Action"])) == ["ec2:CreateTags", "ec2:DeleteTags"]
    assert statement["Condition"]["ForAnyValue:StringEquals"] == {"aws:TagKeys": [DEPLOY_TARGET_TAG[0]]}
    findings = analyze_policy_string(example, include_community_auditors=True).findings
    assert not findings, [(f.issue, f.detail) for f in findings]


def test_master_role_reads_the_staged_files_and_writes_only_its_progress() -> None:
    """It reads the staged files; its one write is live progress, on the progress folder only
    (test_live_progress_grants_only_its_folder)."""
    assert granted_actions(MASTER_POLICY) == {"s3:GetObject", "s3:ListBucket", "s3:PutObject"}


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
