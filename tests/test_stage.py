"""Staging in S3: bucket names, a locked-down bucket of our own, prefix mode, and cleanup.

moto is laxer than S3 about names, so `bucket_name_problem` is tested on its own; the bucket
calls run against moto's in-process mock (`mock_aws`).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from deploykit import stage
from deploykit.errors import StagingError

NOW = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)


# names


@pytest.mark.parametrize(
    "name",
    ["abc", "a" * 63, "my-bucket", "my.bucket.2", "k3s-deploy-20250304-050607-0a1b2c3d", "1bucket", "xn-abc"],
)
def test_valid_bucket_names_have_no_problem(name):
    assert stage.bucket_name_problem(name) is None


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("ab", "3 to 63 characters"),
        ("a" * 64, "3 to 63 characters"),
        ("", "3 to 63 characters"),
        ("My-Bucket", "lowercase letters"),
        ("my_bucket", "lowercase letters"),
        ("-bucket", "starting and ending"),
        ("bucket-", "starting and ending"),
        (".bucket", "starting and ending"),
        ("bucket.", "starting and ending"),
        ("my bucket", "lowercase letters"),
        ("bucket\n", "lowercase letters"),
        ("bücket", "lowercase letters"),
        ("my..bucket", "no '..'"),
        ("192.168.1.10", "not an IP address"),
        ("10.0.0.1", "not an IP address"),
        ("xn--bucket", "reserved prefix or suffix"),
        ("sthree-bucket", "reserved prefix or suffix"),
        ("amzn-s3-demo-bucket", "reserved prefix or suffix"),
        ("bucket-s3alias", "reserved prefix or suffix"),
        ("bucket--ol-s3", "reserved prefix or suffix"),
        ("bucket--x-s3", "reserved prefix or suffix"),
        ("bucket--table-s3", "reserved prefix or suffix"),
    ],
)
def test_invalid_bucket_names_say_which_rule_they_break(name, problem):
    assert problem in (stage.bucket_name_problem(name) or "")


def test_new_bucket_name_is_prefix_utc_time_and_suffix():
    assert stage.new_bucket_name(NOW, "0a1b2c3d") == "k3s-deploy-20250304-050607-0a1b2c3d"


def test_new_bucket_names_get_a_fresh_random_suffix_and_are_valid():
    names = {stage.new_bucket_name(NOW) for _ in range(20)}
    assert len(names) == 20
    for name in names:
        assert re.fullmatch(r"k3s-deploy-20250304-050607-[0-9a-f]{8}", name)
        assert stage.bucket_name_problem(name) is None


# against moto


@pytest.fixture(autouse=True)
def aws_env(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


@pytest.fixture
def aws():
    with mock_aws():
        yield


def s3_client(region: str):
    return boto3.client("s3", region_name=region)


def account() -> str:
    return stage.caller_account(boto3.client("sts", region_name="us-east-1"))


def created(region: str, name: str = "k3s-deploy-20250304-050607-0a1b2c3d"):
    s3 = s3_client(region)
    owner = account()
    stage.create_bucket(s3, region, owner, name, "20250304-050607-0a1b2c3d", NOW)
    return s3, stage.Staging(name, "", owner, created_bucket=True)


def bucket_exists(s3, name: str) -> bool:
    try:
        s3.head_bucket(Bucket=name)
    except ClientError as exc:
        assert exc.response["Error"]["Code"] in ("404", "NoSuchBucket")
        return False
    return True


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1"])
def test_create_bucket_in_the_region_with_the_location_constraint_rule(aws, region):
    s3, staging = created(region)
    location = s3.get_bucket_location(Bucket=staging.bucket)["LocationConstraint"]
    assert location == (None if region == "us-east-1" else region)


def test_created_bucket_blocks_public_access(aws):
    s3, staging = created("eu-west-1")
    config = s3.get_public_access_block(Bucket=staging.bucket)["PublicAccessBlockConfiguration"]
    assert config == {
        "BlockPublicAcls": True,
        "IgnorePublicAcls": True,
        "BlockPublicPolicy": True,
        "RestrictPublicBuckets": True,
    }


def test_created_bucket_has_default_encryption(aws):
    s3, staging = created("eu-west-1")
    rules = s3.get_bucket_encryption(Bucket=staging.bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"


def test_created_bucket_is_tagged_as_made_by_the_action(aws):
    s3, staging = created("eu-west-1")
    tags = {t["Key"]: t["Value"] for t in s3.get_bucket_tagging(Bucket=staging.bucket)["TagSet"]}
    assert tags == {
        stage.MANAGED_TAG: "staging",
        "k3s-deploy-id": "20250304-050607-0a1b2c3d",
        "k3s-deploy-created": "2025-03-04T05:06:07Z",
    }


def test_created_bucket_expires_objects_after_a_day(aws):
    s3, staging = created("eu-west-1")
    rules = s3.get_bucket_lifecycle_configuration(Bucket=staging.bucket)["Rules"]
    assert len(rules) == 1
    assert rules[0]["Status"] == "Enabled"
    assert rules[0]["Expiration"] == {"Days": 1}
    assert rules[0]["NoncurrentVersionExpiration"]["NoncurrentDays"] == 1


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1"])
def test_upload_then_delete_staged_removes_every_version_and_the_bucket(aws, region):
    s3, staging = created(region)
    # Versioning is not turned on by the action; turn it on to prove old versions go too.
    s3.put_bucket_versioning(Bucket=staging.bucket, VersioningConfiguration={"Status": "Enabled"})
    key = stage.upload(s3, staging, "manifests.tar.gz", b"first")
    stage.upload(s3, staging, "manifests.tar.gz", b"second")
    stage.upload(s3, staging, "k3s-deploy.sh", b"#!/bin/bash\n")
    s3.delete_object(Bucket=staging.bucket, Key="k3s-deploy.sh")  # leaves a delete marker
    assert s3.get_object(Bucket=staging.bucket, Key=key)["Body"].read() == b"second"
    versions = s3.list_object_versions(Bucket=staging.bucket)
    assert len(versions["Versions"]) == 3 and len(versions["DeleteMarkers"]) == 1

    stage.delete_staged(s3, staging)
    assert not bucket_exists(s3, staging.bucket)


def test_delete_staged_on_a_bucket_already_gone_counts_as_clean(aws):
    s3, staging = created("eu-west-1")
    s3.delete_bucket(Bucket=staging.bucket)
    stage.delete_staged(s3, staging)  # no error
    stage.delete_staged(s3, stage.Staging("k3s-deploy-never-made", "", staging.account, True))


def test_prefix_mode_deletes_only_the_prefix_and_keeps_the_bucket_and_other_objects(aws):
    s3 = s3_client("eu-west-1")
    owner = account()
    s3.create_bucket(Bucket="team-artifacts", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    s3.put_object(Bucket="team-artifacts", Key="releases/app.zip", Body=b"keep me")
    s3.put_object(
        Bucket="team-artifacts", Key="k3s-deploy/older-deploy/manifests.tar.gz", Body=b"keep me too"
    )
    stage.check_given_bucket(s3, "team-artifacts", owner)
    staging = stage.Staging(
        "team-artifacts", "k3s-deploy/20250304-050607-0a1b2c3d/", owner, created_bucket=False
    )
    assert staging.where() == "s3://team-artifacts/k3s-deploy/20250304-050607-0a1b2c3d/"
    stage.upload(s3, staging, "manifests.tar.gz", b"bundle")
    stage.upload(s3, staging, "k3s-deploy.sh", b"script")

    stage.delete_staged(s3, staging)

    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="team-artifacts")["Contents"])
    assert keys == ["k3s-deploy/older-deploy/manifests.tar.gz", "releases/app.zip"]


def test_a_given_bucket_that_does_not_exist_is_an_error(aws):
    with pytest.raises(Exception, match="use bucket missing-bucket"):
        stage.check_given_bucket(s3_client("eu-west-1"), "missing-bucket", account())


@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1"])
def test_a_bucket_that_already_exists_is_refused_and_left_untouched(aws, region):
    # In us-east-1, S3 answers a second CreateBucket from the owner with 200 OK: the check must
    # not rely on BucketAlreadyOwnedByYou.
    name = "k3s-deploy-20250304-050607-0a1b2c3d"
    s3 = s3_client(region)
    if region == "us-east-1":
        s3.create_bucket(Bucket=name)
    else:
        s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": region})
    s3.put_object(Bucket=name, Key="precious.txt", Body=b"data")

    with pytest.raises(StagingError) as caught:
        stage.create_bucket(s3, region, account(), name, "deploy-id", NOW)

    assert name in caught.value.message and "already exists" in caught.value.message
    assert s3.get_object(Bucket=name, Key="precious.txt")["Body"].read() == b"data"
    with pytest.raises(ClientError, match="NoSuchTagSet"):
        s3.get_bucket_tagging(Bucket=name)
    with pytest.raises(ClientError, match="NoSuchLifecycleConfiguration"):
        s3.get_bucket_lifecycle_configuration(Bucket=name)
