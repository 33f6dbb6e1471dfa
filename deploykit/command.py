"""The command sent through SSM Run Command, and sending it.

The agent joins the lines into one file and runs it with `sh` (dash on Ubuntu), so the lines are
plain POSIX sh. Every value in them is made by the action (ids, sums, URLs) or an input
validated in inputs.py, and is either shell-quoted (AWS-RunShellScript) or checked by SSM
against the custom document's allowedPattern (input `ssm-document`).
"""

from __future__ import annotations

import os
import re
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from deploykit import contract
from deploykit.awsapi import aws_call, error_code
from deploykit.contract import EXIT_CHECKSUM_MISMATCH, EXIT_DOWNLOAD_FAILED
from deploykit.errors import AwsCallFailed, InputError
from deploykit.inputs import Settings
from deploykit.stage import Staging

SCRIPT_NAME = "k3s-deploy.sh"
BUNDLE_NAME = "manifests.tar.gz"
# The SSM agent treats 194 as "reboot now and run again": never let it through.
REBOOT_EXIT_CODE = 194
# A command not started within this many seconds is never run (SSM minimum: 30).
DELIVERY_TIMEOUT = 120
# SSM must never kill the script before its own deadline, rollback and cleanup have run.
EXECUTION_MARGIN = 60
# Lifetime of a presigned URL: the command starts within DELIVERY_TIMEOUT or never, and the
# downloads are its first lines.
PRESIGNED_URL_SECONDS = DELIVERY_TIMEOUT + 60
# After an ambiguous SendCommand failure, how many times ListCommands is asked (2 s apart).
AMBIGUOUS_LOOKS = 3
# The deploy id as it appears in the name of the download folder: file-name characters only.
WORK_TAG = "tag=$(printf '%s' \"$id\" | tr -c 'A-Za-z0-9._-' _)"
STATE_DIR = '"${K3S_DEPLOY_STATE_DIR:-/var/lib/k3s-deploy}"'


# -- the deploy script: parts joined into one file ----------------------------------------------
#
# The script is kept as parts a person can read in one sitting (scripts/k3s-deploy/NN-*.sh) and
# joined here, in name order, into the one file that is staged, hashed and run. A part's leading
# `# shellcheck` lines are for checking the part alone (it uses globals other parts declare):
# the join leaves them out, and the joined file is checked without them (make lint). The first
# part keeps the shebang and the header that lists the exit codes.

SCRIPT_PARTS = "k3s-deploy"
PART_NAME = re.compile(r"^[0-9]{2}-[a-z0-9-]+\.sh$")
_LINT_LINE = b"# shellcheck "
# Wide as the script's own `# -- section ---` lines.
_RULE_WIDTH = 95


def deploy_script_parts() -> list[tuple[str, bytes]]:
    """The parts in join order (name order), each as its file holds it. Any other file in the
    folder is an error, never silently left out."""
    folder = resources.files("deploykit").joinpath("scripts", SCRIPT_PARTS)
    parts = sorted((entry.name, entry.read_bytes()) for entry in folder.iterdir())
    for name, text in parts:
        if not PART_NAME.match(name):
            raise ValueError(f"{SCRIPT_PARTS}/{name}: not a part's name (NN-name.sh)")
        if not text.endswith(b"\n") or text.endswith(b"\n\n"):
            raise ValueError(f"{SCRIPT_PARTS}/{name}: must end with exactly one line break")
    if not parts or not parts[0][1].startswith(b"#!"):
        raise ValueError(f"{SCRIPT_PARTS}: the first part must start with the shebang")
    return parts


def part_marker(name: str) -> bytes:
    """The comment line the join puts before a part, naming the file to edit."""
    head = f"# == {SCRIPT_PARTS}/{name} "
    return (head + "=" * max(3, _RULE_WIDTH - len(head)) + "\n").encode()


def part_body(text: bytes) -> bytes:
    """A part without its leading `# shellcheck` lines (those are for checking it alone)."""
    lines = text.splitlines(keepends=True)
    while lines and lines[0].startswith(_LINT_LINE):
        lines.pop(0)
    return b"".join(lines)


def _banner(names: list[str]) -> bytes:
    lines = [f"# Generated: deploykit/command.py joins deploykit/scripts/{SCRIPT_PARTS}/ in name order;"]
    line = "# edit the parts, not this file. Parts:"
    for name in names:
        if len(line) + 1 + len(name) > _RULE_WIDTH:
            lines.append(line)
            line = "#  "
        line += " " + name
    lines.append(line)
    return "".join(f"{text}\n" for text in lines).encode()


