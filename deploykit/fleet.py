"""Fleet mode (input `fleet: true`): one deploy to many K3s clusters, fanned out by SSM.

The fleet is every running, SSM-online instance matching `instance-tag` (or every id listed in
`instance-id`), one server per cluster (ha.py: servers sharing a `cluster-tag-key` value are one
cluster). One staged bundle serves them all. SSM does the fan-out, with the `max-concurrency`
and `max-errors` inputs passed as MaxConcurrency / MaxErrors:

by instance ids, 50 to a command (SendCommand's limit; the limits then hold per command). Never
by tag (`Targets`): SSM would resolve the tag when it runs the command, so an instance tagged
after the action looked (by anyone who may tag instances) would get the script and its
presigned URLs too.

All commands are watched together: one ListCommands call per unfinished command per poll, on
the PollPolicy's schedule (wait.py), so the number of calls does not grow with the fleet. Once a
command has ended, ListCommandInvocations with Details gives each instance's status and exit
code; the deploy script's exit codes say what happened (docs/internals.md), so only the failed
instances' full output is read. Each failed instance rolled back on its own (the script does);
an instance whose script could not report (killed, stopped by SSM) gets the rollback command
from the action, as in the single-instance story. A cluster whose chosen server never took the
command gets it through its next server, in a new round.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from deploykit import command, contract, report, stage, wait
from deploykit.awsapi import AwsClients, aws_call
from deploykit.errors import DeployError, JobCancelled, RemoteCommandFailed, TargetNotFound
from deploykit.github import Workflow
from deploykit.ha import ONLINE, group_by_cluster
from deploykit.inputs import Settings
from deploykit.render import Bundle
from deploykit.report import Outcome
from deploykit.target import Master, server_of, ssm_ping_status

BATCH_SIZE = 50  # SendCommand takes at most 50 InstanceIds
MAX_DELIVERY_TIMEOUT = 2_592_000  # SendCommand's TimeoutSeconds upper bound (30 days)
MAX_PRESIGNED_SECONDS = 604_800  # a SigV4 presigned URL lives 7 days at most
FULL_OUTPUT_LIMIT = 10  # failed instances whose whole output is read and shown in the log
UNREACHABLE_CHECK_EVERY = 10.0  # seconds between looks for HA servers that went away
COMMAND_TERMINAL = frozenset({"Success", "Failed", "Cancelled", "TimedOut"})
ALL_INSTANCES = "100%"
FIX_FLEET = (
    "The results table in the step summary says what happened on each instance; the log has the "
    "output of the failed ones. Run the deploy again once they are fixed: the others are up to date."
)


@dataclass
class Fleet:
    members: list[Master]  # one server per cluster, its Online peers in `standby`
    unreachable: list[Master]  # clusters with no server Online


@dataclass
class InstanceResult:
    instance_id: str
    name: str
    cluster: str
    command_id: str = ""
    status: str = "failed"  # success, failed, rolled-back, timed-out, cancelled, failed-over
    rolled_back: bool = False
    exit_code: int | None = None
    ssm_status: str = ""
    message: str = "not sent"
    seconds: float | None = None
    never_started: bool = False
    reported: bool = False  # the deploy script itself said how it ended (its exit code)

    def as_output(self) -> dict[str, Any]:
        return {
            "instance-id": self.instance_id,
            "name": self.name,
            "cluster": self.cluster,
            "command-id": self.command_id,
            "status": self.status,
            "rolled-back": self.rolled_back,
            "exit-code": self.exit_code,
            "ssm-status": self.ssm_status,
            "seconds": None if self.seconds is None else round(self.seconds, 1),
            "message": self.message,
        }


@dataclass
class FleetCommand:
    command_id: str
    instance_ids: list[str]  # expected; a Targets command reports its own
    comment: str
    sent_at: float
    delivery_timeout: int
    execution_timeout: int
    ended: bool = False
    hit_deadline: bool = False  # still running at the deadline, and cancelled
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def deadline(self) -> float:
        from deploykit.deploy import WAIT_MARGIN

        return self.sent_at + self.delivery_timeout + self.execution_timeout + WAIT_MARGIN


# --------------------------------------------------------------------------------------------
# Finding the fleet


def find_fleet(ec2: Any, ssm: Any, settings: Settings, log: Callable[[str], None]) -> Fleet:
    key, pattern = settings.instance_tag_key, settings.instance_tag
    if settings.instance_ids:
        instances = _describe(ec2, {"InstanceIds": list(settings.instance_ids)}, "the instances given")
        where = "given by input 'instance-id'"
    else:
        # Every state but terminated: a stopped instance with the tag rules out Targets (SSM
        # would send it the command too); it is not part of the fleet.
        filters = [
            {"Name": f"tag:{key}", "Values": [pattern]},
            {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
        ]
        instances = _describe(ec2, {"Filters": filters}, f"instances with tag {key}={pattern}")
        where = f"with tag {key}={pattern}"
    running = [i for i in instances if i.get("State", {}).get("Name") == "running"]
    running_ids = {i["InstanceId"] for i in running}
    if not running and not settings.instance_ids:
        raise TargetNotFound(
            f"no running instance has tag {key}={pattern} in {settings.aws_region}",
            fix="Check the 'instance-tag' / 'instance-tag-key' inputs and the region, or give 'instance-id'.",
        )
    statuses = ssm_ping_status(ssm, [i["InstanceId"] for i in running]) if running else {}
    members: list[Master] = []
    unreachable: list[Master] = []
    clusters = group_by_cluster(instances, statuses, settings.cluster_tag_key)
    if settings.instance_ids:  # the order given is the order sent (a canary first, say)
        order = {instance_id: n for n, instance_id in enumerate(settings.instance_ids)}
        clusters.sort(key=lambda servers: min(order.get(s["InstanceId"], len(order)) for s in servers))
    for servers in clusters:
        online = [
            s for s in servers if s["InstanceId"] in running_ids and statuses.get(s["InstanceId"]) == ONLINE
        ]
        if not online:
            unreachable.append(server_of(servers[0], statuses, settings.cluster_tag_key))
            continue
        chosen = server_of(online[0], statuses, settings.cluster_tag_key)
        standby = tuple(server_of(s, statuses, settings.cluster_tag_key) for s in online[1:])
        members.append(replace(chosen, standby=standby))
    if not members and not settings.instance_ids:
        raise TargetNotFound(
            f"no instance with tag {key}={pattern} in {settings.aws_region} is running and Online in SSM",
            fix="On the masters: `sudo systemctl status amazon-ssm-agent`.",
        )
    fleet = Fleet(members, unreachable)
    _log_fleet(fleet, instances, where, settings, log)
    return fleet


def _describe(ec2: Any, query: dict[str, Any], what: str) -> list[dict[str, Any]]:
    from botocore.exceptions import ClientError

    found: list[dict[str, Any]] = []
    with aws_call(f"find {what} (ec2:DescribeInstances)", "ec2:DescribeInstances"):
        try:
            for page in ec2.get_paginator("describe_instances").paginate(**query):
                for reservation in page.get("Reservations", []):
                    found.extend(reservation.get("Instances", []))
        except ClientError as exc:
            if "NotFound" in str(exc.response.get("Error", {}).get("Code", "")):
                raise TargetNotFound(
                    f"input 'instance-id' names an instance that does not exist: "
                    f"{exc.response['Error'].get('Message', '')}",
                    fix="Check the ids in 'instance-id' and the region.",
                ) from None
            raise
    return [i for i in found if i.get("State", {}).get("Name") not in ("terminated", "shutting-down")]


def _log_fleet(
    fleet: Fleet, instances: list[dict[str, Any]], where: str, settings: Settings, log: Callable[[str], None]
) -> None:
    log(
        f"Fleet: {len(fleet.members)} cluster(s) through {len(fleet.members)} server(s), of "
        f"{len(instances)} instance(s) {where}"
    )
    for member in fleet.members:
        line = f"  {member.instance_id} ({member.name or 'no Name tag'})"
        if member.cluster:
            line += f", cluster {member.cluster}"
        if member.standby:
            line += f"; standing by: {', '.join(s.instance_id for s in member.standby)}"
        log(line)
    for server in fleet.unreachable:
        log(
            f"  not deployed: {server.instance_id} ({server.name or 'no Name tag'}"
            f"{', cluster ' + server.cluster if server.cluster else ''}): no server of it is running "
            f"and Online in SSM ({server.ping_status or 'unknown to SSM'})"
        )


# --------------------------------------------------------------------------------------------
# The story, for a fleet


def deploy_fleet(
    settings: Settings,
    aws: AwsClients,
    gh: Workflow,
    outcome: Outcome,
    clock: Any,
    deploy_id: str,
    bundle: Bundle,
) -> None:
    """Stage once, send to every cluster, wait for all, roll back what could not, report."""
    from deploykit import deploy as story

    fleet = find_fleet(aws.ec2, aws.ssm, settings, gh.log)
    results: list[InstanceResult] = [_result_for(m) for m in fleet.members]
    for server in fleet.unreachable:
        result = _result_for(server)
        result.message = f"not Online in SSM ({server.ping_status or 'unknown to SSM'}); not sent"
        if settings.instance_ids:  # asked for by id: a failure; found by tag: not in the fleet
            results.append(result)
    outcome.results = [r.as_output() for r in results]
    outcome.instance_id = ",".join(r.instance_id for r in results)

    staging: stage.Staging | None = None
    commands: list[FleetCommand] = []
    try:
        if fleet.members:
            account = stage.caller_account(aws.sts)
            staging = story._stage(settings, aws, gh, deploy_id, account, bundle, clock)
            outcome.bucket = staging.bucket
            script = command.deploy_script()
            stage.upload(aws.s3, staging, command.SCRIPT_NAME, script)
            stage.upload(aws.s3, staging, command.BUNDLE_NAME, bundle.data)
            sums = (story._sha256(script), bundle.sha256)

            def request_for(count: int) -> command.Request:
                return command.deploy_request(
                    settings, staging, deploy_id, *sums, _presigned(settings, aws, gh, staging, count)
                )

            _run_rounds(settings, aws, gh, outcome, clock, deploy_id, fleet, request_for, results, commands)
            if settings.dry_run:
                for result in results:
                    if result.status == "success":
                        result.message = "dry run passed; nothing changed"
        _roll_back_unreported(settings, aws, gh, clock, deploy_id, results)
        _show_failed_output(aws, gh, results)
    except JobCancelled:
        aws.hurry()
        outcome.status = "cancelled"
        outcome.message = "The job was cancelled."
        _abandon_on_cancel(settings, aws, gh, deploy_id, commands)
        raise
    finally:
        outcome.results = [r.as_output() for r in results]
        if staging is not None:
            story._clean_up(settings, aws, gh, staging)
    _conclude(outcome, results, dry_run=settings.dry_run)


def _result_for(server: Master) -> InstanceResult:
    return InstanceResult(server.instance_id, server.name, server.cluster)


def _run_rounds(
    settings: Settings,
    aws: AwsClients,
    gh: Workflow,
    outcome: Outcome,
    clock: Any,
    deploy_id: str,
    fleet: Fleet,
    request_for: Callable[[int], command.Request],
    results: list[InstanceResult],
    commands: list[FleetCommand],
) -> None:
    """Send to the chosen servers; a cluster whose server never took the command gets it
    through its next server in the next round, until none is left."""
    by_id = {r.instance_id: r for r in results}
    members = fleet.members
    round_number = 0
    while members:
        round_number += 1
        comment = f"k3s-deploy {deploy_id}" + (f" failover {round_number - 1}" if round_number > 1 else "")
        ids = [m.instance_id for m in members]
        sent = send_to_fleet(aws, gh, settings, ids, request_for(len(ids)), comment, clock)
        commands.extend(sent)
        outcome.command_id = ",".join(c.command_id for c in commands)
        for fleet_command in sent:
            for instance_id in fleet_command.instance_ids:
                by_id[instance_id].command_id = fleet_command.command_id
                by_id[instance_id].message = "sent"
        standby = {m.instance_id: m for m in members if m.standby}
        wait_for_fleet(aws.ssm, sent, settings, gh.log, standby, clock=clock.monotonic, sleep=clock.sleep)
        for fleet_command in sent:
            for entry in list_invocations(aws.ssm, fleet_command.command_id):
                result = by_id.get(entry["InstanceId"])
                if result is None:  # not sent to it: SSM names only the instance ids given
                    continue
                record_invocation(result, fleet_command.command_id, entry)
                if fleet_command.hit_deadline and not result.reported and not result.never_started:
                    result.status = "timed-out"
        members = _failovers(members, by_id, results, gh.log)


def _presigned(
    settings: Settings, aws: AwsClients, gh: Workflow, staging: stage.Staging, count: int
) -> dict[str, str] | None:
    """With `delivery: presigned`, URLs for one round: signed now (locally, no call), and valid
    until its last wave may start (the single-instance story's few minutes would not last).
    A URL signed with temporary credentials still dies with them."""
    if settings.delivery != "presigned":
        return None
    lifetime = delivery_timeout(count, settings.max_concurrency, command.execution_timeout(settings))
    urls = command.presigned_urls(aws.s3_presign, staging, min(lifetime + 60, MAX_PRESIGNED_SECONDS))
    for url in urls.values():
        gh.mask(url)  # the runner hides them wherever they show up
    return urls


def _failovers(
    members: list[Master],
    by_id: dict[str, InstanceResult],
    results: list[InstanceResult],
    log: Callable[[str], None],
) -> list[Master]:
    following: list[Master] = []
    for member in members:
        result = by_id[member.instance_id]
        if not (result.never_started and member.standby):
            continue
        nxt = replace(member.standby[0], standby=member.standby[1:])
        result.status = "failed-over"
        result.message = f"never took the command ({result.ssm_status}); deployed through {nxt.instance_id}"
        log(
            f"Server {member.instance_id} of cluster {member.cluster} never took the command "
            f"({result.ssm_status}; nothing ran there): failing over to {nxt.instance_id}"
        )
        following.append(nxt)
        by_id[nxt.instance_id] = _result_for(nxt)
        results.append(by_id[nxt.instance_id])
    return following


def send_to_fleet(
    aws: AwsClients,
    gh: Workflow,
    settings: Settings,
    instance_ids: list[str],
    request: command.Request,
    comment: str,
    clock: Any,
    *,
    execution_timeout: int | None = None,
    limits: tuple[str, str] | None = None,
    tries: int = 5,
) -> list[FleetCommand]:
    """SendCommand to the fleet by instance ids, one command per 50."""
    execution_timeout = execution_timeout or command.execution_timeout(settings)
    max_concurrency, max_errors = limits or (settings.max_concurrency, settings.max_errors)
    batches = [
        (chunk, {"InstanceIds": chunk})
        for chunk in (instance_ids[i : i + BATCH_SIZE] for i in range(0, len(instance_ids), BATCH_SIZE))
    ]
    sent: list[FleetCommand] = []
    for number, (chunk, where) in enumerate(batches, start=1):
        label = comment + (f" {number}/{len(batches)}" if len(batches) > 1 else "")
        delivery = delivery_timeout(len(chunk), max_concurrency, execution_timeout)
        targets = {
            **where,
            "TimeoutSeconds": delivery,
            "MaxConcurrency": max_concurrency,
            "MaxErrors": max_errors,
        }
        what = f"{len(chunk)} instance(s)" + (f" (batch {number}/{len(batches)})" if len(batches) > 1 else "")
        command_id = command.send_request(
            aws.ssm_send,
            aws.ssm,
            targets,
            request,
            label,
            execution_timeout,
            document=settings.ssm_document,
            what=what,
            lookup_instance=chunk[0],
            sleep=clock.sleep,
            tries=tries,
        )
        sent.append(
            FleetCommand(command_id, list(chunk), label, clock.monotonic(), delivery, execution_timeout)
        )
        gh.log(
            f"Sent command {command_id} to {what} by instance ids (max-concurrency {max_concurrency}, "
            f"max-errors {max_errors}); watch it at {report.console_url(settings.aws_region, command_id)}"
        )
    return sent


def concurrency_for(count: int, max_concurrency: str) -> int:
    """How many of `count` instances SSM runs at once for a MaxConcurrency value."""
    if max_concurrency.endswith("%"):
        return max(1, math.ceil(count * int(max_concurrency[:-1]) / 100))
    return max(1, min(count, int(max_concurrency)))


def delivery_timeout(count: int, max_concurrency: str, execution_timeout: int) -> int:
    """SendCommand's TimeoutSeconds: a command not started by then never runs, and with fewer
    slots than instances the last ones wait for earlier waves; they must not time out waiting."""
    waves = math.ceil(count / concurrency_for(count, max_concurrency))
    return min(command.DELIVERY_TIMEOUT + (waves - 1) * execution_timeout, MAX_DELIVERY_TIMEOUT)


# --------------------------------------------------------------------------------------------
# Waiting for all of it


def wait_for_fleet(
    ssm: Any,
    commands: list[FleetCommand],
    settings: Settings,
    log: Callable[[str], None],
    standby: dict[str, Master] | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Poll ListCommands for every unfinished command until all have ended. At the deadline the
    unfinished ones are cancelled (their instances are then rolled back like any instance whose
    script could not report)."""
    if not commands:
        return
    standby = standby or {}
    pending = {c.command_id: c for c in commands if not c.ended}
    deadline = max(c.deadline for c in commands)
    next_unreachable_check = clock() + UNREACHABLE_CHECK_EVERY
    single_wave = all(c.delivery_timeout == command.DELIVERY_TIMEOUT for c in commands)
    policy = wait.PollPolicy(deadline=float(settings.timeout) if single_wave else None)

    def ask() -> dict[str, dict[str, Any]]:
        states = {}
        for command_id in list(pending):
            listed = ssm.list_commands(CommandId=command_id).get("Commands", [])
            if listed:
                states[command_id] = listed[0]
        return states

    def all_ended(states: dict[str, dict[str, Any]]) -> bool:
        nonlocal next_unreachable_check
        for command_id, state in states.items():
            fleet_command = pending[command_id]
            fleet_command.counts = {
                "targets": int(state.get("TargetCount", 0)),
                "completed": int(state.get("CompletedCount", 0)),
                "errors": int(state.get("ErrorCount", 0)),
            }
            if state.get("Status") in COMMAND_TERMINAL:
                fleet_command.ended = True
                del pending[command_id]
        if pending and standby and clock() >= next_unreachable_check:
            next_unreachable_check = clock() + UNREACHABLE_CHECK_EVERY
            _cancel_where_unreachable(ssm, list(pending.values()), standby, log)
        return not pending

    def progress(elapsed: float, left: float, _: object) -> None:
        targets = sum(c.counts.get("targets", 0) for c in commands)
        done = sum(c.counts.get("completed", 0) for c in commands)
        errors = sum(c.counts.get("errors", 0) for c in commands)
        log(
            f"Waiting for {len(pending)} of {len(commands)} command(s): {done}/{targets or '?'} "
            f"instances done, {errors} failed, {elapsed:.0f} s elapsed, {left:.0f} s left"
        )

    try:
        wait.poll(
            ask,
            all_ended,
            deadline,
            what="read the status of the fleet's commands",
            permission="ssm:ListCommands",
            policy=policy,
            progress=progress,
            clock=clock,
            sleep=sleep,
            not_yet=frozenset({"InvalidCommandId"}),
        )
    except wait.DeadlinePassed:
        for fleet_command in list(pending.values()):
            log(f"Command {fleet_command.command_id} still running at the deadline: cancelling it")
            fleet_command.hit_deadline = True
            try:
                cancel_command(ssm, fleet_command.command_id)
            except DeployError as exc:
                log(f"Could not cancel command {fleet_command.command_id}: {exc.message}")


def _cancel_where_unreachable(
    ssm: Any, commands: list[FleetCommand], standby: dict[str, Master], log: Callable[[str], None]
) -> None:
    """Cancel the commands still waiting for an HA server whose agent went away, so that the
    cluster's next server can have it (ha.py)."""
    waiting: list[tuple[str, str]] = []
    for fleet_command in commands:
        for entry in list_invocations(ssm, fleet_command.command_id, details=False):
            if entry["InstanceId"] in standby and entry.get("Status") in ("Pending", "Delayed"):
                waiting.append((fleet_command.command_id, entry["InstanceId"]))
    if not waiting:
        return
    try:
        statuses = ssm_ping_status(ssm, [instance_id for _, instance_id in waiting])
    except DeployError:
        return
    for command_id, instance_id in waiting:
        if statuses.get(instance_id) != ONLINE:
            log(
                f"Server {instance_id} is no longer Online in SSM and has not taken command "
                f"{command_id}: cancelling it there"
            )
            try:
                command.cancel(ssm, command_id, instance_id)
            except DeployError as exc:
                log(f"Could not cancel command {command_id} on {instance_id}: {exc.message}")


def cancel_command(ssm: Any, command_id: str) -> None:
    """Cancel every invocation of a command."""
    with aws_call(f"cancel command {command_id}", "ssm:CancelCommand"):
        ssm.cancel_command(CommandId=command_id)


def list_invocations(ssm: Any, command_id: str, *, details: bool = True) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    with aws_call(f"read the results of command {command_id}", "ssm:ListCommandInvocations"):
        paginator = ssm.get_paginator("list_command_invocations")
        for page in paginator.paginate(CommandId=command_id, Details=details):
            entries.extend(page.get("CommandInvocations", []))
    return entries


def record_invocation(result: InstanceResult, command_id: str, entry: dict[str, Any]) -> None:
    """What one ListCommandInvocations entry (with Details) says about one instance."""
    plugin = (entry.get("CommandPlugins") or [{}])[0]
    code = int(plugin.get("ResponseCode", -1)) if plugin else -1
    started, finished = plugin.get("ResponseStartDateTime"), plugin.get("ResponseFinishDateTime")
    status, details = entry.get("Status", ""), entry.get("StatusDetails", "")
    result.command_id = command_id
    result.ssm_status = status if details in ("", status) else f"{status} ({details})"
    result.exit_code = code
    result.never_started = status in wait.TERMINAL and code == -1 and not isinstance(started, datetime)
    if isinstance(started, datetime) and isinstance(finished, datetime):
        result.seconds = (finished - started).total_seconds()
    if status not in wait.TERMINAL:
        result.status, result.message = "timed-out", f"still {status} at the deadline; cancelled"
        return
    if result.never_started:
        result.status = "failed"
        result.message = f"the instance never took the command ({details or status}); nothing ran"
        return
    if status == "Success" and code == 0:
        result.status, result.message, result.reported = "success", "every workload is ready", True
        return
    ended = contract.EXITS.get(code)
    if ended and ended.changed and status == "Failed":
        result.status, result.rolled_back = ended.status, ended.rolled_back
        result.message = ended.meaning
        result.reported = True
        return
    if contract.nothing_changed(code) and status == "Failed":
        result.status, result.reported = "failed", True
        result.message = contract.meaning(code)
        return
    # Stopped by SSM or someone, or died: the script could not say what it had changed.
    if status == "TimedOut":
        result.status, result.message = "timed-out", f"SSM stopped the command ({details or status})"
    else:
        result.status = "failed"
        result.message = f"SSM says {status}" + (f" ({details})" if details and details != status else "")
        result.message += f", exit code {code}"


# --------------------------------------------------------------------------------------------
# After the wait


def _roll_back_unreported(
    settings: Settings,
    aws: AwsClients,
    gh: Workflow,
    clock: Any,
    deploy_id: str,
    results: list[InstanceResult],
) -> None:
    """Send the rollback entry point to the instances whose script could not report."""
    if not settings.rollback or settings.dry_run:  # a dry run changes nothing
        return
    doomed = [
        r
        for r in results
        if r.command_id and not r.reported and not r.never_started and r.status in ("failed", "timed-out")
    ]
    if not doomed:
        return
    gh.log(
        f"Rolling back {len(doomed)} instance(s) whose deploy could not report: "
        + ", ".join(r.instance_id for r in doomed)
    )
    try:
        sent = send_to_fleet(
            aws,
            gh,
            settings,
            [r.instance_id for r in doomed],
            command.rollback_request(settings, deploy_id),
            f"k3s-deploy rollback {deploy_id}",
            clock,
            execution_timeout=command.rollback_execution_timeout(settings),
            limits=(ALL_INSTANCES, ALL_INSTANCES),  # every instance rolls back, whatever the others do
        )
    except DeployError as exc:
        gh.warning(f"Could not send the rollback command: {exc.message}", title="Rollback not sent")
        return
    wait_for_fleet(aws.ssm, sent, settings, gh.log, clock=clock.monotonic, sleep=clock.sleep)
    by_id = {r.instance_id: r for r in doomed}
    for fleet_command in sent:
        for entry in list_invocations(aws.ssm, fleet_command.command_id):
            result = by_id.get(entry["InstanceId"])
            if result is None:
                continue
            plugin = (entry.get("CommandPlugins") or [{}])[0]
            undone = int(plugin.get("ResponseCode", -1)) == contract.ROLLBACK_DONE
            result.rolled_back = undone
            if undone:
                if result.status == "failed":
                    result.status = "rolled-back"
                result.message += "; rolled back by the action"
            else:
                result.message += f"; the action's rollback did not undo anything ({entry.get('Status')})"


def _show_failed_output(aws: AwsClients, gh: Workflow, results: list[InstanceResult]) -> None:
    """The whole output of the first failed instances (ListCommandInvocations cuts it at 2,500
    characters), and their own message from the script's report."""
    failed = [r for r in results if r.status != "success" and r.command_id and not r.never_started]
    for result in failed[:FULL_OUTPUT_LIMIT]:
        try:
            with aws_call(f"read the output of command {result.command_id}", "ssm:GetCommandInvocation"):
                invocation = wait.get_invocation(aws.ssm, result.command_id, result.instance_id)
        except DeployError as exc:
            gh.warning(f"Could not read the output on {result.instance_id}: {exc.message}")
            continue
        found = report.parse_report(invocation.stderr)
        if found and found.get("message"):
            result.message = f"{found['message']}" + (
                "; rolled back by the action" if "rolled back by the action" in result.message else ""
            )
        with gh.group(f"Output of the deploy on {result.instance_id} ({result.status})"):
            gh.echo_untrusted(invocation.stdout)
            rest = report.strip_report(invocation.stderr)
            if rest.strip():
                gh.echo_untrusted(rest)
    if len(failed) > FULL_OUTPUT_LIMIT:
        left_out = len(failed) - FULL_OUTPUT_LIMIT
        gh.log(f"Output of {left_out} more failed instance(s) left out; see Run Command")


def _abandon_on_cancel(
    settings: Settings, aws: AwsClients, gh: Workflow, deploy_id: str, commands: list[FleetCommand]
) -> None:
    """The job was cancelled: stop the commands still running and send the rollback to their
    instances, without waiting (the runner kills the step a few seconds from now). The rollback
    entry point undoes only what an unfinished deploy recorded, so it is harmless where the
    deploy had finished."""
    running = [c for c in commands if not c.ended]
    for fleet_command in running:
        try:
            cancel_command(aws.ssm, fleet_command.command_id)
            gh.log(f"Cancelled command {fleet_command.command_id}")
        except DeployError as exc:
            gh.warning(f"Could not cancel command {fleet_command.command_id}: {exc.message}")
    instance_ids = [i for c in running for i in c.instance_ids]
    if not settings.rollback or settings.dry_run or not instance_ids:
        return
    try:
        send_to_fleet(
            aws,
            gh,
            settings,
            instance_ids,
            command.rollback_request(settings, deploy_id),
            f"k3s-deploy rollback {deploy_id}",
            _NoWait(),
            execution_timeout=command.rollback_execution_timeout(settings),
            limits=(ALL_INSTANCES, ALL_INSTANCES),
            tries=1,
        )
        gh.log("Not waiting for the rollback: the job is being cancelled")
    except DeployError as exc:
        gh.warning(f"Could not send the rollback command: {exc.message}", title="Rollback not sent")


class _NoWait:
    monotonic = staticmethod(time.monotonic)

    @staticmethod
    def sleep(seconds: float) -> None:
        pass


def _conclude(outcome: Outcome, results: list[InstanceResult], *, dry_run: bool = False) -> None:
    """`success` only when every instance succeeded; otherwise the worst of the others."""
    counted = [r for r in results if r.status != "failed-over"]
    outcome.results = [r.as_output() for r in results]
    failed = [r for r in counted if r.status != "success"]
    deployed = len(counted) - len(failed)
    if not counted:
        outcome.status, outcome.message = "failed", "No instance to deploy to."
        raise RemoteCommandFailed(outcome.message, fix=FIX_FLEET)
    if not failed:
        outcome.status = "success"
        outcome.message = (
            f"Dry run on all {len(counted)} instance(s): each cluster accepts the bundle; nothing changed."
            if dry_run
            else f"Deployed to all {len(counted)} instance(s); every workload is ready."
        )
        return
    statuses = {r.status for r in failed}
    outcome.status = next((s for s in ("cancelled", "failed", "timed-out") if s in statuses), "rolled-back")
    outcome.rolled_back = all(r.rolled_back for r in failed)
    outcome.message = (
        f"Deployed to {deployed} of {len(counted)} instance(s); "
        + "; ".join(f"{r.instance_id}: {r.status}" for r in failed[:10])
        + (f"; and {len(failed) - 10} more" if len(failed) > 10 else "")
        + "."
    )
    raise RemoteCommandFailed(outcome.message, fix=FIX_FLEET)
