"""HA K3s: several servers of one cluster, and a deploy that goes through one of them at a time.

Servers of one cluster carry the same value of the tag named by input `cluster-tag-key`
(default `k3s-cluster`); an instance without that tag is a cluster of its own. A cluster gets
the bundle through exactly one server: the first of its servers in the core ranking (SSM Online
first, then the oldest launch, then the lowest id). The other Online servers stand by.

When the chosen server does not take the command, the next one gets it: SSM says the first
never started it (DeliveryTimedOut, Undeliverable), or its agent lost its connection while the
command waited (the action then cancels the command and waits for SSM to confirm that it never
started). Only a command confirmed never started is passed on, so two servers of one cluster
never apply the same bundle at once. A command that did start stays where it is, whatever
happens to it next: the usual wait, report and rollback deal with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from deploykit import command, wait
from deploykit.errors import DeployError
from deploykit.target import ONLINE, Master, ssm_ping_status

# Statuses of a command that the agent has not picked up yet.
WAITING_FOR_AGENT = frozenset({"Pending", "Delayed"})
# While a command waits for its agent, how soon and how often the action asks SSM whether the
# server is still Online (DescribeInstanceInformation), rather than waiting out the whole
# delivery timeout (DELIVERY_TIMEOUT, 120 s) on a server that is gone.
PENDING_CHECK_AFTER = 5.0
PENDING_CHECK_EVERY = 5.0
# SSM reports DeliveryTimedOut a little after TimeoutSeconds.
DELIVERY_MARGIN = 30.0


def send_with_failover(
    ssm_send: Any,
    ssm: Any,
    master: Master,
    request: command.Request,
    comment: str,
    execution_timeout: int,
    log: Callable[[str], None],
    *,
    document: str = command.RUN_SHELL_SCRIPT,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> command.SentCommand:
    """Send the deploy through `master`, or through the next server of its cluster when the
    master does not take it. Without standby servers this is a plain send."""
    servers = master.failover_order
    for index, server in enumerate(servers):
        last = index == len(servers) - 1
        try:
            sent = command.send_command(
                ssm_send,
                ssm,
                server.instance_id,
                request,
                comment,
                execution_timeout,
                document=document,
                clock=clock,
                sleep=sleep,
            )
        except DeployError as exc:
            # SSM refused it for this server (its agent is not registered any more): nothing
            # was sent, so the next server may have it.
            if last or "InvalidInstanceId" not in exc.message:
                raise
            log(f"SSM refused the command for server {server.instance_id} ({exc.message}): failing over")
            continue
        if last:
            return sent
        taken = await_delivery(ssm, sent, log, clock=clock, sleep=sleep)
        if taken is None or not taken.never_started:
            return sent
        following = servers[index + 1]
        log(
            f"Server {server.instance_id} of cluster {master.cluster} did not take command "
            f"{sent.command_id} ({taken.status_details or taken.status}; nothing ran there): "
            f"failing over to {following.instance_id}"
        )
    raise AssertionError("unreachable: the last server returns")


def await_delivery(
    ssm: Any,
    sent: command.SentCommand,
    log: Callable[[str], None],
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> wait.Invocation | None:
    """Wait until the agent picked the command up (or SSM gave up on it); None when that is
    still not known at the delivery deadline. While the command waits, a server whose agent is
    no longer Online gets its command cancelled (it cannot run it anyway)."""
    next_check = sent.sent_at + PENDING_CHECK_AFTER
    cancelled = False

    def picked_up_or_over(invocation: wait.Invocation) -> bool:
        nonlocal next_check, cancelled
        if invocation.status not in WAITING_FOR_AGENT:
            return True
        if not cancelled and clock() >= next_check:
            next_check = clock() + PENDING_CHECK_EVERY
            if ping_status(ssm, sent.instance_id) != ONLINE:
                log(
                    f"Server {sent.instance_id} is no longer Online in SSM and has not taken command "
                    f"{sent.command_id}: cancelling it there"
                )
                try:
                    command.cancel(ssm, sent.command_id, sent.instance_id)
                    cancelled = True
                except DeployError as exc:
                    log(f"Could not cancel command {sent.command_id}: {exc.message}")
        return False

    deadline = sent.sent_at + command.DELIVERY_TIMEOUT + DELIVERY_MARGIN
    try:
        return wait.wait_for_command(
            ssm,
            sent.command_id,
            sent.instance_id,
            deadline,
            log,
            clock=clock,
            sleep=sleep,
            until=picked_up_or_over,
        )
    except wait.DeadlinePassed:
        return None


def ping_status(ssm: Any, instance_id: str) -> str:
    try:
        return ssm_ping_status(ssm, [instance_id]).get(instance_id, "")
    except DeployError:
        return ONLINE  # SSM does not answer: no reason to give up on the server
