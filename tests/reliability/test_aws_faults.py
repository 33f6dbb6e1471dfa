"""Every AWS call the action makes, faulted on the wire: throttled, answered with a 500, its
connection dropped, its answer lost after AWS acted on it, refused (AccessDenied), or refused
for expired credentials. One test per call and fault.

What each must give:
- throttling, 5xx, dropped connections: retried within botocore's bounds (SendCommand by the
  action itself, never blindly: the master ran the deploy exactly once) and the deploy succeeds;
- AccessDenied: no retry, an error naming the IAM permission, and the cleanup still runs;
- ExpiredToken: no retry, the error says to check the credentials, the cleanup still runs;
- in every case nothing staged is left and every workload holds one release, old or new.
"""

from __future__ import annotations

import signal

import pytest

from tests.reliability import figures
from tests.reliability.conftest import Rig

pytestmark = pytest.mark.e2e

# The calls of an ordinary deploy, in order, with the IAM permission an error must name.
DEPLOY_CALLS = {
    "DescribeInstances": "ec2:DescribeInstances",
    "DescribeInstanceInformation": "ssm:DescribeInstanceInformation",
    "GetCallerIdentity": "sts:GetCallerIdentity",
    "HeadBucket": "s3:ListBucket",
    "CreateBucket": "s3:CreateBucket",
    "PutBucketTagging": "s3:PutBucketTagging",
    "PutPublicAccessBlock": "s3:PutBucketPublicAccessBlock",
    "PutBucketEncryption": "s3:PutEncryptionConfiguration",
    "PutBucketLifecycleConfiguration": "s3:PutLifecycleConfiguration",
    "PutObject": "s3:PutObject",
    "SendCommand": "ssm:SendCommand",
    "GetCommandInvocation": "ssm:GetCommandInvocation",
}
# The cleanup's calls: a refusal there leaves the bucket (named in a warning) for `sweep`.
CLEANUP_CALLS = {
    "ListObjectVersions": "s3:ListBucketVersions",
    "DeleteObjects": "s3:DeleteObject",
    "DeleteBucket": "s3:DeleteBucket",
}
# How many times a clean deploy makes each call (GetCommandInvocation: polled, not counted).
NORMAL_CALLS = {op: 1 for op in {**DEPLOY_CALLS, **CLEANUP_CALLS}} | {"HeadBucket": 2, "PutObject": 2}
del NORMAL_CALLS["GetCommandInvocation"]
TRANSIENT = ("throttle", "server-error", "drop")
REFUSED = ("access-denied", "expired-token")
# How many calls in a row get a transient fault. SendCommand is retried by the action itself,
# with pauses of its own (2 s, 4 s, ...): one fault is enough to prove the path.
TRANSIENT_TIMES = {"SendCommand": 1}


def _cases() -> list[tuple[str, str]]:
    cases = [(op, kind) for op in {**DEPLOY_CALLS, **CLEANUP_CALLS} for kind in TRANSIENT + REFUSED]
    # The answer is lost after AWS acted: the retry meets what the first try did.
    cases += [
        (op, "drop-after")
        for op in ("CreateBucket", "PutObject", "SendCommand", "DeleteObjects", "DeleteBucket")
    ]
    return cases


def _left(rig: Rig) -> int:
    rig.settle()
    return len(rig.staged_buckets())


