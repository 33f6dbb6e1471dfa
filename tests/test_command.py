"""The SSM command lines and sending them.

The lines are run here for real under plain `sh` (dash when installed, as on Ubuntu), with a
fake `aws` on PATH serving a fake staging from a folder and a fake deploy script that records
the arguments it received. That proves the quoting, the checksum gate and the exit code guard
by outcome. Sending uses botocore's Stubber: moto can neither throttle nor fail with a 5xx.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError
from botocore.stub import Stubber

from deploykit import command
from deploykit.awsapi import MAX_ATTEMPTS, AwsClients
from deploykit.errors import AwsCallFailed, InputError
from deploykit.inputs import Settings, parse_settings
from deploykit.stage import Staging

SH = shutil.which("dash") or "/bin/sh"
INSTANCE = "i-0123456789abcdef0"
CMD_1, CMD_2, CMD_3, CMD_OTHER = (f"{n}1234567-89ab-cdef-0123-456789abcdef" for n in "123f")
HOSTILE = "x'\"$(touch pwned)`touch pwned`;touch pwned&|<>*?~#{a,b}\\ ${HOME}!"

FAKE_AWS = r"""#!/bin/sh
# aws s3api get-object --region R --bucket B --key K --expected-bucket-owner O OUTFILE
key=; out=
while [ $# -gt 0 ]; do
  case "$1" in
    s3api|get-object) shift ;;
    --key) key=$2; shift 2 ;;
    --region|--bucket|--expected-bucket-owner) printf '%s\0%s\0' "$1" "$2" >> "$FAKE_S3/calls"; shift 2 ;;
    *) out=$1; shift ;;
  esac
done
name=$(printf '%s' "$key" | sha256sum | cut -c1-64)
[ -f "$FAKE_S3/objects/$name" ] || { echo "NoSuchKey: $key" >&2; exit 255; }
cp "$FAKE_S3/objects/$name" "$out"
"""

FAKE_SCRIPT = b"""#!/bin/bash
printf '%s\\0' "$@" > "$FAKE_S3/args"
pwd > "$FAKE_S3/cwd"
printf '%s' "$TMPDIR" > "$FAKE_S3/tmpdir"
exit "${FAKE_EXIT:-0}"
"""
BUNDLE = b"fake bundle bytes"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """The strictest values the validators allow, with every character class they admit."""
    workspace = tmp_path / "repo"
    (workspace / "k8s").mkdir(parents=True)
    env = {
        "GITHUB_WORKSPACE": str(workspace),
        "GITHUB_SHA": "0123456789abcdef" * 4,
        "GITHUB_SERVER_URL": "https://github.example.com:8443",
        "GITHUB_REPOSITORY": "acme-corp/my_repo.x",
        "GITHUB_RUN_ID": "1234567890",
    }
    return parse_settings(
        {
            "aws-region": "us-gov-west-1",
            "manifests": "k8s",
            "namespace": "prod-platform-1",
            "timeout": "86400",
            "rollback": "false",
            "rollback-timeout": "3600",
            "kubectl": "sudo -E k3s kubectl --kubeconfig=/etc/rancher/k3s/k3s.yaml --server=https://1.2.3.4:6443",
            "request-timeout": "9999m",
            "kubectl-validate": "true",
        },
        env,
    )


@pytest.fixture
def hostile_settings(settings: Settings) -> Settings:
    """Values no validator would let through: the quoting alone must hold them."""
    return dataclasses.replace(
        settings,
        aws_region=HOSTILE,
        namespace=HOSTILE,
        kubectl=("k3s", HOSTILE),
        request_timeout=HOSTILE,
        commit=HOSTILE,
        run_url=HOSTILE,
    )


@pytest.fixture
def staging() -> Staging:
    return Staging(
        bucket="team.bucket-1", prefix=f"k3s-deploy/{HOSTILE}/", account="123456789012", created_bucket=False
    )


class Instance:
    """A folder standing in for the master: fake `aws`, a fake S3 store, TMPDIR and state."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.s3 = root / "s3"
        (self.s3 / "objects").mkdir(parents=True)
        self.bin = root / "bin"
        self.bin.mkdir()
        (self.bin / "aws").write_text(FAKE_AWS)
        (self.bin / "aws").chmod(0o755)
        self.tmp = root / "tmp"
        self.tmp.mkdir()
        self.state = root / "state"
        self.state.mkdir()
        self.cwd = root / "home"
        self.cwd.mkdir()

    def put(self, key: str, body: bytes) -> None:
        (self.s3 / "objects" / sha(key.encode())).write_bytes(body)

    def run(self, lines: list[str], **env: str) -> subprocess.CompletedProcess[str]:
        script = self.root / "_script.sh"  # AWS-RunShellScript joins the lines into one file
        script.write_text("\n".join(lines) + "\n")
        full_env = {
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "TMPDIR": str(self.tmp),
            "HOME": str(self.cwd),
            "K3S_DEPLOY_STATE_DIR": str(self.state),
            "FAKE_S3": str(self.s3),
            **env,
        }
        return subprocess.run(
            [SH, str(script)], cwd=self.cwd, env=full_env, capture_output=True, text=True, timeout=20
        )

    def args(self) -> list[str]:
        return (self.s3 / "args").read_bytes().decode().split("\0")[:-1]

    def aws_calls(self) -> list[str]:
        return (self.s3 / "calls").read_bytes().decode().split("\0")[:-1]

    def pwned(self) -> list[Path]:
        return [p for p in self.root.rglob("pwned")] + list(Path.cwd().glob("pwned"))


