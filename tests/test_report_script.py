"""What the action makes of the deploy script's report, failure details and dry-run diff."""

from __future__ import annotations

import pytest

from deploykit import report
from deploykit.report import Outcome, conclude, parse_diff, summary_markdown

FAILURE = {"workload": "deployment/api", "namespace": "production-platform", "pod": "api-7d9c-x2x",
           "container": "api", "reason": "CrashLoopBackOff",
           "message": "back-off 10s restarting failed container=api", "log": ["start", "panic: boom"]}


def test_parse_diff_takes_what_is_between_the_markers() -> None:
    stdout = f"log\n{report.DIFF_BEGIN}\n-a\n+b\n{report.DIFF_END}\nmore log\n"
    assert parse_diff(stdout) == "-a\n+b"
    assert parse_diff("no dry run here\n") is None
    cut = parse_diff(f"log\n{report.DIFF_BEGIN}\n-a\n+b")  # SSM cut the output
    assert cut is not None and cut.startswith("-a\n+b\n") and "cut before the end" in cut
    assert parse_diff(f"{report.DIFF_BEGIN}\n{report.DIFF_END}\n") == ""


@pytest.mark.parametrize(("code", "found", "status", "rolled_back"), [
    (0, {"result": "success", "message": "all 3 workload(s) ready and healthy"}, "success", False),
    (7, {"result": "failed", "rollback": "done", "message": "m"}, "rolled-back", True),
    (8, {"result": "failed", "rollback": "failed", "message": "m"}, "failed", False),
    (9, {"result": "failed", "rollback": "off", "message": "m"}, "failed", False),
    (6, {"result": "failed", "rollback": "not-needed", "message": "m"}, "failed", False),
    (10, {"result": "timed-out", "rollback": "done", "message": "m"}, "timed-out", True),
])
def test_conclude_maps_the_report_to_the_status(code, found, status, rolled_back) -> None:
    outcome = Outcome()
    conclude(outcome, found, code)
    assert (outcome.status, outcome.rolled_back) == (status, rolled_back)
    assert outcome.message.startswith(found["message"])
    if found.get("rollback") == "failed":
        assert "The rollback failed too" in outcome.message


def test_the_summary_shows_the_failed_container_and_its_log() -> None:
    outcome = Outcome(status="rolled-back", rolled_back=True, message="m",
                      report={"failure": FAILURE, "workloads": []})
    text = summary_markdown(outcome, "eu-west-1")
    assert "### What failed" in text
    assert "Pod `api-7d9c-x2x`, container `api` of production-platform/deployment/api: " \
           "**CrashLoopBackOff**" in text
    assert "> back-off 10s restarting failed container=api" in text
    assert "```\nstart\npanic: boom\n```" in text


def test_the_dry_run_summary_fences_the_diff_and_cuts_it_to_fit() -> None:
    diff = "\n".join(f"+line {i} ```" for i in range(20_000))
    outcome = Outcome(status="success", message="dry run", diff=diff, dry_run=True)
    text = summary_markdown(outcome, "eu-west-1")
    assert text.startswith("## 🔍 Dry run: nothing was changed")
    body = text.split("```diff\n", 1)[1].rsplit("\n```", 1)[0]
    assert len(body) < report.SUMMARY_DIFF_CHARS + 200
    assert "```" not in body  # a fence inside the diff cannot end the block
    assert "more characters in the log" in body
    empty = summary_markdown(Outcome(status="success", diff="", dry_run=True), "eu-west-1")
    assert "No differences: the cluster already matches the manifests." in empty


def test_a_failed_dry_run_says_nothing_was_changed() -> None:
    text = summary_markdown(Outcome(status="failed", dry_run=True), "eu-west-1")
    assert text.startswith("## ❌ Deploy failed (dry run: nothing was changed)")