def deploy_script() -> bytes:
    """The deploy script as the master gets it: the parts joined (same bytes on every call)."""
    parts = deploy_script_parts()
    first, rest = parts[0][1], parts[1:]
    shebang, header = first.split(b"\n", 1)
    joined = [shebang + b"\n", _banner([name for name, _ in parts]), header]
    for name, text in rest:
        # A blank line between parts, as between the script's sections.
        joined += [b"\n", part_marker(name), part_body(text)]
    return b"".join(joined)


def write_deploy_script(folder: str | os.PathLike[str]) -> Path:
    """Writes the joined script to FOLDER/k3s-deploy.sh (for running it by path: tests, lint)."""
    path = Path(folder) / SCRIPT_NAME
    path.write_bytes(deploy_script())
    return path


def execution_timeout(settings: Settings) -> int:
    """The deploy's run limit: waiting for the cluster's deploy lock, then its own budget, a
    rollback, and a margin (a dry run takes no lock and rolls nothing back)."""
    if settings.dry_run:
        return settings.timeout + EXECUTION_MARGIN
    return settings.lock_timeout + settings.timeout + settings.rollback_timeout + EXECUTION_MARGIN


def rollback_execution_timeout(settings: Settings) -> int:
    """The rollback command's run limit: it takes the deploy lock too."""
    return settings.lock_timeout + settings.rollback_timeout + EXECUTION_MARGIN


def _q(value: str | int) -> str:
    return shlex.quote(str(value))


# -- the command: one program for both ways of sending it ---------------------------------------
#
# The lines below are sent either as AWS-RunShellScript's `commands` (each value shell-quoted
# by the action) or stored once in a custom SSM Command document (input `ssm-document`), where
# SSM puts each parameter's value between the single quotes, after checking it against the
# parameter's allowedPattern or allowedValues. The patterns admit no quote, space, `$`,
# backquote, backslash or line break, so no value can leave its quotes, and with the document
# the deploy role can start this program and nothing else. Everything else the script needs
# (kubectl command, namespace, budgets, commit) travels in the bundle (bundle/options), which
# the program runs only after checking its sha256.

RUN_SHELL_SCRIPT = "AWS-RunShellScript"
# Bumped whenever the program or the parameters change; the document carries it as the only
# allowed value of `documentVersion`, and the action refuses a document with another one.
DOCUMENT_VERSION = "1"
DEPLOY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# Empty (not used by this entry point or delivery), or a presigned GET URL / a sha256 sum.
PRESIGNED_URL_PATTERN = r"^(https?://[A-Za-z0-9.:-]+/[A-Za-z0-9._~/%&=+?-]*)?$"
SHA256_PATTERN = r"^([0-9a-f]{64})?$"


@dataclass(frozen=True)
class Parameter:
    name: str  # the document's parameter
    variable: str  # the shell variable the program reads it into
    description: str
    pattern: str = ""  # allowedPattern
    values: tuple[str, ...] = ()  # allowedValues
    default: str | None = None  # None: required


PARAMETERS = (
    Parameter("entryPoint", "entry", "deploy, dry-run or rollback", values=("deploy", "dry-run", "rollback")),
    Parameter("deployId", "id", "the deploy's id (the action makes it)", pattern=DEPLOY_ID_PATTERN),
    Parameter(
        "delivery",
        "delivery",
        "how the master downloads the staged files",
        values=("s3", "presigned"),
        default="s3",
    ),
    Parameter(
        "region",
        "region",
        "the staging bucket's region",
        pattern=r"^([a-z]{2}(-[a-z]+)+-[0-9]{1,2})?$",
        default="",
    ),
    Parameter(
        "bucket", "bucket", "the staging bucket", pattern=r"^([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])?$", default=""
    ),
    Parameter(
        "bucketOwner", "owner", "the account that must own the bucket", pattern=r"^([0-9]{12})?$", default=""
    ),
    Parameter(
        "prefix",
        "prefix",
        "the staged files' key prefix in a bucket given with input `bucket`",
        pattern=r"^(k3s-deploy/[A-Za-z0-9][A-Za-z0-9._-]{0,127}/)?$",
        default="",
    ),
    Parameter(
        "scriptUrl",
        "script_url",
        "presigned GET URL of the script (delivery presigned)",
        pattern=PRESIGNED_URL_PATTERN,
        default="",
    ),
    Parameter(
        "bundleUrl",
        "bundle_url",
        "presigned GET URL of the bundle (delivery presigned)",
        pattern=PRESIGNED_URL_PATTERN,
        default="",
    ),
    Parameter(
        "scriptSha256", "script_sum", "sha256 of the staged script", pattern=SHA256_PATTERN, default=""
    ),
    Parameter(
        "bundleSha256", "bundle_sum", "sha256 of the staged bundle", pattern=SHA256_PATTERN, default=""
    ),
)
# Document-only parameters: the run limit (the document's timeoutSeconds) and its version.
EXECUTION_TIMEOUT_PARAMETER = Parameter(
    "executionTimeout",
    "",
    "the run limit in seconds (the action sets it)",
    pattern=r"^[0-9]{1,6}$",
    default="3600",
)
VERSION_PARAMETER = Parameter(
    "documentVersion",
    "",
    "the version of the action's command this document runs (the action checks it)",
    values=(DOCUMENT_VERSION,),
    default=DOCUMENT_VERSION,
)


