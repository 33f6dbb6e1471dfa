"""A simulated AWS account and K3s master, for the demo and the end-to-end tests.

`SimulatedAWS` runs moto's server in this process and teaches moto's SSM service what a real
SSM agent would do on the instance: SendCommand with AWS-RunShellScript really runs the
commands under `sh`, in a folder that stands for the master, and the command's status moves
through the states AWS reports. Moto on its own never runs a command: it answers Success with
empty output for any instance, which would let a broken action pass its tests.

The stand-in is installed by patching moto's SSM response class while a `SimulatedAWS` is
open, so only one can be open at a time in a process. It is never imported by the action.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
from moto.core import DEFAULT_ACCOUNT_ID
from moto.core.exceptions import ServiceException
from moto.core.responses import ActionResult, EmptyResult
from moto.ec2.models import ec2_backends
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from moto.ssm.models import Command
from moto.ssm.responses import SimpleSystemManagerResponse
from werkzeug.serving import make_server

__all__ = ["Master", "SimulatedAWS", "SimulationError"]

RUN_SHELL_SCRIPT = "AWS-RunShellScript"
PLUGIN_NAME = "aws:runShellScript"

# What GetCommandInvocation and ListCommandInvocations return at most, as AWS does.
STDOUT_LIMIT = 24_000
STDERR_LIMIT = 8_000
PLUGIN_OUTPUT_LIMIT = 2_500

DEFAULT_EXECUTION_TIMEOUT = 3600
MAX_EXECUTION_TIMEOUT = 172_800
# The real agent reports this code when it stops a command itself (timeout or cancel):
# 128 + SIGKILL. -1 means the command never started.
STOPPED_BY_AGENT = 137
NEVER_STARTED = -1
# Grace between SIGTERM and SIGKILL when a running command is cancelled.
CANCEL_GRACE_SECONDS = 2.0
# How often an invocation's thread looks at the master, the process and the cancel flag.
POLL_SECONDS = 0.05

TERMINAL = frozenset({"Success", "Failed", "TimedOut", "Cancelled"})

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}

PROJECT_ROOT = Path(__file__).resolve().parents[2]
KUBECTL_DOUBLE = Path(__file__).resolve().parent / "kubectl_double.py"


class SimulationError(RuntimeError):
    """The simulation cannot be set up (missing tool, second instance, ...)."""


class _SSMError(ServiceException):
    """An SSM API error. Defined here, outside moto's packages, because moto looks up the
    error's shape in the service named by the exception's module (moto.core -> "core")."""


def _ssm_error(code: str, message: str) -> ServiceException:
    return _SSMError(code, message)


def _now() -> datetime:
    return datetime.now(UTC)


def _aws_time(moment: datetime) -> str:
    # GetCommandInvocation's dates are strings, written by AWS like this.
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def find_aws_cli() -> Path:
    """The real AWS CLI that the simulated master runs (never one found on PATH).

    `K3S_SIM_AWS_CLI` names an `aws` executable; otherwise the project's `.venv-master`
    holds one (awscli 1.x pins its own botocore, so it cannot share the test venv).
    """
    chosen = os.environ.get("K3S_SIM_AWS_CLI")
    candidate = Path(chosen) if chosen else PROJECT_ROOT / ".venv-master" / "bin" / "aws"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate.absolute()
    origin = "K3S_SIM_AWS_CLI" if chosen else "the project's .venv-master"
    raise SimulationError(
        f"the simulated master needs the AWS CLI, but {origin} has none at {candidate}: "
        "run `make setup` (or set K3S_SIM_AWS_CLI to an `aws` executable)"
    )


class _MotoServer(ThreadedMotoServer):
    """moto's ThreadedMotoServer, but it stops in 50 ms instead of 500.

    Same body as moto 5.2's `_server_entry` except the serve loop's poll interval, which is
    how long `stop()` waits: every test that opens a simulation pays it.
    """

    on_request: Callable[[dict[str, Any]], None] | None = None

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)
        if self.on_request is not None:
            app = _Watched(app, self.on_request)
        self._server = make_server(
            self._ip_address, self._port, app, True, request_handler=MotoRequestHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever(poll_interval=0.05)


class _Watched:
    """WSGI middleware telling `on_request` about each request before moto serves it (the
    benchmark times the action's first AWS request this way)."""

    def __init__(self, app: Any, on_request: Callable[[dict[str, Any]], None]) -> None:
        self._app = app
        self._on_request = on_request

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        self._on_request(environ)
        return self._app(environ, start_response)


# --------------------------------------------------------------------------------------------
# The master


@dataclass
class Master:
    """A K3s master: an EC2 instance in moto plus a folder where its commands run."""

    name: str
    instance_id: str
    path: Path
    env: dict[str, str]
    tags: dict[str, str]
    online: bool = True
    last_ping: datetime = field(default_factory=_now)
    registered: datetime = field(default_factory=_now)
    # False: the agent pings (Online) but never picks a command up, as a wedged agent does.
    accepts_commands: bool = True
    # Benchmarks only: run this instead of the commands sent (a known, light remote command,
    # so that the figures measure the action rather than the simulated master).
    replace_commands_with: str | None = None

    @property
    def bin_dir(self) -> Path:
        return self.path / "bin"

    @property
    def tmp_dir(self) -> Path:
        return self.path / "tmp"

    @property
    def state_dir(self) -> Path:
        """Where the deploy script keeps a deploy's revisions (K3S_DEPLOY_STATE_DIR)."""
        return self.path / "state"

    @property
    def cluster_state_path(self) -> Path:
        """The kubectl double's cluster (KUBECTL_DOUBLE_STATE); created by the double."""
        return self.path / "cluster.json"

    def set_online(self, online: bool) -> None:
        """Online: the agent pings and takes commands. Offline: ConnectionLost."""
        if self.online and not online:
            self.last_ping = _now()
        self.online = online

    def ping_status(self) -> str:
        return "Online" if self.online else "ConnectionLost"


def _make_master_folder(path: Path) -> None:
    for folder in ("bin", "tmp", "state"):
        (path / folder).mkdir(parents=True, exist_ok=True)
    # `kubectl` on the master is the test double, run by the interpreter running the tests. It
    # runs by its file path and imports only the standard library and yaml, never `devkit`, so it
    # needs no PYTHONPATH: the master's environment is built from scratch without one.
    wrapper = path / "bin" / "kubectl"
    wrapper.write_text(
        f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(KUBECTL_DOUBLE))} "$@"\n'
    )
    wrapper.chmod(0o755)


