"""Reading the SSM command the simulated agent ran (deploykit/command.py `program`)."""

from __future__ import annotations

import shlex


def entry_point(script: object) -> str | None:
    """deploy, dry-run or rollback: the value the program's `entry=` line sets (the same for
    AWS-RunShellScript's quoted value and the custom document's filled-in one)."""
    for line in str(script).splitlines():
        if line.startswith("entry="):
            return shlex.split(line)[0].removeprefix("entry=")
    return None
