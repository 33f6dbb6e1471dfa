"""Fleet mode and HA clusters, the parts that need no AWS: inputs, grouping servers by cluster,
SSM's rate controls, what an invocation says about an instance, and the fleet's status."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deploykit.errors import InputError, RemoteCommandFailed
from deploykit.fleet import concurrency_for, delivery_timeout, record_invocation
from deploykit.inputs import parse_settings
from deploykit.report import Outcome, summary_markdown
from deploykit.results import TargetResult, conclude
from deploykit.target import group_by_cluster
from tests import markdown

A, B, C = "i-0aaaaaaaaaaaaaaaa", "i-0bbbbbbbbbbbbbbbb", "i-0cccccccccccccccc"
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def settings(tmp_path: Path, **raw: str):
    (tmp_path / "k8s" / "base").mkdir(parents=True, exist_ok=True)
    return parse_settings(raw, {"GITHUB_WORKSPACE": str(tmp_path), "AWS_REGION": "eu-west-1"})


# Inputs


def test_fleet_is_off_by_default_with_ssm_s_default_limits(tmp_path):
    parsed = settings(tmp_path)
    assert (parsed.fleet, parsed.max_concurrency, parsed.max_errors) == (False, "50", "0")
    assert parsed.cluster_tag_key == "k3s-cluster"
    assert parsed.instance_ids == ()


def test_with_fleet_instance_id_takes_several_ids_per_line_or_comma_separated(tmp_path):
    parsed = settings(tmp_path, fleet="true", **{"instance-id": f"{A}, {B}\n{C}\n{A}"})
    assert parsed.instance_ids == (A, B, C)
    assert parsed.instance_id is None


def test_one_id_still_fills_instance_id(tmp_path):
    assert settings(tmp_path, **{"instance-id": A}).instance_id == A


def test_several_ids_without_fleet_are_an_input_error(tmp_path):
    with pytest.raises(InputError) as caught:
        settings(tmp_path, **{"instance-id": f"{A},{B}"})
    assert caught.value.message.startswith(
        "input 'instance-id' takes one instance id unless 'fleet' is true, got 2:"
    )


def test_a_bad_id_among_several_is_named(tmp_path):
    with pytest.raises(InputError) as caught:
        settings(tmp_path, fleet="true", **{"instance-id": f"{A}\ni-nope"})
    assert caught.value.message.endswith("such as i-0123456789abcdef0, got 'i-nope'")


@pytest.mark.parametrize("value", ["1", "50", "10%", "100%"])
def test_max_concurrency_accepts_a_number_or_a_percentage(tmp_path, value):
    assert settings(tmp_path, **{"max-concurrency": value}).max_concurrency == value


@pytest.mark.parametrize("value", ["0", "0%", "101%", "-1", "ten", "5 %"])
def test_a_bad_max_concurrency_says_the_rule(tmp_path, value):
    with pytest.raises(InputError) as caught:
        settings(tmp_path, **{"max-concurrency": value})
    assert caught.value.message == (
        "input 'max-concurrency' must be a number of instances (1 or more) or a percentage "
        f"(1% to 100%), got {value!r}"
    )


@pytest.mark.parametrize("value", ["0", "3", "0%", "25%", "100%"])
def test_max_errors_accepts_zero_a_number_or_a_percentage(tmp_path, value):
    assert settings(tmp_path, **{"max-errors": value}).max_errors == value


@pytest.mark.parametrize("value", ["-1", "101%", "many", "1.5"])
def test_a_bad_max_errors_says_the_rule(tmp_path, value):
    with pytest.raises(InputError) as caught:
        settings(tmp_path, **{"max-errors": value})
    assert caught.value.message == (
        "input 'max-errors' must be a number of instances (0 or more) or a percentage "
        f"(0% to 100%), got {value!r}"
    )


def test_fleet_is_a_boolean(tmp_path):
    with pytest.raises(InputError, match="input 'fleet' must be true or false, got 'yes'"):
        settings(tmp_path, fleet="yes")


# HA clusters


def instance(instance_id: str, cluster: str = "", days: int = 0) -> dict:
    tags = [{"Key": "Name", "Value": f"k3s-{instance_id[-4:]}"}]
    if cluster:
        tags.append({"Key": "k3s-cluster", "Value": cluster})
    return {"InstanceId": instance_id, "Tags": tags, "LaunchTime": T0 + timedelta(days=days)}


def test_servers_of_one_cluster_are_one_group_ranked_online_then_oldest():
    servers = [instance(A, "prod", 0), instance(B, "prod", 1), instance(C, "prod", 2)]
    statuses = {A: "ConnectionLost", B: "Online", C: "Online"}
    (group,) = group_by_cluster(servers, statuses, "k3s-cluster")
    assert [s["InstanceId"] for s in group] == [B, C, A]


def test_instances_without_the_cluster_tag_are_clusters_of_their_own():
    servers = [instance(A), instance(B), instance(C, "prod")]
    groups = group_by_cluster(servers, dict.fromkeys((A, B, C), "Online"), "k3s-cluster")
    assert sorted(len(g) for g in groups) == [1, 1, 1]


def test_clusters_come_in_the_order_of_their_best_server():
    servers = [instance(A, "late", 5), instance(B, "early", 1), instance(C, "late", 0)]
    groups = group_by_cluster(servers, {A: "Online", B: "Online", C: "ConnectionLost"}, "k3s-cluster")
    assert [[s["InstanceId"] for s in g] for g in groups] == [[B], [A, C]]


# SSM's rate controls


@pytest.mark.parametrize(
    ("count", "value", "slots"),
    [(200, "50", 50), (10, "50", 10), (200, "100%", 200), (3, "34%", 2), (7, "1%", 1)],
)
def test_concurrency_is_a_number_or_a_share_of_the_targets(count, value, slots):
    assert concurrency_for(count, value) == slots


def test_delivery_timeout_covers_the_waves_behind_the_first():
    assert delivery_timeout(50, "50", 780) == 120
    assert delivery_timeout(50, "10", 780) == 120 + 4 * 780
    assert delivery_timeout(10_000, "1", 86_400) == 2_592_000  # SSM's upper bound


# What an invocation says about an instance


def entry(status: str, code: int, details: str = "", started: bool = True) -> dict:
    plugin: dict = {"ResponseCode": code}
    if started:
        plugin.update(ResponseStartDateTime=T0, ResponseFinishDateTime=T0 + timedelta(seconds=42))
    return {"InstanceId": A, "Status": status, "StatusDetails": details or status, "CommandPlugins": [plugin]}


@pytest.mark.parametrize(
    ("given", "status", "rolled_back", "reported"),
    [
        (entry("Success", 0), "success", False, True),
        (entry("Failed", 7), "rolled-back", True, True),
        (entry("Failed", 8), "failed", False, True),
        (entry("Failed", 9), "failed", False, True),
        (entry("Failed", 10), "timed-out", True, True),
        (entry("Failed", 12), "timed-out", False, True),
        (entry("Failed", 5), "failed", False, True),
        (entry("Failed", 90), "failed", False, True),
        (entry("TimedOut", 137, "ExecutionTimedOut"), "timed-out", False, False),
        (entry("Cancelled", 137), "failed", False, False),
        (entry("Failed", 1), "failed", False, False),
    ],
)
def test_the_exit_code_says_what_happened_on_the_instance(given, status, rolled_back, reported):
    result = TargetResult(A, "k3s", "")
    record_invocation(result, "cmd", given)
    assert (result.status, result.rolled_back, result.reported) == (status, rolled_back, reported)
    assert result.seconds == 42.0
    assert not result.never_started


@pytest.mark.parametrize("details", ["DeliveryTimedOut", "Undeliverable", "Terminated", "Cancelled"])
def test_a_command_that_never_started_is_known_as_such(details):
    status = "TimedOut" if details == "DeliveryTimedOut" else "Cancelled"
    result = TargetResult(A, "k3s", "")
    record_invocation(result, "cmd", entry(status, -1, details, started=False))
    assert result.never_started
    assert result.status == "failed"
    assert "never took the command" in result.message


# The fleet's status


def results(*statuses: tuple[str, bool]) -> list[TargetResult]:
    return [
        TargetResult(f"i-{n:017x}", "", "", status=status, rolled_back=rolled_back)
        for n, (status, rolled_back) in enumerate(statuses)
    ]


def test_success_only_when_every_instance_succeeded():
    outcome = Outcome()
    conclude(outcome, results(("success", False), ("success", False)), many=True)
    assert outcome.status == "success"
    assert outcome.message == "Deployed to all 2 instance(s); every workload is ready."


@pytest.mark.parametrize(
    ("statuses", "status", "rolled_back"),
    [
        ((("success", False), ("rolled-back", True)), "rolled-back", True),
        ((("rolled-back", True), ("failed", False)), "failed", False),
        ((("rolled-back", True), ("timed-out", True)), "timed-out", True),
        ((("success", False), ("timed-out", False)), "timed-out", False),
    ],
)
def test_otherwise_the_worst_status_and_rolled_back_only_if_every_failure_was(statuses, status, rolled_back):
    outcome = Outcome()
    with pytest.raises(RemoteCommandFailed):
        conclude(outcome, results(*statuses), many=True)
    assert (outcome.status, outcome.rolled_back) == (status, rolled_back)
    assert outcome.message.startswith(f"Deployed to {sum(s == 'success' for s, _ in statuses)} of 2")


def test_a_failed_over_server_does_not_count_against_the_fleet():
    outcome = Outcome()
    conclude(outcome, results(("failed-over", False), ("success", False)), many=True)
    assert outcome.status == "success"


def test_the_summary_has_one_row_per_instance_and_every_command():
    outcome = Outcome(status="rolled-back", command_id="c-1,c-2", instance_id=f"{A},{B}")
    outcome.results = [
        r.as_output()
        for r in (
            TargetResult(A, "k3s-a", "prod", "c-1", "success", exit_code=0, message="all ready"),
            TargetResult(B, "k3s-b", "", "c-2", "rolled-back", True, 7, message="api | crash"),
        )
    ]
    text = summary_markdown(outcome, "eu-west-1")
    assert "| Instances | 2 |" in text
    assert "run-command/c-1" in text and "run-command/c-2" in text
    rows = re.findall(r"<tr>\n(.*?)</tr>", markdown.render(text), re.DOTALL)
    cells = [re.findall(r"<td>(.*?)</td>", row) for row in rows]
    instances = [row for row in cells if row and row[0].startswith("<code>i-")]
    assert [row[:6] for row in instances] == [
        [f"<code>{A}</code>", "k3s-a", "prod", "✅ success", "false", "0"],
        [f"<code>{B}</code>", "k3s-b", "-", "↩️ rolled-back", "true", "7"],
    ]
    assert instances[1][-1] == "api | crash"  # a | in a message stays in its cell
