"""Transport `local`: the deploy script runs here, against the job's kubeconfig.

The same `k3s-deploy.sh` that SSM runs on the K3s master runs under bash on the runner (inside
the action's container when used as an action; the image ships kubectl for it), with the bundle
in a temporary folder and its state dir beside it. There is no instance, no bucket and no AWS
call at all: this is how users test their manifests, and this action, against a real cluster
(k3d, kind) in their own CI. Everything else is the SSM story's: the script's checks, lock,
fail-fast, health proof, rollback, report and exit codes.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

import yaml

from deploykit import command, contract, report
from deploykit.errors import (
    FIX_ROLLOUT_STUCK,
    DeployError,
    JobCancelled,
    RemoteCommandFailed,
)
from deploykit.github import Workflow
from deploykit.inputs import Settings
from deploykit.render import Bundle
from deploykit.report import Outcome

# No SSM output limit here: the whole diff reaches the log (the summary still cuts it).
# After SIGTERM the script releases what it holds and exits; then SIGKILL.
TERMINATE_GRACE = 10
# On cancel the runner kills the step about 10 s after its first signal. The script, stopped
# by SIGTERM, sends the undos of what it changed itself and releases the lock (no second
# process, no lock hand-over, no rollout wait): it gets this long for that, counted from the
# signal, before SIGKILL. The temporary folder is removed only once nothing runs from it.
CANCEL_BUDGET = 7.0
# What the script and kubectl need of the job's environment, and nothing more: not the
# action's inputs (a registry password among them), the runner's tokens, the job's AWS
# credentials or the GITHUB_* file paths, which would let what runs there write the job's
# outputs and summary.
SCRIPT_ENV_KEEP = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LANG",
        "LANGUAGE",
        "TZ",
        "KUBECONFIG",
        "KUBECACHEDIR",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
    }
)
SCRIPT_ENV_KEEP_PREFIXES = ("LC_",)
# A kubeconfig whose user runs a credential plugin (`exec`: `aws eks get-token`,
# gke-gcloud-auth-plugin, kubelogin) needs its cloud's credentials: they pass only then.
EXEC_PLUGIN_ENV_PREFIXES = ("AWS_", "AZURE_", "ARM_", "GOOGLE_", "CLOUDSDK_", "KUBELOGIN_")


def kubeconfig_files(settings: Settings, base: Mapping[str, str]) -> list[Path]:
    """The kubeconfig files kubectl will read: the input's, else KUBECONFIG's, else the
    default one."""
    if settings.kubeconfig is not None:
        return [Path(settings.kubeconfig)]
    if base.get("KUBECONFIG"):
        return [Path(p) for p in base["KUBECONFIG"].split(os.pathsep) if p]
    return [Path(base.get("HOME") or "~").expanduser() / ".kube" / "config"]


def uses_exec_plugin(files: list[Path]) -> bool:
    for file in files:
        try:
            config = yaml.safe_load(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # kubectl will say what is wrong with it
        users = config.get("users") if isinstance(config, dict) else None
        for entry in users if isinstance(users, list) else []:
            user = entry.get("user") if isinstance(entry, dict) else None
            if isinstance(user, dict) and user.get("exec"):
                return True
    return False


def script_env(settings: Settings, root: Path, base: Mapping[str, str]) -> dict[str, str]:
    keep_prefixes = SCRIPT_ENV_KEEP_PREFIXES
    if uses_exec_plugin(kubeconfig_files(settings, base)):
        keep_prefixes += EXEC_PLUGIN_ENV_PREFIXES
    env = {k: v for k, v in base.items() if k in SCRIPT_ENV_KEEP or k.startswith(keep_prefixes)}
    tmp = root / "tmp"
    tmp.mkdir(exist_ok=True)
    env.update(TMPDIR=str(tmp), K3S_DEPLOY_STATE_DIR=str(root / "state"))
    if settings.kubeconfig is not None:
        env["KUBECONFIG"] = str(settings.kubeconfig)
    return env


class ScriptRun:
    """The script as a child process in its own process group; its stdout streamed line by
    line (to the log, as it comes), its stderr (the report) collected."""

    def __init__(self, argv: list[str], env: Mapping[str, str], cwd: Path) -> None:
        try:
            self.process = subprocess.Popen(
                argv,
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise DeployError(
                f"can't run the deploy script here: {exc}",
                fix="Transport local needs bash on the runner (the action's image has it).",
            ) from None
        assert self.process.stdout is not None and self.process.stderr is not None
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self._stderr: list[bytes] = []
        self._readers = [
            threading.Thread(target=self._read_lines, args=(self.process.stdout,), daemon=True),
            threading.Thread(target=self._read_all, args=(self.process.stderr,), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_lines(self, stream: IO[bytes]) -> None:
        for raw in stream:
            self.lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self.lines.put(None)

    def _read_all(self, stream: IO[bytes]) -> None:
        self._stderr.append(stream.read())

    @property
    def stderr(self) -> str:
        return b"".join(self._stderr).decode("utf-8", "replace")

    def follow(self, show: Callable[[str], None], deadline: float, clock: Callable[[], float]) -> bool:
        """Shows each line as it comes until the script ends (True) or the deadline (False)."""
        while True:
            left = deadline - clock()
            if left <= 0:
                return False
            try:
                line = self.lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:
                self.process.wait()
                for reader in self._readers:
                    reader.join(timeout=5)
                return True
            self.stdout.append(line)
            show(line)

    def stop(self, grace: float = TERMINATE_GRACE) -> None:
        """SIGTERM to its group (its trap releases or keeps the lock and keeps the state for
        the rollback), then SIGKILL."""
        for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if self.process.poll() is not None:
                return
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue


def deploy_local(
    settings: Settings,
    gh: Workflow,
    outcome: Outcome,
    deploy_id: str,
    bundle: Bundle,
    *,
    env: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run the deploy (or dry run) here; fills `outcome`; raises DeployError when it fails."""
    where = (
        f"kubeconfig {settings.kubeconfig}"
        if settings.kubeconfig
        else ("KUBECONFIG" if (env or os.environ).get("KUBECONFIG") else "~/.kube/config")
    )
    with tempfile.TemporaryDirectory(prefix="k3s-deploy-local-") as tmp:
        root = Path(tmp)
        script = root / command.SCRIPT_NAME
        script.write_bytes(command.deploy_script())
        bundle_path = root / command.BUNDLE_NAME
        bundle_path.write_bytes(bundle.data)
        state_dir = root / "state"
        script_environment = script_env(settings, root, os.environ if env is None else env)
        entry = "dry-run" if settings.dry_run else "deploy"
        arguments = contract.script_arguments(entry, deploy_id, str(state_dir), str(bundle_path))
        argv = ["bash", str(script), *arguments]
        gh.log(
            f"Transport local: running the deploy script here against the cluster of {where} "
            f"(deploy id {deploy_id}; no AWS call)"
        )
        deadline = clock() + command.execution_timeout(settings)
        run = ScriptRun(argv, script_environment, root)
        try:
            with gh.group("Output of the deploy script"), gh.untrusted():
                ended = run.follow(gh.log, deadline, clock)
        except JobCancelled:
            outcome.status = "cancelled"
            outcome.message = "The job was cancelled."
            _cancel(settings, gh, run, deploy_id, state_dir, script_environment, root)
            raise
        if not ended:
            run.stop()
            outcome.status = "timed-out"
            outcome.message = (
                f"The deploy script was still running after {command.execution_timeout(settings)} s; "
                "it was stopped."
            )
            if settings.rollback and not settings.dry_run:
                outcome.rolled_back = _rollback(settings, gh, deploy_id, state_dir, script_environment, root)
            raise RemoteCommandFailed(outcome.message, fix=FIX_ROLLOUT_STUCK)
        code = run.process.returncode
        found = report.parse_report(run.stderr)
        rest = report.strip_report(run.stderr)
        if rest.strip():
            gh.echo_untrusted(rest)
        if settings.dry_run:
            outcome.diff = report.parse_diff("\n".join(run.stdout))
        if found is None:
            outcome.status = "failed"
            meaning = contract.meaning(code)
            outcome.message = f"The deploy script did not report: {meaning}."
            if not contract.nothing_changed(code) and settings.rollback and not settings.dry_run:
                outcome.rolled_back = _rollback(settings, gh, deploy_id, state_dir, script_environment, root)
                outcome.status = "rolled-back" if outcome.rolled_back else "failed"
            raise RemoteCommandFailed(outcome.message, fix=FIX_ROLLOUT_STUCK)
        report.conclude(outcome, found, code)
        if code != 0:
            fix = contract.advice(code, "\n".join(run.stdout), "local")
            raise RemoteCommandFailed(outcome.message, fix=fix)


