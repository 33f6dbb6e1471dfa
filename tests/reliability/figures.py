"""The figures of docs/RELIABILITY.md, collected from the suite as it runs.

Tests note what they did on their pytest item (`note(request.node, ...)`: the table and row
they belong to, faults injected, resources left, examples tried); the rig fixture adds the
faults its proxy injected. When a session has run the whole reliability suite, the section of
docs/RELIABILITY.md between the two markers is rewritten from those notes, and the raw notes go
to docs/reliability-figures.json. A partial run (-k, a single test, -x stopping early) writes
nothing, so the committed figures are always those of a full run.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

KEY = "reliability"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DOC = ROOT / "docs" / "RELIABILITY.md"
RAW = ROOT / "docs" / "reliability-figures.json"
BEGIN = "<!-- figures:begin (written by tests/reliability/figures.py; do not edit) -->"
END = "<!-- figures:end -->"

_results: dict[str, dict[str, Any]] = {}
_started = time.monotonic()
_deselected = False

FAULT_COLUMNS = (
    ("throttle", "throttled"),
    ("server-error", "500"),
    ("unavailable", "503"),
    ("drop", "dropped"),
    ("drop-after", "answer lost"),
    ("access-denied", "AccessDenied"),
    ("expired-token", "ExpiredToken"),
)


def note(node: pytest.Item, **values: Any) -> None:
    """Attach figures to the running test (merged over its phases)."""
    node.user_properties.append((KEY, values))


def note_faults(node: pytest.Item, proxy: Any) -> None:
    node.user_properties.append((KEY, {"proxy_injected": proxy.injected()}))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "tests/reliability/" not in report.nodeid.replace("\\", "/"):
        return
    entry = _results.setdefault(report.nodeid, {"passed": True, "notes": {}})
    if report.failed:
        entry["passed"] = False
    for key, values in report.user_properties:
        if key == KEY:
            entry["notes"].update(values)
    entry["seconds"] = entry.get("seconds", 0.0) + report.duration


def pytest_deselected(items: list[pytest.Item]) -> None:
    global _deselected
    if any("tests/reliability/" in item.nodeid for item in items):
        _deselected = True


def _full_run(session: pytest.Session) -> bool:
    config = session.config
    if _deselected or config.getoption("keyword") or config.getoption("markexpr"):
        return False
    if session.shouldstop or session.shouldfail or config.getoption("lf", False):
        return False
    args = config.args or [str(config.rootpath)]
    for arg in args:
        if "::" in arg:
            return False
    covered = any(Path(arg).resolve() == HERE or HERE.is_relative_to(Path(arg).resolve()) for arg in args)
    ran = [nodeid for nodeid in _results if "tests/reliability/" in nodeid]
    return covered and len(ran) > 0


def write(session: pytest.Session) -> None:
    if hasattr(session.config, "workerinput") or not _full_run(session):
        return  # an xdist worker saw only its share; the controller writes
    rows = [{"test": nodeid, **entry} for nodeid, entry in sorted(_results.items())]
    run = {
        "wall_seconds": round(time.monotonic() - _started, 1),
        "workers": session.config.getoption("numprocesses", None) or 1,
        "cpus": os.cpu_count(),
    }
    RAW.write_text(json.dumps({"run": run, "tests": rows}, indent=1, sort_keys=True) + "\n")
    if DOC.exists():
        text = DOC.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            DOC.write_text(head + BEGIN + "\n" + render(rows, run) + END + tail)


# -- rendering ---------------------------------------------------------------------------------


def _short(nodeid: str) -> str:
    return nodeid.split("tests/reliability/", 1)[-1]


def _mark(ok: bool) -> str:
    return "✅" if ok else "❌"


def render(rows: list[dict[str, Any]], run: dict[str, Any] | None = None) -> str:
    out: list[str] = []
    total_faults = sum(_faults(r) for r in rows if r["notes"].get("table") != "bad-input")
    fault_rows = [r for r in rows if r["notes"].get("table") in ("aws", "ssm", "remote", "cancel", "kill")]
    survived = sum(r["passed"] for r in fault_rows)
    left = sum(int(r["notes"].get("left", 0)) for r in fault_rows)
    left_after_sweep = sum(
        int(r["notes"].get("left_after_sweep", r["notes"].get("left", 0))) for r in fault_rows
    )
    # Why a bucket could stay, where a test expects it to (the cleanup's own calls refused, a
    # SIGKILL): any other bucket left counts as unexplained.
    reasons: dict[str, int] = defaultdict(int)
    for r in fault_rows:
        if int(r["notes"].get("left", 0)) and r["notes"].get("left_because"):
            reasons[str(r["notes"]["left_because"])] += int(r["notes"]["left"])
    unexplained = left - sum(reasons.values())
    why = "; ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
    bad = [r for r in rows if r["notes"].get("table") == "bad-input"]
    examples = sum(int(r["notes"].get("examples", 0)) for r in bad)
    bad_failures = sum(not r["passed"] for r in bad)
    security = [r for r in rows if r["notes"].get("table") == "security"]
    seconds = sum(r.get("seconds", 0.0) for r in rows)
    wall = ""
    if run:
        wall = (
            f" in {run['wall_seconds']:.0f} s of wall-clock time with {run['workers']} workers on "
            f"{run['cpus']} CPUs"
        )
    out += [
        "",
        f"Last full run: {len(rows)} tests, {sum(r['passed'] for r in rows)} passed, "
        f"{sum(not r['passed'] for r in rows)} failed, {seconds:.0f} s of test time{wall} "
        f"(Python {platform.python_version()}).",
        "",
        "| | |",
        "|---|---|",
        f"| fault runs (one test each) | {len(fault_rows)} |",
        f"| faults injected | {total_faults} |",
        f"| runs that kept every promise | {survived} of {len(fault_rows)} |",
        f"| staged buckets left after the run | {left}{f' ({why})' if why else ''} |",
        f"| staged buckets left for no stated reason | {unexplained} |",
        f"| staged buckets left after `sweep` | {left_after_sweep} |",
        f"| bad-input examples tried | {examples} |",
        f"| bad-input failures | {bad_failures} |",
        f"| security properties proven | {sum(r['passed'] for r in security)} of {len(security)} |",
        "",
    ]
    out += _aws_table([r for r in rows if r["notes"].get("table") == "aws"])
    for table, title in (
        ("ssm", "SSM outcomes"),
        ("remote", "The deploy script failing at each step"),
        ("cancel", "Cancel signals and kills"),
        ("kill", "Cancel signals and kills"),
    ):
        chosen = [r for r in rows if r["notes"].get("table") == table]
        if not chosen:
            continue
        if table == "kill":
            out.pop()  # same table as "cancel": drop the blank line and go on
            out += _plain_rows(chosen)
            out.append("")
            continue
        out += [
            f"### {title}",
            "",
            "| case | faults injected | status | left | kept its promises |",
            "|---|---|---|---|---|",
        ]
        out += _plain_rows(chosen)
        out.append("")
    if bad:
        out += ["### Bad input", "", "| input | examples tried | failures | test |", "|---|---|---|---|"]
        by_input: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in bad:
            by_input[str(r["notes"].get("input", "?"))].append(r)
        for name in sorted(by_input):
            group = by_input[name]
            out.append(
                f"| `{name}` | {sum(int(r['notes'].get('examples', 0)) for r in group)} | "
                f"{sum(not r['passed'] for r in group)} | "
                + "<br>".join(f"`{_short(r['test'])}`" for r in group)
                + " |"
            )
        out.append("")
    if security:
        out += ["### Security properties", "", "| property | proven by | result |", "|---|---|---|"]
        for r in sorted(security, key=lambda r: str(r["notes"].get("property"))):
            out.append(f"| {r['notes'].get('property')} | `{_short(r['test'])}` | {_mark(r['passed'])} |")
        out.append("")
    return "\n".join(out) + "\n"


def _faults(row: dict[str, Any]) -> int:
    notes = row["notes"]
    return int(notes.get("proxy_injected", 0)) + int(notes.get("other_faults", 0))


def _aws_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    cells: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        cells[str(r["notes"].get("operation"))][str(r["notes"].get("fault"))] = r
    used = [(kind, title) for kind, title in FAULT_COLUMNS if any(kind in c for c in cells.values())]
    out = [
        "### AWS calls",
        "",
        "Each cell is one test: the faults injected into that call, ✅ when the run kept every "
        "promise (outcome, message, nothing left, one release).",
        "",
        "| call | " + " | ".join(title for _, title in used) + " |",
        "|---|" + "---|" * len(used),
    ]
    for operation in sorted(cells):
        line = [f"`{operation}`"]
        for kind, _ in used:
            r = cells[operation].get(kind)
            line.append("" if r is None else f"{_mark(r['passed'])} {_faults(r)}")
        out.append("| " + " | ".join(line) + " |")
    out.append("")
    return out


def _plain_rows(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        notes = r["notes"]
        out.append(
            f"| {notes.get('case', _short(r['test']))} | {_faults(r)} | {notes.get('status', '')} | "
            f"{notes.get('left', 0)} | {_mark(r['passed'])} |"
        )
    return out
