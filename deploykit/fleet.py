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
from deploykit.awsapi import aws_call
from deploykit.contract import Status
from deploykit.errors import DeployError, RemoteCommandFailed, TargetNotFound
from deploykit.inputs import Settings
from deploykit.master import show_output
from deploykit.results import TargetResult
from deploykit.run import WAIT_MARGIN, Files, Run
from deploykit.target import ONLINE, Master, group_by_cluster, server_of, ssm_ping_status

BATCH_SIZE = 50  # SendCommand takes at most 50 InstanceIds
MAX_DELIVERY_TIMEOUT = 2_592_000  # SendCommand's TimeoutSeconds upper bound (30 days)
MAX_PRESIGNED_SECONDS = 604_800  # a SigV4 presigned URL lives 7 days at most
FULL_OUTPUT_LIMIT = 10  # failed instances whose whole output is read and shown in the log
UNREACHABLE_CHECK_EVERY = 10.0  # seconds between looks for HA servers that went away
COMMAND_TERMINAL = frozenset({"Success", "Failed", "Cancelled", "TimedOut"})
ALL_INSTANCES = "100%"


@dataclass
class Fleet:
    members: list[Master]  # one server per cluster, its Online peers in `standby`
    unreachable: list[Master]  # clusters with no server Online


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
# The transport, for a fleet


