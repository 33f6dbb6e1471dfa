"""What the action and the deploy script agree on about how a run ended: each exit code of
the deploy script (the header in deploykit/scripts/k3s-deploy/00-header.sh lists them;
tests/test_contract.py holds the two to each other) and of the SSM command around it, with
what it means, the status it gives, whether the cluster may have changed, and the advice to
show. Every caller reads them from here: the single-master and fleet deploys through SSM, and
the local transport.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from deploykit.errors import (
    FIX_BUNDLE_REJECTED,
    FIX_CHECKSUM,
    FIX_IMAGE_PULL,
    FIX_JOB_FAILED,
    FIX_K3S_UNRESPONSIVE,
    FIX_KUBE_API_LOCAL,
    FIX_LOCK,
    FIX_MISSING_TOOL,
    FIX_MISSING_TOOL_LOCAL,
    FIX_ROLLOUT_STUCK,
)


class Status(StrEnum):
    """How a run ended, for the whole run (the `status` output) and for each target (fleet
    mode's `results`). A str: it is written and compared as its value."""

    SUCCESS = "success"
    FAILED = "failed"
    ROLLED_BACK = "rolled-back"
    TIMED_OUT = "timed-out"
    CANCELLED = "cancelled"
    # Fleet mode: this server never took the command; the next server of its cluster did.
    FAILED_OVER = "failed-over"


def script_arguments(entry: str, deploy_id: str, state_dir: str, bundle: str | None = None) -> list[str]:
    """The script's command line after `bash k3s-deploy.sh`, the same for the SSM command (with
    its shell variables as values) and the local transport: the entry point (deploy, dry-run,
    rollback), the bundle (not for a rollback), the deploy id and the state folder. Every other
    option travels in the verified bundle (bundle/options)."""
    return [
        entry,
        *(["--bundle", bundle] if bundle is not None else []),
        "--deploy-id",
        deploy_id,
        "--state-dir",
        state_dir,
    ]


# The SSM command's own codes, around the script (command.py).
EXIT_DOWNLOAD_FAILED = 90
EXIT_CHECKSUM_MISMATCH = 91


@dataclass(frozen=True)
class Exit:
    code: int
    meaning: str
    status: Status  # the run's status when the script ended so (and reported)
    rolled_back: bool  # the script undid what it changed
    changed: bool  # the cluster may have changed: the action's rollback is worth sending
    fix: str | None = None  # the advice for transport ssm (None: decided by the output)
    fix_local: str | None = None  # the advice for transport local, when it differs


# The script's error line when a Job (a migration) failed or ran out of time (75-jobs.sh).
JOB_FAILED = re.compile(r"^error: job/\S+ .*(failed|did not complete in time)", re.MULTILINE)

EXITS = {
    e.code: e
    for e in (
        Exit(0, "every workload is ready and healthy", Status.SUCCESS, False, True),
        Exit(2, "the deploy script was called wrongly", Status.FAILED, False, False),
        Exit(
            3,
            "a tool the deploy script needs is missing on the master",
            Status.FAILED,
            False,
            False,
            FIX_MISSING_TOOL,
            FIX_MISSING_TOOL_LOCAL,
        ),
        Exit(
            4,
            "the Kubernetes API on the master is not healthy",
            Status.FAILED,
            False,
            False,
            FIX_K3S_UNRESPONSIVE,
            FIX_KUBE_API_LOCAL,
        ),
        Exit(
            5,
            "the cluster rejected the bundle before anything changed",
            Status.FAILED,
            False,
            False,
            FIX_BUNDLE_REJECTED,
        ),
        Exit(6, "another deploy holds the cluster's deploy lock", Status.FAILED, False, False, FIX_LOCK),
        Exit(
            7, "the deploy failed and the changed workloads were rolled back", Status.ROLLED_BACK, True, True
        ),
        Exit(8, "the deploy failed and the rollback failed too", Status.FAILED, False, True),
        Exit(9, "the deploy failed and nothing was rolled back", Status.FAILED, False, True),
        Exit(
            10,
            "the deploy timed out and the changed workloads were rolled back",
            Status.TIMED_OUT,
            True,
            True,
        ),
        Exit(11, "the deploy timed out and the rollback failed", Status.TIMED_OUT, False, True),
        Exit(12, "the deploy timed out and nothing was rolled back", Status.TIMED_OUT, False, True),
        Exit(
            EXIT_DOWNLOAD_FAILED,
            "the master could not download the staged files from S3",
            Status.FAILED,
            False,
            False,
        ),
        Exit(
            EXIT_CHECKSUM_MISMATCH,
            "the staged files did not match their sha256 sums, so the master refused to run them",
            Status.FAILED,
            False,
            False,
            FIX_CHECKSUM,
        ),
    )
}
# The rollback entry point's code when it undid something (the deploy's "timed out, rolled back").
ROLLBACK_DONE = 10


def meaning(code: int) -> str:
    """What an exit code says, including an abort (1) and a signal (128+N)."""
    if code in EXITS:
        return EXITS[code].meaning
    if code == 1:
        return "the deploy script stopped on an unexpected error"
    if 128 < code < 160:
        return f"the deploy script was stopped by signal {code - 128}"
    return f"exit code {code}"


def nothing_changed(code: int) -> bool:
    """True when the run ended before it could change the cluster: no rollback is needed."""
    return code in EXITS and not EXITS[code].changed


def fix(code: int, transport: str = "ssm") -> str | None:
    """The advice the exit code itself gives, or None when the output must decide (a failed
    rollout: the pods' state says what to look at)."""
    found = EXITS.get(code)
    if found is None:
        return None
    if transport == "local" and found.fix_local:
        return found.fix_local
    return found.fix


def advice(code: int, text: str, transport: str = "ssm") -> str:
    """The advice for a run that failed: by its exit code, else by what its output shows."""
    by_code = fix(code, transport)
    if by_code:
        return by_code
    if any(reason in text for reason in ("ImagePullBackOff", "ErrImagePull", "InvalidImageName")):
        return FIX_IMAGE_PULL
    if JOB_FAILED.search(text):
        return FIX_JOB_FAILED
    return FIX_ROLLOUT_STUCK
