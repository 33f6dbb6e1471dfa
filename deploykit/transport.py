"""How the deploy reaches its targets: one small interface, three transports.

- `master.OneMaster`: SSM Run Command to one K3s master (its HA cluster's servers standing by).
- `fleet.FleetTransport`: SSM to one server of each of many clusters.
- `local.LocalTransport`: the script run here, against the job's kubeconfig (no AWS).

deploy.py drives any of them the same way: find the targets, stage the files (when the
transport fetches them from S3), send, wait, read the results, roll back what did not report,
and on a cancel, cancel. Staging, cleanup, the rollback decision and the conclusion are written
once, there and in results.py.
"""

from __future__ import annotations

from typing import Protocol

from deploykit.errors import RemoteCommandFailed
from deploykit.fleet import FleetTransport
from deploykit.local import LocalTransport
from deploykit.master import OneMaster
from deploykit.results import TargetResult
from deploykit.run import Files, Run
from deploykit.stage import Staging


class Transport(Protocol):
    @property
    def stages(self) -> bool:
        """Its targets fetch the files from the S3 staging area (known once targets are found)."""
        ...

    @property
    def many(self) -> bool:
        """Fleet mode: the conclusion counts targets and tables them."""
        ...

    @property
    def failure(self) -> type[RemoteCommandFailed]:
        """The error raised when the run failed (its title heads the annotation)."""
        ...

    def find_targets(self) -> None:
        """Find where to deploy; raises when there is nowhere."""

    @property
    def targets(self) -> list[TargetResult]:
        """What is known of each target so far (the outputs name them after a failure too)."""
        ...

    def candidates(self) -> list[str]:
        """The instance ids the deploy command may run on (HA standbys too); [] without SSM."""
        ...

    def send(self, files: Files, staging: Staging | None) -> None:
        """Start the deploy (or dry run) on every target."""

    def wait(self) -> None:
        """Until every target ended, or the deadline (then what still runs is stopped)."""

    def results(self) -> list[TargetResult]:
        """What each target said, its output shown."""

    def roll_back(self, results: list[TargetResult]) -> None:
        """Run the rollback entry point where the script could not report, and wait for it."""

    def cancel(self) -> None:
        """The job is being cancelled: stop what runs and send the rollback, without waiting."""

    def close(self) -> None:
        """Release what the transport holds (after a cancel too)."""


def transport_for(run: Run) -> Transport:
    if run.settings.transport == "local":
        return LocalTransport(run)
    if run.settings.fleet:
        return FleetTransport(run)
    return OneMaster(run)
