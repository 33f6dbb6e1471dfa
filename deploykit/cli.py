"""Entry points: the action (inputs from INPUT_* variables) and the command line.

`main()` is the one boundary where errors become an `::error` annotation, the outputs and an
exit code. No other function exits the process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import TextIO

from deploykit.contract import Status
from deploykit.errors import DeployError, JobCancelled
from deploykit.github import Workflow
from deploykit.inputs import INPUTS, parse_settings, read_action_inputs
from deploykit.report import Outcome, summary_markdown

OUTPUTS = ("instance-id", "command-id", "status", "rolled-back", "bucket", "duration", "images", "results")


# Seconds from the first cancel signal to the end of the step, whatever is still running. The
# runner sends SIGINT, SIGTERM 7.5 s later, and kills at about 10 s; the container's own
# teardown comes on top.
CANCEL_DEADLINE = 6.0


class CancelHandlers:
    """The runner cancels a job with SIGINT, then SIGTERM, then SIGKILL (about 10 s in all).
    As PID 1 in the container we get neither signal unless we handle it. The first one raises
    JobCancelled where the program stands; later ones are ignored so cleanup can finish. The
    first one also arms a deadline: if the cleanup is still running CANCEL_DEADLINE seconds
    later, `last_words` writes the outputs and the process exits at once (the post-entrypoint
    deletes what is left)."""

    def __init__(self) -> None:
        self.cancelled = False
        self.last_words: Callable[[], None] | None = None

    def install(self) -> CancelHandlers:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        return self

    def disarm(self) -> None:
        """No more deadline (the outputs are being written)."""
        self.last_words = None
        signal.setitimer(signal.ITIMER_REAL, 0)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        signal.signal(signal.SIGALRM, self._on_deadline)
        signal.setitimer(signal.ITIMER_REAL, CANCEL_DEADLINE)
        raise JobCancelled(signal.Signals(signum).name)

    def _on_deadline(self, signum: int, frame: FrameType | None) -> None:
        try:
            if self.last_words is not None:
                self.last_words()
            sys.stdout.flush()
        except BaseException:  # noqa: S110 - exiting now matters more than any message
            pass
        finally:
            os._exit(1)


def install_cancel_handlers() -> CancelHandlers:
    return CancelHandlers().install()


def run_deploy(
    raw: Mapping[str, str],
    env: Mapping[str, str],
    out: TextIO | None = None,
    cancel: CancelHandlers | None = None,
) -> int:
    """Validate, deploy, and write outputs and summary on every path. 0 only for success."""
    gh = Workflow(env, out)
    gh.mask(raw.get("registry-password", ""))  # before anything is printed, even a bad input
    outcome = Outcome()
    started = time.monotonic()
    region = ""

    def out_of_time() -> None:
        outcome.status = Status.CANCELLED
        outcome.message = (
            f"The job was cancelled and its clean-up was still running after {CANCEL_DEADLINE:.0f} s; "
            "the action's post step deletes what is left."
        )
        gh.error("Deploy cancelled", outcome.message)
        _finish_run(gh, outcome, started, region)

    if cancel is not None:
        cancel.last_words = out_of_time
    try:
        settings = parse_settings(raw, env)
        region = settings.aws_region
        from deploykit.awsapi import AwsClients
        from deploykit.deploy import deploy

        deploy(settings, AwsClients(settings.aws_region), gh, outcome)
    except DeployError as exc:
        if outcome.status == Status.SUCCESS:
            outcome.status = Status.FAILED
        outcome.message = outcome.message or exc.message
        outcome.fix = exc.fix or ""
        gh.error(exc.title, exc.message + (f"\nHow to fix: {exc.fix}" if exc.fix else ""))
    except JobCancelled:
        if cancel is not None:
            cancel.disarm()
        outcome.status = Status.CANCELLED
        outcome.message = "The job was cancelled; the log says what was stopped and deleted."
        gh.error("Deploy cancelled", outcome.message)
    except Exception as exc:  # a bug: still write the outputs, and show where it happened
        outcome.status = Status.FAILED
        outcome.message = f"unexpected error: {type(exc).__name__}: {exc}"
        gh.log(traceback.format_exc())
        gh.error("Unexpected error", outcome.message)
    finally:
        if cancel is not None:
            cancel.disarm()
        _finish_run(gh, outcome, started, region)
    return 0 if outcome.status == Status.SUCCESS else 1


def _finish_run(gh: Workflow, outcome: Outcome, started: float, region: str) -> None:
    outcome.duration = round(time.monotonic() - started)
    _write_outputs(gh, outcome)
    gh.summary(summary_markdown(outcome, region))


def _write_outputs(gh: Workflow, outcome: Outcome) -> None:
    values = {
        "instance-id": outcome.instance_id,
        "command-id": outcome.command_id,
        "status": outcome.status,
        "rolled-back": str(outcome.rolled_back).lower(),
        "bucket": outcome.bucket,
        "duration": str(outcome.duration),
        "images": json.dumps(outcome.images or []),
        "results": json.dumps(_results(outcome)),
    }
    for name in OUTPUTS:
        gh.set_output(name, values[name])
    gh.log("Result: " + " ".join(f"{k}={v}" for k, v in values.items() if v))


def _results(outcome: Outcome) -> list[dict[str, object]]:
    """One entry per instance: fleet mode fills them; a single deploy is a fleet of one."""
    if outcome.results is not None:
        return outcome.results
    if not outcome.instance_id:
        return []
    return [
        {
            "instance-id": outcome.instance_id,
            "command-id": outcome.command_id,
            "status": outcome.status,
            "rolled-back": outcome.rolled_back,
        }
    ]


def run_sweep(older_than: str, delete: bool, region: str, env: Mapping[str, str]) -> int:
    """`sweep`: the buckets left behind, listed or deleted. 0 when nothing is left undeleted."""
    gh = Workflow(env)
    try:
        from deploykit import sweep
        from deploykit.awsapi import AwsClients

        seconds = sweep.parse_age(older_than)
        region = region.strip() or env.get("AWS_REGION", "") or env.get("AWS_DEFAULT_REGION", "")
        if not region:
            raise DeployError("--aws-region is required (or AWS_REGION)")
        aws = AwsClients(region)
        leftovers = sweep.sweep(aws.s3, aws.sts, older_than=seconds, delete=delete, log=gh.log)
    except DeployError as exc:
        gh.error(exc.title, exc.message + (f"\nHow to fix: {exc.fix}" if exc.fix else ""))
        return 1
    return 1 if any(leftover.error for leftover in leftovers if leftover.ours) else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploykit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    deploy = commands.add_parser("deploy", help="deploy manifests (flags are the action's inputs)")
    for name, (default, help_text) in INPUTS.items():
        deploy.add_argument(f"--{name}", dest=name, help=f"{help_text} (default: {default or 'none'})")
    sweep = commands.add_parser("sweep", help="list (and with --delete, delete) staging buckets left behind")
    sweep.add_argument("--older-than", default="6h", help="only buckets older than this: 30m, 6h, 2d, 0s")
    sweep.add_argument("--delete", action="store_true", help="delete them (default: only list them)")
    sweep.add_argument(
        "--aws-region", default="", help="region (default: AWS_REGION, then AWS_DEFAULT_REGION)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # run by the GitHub runner as the container's entry point
        cancel = install_cancel_handlers()
        return run_deploy(read_action_inputs(os.environ), os.environ, cancel=cancel)
    args = _parser().parse_args(argv)
    if args.command == "deploy":
        cancel = install_cancel_handlers()
        raw = {name: value for name, value in vars(args).items() if name in INPUTS and value is not None}
        return run_deploy(raw, os.environ, cancel=cancel)
    return run_sweep(args.older_than, args.delete, args.aws_region, os.environ)
