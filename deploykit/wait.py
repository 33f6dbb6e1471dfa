"""Wait for SSM commands to end, asking as little as possible and noticing the end quickly.

When to ask next is the `PollPolicy`'s decision, from the time since the command was sent:

- every second for the first half minute: short deploys and early failures (download, checksum,
  API check, a bundle the cluster refuses) end there;
- every second near the expected end: the previous deploy's run time on this master when SSM
  still has it (`expected_from_history`), and the script's own deadline (input `timeout`);
- every 1.5 s in between, or every 3 s while a known expected end is still far away: a long
  deploy does not spend one call a second for minutes, and an unexpected end is still seen
  within 1.5 s (the benchmark's p95 target) when nothing better is known;
- never more than one call a second per command, and throttling widens the interval
  (doubling, up to 10 s) until SSM answers again.

The original pipeline polled every 10 s (5 s lost on average). Right after SendCommand the
invocation may not exist yet (eventual consistency); that answer is retried for a bounded window
only, since a wrong instance id gives the same error. Time is injected so the tests run without
sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

from deploykit.awsapi import aws_call, error_code

TERMINAL = frozenset({"Success", "Failed", "Cancelled", "TimedOut"})
NOT_FOUND_WINDOW = 20.0  # seconds InvocationDoesNotExist is taken as "not yet"
PROGRESS_EVERY = 15.0
FAST_PHASE = 30.0  # seconds of 1 s polling after the send
FAST_INTERVAL = 1.0  # the floor: about one call a second per command at most
MAX_INTERVAL = 1.5  # the middle of a wait with no better idea of its end
SLOW_INTERVAL = 3.0  # the middle of a wait whose expected end is still FAR_FROM_END away
FAR_FROM_END = 30.0
THROTTLED_MAX_INTERVAL = 10.0
_THROTTLING = {"ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded"}
# How many earlier invocations on the master are read to find the last deploy's run time.
HISTORY_LOOKBACK = 20
DEPLOY_COMMENT = "k3s-deploy "
ROLLBACK_COMMENT = "k3s-deploy rollback "

T = TypeVar("T")


@dataclass(frozen=True)
class PollPolicy:
    """The interval between two questions to SSM about one command.

    `expected` is how long the command should take (seconds after the send), when known;
    `deadline` is when the script's own budget runs out. Around both the policy asks every
    second, since that is when the end is likely; far from them it asks less often.
    """

    expected: float | None = None
    deadline: float | None = None

    def interval(self, elapsed: float, throttled: int = 0) -> float:
        base = self._base(elapsed)
        if throttled:
            return min(max(base, FAST_INTERVAL) * 2**throttled, THROTTLED_MAX_INTERVAL)
        return base

    def _base(self, elapsed: float) -> float:
        if elapsed < FAST_PHASE:
            return FAST_INTERVAL
        ends = [end for end in (self.expected, self.deadline) if end is not None]
        if any(_near(elapsed, end) for end in ends):
            return FAST_INTERVAL
        if self.expected is not None and self.expected - elapsed > FAR_FROM_END:
            return SLOW_INTERVAL
        return MAX_INTERVAL


def _near(elapsed: float, end: float) -> bool:
    """Within the window around an expected end: a little before it, longer after it (a deploy
    rarely beats its usual time by much, but often runs a bit over)."""
    before = max(5.0, 0.15 * end)
    after = max(10.0, 0.25 * end)
    return end - before <= elapsed <= end + after


@dataclass(frozen=True)
class FixedPolicy:
    """A fixed interval, as the original pipeline's `sleep 10` loop (the benchmark's baseline)."""

    seconds: float

    def interval(self, elapsed: float, throttled: int = 0) -> float:
        return self.seconds


class Policy(Protocol):
    def interval(self, elapsed: float, throttled: int = 0) -> float: ...


def next_interval(elapsed: float, throttled: int) -> float:
    """The interval with nothing known about the command's end."""
    return PollPolicy().interval(elapsed, throttled)


@dataclass(frozen=True)
class Invocation:
    status: str
    status_details: str
    response_code: int
    stdout: str
    stderr: str
    execution_start: str = ""  # empty while (and when) the command never started

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    @property
    def never_started(self) -> bool:
        """Ended without the master running a line of it (not delivered, cancelled before)."""
        return self.ended and self.response_code == -1 and not self.execution_start


class DeadlinePassed(Exception):
    """The command was still running at the deadline; `last` is what SSM said last."""

    def __init__(self, last: Any | None) -> None:
        super().__init__("deadline passed")
        self.last = last


