"""Read what the master reported (its report, its diff) and write the run up for people."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from deploykit.contract import Status

REPORT_BEGIN = "===K3S-DEPLOY-REPORT-BEGIN==="
REPORT_END = "===K3S-DEPLOY-REPORT-END==="
# The dry run's `kubectl diff`, on stdout (docs/internals.md).
DIFF_BEGIN = "===K3S-DEPLOY-DIFF-BEGIN==="
DIFF_END = "===K3S-DEPLOY-DIFF-END==="
# How much of a diff the step summary shows (GitHub takes 1 MiB in all).
SUMMARY_DIFF_CHARS = 60_000
STDOUT_LIMIT, STDERR_LIMIT = 24_000, 8_000  # what GetCommandInvocation returns at most


@dataclass
class Outcome:
    """What the run writes to its outputs; filled in as the story goes."""

    status: Status = Status.FAILED
    rolled_back: bool = False
    instance_id: str = ""
    command_id: str = ""
    bucket: str = ""
    duration: int = 0
    message: str = ""
    fix: str = ""
    report: dict[str, Any] | None = None  # the master's report, when it wrote one
    images: list[str] | None = None  # the deployed references with their digests
    results: list[dict[str, Any]] | None = None  # fleet mode: one entry per instance (fleet.py)
    diff: str | None = None  # dry run: what `kubectl diff` printed
    dry_run: bool = False


def parse_report(stderr: str) -> dict[str, Any] | None:
    """The JSON report between the markers, or None when it is missing or cut."""
    begin = stderr.rfind(REPORT_BEGIN)
    if begin < 0:
        return None
    end = stderr.find(REPORT_END, begin)
    if end < 0:
        return None
    try:
        report = json.loads(stderr[begin + len(REPORT_BEGIN) : end])
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def parse_diff(stdout: str) -> str | None:
    """The dry run's diff between its markers; when the end marker is missing (SSM cut the
    output) what arrived, with a note. None when there is no diff section."""
    lines = stdout.splitlines()
    if DIFF_BEGIN not in lines:
        return None
    body = lines[lines.index(DIFF_BEGIN) + 1 :]
    if DIFF_END in body:
        return "\n".join(body[: len(body) - 1 - body[::-1].index(DIFF_END)])
    return "\n".join([*body, "... (the output was cut before the end of the diff)"])


def strip_report(stderr: str) -> str:
    begin = stderr.rfind(REPORT_BEGIN)
    return stderr[:begin].rstrip() if begin >= 0 else stderr


def was_truncated(stdout: str, stderr: str) -> list[str]:
    cut = []
    if len(stdout) >= STDOUT_LIMIT:
        cut.append(f"standard output (SSM returns the first {STDOUT_LIMIT:,} characters)")
    if len(stderr) >= STDERR_LIMIT:
        cut.append(f"standard error (SSM returns the first {STDERR_LIMIT:,} characters)")
    return cut


# Every ASCII punctuation character: CommonMark lets a backslash escape any of them.
_PUNCTUATION = re.compile(r"[!-/:-@\[-`{-~]")
_BACKTICKS = re.compile(r"`+")


def _one_line(value: Any) -> str:
    return " ".join(str(value).splitlines())


def _text(value: Any) -> str:
    """Untrusted text (a message, a name from the cluster) as inline Markdown that shows as
    itself: every ASCII punctuation character is backslash-escaped, so no link, image, HTML
    tag, emphasis, table cell or autolink can form from it, and line breaks become spaces so
    it stays in its table row or paragraph. GitHub's parser still links an e-mail address
    whose `@` is escaped, so a word joiner (U+2060, invisible) goes before each `@`."""
    return _PUNCTUATION.sub(lambda m: "\\" + m[0], _one_line(value)).replace("\\@", "\u2060\\@")


def _code(value: Any) -> str:
    """Untrusted text as a code span (nothing renders inside one), fenced by more backticks
    than it holds; `|` stays escaped, which a table cell needs even inside code."""
    text = _one_line(value).replace("|", "\\|")
    fence = "`" * (max((len(run) for run in _BACKTICKS.findall(text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _fence(lines: list[str]) -> str:
    body = "\n".join(str(line).replace("```", "'''") for line in lines)
    return f"```\n{body}\n```\n"


def console_url(region: str, command_id: str) -> str:
    return f"https://{region}.console.aws.amazon.com/systems-manager/run-command/{command_id}?region={region}"


STATUS_HEADLINES = {
    Status.SUCCESS: "✅ Deployed",
    Status.ROLLED_BACK: "↩️ Deploy failed and was rolled back",
    Status.FAILED: "❌ Deploy failed",
    Status.TIMED_OUT: "⏱️ Deploy timed out",
    Status.CANCELLED: "🛑 Deploy cancelled",
}


RESULT_ICONS = {
    Status.SUCCESS: "✅",
    Status.ROLLED_BACK: "↩️",
    Status.FAILED: "❌",
    Status.TIMED_OUT: "⏱️",
    Status.CANCELLED: "🛑",
}


def results_table(results: list[dict[str, Any]], region: str) -> list[str]:
    """Fleet mode: what happened on each instance."""
    lines = [
        "### Instances",
        "",
        "| Instance | Name | Cluster | Result | Rolled back | Exit | Seconds | Command | Message |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        command_id = r.get("command-id") or ""
        link = f"[`{command_id[:8]}`]({console_url(region, command_id)})" if command_id else "-"
        seconds = r.get("seconds")
        lines.append(
            f"| {_code(r.get('instance-id', ''))} | {_text(r.get('name') or '-')} "
            f"| {_text(r.get('cluster') or '-')} "
            f"| {RESULT_ICONS.get(r.get('status', ''), '')} {_text(r.get('status', ''))} "
            f"| {str(bool(r.get('rolled-back'))).lower()} "
            f"| {_text('-' if r.get('exit-code') is None else r['exit-code'])} "
            f"| {'-' if seconds is None else _text(seconds)} | {link} | {_text(r.get('message', ''))} |"
        )
    return [*lines, ""]


def failure_section(failure: dict[str, Any]) -> list[str]:
    """The container that made the deploy fail: where, why, and the end of its log."""
    where = f"{failure.get('workload', '')}"
    if failure.get("namespace"):
        where = f"{failure['namespace']}/{where}"
    lines = [
        "### What failed",
        "",
        f"Pod {_code(failure.get('pod', ''))}, container {_code(failure.get('container') or '?')} "
        f"of {_text(where)}: **{_text(failure.get('reason', ''))}**",
        "",
    ]
    if failure.get("message"):
        lines += [f"> {_text(failure['message'])}", ""]
    log = [str(line) for line in failure.get("log") or []]
    if log:
        lines += ["Last lines of its log:", "", _fence(log)]
    return lines


def diff_section(diff: str) -> list[str]:
    """The dry run's diff, fenced, cut to fit the summary."""
    if not diff.strip():
        return ["### Diff", "", "No differences: the cluster already matches the manifests.", ""]
    text = diff
    if len(text) > SUMMARY_DIFF_CHARS:
        cut = text.rfind("\n", 0, SUMMARY_DIFF_CHARS)
        cut = cut if cut > 0 else SUMMARY_DIFF_CHARS
        text = f"{text[:cut]}\n... (cut here: {len(diff) - cut:,} more characters in the log)"
    body = text.replace("```", "'''")
    return ["### Diff", "", f"```diff\n{body}\n```", ""]


