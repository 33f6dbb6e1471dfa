"""The deploy, as one linear story: render, find the master, stage, run, wait, report, roll back,
clean up. Each step lives in the module named for it; this one only tells the story.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from deploykit import build, command, contract, ha, registry, report, stage, target, wait
from deploykit.awsapi import AwsClients
from deploykit.errors import (
    FIX_SSM_AGENT,
    FIX_TLS_TIMEOUT,
    DeployError,
    JobCancelled,
    RemoteCommandFailed,
    StagingError,
)
from deploykit.github import Workflow
from deploykit.inputs import Settings
from deploykit.render import Bundle, build_bundle
from deploykit.report import Outcome

# How long past the SSM execution timeout the action keeps waiting before it gives up on the
# command itself (the agent reports a kill a little late).
WAIT_MARGIN = 30


@dataclass
class Clock:
    """Time, injected so the tests run without waiting."""

    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    utcnow: Callable[[], datetime] = lambda: datetime.now(UTC)


def new_deploy_id(now: datetime) -> str:
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(4)}"


def deploy(
    settings: Settings, aws: AwsClients, gh: Workflow, outcome: Outcome, clock: Clock | None = None
) -> None:
    """Run the whole deploy; fills `outcome`; raises DeployError when the deploy fails."""
    clock = clock or Clock()
    deploy_id = new_deploy_id(clock.utcnow())
    outcome.dry_run = settings.dry_run
    bundle = build_bundle(
        settings.manifests, settings.workspace, settings.images, command.bundle_options(settings)
    )
    _log_bundle(gh, settings, bundle)
    # Images before any AWS change: a tag that was never pushed stops the deploy here, not as
    # pods in ImagePullBackOff minutes later.
    pushed = build.build_images(settings, gh)
    to_deploy = registry.images_in(bundle.manifests)
    outcome.images = registry.check_images(
        to_deploy, settings.registry, gh, verify=settings.verify_images, known=pushed
    )

    if settings.transport == "local":
        # The same script, run here against the job's kubeconfig: no AWS call at all.
        from deploykit.local import deploy_local

        deploy_local(settings, gh, outcome, deploy_id, bundle)
        return
    if settings.ssm_document != command.RUN_SHELL_SCRIPT:
        # Before anything is staged: a stale document would refuse the command's parameters.
        command.check_document(aws.ssm, settings.ssm_document)
    if settings.fleet:
        from deploykit.fleet import deploy_fleet

        deploy_fleet(settings, aws, gh, outcome, clock, deploy_id, bundle)
        return
    # No EC2 client (its service model is the largest to load) when no discovery is needed.
    master = target.find_master(None if settings.instance_id else aws.ec2, aws.ssm, settings, gh.log)
    outcome.instance_id = master.instance_id

    staging: stage.Staging | None = None
    sent: command.SentCommand | None = None
    comment = f"k3s-deploy {deploy_id}"
    sending = False
    try:
        account = stage.caller_account(aws.sts)
        staging = _stage(settings, aws, gh, deploy_id, account, bundle, clock)
        outcome.bucket = staging.bucket
        script = command.deploy_script()
        stage.upload(aws.s3, staging, command.SCRIPT_NAME, script)
        stage.upload(aws.s3, staging, command.BUNDLE_NAME, bundle.data)

        urls = None
        if settings.delivery == "presigned":
            urls = command.presigned_urls(aws.s3_presign, staging)
            for url in urls.values():
                gh.mask(url)  # valid for minutes; the runner hides it wherever it shows up
        request = command.deploy_request(settings, staging, deploy_id, _sha256(script), bundle.sha256, urls)
        sending = True
        # Through the master, or the next server of its HA cluster if it does not take it.
        sent = ha.send_with_failover(
            aws.ssm_send,
            aws.ssm,
            master,
            request,
            comment,
            command.execution_timeout(settings),
            gh.log,
            document=settings.ssm_document,
            clock=clock.monotonic,
            sleep=clock.sleep,
        )
        outcome.instance_id = sent.instance_id
        outcome.command_id = sent.command_id
        gh.log(
            f"Sent command {sent.command_id} to {sent.instance_id}; watch it at "
            f"{report.console_url(settings.aws_region, sent.command_id)}"
        )
        _finish(settings, aws, gh, outcome, deploy_id, sent, clock)
    except JobCancelled:
        # The runner kills the step about 10 s after its first signal: short timeouts from here.
        aws.hurry()
        timed_out = outcome.status == "timed-out"  # its own cancel and rollback may be under way
        outcome.status = "cancelled"
        outcome.message = "The job was cancelled."
        if sent is None and sending:
            # With HA standbys the send may have failed over: the last server tried comes first.
            servers = [server.instance_id for server in reversed(master.failover_order)]
            sent = _find_in_flight(settings, aws, gh, servers, comment)
            outcome.command_id = sent.command_id if sent else ""
            if sent is not None:
                outcome.instance_id = sent.instance_id
        if sent is not None:
            _abandon_on_cancel(settings, aws, gh, outcome, deploy_id, sent, timed_out=timed_out)
        raise
    finally:
        if staging is not None:
            _clean_up(settings, aws, gh, staging)


def _log_bundle(gh: Workflow, settings: Settings, bundle: Bundle) -> None:
    gh.log(
        f"Bundle: {len(bundle.manifests)} objects from "
        f"{settings.manifests.relative_to(settings.workspace).as_posix() or '.'}, "
        f"{len(bundle.workloads)} workloads to watch, {len(bundle.data):,} bytes, "
        f"sha256 {bundle.sha256[:16]}"
    )
    for ref in settings.images:
        gh.log(f"Pinned {ref.repository} to {ref}")


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _stage(
    settings: Settings,
    aws: AwsClients,
    gh: Workflow,
    deploy_id: str,
    account: str,
    bundle: Bundle,
    clock: Clock,
) -> stage.Staging:
    if settings.bucket:
        stage.check_given_bucket(aws.s3, settings.bucket, account)
        staging = stage.Staging(settings.bucket, f"{stage.PREFIX_ROOT}/{deploy_id}/", account, False)
    else:
        name = stage.new_bucket_name(clock.utcnow())
        # Recorded before creating it: the post-entrypoint deletes it if this run cannot.
        gh.save_state("bucket", name)
        staging = stage.Staging(name, "", account, True)
        try:
            stage.create_bucket(aws.s3, settings.aws_region, account, name, deploy_id, clock.utcnow())
        except StagingError:
            gh.save_state("bucket", "")  # the name was taken already: never touch that bucket
            raise
        except BaseException as exc:
            # Stopped half-way (a failed call, or a cancel): the bucket may exist, untagged.
            if isinstance(exc, JobCancelled):
                aws.hurry()
            _delete_half_made(aws, gh, staging)
            raise
    gh.save_state("prefix", staging.prefix)
    gh.log(f"Staging in {staging.where()}")
    return staging


def _finish(
    settings: Settings,
    aws: AwsClients,
    gh: Workflow,
    outcome: Outcome,
    deploy_id: str,
    sent: command.SentCommand,
    clock: Clock,
) -> None:
    deadline = sent.sent_at + command.DELIVERY_TIMEOUT + sent.execution_timeout + WAIT_MARGIN
    try:
        invocation = wait.wait_for_command(
            aws.ssm,
            sent.command_id,
            sent.instance_id,
            deadline,
            gh.log,
            clock=clock.monotonic,
            sleep=clock.sleep,
            # quick near the end the last deploy on this master suggests, and near the timeout
            policy=wait.PollPolicy(
                wait.expected_from_history(aws.ssm, sent.instance_id, settings.ssm_document),
                float(settings.timeout),
            ),
        )
    except wait.DeadlinePassed:
        outcome.status = "timed-out"
        outcome.message = (
            f"The command was still running {deadline - sent.sent_at:.0f} s after it was sent; "
            "it was cancelled."
        )
        _abandon(settings, aws, gh, outcome, deploy_id, sent, wait_for_rollback=True)
        # SSM ends a command at its execution timeout by itself: one still running past it is
        # one whose agent stopped reporting.
        raise RemoteCommandFailed(outcome.message, fix=FIX_SSM_AGENT) from None

    found = report.parse_report(invocation.stderr)
    _show_output(gh, invocation)
    outcome.report = found
    if settings.dry_run:
        outcome.diff = report.parse_diff(invocation.stdout)
    if invocation.status == "Success" and invocation.response_code == 0:
        outcome.status = "success"
        outcome.message = str((found or {}).get("message") or "Every workload is ready.")
        return

    if found:
        report.conclude(outcome, found, invocation.response_code)
    else:
        _conclude_without_report(settings, aws, gh, outcome, deploy_id, sent, invocation)
    raise RemoteCommandFailed(outcome.message, fix=_fix_for(settings, invocation))


def _conclude_without_report(
    settings: Settings,
    aws: AwsClients,
    gh: Workflow,
    outcome: Outcome,
    deploy_id: str,
    sent: command.SentCommand,
    invocation: wait.Invocation,
) -> None:
    """The script did not get to report: it was killed, never started, or could not run."""
    code = invocation.response_code
    never_started = code == -1 and invocation.status_details in ("DeliveryTimedOut", "Undeliverable")
    if invocation.status == "TimedOut":
        outcome.status = "timed-out"
        outcome.message = f"SSM stopped the command ({invocation.status_details or 'TimedOut'})."
    else:
        meaning = contract.meaning(code)
        outcome.status = "failed"
        outcome.message = f"SSM says {invocation.status}: {meaning}."
    if never_started:
        outcome.message = (
            f"The master did not pick up the command ({invocation.status_details}); nothing ran."
        )
        return
    if _rolls_back(settings) and not contract.nothing_changed(code):
        outcome.rolled_back = _remote_rollback(settings, aws, gh, deploy_id, sent.instance_id)
        if outcome.rolled_back and outcome.status == "failed":
            outcome.status = "rolled-back"


def _remote_rollback(
    settings: Settings,
    aws: AwsClients,
    gh: Workflow,
    deploy_id: str,
    instance_id: str,
    *,
    wait_for_it: bool = True,
    tries: int = 5,
) -> bool:
    """Ask the master to undo what the deploy recorded. True when something was undone."""
    request = command.rollback_request(settings, deploy_id)
    timeout = command.rollback_execution_timeout(settings)
    try:
        sent = command.send_command(
            aws.ssm_send,
            aws.ssm,
            instance_id,
            request,
            _rollback_comment(deploy_id),
            timeout,
            document=settings.ssm_document,
            tries=tries,
        )
    except DeployError as exc:
        gh.warning(f"Could not send the rollback command: {exc.message}", title="Rollback not sent")
        return False
    gh.log(f"Sent rollback command {sent.command_id} to {instance_id}")
    if not wait_for_it:
        return False
    try:
        invocation = wait.wait_for_command(
            aws.ssm,
            sent.command_id,
            instance_id,
            sent.sent_at + command.DELIVERY_TIMEOUT + timeout + WAIT_MARGIN,
            gh.log,
        )
    except (wait.DeadlinePassed, DeployError):
        gh.warning("The rollback command did not finish in time.", title="Rollback unconfirmed")
        return False
    with gh.group("Output of the rollback on the master"):
        gh.echo_untrusted(invocation.stdout)
    found = report.parse_report(invocation.stderr)
    return bool(found and found.get("rollback") == "done")


def _rolls_back(settings: Settings) -> bool:
    """A dry run changes nothing, so there is never anything to roll back after one."""
    return settings.rollback and not settings.dry_run


def _rollback_comment(deploy_id: str) -> str:
    return f"k3s-deploy rollback {deploy_id}"


def _find_in_flight(
    settings: Settings, aws: AwsClients, gh: Workflow, instance_ids: list[str], comment: str
) -> command.SentCommand | None:
    """Cancelled while SendCommand was on its way: did it go out, and to which server? (Its
    comment says.) The first of `instance_ids` that has it wins."""
    for instance_id in instance_ids:
        try:
            found = command.find_sent(aws.ssm, instance_id, comment)
        except DeployError as exc:
            gh.warning(
                f"Cancelled while sending the deploy command; could not check whether it went out "
                f"({exc.message}). Look for command '{comment}' on {instance_id} in Run Command.",
                title="Deploy command may be running",
            )
            return None
        if found is not None:
            return command.SentCommand(
                found, instance_id, time.monotonic(), command.execution_timeout(settings)
            )
    return None


def _abandon_on_cancel(
    settings: Settings,
    aws: AwsClients,
    gh: Workflow,
    outcome: Outcome,
    deploy_id: str,
    sent: command.SentCommand,
    *,
    timed_out: bool,
) -> None:
    """The job was cancelled after the deploy command went out: stop it and send the rollback,
    without waiting for anything (the runner kills the step a few seconds from now)."""
    try:
        last: wait.Invocation | None = wait.get_invocation(aws.ssm, sent.command_id, sent.instance_id)
    except Exception:  # not visible yet, or SSM does not answer: act as if it still runs
        last = None
    if last is not None and last.ended and (last.status == "Success" or report.parse_report(last.stderr)):
        # The script finished on its own (and rolled back itself if it had to): leave it be.
        gh.log(f"Command {sent.command_id} had already ended ({last.status}): nothing to stop")
        return
    if last is None or not last.ended:
        _cancel(aws, gh, sent)
    if not _rolls_back(settings):
        return
    if timed_out:
        # The deadline's own clean-up was under way: never send a second rollback (undoing a
        # rollout twice would bring the failed one back).
        try:
            already = command.find_sent(aws.ssm, sent.instance_id, _rollback_comment(deploy_id))
        except DeployError:
            already = None
        if already:
            gh.log(f"Rollback command {already} was already sent")
            return
    _remote_rollback(settings, aws, gh, deploy_id, sent.instance_id, wait_for_it=False, tries=1)
    gh.log("Not waiting for the rollback: the job is being cancelled")


def _abandon(
    settings: Settings,
    aws: AwsClients,
    gh: Workflow,
    outcome: Outcome,
    deploy_id: str,
    sent: command.SentCommand,
    *,
    wait_for_rollback: bool = False,
) -> None:
    """Stop the command and, when asked to, undo what it may have changed."""
    _cancel(aws, gh, sent)
    if _rolls_back(settings):
        outcome.rolled_back = _remote_rollback(
            settings, aws, gh, deploy_id, sent.instance_id, wait_for_it=wait_for_rollback
        )


def _cancel(aws: AwsClients, gh: Workflow, sent: command.SentCommand) -> None:
    """Cancel the command; a refusal is a warning (the rollback that follows still goes out)."""
    try:
        command.cancel(aws.ssm, sent.command_id, sent.instance_id)
        gh.log(f"Cancelled command {sent.command_id}")
    except DeployError as exc:
        gh.warning(f"Could not cancel command {sent.command_id}: {exc.message}")


def _show_output(gh: Workflow, invocation: wait.Invocation) -> None:
    with gh.group("Output of the deploy on the master"):
        gh.echo_untrusted(invocation.stdout)
        rest = report.strip_report(invocation.stderr)
        if rest.strip():
            gh.echo_untrusted(rest)
    for part in report.was_truncated(invocation.stdout, invocation.stderr):
        gh.warning(f"The master's {part} was cut by SSM.", title="Output truncated")


def _fix_for(settings: Settings, invocation: wait.Invocation) -> str:
    """The advice for a deploy command that failed: by the script's exit code (see the header
    of the deploy script, deploykit/scripts/k3s-deploy/00-header.sh), else by what its output shows."""
    text = invocation.stdout + invocation.stderr
    code = invocation.response_code
    if invocation.status_details in ("DeliveryTimedOut", "Undeliverable"):
        return FIX_SSM_AGENT
    if code == contract.EXIT_DOWNLOAD_FAILED:
        return _fix_download(settings)
    if contract.fix(code) is None and "TLS handshake timeout" in text:
        return FIX_TLS_TIMEOUT
    return contract.advice(code, text)


def _fix_download(settings: Settings) -> str:
    """The master could not fetch the staged files: what it needs depends on the delivery."""
    if settings.delivery == "presigned":
        return (
            "With `delivery: presigned` the master downloads with curl over HTTPS: it needs curl "
            "and a route to S3 (a NAT gateway, or an S3 gateway endpoint); each URL is valid for "
            f"{command.PRESIGNED_URL_SECONDS} s."
        )
    bucket = settings.bucket or f"{stage.BUCKET_PREFIX}*"
    return (
        f"Give the master's instance role s3:GetObject on arn:aws:s3:::{bucket}/* "
        "(see examples/iam/), and its subnet a route to S3."
    )


def _clean_up(settings: Settings, aws: AwsClients, gh: Workflow, staging: stage.Staging) -> None:
    if not settings.cleanup:
        gh.log(f"Leaving {staging.where()} in place (input 'cleanup' is false)")
        return
    cancelled: JobCancelled | None = None
    try:
        try:
            stage.delete_staged(aws.s3, staging)
        except JobCancelled as exc:
            # Cancelled while deleting: finish it (later signals are ignored), then stop.
            cancelled = exc
            aws.hurry()
            stage.delete_staged(aws.s3, staging)
        gh.log(f"Deleted {staging.where()}")
        # Nothing left for the post-entrypoint to delete.
        gh.save_state("bucket", "")
        gh.save_state("prefix", "")
    except DeployError as exc:
        gh.warning(
            f"{exc.message}. Left behind: {staging.where()}; delete it by hand or with "
            f"`python -m deploykit sweep --delete`." + (f" {exc.fix}" if exc.fix else ""),
            title="Cleanup incomplete",
        )
    if cancelled is not None:
        raise cancelled


def _delete_half_made(aws: AwsClients, gh: Workflow, staging: stage.Staging) -> None:
    """Delete a bucket whose creation did not finish (ExpectedBucketOwner: only ours)."""
    try:
        stage.delete_staged(aws.s3, staging)
    except DeployError as exc:
        gh.warning(
            f"Creating bucket {staging.bucket} did not finish and it could not be deleted "
            f"({exc.message}); if it exists, delete it by hand.",
            title="Cleanup incomplete",
        )
