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
import shutil
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
from deploykit.contract import Status
from deploykit.errors import FIX_ROLLOUT_STUCK, DeployError, LocalScriptFailed
from deploykit.inputs import Settings
from deploykit.results import TargetResult, judge_report
from deploykit.run import Files, Run
from deploykit.stage import Staging

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


class LocalTransport:
    """The script run here, in a temporary folder with its state dir beside it (see
    transport.Transport). There is one target: the cluster of the kubeconfig."""

    stages = False
    many = False
    failure = LocalScriptFailed

    def __init__(self, run: Run, env: Mapping[str, str] | None = None) -> None:
        self.run = run
        self.env = os.environ if env is None else env
        self.result = TargetResult("")
        self.root: Path | None = None
        self.script_env: dict[str, str] = {}
        self.script: ScriptRun | None = None
        self.rollback: ScriptRun | None = None
        self.deadline = 0.0

    @property
    def state_dir(self) -> Path:
        assert self.root is not None
        return self.root / "state"

    def find_targets(self) -> None:
        pass  # the kubeconfig's cluster: the script checks its API first

    @property
    def targets(self) -> list[TargetResult]:
        return [self.result]

    def candidates(self) -> list[str]:
        return []  # no SSM: the script's output streams here as it runs

    def send(self, files: Files, staging: Staging | None) -> None:
        settings, gh = self.run.settings, self.run.gh
        where = (
            f"kubeconfig {settings.kubeconfig}"
            if settings.kubeconfig
            else ("KUBECONFIG" if self.env.get("KUBECONFIG") else "~/.kube/config")
        )
        self.root = Path(tempfile.mkdtemp(prefix="k3s-deploy-local-"))
        script = self.root / command.SCRIPT_NAME
        script.write_bytes(files.script)
        bundle_path = self.root / command.BUNDLE_NAME
        bundle_path.write_bytes(files.bundle)
        self.script_env = script_env(settings, self.root, self.env)
        entry = "dry-run" if settings.dry_run else "deploy"
        arguments = contract.script_arguments(
            entry, self.run.deploy_id, str(self.state_dir), str(bundle_path)
        )
        gh.log(
            f"Transport local: running the deploy script here against the cluster of {where} "
            f"(deploy id {self.run.deploy_id}; no AWS call)"
        )
        self.deadline = self.run.clock.monotonic() + command.execution_timeout(settings)
        self.script = ScriptRun(["bash", str(script), *arguments], self.script_env, self.root)
        self.result.sent = True

    def wait(self) -> None:
        assert self.script is not None
        gh = self.run.gh
        with gh.group("Output of the deploy script"), gh.untrusted():
            ended = self.script.follow(gh.log, self.deadline, self.run.clock.monotonic)
        if not ended:
            self.script.stop()
            self.result.status = Status.TIMED_OUT
            self.result.message = (
                f"The deploy script was still running after "
                f"{command.execution_timeout(self.run.settings)} s; it was stopped."
            )
            self.result.fix = FIX_ROLLOUT_STUCK

    def results(self) -> list[TargetResult]:
        assert self.script is not None
        result, run = self.result, self.script
        if result.status == Status.TIMED_OUT:
            return [result]
        code = run.process.returncode
        result.exit_code = code
        found = report.parse_report(run.stderr)
        rest = report.strip_report(run.stderr)
        if rest.strip():
            self.run.gh.echo_untrusted(rest)
        if self.run.settings.dry_run:
            result.diff = report.parse_diff("\n".join(run.stdout))
        if found is None:
            result.status = Status.FAILED
            result.message = f"The deploy script did not report: {contract.meaning(code)}."
            result.fix = FIX_ROLLOUT_STUCK
            return [result]
        judge_report(result, found, code)
        if code != 0:
            result.fix = contract.advice(code, "\n".join(run.stdout), "local")
        return [result]

    def roll_back(self, results: list[TargetResult]) -> None:
        for result in results:
            result.undone(self._rollback())

    def cancel(self) -> None:
        """Stops the script within the cancel budget. Its SIGTERM trap undoes what it changed
        and releases the lock; the rollback entry point runs only for what the trap could not
        undo, with the time that is left, and is stopped (releasing the lock) before the folder
        goes."""
        gh = self.run.gh
        started = time.monotonic()
        if self.rollback is not None:
            # The action's own rollback was running: its SIGTERM trap releases the lock.
            self.rollback.stop(grace=CANCEL_BUDGET - 1.0)
            gh.warning("The job was cancelled during the rollback.", title="Rollback unconfirmed")
            return
        if self.script is None:
            return
        self.script.stop(grace=CANCEL_BUDGET - 1.0)
        for line in _drain(self.script):
            gh.log(line)
        state = self.state_dir / self.run.deploy_id
        if not self.run.rolls_back or not (state / "revisions.tsv").is_file():
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
        self._rollback(limit=left)

    def close(self) -> None:
        """Nothing runs from the folder any more (wait, roll_back and cancel stop what they
        start): remove it."""
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def _rollback(self, *, limit: float | None = None) -> bool:
        """The script's rollback entry point, from the copy and the revisions the deploy left
        in its state dir, within `limit` seconds (default: its whole budget). True when it
        undid what changed. It is never left running: close() removes the folder it runs from."""
        assert self.root is not None
        gh, deploy_id = self.run.gh, self.run.deploy_id
        kept = self.state_dir / deploy_id / command.SCRIPT_NAME
        if not kept.is_file():
            gh.log("Nothing recorded by the deploy: nothing to roll back")
            return False
        argv = ["bash", str(kept), *contract.script_arguments("rollback", deploy_id, str(self.state_dir))]
        cancelling = limit is not None
        if limit is None:
            limit = command.rollback_execution_timeout(self.run.settings)
        self.rollback = run = ScriptRun(argv, self.script_env, self.root)
        with gh.group("Output of the rollback"):
            ended = run.follow(gh.log, time.monotonic() + limit, time.monotonic)
        self.rollback = None
        if not ended:
            # SIGTERM: the rollback entry point releases the lock it took over as it exits.
            run.stop(grace=0.5 if cancelling else TERMINATE_GRACE)
            gh.warning("The rollback did not finish in time.", title="Rollback unconfirmed")
            return False
        found = report.parse_report(run.stderr)
        return bool(found and found.get("rollback") == "done")


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