@pytest.mark.parametrize(("operation", "kind"), _cases(), ids=lambda v: v)
def test_fault_on_aws_call(rig: Rig, operation: str, kind: str, request: pytest.FixtureRequest) -> None:
    times = None if kind in REFUSED else TRANSIENT_TIMES.get(operation, 2)
    fault = rig.fault(operation, kind, times=times)

    run = rig.deploy()

    left = _left(rig)
    figures.note(
        request.node,
        table="aws",
        operation=operation,
        fault=kind,
        status=run.outputs.get("status"),
        left=left,
    )
    assert fault.injected >= 1, f"{operation} was never called\n{run.log}"
    calls = rig.proxy.calls_to(operation)
    if kind in REFUSED:
        _check_refused(rig, run, operation, kind, calls, request, left)
        return
    # transient: retried within bounds, and the deploy succeeds
    assert run.returncode == 0, run.log
    assert run.outputs["status"] == "success"
    if operation == "SendCommand" and kind == "drop-after":
        # The command started but its answer was lost: the action finds it by its comment
        # (ListCommands) and follows it; it never sends the deploy a second time.
        assert len(calls) == 1, [c.fault for c in calls]
        assert rig.proxy.calls_to("ListCommands"), "the lost send was not looked up"
    elif operation in NORMAL_CALLS:
        # every fault cost one retry, no more: the calls beyond the faults are the usual ones
        assert len(calls) - fault.injected == NORMAL_CALLS[operation], [c.fault for c in calls]
    assert len(rig.deploy_runs()) == 1, "the deploy command ran more (or less) than once"
    assert rig.assert_one_release(run) == "v2"
    rig.assert_nothing_left(run)


def _check_refused(rig: Rig, run, operation: str, kind: str, calls, request, left: int) -> None:
    permission = {**DEPLOY_CALLS, **CLEANUP_CALLS}[operation]
    # refused calls are not retried: botocore does not retry them, nor does the action
    assert all(c.fault == kind for c in calls), "a refused call was retried"
    if operation in CLEANUP_CALLS:
        # The deploy itself went through; the bucket stays, named in a warning, for `sweep`.
        assert run.outputs["status"] == "success", run.log
        assert "Cleanup incomplete" in run.log and run.outputs["bucket"] in run.log
        if kind == "access-denied":
            assert permission in run.log, f"the warning does not name {permission}\n{run.log}"
        else:
            assert "credentials" in run.log.lower(), run.log
        assert left == 1
        figures.note(request.node, left_because="whose deletion was refused (the cleanup's own call)")
        rig.proxy.clear()
        _sweep(rig, request)
        assert rig.staged_buckets() == []
        rig.assert_one_release(run)
        return
    assert run.returncode == 1, run.log
    assert run.outputs["status"] in ("failed", "rolled-back"), run.log
    assert "::error" in run.log
    if kind == "access-denied":
        assert permission in run.log, f"the error does not name {permission}\n{run.log}"
    else:
        assert "credentials" in run.log.lower(), run.log
    rig.assert_one_release(run)
    rig.assert_nothing_left(run)


def _sweep(rig: Rig, request: pytest.FixtureRequest) -> None:
    from deploykit import sweep

    found = sweep.sweep(
        rig.sim.client("s3"), rig.sim.client("sts"), older_than=0, delete=True, log=lambda _: None
    )
    figures.note(request.node, left_after_sweep=len(rig.staged_buckets()), swept=len(found))


# -- calls made only on some paths --------------------------------------------------------------


@pytest.mark.parametrize("kind", TRANSIENT + REFUSED)
def test_fault_on_list_commands_after_an_ambiguous_send(
    rig: Rig, kind: str, request: pytest.FixtureRequest
) -> None:
    """SendCommand's answer is lost (the command did start): the action asks ListCommands
    before sending again. Faults there must never make it send the deploy a second time."""
    rig.fault("SendCommand", "drop-after", times=1)
    fault = rig.fault("ListCommands", kind, times=None if kind in REFUSED else 2)

    run = rig.deploy()

    left = _left(rig)
    figures.note(
        request.node,
        table="aws",
        operation="ListCommands",
        fault=kind,
        status=run.outputs.get("status"),
        left=left,
    )
    assert fault.injected >= 1
    assert len(rig.deploy_runs()) == 1, "the deploy command was sent twice"
    assert len(rig.sim.sent_commands()) == 1
    if kind in REFUSED:
        assert run.returncode == 1
        assert ("ssm:ListCommands" if kind == "access-denied" else "credentials") in run.log
    else:
        assert run.outputs["status"] == "success", run.log
    rig.assert_one_release(run)
    rig.assert_nothing_left(run)


