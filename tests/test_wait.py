"""Waiting for the command: the polling state machine, driven by a fake clock (no real sleeps).

GetCommandInvocation answers come from botocore's Stubber on a real SSM client. The fake
clock's sleep queues the next answer, so an answer can depend on the (fake) time of the poll.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from botocore.stub import ANY, Stubber

from deploykit.errors import AwsCallFailed
from deploykit.wait import (
    DeadlinePassed,
    FixedPolicy,
    PollPolicy,
    expected_from_history,
    last_deploy_seconds,
    wait_for_command,
)

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


def test_polls_are_one_to_one_and_a_half_seconds_apart_when_not_throttled():
    poller = Poller(ends_at(300.0))
    poller.wait()
    assert poller.sleeps
    assert all(1.0 <= s <= 1.5 for s in poller.sleeps)
    gaps = [b - a for a, b in itertools.pairwise(poller.polls)]
    assert all(gap >= 1.0 for gap in gaps)


@pytest.mark.parametrize("end", [0.4, 3.3, 29.9, 31.7, 47.3, 122.9, 599.5])
def test_the_end_is_noticed_within_a_second_and_a_half(end):
    poller = Poller(ends_at(end))
    assert poller.wait().status == "Success"
    assert end <= poller.elapsed <= end + 1.5


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


# The adaptive policy: quick at first and near the expected end, slower in the middle


def test_without_a_hint_the_middle_polls_every_second_and_a_half():
    policy = PollPolicy()
    assert [policy.interval(t) for t in (0, 10, 29.9)] == [1.0, 1.0, 1.0]
    assert [policy.interval(t) for t in (30, 100, 1000)] == [1.5, 1.5, 1.5]


def test_near_the_expected_end_polls_every_second_and_far_from_it_every_three():
    policy = PollPolicy(expected=200.0)
    assert policy.interval(60.0) == 3.0  # 140 s before the expected end
    assert policy.interval(169.0) == 3.0
    assert policy.interval(175.0) == 1.0  # within 15 % before it
    assert policy.interval(240.0) == 1.0  # and a while after it (deploys run over more than under)
    assert policy.interval(300.0) == 1.5  # far past it: back to the middle


def test_near_the_script_deadline_polls_every_second():
    policy = PollPolicy(deadline=600.0)
    assert policy.interval(300.0) == 1.5
    assert policy.interval(590.0) == 1.0
    assert policy.interval(640.0) == 1.0


@pytest.mark.parametrize("expected", [None, 45.0, 200.0, 3000.0])
def test_never_more_than_one_call_a_second(expected):
    policy = PollPolicy(expected=expected, deadline=600.0)
    assert min(policy.interval(t / 2) for t in range(0, 8000)) >= 1.0


def test_throttling_doubles_the_interval_from_where_it_was_up_to_ten_seconds():
    policy = PollPolicy(expected=500.0)
    assert [policy.interval(5.0, n) for n in (1, 2, 3, 4, 5)] == [2.0, 4.0, 8.0, 10.0, 10.0]
    assert policy.interval(100.0, 1) == 6.0  # from the slow middle's 3 s


def test_a_fixed_policy_is_the_original_pipelines_ten_second_loop():
    assert {FixedPolicy(10.0).interval(t, n) for t in (0, 50) for n in (0, 3)} == {10.0}


def poll_with(policy, end: float) -> Poller:
    poller = Poller(ends_at(end))
    wait_for_command(
        poller.ssm, COMMAND, INSTANCE, START + 3600, poller.log,
        clock=poller.clock, sleep=poller.sleep, policy=policy,
    )
    return poller


@pytest.mark.parametrize("end", [12.0, 95.5, 240.3, 481.7])
def test_with_the_last_deploys_time_the_end_is_noticed_within_a_second(end):
    poller = poll_with(PollPolicy(expected=end * 1.05), end)
    assert end <= poller.elapsed <= end + 1.0


def test_a_long_deploy_with_a_hint_asks_less_often_than_every_second():
    poller = poll_with(PollPolicy(expected=480.0), 480.0)
    assert len(poller.polls) < 480 / 2  # one call a second would be 480


def test_the_fixed_ten_second_loop_notices_the_end_up_to_ten_seconds_late():
    poller = poll_with(FixedPolicy(10.0), 21.0)
    assert poller.elapsed == 30.0


def test_until_stops_the_wait_before_the_end():
    sequence = ["Pending", "Pending", "InProgress", "InProgress", "Success"]
    poller = Poller(lambda t: invocation(sequence[min(round(t), len(sequence) - 1)]))
    found = wait_for_command(
        poller.ssm, COMMAND, INSTANCE, START + 60, poller.log,
        clock=poller.clock, sleep=poller.sleep, until=lambda i: i.status != "Pending",
    )
    assert found.status == "InProgress"


# The hint: the last successful deploy's run time on the master, from ListCommandInvocations


def listed(comment: str, status: str, requested: datetime, seconds: float) -> dict:
    return {
        "Comment": comment,
        "Status": status,
        "RequestedDateTime": requested,
        "CommandPlugins": [
            {
                "ResponseStartDateTime": requested,
                "ResponseFinishDateTime": requested + timedelta(seconds=seconds),
            }
        ],
    }


def test_the_hint_is_the_newest_successful_deploy_not_a_rollback_or_a_failure():
    t0 = datetime(2024, 5, 1, tzinfo=UTC)
    entries = [
        listed("k3s-deploy 20240501-1", "Success", t0, 80.0),
        listed("k3s-deploy 20240501-2", "Success", t0 + timedelta(hours=2), 95.0),
        listed("k3s-deploy 20240501-3", "Failed", t0 + timedelta(hours=3), 30.0),
        listed("k3s-deploy rollback 20240501-3", "Success", t0 + timedelta(hours=3), 12.0),
        listed("someone's own command", "Success", t0 + timedelta(hours=4), 1.0),
    ]
    assert last_deploy_seconds(entries) == 95.0
    assert last_deploy_seconds(entries[2:]) is None


def test_the_hint_comes_from_ssm_and_its_absence_is_no_error():
    ssm = boto3.client(
        "ssm", region_name="eu-west-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    t0 = datetime(2024, 5, 1, tzinfo=UTC)
    with Stubber(ssm) as stub:
        stub.add_response(
            "list_command_invocations",
            {"CommandInvocations": [listed("k3s-deploy 1", "Success", t0, 42.0)]},
            {"InstanceId": INSTANCE, "MaxResults": 20, "Details": True, "Filters": ANY},
        )
        stub.add_client_error("list_command_invocations", "AccessDeniedException")
        assert expected_from_history(ssm, INSTANCE) == 42.0
        assert expected_from_history(ssm, INSTANCE) is None
