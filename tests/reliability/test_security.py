"""Security properties, one test each (docs/RELIABILITY.md lists them with these tests).

- no shell injection anywhere in the SSM command: any value, run under sh, arrives as one
  argument and runs nothing (property-based, over the command lines the action sends);
- the master runs only what it verified: a staged file swapped after upload gives exit 91 and
  nothing applied;
- ExpectedBucketOwner on every S3 call that accepts it (read off the wire);
- someone else's bucket is never used (BucketAlreadyExists, or a foreign bucket seen first);
- the staging bucket blocks public access, is encrypted, tagged and expires its objects;
- `delivery: presigned`: the master fetches with curl and no credentials at all; the URLs are
  short-lived and masked, never printed, and secrets in the manifests never reach the log;
- remote output cannot issue workflow commands.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploykit import command
from deploykit.inputs import parse_settings
from deploykit.stage import Staging
from devkit.simulate.faults import Call
from tests.reliability import figures
from tests.reliability.conftest import Rig

CANARY = Path(tempfile.gettempdir()) / f"k3s-deploy-canary-{os.getpid()}"
PAYLOADS = [
    f"$(touch {CANARY})",
    f"`touch {CANARY}`",
    f"'; touch {CANARY}; '",
    f'"; touch {CANARY}; "',
    f"\ntouch {CANARY}\n",
    f"x && touch {CANARY}",
    f"x | touch {CANARY}",
    "${IFS}$HOME*?[a]~",
    "\\",
    "-",
    "--namespace",
]
# Anything a process argument can hold (no NUL), hostile payloads more often than chance would.
VALUES = st.one_of(
    st.sampled_from(PAYLOADS),
    st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=40
    ),
    st.builds(
        lambda a, b: a + b,
        st.sampled_from(PAYLOADS),
        st.text(min_size=0, max_size=10).filter(lambda t: "\x00" not in t),
    ),
)
RECORDER = f"""#!/bin/sh
exec {sys.executable} -c \
  'import json, sys; open(sys.argv[1], "w").write(json.dumps(sys.argv[2:]))' "$ARGV_FILE" "$@"
"""
FAKE_AWS = f"""#!{sys.executable}
import os, shutil, sys
args = sys.argv[1:]
open(os.environ["AWS_ARGV_FILE"], "a").write(repr(args) + "\\n")
key = args[args.index("--key") + 1]
shutil.copyfile(os.path.join(os.environ["FAKE_S3"], key), args[-1])
"""
_examples = {"deploy": 0, "rollback": 0}


def _options(argv: list[str]) -> dict[str, str]:
    """The script's `--flag value` pairs, read in order after the subcommand."""
    assert len(argv) % 2 == 1, argv
    return dict(zip(argv[1::2], argv[2::2], strict=True))


def _base_settings(workspace: Path):
    (workspace / "k8s" / "base").mkdir(parents=True, exist_ok=True)
    return parse_settings(
        {"aws-region": "eu-west-1", "image-tag": "v1"}, {"GITHUB_WORKSPACE": str(workspace)}
    )