@pytest.fixture
def instance(tmp_path: Path) -> Instance:
    return Instance(tmp_path / "instance")


def staged(instance: Instance, staging: Staging, script: bytes = FAKE_SCRIPT, bundle: bytes = BUNDLE) -> None:
    instance.put(staging.key(command.SCRIPT_NAME), script)
    instance.put(staging.key(command.BUNDLE_NAME), bundle)


def deploy_lines(settings: Settings, staging: Staging, deploy_id: str = HOSTILE) -> list[str]:
    return command.deploy_lines(settings, staging, deploy_id, sha(FAKE_SCRIPT), sha(BUNDLE))


def expected_args(entry: str, deploy_id: str) -> list[str]:
    """The script's whole command line: its options travel in the verified bundle."""
    if entry == "rollback":
        return ["rollback", "--deploy-id", deploy_id, "--state-dir", "STATE"]
    return [entry, "--bundle", "manifests.tar.gz", "--deploy-id", deploy_id, "--state-dir", "STATE"]


def assignments(lines: list[str]) -> dict[str, list[str]]:
    """The program's variable assignments, each split as sh would split it."""
    names = {p.variable for p in command.PARAMETERS}
    return {line.split("=", 1)[0]: shlex.split(line) for line in lines if line.split("=", 1)[0] in names}


# the lines parse and quote