def wide_changes_section(changes: list[Any]) -> list[str]:
    """The cluster-scoped and kube-system objects the deploy created or changed (the script's
    `cluster_changes`: "created KIND/NAME", "changed KIND kube-system/NAME")."""
    lines = [
        "### Changed outside the deploy's namespaces",
        "",
        "Cluster-scoped objects and objects in kube-system that this deploy created or changed:",
        "",
        "| Change | Object |",
        "|---|---|",
    ]
    for item in changes:
        change, _, what = _one_line(item).partition(" ")
        lines.append(f"| {_text(change)} | {_code(what)} |")
    return [*lines, ""]


def _listed(items: Any, count: Any) -> list[str]:
    shown = [str(item) for item in items] if isinstance(items, list) else []
    lines = [f"- {_code(item)}" for item in shown]
    more = count - len(shown) if isinstance(count, int) else 0
    if more > 0:
        lines.append(f"- and {more} more (the log lists them all)")
    return lines


JOB_RESULTS = {
    "completed": "ran, completed",
    "unchanged": "not run again: completed with this spec before",
    "failed": "failed",
    "timed-out": "did not complete in time",
    "not-run": "not run (the deploy stopped before it)",
}


def jobs_section(jobs: list[Any]) -> list[str]:
    """The migration Jobs, in the order they ran (the script's `jobs`)."""
    lines = ["### Jobs", "", "| Job | Result |", "|---|---|"]
    for job in jobs:
        if not isinstance(job, dict):
            continue
        name = f"job/{job.get('name', '')}"
        if job.get("namespace"):
            name = f"{job['namespace']}/{name}"
        result = str(job.get("result", ""))
        lines.append(f"| {_text(name)} | {_text(JOB_RESULTS.get(result, result))} |")
    return [*lines, ""]


