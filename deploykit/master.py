"""Transport `ssm` to one master: the K3s master found by tag or id (with its HA cluster's
Online servers standing by, ha.py), one Run Command, its invocation watched until it ends."""

from __future__ import annotations

import time

from deploykit import command, contract, ha, report, stage, target, wait
from deploykit.contract import Status
from deploykit.errors import FIX_SSM_AGENT, FIX_TLS_TIMEOUT, DeployError, RemoteCommandFailed
from deploykit.github import Workflow
from deploykit.inputs import Settings
from deploykit.results import TargetResult, judge_report
from deploykit.run import WAIT_MARGIN, Files, Run


class OneMaster:
    """One master through SSM (see transport.Transport)."""

    stages = True
    many = False
    failure = RemoteCommandFailed

    def __init__(self, run: Run) -> None:
        self.run = run
        self.master: target.Master | None = None
        self.comment = f"k3s-deploy {run.deploy_id}"
        self.result = TargetResult("")
        self.sent: command.SentCommand | None = None
        self.sending = False  # SendCommand may be on its way: a cancel must look for it
        self.rolling_back = False  # the rollback command may be on its way
        self.invocation: wait.Invocation | None = None

    def find_targets(self) -> None:
        settings, aws = self.run.settings, self.run.aws
        # No EC2 client (its service model is the largest to load) when no discovery is needed.
        ec2 = None if settings.instance_id else aws.ec2
        self.master = target.find_master(ec2, aws.ssm, settings, self.run.gh.log)
        self.result.instance_id = self.master.instance_id

    @property
    def targets(self) -> list[TargetResult]:
        return [self.result]

    def send(self, files: Files, staging: stage.Staging | None) -> None:
        assert self.master is not None and staging is not None
        run, settings, aws, gh = self.run, self.run.settings, self.run.aws, self.run.gh
        urls = None
        if settings.delivery == "presigned":
            urls = command.presigned_urls(aws.s3_presign, staging)
            for url in urls.values():
                gh.mask(url)  # valid for minutes; the runner hides it wherever it shows up
        request = command.deploy_request(
            settings, staging, run.deploy_id, files.script_sum, files.bundle_sum, urls
        )
        self.sending = True
        # Through the master, or the next server of its HA cluster if it does not take it.
        self.sent = ha.send_with_failover(
            aws.ssm_send,
            aws.ssm,
            self.master,
            request,
            self.comment,
            command.execution_timeout(settings),
            gh.log,
            document=settings.ssm_document,
            clock=run.clock.monotonic,
            sleep=run.clock.sleep,
        )
        self.result.instance_id, self.result.command_id = self.sent.instance_id, self.sent.command_id
        self.result.sent = True
        gh.log(
            f"Sent command {self.sent.command_id} to {self.sent.instance_id}; watch it at "
            f"{report.console_url(settings.aws_region, self.sent.command_id)}"
        )

    def wait(self) -> None:
        assert self.sent is not None
        sent, settings, aws = self.sent, self.run.settings, self.run.aws
        deadline = sent.sent_at + command.DELIVERY_TIMEOUT + sent.execution_timeout + WAIT_MARGIN
        try:
            self.invocation = wait.wait_for_command(
                aws.ssm,
                sent.command_id,
                sent.instance_id,
                deadline,
                self.run.gh.log,
                clock=self.run.clock.monotonic,
                sleep=self.run.clock.sleep,
                # quick near the end the last deploy on this master suggests, and near the timeout
                policy=wait.PollPolicy(
                    wait.expected_from_history(aws.ssm, sent.instance_id, settings.ssm_document),
                    float(settings.timeout),
                ),
                on_poll=self.run.progress.poll if self.run.progress else None,
            )
            if self.run.progress:
                self.run.progress.finish()
        except wait.DeadlinePassed:
            self.result.status = Status.TIMED_OUT
            self.result.message = (
                f"The command was still running {deadline - sent.sent_at:.0f} s after it was sent; "
                "it was cancelled."
            )
            # SSM ends a command at its execution timeout by itself: one still running past it
            # is one whose agent stopped reporting.
            self.result.fix = FIX_SSM_AGENT
            self._cancel_command()

    def candidates(self) -> list[str]:
        """Every server the deploy command may run on: the master, then its HA standbys."""
        return [server.instance_id for server in self.master.failover_order] if self.master else []

    def results(self) -> list[TargetResult]:
        result, invocation = self.result, self.invocation
        if invocation is None:  # the deadline passed: cancelled, the script could not report
            return [result]
        gh = self.run.gh
        result.ssm_status, result.exit_code = invocation.status, invocation.response_code
        found = report.parse_report(invocation.stderr)
        show_output(gh, "Output of the deploy on the master", invocation)
        if self.run.progress:
            self.run.progress.check_output(invocation.stdout)
        for part in report.was_truncated(invocation.stdout, invocation.stderr):
            gh.warning(f"The master's {part} was cut by SSM.", title="Output truncated")
        result.report = found
        if self.run.settings.dry_run:
            result.diff = report.parse_diff(invocation.stdout)
        if invocation.status == "Success" and invocation.response_code == 0:
            result.status, result.reported = Status.SUCCESS, True
            result.message = str((found or {}).get("message") or "Every workload is ready.")
            return [result]
        result.fix = fix_for(self.run.settings, invocation)
        if found:
            judge_report(result, found, invocation.response_code)
            return [result]
        # The script did not get to report: it was killed, never started, or could not run.
        code = invocation.response_code
        result.never_started = code == -1 and invocation.status_details in (
            "DeliveryTimedOut",
            "Undeliverable",
        )
        if invocation.status == "TimedOut":
            result.status = Status.TIMED_OUT
            result.message = f"SSM stopped the command ({invocation.status_details or 'TimedOut'})."
        else:
            result.status = Status.FAILED
            result.message = f"SSM says {invocation.status}: {contract.meaning(code)}."
        if result.never_started:
            result.message = (
                f"The master did not pick up the command ({invocation.status_details}); nothing ran."
            )
        return [result]

    def roll_back(self, results: list[TargetResult]) -> None:
        for result in results:
            result.undone(self._remote_rollback(result.instance_id))

    def _remote_rollback(self, instance_id: str, *, wait_for_it: bool = True, tries: int = 5) -> bool:
        """Ask the master to undo what the deploy recorded. True when something was undone."""
        settings, aws, gh = self.run.settings, self.run.aws, self.run.gh
        request = command.rollback_request(self.run.deploy_id)
        timeout = command.rollback_execution_timeout(settings)
        self.rolling_back = True
        try:
            sent = command.send_command(
                aws.ssm_send,
                aws.ssm,
                instance_id,
                request,
                self._rollback_comment,
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

    @property
    def _rollback_comment(self) -> str:
        return f"k3s-deploy rollback {self.run.deploy_id}"

    def cancel(self) -> None:
        """The job was cancelled: stop the command and send the rollback, without waiting for
        anything (the runner kills the step a few seconds from now)."""
        if self.sent is None and self.sending:
            self.sent = self._find_in_flight()
            if self.sent is not None:
                self.result.instance_id, self.result.command_id = self.sent.instance_id, self.sent.command_id
                self.result.sent = True
        if self.sent is None:
            return
        sent, aws, gh = self.sent, self.run.aws, self.run.gh
        try:
            last: wait.Invocation | None = wait.get_invocation(aws.ssm, sent.command_id, sent.instance_id)
        except Exception:  # not visible yet, or SSM does not answer: act as if it still runs
            last = None
        if last is not None and last.ended and (last.status == "Success" or report.parse_report(last.stderr)):
            # The script finished on its own (and rolled back itself if it had to): leave it be.
            gh.log(f"Command {sent.command_id} had already ended ({last.status}): nothing to stop")
            return
        if last is None or not last.ended:
            self._cancel_command()
        if not self.run.rolls_back:
            return
        if self.rolling_back:
            # The deadline's own rollback was under way: never send a second one (undoing a
            # rollout twice would bring the failed one back).
            try:
                already = command.find_sent(aws.ssm, sent.instance_id, self._rollback_comment)
            except DeployError:
                already = None
            if already:
                gh.log(f"Rollback command {already} was already sent")
                return
        self._remote_rollback(sent.instance_id, wait_for_it=False, tries=1)
        gh.log("Not waiting for the rollback: the job is being cancelled")

    def _find_in_flight(self) -> command.SentCommand | None:
        """Cancelled while SendCommand was on its way: did it go out, and to which server? (Its
        comment says.) With HA standbys the send may have failed over: the last server tried
        comes first."""
        assert self.master is not None
        aws, gh = self.run.aws, self.run.gh
        for server in reversed(self.master.failover_order):
            try:
                found = command.find_sent(aws.ssm, server.instance_id, self.comment)
            except DeployError as exc:
                gh.warning(
                    f"Cancelled while sending the deploy command; could not check whether it went "
                    f"out ({exc.message}). Look for command '{self.comment}' on {server.instance_id} "
                    "in Run Command.",
                    title="Deploy command may be running",
                )
                return None
            if found is not None:
                return command.SentCommand(
                    found, server.instance_id, time.monotonic(), command.execution_timeout(self.run.settings)
                )
        return None

    def _cancel_command(self) -> None:
        """Cancel the command; a refusal is a warning (the rollback that follows still goes out)."""
        assert self.sent is not None
        sent, gh = self.sent, self.run.gh
        try:
            command.cancel(self.run.aws.ssm, sent.command_id, sent.instance_id)
            gh.log(f"Cancelled command {sent.command_id}")
        except DeployError as exc:
            gh.warning(f"Could not cancel command {sent.command_id}: {exc.message}")

    def close(self) -> None:
        pass


def fix_for(settings: Settings, invocation: wait.Invocation) -> str:
    """The advice for a deploy command that failed: by the script's exit code (contract.py),
    else by what its output shows."""
    text = invocation.stdout + invocation.stderr
    code = invocation.response_code
    if invocation.status_details in ("DeliveryTimedOut", "Undeliverable"):
        return FIX_SSM_AGENT
    if code == contract.EXIT_DOWNLOAD_FAILED:
        return fix_download(settings.delivery, settings.bucket)
    if contract.fix(code) is None and "TLS handshake timeout" in text:
        return FIX_TLS_TIMEOUT
    return contract.advice(code, text)


def fix_download(delivery: str, bucket: str | None) -> str:
    """The master could not fetch the staged files: what it needs depends on the delivery."""
    if delivery == "presigned":
        return (
            "With `delivery: presigned` the master downloads with curl over HTTPS: it needs curl "
            "and a route to S3 (a NAT gateway, or an S3 gateway endpoint); each URL is valid for "
            f"{command.PRESIGNED_URL_SECONDS} s."
        )
    bucket = bucket or f"{stage.BUCKET_PREFIX}*"
    return (
        f"Give the master's instance role s3:GetObject on arn:aws:s3:::{bucket}/* "
        "(see examples/iam/), and its subnet a route to S3."
    )


def show_output(gh: Workflow, title: str, invocation: wait.Invocation) -> None:
    """A deploy's output, fenced as untrusted, without its report."""
    with gh.group(title):
        gh.echo_untrusted(invocation.stdout)
        rest = report.strip_report(invocation.stderr)
        if rest.strip():
            gh.echo_untrusted(rest)
