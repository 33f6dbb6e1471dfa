"""Waiting for the command: the polling state machine, driven by a fake clock (no real sleeps).

GetCommandInvocation answers come from botocore's Stubber on a real SSM client. The fake
clock's sleep queues the next answer, so an answer can depend on the (fake) time of the poll.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import boto3
import pytest
from botocore.stub import Stubber

from deploykit.errors import AwsCallFailed
from deploykit.wait import DeadlinePassed, wait_for_command

COMMAND = "0c0ffee0-1234-4567-89ab-cdef01234567"
INSTANCE = "i-0123456789abcdef0"
START = 5000.0


def invocation(status: str, code: int = -1, stdout: str = "", stderr: str = "", details: str = "") -> dict:
    return {
        "CommandId": COMMAND,
        "InstanceId": INSTANCE,
        "Status": status,
        "StatusDetails": details or status,
        "ResponseCode": code,
        "StandardOutputContent": stdout,
        "StandardErrorContent": stderr,
    }


class Poller:
    """A fake clock whose sleep advances time and queues SSM's next answer for that time."""

    def __init__(self, answer: Callable[[float], dict | str]) -> None:
        self.now = START
        self.answer = answer
        self.sleeps: list[float] = []
        self.polls: list[float] = []
        self.logs: list[tuple[float, str]] = []
        self.ssm = boto3.client(
            "ssm", region_name="eu-west-1", aws_access_key_id="testing", aws_secret_access_key="testing"
        )
        self.stub = Stubber(self.ssm)
        self.stub.activate()
        self.ssm.meta.events.register(
            "before-parameter-build.ssm.GetCommandInvocation", lambda **_: self.polls.append(self.now)
        )
        self._queue()

    def _queue(self) -> None:
        answer = self.answer(self.now - START)
        if isinstance(answer, str):  # an error code
            status = 500 if answer == "InternalServerError" else 400
            self.stub.add_client_error("get_command_invocation", answer, f"{answer} at {self.now}", status)
        else:
            self.stub.add_response(
                "get_command_invocation", answer, {"CommandId": COMMAND, "InstanceId": INSTANCE}
            )

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds
        self._queue()

    def log(self, line: str) -> None:
        self.logs.append((self.now, line))

    def wait(self, timeout: float = 3600.0):
        return wait_for_command(
            self.ssm, COMMAND, INSTANCE, START + timeout, self.log, clock=self.clock, sleep=self.sleep
        )

    @property
    def elapsed(self) -> float:
        return self.now - START


def ends_at(end: float, status: str = "Success", code: int = 0, running: str = "InProgress"):
    return lambda t: invocation(status, code, "done") if t >= end else invocation(running)


@pytest.mark.parametrize(
    ("status", "code"), [("Success", 0), ("Failed", 7), ("Cancelled", -1), ("TimedOut", -1)]
)
def test_a_terminal_status_is_returned_with_its_code_and_output(status, code):
    poller = Poller(lambda t: invocation(status, code, "out", "err", details=f"{status} details"))
    result = poller.wait()
    assert (result.status, result.response_code, result.stdout, result.stderr) == (status, code, "out", "err")
    assert result.status_details == f"{status} details"
    assert result.ended
    assert poller.sleeps == []


def test_polling_goes_on_through_pending_in_progress_delayed_and_cancelling():
    sequence = ["Pending", "Pending", "InProgress", "Delayed", "InProgress", "Cancelling", "Cancelled"]
    poller = Poller(lambda t: invocation(sequence[min(round(t), len(sequence) - 1)]))
    assert poller.wait().status == "Cancelled"
    assert len(poller.polls) == len(sequence)


def test_polls_are_one_to_two_seconds_apart_when_not_throttled():
    poller = Poller(ends_at(300.0))
    poller.wait()
    assert poller.sleeps
    assert all(1.0 <= s <= 2.0 for s in poller.sleeps)
    gaps = [b - a for a, b in itertools.pairwise(poller.polls)]
    assert all(gap >= 1.0 for gap in gaps)


