"""What one run carries from step to step: its settings, clients, workflow, outcome, clock and
deploy id (`Run`), and the two files every target runs (`Files`)."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from deploykit.awsapi import AwsClients
from deploykit.github import Workflow
from deploykit.inputs import Settings
from deploykit.progress import Reader
from deploykit.report import Outcome

# How long past the SSM execution timeout the action keeps waiting before it gives up on the
# command itself (the agent reports a kill a little late).
WAIT_MARGIN = 30


@dataclass
class Clock:
    """Time, injected so the tests run without waiting."""

    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    utcnow: Callable[[], datetime] = lambda: datetime.now(UTC)


def new_deploy_id(now: datetime) -> str:
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(4)}"


@dataclass
class Run:
    settings: Settings
    aws: AwsClients
    gh: Workflow
    outcome: Outcome
    clock: Clock = field(default_factory=Clock)
    deploy_id: str = ""
    progress: Reader | None = None  # live progress, once staged (input `progress`)

    def __post_init__(self) -> None:
        self.deploy_id = self.deploy_id or new_deploy_id(self.clock.utcnow())

    @property
    def rolls_back(self) -> bool:
        """A dry run changes nothing, so there is never anything to roll back after one."""
        return self.settings.rollback and not self.settings.dry_run


@dataclass(frozen=True)
class Files:
    """The deploy script and the bundle, with the sha256 sums the target checks them against."""

    script: bytes
    bundle: bytes
    bundle_sum: str

    @property
    def script_sum(self) -> str:
        return hashlib.sha256(self.script).hexdigest()