def program(assignments: Mapping[str, str]) -> list[str]:
    """The command's lines, `assignments` giving each PARAMETERS variable's right-hand side."""
    fetch_s3 = (
        'fetch() { aws s3api get-object --region "$region" --bucket "$bucket" --key "$1"'
        ' --expected-bucket-owner "$owner" "$2" >/dev/null'
        ' || { echo "k3s-deploy: could not download s3://$bucket/$1; the instance role needs'
        f' s3:GetObject on it" >&2; exit {EXIT_DOWNLOAD_FAILED}; }}; }}'
    )
    # The URLs are secrets for their few minutes: never echoed (curl's errors name the host).
    fetch_url = (
        "fetch() { curl --fail --silent --show-error --retry 3 --max-time 120"
        ' -H "x-amz-expected-bucket-owner: $owner" -o "$2" --url "$1"'
        ' || { echo "k3s-deploy: could not download $2 from its presigned URL (expired, or S3'
        f' not reachable from the master)" >&2; exit {EXIT_DOWNLOAD_FAILED}; }}; }}'
    )
    return [
        "set -eu",
        "umask 077",
        *(f"{p.variable}={assignments[p.variable]}" for p in PARAMETERS),
        f"state={STATE_DIR}",
        WORK_TAG,
        # The download folder of a deploy killed outright (SSM's execution timeout, an agent
        # restart: no time for its EXIT trap) is named after the deploy and its shell's PID,
        # and deleted by the rollback when that shell is gone: a deploy whose cancel failed may
        # still run from it.
        "sweep() {",
        '  for work in "${TMPDIR:-/tmp}/k3s-deploy.$tag."*; do',
        '    [ -d "$work" ] || continue',
        '    pid=${work##*/k3s-deploy."$tag".}; pid=${pid%%.*}',
        '    case "$pid" in ""|*[!0-9]*) ;; *) if kill -0 "$pid" 2>/dev/null; then continue; fi ;; esac',
        '    rm -rf -- "$work"',
        "  done",
        "}",
        # The rollback runs the copy of the script (and the options) the deploy keeps in its
        # state folder until it is over: it needs nothing from S3. No folder means the deploy
        # had not recorded anything yet, or already finished (and rolled back when it had to).
        # The sweep comes after it: a cancelled deploy may still be undoing its own changes
        # (holding the lock this rollback waits for) until the agent kills it.
        'if [ "$entry" = rollback ]; then',
        '  if [ ! -f "$state/$id/k3s-deploy.sh" ]; then echo "k3s-deploy: nothing recorded for'
        ' deploy $id on this master: nothing to roll back"; sweep; exit 0; fi',
        "  rc=0",
        '  bash "$state/$id/k3s-deploy.sh" '
        + " ".join(contract.script_arguments("rollback", '"$id"', '"$state"'))
        + " || rc=$?",
        "  sweep",
        f'  [ "$rc" -ne {REBOOT_EXIT_CODE} ] || rc=1',
        '  exit "$rc"',
        "fi",
        'work=$(mktemp -d "${TMPDIR:-/tmp}/k3s-deploy.$tag.$$.XXXXXXXX")',
        "trap 'rm -rf \"$work\"' EXIT",
        # sh runs an EXIT trap on `exit`, not when a signal kills it: a cancelled command (the
        # agent signals the process group) would leave the downloaded bundle behind.
        "trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM",
        'cd "$work"',
        # The script's own scratch folder (and kubectl's temporary files) go inside the download
        # folder: deleted with it on exit, and by the rollback command after a SIGKILL.
        "TMPDIR=$work",
        "export TMPDIR",
        'if [ "$delivery" = presigned ]; then',
        fetch_url,
        f'fetch "$script_url" {SCRIPT_NAME}',
        f'fetch "$bundle_url" {BUNDLE_NAME}',
        "else",
        fetch_s3,
        f'fetch "${{prefix}}{SCRIPT_NAME}" {SCRIPT_NAME}',
        f'fetch "${{prefix}}{BUNDLE_NAME}" {BUNDLE_NAME}',
        "fi",
        f'printf \'%s  %s\\n\' "$script_sum" {SCRIPT_NAME} "$bundle_sum" {BUNDLE_NAME} > SHA256SUMS',
        "sha256sum -c --status SHA256SUMS || { echo 'k3s-deploy: sha256 mismatch: the staged "
        "files are not the ones this deploy uploaded; refusing to run them' >&2; "
        f"exit {EXIT_CHECKSUM_MISMATCH}; }}",
        "rc=0",
        f"bash ./{SCRIPT_NAME} "
        + " ".join(contract.script_arguments('"$entry"', '"$id"', '"$state"', BUNDLE_NAME))
        + " || rc=$?",
        f'[ "$rc" -ne {REBOOT_EXIT_CODE} ] || rc=1',
        'exit "$rc"',
    ]


