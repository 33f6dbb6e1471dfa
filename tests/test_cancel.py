"""The cancel handlers of the entry point (deploykit/cli.py CancelHandlers), in a real process:
the first SIGINT/SIGTERM raises JobCancelled where the program stands, later ones are ignored,
and a cleanup still running at the deadline is cut short with the outputs written."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROGRAM = """
import sys, time
from pathlib import Path
from deploykit import cli
from deploykit.errors import JobCancelled

cli.CANCEL_DEADLINE = float(sys.argv[2])
marks = Path(sys.argv[1])
handlers = cli.install_cancel_handlers()
handlers.last_words = lambda: marks.write_text(marks.read_text() + "last words\\n")
try:
    marks.write_text("ready\\n")  # inside the try: a signal may come at once
    time.sleep(60)  # the deploy, waiting
except JobCancelled as exc:
    marks.write_text(marks.read_text() + f"cancelled by {exc}\\n")
    time.sleep(float(sys.argv[3]))  # the cleanup; a second signal must not interrupt it
    handlers.disarm()
    marks.write_text(marks.read_text() + "cleaned up\\n")
    sys.exit(1)
"""


def start(tmp_path: Path, deadline: float, cleanup: float) -> tuple[subprocess.Popen[bytes], Path]:
    marks = tmp_path / "marks"
    marks.write_text("")
    process = subprocess.Popen(
        [sys.executable, "-c", PROGRAM, str(marks), str(deadline), str(cleanup)], cwd=REPO
    )
    limit = time.monotonic() + 30
    while "ready" not in marks.read_text():
        assert time.monotonic() < limit and process.poll() is None, "the program did not start"
        time.sleep(0.02)
    return process, marks


def test_first_signal_cancels_later_ones_do_not_interrupt_the_cleanup(tmp_path: Path) -> None:
    process, marks = start(tmp_path, deadline=30, cleanup=1.0)

    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)  # the runner's second signal, during the cleanup

    assert process.wait(timeout=20) == 1
    assert marks.read_text().splitlines() == ["ready", "cancelled by SIGINT", "cleaned up"]


def test_a_cleanup_still_running_at_the_deadline_is_cut_short_after_its_last_words(tmp_path: Path) -> None:
    process, marks = start(tmp_path, deadline=0.5, cleanup=60)

    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)

    assert process.wait(timeout=20) == 1
    assert time.monotonic() - signalled < 10
    assert marks.read_text().splitlines() == ["ready", "cancelled by SIGTERM", "last words"]
