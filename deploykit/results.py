"""What each target said, and the run's conclusion from all of them.

Every transport (one master through SSM, a fleet, the local script) turns what its targets did
into one `TargetResult` each; `conclude` turns those into the run's status and message, the
same way for all of them. One target is the smallest fleet: its message is its own; many
targets get a count and a table (`Outcome.results`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deploykit import contract
from deploykit.contract import Status
from deploykit.errors import RemoteCommandFailed
from deploykit.report import Outcome

FIX_FLEET = (
    "The results table in the step summary says what happened on each instance; the log has the "
    "output of the failed ones. Run the deploy again once they are fixed: the others are up to date."
)
# A target not (yet) known to have changed anything.
NOT_SENT = "not sent"


@dataclass
class TargetResult:
    instance_id: str  # "" for the local transport
    name: str = ""
    cluster: str = ""
    command_id: str = ""
    status: Status = Status.FAILED
    rolled_back: bool = False
    exit_code: int | None = None
    ssm_status: str = ""
    message: str = NOT_SENT
    seconds: float | None = None
    sent: bool = False  # the command went out (or the script was started)
    never_started: bool = False  # the command went out and SSM says it never ran
    reported: bool = False  # the deploy script itself said how it ended (its exit code)
    report: dict[str, Any] | None = None  # the script's report, where it was read
    diff: str | None = None  # a dry run's diff, where it was read
    fix: str = ""  # the advice when it failed (the transport's words)

    @property
    def needs_rollback(self) -> bool:
        """The script could not say what it changed (killed, stopped, timed out, cut off) after
        it may have changed something: the action sends the rollback entry point."""
        return (
            self.sent
            and not self.reported
            and not self.never_started
            and self.status in (Status.FAILED, Status.TIMED_OUT)
            and not (self.exit_code is not None and contract.nothing_changed(self.exit_code))
        )

    def undone(self, rolled_back: bool) -> None:
        """The action's rollback ended: a failure it undid becomes `rolled-back`."""
        self.rolled_back = rolled_back
        if rolled_back and self.status == Status.FAILED:
            self.status = Status.ROLLED_BACK

    def as_output(self) -> dict[str, Any]:
        return {
            "instance-id": self.instance_id,
            "name": self.name,
            "cluster": self.cluster,
            "command-id": self.command_id,
            "status": self.status,
            "rolled-back": self.rolled_back,
            "exit-code": self.exit_code,
            "ssm-status": self.ssm_status,
            "seconds": None if self.seconds is None else round(self.seconds, 1),
            "message": self.message,
        }


def judge_report(result: TargetResult, found: dict[str, Any], code: int) -> None:
    """Status, rolled-back and message of a target whose script reported (its JSON report and
    its exit code)."""
    result.report, result.reported = found, True
    if code == 0:
        result.status = Status.SUCCESS
        result.message = str(found.get("message") or "Every workload is ready.")
        return
    rolled_back = found.get("rollback") == "done"
    result.rolled_back = rolled_back
    if found.get("result") == "timed-out":
        result.status = Status.TIMED_OUT
    else:
        result.status = Status.ROLLED_BACK if rolled_back else Status.FAILED
    result.message = str(found.get("message") or contract.meaning(code))
    if found.get("rollback") == "failed":
        result.message += " The rollback failed too: check the workloads by hand."


def conclude(
    outcome: Outcome,
    results: list[TargetResult],
    *,
    many: bool,
    dry_run: bool = False,
    failure: type[RemoteCommandFailed] = RemoteCommandFailed,
) -> None:
    """The run's status from its targets': `success` only when every target succeeded,
    otherwise the worst of the others. Raises `failure` when the run failed."""
    counted = [r for r in results if r.status != Status.FAILED_OVER]
    failed = [r for r in counted if r.status != Status.SUCCESS]
    if many:
        outcome.results = [r.as_output() for r in results]
    if not counted:
        outcome.status, outcome.message = Status.FAILED, "No instance to deploy to."
        raise failure(outcome.message, fix=FIX_FLEET)
    if not many:
        (one,) = counted
        outcome.status, outcome.rolled_back, outcome.message = one.status, one.rolled_back, one.message
        outcome.report = one.report
        if one.diff is not None:
            outcome.diff = one.diff
        if failed:
            raise failure(outcome.message, fix=one.fix)
        return
    if not failed:
        outcome.status = Status.SUCCESS
        outcome.message = (
            f"Dry run on all {len(counted)} instance(s): each cluster accepts the bundle; nothing changed."
            if dry_run
            else f"Deployed to all {len(counted)} instance(s); every workload is ready."
        )
        return
    statuses = {r.status for r in failed}
    outcome.status = next(
        (s for s in (Status.CANCELLED, Status.FAILED, Status.TIMED_OUT) if s in statuses),
        Status.ROLLED_BACK,
    )
    outcome.rolled_back = all(r.rolled_back for r in failed)
    deployed = len(counted) - len(failed)
    outcome.message = (
        f"Deployed to {deployed} of {len(counted)} instance(s); "
        + "; ".join(f"{r.instance_id}: {r.status}" for r in failed[:10])
        + (f"; and {len(failed) - 10} more" if len(failed) > 10 else "")
        + "."
    )
    raise failure(outcome.message, fix=FIX_FLEET)