def get_invocation(ssm: Any, command_id: str, instance_id: str) -> Invocation:
    response = ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
    return Invocation(
        status=response.get("Status", ""),
        status_details=response.get("StatusDetails", ""),
        response_code=int(response.get("ResponseCode", -1)),
        stdout=response.get("StandardOutputContent", "") or "",
        stderr=response.get("StandardErrorContent", "") or "",
        execution_start=response.get("ExecutionStartDateTime", "") or "",
    )


def expected_from_history(ssm: Any, instance_id: str, document: str = "AWS-RunShellScript") -> float | None:
    """How long the last successful deploy took on this master, from SSM's own records.

    One ListCommandInvocations call; None when there is no such deploy or SSM does not say (the
    history is a hint for the polling, never a reason to fail).
    """
    try:
        response = ssm.list_command_invocations(
            InstanceId=instance_id,
            MaxResults=HISTORY_LOOKBACK,
            Details=True,
            Filters=[{"key": "DocumentName", "value": document}],
        )
    except Exception:  # AccessDenied, throttling, an old endpoint: poll without the hint
        return None
    return last_deploy_seconds(response.get("CommandInvocations", []))


def last_deploy_seconds(invocations: Iterable[dict[str, Any]]) -> float | None:
    """The run time of the newest successful deploy among ListCommandInvocations entries."""
    best: tuple[datetime, float] | None = None
    for entry in invocations:
        comment = entry.get("Comment") or ""
        if not comment.startswith(DEPLOY_COMMENT) or comment.startswith(ROLLBACK_COMMENT):
            continue
        if entry.get("Status") != "Success":
            continue
        for plugin in entry.get("CommandPlugins") or []:
            start, end = plugin.get("ResponseStartDateTime"), plugin.get("ResponseFinishDateTime")
            requested = entry.get("RequestedDateTime")
            if isinstance(start, datetime) and isinstance(end, datetime) and end >= start:
                when = requested if isinstance(requested, datetime) else start
                if best is None or when > best[0]:
                    best = (when, (end - start).total_seconds())
    return best[1] if best else None


def poll(
    ask: Callable[[], T],
    ended: Callable[[T], bool],
    deadline: float,
    *,
    what: str,
    permission: str,
    policy: Policy,
    progress: Callable[[float, float, T | None], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    not_yet: frozenset[str] = frozenset(),
    on_poll: Callable[[], None] | None = None,
) -> T:
    """Call `ask` until `ended(answer)`; raise DeadlinePassed at `deadline` (a clock() value).

    Errors whose code is in `not_yet` count as "not visible yet" for NOT_FOUND_WINDOW seconds;
    throttling widens the interval; any other error ends the wait as AwsCallFailed. `on_poll`
    runs after every question that did not end the wait (live progress reads on its own
    schedule).
    """
    from botocore.exceptions import ClientError

    started = clock()
    next_progress = started + PROGRESS_EVERY
    throttled = 0
    last: T | None = None
    while True:
        now = clock()
        with aws_call(what, permission):
            try:
                last = ask()
                throttled = 0
            except ClientError as exc:
                code = error_code(exc)
                if code in not_yet and now - started < NOT_FOUND_WINDOW:
                    pass
                elif code in _THROTTLING:
                    throttled += 1
                else:
                    raise
        if last is not None and ended(last):
            return last
        if on_poll is not None:
            on_poll()
        now = clock()
        if now >= deadline:
            raise DeadlinePassed(last)
        if now >= next_progress:
            if progress is not None:
                progress(now - started, max(deadline - now, 0), last)
            next_progress = now + PROGRESS_EVERY
        sleep(min(policy.interval(now - started, throttled), max(deadline - now, 0.05)))


def wait_for_command(
    ssm: Any,
    command_id: str,
    instance_id: str,
    deadline: float,
    log: Callable[[str], None],
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    policy: Policy | None = None,
    until: Callable[[Invocation], bool] | None = None,
    on_poll: Callable[[], None] | None = None,
) -> Invocation:
    """Poll GetCommandInvocation until the invocation ends (or `until` says so); raise
    DeadlinePassed at `deadline` (a clock() value)."""

    def report(elapsed: float, left: float, last: Invocation | None) -> None:
        status = last.status if last else "not visible yet"
        log(
            f"Waiting for command {command_id} on {instance_id}: {status}, "
            f"{elapsed:.0f} s elapsed, {left:.0f} s left"
        )

    return poll(
        lambda: get_invocation(ssm, command_id, instance_id),
        until or (lambda invocation: invocation.ended),
        deadline,
        what=f"read the status of command {command_id}",
        permission="ssm:GetCommandInvocation",
        policy=policy or PollPolicy(),
        progress=report,
        clock=clock,
        sleep=sleep,
        not_yet=frozenset({"InvocationDoesNotExist"}),
        on_poll=on_poll,
    )