def _master_env(path: Path, aws_cli: Path, endpoint_url: str, region: str) -> dict[str, str]:
    # Built from scratch, not from this process's environment: the master must not see the
    # runner's credentials, profile or PATH.
    return {
        "PATH": f"{path / 'bin'}:{aws_cli.parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(path),
        "TMPDIR": str(path / "tmp"),
        "LANG": "C.UTF-8",
        "K3S_DEPLOY_STATE_DIR": str(path / "state"),
        "KUBECTL_DOUBLE_STATE": str(path / "cluster.json"),
        # The instance role, simulated: the master reaches the same moto server.
        "AWS_ENDPOINT_URL": endpoint_url,
        **CREDENTIALS,
        "AWS_DEFAULT_REGION": region,
        "AWS_REGION": region,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


# --------------------------------------------------------------------------------------------
# One command on one master


@dataclass
class _Invocation:
    command: Command
    record: dict[str, Any]  # moto's invocation dict, kept up to date in place
    master: Master
    script: str
    execution_timeout: float
    delivery_deadline: float  # time.monotonic() after which an undelivered command dies
    visible_at: float  # time.monotonic() before which GetCommandInvocation does not know it
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    process: subprocess.Popen[bytes] | None = None
    started: datetime | None = None
    ended: datetime | None = None
    output_dir: Path | None = None
    run_entry: dict[str, Any] | None = None
    thread: threading.Thread | None = None

    @property
    def status(self) -> str:
        return self.record["Status"]

    def output(self, name: str) -> str:
        if self.output_dir is None:
            return ""
        path = self.output_dir / name
        return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class _Gate:
    """SendCommand's MaxConcurrency and MaxErrors for one command.

    At most `limit` invocations run at once, started in the order of the command's instances;
    once more than `max_errors` invocations have failed (Failed, or ExecutionTimedOut: AWS's
    ErrorCount), the ones not started yet are never sent: Cancelled, details Terminated.
    """

    limit: int
    max_errors: int
    waiting: list[_Invocation] = field(default_factory=list)
    running: int = 0

    def may_start(self, invocation: _Invocation) -> bool:
        free = self.limit - self.running
        ready = [w for w in self.waiting if w.master.online and w.master.accepts_commands]
        return free > 0 and invocation in ready[:free]


def _rate_limit(value: str, targets: int, *, name: str, minimum: int) -> int:
    """A MaxConcurrency / MaxErrors value as a number of instances. A percentage is of the
    command's targets: rounded up for the concurrency (never below 1), down for the errors
    (10% of 50 stops at the sixth error, as AWS documents it)."""
    text = value.strip() if value else ""
    try:
        if text.endswith("%"):
            share = int(text[:-1]) * targets / 100
            count = math.ceil(share) if minimum else math.floor(share)
        else:
            count = int(text)
    except ValueError:
        raise _ssm_error("ValidationException", f"{name} {value!r} is not a number or a percentage") from None
    return max(count, minimum)


def _pending_record(command: Command, instance_id: str) -> dict[str, Any]:
    return {
        "CommandId": command.command_id,
        "InstanceId": instance_id,
        "Comment": command.comment,
        "DocumentName": command.document_name,
        "DocumentVersion": "$DEFAULT",
        "PluginName": PLUGIN_NAME,
        "ResponseCode": NEVER_STARTED,
        "ExecutionStartDateTime": "",
        "ExecutionElapsedTime": "",
        "ExecutionEndDateTime": "",
        "Status": "Pending",
        "StatusDetails": "Pending",
        "StandardOutputContent": "",
        "StandardOutputUrl": "",
        "StandardErrorContent": "",
        "StandardErrorUrl": "",
    }


def _kill_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


# --------------------------------------------------------------------------------------------
# The simulated account


class SimulatedAWS:
    """moto's server on 127.0.0.1 plus an SSM agent stand-in for simulated masters.

    Use as a context manager; `env()` gives what a process (the action) needs to talk to it,
    `add_master()` creates a master, `client(service)` a boto3 client for the tests.
    """

    _open: SimulatedAWS | None = None  # the patches are process-wide: one at a time
    _open_lock = threading.Lock()

    def __init__(
        self,
        region: str = "eu-west-1",
        *,
        invocation_delay: float = 0.0,
        root: Path | str | None = None,
        on_request: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.region = region
        self.account_id = DEFAULT_ACCOUNT_ID
        # Seconds after SendCommand during which GetCommandInvocation answers
        # InvocationDoesNotExist, as AWS can (eventual consistency).
        self.invocation_delay = invocation_delay
        # Test-only: multiplies SendCommand's TimeoutSeconds (30 s at least in AWS and in
        # botocore's validation) so a delivery timeout test need not wait 30 s.
        self.delivery_timeout_scale = 1.0
        self.commands_run: list[dict[str, Any]] = []
        self.masters: dict[str, Master] = {}
        self._given_root = Path(root) if root is not None else None
        self._root: Path | None = None
        self._server: _MotoServer | None = None
        self._endpoint_url: str | None = None
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._invocations: dict[tuple[str, str], _Invocation] = {}
        self._gates: dict[str, _Gate] = {}
        # Called with the WSGI environ of every request the server gets (benchmarks).
        self._on_request = on_request
        self._sent: list[dict[str, Any]] = []
        self._patch: _ResponsePatch | None = None
        self._werkzeug_level: int | None = None

    # -- life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> SimulatedAWS:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        with SimulatedAWS._open_lock:
            if SimulatedAWS._open is not None:
                raise SimulationError("another SimulatedAWS is already open in this process")
            SimulatedAWS._open = self
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self._stopping.clear()
        self.commands_run.clear()
        self._sent.clear()
        # werkzeug logs every request on stderr; the demo's output is for the user.
        werkzeug = logging.getLogger("werkzeug")
        self._werkzeug_level = werkzeug.level
        werkzeug.setLevel(logging.WARNING)
        # Port 0: the system picks a free port, read back below (no race with other runs).
        self._server = _MotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.on_request = self._on_request
        self._server.start()
        host, port = self._server.get_host_and_port()
        self._endpoint_url = f"http://{host}:{port}"
        # moto keeps its accounts in module globals: start from an empty account.
        self._reset_moto()
        self._patch = _ResponsePatch(self)
        self._patch.install()
        if self._given_root is not None:
            self._given_root.mkdir(parents=True, exist_ok=True)
            self._root = self._given_root
        else:
            self._root = Path(tempfile.mkdtemp(prefix="k3s-sim-"))

    def stop(self) -> None:
        """Kill what still runs, undo the patches, empty moto, stop the server."""
        self._stopping.set()
        with self._lock:
            invocations = list(self._invocations.values())
            for invocation in invocations:
                if invocation.process is not None and invocation.process.poll() is None:
                    _kill_group(invocation.process, signal.SIGKILL)
        for invocation in invocations:
            if invocation.thread is not None:
                invocation.thread.join(timeout=5)
        if self._patch is not None:
            self._patch.uninstall()
            self._patch = None
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._reset_moto()
            self._server.stop()
            self._server = None
        if self._werkzeug_level is not None:
            logging.getLogger("werkzeug").setLevel(self._werkzeug_level)
            self._werkzeug_level = None
        if self._root is not None and self._given_root is None:
            shutil.rmtree(self._root, ignore_errors=True)
        self._root = None
        self._invocations.clear()
        self._gates.clear()
        self.masters.clear()
        with SimulatedAWS._open_lock:
            if SimulatedAWS._open is self:
                SimulatedAWS._open = None

    def _reset_moto(self) -> None:
        # moto's documented reset endpoint; the URL is our own http:// server.
        url = f"{self.endpoint_url}/moto-api/reset"
        request = urllib.request.Request(url, method="POST")  # noqa: S310
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310
            pass

    # -- what callers use ---------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        if self._endpoint_url is None or self._server is None:
            raise SimulationError("the simulated AWS account is not started")
        return self._endpoint_url

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """A full environment for a process that should use this account.

        Starts from `base` (default: this process's environment), drops every `AWS_*`
        variable (profile, session token, role to assume, config files, ...) and sets the
        endpoint, test credentials and region.
        """
        source = os.environ if base is None else base
        env = {key: value for key, value in source.items() if not key.startswith("AWS_")}
        env.update(
            {
                "AWS_ENDPOINT_URL": self.endpoint_url,
                **CREDENTIALS,
                "AWS_DEFAULT_REGION": self.region,
                "AWS_REGION": self.region,
                "AWS_EC2_METADATA_DISABLED": "true",
            }
        )
        return env

    def client(self, service: str, **kwargs: Any) -> Any:
        """A boto3 client for this account (for tests and the demo)."""
        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            **kwargs,
        )

    def add_master(
        self,
        name: str = "k3s-master",
        *,
        tags: Mapping[str, str] | None = None,
        online: bool = True,
        launch_time: datetime | None = None,
    ) -> Master:
        """A running EC2 instance tagged Name=`name` (plus `tags`), managed by SSM."""
        aws_cli = find_aws_cli()
        all_tags = {"Name": name, **(tags or {})}
        reservation = self.client("ec2").run_instances(
            ImageId="ami-0123456789abcdef0",  # moto accepts any image id
            InstanceType="t3.micro",
            MinCount=1,
            MaxCount=1,
            TagSpecifications=[
                {
                    "ResourceType": "instance",
                    "Tags": [{"Key": k, "Value": v} for k, v in all_tags.items()],
                }
            ],
        )
        instance_id = reservation["Instances"][0]["InstanceId"]
        if launch_time is not None:
            # Lets a test order several masters by age, as a "newest instance" rule would.
            instance = ec2_backends[self.account_id][self.region].get_instance(instance_id)
            instance.launch_time = launch_time
        assert self._root is not None
        path = self._root / f"{name}-{instance_id}"
        _make_master_folder(path)
        master = Master(
            name=name,
            instance_id=instance_id,
            path=path,
            env=_master_env(path, aws_cli, self.endpoint_url, self.region),
            tags=all_tags,
            online=online,
        )
        with self._lock:
            self.masters[instance_id] = master
        return master

    def sent_commands(self) -> list[dict[str, Any]]:
        """Every SendCommand this account accepted, oldest first."""
        with self._lock:
            return [dict(sent) for sent in self._sent]

    def invocation(self, command_id: str, instance_id: str) -> dict[str, Any]:
        """The invocation as GetCommandInvocation would show it, without the API's delay."""
        with self._lock:
            return dict(self._invocations[(command_id, instance_id)].record)

    def settle(self, seconds: float) -> None:
        """Wait until every command sent to any instance has ended (AssertionError after
        `seconds`): what a script still stopping after a cancel does is then done."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if all(
                self.invocation(sent["command_id"], instance)["Status"] in TERMINAL
                for sent in self.sent_commands()
                for instance in sent["instance_ids"]
            ):
                return
            time.sleep(0.1)
        raise AssertionError(f"commands still running on the master after {seconds} s")

    # -- SSM actions (called by the patched response class, in moto's request threads) --------

    def send_command(self, response: SimpleSystemManagerResponse) -> ActionResult:
        param = response._get_param
        document_name = param("DocumentName")
        parameters = param("Parameters", {}) or {}
        if document_name == RUN_SHELL_SCRIPT:
            script = self._script_from(parameters)
            execution_timeout = self._execution_timeout_from(parameters)
        else:
            script, execution_timeout = self._script_from_document(response, document_name, parameters)
        targets = param("Targets", []) or []
        instance_ids = self._resolve_instances(response, param("InstanceIds", []) or [], targets)

        backend = response.ssm_backend
        # moto treats empty Targets as "every instance"; the invocations are rebuilt below.
        command = backend.send_command(
            comment=param("Comment", ""),
            document_name=document_name,
            timeout_seconds=response._get_int_param("TimeoutSeconds"),
            instance_ids=list(instance_ids),
            max_concurrency=param("MaxConcurrency", "50"),
            max_errors=param("MaxErrors", "0"),
            notification_config=param("NotificationConfig"),
            output_s3_bucket_name=param("OutputS3BucketName", ""),
            output_s3_key_prefix=param("OutputS3KeyPrefix", ""),
            output_s3_region=param("OutputS3Region", ""),
            parameters=parameters,
            service_role_arn=param("ServiceRoleArn", ""),
            targets=[],
        )
        sent = time.monotonic()
        gate = _Gate(
            limit=_rate_limit(command.max_concurrency, len(instance_ids), name="MaxConcurrency", minimum=1),
            max_errors=_rate_limit(command.max_errors, len(instance_ids), name="MaxErrors", minimum=0),
        )
        with self._lock:
            command.targets = targets
            command.instance_ids = list(instance_ids)
            command.invocations = []
            self._gates[command.command_id] = gate
            for instance_id in instance_ids:
                record = _pending_record(command, instance_id)
                command.invocations.append(record)
                invocation = _Invocation(
                    command=command,
                    record=record,
                    master=self.masters[instance_id],
                    script=script,
                    execution_timeout=execution_timeout,
                    delivery_deadline=sent + command.timeout_seconds * self.delivery_timeout_scale,
                    visible_at=sent + self.invocation_delay,
                )
                self._invocations[(command.command_id, instance_id)] = invocation
                gate.waiting.append(invocation)
            self._sent.append(
                {
                    "command_id": command.command_id,
                    "document_name": document_name,
                    "instance_ids": list(instance_ids),
                    "targets": targets,
                    "parameters": parameters,
                    "comment": command.comment,
                    "timeout_seconds": command.timeout_seconds,
                    "max_concurrency": command.max_concurrency,
                    "max_errors": command.max_errors,
                }
            )
            self._refresh_command(command)
            view = self._describe_command(command)
            for instance_id in instance_ids:
                invocation = self._invocations[(command.command_id, instance_id)]
                invocation.thread = threading.Thread(
                    target=self._run,
                    args=(invocation,),
                    daemon=True,
                    name=f"ssm-agent-{instance_id}-{command.command_id[:8]}",
                )
                invocation.thread.start()
        return ActionResult({"Command": view})

    def list_commands(self, response: SimpleSystemManagerResponse) -> ActionResult:
        commands = response.ssm_backend.list_commands(
            response._get_param("CommandId"), response._get_param("InstanceId")
        )
        with self._lock:
            return ActionResult({"Commands": [self._describe_command(c) for c in commands]})

    def get_command_invocation(self, response: SimpleSystemManagerResponse) -> ActionResult:
        command = response.ssm_backend.get_command_by_id(response._get_param("CommandId"))
        instance_id = response._get_param("InstanceId")
        plugin_name = response._get_param("PluginName")
        with self._lock:
            invocation = self._invocations.get((command.command_id, instance_id))
            if (
                invocation is None
                or time.monotonic() < invocation.visible_at
                or plugin_name not in (None, PLUGIN_NAME)
            ):
                raise _ssm_error("InvocationDoesNotExist", "The invocation does not exist.")
            return ActionResult(dict(invocation.record))

    def list_command_invocations(self, response: SimpleSystemManagerResponse) -> ActionResult:
        command_id = response._get_param("CommandId")
        instance_id = response._get_param("InstanceId")
        details = response._get_bool_param("Details", False)
        if command_id:
            response.ssm_backend.get_command_by_id(command_id)  # InvalidCommandId
        with self._lock:
            found = [
                invocation
                for (cid, iid), invocation in self._invocations.items()
                if command_id in (None, cid) and instance_id in (None, iid)
            ]
            return ActionResult(
                {"CommandInvocations": [self._describe_invocation(i, details) for i in found]}
            )

    def cancel_command(self, response: SimpleSystemManagerResponse) -> EmptyResult:
        command = response.ssm_backend.get_command_by_id(response._get_param("CommandId"))
        only = response._get_param("InstanceIds") or command.instance_ids
        with self._lock:
            for instance_id in only:
                invocation = self._invocations.get((command.command_id, instance_id))
                if invocation is None or invocation.status in TERMINAL:
                    continue
                invocation.cancel_requested.set()
                if invocation.process is None:
                    # Not delivered yet: the agent never sees it.
                    self._finish(invocation, "Cancelled", "Cancelled", NEVER_STARTED)
                else:
                    # The invocation's thread stops the process and reports Cancelled.
                    invocation.record.update(Status="Cancelling", StatusDetails="Cancelling")
                    self._refresh_command(command)
        return EmptyResult()

    def describe_instance_information(self, response: SimpleSystemManagerResponse) -> ActionResult:
        wanted = self._instance_filters(
            response._get_param("InstanceInformationFilterList") or [], "key", "valueSet"
        ) + self._instance_filters(response._get_param("Filters") or [], "Key", "Values")
        with self._lock:
            masters = [m for m in self.masters.values() if all(test(m) for test in wanted)]
        token = response._get_param("NextToken") or "0"
        if not token.isdigit():
            raise _ssm_error("InvalidNextToken", "The specified token is not valid.")
        start = int(token)
        size = response._get_int_param("MaxResults") or 50
        page = masters[start : start + size]
        result: dict[str, Any] = {"InstanceInformationList": [self._describe_master(m) for m in page]}
        if start + size < len(masters):
            result["NextToken"] = str(start + size)
        return ActionResult(result)

    # -- the agent ----------------------------------------------------------------------------

    def _run(self, invocation: _Invocation) -> None:
        """Deliver the command when the master is online, run it, report how it ended."""
        if not self._wait_for_delivery(invocation):
            return
        try:
            self._run_delivered(invocation)
        finally:
            with self._lock:
                self._gates[invocation.command.command_id].running -= 1

    def _run_delivered(self, invocation: _Invocation) -> None:
        process = invocation.process
        assert process is not None
        deadline = time.monotonic() + invocation.execution_timeout
        timed_out = False
        term_sent_at: float | None = None
        while process.poll() is None:
            if self._stopping.is_set():
                _kill_group(process, signal.SIGKILL)
            elif time.monotonic() >= deadline and not timed_out:
                # Like the agent: the whole process group, at once.
                timed_out = True
                _kill_group(process, signal.SIGKILL)
            elif invocation.cancel_requested.is_set():
                if term_sent_at is None:
                    term_sent_at = time.monotonic()
                    _kill_group(process, signal.SIGTERM)
                elif time.monotonic() - term_sent_at >= CANCEL_GRACE_SECONDS:
                    _kill_group(process, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=POLL_SECONDS)
        exit_code = process.returncode
        if timed_out or invocation.cancel_requested.is_set():
            # Leave nothing of a stopped command behind (children in its group).
            _kill_group(process, signal.SIGKILL)
        if exit_code < 0:
            # Killed by a signal: the agent reports 128 + SIGKILL for what it stopped and
            # -1 for a signal from elsewhere.
            stopped = timed_out or invocation.cancel_requested.is_set()
            exit_code = STOPPED_BY_AGENT if stopped else NEVER_STARTED
        with self._lock:
            if timed_out:
                self._finish(invocation, "TimedOut", "ExecutionTimedOut", exit_code)
            elif invocation.cancel_requested.is_set():
                self._finish(invocation, "Cancelled", "Cancelled", exit_code)
            elif exit_code == 0:
                self._finish(invocation, "Success", "Success", exit_code)
            else:
                self._finish(invocation, "Failed", "Failed", exit_code)

    def _wait_for_delivery(self, invocation: _Invocation) -> bool:
        """Start the process once the master takes it and the command's MaxConcurrency has a
        slot for it; False if it never starts."""
        gate = self._gates[invocation.command.command_id]
        while True:
            with self._lock:
                if (
                    invocation.cancel_requested.is_set()
                    or self._stopping.is_set()
                    or invocation.status in TERMINAL  # MaxErrors reached: never sent
                ):
                    with contextlib.suppress(ValueError):
                        gate.waiting.remove(invocation)
                    return False  # CancelCommand (or _finish) already reported it
                if gate.may_start(invocation):
                    gate.waiting.remove(invocation)
                    gate.running += 1
                    self._start_process(invocation)
                    return True
                if time.monotonic() >= invocation.delivery_deadline:
                    gate.waiting.remove(invocation)
                    self._finish(invocation, "TimedOut", "DeliveryTimedOut", NEVER_STARTED)
                    return False
            time.sleep(POLL_SECONDS)

    def _start_process(self, invocation: _Invocation) -> None:
        master = invocation.master
        folder = master.path / "agent" / invocation.command.command_id
        folder.mkdir(parents=True, exist_ok=True)
        script_path = folder / "_script.sh"
        script_path.write_text(master.replace_commands_with or invocation.script)
        invocation.output_dir = folder
        with open(folder / "stdout", "wb") as out, open(folder / "stderr", "wb") as err:
            # Its own process group (new session), so a timeout or a cancel can kill
            # everything the script started.
            invocation.process = subprocess.Popen(
                ["/bin/sh", str(script_path)],
                cwd=master.path,
                # As the agent: the instance and region are named to the command.
                env={
                    **master.env,
                    "AWS_SSM_INSTANCE_ID": master.instance_id,
                    "AWS_SSM_REGION_NAME": self.region,
                    "SSM_COMMAND_ID": invocation.command.command_id,
                },
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        invocation.started = _now()
        invocation.record.update(
            Status="InProgress",
            StatusDetails="InProgress",
            ExecutionStartDateTime=_aws_time(invocation.started),
        )
        invocation.run_entry = {
            "command_id": invocation.command.command_id,
            "instance_id": master.instance_id,
            "script": invocation.script,
            "exit_code": None,
            "status": "InProgress",
            "started": time.monotonic(),
            "ended": None,
        }
        self.commands_run.append(invocation.run_entry)
        self._refresh_command(invocation.command)

    def _finish(self, invocation: _Invocation, status: str, details: str, code: int) -> None:
        ended = invocation.ended = _now()
        update: dict[str, Any] = {
            "Status": status,
            "StatusDetails": details,
            "ResponseCode": code,
            "ExecutionEndDateTime": _aws_time(ended),
            # Like AWS: output appears only once the command is over, truncated.
            "StandardOutputContent": invocation.output("stdout")[:STDOUT_LIMIT],
            "StandardErrorContent": invocation.output("stderr")[:STDERR_LIMIT],
        }
        if invocation.started is not None:
            elapsed = (ended - invocation.started).total_seconds()
            update["ExecutionElapsedTime"] = f"PT{elapsed:.3f}S"
        invocation.record.update(update)
        if invocation.run_entry is not None:
            invocation.run_entry.update(exit_code=code, status=status, ended=time.monotonic())
        self._refresh_command(invocation.command)
        gate = self._gates.get(invocation.command.command_id)
        if gate is not None and gate.waiting and invocation.command.error_count > gate.max_errors:
            # MaxErrors: the instances not sent to yet never get it.
            doomed = list(gate.waiting)
            gate.waiting.clear()
            for waiting in doomed:
                self._finish(waiting, "Cancelled", "Terminated", NEVER_STARTED)

    def _refresh_command(self, command: Command) -> None:
        """The command's own Status, from its invocations (one master: the same)."""
        records = command.invocations
        statuses = [r["Status"] for r in records]
        command.target_count = len(records)
        command.completed_count = sum(s in TERMINAL for s in statuses)
        command.error_count = sum(
            r["Status"] == "Failed" or r["StatusDetails"] == "ExecutionTimedOut" for r in records
        )
        if not records:
            command.status, command.status_details = "Success", "No Instances In Tag"
            return
        if all(s == "Pending" for s in statuses):
            command.status = "Pending"
        elif any(s not in TERMINAL for s in statuses):
            command.status = "Cancelling" if "Cancelling" in statuses else "InProgress"
        elif any(r["StatusDetails"] == "Terminated" for r in records):
            command.status = "Failed"  # stopped by MaxErrors
        else:
            command.status = next(
                (s for s in ("Cancelled", "Failed", "TimedOut") if s in statuses), "Success"
            )
        command.status_details = next(
            (r["StatusDetails"] for r in records if r["Status"] == command.status),
            command.status,
        )

    # -- request parsing and views ------------------------------------------------------------

    @staticmethod
    def _script_from(parameters: Mapping[str, list[str]]) -> str:
        commands = parameters.get("commands") or []
        if not commands:
            raise _ssm_error("InvalidParameters", "AWS-RunShellScript needs `commands`.")
        if any(parameters.get("workingDirectory") or []):
            raise _ssm_error(
                "InvalidParameters", "workingDirectory is not simulated: commands run in the master's folder"
            )
        # The agent writes the lines into one script file and runs it with sh.
        return "\n".join(commands) + "\n"

    @staticmethod
    def _script_from_document(
        response: SimpleSystemManagerResponse, name: str, given: Mapping[str, list[str]]
    ) -> tuple[str, float]:
        documents = response.ssm_backend._get_documents(name.rsplit("document/", 1)[-1])
        return document_script(documents.get_default_version().content_json, name, given)

    @staticmethod
    def _execution_timeout_from(parameters: Mapping[str, list[str]]) -> float:
        given = parameters.get("executionTimeout") or [str(DEFAULT_EXECUTION_TIMEOUT)]
        text = given[0]
        if not text.isdigit() or not 1 <= int(text) <= MAX_EXECUTION_TIMEOUT:
            raise _ssm_error(
                "InvalidParameters",
                f"executionTimeout must be 1 to {MAX_EXECUTION_TIMEOUT} seconds, got {text!r}",
            )
        return float(text)

    def _resolve_instances(
        self,
        response: SimpleSystemManagerResponse,
        instance_ids: list[str],
        targets: list[dict[str, Any]],
    ) -> list[str]:
        """The masters a command goes to: the ids asked for, or the ones its tags match."""
        if bool(instance_ids) == bool(targets):
            raise _ssm_error("InvalidParameters", "Give either InstanceIds or Targets.")
        chosen = list(instance_ids)
        if targets:
            tag_filters: dict[str, list[str]] = {}
            for target in targets:
                key, values = target.get("Key", ""), target.get("Values", [])
                if key == "InstanceIds":
                    chosen.extend(values)
                elif key.startswith("tag:") or key == "tag-key":
                    tag_filters[key] = values
                else:
                    raise _ssm_error("InvalidParameters", f"Target key {key!r} not simulated.")
            if tag_filters:
                # moto's EC2 filters match tags as AWS does (wildcards, case-sensitive); only
                # instances with an agent (our masters) are managed nodes.
                ec2 = ec2_backends[response.current_account][response.region]
                for reservation in ec2.all_reservations(filters=tag_filters):
                    chosen.extend(i.id for i in reservation.instances if i.id in self.masters)
        unknown = [i for i in chosen if i not in self.masters]
        if unknown:
            raise _ssm_error(
                "InvalidInstanceId",
                f"Instances {unknown} not in a valid state for account {self.account_id}",
            )
        return list(dict.fromkeys(chosen))

    @staticmethod
    def _describe_command(command: Command) -> dict[str, Any]:
        view = command.response_object()
        if command.targets:
            # AWS lists the instances a Targets command reached only in its invocations.
            view["InstanceIds"] = []
        view["DeliveryTimedOutCount"] = sum(
            r["StatusDetails"] == "DeliveryTimedOut" for r in command.invocations
        )
        return view

    def _describe_invocation(self, invocation: _Invocation, details: bool) -> dict[str, Any]:
        record = invocation.record
        view: dict[str, Any] = {
            "CommandId": record["CommandId"],
            "InstanceId": record["InstanceId"],
            "InstanceName": invocation.master.name,
            "Comment": record["Comment"],
            "DocumentName": record["DocumentName"],
            "DocumentVersion": record["DocumentVersion"],
            "RequestedDateTime": invocation.command.requested_date_time,
            "Status": record["Status"],
            "StatusDetails": record["StatusDetails"],
            "StandardOutputUrl": "",
            "StandardErrorUrl": "",
        }
        if details:
            output = record["StandardOutputContent"]
            if record["StandardErrorContent"]:
                output += "\n----------ERROR-------\n" + record["StandardErrorContent"]
            plugin: dict[str, Any] = {
                "Name": PLUGIN_NAME,
                "Status": record["Status"],
                "StatusDetails": record["StatusDetails"],
                "ResponseCode": record["ResponseCode"],
                "Output": output[:PLUGIN_OUTPUT_LIMIT],
            }
            if invocation.started is not None:
                plugin["ResponseStartDateTime"] = invocation.started
            if invocation.ended is not None:
                plugin["ResponseFinishDateTime"] = invocation.ended
            view["CommandPlugins"] = [plugin]
        return view

    def _instance_filters(
        self, filters: list[dict[str, Any]], key_name: str, values_name: str
    ) -> list[Callable[[Master], bool]]:
        tests: list[Callable[[Master], bool]] = []
        for given in filters:
            key, values = given.get(key_name, ""), set(given.get(values_name) or [])
            if key == "InstanceIds":
                tests.append(lambda m, v=values: m.instance_id in v)
            elif key == "PingStatus":
                tests.append(lambda m, v=values: m.ping_status() in v)
            elif key == "PlatformTypes":
                tests.append(lambda m, v=values: "Linux" in v)
            elif key == "ResourceType":
                tests.append(lambda m, v=values: "EC2Instance" in v)
            elif key.startswith("tag:") and key_name == "Key":
                tag = key.removeprefix("tag:")
                tests.append(lambda m, t=tag, v=values: m.tags.get(t) in v)
            else:
                raise _ssm_error("InvalidFilterKey", f"Filter key {key!r} is not simulated.")
        return tests

    @staticmethod
    def _describe_master(master: Master) -> dict[str, Any]:
        return {
            "InstanceId": master.instance_id,
            "PingStatus": master.ping_status(),
            "LastPingDateTime": _now() if master.online else master.last_ping,
            "AgentVersion": "3.3.0.0",
            "IsLatestVersion": True,
            "PlatformType": "Linux",
            "PlatformName": "Ubuntu",
            "PlatformVersion": "24.04",
            "ResourceType": "EC2Instance",
            "ComputerName": master.name,
            "IPAddress": "10.0.1.10",
            "RegistrationDate": master.registered,
        }


# --------------------------------------------------------------------------------------------
# Installing the stand-in into moto


def document_script(
    content: Mapping[str, Any], name: str, given: Mapping[str, list[str]]
) -> tuple[str, float]:
    """A custom Command document (schema 2.2, one aws:runShellScript step), as SSM runs it:
    every parameter checked against its allowedValues or allowedPattern (an unknown one,
    a missing required one or a value that does not match is refused with
    InvalidParameters, and nothing runs), then each {{ name }} replaced by its value."""
    declared: Mapping[str, Mapping[str, Any]] = content.get("parameters") or {}
    values: dict[str, str] = {}
    for key, value in given.items():
        if key not in declared:
            raise _ssm_error("InvalidParameters", f"document {name} has no parameter {key}")
        if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], str):
            raise _ssm_error("InvalidParameters", f"parameter {key} must be one String")
        values[key] = value[0]
    for key, spec in declared.items():
        if key not in values:
            if "default" not in spec:
                raise _ssm_error("InvalidParameters", f"document {name} needs parameter {key}")
            values[key] = str(spec["default"])
        allowed_values = spec.get("allowedValues")
        pattern = spec.get("allowedPattern")
        # re.search with the document's anchors, as SSM applies the pattern (a `$` there
        # matches before a last line break too; the documents quote every value anyway).
        if (allowed_values is not None and values[key] not in allowed_values) or (
            pattern is not None and not re.search(pattern, values[key])
        ):
            raise _ssm_error(
                "InvalidParameters",
                f"Parameter {key} value does not match the allowed values or pattern of document {name}",
            )
    steps = content.get("mainSteps") or []
    if (
        content.get("schemaVersion") != "2.2"
        or len(steps) != 1
        or steps[0].get("action") != "aws:runShellScript"
    ):
        raise _ssm_error(
            "InvalidDocument",
            "the simulated agent runs schema 2.2 documents of one aws:runShellScript step",
        )

    def filled(text: str) -> str:
        return re.sub(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}", lambda m: values.get(m.group(1), m.group(0)), text)

    inputs = steps[0].get("inputs") or {}
    lines = [filled(line) for line in inputs.get("runCommand") or []]
    timeout = filled(str(inputs.get("timeoutSeconds", DEFAULT_EXECUTION_TIMEOUT)))
    if not timeout.isdigit() or not 1 <= int(timeout) <= MAX_EXECUTION_TIMEOUT:
        raise _ssm_error(
            "InvalidParameters", f"timeoutSeconds must be 1 to {MAX_EXECUTION_TIMEOUT}, got {timeout!r}"
        )
    return "\n".join(lines) + "\n", float(timeout)