@dataclass(frozen=True)
class Request:
    """What one SendCommand runs: the parameters' values."""

    values: Mapping[str, str]  # by parameter name

    def lines(self) -> list[str]:
        """The program with the values in it (AWS-RunShellScript's `commands`)."""
        return program({p.variable: _q(self.values.get(p.name, p.default or "")) for p in PARAMETERS})

    def send_parameters(self, document: str, execution_timeout: int) -> dict[str, list[str]]:
        """SendCommand's `Parameters` for `document`: the custom one's, or AWS-RunShellScript's."""
        timeout = [str(execution_timeout)]
        if document == RUN_SHELL_SCRIPT:
            return {"commands": self.lines(), "executionTimeout": timeout}
        given = {p.name: [self.values[p.name]] for p in PARAMETERS if self.values.get(p.name, "") != ""}
        return {
            **given,
            EXECUTION_TIMEOUT_PARAMETER.name: timeout,
            VERSION_PARAMETER.name: [DOCUMENT_VERSION],
        }


# The script prints the dry run's diff up to this size: SSM keeps 24,000 characters of its output,
# the local transport all of it.
LOCAL_MAX_DIFF_BYTES = 2_000_000


def bundle_options(settings: Settings) -> dict[str, str]:
    """The script's options (its NAME=VALUE `options` file in the bundle). Each value is one
    line: inputs.py validates each of them."""
    options = {
        "kubectl": " ".join(settings.kubectl),
        "namespace": settings.namespace,
        "timeout": str(settings.timeout),
        "rollback": str(settings.rollback).lower(),
        "rollback-timeout": str(settings.rollback_timeout),
        "lock-timeout": str(settings.lock_timeout),
        "server-dry-run": str(settings.server_dry_run).lower(),
        "request-timeout": settings.request_timeout,
        "validate": str(settings.kubectl_validate).lower(),
        "commit": settings.commit,
        "run-url": settings.run_url,
    }
    if settings.transport == "local":
        options["max-diff-bytes"] = str(LOCAL_MAX_DIFF_BYTES)
    if settings.prune != "false":  # only then: a bundle without prune is as it always was
        options["prune"] = settings.prune
        options["release"] = settings.release_id()
        options["release-name"] = settings.release
    return options


def presigned_urls(
    s3_presign: Any, staging: Staging, expires_in: int = PRESIGNED_URL_SECONDS
) -> dict[str, str]:
    """Short-lived SigV4 GET URLs of the staged files (input `delivery: presigned`): the master
    downloads them with curl and needs no S3 permission of its own. Signing is local (no call);
    the client must sign s3v4, virtual-hosted, in the bucket's region (awsapi.s3_presign)."""
    return {
        name: s3_presign.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": staging.bucket,
                "Key": staging.key(name),
                "ExpectedBucketOwner": staging.account,
            },
            ExpiresIn=expires_in,
        )
        for name in (SCRIPT_NAME, BUNDLE_NAME)
    }