def prune_section(prune: dict[str, Any], *, dry_run: bool) -> list[str]:
    """What prune deleted (or, in a dry run, would delete), kept, and could not delete (the
    script's `prune`: lists of "KIND[.GROUP] NAMESPACE/NAME", some with why in brackets)."""
    lines = ["### Would prune" if dry_run else "### Pruned", ""]
    release = _code(prune.get("release", ""))
    if prune.get("note"):
        lines += [f"Prune of release {release} skipped: {_text(prune['note'])}", ""]
    key = "would" if dry_run else "pruned"
    done = _listed(prune.get(key), prune.get(f"{key}_count"))
    verb = "a deploy would delete" if dry_run else "deleted"
    if done:
        lines += [f"Objects of release {release} that this deploy no longer has, {verb}:", "", *done, ""]
    elif not prune.get("note"):
        lines += [f"Nothing to prune: release {release} has nothing that this deploy left out.", ""]
    failed = _listed(prune.get("failed"), prune.get("failed_count"))
    if failed:
        lines += ["Could not be deleted, still in the cluster:", "", *failed, ""]
    kept = _listed(prune.get("kept"), prune.get("kept_count"))
    if kept:
        lines += ["Left alone:", "", *kept, ""]
    return lines


def prune_left(report: dict[str, Any] | None) -> str:
    """What a healthy deploy's prune could not do: "" when it did all it meant to."""
    prune = report.get("prune") if report else None
    if not isinstance(prune, dict):
        return ""
    if prune.get("failed"):
        left = ", ".join(str(item) for item in prune["failed"])
        count = prune.get("failed_count", len(prune["failed"]))
        return f"{count} object(s) could not be pruned and remain in the cluster: {left}"
    if prune.get("note"):
        return f"prune skipped: {prune['note']}"
    return ""


def summary_markdown(outcome: Outcome, region: str) -> str:
    report = outcome.report
    headline = STATUS_HEADLINES.get(outcome.status, outcome.status)
    if outcome.dry_run:
        headline = (
            "🔍 Dry run: nothing was changed"
            if outcome.status == Status.SUCCESS
            else (f"{headline} (dry run: nothing was changed)")
        )
    lines = [f"## {headline}", ""]
    if outcome.message:
        lines += [_text(outcome.message), ""]
    if outcome.fix:  # the action's own advice (errors.py), Markdown it wrote itself
        lines += [f"**How to fix:** {_one_line(outcome.fix)}", ""]
    lines += ["| | |", "|---|---|"]
    if outcome.results is not None:  # fleet mode: the instances have their own table below
        lines.append(f"| Instances | {len(outcome.results)} |")
        commands = [c for c in outcome.command_id.split(",") if c]
        if commands:
            links = ", ".join(f"[`{c}`]({console_url(region, c)})" for c in commands)
            lines.append(f"| Commands | {links} |")
    else:
        if outcome.instance_id:
            lines.append(f"| Instance | {_code(outcome.instance_id)} |")
        if outcome.command_id:
            lines.append(f"| Command | [`{outcome.command_id}`]({console_url(region, outcome.command_id)}) |")
    lines.append(f"| Status | `{outcome.status}` (rolled back: {str(outcome.rolled_back).lower()}) |")
    lines.append(f"| Duration | {outcome.duration} s |")
    if outcome.images:
        lines.append("| Images | " + "<br>".join(_code(image) for image in outcome.images) + " |")
    lines.append("")
    if outcome.results is not None:
        lines += results_table(outcome.results, region)
    if report and report.get("workloads"):
        lines += [
            "### Workloads",
            "",
            "| Workload | Ready | Updated | Revision | Result |",
            "|---|---|---|---|---|",
        ]
        for w in report["workloads"]:
            name = f"{w.get('kind', '')}/{w.get('name', '')}"
            if w.get("namespace"):
                name = f"{w['namespace']}/{name}"
            revision = f"{w.get('revision_before') or '-'} → {w.get('revision_after') or '-'}"
            lines.append(
                f"| {_text(name)} | {_text(w.get('ready', '?'))}/{_text(w.get('desired', '?'))} "
                f"| {_text(w.get('updated', '?'))} | {_text(revision)} | {_text(w.get('result', ''))} |"
            )
        lines.append("")
    jobs = report.get("jobs") if report else None
    if jobs and isinstance(jobs, list):
        lines += jobs_section(jobs)
    changes = report.get("cluster_changes") if report else None
    if changes and isinstance(changes, list):
        lines += wide_changes_section(changes)
    prune = report.get("prune") if report else None
    if isinstance(prune, dict):
        lines += prune_section(prune, dry_run=outcome.dry_run)
    failure = report.get("failure") if report else None
    if isinstance(failure, dict) and failure.get("pod"):
        lines += failure_section(failure)
    if outcome.diff is not None:
        lines += diff_section(outcome.diff)
    if report and report.get("pods"):
        lines += ["### Pods", "", _fence(list(report["pods"]))]
    if report and report.get("events"):
        lines += ["### Recent warning events", "", _fence(list(report["events"]))]
    return "\n".join(lines) + "\n"