@pytest.mark.parametrize("kind", TRANSIENT + REFUSED)
def test_fault_on_cancel_command_when_the_job_is_cancelled(
    rig: Rig, kind: str, request: pytest.FixtureRequest
) -> None:
    """The job is cancelled while the deploy runs: the action cancels the command (faulted) and
    sends the rollback. Whatever CancelCommand answers, the cluster ends on one release."""
    rig.slow_api_rollout(20)
    fault = rig.fault("CancelCommand", kind, times=None if kind in REFUSED else 1)
    started = rig.start()
    rig.on("GetCommandInvocation", lambda _call: started.signal(signal.SIGTERM), after=2)

    run = started.wait()

    left = _left(rig)
    figures.note(
        request.node,
        table="aws",
        operation="CancelCommand",
        fault=kind,
        status=run.outputs.get("status"),
        left=left,
        other_faults=1,
    )
    assert fault.injected >= 1, run.log
    assert run.outputs["status"] == "cancelled", run.log
    if kind in REFUSED:
        assert "Could not cancel command" in run.log
    assert rig.assert_one_release(run, old="v1", new="v2") in ("v1", "v2")
    rig.assert_nothing_left(run)


@pytest.mark.parametrize("kind", TRANSIENT + REFUSED)
def test_fault_on_the_polling_history_lookup(rig: Rig, kind: str, request: pytest.FixtureRequest) -> None:
    """ListCommandInvocations only tunes the polling: any fault there is ignored."""
    fault = rig.fault("ListCommandInvocations", kind, times=None)

    run = rig.deploy()

    left = _left(rig)
    figures.note(
        request.node,
        table="aws",
        operation="ListCommandInvocations",
        fault=kind,
        status=run.outputs.get("status"),
        left=left,
    )
    assert fault.injected >= 1, run.log
    assert run.outputs["status"] == "success", run.log
    rig.assert_one_release(run)
    rig.assert_nothing_left(run)


def test_a_refused_cancel_leaves_the_deploy_that_runs_on_its_files(
    rig: Rig, request: pytest.FixtureRequest
) -> None:
    """CancelCommand is refused while the script still checks the bundle, so the deploy runs on.
    The rollback command the action sends next finds nothing recorded yet, and must not delete
    the download folder the deploy runs from: the deploy finishes, nothing is left."""
    marker = rig.tmp / "checking"
    real = rig.master.bin_dir / "kubectl"
    rig.install_on_master(
        "kubectl-slow-check",
        "#!/bin/sh\n"
        f'case " $* " in *" --dry-run=server "*) : > "{marker}"; sleep 4;; esac\n'
        f'exec "{real}" "$@"\n',
    )
    fault = rig.fault("CancelCommand", "access-denied", times=None)
    started = rig.start(kubectl="kubectl-slow-check")

    def when_checking(_call: object) -> None:
        if marker.exists():
            started.signal(signal.SIGTERM)

    rig.on("GetCommandInvocation", when_checking, times=None)

    run = started.wait()

    left = _left(rig)
    figures.note(
        request.node,
        table="cancel",
        case="SIGTERM while the script checks the bundle, CancelCommand refused (the deploy runs on)",
        status=run.outputs.get("status"),
        left=left,
        other_faults=1,
    )
    assert fault.injected == 1, run.log
    assert run.outputs["status"] == "cancelled", run.log
    assert "Could not cancel command" in run.log
    rollbacks = rig.rollback_runs()
    assert len(rollbacks) == 1, "the action sent no rollback"
    deploys = rig.deploy_runs()
    assert [d["exit_code"] for d in deploys] == [0], rig.master_log()
    assert rig.assert_one_release(run) == "v2"
    rig.assert_nothing_left(run)
