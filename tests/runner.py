"""How the GitHub runner reads a step's output for workflow commands, to check ours against.

The rules, from the runner's ActionCommandManager and ActionCommand (actions/runner):
- output is read line by line; a line ends at LF, CR or CRLF (.NET's StreamReader.ReadLine);
- a line is a command when, after leading white space, it starts with `::name` and holds a
  second `::` (the current form), or when it holds `##[name` followed by `]` anywhere (the old
  form, which the runner still honours);
- after `::stop-commands::TOKEN` no command is taken until a line that is the command `TOKEN`
  itself (`::TOKEN::`).

The model errs on the side of seeing commands: any command name counts, not only the ones the
runner knows, so a test that finds none here would find none on a runner.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LINE_BREAK = re.compile(r"\r\n|\r|\n")
CURRENT = re.compile(r"::(?P<name>[^\s:]+)(?: [^:]*)?::(?P<data>.*)", re.DOTALL)
OLD = re.compile(r"##\[(?P<name>[^\s\]]+)[^\]]*\](?P<data>.*)", re.DOTALL)


@dataclass(frozen=True)
class Command:
    name: str
    data: str
    line: str


def commands(output: str) -> list[Command]:
    """Every workflow command a runner would act on in `output`, in order (the stop and resume
    commands included)."""
    found: list[Command] = []
    stopped_by = ""
    for line in LINE_BREAK.split(output):
        text = line.lstrip()  # .NET's TrimStart: str.isspace is a superset of char.IsWhiteSpace
        match = CURRENT.fullmatch(text) if text.startswith("::") else OLD.search(line)
        if not match:
            continue
        command = Command(match["name"], match["data"], line)
        if stopped_by:
            if command.name.lower() == stopped_by.lower():
                stopped_by = ""
                found.append(command)
            continue
        if command.name == "stop-commands":
            stopped_by = command.data
        found.append(command)
    return found


def issued_by(output: str, marker: str) -> list[Command]:
    """The commands whose line holds `marker`: those an untrusted text managed to issue."""
    return [c for c in commands(output) if marker in c.line]


def named(output: str, name: str) -> list[Command]:
    """The commands called `name`. Hostile text in tests issues commands of a name the action
    never uses, so it is told apart from the action's own commands, which may quote it in
    their (escaped) message."""
    return [c for c in commands(output) if c.name.lower() == name.lower()]