def deploy_request(
    settings: Settings,
    staging: Staging,
    deploy_id: str,
    script_sha256: str,
    bundle_sha256: str,
    urls: Mapping[str, str] | None = None,
) -> Request:
    """Download, verify, run, clean up, and exit with the script's code.

    With `urls` (presigned GET URLs by file name) the master fetches with curl instead of the
    AWS CLI; the caller masks them in the log.
    """
    values = {
        "entryPoint": "dry-run" if settings.dry_run else "deploy",
        "deployId": deploy_id,
        "delivery": "presigned" if urls is not None else "s3",
        "region": settings.aws_region,
        "bucket": staging.bucket,
        "bucketOwner": staging.account,
        "prefix": staging.prefix,
        "scriptSha256": script_sha256,
        "bundleSha256": bundle_sha256,
    }
    if urls is not None:
        values |= {"scriptUrl": urls[SCRIPT_NAME], "bundleUrl": urls[BUNDLE_NAME]}
    return Request(values)


def deploy_lines(
    settings: Settings,
    staging: Staging,
    deploy_id: str,
    script_sha256: str,
    bundle_sha256: str,
    urls: Mapping[str, str] | None = None,
) -> list[str]:
    return deploy_request(settings, staging, deploy_id, script_sha256, bundle_sha256, urls).lines()


def rollback_request(deploy_id: str) -> Request:
    """Run the rollback entry point of the copy the deploy left on the master (with the options
    the deploy kept in its state folder)."""
    return Request({"entryPoint": "rollback", "deployId": deploy_id})


def rollback_lines(deploy_id: str) -> list[str]:
    return rollback_request(deploy_id).lines()


# -- the custom document ------------------------------------------------------------------------


def document_content() -> dict[str, Any]:
    """The custom SSM Command document (examples/iam/k3s-deploy-document.json is this)."""

    def declared(p: Parameter) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "String", "description": p.description}
        if p.values:
            out["allowedValues"] = list(p.values)
        else:
            out["allowedPattern"] = p.pattern
        if p.default is not None:
            out["default"] = p.default
        return out

    parameters = (*PARAMETERS, EXECUTION_TIMEOUT_PARAMETER, VERSION_PARAMETER)
    return {
        "schemaVersion": "2.2",
        "description": (
            f"k3s-deploy-action {DOCUMENT_VERSION}: runs one deploy, dry run or rollback that the "
            "action staged, after checking the staged files' sha256, and nothing else."
        ),
        "parameters": {p.name: declared(p) for p in parameters},
        "mainSteps": [
            {
                "action": "aws:runShellScript",
                "name": "k3sDeploy",
                "precondition": {"StringEquals": ["platformType", "Linux"]},
                "inputs": {
                    "timeoutSeconds": "{{ executionTimeout }}",
                    "runCommand": program({p.variable: f"'{{{{ {p.name} }}}}'" for p in PARAMETERS}),
                },
            }
        ],
    }


def check_document(ssm: Any, name: str) -> None:
    """Refuse a document that is not the one this version of the action was written for:
    DescribeDocument must show `documentVersion` with DOCUMENT_VERSION as its default."""
    where = "examples/iam/k3s-deploy-document.json (or the Terraform example's aws_ssm_document)"
    from botocore.exceptions import ClientError

    arn = f"the document's ARN (arn:aws:ssm:<region>:<account>:document/{name})"
    with aws_call(f"read SSM document {name}", "ssm:DescribeDocument", arn):
        try:
            described = ssm.describe_document(Name=name)["Document"]
        except ClientError as exc:
            if error_code(exc) != "InvalidDocument":
                raise
            raise InputError(
                f"SSM document {name} does not exist in this account and region (InvalidDocument)",
                fix=f"Create it from {where} (docs/iam-setup.md), or check input 'ssm-document' and "
                "the region.",
            ) from None
    found = {p.get("Name"): p.get("DefaultValue") for p in described.get("Parameters") or []}
    version = found.get(VERSION_PARAMETER.name)
    if version != DOCUMENT_VERSION:
        shown = "no documentVersion parameter" if version is None else f"documentVersion {version}"
        raise InputError(
            f"SSM document {name} is not the one this version of the action runs: it has {shown}, "
            f"this action needs documentVersion {DOCUMENT_VERSION}",
            fix=f"Update the document from {where} of the same release as the action, "
            "or remove input 'ssm-document' to use AWS-RunShellScript.",
        )
    if described.get("DocumentType") not in (None, "Command"):
        raise InputError(
            f"SSM document {name} is a {described.get('DocumentType')} document, not a Command document",
            fix=f"Create it from {where} with document type Command.",
        )


