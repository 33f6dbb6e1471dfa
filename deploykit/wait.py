"""Wait for an SSM command invocation to end.

GetCommandInvocation is polled at most about once a second: quickly at first (short deploys and
early failures), a little slower in the middle of long waits, but never slower than every 2 s, so
the end is noticed within about 2 s (the original pipeline polled every 10 s). Throttling
widens the interval. Right after SendCommand the invocation may not exist yet (eventual
consistency); that answer is retried for a bounded window only, since a wrong instance id gives
the same error. Time is injected so the tests run without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deploykit.awsapi import aws_call, error_code

TERMINAL = frozenset({"Success", "Failed", "Cancelled", "TimedOut"})
NOT_FOUND_WINDOW = 20.0  # seconds InvocationDoesNotExist is taken as "not yet"
PROGRESS_EVERY = 15.0
FAST_PHASE = 30.0  # seconds of 1 s polling before the interval grows
MAX_INTERVAL = 2.0
THROTTLED_MAX_INTERVAL = 10.0
_THROTTLING = {"ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded"}


@dataclass(frozen=True)
class Invocation:
    status: str
    status_details: str
    response_code: int
    stdout: str
    stderr: str

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL


class DeadlinePassed(Exception):
    """The command was still running at the deadline; `last` is what SSM said last."""

    def __init__(self, last: Invocation | None) -> None:
        super().__init__("deadline passed")
        self.last = last


def next_interval(elapsed: float, throttled: int) -> float:
    base = 1.0 if elapsed < FAST_PHASE else MAX_INTERVAL
    if throttled:
        return min(base * 2**throttled, THROTTLED_MAX_INTERVAL)
    return base


def get_invocation(ssm: Any, command_id: str, instance_id: str) -> Invocation:
    response = ssm.get_command_invocation(CommandId=command_id, InstanceId=instance_id)
    return Invocation(
        status=response.get("Status", ""),
        status_details=response.get("StatusDetails", ""),
        response_code=int(response.get("ResponseCode", -1)),
        stdout=response.get("StandardOutputContent", "") or "",
        stderr=response.get("StandardErrorContent", "") or "",
    )


def wait_for_command(
    ssm: Any,
    command_id: str,
    instance_id: str,
    deadline: float,
    log: Callable[[str], None],
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Invocation:
    """Poll until the invocation ends; raise DeadlinePassed at `deadline` (a clock() value)."""
    from botocore.exceptions import ClientError

    started = clock()
    next_progress = started + PROGRESS_EVERY
    throttled = 0
    last: Invocation | None = None
    while True:
        now = clock()
        with aws_call(f"read the status of command {command_id}", "ssm:GetCommandInvocation"):
            try:
                last = get_invocation(ssm, command_id, instance_id)
                throttled = 0
            except ClientError as exc:
                code = error_code(exc)
                if code == "InvocationDoesNotExist" and now - started < NOT_FOUND_WINDOW:
                    pass
                elif code in _THROTTLING:
                    throttled += 1
                else:
                    raise
        if last is not None and last.ended:
            return last
        now = clock()
        if now >= deadline:
            raise DeadlinePassed(last)
        if now >= next_progress:
            status = last.status if last else "not visible yet"
            log(
                f"Waiting for command {command_id} on {instance_id}: {status}, "
                f"{now - started:.0f} s elapsed, {max(deadline - now, 0):.0f} s left"
            )
            next_progress = now + PROGRESS_EVERY
        sleep(min(next_interval(now - started, throttled), max(deadline - now, 0.05)))
