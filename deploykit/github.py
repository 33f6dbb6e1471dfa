"""Everything the action says to the GitHub runner: workflow commands, outputs, summary, state.

Nothing else in deploykit prints a workflow command. Outside a runner (the CLI on a laptop) the
same lines are printed; outputs and summary are written only where their files are set.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TextIO

SUMMARY_LIMIT = 1024 * 1024  # GitHub refuses step summaries over 1 MiB


def escape_data(text: str) -> str:
    """Escape a workflow command's message (the part after `::`)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """Escape a workflow command's property value (e.g. `title=`)."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def neutralise(text: str) -> str:
    """Make untrusted text unable to issue a workflow command.

    The runner reads a step's output line by line, ending a line at LF, CR or CRLF, and takes a
    line as a command when it starts with `::` after leading white space, or when it holds the
    older `##[name]` form anywhere. So the text is cut at every line break (Python's, a
    superset of the runner's), and each piece is defused on its own; the pieces are joined with
    LF. A zero-width space goes between the colons and into `##[`, so the text still reads the
    same.
    """
    return "\n".join(_neutralise_line(line) for line in text.splitlines())


def _neutralise_line(line: str) -> str:
    line = line.replace("##[", "#\u200b#[")
    return line.replace("::", ":\u200b:") if line.lstrip().startswith("::") else line


class Workflow:
    def __init__(self, env: Mapping[str, str], out: TextIO | None = None) -> None:
        self._out = out or sys.stdout
        self._output_file = env.get("GITHUB_OUTPUT") or None
        self._summary_file = env.get("GITHUB_STEP_SUMMARY") or None
        self._state_file = env.get("GITHUB_STATE") or None
        self._masked: list[str] = []
        self._summary_written = 0

    # plain progress
    def log(self, line: str) -> None:
        print(neutralise(line), file=self._out, flush=True)

    # workflow commands
    def mask(self, value: str) -> None:
        """Ask the runner to hide `value` in every later log line. Call before printing it."""
        for part in value.splitlines():
            if part.strip() and part not in self._masked:
                self._masked.append(part)
                print(f"::add-mask::{escape_data(part)}", file=self._out, flush=True)

    def redact(self, text: str) -> str:
        """Remove masked values from text that goes to files the runner does not mask."""
        for value in self._masked:
            text = text.replace(value, "***")
        return text

    def error(self, title: str, message: str) -> None:
        self._command("error", message, title=title)

    def warning(self, message: str, title: str | None = None) -> None:
        self._command("warning", message, title=title)

    def notice(self, message: str, title: str | None = None) -> None:
        self._command("notice", message, title=title)

    def _command(self, name: str, message: str, title: str | None) -> None:
        props = f" title={escape_property(title)}" if title else ""
        print(f"::{name}{props}::{escape_data(message)}", file=self._out, flush=True)

    @contextlib.contextmanager
    def group(self, title: str) -> Iterator[None]:
        print(f"::group::{escape_data(title)}", file=self._out, flush=True)
        try:
            yield
        finally:
            print("::endgroup::", file=self._out, flush=True)

    @contextlib.contextmanager
    def untrusted(self) -> Iterator[None]:
        """A stretch of output that someone else wrote (the master's, the deploy script's, the
        image build's): the runner is told to stop taking commands until it ends, under a
        token nobody can guess, and each line is neutralised as well. Print no workflow
        command of our own inside it: the runner would ignore it."""
        token = secrets.token_hex(16)
        print(f"::stop-commands::{token}", file=self._out, flush=True)
        try:
            yield
        finally:
            print(f"::{token}::", file=self._out, flush=True)

    def echo_untrusted(self, text: str) -> None:
        """Print remote output so that nothing in it can issue a workflow command."""
        with self.untrusted():
            if body := neutralise(text):
                print(body, file=self._out)

    # files
    def set_output(self, name: str, value: str) -> None:
        if not self._output_file:
            return
        value = self.redact(value)
        with open(self._output_file, "a", encoding="utf-8") as f:
            if "\n" in value or "\r" in value:
                delimiter = f"ghadelimiter_{secrets.token_hex(16)}"
                f.write(f"{name}<<{delimiter}\n{value}\n{delimiter}\n")
            else:
                f.write(f"{name}={value}\n")

    def save_state(self, name: str, value: str) -> None:
        """Pass a value to the post-entrypoint (read back there as STATE_<name>)."""
        if not self._state_file:
            return
        with open(self._state_file, "a", encoding="utf-8") as f:
            f.write(f"{name}={value}\n")

    def summary(self, markdown: str) -> None:
        if not self._summary_file:
            return
        data = self.redact(markdown)
        room = SUMMARY_LIMIT - self._summary_written - 200
        if len(data.encode()) > room:
            data = data.encode()[: max(room, 0)].decode("utf-8", "ignore")
            data += "\n\n_(summary cut at GitHub's 1 MiB limit)_\n"
        Path(self._summary_file).parent.mkdir(parents=True, exist_ok=True)
        with open(self._summary_file, "a", encoding="utf-8") as f:
            f.write(data)
        self._summary_written += len(data.encode())
