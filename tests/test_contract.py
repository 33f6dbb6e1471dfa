"""The exit codes the action knows (deploykit/contract.py) against the ones the deploy script's
header lists: a code added to one and not the other fails here."""

from __future__ import annotations

import re

import pytest

from deploykit import command, contract, errors


def header_codes() -> dict[int, str]:
    """`#   N  meaning` lines of the script header's "Exit codes" block."""
    text = command.deploy_script().decode()
    block = text[text.index("# Exit codes") :].split("\n\n", 1)[0]
    return {int(m[1]): m[2] for m in re.finditer(r"^#   (\d+)\s+(.+)$", block, re.MULTILINE)}


def test_the_action_knows_every_exit_code_the_script_lists_and_no_other() -> None:
    listed = header_codes()
    assert set(listed) == {0, *range(2, 13)}, listed
    known = {code for code in contract.EXITS if code not in (contract.EXIT_DOWNLOAD_FAILED,
                                                               contract.EXIT_CHECKSUM_MISMATCH)}
    assert known == set(listed)


def test_the_codes_that_change_nothing_are_the_ones_before_the_apply() -> None:
    listed = header_codes()
    for code, said in listed.items():
        before = "nothing was run" in said or "before anything changed" in said or code in (3, 4, 6)
        assert contract.nothing_changed(code) == (before and code != 0), (code, said)
    assert contract.nothing_changed(contract.EXIT_CHECKSUM_MISMATCH)
    assert contract.nothing_changed(contract.EXIT_DOWNLOAD_FAILED)
    assert not contract.nothing_changed(1) and not contract.nothing_changed(143)


def test_the_status_follows_the_exit_code() -> None:
    assert {code: (e.status, e.rolled_back) for code, e in contract.EXITS.items() if e.changed} == {
        0: ("success", False), 7: ("rolled-back", True), 8: ("failed", False), 9: ("failed", False),
        10: ("timed-out", True), 11: ("timed-out", False), 12: ("timed-out", False)}


@pytest.mark.parametrize(("code", "ssm", "local"), [
    (3, errors.FIX_MISSING_TOOL, errors.FIX_MISSING_TOOL_LOCAL),
    (4, errors.FIX_K3S_UNRESPONSIVE, errors.FIX_KUBE_API_LOCAL),
    (5, errors.FIX_BUNDLE_REJECTED, errors.FIX_BUNDLE_REJECTED),
    (6, errors.FIX_LOCK, errors.FIX_LOCK),
    (7, errors.FIX_ROLLOUT_STUCK, errors.FIX_ROLLOUT_STUCK),
])
def test_each_transport_gets_the_advice_of_the_exit_code(code: int, ssm: str, local: str) -> None:
    assert contract.advice(code, "", "ssm") == ssm
    assert contract.advice(code, "", "local") == local
    assert contract.advice(7, "Back-off pulling image: ImagePullBackOff", "local") == errors.FIX_IMAGE_PULL


def test_an_abort_and_a_signal_say_what_they_are() -> None:
    assert contract.meaning(1) == "the deploy script stopped on an unexpected error"
    assert contract.meaning(143) == "the deploy script was stopped by signal 15"
    assert contract.meaning(77) == "exit code 77"


def test_a_failed_migration_job_gets_its_own_advice() -> None:
    text = ("==> waiting for job/migrate in shop to complete\n"
            "error: job/migrate in shop failed (BackoffLimitExceeded) after 1 failed attempt(s); ...")
    assert contract.advice(9, text, "local") == errors.FIX_JOB_FAILED
    timed_out = "error: job/migrate did not complete in time (1 active, 0 failed attempt(s))"
    assert contract.advice(12, timed_out, "ssm") == errors.FIX_JOB_FAILED
    # A Job whose image cannot be pulled: the pull advice says more.
    assert contract.advice(9, text + " ImagePullBackOff", "local") == errors.FIX_IMAGE_PULL
    assert contract.advice(7, "error: deployment/api: pod api-1 ...", "local") == errors.FIX_ROLLOUT_STUCK