class FleetTransport:
    """Many clusters through SSM, one staged bundle for all (see transport.Transport)."""

    many = True
    failure = RemoteCommandFailed

    def __init__(self, run: Run) -> None:
        self.run = run
        self.fleet = Fleet([], [])
        self.results_: list[TargetResult] = []
        self.commands: list[FleetCommand] = []  # every deploy command sent, all rounds
        self.round: list[FleetCommand] = []  # the commands of the round being watched
        self.round_number = 0
        self.members: list[Master] = []  # the servers the round went to
        self.request_for: Callable[[int], command.Request] | None = None

    @property
    def stages(self) -> bool:
        return bool(self.fleet.members)  # nothing to stage when no cluster can take it

    def find_targets(self) -> None:
        settings = self.run.settings
        self.fleet = find_fleet(self.run.aws.ec2, self.run.aws.ssm, settings, self.run.gh.log)
        self.results_ = [_result_for(m) for m in self.fleet.members]
        for server in self.fleet.unreachable:
            result = _result_for(server)
            result.message = f"not Online in SSM ({server.ping_status or 'unknown to SSM'}); not sent"
            if settings.instance_ids:  # asked for by id: a failure; found by tag: not in the fleet
                self.results_.append(result)

    @property
    def targets(self) -> list[TargetResult]:
        return self.results_

    def candidates(self) -> list[str]:
        """Every server the deploy command may run on: each cluster's chosen one and standbys."""
        return [server.instance_id for m in self.fleet.members for server in m.failover_order]

    def send(self, files: Files, staging: stage.Staging | None) -> None:
        """Send to the chosen server of every cluster (wait() sends the failover rounds)."""
        if not self.fleet.members:
            return
        assert staging is not None
        run = self.run

        def request_for(count: int) -> command.Request:
            urls = _presigned(run, staging, count)
            return command.deploy_request(
                run.settings, staging, run.deploy_id, files.script_sum, files.bundle_sum, urls
            )

        self.request_for = request_for
        self.members = self.fleet.members
        self._send_round()

    def _send_round(self) -> None:
        assert self.request_for is not None
        run = self.run
        self.round_number += 1
        comment = f"k3s-deploy {run.deploy_id}" + (
            f" failover {self.round_number - 1}" if self.round_number > 1 else ""
        )
        ids = [m.instance_id for m in self.members]
        sent = send_to_fleet(run, ids, self.request_for(len(ids)), comment)
        self.commands.extend(sent)
        by_id = {r.instance_id: r for r in self.results_}
        for fleet_command in sent:
            for instance_id in fleet_command.instance_ids:
                by_id[instance_id].command_id = fleet_command.command_id
                by_id[instance_id].message = "sent"
                by_id[instance_id].sent = True
        self.round = sent

    def wait(self) -> None:
        """Wait for every command; a cluster whose server never took the command gets it
        through its next server in a new round, until none is left."""
        if not self.fleet.members:
            return
        run = self.run
        while True:
            standby = {m.instance_id: m for m in self.members if m.standby}
            wait_for_fleet(
                run.aws.ssm,
                self.round,
                run.settings,
                run.gh.log,
                standby,
                clock=run.clock.monotonic,
                sleep=run.clock.sleep,
                on_poll=run.progress.poll if run.progress else None,
            )
            if run.progress:
                run.progress.finish()
            by_id = {r.instance_id: r for r in self.results_}
            for fleet_command in self.round:
                for entry in list_invocations(run.aws.ssm, fleet_command.command_id):
                    result = by_id.get(entry["InstanceId"])
                    if result is None:  # not sent to it: SSM names only the instance ids given
                        continue
                    record_invocation(result, fleet_command.command_id, entry)
                    if fleet_command.hit_deadline and not result.reported and not result.never_started:
                        result.status = Status.TIMED_OUT
            self.members = _failovers(self.members, by_id, self.results_, run.gh.log)
            if not self.members:
                return
            self._send_round()

    def results(self) -> list[TargetResult]:
        if self.run.settings.dry_run:
            for result in self.results_:
                if result.status == Status.SUCCESS:
                    result.message = "dry run passed; nothing changed"
        _show_failed_output(self.run, self.results_)
        if self.run.progress:
            self.run.progress.warn_silent(
                r.instance_id for r in self.results_ if r.status == Status.SUCCESS and r.reported
            )
        return self.results_

    def roll_back(self, results: list[TargetResult]) -> None:
        """Send the rollback entry point to the instances whose script could not report, and
        wait for it."""
        run = self.run
        run.gh.log(
            f"Rolling back {len(results)} instance(s) whose deploy could not report: "
            + ", ".join(r.instance_id for r in results)
        )
        try:
            sent = send_to_fleet(
                run,
                [r.instance_id for r in results],
                command.rollback_request(run.deploy_id),
                f"k3s-deploy rollback {run.deploy_id}",
                execution_timeout=command.rollback_execution_timeout(run.settings),
                limits=(ALL_INSTANCES, ALL_INSTANCES),  # every instance rolls back, whatever the others do
            )
        except DeployError as exc:
            run.gh.warning(f"Could not send the rollback command: {exc.message}", title="Rollback not sent")
            return
        wait_for_fleet(
            run.aws.ssm, sent, run.settings, run.gh.log, clock=run.clock.monotonic, sleep=run.clock.sleep
        )
        by_id = {r.instance_id: r for r in results}
        for fleet_command in sent:
            for entry in list_invocations(run.aws.ssm, fleet_command.command_id):
                result = by_id.get(entry["InstanceId"])
                if result is None:
                    continue
                plugin = (entry.get("CommandPlugins") or [{}])[0]
                undone = int(plugin.get("ResponseCode", -1)) == contract.ROLLBACK_DONE
                result.undone(undone)
                if undone:
                    result.message += "; rolled back by the action"
                else:
                    result.message += f"; the action's rollback did not undo anything ({entry.get('Status')})"

    def cancel(self) -> None:
        """The job was cancelled: stop the commands still running and send the rollback to
        their instances, without waiting (the runner kills the step a few seconds from now).
        The rollback entry point undoes only what an unfinished deploy recorded, so it is
        harmless where the deploy had finished."""
        run = self.run
        running = [c for c in self.commands if not c.ended]
        for fleet_command in running:
            try:
                cancel_command(run.aws.ssm, fleet_command.command_id)
                run.gh.log(f"Cancelled command {fleet_command.command_id}")
            except DeployError as exc:
                run.gh.warning(f"Could not cancel command {fleet_command.command_id}: {exc.message}")
        instance_ids = [i for c in running for i in c.instance_ids]
        if not run.rolls_back or not instance_ids:
            return
        try:
            send_to_fleet(
                run,
                instance_ids,
                command.rollback_request(run.deploy_id),
                f"k3s-deploy rollback {run.deploy_id}",
                execution_timeout=command.rollback_execution_timeout(run.settings),
                limits=(ALL_INSTANCES, ALL_INSTANCES),
                tries=1,
                sleep=_no_sleep,
            )
            run.gh.log("Not waiting for the rollback: the job is being cancelled")
        except DeployError as exc:
            run.gh.warning(f"Could not send the rollback command: {exc.message}", title="Rollback not sent")

    def close(self) -> None:
        pass


def _no_sleep(seconds: float) -> None:
    pass


def _result_for(server: Master) -> TargetResult:
    return TargetResult(server.instance_id, server.name, server.cluster)


