"""The figures section of docs/RELIABILITY.md is rendered from what the reliability tests noted:
a failed test shows as failed, and a bucket left behind counts as unexplained unless the test
that left it said why."""

from __future__ import annotations

from tests.reliability import figures


def row(test: str, passed: bool = True, **notes: object) -> dict[str, object]:
    return {"test": f"tests/reliability/{test}", "passed": passed, "notes": notes, "seconds": 1.0}


def test_the_counts_come_from_the_rows() -> None:
    rows = [
        row("test_aws_faults.py::a", table="aws", operation="PutObject", fault="throttle", proxy_injected=2),
        row(
            "test_aws_faults.py::b", False, table="aws", operation="PutObject", fault="drop", proxy_injected=1
        ),
        row("test_bad_input.py::c", table="bad-input", input="timeout", examples=40),
    ]
    text = figures.render(rows, {"wall_seconds": 12.0, "workers": 4, "cpus": 2})
    assert "3 tests, 2 passed, 1 failed" in text
    assert "in 12 s of wall-clock time with 4 workers on 2 CPUs" in text
    assert "| faults injected | 3 |" in text
    assert "| runs that kept every promise | 1 of 2 |" in text
    assert "| `PutObject` | ✅ 2 | ❌ 1 |" in text
    assert "| bad-input examples tried | 40 |" in text


def test_a_bucket_left_without_a_reason_is_counted_as_unexplained() -> None:
    rows = [
        row("test_cancel.py::kill", table="kill", left=1, left_after_sweep=0, left_because="after a SIGKILL"),
        row("test_remote_steps.py::x", table="remote", left=1),
    ]
    text = figures.render(rows)
    assert "| staged buckets left after the run | 2 (1 after a SIGKILL) |" in text
    assert "| staged buckets left for no stated reason | 1 |" in text
    assert "| staged buckets left after `sweep` | 1 |" in text