@pytest.mark.parametrize("which", ["settings", "hostile_settings"])
def test_deploy_and_rollback_lines_parse_under_plain_sh(request, staging, which):
    settings = request.getfixturevalue(which)
    for lines in (deploy_lines(settings, staging), command.rollback_lines(HOSTILE)):
        result = subprocess.run([SH, "-n"], input="\n".join(lines) + "\n", capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_every_value_in_the_deploy_lines_is_one_shell_word_with_its_exact_value(hostile_settings, staging):
    lines = deploy_lines(hostile_settings, staging)
    assert assignments(lines) == {
        "entry": ["entry=deploy"],
        "id": [f"id={HOSTILE}"],
        "delivery": ["delivery=s3"],
        "region": [f"region={HOSTILE}"],
        "bucket": ["bucket=team.bucket-1"],
        "owner": ["owner=123456789012"],
        "prefix": [f"prefix=k3s-deploy/{HOSTILE}/"],
        "script_url": ["script_url="],
        "bundle_url": ["bundle_url="],
        "script_sum": [f"script_sum={sha(FAKE_SCRIPT)}"],
        "bundle_sum": [f"bundle_sum={sha(BUNDLE)}"],
    }
    # No option of the script is on its command line: they are in the bundle.
    text = "\n".join(lines)
    for value in (hostile_settings.namespace, "--timeout", "--kubectl", hostile_settings.request_timeout):
        assert value not in text.replace(f"{shlex.quote(HOSTILE)}", "")


def test_every_value_in_the_rollback_lines_is_one_shell_word_with_its_exact_value(hostile_settings):
    found = assignments(command.rollback_lines(HOSTILE))
    assert found["entry"] == ["entry=rollback"]
    assert found["id"] == [f"id={HOSTILE}"]
    defaults = {p.variable: p.default for p in command.PARAMETERS if p.variable not in ("entry", "id")}
    assert {name: found[name] for name in defaults} == {n: [f"{n}={d}"] for n, d in defaults.items()}


# the lines run


@pytest.mark.parametrize("which", ["settings", "hostile_settings"])
def test_the_lines_download_verify_and_run_the_script_with_exactly_the_values_given(
    request, instance, staging, which
):
    settings = request.getfixturevalue(which)
    staged(instance, staging)
    result = instance.run(deploy_lines(settings, staging))
    assert result.returncode == 0, result.stderr
    args = instance.args()
    assert args[args.index("--state-dir") + 1] == str(instance.state)
    args[args.index("--state-dir") + 1] = "STATE"
    assert args == expected_args("deploy", HOSTILE)
    one_download = ["--region", settings.aws_region, "--bucket", "team.bucket-1"]
    one_download += ["--expected-bucket-owner", "123456789012"]
    assert instance.aws_calls() == one_download * 2
    assert instance.pwned() == []


def test_the_work_folder_is_fresh_and_removed_afterwards(instance, settings, staging):
    staged(instance, staging)
    instance.run(deploy_lines(settings, staging))
    work = Path((instance.s3 / "cwd").read_text().strip())
    assert work.parent == instance.tmp and work.name.startswith("k3s-deploy.")
    # The script's own temporary files go inside it, and go with it.
    assert (instance.s3 / "tmpdir").read_text() == str(work)
    assert not work.exists()
    assert list(instance.tmp.iterdir()) == []


def test_rollback_lines_delete_only_the_download_folders_of_a_deploy_that_is_gone(instance, settings):
    """A SIGKILL leaves the deploy's download folder; the rollback deletes it. But when the
    cancel failed the deploy may still be running from it: then it stays (the deploy's own
    trap deletes it)."""
    deploy_id = "20250304-050607-0a1b2c3d"
    gone = _dead_pid()
    dead = instance.tmp / f"k3s-deploy.{deploy_id}.{gone}.Ab3dEf9h"
    running = instance.tmp / f"k3s-deploy.{deploy_id}.{os.getpid()}.Zx8yWv7u"
    other = instance.tmp / f"k3s-deploy.20250304-050607-ffffffff.{gone}.Qq1rRs2t"
    for folder in (dead, running, other):
        (folder / "bundle").mkdir(parents=True)
    result = instance.run(command.rollback_lines(deploy_id))
    assert result.returncode == 0, result.stderr
    assert not dead.exists()
    assert running.exists() and other.exists()


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.parametrize(("script_exit", "command_exit"), [(0, 0), (7, 7), (9, 9), (194, 1), (1, 1)])
def test_the_lines_exit_with_the_scripts_code_but_never_the_reboot_code_194(
    instance, settings, staging, script_exit, command_exit
):
    staged(instance, staging)
    result = instance.run(deploy_lines(settings, staging), FAKE_EXIT=str(script_exit))
    assert result.returncode == command_exit
    assert command_exit != command.REBOOT_EXIT_CODE


def test_a_staged_file_that_does_not_match_its_sha256_is_not_run(instance, settings, staging):
    staged(instance, staging, bundle=b"tampered")
    result = instance.run(deploy_lines(settings, staging))
    assert result.returncode == command.EXIT_CHECKSUM_MISMATCH
    assert "sha256 mismatch" in result.stderr
    assert not (instance.s3 / "args").exists()


def test_a_swapped_script_is_not_run(instance, settings, staging):
    staged(instance, staging, script=b'#!/bin/bash\ntouch "$FAKE_S3/args"\n')
    result = instance.run(deploy_lines(settings, staging))
    assert result.returncode == command.EXIT_CHECKSUM_MISMATCH
    assert not (instance.s3 / "args").exists()


def test_a_failed_download_exits_90_naming_the_object(instance, settings, staging):
    instance.put(staging.key(command.SCRIPT_NAME), FAKE_SCRIPT)  # the bundle is missing
    result = instance.run(deploy_lines(settings, staging))
    assert result.returncode == command.EXIT_DOWNLOAD_FAILED
    assert f"could not download s3://team.bucket-1/{staging.key(command.BUNDLE_NAME)}" in result.stderr
    assert not (instance.s3 / "args").exists()
    assert list(instance.tmp.iterdir()) == []


def test_rollback_lines_run_the_copy_the_deploy_left_with_exact_values(instance, hostile_settings):
    folder = instance.state / HOSTILE
    folder.mkdir()
    (folder / "k3s-deploy.sh").write_bytes(FAKE_SCRIPT)
    result = instance.run(command.rollback_lines(HOSTILE), FAKE_EXIT="194")
    assert result.returncode == 1
    args = instance.args()
    assert args[args.index("--state-dir") + 1] == str(instance.state)
    args[args.index("--state-dir") + 1] = "STATE"
    assert args == expected_args("rollback", HOSTILE)
    assert instance.pwned() == []


def test_rollback_lines_with_nothing_recorded_succeed_without_running_anything(instance, settings):
    result = instance.run(command.rollback_lines("20250304-050607-0a1b2c3d"))
    assert result.returncode == 0
    assert "nothing to roll back" in result.stdout
    assert not (instance.s3 / "args").exists()


def test_execution_timeout_leaves_room_beyond_the_scripts_own_budget(settings):
    for timeout, rollback_timeout in ((10, 10), (600, 120), (86400, 3600)):
        tuned = dataclasses.replace(settings, timeout=timeout, rollback_timeout=rollback_timeout)
        # The lock may be waited for first; the deploy's own budget starts once it is held.
        assert command.execution_timeout(tuned) > tuned.lock_timeout + timeout + rollback_timeout
        assert command.rollback_execution_timeout(tuned) > tuned.lock_timeout + rollback_timeout
        # A dry run takes no lock and rolls nothing back.
        dry = dataclasses.replace(tuned, dry_run=True)
        assert timeout < command.execution_timeout(dry) < command.execution_timeout(tuned)


def test_dry_run_lines_run_the_script_s_dry_run(settings, staging):
    lines = deploy_lines(dataclasses.replace(settings, dry_run=True), staging)
    assert assignments(lines)["entry"] == ["entry=dry-run"]


# sending


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def ssm_client(max_attempts: int = 1):
    return boto3.client(
        "ssm",
        region_name="eu-west-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"mode": "standard", "max_attempts": max_attempts}),
    )


def count_sends(client) -> list[int]:
    sends: list[int] = []
    client.meta.events.register("before-parameter-build.ssm.SendCommand", lambda **_: sends.append(1))
    return sends


REQUEST = command.Request({"entryPoint": "rollback", "deployId": "20250304-050607-0a1b2c3d"})


def send(ssm_send, ssm, clock: FakeClock, comment: str = "k3s-deploy 20250304-050607-0a1b2c3d"):
    return command.send_command(
        ssm_send, ssm, INSTANCE, REQUEST, comment, 780, clock=clock.monotonic, sleep=clock.sleep
    )


def test_a_throttled_send_is_sent_once_more_after_a_pause():
    ssm_send, ssm, clock = ssm_client(), ssm_client(), FakeClock()
    sends = count_sends(ssm_send)
    with Stubber(ssm_send) as send_stub, Stubber(ssm) as ssm_stub:
        send_stub.add_client_error("send_command", "ThrottlingException", "Rate exceeded", 400)
        send_stub.add_response("send_command", {"Command": {"CommandId": CMD_2}})
        sent = send(ssm_send, ssm, clock)
        send_stub.assert_no_pending_responses()
        ssm_stub.assert_no_pending_responses()
    assert sent.command_id == CMD_2
    assert sent.instance_id == INSTANCE
    assert sent.execution_timeout == 780
    assert len(sends) == 2
    assert clock.sleeps and all(0 < s <= 10 for s in clock.sleeps)


def test_a_send_failing_with_500_is_not_resent_when_list_commands_shows_our_comment():
    ssm_send, ssm, clock = ssm_client(), ssm_client(), FakeClock()
    sends = count_sends(ssm_send)
    comment = "k3s-deploy 20250304-050607-0a1b2c3d"
    with Stubber(ssm_send) as send_stub, Stubber(ssm) as ssm_stub:
        send_stub.add_client_error("send_command", "InternalServerError", "oops", 500)
        ssm_stub.add_response(
            "list_commands",
            {
                "Commands": [
                    {"CommandId": CMD_OTHER, "Comment": "k3s-deploy 20250101-000000-ffffffff"},
                    {"CommandId": CMD_1, "Comment": comment},
                ]
            },
            {"InstanceId": INSTANCE},
        )
        sent = send(ssm_send, ssm, clock, comment)
        send_stub.assert_no_pending_responses()
        ssm_stub.assert_no_pending_responses()
    assert sent.command_id == CMD_1
    assert len(sends) == 1


def test_a_lost_connection_is_not_resent_when_list_commands_shows_our_comment():
    class LostConnection:
        calls = 0

        def send_command(self, **_: object) -> dict:
            self.calls += 1
            raise EndpointConnectionError(endpoint_url="https://ssm.eu-west-1.amazonaws.com/")

    ssm_send, ssm, clock = LostConnection(), ssm_client(), FakeClock()
    with Stubber(ssm) as ssm_stub:
        ssm_stub.add_response(
            "list_commands", {"Commands": [{"CommandId": CMD_1, "Comment": "k3s-deploy x"}]}
        )
        sent = send(ssm_send, ssm, clock, "k3s-deploy x")
    assert sent.command_id == CMD_1
    assert ssm_send.calls == 1


def test_a_send_failing_with_500_and_not_listed_is_sent_again():
    ssm_send, ssm, clock = ssm_client(), ssm_client(), FakeClock()
    sends = count_sends(ssm_send)
    with Stubber(ssm_send) as send_stub, Stubber(ssm) as ssm_stub:
        send_stub.add_client_error("send_command", "InternalServerError", "oops", 500)
        for _ in range(command.AMBIGUOUS_LOOKS):  # ListCommands may lag: asked several times first
            ssm_stub.add_response("list_commands", {"Commands": []})
        send_stub.add_response("send_command", {"Command": {"CommandId": CMD_3}})
        sent = send(ssm_send, ssm, clock)
    assert sent.command_id == CMD_3
    assert len(sends) == 2


def test_access_denied_on_send_is_an_error_naming_the_permission_and_is_not_resent():
    ssm_send, ssm, clock = ssm_client(), ssm_client(), FakeClock()
    sends = count_sends(ssm_send)
    with Stubber(ssm_send) as send_stub, Stubber(ssm):
        send_stub.add_client_error("send_command", "AccessDeniedException", "no", 400)
        with pytest.raises(AwsCallFailed) as caught:
            send(ssm_send, ssm, clock)
    assert "ssm:SendCommand" in (caught.value.fix or "")
    assert len(sends) == 1


def test_a_send_throttled_every_time_gives_up_after_five_tries():
    ssm_send, ssm, clock = ssm_client(), ssm_client(), FakeClock()
    sends = count_sends(ssm_send)
    with Stubber(ssm_send) as send_stub, Stubber(ssm):
        for _ in range(5):
            send_stub.add_client_error("send_command", "ThrottlingException", "Rate exceeded", 400)
        with pytest.raises(AwsCallFailed, match="after 5 tries"):
            send(ssm_send, ssm, clock)
    assert len(sends) == 5
    assert all(s <= 10 for s in clock.sleeps)


def test_the_sent_command_asks_for_run_shell_script_with_timeouts_and_the_comment():
    ssm_send, ssm, clock = ssm_client(), ssm_client(), FakeClock()
    with Stubber(ssm_send) as send_stub:
        send_stub.add_response(
            "send_command",
            {"Command": {"CommandId": CMD_1}},
            {
                "InstanceIds": [INSTANCE],
                "DocumentName": "AWS-RunShellScript",
                "Comment": "k3s-deploy abc",
                "TimeoutSeconds": command.DELIVERY_TIMEOUT,
                "Parameters": {"commands": REQUEST.lines(), "executionTimeout": ["780"]},
            },
        )
        assert send(ssm_send, ssm, clock, "k3s-deploy abc").command_id == CMD_1


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: object):
        yield self.body