def _cancel(
    settings: Settings,
    gh: Workflow,
    run: ScriptRun,
    deploy_id: str,
    state_dir: Path,
    env: Mapping[str, str],
    root: Path,
) -> None:
    """Stops the script within the cancel budget. Its SIGTERM trap undoes what it changed and
    releases the lock; the rollback entry point runs only for what the trap could not undo,
    with the time that is left, and is stopped (releasing the lock) before the folder goes."""
    started = time.monotonic()
    run.stop(grace=CANCEL_BUDGET - 1.0)
    for line in _drain(run):
        gh.log(line)
    state = state_dir / deploy_id
    if not settings.rollback or settings.dry_run or not (state / "revisions.tsv").is_file():
        if (state / "rolled-back.txt").is_file():
            gh.log("The deploy script undid its changes before it stopped")
        return
    left = CANCEL_BUDGET - (time.monotonic() - started)
    if left < 1.0:
        gh.warning(
            "The deploy was stopped before it could undo its changes, and the job is being "
            "cancelled: nothing was rolled back. The deploy lock expires by itself.",
            title="Rollback not done",
        )
        return
    _rollback(settings, gh, deploy_id, state_dir, env, root, limit=left)


def _drain(run: ScriptRun) -> list[str]:
    """The lines the script printed that were not shown yet (it has ended)."""
    lines = []
    while True:
        try:
            line = run.lines.get_nowait()
        except queue.Empty:
            return lines
        if line is None:
            return lines
        lines.append(line)