class _ResponsePatch:
    """Puts the SSM actions above on moto's response class, and takes them off again.

    moto dispatches an API action to the response class's method of the same name in
    snake_case (found with inspect on the class), so adding a method adds an action.
    """

    ACTIONS = (
        "send_command",
        "list_commands",
        "get_command_invocation",
        "list_command_invocations",
        "cancel_command",
        "describe_instance_information",
    )

    def __init__(self, sim: SimulatedAWS) -> None:
        self._sim = sim
        self._saved: dict[str, Any] = {}

    def install(self) -> None:
        for action in self.ACTIONS:
            self._saved[action] = SimpleSystemManagerResponse.__dict__.get(action)
            setattr(SimpleSystemManagerResponse, action, _as_method(getattr(self._sim, action)))

    def uninstall(self) -> None:
        for action, original in self._saved.items():
            if original is None:
                delattr(SimpleSystemManagerResponse, action)
            else:
                setattr(SimpleSystemManagerResponse, action, original)
        self._saved.clear()


def _as_method(handler: Callable[[SimpleSystemManagerResponse], Any]) -> Callable[..., Any]:
    # A plain function, so that moto's inspect.isfunction lookup sees it as an action.
    def action(response: SimpleSystemManagerResponse) -> Any:
        return handler(response)

    return action