@pytest.mark.parametrize(("client", "tries"), [("ssm_send", 1), ("ssm", MAX_ATTEMPTS)])
def test_the_send_client_never_retries_on_its_own_while_other_clients_do(monkeypatch, client, tries):
    """A 500 answered below botocore's retry layer: count what really goes on the wire."""
    for name in (
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_SSM",
        "AWS_PROFILE",
        "AWS_RETRY_MODE",
        "AWS_MAX_ATTEMPTS",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    ssm = getattr(AwsClients("eu-west-1"), client)
    wire: list[str] = []

    def answer_500(request, **_: object) -> AWSResponse:
        wire.append(request.url)
        body = b'{"__type":"InternalServerError","message":"try later"}'
        return AWSResponse(request.url, 500, {"Content-Type": "application/x-amz-json-1.1"}, _Raw(body))

    ssm.meta.events.register("before-send.ssm", answer_500)
    monkeypatch.setattr("time.sleep", lambda _: None)  # botocore's own backoff
    with pytest.raises(ClientError):
        ssm.send_command(InstanceIds=[INSTANCE], DocumentName="AWS-RunShellScript", Parameters={})
    assert len(wire) == tries


def test_the_lease_lasts_the_longest_run_the_action_allows_the_command() -> None:
    """The deploy script's lease (lock-timeout + timeout + rollback-timeout + its margin)
    must not end before SSM's execution timeout of the command (#15 finding 2)."""
    script = command.deploy_script().decode()
    margin = re.search(r"^readonly LOCK_MARGIN_SECONDS=(\d+)$", script, re.MULTILINE)
    assert margin is not None
    assert int(margin[1]) >= command.EXECUTION_MARGIN
    assert (
        "lock_duration=$((lock_timeout_seconds + timeout_seconds + rollback_timeout_seconds"
        " + LOCK_MARGIN_SECONDS))"
    ) in script
    assert (
        "lock_duration=$((lock_timeout_seconds + rollback_timeout_seconds + LOCK_MARGIN_SECONDS))"
    ) in script


# the custom SSM document (input ssm-document)

PRESIGNED = {
    command.SCRIPT_NAME: "https://team.bucket-1.s3.eu-west-1.amazonaws.com/k3s-deploy/20250304-050607-0a1b2c3d/"
    "k3s-deploy.sh?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=ASIA%2F20250304%2Feu-west-1%2Fs3"
    "%2Faws4_request&X-Amz-Date=20250304T050607Z&X-Amz-Expires=180&X-Amz-SignedHeaders=host"
    "&X-Amz-Security-Token=IQo%2Bab%3D%3D&X-Amz-Signature=0a1b",
    command.BUNDLE_NAME: "http://127.0.0.1:5000/team.bucket-1/manifests.tar.gz?X-Amz-Signature=ff",
}
DEPLOY_ID = "20250304-050607-0a1b2c3d"


def document_lines(request: command.Request, timeout: int = 780) -> tuple[list[str], float]:
    """The document's program with the values SSM would put in, after its own checks."""
    from devkit.simulate.aws import document_script

    script, limit = document_script(
        command.document_content(), "k3s-deploy", request.send_parameters("k3s-deploy", timeout)
    )
    return script.splitlines(), limit


def test_the_document_runs_the_same_program_as_run_shell_script_apart_from_how_values_get_in(
    settings, staging
):
    plain = dataclasses.replace(staging, prefix=f"k3s-deploy/{DEPLOY_ID}/")
    for request in (
        command.deploy_request(settings, plain, DEPLOY_ID, sha(FAKE_SCRIPT), sha(BUNDLE)),
        command.deploy_request(settings, plain, DEPLOY_ID, sha(FAKE_SCRIPT), sha(BUNDLE), PRESIGNED),
        command.rollback_request(DEPLOY_ID),
    ):
        lines, limit = document_lines(request)
        assert limit == 780
        plain_lines = request.lines()
        assert len(lines) == len(plain_lines) > 30
        # The same lines; an assignment differs only in its quotes (shlex.quote leaves a plain
        # word bare, the document always quotes), and means the same to sh.
        assert assignments(lines) == assignments(plain_lines)
        names = {p.variable for p in command.PARAMETERS}
        assert [li for li in lines if li.split("=", 1)[0] not in names] == [
            li for li in plain_lines if li.split("=", 1)[0] not in names
        ]


def test_the_document_deploys_rolls_back_and_refuses_tampered_files_like_the_plain_lines(instance, settings):
    staging = Staging(
        bucket="team.bucket-1",
        prefix=f"k3s-deploy/{DEPLOY_ID}/",
        account="123456789012",
        created_bucket=False,
    )
    staged(instance, staging)
    request = command.deploy_request(settings, staging, DEPLOY_ID, sha(FAKE_SCRIPT), sha(BUNDLE))
    result = instance.run(document_lines(request)[0])
    assert result.returncode == 0, result.stderr
    args = instance.args()
    args[args.index("--state-dir") + 1] = "STATE"
    assert args == expected_args("deploy", DEPLOY_ID)
    (instance.s3 / "args").unlink()
    tampered = command.deploy_request(settings, staging, DEPLOY_ID, sha(FAKE_SCRIPT), sha(b"other"))
    assert instance.run(document_lines(tampered)[0]).returncode == command.EXIT_CHECKSUM_MISMATCH
    assert not (instance.s3 / "args").exists()
    (instance.state / DEPLOY_ID).mkdir()
    (instance.state / DEPLOY_ID / "k3s-deploy.sh").write_bytes(FAKE_SCRIPT)
    assert instance.run(document_lines(command.rollback_request(DEPLOY_ID))[0]).returncode == 0
    args = instance.args()
    args[args.index("--state-dir") + 1] = "STATE"
    assert args == expected_args("rollback", DEPLOY_ID)


def _refused(parameters: dict[str, list[str]]) -> str:
    from devkit.simulate.aws import document_script

    with pytest.raises(Exception) as caught:
        document_script(command.document_content(), "k3s-deploy", parameters)
    return str(caught.value)


@pytest.mark.parametrize("parameter", [p.name for p in command.PARAMETERS])
@pytest.mark.parametrize(
    "hostile", ["'", "a b", "$(touch pwned)", "`touch pwned`", "a\\b", "a;b", "a\nb", "x'\"$HOME", HOSTILE]
)
def test_the_document_refuses_any_value_that_could_leave_its_quotes(settings, staging, parameter, hostile):
    plain = dataclasses.replace(staging, prefix=f"k3s-deploy/{DEPLOY_ID}/")
    good = command.deploy_request(settings, plain, DEPLOY_ID, sha(FAKE_SCRIPT), sha(BUNDLE), PRESIGNED)
    parameters = good.send_parameters("k3s-deploy", 780)
    document_lines(good)  # the real values pass
    message = _refused({**parameters, parameter: [f"ok{hostile}"]})
    assert "does not match" in message


def test_the_document_refuses_unknown_parameters_and_another_version(settings, staging):
    parameters = command.rollback_request(DEPLOY_ID).send_parameters("k3s-deploy", 780)
    assert "has no parameter commands" in _refused({**parameters, "commands": ["touch pwned"]})
    assert "does not match" in _refused({**parameters, "documentVersion": ["0"]})
    assert "needs parameter deployId" in _refused({"entryPoint": ["rollback"]})


def test_the_example_document_is_the_one_the_action_sends_for():
    """examples/iam/k3s-deploy-document.json is what users create: it must be this version's
    (regenerate: python -c 'import json; from deploykit import command;
    print(json.dumps(command.document_content(), indent=2))' > examples/iam/k3s-deploy-document.json)."""
    example = Path(__file__).resolve().parent.parent / "examples" / "iam" / "k3s-deploy-document.json"
    assert json.loads(example.read_text()) == command.document_content()


class _Documents:
    def __init__(self, described: dict | None = None, error: str = "") -> None:
        self.described, self.error, self.asked = described, error, []

    def describe_document(self, Name: str) -> dict:
        self.asked.append(Name)
        if self.error:
            raise ClientError({"Error": {"Code": self.error, "Message": "no"}}, "DescribeDocument")
        return {"Document": self.described}


def test_a_document_of_another_version_is_refused_with_how_to_update_it():
    current = {"DocumentType": "Command", "Parameters": [{"Name": "documentVersion", "DefaultValue": "1"}]}
    command.check_document(_Documents(current), "k3s-deploy")
    for parameters, shown in (
        ([{"Name": "documentVersion", "DefaultValue": "0"}], "documentVersion 0"),
        ([], "no documentVersion"),
    ):
        with pytest.raises(InputError) as caught:
            command.check_document(
                _Documents({"DocumentType": "Command", "Parameters": parameters}), "k3s-deploy"
            )
        assert shown in caught.value.message
        assert "k3s-deploy-document.json" in (caught.value.fix or "")
    with pytest.raises(InputError, match="does not exist in this account and region"):
        command.check_document(_Documents(error="InvalidDocument"), "k3s-deploy")
    with pytest.raises(AwsCallFailed) as denied:
        command.check_document(_Documents(error="AccessDeniedException"), "k3s-deploy")
    assert "ssm:DescribeDocument" in str(denied.value.message) + str(denied.value.fix)


@pytest.mark.parametrize("region", ["eu-west-1", "us-gov-west-1", "ap-southeast-10", "cn-northwest-1"])
def test_the_document_takes_every_region_the_inputs_take(region: str) -> None:
    from deploykit.inputs import _REGION

    pattern = next(p.pattern for p in command.PARAMETERS if p.name == "region")
    assert _REGION.match(region) and re.search(pattern, region)