def _rollback(
    settings: Settings,
    gh: Workflow,
    deploy_id: str,
    state_dir: Path,
    env: Mapping[str, str],
    root: Path,
    *,
    limit: float | None = None,
) -> bool:
    """The script's rollback entry point, from the copy and the revisions the deploy left in
    its state dir, within `limit` seconds (default: its whole budget). True when it undid what
    changed. It is never left running: the caller removes the folder it runs from."""
    kept = state_dir / deploy_id / command.SCRIPT_NAME
    if not kept.is_file():
        gh.log("Nothing recorded by the deploy: nothing to roll back")
        return False
    argv = ["bash", str(kept), *contract.script_arguments("rollback", deploy_id, str(state_dir))]
    run = ScriptRun(argv, env, root)
    cancelling = limit is not None
    if limit is None:
        limit = command.rollback_execution_timeout(settings)
    with gh.group("Output of the rollback"):
        ended = run.follow(gh.log, time.monotonic() + limit, time.monotonic)
    if not ended:
        # SIGTERM: the rollback entry point releases the lock it took over as it exits.
        run.stop(grace=0.5 if cancelling else TERMINATE_GRACE)
        gh.warning("The rollback did not finish in time.", title="Rollback unconfirmed")
        return False
    found = report.parse_report(run.stderr)
    return bool(found and found.get("rollback") == "done")
