"""The command lines sent through SSM Run Command (AWS-RunShellScript), and sending them.

AWS-RunShellScript joins the lines into one file and runs it with `sh` (dash on Ubuntu), so the
lines are plain POSIX sh. Every value in them is either made by the action (ids, sums, numbers)
or an input validated in inputs.py, and every one is quoted with shlex.quote all the same.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from deploykit.awsapi import aws_call, error_code
from deploykit.errors import AwsCallFailed
from deploykit.inputs import Settings
from deploykit.stage import Staging

SCRIPT_NAME = "k3s-deploy.sh"
BUNDLE_NAME = "manifests.tar.gz"
# Exit codes of the command lines themselves (the script's own are in its header).
EXIT_DOWNLOAD_FAILED = 90
EXIT_CHECKSUM_MISMATCH = 91
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


def deploy_script() -> bytes:
    return resources.files("deploykit").joinpath("scripts", SCRIPT_NAME).read_bytes()


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


def _common_flags(settings: Settings) -> list[str]:
    return [
        "--kubectl",
        _q(" ".join(settings.kubectl)),
        "--namespace",
        _q(settings.namespace),
        "--rollback-timeout",
        _q(settings.rollback_timeout),
        "--request-timeout",
        _q(settings.request_timeout),
        "--lock-timeout",
        _q(settings.lock_timeout),
    ]


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


def deploy_lines(
    settings: Settings,
    staging: Staging,
    deploy_id: str,
    script_sha256: str,
    bundle_sha256: str,
    urls: Mapping[str, str] | None = None,
) -> list[str]:
    """Download, verify, run, clean up, and exit with the script's code.

    With `urls` (presigned GET URLs by file name) the master fetches with curl instead of the
    AWS CLI. The URLs are secrets for their few minutes: never echoed (curl's errors name the
    host, not the URL), and the caller masks them in the log.
    """
    if urls is None:
        fetch = (
            'fetch() { aws s3api get-object --region "$region" --bucket "$bucket" --key "$1"'
            ' --expected-bucket-owner "$owner" "$2" >/dev/null'
            ' || { echo "k3s-deploy: could not download s3://$bucket/$1; the instance role needs'
            f' s3:GetObject on it" >&2; exit {EXIT_DOWNLOAD_FAILED}; }}; }}'
        )
        sources = {name: staging.key(name) for name in (SCRIPT_NAME, BUNDLE_NAME)}
    else:
        fetch = (
            "fetch() { curl --fail --silent --show-error --retry 3 --max-time 120"
            ' -H "x-amz-expected-bucket-owner: $owner" -o "$2" --url "$1"'
            ' || { echo "k3s-deploy: could not download $2 from its presigned URL (expired, or S3'
            f' not reachable from the master)" >&2; exit {EXIT_DOWNLOAD_FAILED}; }}; }}'
        )
        sources = {name: urls[name] for name in (SCRIPT_NAME, BUNDLE_NAME)}
    run = [
        "bash",
        f"./{SCRIPT_NAME}",
        "dry-run" if settings.dry_run else "deploy",
        "--bundle",
        BUNDLE_NAME,
        "--deploy-id",
        _q(deploy_id),
        "--timeout",
        _q(settings.timeout),
        "--rollback",
        _q(str(settings.rollback).lower()),
        "--validate",
        _q(str(settings.kubectl_validate).lower()),
        "--server-dry-run",
        _q(str(settings.server_dry_run).lower()),
        "--state-dir",
        STATE_DIR,
        "--commit",
        _q(settings.commit),
        "--run-url",
        _q(settings.run_url),
        *_common_flags(settings),
    ]
    return [
        "set -eu",
        "umask 077",
        # Named after the deploy and this shell's PID so that its rollback can delete it when a
        # SIGKILL (SSM's execution timeout, an agent restart) left no time for the EXIT trap,
        # and only then: a deploy still running (its cancel failed) keeps its files.
        f"id={_q(deploy_id)}",
        WORK_TAG,
        'work=$(mktemp -d "${TMPDIR:-/tmp}/k3s-deploy.$tag.$$.XXXXXXXX")',
        "trap 'rm -rf \"$work\"' EXIT",
        # sh runs an EXIT trap on `exit`, not when a signal kills it: a cancelled command (the
        # agent signals the process group) would leave the downloaded bundle behind.
        "trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM",
        'cd "$work"',
        # The script's own scratch folder (and kubectl's temporary files) go inside the download
        # folder: deleted with it on exit, and by the rollback command after a SIGKILL.
        'TMPDIR=$work',
        "export TMPDIR",
        f"region={_q(settings.aws_region)} bucket={_q(staging.bucket)} owner={_q(staging.account)}",
        fetch,
        f"fetch {_q(sources[SCRIPT_NAME])} {SCRIPT_NAME}",
        f"fetch {_q(sources[BUNDLE_NAME])} {BUNDLE_NAME}",
        f"printf '%s  %s\\n' {_q(script_sha256)} {SCRIPT_NAME} {_q(bundle_sha256)} {BUNDLE_NAME}"
        " > SHA256SUMS",
        "sha256sum -c --status SHA256SUMS || { echo 'k3s-deploy: sha256 mismatch: the staged "
        "files are not the ones this deploy uploaded; refusing to run them' >&2; "
        f"exit {EXIT_CHECKSUM_MISMATCH}; }}",
        "rc=0",
        " ".join(run) + " || rc=$?",
        f'[ "$rc" -ne {REBOOT_EXIT_CODE} ] || rc=1',
        'exit "$rc"',
    ]


def rollback_lines(settings: Settings, deploy_id: str) -> list[str]:
    """Run the rollback entry point of the copy the deploy left on the master.

    Needs nothing from S3: the deploy keeps its revisions and a copy of the script in the state
    folder until it is over. No folder means the deploy had not recorded anything yet, or it
    already finished (and rolled back when it had to).
    """
    run = [
        "bash",
        '"$dir/k3s-deploy.sh"',
        "rollback",
        "--deploy-id",
        _q(deploy_id),
        "--state-dir",
        STATE_DIR,
        *_common_flags(settings),
    ]
    return [
        "set -eu",
        f"id={_q(deploy_id)}",
        # The download folder of a deploy killed outright (see deploy_lines): deleted when the
        # shell that made it is gone. A deploy whose cancel failed may still run from it. It is
        # looked for after the rollback: a cancelled deploy may still be undoing its own
        # changes (holding the lock this rollback waits for) until the agent kills it.
        WORK_TAG,
        "sweep() {",
        '  for work in "${TMPDIR:-/tmp}/k3s-deploy.$tag."*; do',
        '    [ -d "$work" ] || continue',
        '    pid=${work##*/k3s-deploy."$tag".}; pid=${pid%%.*}',
        '    case "$pid" in ""|*[!0-9]*) ;; *) if kill -0 "$pid" 2>/dev/null; then continue; fi ;; esac',
        '    rm -rf -- "$work"',
        "  done",
        "}",
        f'dir={STATE_DIR}/"$id"',
        'if [ ! -f "$dir/k3s-deploy.sh" ]; then echo "k3s-deploy: nothing recorded for deploy'
        ' $id on this master: nothing to roll back"; sweep; exit 0; fi',
        "rc=0",
        " ".join(run) + " || rc=$?",
        "sweep",
        f'[ "$rc" -ne {REBOOT_EXIT_CODE} ] || rc=1',
        'exit "$rc"',
    ]


@dataclass(frozen=True)
class SentCommand:
    command_id: str
    instance_id: str
    sent_at: float  # monotonic clock
    execution_timeout: int


def send_lines(
    ssm_send: Any,
    ssm: Any,
    instance_id: str,
    lines: list[str],
    comment: str,
    execution_timeout: int,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    tries: int = 5,
) -> SentCommand:
    """SendCommand to one instance, never blindly re-sent (see send_request)."""
    command_id = send_request(
        ssm_send,
        ssm,
        {"InstanceIds": [instance_id], "TimeoutSeconds": DELIVERY_TIMEOUT},
        lines,
        comment,
        execution_timeout,
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
    lines: list[str],
    comment: str,
    execution_timeout: int,
    *,
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

    parameters = {"commands": lines, "executionTimeout": [str(execution_timeout)]}
    for attempt in range(1, tries + 1):
        try:
            with aws_call(f"send the deploy command to {what}", "ssm:SendCommand"):
                try:
                    response = ssm_send.send_command(
                        DocumentName="AWS-RunShellScript",
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