def _sandbox(root: Path) -> dict[str, str]:
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "aws").write_text(FAKE_AWS)
    (bin_dir / "aws").chmod(0o755)
    (root / "tmp").mkdir(exist_ok=True)
    return {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "TMPDIR": str(root / "tmp"),
        "FAKE_S3": str(root / "s3"),
        "AWS_ARGV_FILE": str(root / "aws-argv"),
        "ARGV_FILE": str(root / "argv.json"),
        "K3S_DEPLOY_STATE_DIR": str(root / "state"),
        "HOME": str(root),
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    namespace=VALUES,
    kubectl=st.lists(VALUES, min_size=1, max_size=3),
    request_timeout=VALUES,
    commit=VALUES,
    run_url=VALUES,
    region=VALUES,
    bucket=VALUES,
    account=VALUES,
    deploy_id=VALUES,
)
def test_no_shell_injection_in_the_deploy_command_lines(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest, **values: object
) -> None:
    """Any value (the inputs' validation bypassed) reaches the script or the AWS CLI as exactly
    one argument and nothing runs that the lines did not intend. The options (namespace,
    kubectl, commit...) are not on the lines at all: they travel in the bundle."""
    _examples["deploy"] += 1
    figures.note(
        request.node,
        table="security",
        property="no shell injection in the deploy command lines",
        examples=_examples["deploy"],
    )
    root = tmp_path_factory.mktemp("inject")
    env = _sandbox(root)
    settings_ = dataclasses.replace(
        _base_settings(root / "ws"),
        namespace=values["namespace"],
        kubectl=tuple(values["kubectl"]),
        request_timeout=values["request_timeout"],
        commit=values["commit"],
        run_url=values["run_url"],
        aws_region=values["region"],
    )
    staging = Staging(str(values["bucket"]), "", str(values["account"]), True)
    script = RECORDER.encode()
    bundle = b"bundle"
    (root / "s3").mkdir()
    (root / "s3" / command.SCRIPT_NAME).write_bytes(script)
    (root / "s3" / command.BUNDLE_NAME).write_bytes(bundle)
    import hashlib

    lines = command.deploy_lines(
        settings_,
        staging,
        str(values["deploy_id"]),
        hashlib.sha256(script).hexdigest(),
        hashlib.sha256(bundle).hexdigest(),
    )
    proc = subprocess.run(
        ["sh", "-c", "\n".join(lines) + "\n"],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert not CANARY.exists(), "a value ran as a command"
    assert proc.returncode == 0, proc.stderr
    argv = json.loads((root / "argv.json").read_text())
    options = _options(argv)
    assert argv[0] == "deploy"
    assert options["--deploy-id"] == values["deploy_id"]
    assert set(options) == {"--bundle", "--deploy-id", "--state-dir"}
    aws_calls = (root / "aws-argv").read_text()
    for value in (values["bucket"], values["account"], values["region"]):
        assert repr(str(value)) in aws_calls
    assert list((root / "tmp").iterdir()) == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# The rollback command carries only the deploy id: the options are those the deploy kept.
@given(deploy_id=VALUES)
def test_no_shell_injection_in_the_rollback_command_lines(
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
    deploy_id: str,
) -> None:
    _examples["rollback"] += 1
    figures.note(
        request.node,
        table="security",
        property="no shell injection in the rollback command lines",
        examples=_examples["rollback"],
    )
    root = tmp_path_factory.mktemp("inject-rb")
    env = _sandbox(root)
    state = root / "state" / deploy_id if "/" not in deploy_id and deploy_id not in (".", "..") else None
    if state is not None:
        state.mkdir(parents=True)
        (state / "k3s-deploy.sh").write_text(RECORDER)
    lines = command.rollback_lines(deploy_id)
    proc = subprocess.run(
        ["sh", "-c", "\n".join(lines) + "\n"],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert not CANARY.exists(), "a value ran as a command"
    assert proc.returncode == 0, proc.stderr
    if state is not None:
        argv = json.loads((root / "argv.json").read_text())
        assert argv[0] == "rollback"
        options = _options(argv)
        assert options["--deploy-id"] == deploy_id
        assert set(options) == {"--deploy-id", "--state-dir"}


# -- end to end ---------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("swapped", [command.SCRIPT_NAME, command.BUNDLE_NAME])
def test_master_refuses_a_staged_file_swapped_after_upload(
    rig: Rig, swapped: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    canary = tmp_path / "CANARY"
    s3 = rig.sim.client("s3")

    def swap(_call: Call) -> None:
        bucket = rig.staged_buckets()[0]
        s3.put_object(Bucket=bucket, Key=swapped, Body=f"#!/bin/sh\ntouch {canary}\n".encode())

    rig.on("SendCommand", swap)
    run = rig.deploy()
    figures.note(
        request.node,
        table="security",
        property=f"the master verifies sha256 before running ({swapped} swapped: exit 91)",
    )
    assert run.outputs["status"] == "failed", run.log
    assert "sha256" in run.log
    assert rig.sim.commands_run[0]["exit_code"] == command.EXIT_CHECKSUM_MISMATCH
    assert not canary.exists()
    assert rig.assert_one_release(run) == "v1"
    rig.assert_nothing_left(run)


@pytest.mark.e2e
def test_expected_bucket_owner_on_every_s3_call(rig: Rig, request: pytest.FixtureRequest) -> None:
    run = rig.deploy()
    figures.note(
        request.node, table="security", property="ExpectedBucketOwner on every S3 call that takes it"
    )
    assert run.outputs["status"] == "success", run.log
    s3_calls = [c for c in rig.proxy.calls if c.service == "s3"]
    assert {c.operation for c in s3_calls} >= {"CreateBucket", "PutObject", "DeleteObjects", "DeleteBucket"}
    # CreateBucket and ListBuckets are the only S3 operations without the parameter.
    missing = [
        c.operation
        for c in s3_calls
        if c.operation not in ("CreateBucket", "ListBuckets")
        and c.headers.get("x-amz-expected-bucket-owner") != rig.sim.account_id
    ]
    assert missing == []
    script = str(rig.sim.commands_run[0]["script"])
    assert script.count("--expected-bucket-owner") == 1 and f"owner={rig.sim.account_id}" in script


@pytest.mark.e2e
@pytest.mark.parametrize(
    "where", ["CreateBucket says BucketAlreadyExists", "HeadBucket finds a foreign bucket"]
)
def test_someone_elses_bucket_is_never_used(rig: Rig, where: str, request: pytest.FixtureRequest) -> None:
    if where.startswith("CreateBucket"):
        rig.fault(
            "CreateBucket",
            "error",
            times=None,
            error=(409, "BucketAlreadyExists", "The requested bucket name is not available."),
        )
    else:
        rig.fault("HeadBucket", "access-denied", times=1)
    run = rig.deploy()
    figures.note(request.node, table="security", property=f"someone else's bucket is never used ({where})")
    assert run.outputs["status"] == "failed", run.log
    assert "refusing to use a bucket this deploy did not create" in run.log
    touched = [
        c.operation
        for c in rig.proxy.calls
        if c.service == "s3" and c.operation not in ("HeadBucket", "CreateBucket")
    ]
    assert touched == [], f"the action went on with the bucket: {touched}"
    assert rig.sim.sent_commands() == []
    # nor may the post step touch it: the saved name is taken back
    assert run.state.get("bucket") == "", run.state
    rig.assert_nothing_left(run)


@pytest.mark.e2e
def test_staging_bucket_is_locked_down(rig: Rig, request: pytest.FixtureRequest) -> None:
    s3 = rig.sim.client("s3")
    seen: dict[str, object] = {}

    def inspect(_call: Call) -> None:
        bucket = rig.staged_buckets()[0]
        seen["block"] = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
        rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
        seen["sse"] = rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"]
        seen["tags"] = {t["Key"] for t in s3.get_bucket_tagging(Bucket=bucket)["TagSet"]}
        seen["expiry"] = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"][0]["Expiration"][
            "Days"
        ]

    rig.on("SendCommand", inspect)
    run = rig.deploy()
    figures.note(
        request.node,
        table="security",
        property="the staging bucket blocks public access, is encrypted, tagged, expires objects",
    )
    assert run.outputs["status"] == "success", run.log
    assert seen["block"] == {
        "BlockPublicAcls": True,
        "IgnorePublicAcls": True,
        "BlockPublicPolicy": True,
        "RestrictPublicBuckets": True,
    }
    assert seen["sse"] == "AES256"
    assert "k3s-deploy-action" in seen["tags"]  # type: ignore[operator]
    assert seen["expiry"] == 1


SECRET_VALUE = "hunter2-do-not-print-0c1d"


@pytest.mark.e2e
def test_presigned_delivery_needs_no_credentials_on_the_master_and_masks_the_urls(
    rig: Rig, request: pytest.FixtureRequest
) -> None:
    figures.note(
        request.node,
        table="security",
        property="`delivery: presigned`: the master needs no S3 permission; URLs and secrets masked",
    )
    # The master has no credentials, no endpoint setting and no AWS CLI: only curl.
    for name in [k for k in rig.master.env if k.startswith("AWS_")]:
        del rig.master.env[name]
    rig.master.env["PATH"] = f"{rig.master.bin_dir}:/usr/local/bin:/usr/bin:/bin"
    rig.write_manifests(
        {
            "secret.yaml": (
                "apiVersion: v1\nkind: Secret\nmetadata:\n  name: app-secret\n"
                "  namespace: production-platform\n"
                f"stringData:\n  PASSWORD: {SECRET_VALUE}\n"
            )
        }
    )

    run = rig.deploy(delivery="presigned")

    assert run.outputs["status"] == "success", run.log
    assert rig.assert_one_release(run) == "v2"
    script = str(rig.sim.commands_run[0]["script"])
    assert "\ndelivery=presigned\n" in script  # the program fetches with curl, not the AWS CLI
    urls = re.findall(r"'(http://[^']+)'", script)
    assert len(urls) == 2
    # The master's downloads; the action's own reads of the live progress are signed requests.
    downloads = [c for c in rig.proxy.calls_to("GetObject") if "/progress/" not in c.path]
    assert len(downloads) == 2
    # The master's live progress goes up through its presigned PUT URL too (the last put at
    # least, as the script ends), with no credentials.
    puts = [c for c in rig.proxy.calls_to("PutObject") if "/progress/" in c.path]
    assert puts
    for call in puts:
        assert "authorization" not in call.headers
        assert call.query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    for call in downloads:
        assert "authorization" not in call.headers  # the signature is in the URL, nothing else
        assert call.query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
        assert int(call.query["X-Amz-Expires"][0]) <= 300
        assert call.headers.get("x-amz-expected-bucket-owner") == rig.sim.account_id
    for url in urls:
        signature = re.search(r"X-Amz-Signature=([0-9a-f]+)", url)[1]  # type: ignore[index]
        printed = [line for line in run.log.splitlines() if signature in line]
        assert printed and all(line.startswith("::add-mask::") for line in printed), printed
        assert signature not in run.summary and all(signature not in v for v in run.outputs.values())
    assert SECRET_VALUE not in run.log and SECRET_VALUE not in run.summary
    rig.assert_nothing_left(run)


@pytest.mark.e2e
def test_remote_output_cannot_issue_workflow_commands(rig: Rig, request: pytest.FixtureRequest) -> None:
    figures.note(request.node, table="security", property="remote output cannot issue workflow commands")
    evil = [
        "::add-mask::docker.io",
        "::set-output name=status::success",
        "::error title=Forged::forged error",
        "##[error]forged old-style error",
        "::stop-commands::forged",
        "::endgroup::",
        "  ::warning::indented",
    ]
    real = rig.master.bin_dir / "kubectl"
    body = "".join(f"printf '%s\\n' {json.dumps(line)}\n" for line in evil)
    rig.install_on_master(
        "kubectl-evil", f'#!/bin/sh\nif [ "$1" = apply ]; then\n{body}fi\nexec {real} "$@"\n'
    )

    run = rig.deploy(kubectl="kubectl-evil")

    assert run.outputs["status"] == "success", run.log
    lines = run.log.splitlines()
    for line in evil:
        if line != "::endgroup::":  # the action's own closing lines look the same
            assert line not in lines, f"remote text printed as a workflow command: {line!r}"
    groups = sum(line.startswith("::group::") for line in lines)
    assert sum(line == "::endgroup::" for line in lines) == groups, "a remote ::endgroup:: got through"
    assert any("forged error" in line for line in lines)  # shown, defused
    stops = [line for line in lines if line.startswith("::stop-commands::")]
    assert stops and all(len(line.split("::")[2]) >= 32 for line in stops)
    assert run.outputs["status"] == "success"
    rig.assert_nothing_left(run)
