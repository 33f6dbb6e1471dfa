"""The post-entrypoint backstop (deploykit/post.py), in-process against moto's server.

The container tests (tests/container/test_runner_contract.py) run it as the runner does; these
cover its rules one by one: only this action's bucket, only the caller's account, only the saved
prefix of the user's bucket, `cleanup: false` respected, never a failed job.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from deploykit import post, stage
from devkit.simulate.aws import SimulatedAWS

REGION = "eu-west-1"
OURS = "k3s-deploy-20250101-000000-deadbeef"
PREFIX = "k3s-deploy/20250101-000000-0123abcd/"


@pytest.fixture
def sim(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimulatedAWS]:
    with SimulatedAWS(REGION, root=tmp_path / "aws") as simulated:
        for key, value in simulated.env({}).items():
            monkeypatch.setenv(key, value)
        yield simulated


def run_post(**env: str) -> tuple[int, str]:
    out = io.StringIO()
    code = post.main({"INPUT_AWS-REGION": REGION, **env}, out)
    return code, out.getvalue()


def make_bucket(sim: SimulatedAWS, name: str, tags: dict[str, str] | None, keys: list[str]) -> Any:
    s3 = sim.client("s3")
    s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    if tags:
        s3.put_bucket_tagging(
            Bucket=name, Tagging={"TagSet": [{"Key": k, "Value": v} for k, v in tags.items()]}
        )
    for key in keys:
        s3.put_object(Bucket=name, Key=key, Body=b"x")
        s3.put_object(Bucket=name, Key=key, Body=b"y")  # two versions
    return s3


def buckets(sim: SimulatedAWS) -> list[str]:
    return [b["Name"] for b in sim.client("s3").list_buckets()["Buckets"]]


def test_deletes_our_tagged_bucket_with_every_version(sim: SimulatedAWS) -> None:
    make_bucket(sim, OURS, {stage.MANAGED_TAG: "staging"}, ["k3s-deploy.sh", "manifests.tar.gz"])

    code, log = run_post(STATE_bucket=OURS, STATE_prefix="")

    assert code == 0
    assert f"Deleted s3://{OURS}" in log
    assert buckets(sim) == []


def test_a_bucket_already_gone_is_clean(sim: SimulatedAWS) -> None:
    code, log = run_post(STATE_bucket=OURS)

    assert code == 0
    assert "already gone" in log and "::warning" not in log


@pytest.mark.parametrize(
    ("name", "tags"),
    [(OURS, None), (OURS, {"owner": "data-team"}), ("acme-data", {stage.MANAGED_TAG: "staging"})],
)
def test_leaves_a_bucket_without_our_tag_or_name_alone(
    sim: SimulatedAWS, name: str, tags: dict[str, str] | None
) -> None:
    s3 = make_bucket(sim, name, tags, ["precious"])

    code, log = run_post(STATE_bucket=name)

    assert code == 0
    assert "::warning" in log and "Left alone" in log
    assert buckets(sim) == [name]
    assert s3.get_object(Bucket=name, Key="precious")["Body"].read() == b"y"


def test_deletes_the_empty_untagged_bucket_a_kill_before_tagging_leaves(sim: SimulatedAWS) -> None:
    """Killed between CreateBucket and PutBucketTagging: the bucket has the generated name the
    state saved, no tags and nothing in it."""
    make_bucket(sim, OURS, None, [])

    code, log = run_post(STATE_bucket=OURS)

    assert code == 0
    assert f"Deleted s3://{OURS}" in log and "::warning" not in log
    assert buckets(sim) == []


@pytest.mark.parametrize("name", ["k3s-deploy-20250101-000000-deadbeef0", "k3s-deploy-team-artifacts"])
def test_an_empty_untagged_bucket_whose_name_was_not_generated_is_left_alone(
    sim: SimulatedAWS, name: str
) -> None:
    make_bucket(sim, name, None, [])

    code, log = run_post(STATE_bucket=name)

    assert code == 0
    assert "::warning" in log and "Left alone" in log
    assert buckets(sim) == [name]


def test_deletes_only_the_saved_prefix_in_the_users_bucket(sim: SimulatedAWS) -> None:
    s3 = make_bucket(
        sim, "acme-deploys", None, [f"{PREFIX}k3s-deploy.sh", f"{PREFIX}manifests.tar.gz", "other/file"]
    )

    code, log = run_post(INPUT_BUCKET="acme-deploys", STATE_prefix=PREFIX, STATE_bucket="")

    assert code == 0, log
    assert f"Deleted s3://acme-deploys/{PREFIX}" in log
    left = s3.list_object_versions(Bucket="acme-deploys")
    assert {v["Key"] for v in left.get("Versions", [])} == {"other/file"}
    assert not left.get("DeleteMarkers")


@pytest.mark.parametrize(
    "prefix", ["", "k3s-deploy/", "other/", "k3s-deploy/../x/", "k3s-deploy/20250101-000000-0123abcd"]
)
def test_refuses_a_prefix_this_action_never_stages_under(sim: SimulatedAWS, prefix: str) -> None:
    s3 = make_bucket(sim, "acme-deploys", None, [f"{PREFIX}k3s-deploy.sh", "other/file"])

    code, log = run_post(INPUT_BUCKET="acme-deploys", STATE_prefix=prefix or " ", STATE_bucket="")

    assert code == 0
    assert len(s3.list_object_versions(Bucket="acme-deploys")["Versions"]) == 4
    if prefix:
        assert "Left alone" in log


def test_cleanup_false_keeps_everything(sim: SimulatedAWS) -> None:
    make_bucket(sim, OURS, {stage.MANAGED_TAG: "staging"}, ["manifests.tar.gz"])

    code, log = run_post(STATE_bucket=OURS, INPUT_CLEANUP="false")

    assert code == 0 and "cleanup' is false" in log
    assert buckets(sim) == [OURS]


def test_nothing_saved_means_nothing_to_do_and_no_aws_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # would fail if called
    code, log = run_post(STATE_bucket="", STATE_prefix="")

    assert code == 0 and "Nothing staged" in log


def test_unreachable_aws_is_a_warning_not_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")

    code, log = run_post(STATE_bucket=OURS)

    assert code == 0
    assert "::warning" in log


class StubbedClients:
    """AwsClients whose S3 and STS answers are scripted (botocore Stubber)."""

    def __init__(self, region: str) -> None:
        kwargs = {"region_name": region, "aws_access_key_id": "x", "aws_secret_access_key": "x"}
        self.s3 = boto3.client("s3", **kwargs)
        self.sts = boto3.client("sts", **kwargs)
        self.s3_stub, self.sts_stub = Stubber(self.s3), Stubber(self.sts)
        self.sts_stub.add_response(
            "get_caller_identity",
            {"Account": "111122223333", "Arn": "arn:aws:iam::111122223333:root", "UserId": "x"},
        )
        StubbedClients.last = self

    def hurry(self) -> None:
        pass

    last: StubbedClients


def test_every_s3_call_names_the_callers_account_as_expected_owner(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("deploykit.awsapi.AwsClients", StubbedClients)
    original = StubbedClients.__init__

    def scripted(self: StubbedClients, region: str) -> None:
        original(self, region)
        owner = {"ExpectedBucketOwner": "111122223333"}
        self.s3_stub.add_response(
            "get_bucket_tagging",
            {"TagSet": [{"Key": stage.MANAGED_TAG, "Value": "staging"}]},
            {"Bucket": OURS, **owner},
        )
        self.s3_stub.add_response(
            "list_object_versions",
            {"Versions": [{"Key": "manifests.tar.gz", "VersionId": "v1"}]},
            {"Bucket": OURS, "Prefix": "", **owner},
        )
        self.s3_stub.add_response(
            "delete_objects",
            {"Deleted": [{"Key": "manifests.tar.gz"}]},
            {
                "Bucket": OURS,
                "Delete": {"Objects": [{"Key": "manifests.tar.gz", "VersionId": "v1"}], "Quiet": True},
                **owner,
            },
        )
        self.s3_stub.add_response("delete_bucket", {}, {"Bucket": OURS, **owner})
        self.s3_stub.activate()
        self.sts_stub.activate()

    monkeypatch.setattr(StubbedClients, "__init__", scripted)

    code, log = run_post(STATE_bucket=OURS)

    assert code == 0 and "::warning" not in log, log
    StubbedClients.last.s3_stub.assert_no_pending_responses()


def test_a_bucket_of_another_account_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("deploykit.awsapi.AwsClients", StubbedClients)
    original = StubbedClients.__init__

    def scripted(self: StubbedClients, region: str) -> None:
        original(self, region)
        # S3 answers 403 when ExpectedBucketOwner is not the bucket's owner; nothing else is
        # scripted, so a delete call would fail the Stubber.
        self.s3_stub.add_client_error(
            "get_bucket_tagging",
            "AccessDenied",
            http_status_code=403,
            expected_params={"Bucket": OURS, "ExpectedBucketOwner": "111122223333"},
        )
        self.s3_stub.activate()
        self.sts_stub.activate()

    monkeypatch.setattr(StubbedClients, "__init__", scripted)

    code, log = run_post(STATE_bucket=OURS)

    assert code == 0
    assert "Left alone" in log and "another account" in log
    StubbedClients.last.s3_stub.assert_no_pending_responses()