@pytest.mark.parametrize("end", [0.4, 3.3, 29.9, 31.7, 47.3, 122.9, 599.5])
def test_the_end_is_noticed_within_two_seconds(end):
    poller = Poller(ends_at(end))
    assert poller.wait().status == "Success"
    assert end <= poller.elapsed <= end + 2.0


def test_the_first_half_minute_polls_every_second():
    poller = Poller(ends_at(25.0))
    poller.wait()
    assert set(poller.sleeps) == {1.0}


def test_invocation_does_not_exist_is_retried_right_after_sending():
    poller = Poller(lambda t: "InvocationDoesNotExist" if t < 4 else invocation("Success", 0))
    assert poller.wait().status == "Success"
    assert 4.0 <= poller.elapsed <= 6.0


def test_invocation_does_not_exist_is_an_error_once_the_window_is_over():
    poller = Poller(lambda t: "InvocationDoesNotExist")
    with pytest.raises(AwsCallFailed) as caught:
        poller.wait()
    assert "InvocationDoesNotExist" in caught.value.message
    assert COMMAND in caught.value.message
    assert 15.0 <= poller.elapsed <= 25.0


def test_invocation_does_not_exist_after_it_was_seen_is_an_error_once_the_window_is_over():
    poller = Poller(lambda t: invocation("InProgress") if t < 2 else "InvocationDoesNotExist")
    with pytest.raises(AwsCallFailed, match="InvocationDoesNotExist"):
        poller.wait()


def test_throttling_widens_the_interval_and_it_narrows_again_afterwards():
    poller = Poller(
        lambda t: (
            "ThrottlingException"
            if 3 <= t < 40
            else (invocation("Success", 0) if t >= 80 else invocation("InProgress"))
        )
    )
    assert poller.wait().status == "Success"
    throttled = [s for at, s in zip(poller.polls, poller.sleeps, strict=False) if 3 <= at - START < 40]
    assert max(throttled) > 2.0
    assert throttled == sorted(throttled)
    assert max(poller.sleeps) <= 10.0
    later = [s for at, s in zip(poller.polls, poller.sleeps, strict=False) if at - START >= 45]
    assert later and all(1.0 <= s <= 2.0 for s in later)


def test_other_errors_stop_the_wait_with_the_error():
    poller = Poller(lambda t: invocation("InProgress") if t < 3 else "AccessDeniedException")
    with pytest.raises(AwsCallFailed) as caught:
        poller.wait()
    assert "AccessDeniedException" in caught.value.message
    assert "ssm:GetCommandInvocation" in (caught.value.fix or "")


def test_the_deadline_raises_deadline_passed_with_the_last_answer():
    poller = Poller(lambda t: invocation("InProgress", stdout=f"at {t:.0f}"))
    with pytest.raises(DeadlinePassed) as caught:
        poller.wait(timeout=90.0)
    assert 90.0 <= poller.elapsed <= 92.0
    assert caught.value.last is not None and caught.value.last.status == "InProgress"


def test_the_deadline_passes_even_when_the_invocation_never_appeared():
    poller = Poller(lambda t: "InvocationDoesNotExist")
    with pytest.raises(DeadlinePassed) as caught:
        poller.wait(timeout=12.0)
    assert caught.value.last is None
    assert 12.0 <= poller.elapsed <= 14.0


def test_the_deadline_wins_over_throttling():
    poller = Poller(lambda t: "ThrottlingException")
    with pytest.raises(DeadlinePassed):
        poller.wait(timeout=60.0)
    assert 60.0 <= poller.elapsed <= 62.0


def test_a_progress_line_about_every_fifteen_seconds():
    poller = Poller(ends_at(100.0))
    poller.wait()
    times = [at - START for at, _ in poller.logs]
    assert len(times) == 6
    assert 15.0 <= times[0] <= 17.0
    assert all(15.0 <= b - a <= 17.0 for a, b in itertools.pairwise(times))
    first = poller.logs[0][1]
    assert COMMAND in first and INSTANCE in first and "InProgress" in first and "s elapsed" in first


def test_no_progress_line_for_a_short_command():
    poller = Poller(ends_at(10.0))
    poller.wait()
    assert poller.logs == []
