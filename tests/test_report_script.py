"""What the action makes of the deploy script's report, failure details and dry-run diff."""

from __future__ import annotations

import re

import pytest

from deploykit import report
from deploykit.report import Outcome, parse_diff, summary_markdown
from deploykit.results import TargetResult, judge_report
from tests import markdown

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
def test_judge_report_maps_the_report_to_the_status(code, found, status, rolled_back) -> None:
    result = TargetResult("i-1")
    judge_report(result, found, code)
    assert (result.status, result.rolled_back, result.reported) == (status, rolled_back, True)
    assert result.message.startswith(found["message"])
    if found.get("rollback") == "failed":
        assert "The rollback failed too" in result.message


def test_the_summary_shows_the_failed_container_and_its_log() -> None:
    outcome = Outcome(status="rolled-back", rolled_back=True, message="m",
                      report={"failure": FAILURE, "workloads": []})
    rendered = markdown.render(summary_markdown(outcome, "eu-west-1"))
    assert "<h3>What failed</h3>" in rendered
    assert ("<p>Pod <code>api-7d9c-x2x</code>, container <code>api</code> of "
            "production-platform/deployment/api: <strong>CrashLoopBackOff</strong></p>") in rendered
    assert "<blockquote>\n<p>back-off 10s restarting failed container=api</p>" in rendered
    assert "<pre><code>start\npanic: boom\n</code></pre>" in rendered


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


# What a crashing container, a pod's name or a Name tag may hold: none of it may render as
# anything but itself in the summary (#15, finding 4).
HOSTILE = [
    "[click](https://evil.example/x)",
    "![pixel](https://evil.example/p.png)",
    "<img src=https://evil.example/i.png>",
    "<a href='https://evil.example'>x</a>",
    "https://evil.example/bare www.evil.example mail@evil.example",
    "**bold** _em_ ~~strike~~",
    "`code` ``double`` ```",
    "| a cell | break",
    "line1\nline2\r# heading",
    "<details><summary>x</summary>y</details>",
    "&lt;script&gt; &amp;",
    "\\[escaped\\](https://evil.example/e)",
]


def hostile_outcome(value: str) -> Outcome:
    failure = {"workload": value, "namespace": value, "pod": value, "container": value,
               "reason": value, "message": value, "log": [value, "panic"]}
    workload = {"kind": value, "name": value, "namespace": value, "ready": value, "desired": "2",
                "updated": value, "revision_before": value, "revision_after": "2", "result": value}
    instance = {"instance-id": value, "name": value, "cluster": value, "status": value,
                "exit-code": value, "seconds": value, "command-id": "c-1", "message": value}
    return Outcome(status="rolled-back", rolled_back=True, message=value, images=[value, "b:1"],
                   instance_id=value, diff=value, results=[instance],
                   report={"failure": failure, "workloads": [workload], "pods": [value],
                           "events": [value], "cluster_changes": [f"created {value}", value],
                           "jobs": [{"namespace": value, "name": value, "result": value}]})


@pytest.mark.parametrize("value", HOSTILE)
def test_nothing_untrusted_renders_as_markup_in_the_summary(value: str) -> None:
    rendered = markdown.render(summary_markdown(hostile_outcome(value), "eu-west-1"))
    assert markdown.tags(rendered) <= markdown.SUMMARY_TAGS, rendered
    links = re.findall(r'<a href="([^"]*)"', rendered)
    assert links and all(
        link.startswith("https://eu-west-1.console.aws.amazon.com/systems-manager/run-command/c-1?")
        for link in links), links
    assert rendered.count("<strong>") == 1  # the failure's reason, ours
    shown = markdown.text(rendered)
    flat = " ".join(value.splitlines())
    shown = shown.replace("\u2060", "")  # the word joiner that keeps an address from linking
    assert shown.count(flat) >= 8, shown  # message, failure, workload, instance... all shown as is


def test_the_summary_lists_what_the_deploy_changed_outside_its_namespaces() -> None:
    outcome = Outcome(status="success", report={"workloads": [], "cluster_changes": [
        "created ClusterRole/shop-reader", "changed ConfigMap kube-system/shop-extra"]})
    rendered = markdown.render(summary_markdown(outcome, "eu-west-1"))
    assert "Changed outside the deploy&#x27;s namespaces" in rendered or \
        "Changed outside the deploy's namespaces" in rendered
    rows = re.findall(r"<tr>\s*<td>(.*?)</td>\s*<td>(.*?)</td>\s*</tr>", rendered, re.S)
    assert rows[-2:] == [("created", "<code>ClusterRole/shop-reader</code>"),
                         ("changed", "<code>ConfigMap kube-system/shop-extra</code>")]
    quiet = markdown.render(summary_markdown(Outcome(status="success", report={"workloads": []}),
                                             "eu-west-1"))
    assert "Changed outside" not in quiet


def test_the_summary_lists_the_migration_jobs_and_what_each_did() -> None:
    outcome = Outcome(status="failed", report={"workloads": [], "jobs": [
        {"namespace": "shop", "name": "migrate", "result": "completed"},
        {"namespace": "shop", "name": "seed", "result": "unchanged"},
        {"namespace": "", "name": "reindex", "result": "failed"},
        {"namespace": "shop", "name": "report", "result": "not-run"}]})
    rendered = markdown.render(summary_markdown(outcome, "eu-west-1"))
    rows = re.findall(r"<tr>\s*<td>(.*?)</td>\s*<td>(.*?)</td>\s*</tr>", rendered, re.S)
    assert rows[-4:] == [
        ("shop/job/migrate", "ran, completed"),
        ("shop/job/seed", "not run again: completed with this spec before"),
        ("job/reindex", "failed"),
        ("shop/job/report", "not run (the deploy stopped before it)"),
    ]
    without = markdown.render(summary_markdown(Outcome(status="success", report={"workloads": []}),
                                               "eu-west-1"))
    assert "Jobs" not in without