def _presigned(run: Run, staging: stage.Staging, count: int) -> dict[str, str] | None:
    """With `delivery: presigned`, URLs for one round: signed now (locally, no call), and valid
    until its last wave may start (the single-instance story's few minutes would not last).
    A URL signed with temporary credentials still dies with them."""
    settings = run.settings
    if settings.delivery != "presigned":
        return None
    lifetime = delivery_timeout(count, settings.max_concurrency, command.execution_timeout(settings))
    urls = command.presigned_urls(run.aws.s3_presign, staging, min(lifetime + 60, MAX_PRESIGNED_SECONDS))
    for url in urls.values():
        run.gh.mask(url)  # the runner hides them wherever they show up
    return urls


def _failovers(
    members: list[Master],
    by_id: dict[str, TargetResult],
    results: list[TargetResult],
    log: Callable[[str], None],
) -> list[Master]:
    following: list[Master] = []
    for member in members:
        result = by_id[member.instance_id]
        if not (result.never_started and member.standby):
            continue
        nxt = replace(member.standby[0], standby=member.standby[1:])
        result.status = Status.FAILED_OVER
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
    run: Run,
    instance_ids: list[str],
    request: command.Request,
    comment: str,
    *,
    execution_timeout: int | None = None,
    limits: tuple[str, str] | None = None,
    tries: int = 5,
    sleep: Callable[[float], None] | None = None,
) -> list[FleetCommand]:
    """SendCommand to the fleet by instance ids, one command per 50."""
    settings, aws, gh = run.settings, run.aws, run.gh
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
            sleep=sleep or run.clock.sleep,
            tries=tries,
        )
        sent.append(
            FleetCommand(command_id, list(chunk), label, run.clock.monotonic(), delivery, execution_timeout)
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
    on_poll: Callable[[], None] | None = None,
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
            on_poll=on_poll,
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


def record_invocation(result: TargetResult, command_id: str, entry: dict[str, Any]) -> None:
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
        result.status, result.message = Status.TIMED_OUT, f"still {status} at the deadline; cancelled"
        return
    if result.never_started:
        result.status = Status.FAILED
        result.message = f"the instance never took the command ({details or status}); nothing ran"
        return
    if status == "Success" and code == 0:
        result.status, result.message, result.reported = Status.SUCCESS, "every workload is ready", True
        return
    ended = contract.EXITS.get(code)
    if ended and ended.changed and status == "Failed":
        result.status, result.rolled_back = ended.status, ended.rolled_back
        result.message = ended.meaning
        result.reported = True
        return
    if contract.nothing_changed(code) and status == "Failed":
        result.status, result.reported = Status.FAILED, True
        result.message = contract.meaning(code)
        return
    # Stopped by SSM or someone, or died: the script could not say what it had changed.
    if status == "TimedOut":
        result.status, result.message = Status.TIMED_OUT, f"SSM stopped the command ({details or status})"
    else:
        result.status = Status.FAILED
        result.message = f"SSM says {status}" + (f" ({details})" if details and details != status else "")
        result.message += f", exit code {code}"


# --------------------------------------------------------------------------------------------
# After the wait


def _show_failed_output(run: Run, results: list[TargetResult]) -> None:
    """The whole output of the first failed instances (ListCommandInvocations cuts it at 2,500
    characters), and their own message from the script's report."""
    aws, gh = run.aws, run.gh
    failed = [r for r in results if r.status != Status.SUCCESS and r.command_id and not r.never_started]
    for result in failed[:FULL_OUTPUT_LIMIT]:
        try:
            with aws_call(f"read the output of command {result.command_id}", "ssm:GetCommandInvocation"):
                invocation = wait.get_invocation(aws.ssm, result.command_id, result.instance_id)
        except DeployError as exc:
            gh.warning(f"Could not read the output on {result.instance_id}: {exc.message}")
            continue
        found = report.parse_report(invocation.stderr)
        if found and found.get("message"):
            result.message = str(found["message"])
        show_output(gh, f"Output of the deploy on {result.instance_id} ({result.status})", invocation)
        if run.progress:
            run.progress.check_output(invocation.stdout)
    if len(failed) > FULL_OUTPUT_LIMIT:
        left_out = len(failed) - FULL_OUTPUT_LIMIT
        gh.log(f"Output of {left_out} more failed instance(s) left out; see Run Command")
