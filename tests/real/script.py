"""Runs the deploy script by hand, as the staged command lines do, against either kubectl: the
real one talking to the real control plane, or the double. The parity test runs the same
scenario through both."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from tests.real.plane import bundle_of
from tests.test_deploy_script import Run, script


class ScriptHost:
    """A master's side of a deploy: a state dir, a tmp dir and an environment whose kubectl
    is the one under test."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.state_root = root / "state"
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._env = {**env, "TMPDIR": str(self.tmp)}
        self.bundles = 0

    def env(self) -> dict[str, str]:
        return dict(self._env)

    def bundle(self, docs: list[dict[str, Any]]) -> Path:
        self.bundles += 1
        return bundle_of(docs, self.root / f"bundle-{self.bundles}")

    def command(self, action: str, deploy_id: str, *args: str, **options: object) -> list[str]:
        argv = ["bash", str(script()), action, "--deploy-id", deploy_id,
                "--state-dir", str(self.state_root), *args]
        for name, value in options.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            argv += [f"--{name.replace('_', '-')}", text]
        return argv

    def run(self, argv: list[str], timeout: float = 300) -> Run:
        started = time.monotonic()
        done = subprocess.run(argv, env=self.env(), capture_output=True, text=True,
                              timeout=timeout, check=False)
        return Run(done.returncode, done.stdout, done.stderr, time.monotonic() - started)

    def deploy(self, docs: list[dict[str, Any]], deploy_id: str, **options: object) -> Run:
        options.setdefault("timeout", 120)
        options.setdefault("rollback_timeout", 60)
        return self.run(self.command("deploy", deploy_id, "--bundle", str(self.bundle(docs)),
                                     **options))

    def dry_run(self, docs: list[dict[str, Any]], deploy_id: str, **options: object) -> Run:
        options.setdefault("timeout", 120)
        return self.run(self.command("dry-run", deploy_id, "--bundle", str(self.bundle(docs)),
                                     **options))

    def rollback(self, deploy_id: str, **options: object) -> Run:
        options.setdefault("rollback_timeout", 60)
        return self.run(self.command("rollback", deploy_id, **options))

    def start(self, docs: list[dict[str, Any]], deploy_id: str,
              **options: object) -> subprocess.Popen[str]:
        """A deploy in the background, in its own process group (as under SSM)."""
        options.setdefault("timeout", 120)
        options.setdefault("rollback_timeout", 60)
        argv = self.command("deploy", deploy_id, "--bundle", str(self.bundle(docs)), **options)
        return subprocess.Popen(argv, env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    @staticmethod
    def finished(process: subprocess.Popen[str], timeout: float = 300) -> Run:
        stdout, stderr = process.communicate(timeout=timeout)
        return Run(process.returncode, stdout, stderr, 0.0)