@dataclass(frozen=True)
class SentCommand:
    command_id: str
    instance_id: str
    sent_at: float  # monotonic clock
    execution_timeout: int


def send_command(
    ssm_send: Any,
    ssm: Any,
    instance_id: str,
    request: Request,
    comment: str,
    execution_timeout: int,
    *,
    document: str = RUN_SHELL_SCRIPT,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    tries: int = 5,
) -> SentCommand:
    """SendCommand to one instance, never blindly re-sent (see send_request)."""
    command_id = send_request(
        ssm_send,
        ssm,
        {"InstanceIds": [instance_id], "TimeoutSeconds": DELIVERY_TIMEOUT},
        request,
        comment,
        execution_timeout,
        document=document,
        what=instance_id,
        lookup_instance=instance_id,
        sleep=sleep,
        tries=tries,
    )
    return SentCommand(command_id, instance_id, clock(), execution_timeout)


def send_request(
    ssm_send: Any,
    ssm: Any,
    targets: Mapping[str, Any],
    request: Request,
    comment: str,
    execution_timeout: int,
    *,
    document: str = RUN_SHELL_SCRIPT,
    what: str,
    lookup_instance: str,
    sleep: Callable[[float], None] = time.sleep,
    tries: int = 5,
) -> str:
    """SendCommand (to `targets`: InstanceIds or Targets, TimeoutSeconds, and for a fleet
    MaxConcurrency / MaxErrors), never blindly re-sent (`tries` sends at most; 1 after a
    cancel). Returns the command id.

    `ssm_send` does not retry. Throttling means the request was refused, so it is safe to send
    again after a pause. A 5xx or a lost connection may or may not have started the command:
    look for our comment (it carries the deploy id) on `lookup_instance` before sending again.
    """
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    parameters = request.send_parameters(document, execution_timeout)
    for attempt in range(1, tries + 1):
        try:
            with aws_call(f"send the deploy command to {what}", "ssm:SendCommand"):
                try:
                    response = ssm_send.send_command(
                        DocumentName=document,
                        Comment=comment,
                        Parameters=parameters,
                        **targets,
                    )
                    return str(response["Command"]["CommandId"])
                except ClientError as exc:
                    code = error_code(exc)
                    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                    if code in ("ThrottlingException", "Throttling", "TooManyRequestsException"):
                        raise _Retry() from None
                    if status >= 500:
                        raise _Ambiguous() from None
                    raise
                except (ConnectionError, HTTPClientError):
                    # HTTPClientError: the connection closed or timed out after the request
                    # went out (ConnectionClosedError, ReadTimeoutError): it may have started.
                    raise _Ambiguous() from None
        except _Retry:
            pass
        except _Ambiguous:
            # ListCommands can lag behind a send that did go through: look a few times.
            for look in range(AMBIGUOUS_LOOKS):
                found = find_sent(ssm, lookup_instance, comment)
                if found:
                    return found
                if look < AMBIGUOUS_LOOKS - 1:
                    sleep(2)
        if attempt < tries:
            sleep(min(2**attempt, 10))
    raise AwsCallFailed(
        f"can't send the deploy command to {what}: SSM kept refusing it (throttled or "
        f"unavailable) after {tries} tries",
        fix="Run the deploy again in a few minutes.",
    )


class _Retry(Exception):
    pass


class _Ambiguous(Exception):
    pass


def find_sent(ssm: Any, instance_id: str, comment: str) -> str | None:
    """The id of a command we already sent to this instance with this comment, if any."""
    with aws_call("look for the deploy command already sent", "ssm:ListCommands"):
        for command in ssm.list_commands(InstanceId=instance_id).get("Commands", []):
            if command.get("Comment") == comment:
                return str(command["CommandId"])
    return None


def cancel(ssm: Any, command_id: str, instance_id: str) -> None:
    with aws_call(f"cancel command {command_id}", "ssm:CancelCommand"):
        ssm.cancel_command(CommandId=command_id, InstanceIds=[instance_id])
