"""Stage the bundle and the deploy script in S3, and delete them again.

A new bucket per deploy by default (`k3s-deploy-<UTC time>-<random>`), locked down: public
access blocked, default encryption, tagged as ours (so `sweep` can find leftovers), and a
lifecycle rule that expires objects after a day in case every cleanup fails. With the `bucket`
input, the files go under a unique prefix of that existing bucket instead.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from deploykit.awsapi import aws_call, error_code
from deploykit.errors import StagingError

BUCKET_PREFIX = "k3s-deploy-"
MANAGED_TAG = "k3s-deploy-action"  # tag key on every bucket this action creates
PREFIX_ROOT = "k3s-deploy"  # key prefix inside a user's bucket

_BUCKET_CHARS = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def bucket_name_problem(name: str) -> str | None:
    """Why `name` is not a valid S3 bucket name, or None. moto is laxer than S3."""
    if not 3 <= len(name) <= 63:
        return "3 to 63 characters"
    if not _BUCKET_CHARS.fullmatch(name):  # not match(): `$` would let a trailing newline through
        return "lowercase letters, digits, '.' and '-', starting and ending with a letter or digit"
    if ".." in name:
        return "no '..'"
    try:
        ipaddress.IPv4Address(name)
        return "not an IP address"
    except ValueError:
        pass
    if name.startswith(("xn--", "sthree-", "amzn-s3-demo-")) or name.endswith(
        ("-s3alias", "--ol-s3", "--x-s3", "--table-s3")
    ):
        return "reserved prefix or suffix"
    return None


# The exact shape of new_bucket_name: UTC time, then 8 random hex digits.
_GENERATED_NAME = re.compile(rf"^{re.escape(BUCKET_PREFIX)}[0-9]{{8}}-[0-9]{{6}}-[0-9a-f]{{8}}$")


def is_generated_name(name: str) -> bool:
    return _GENERATED_NAME.fullmatch(name) is not None


def is_empty_bucket(s3: Any, bucket: str, account: str) -> bool:
    """No object version and no delete marker in the bucket (False when it cannot be listed)."""
    from botocore.exceptions import ClientError

    try:
        listing = s3.list_object_versions(Bucket=bucket, MaxKeys=1, ExpectedBucketOwner=account)
    except ClientError:
        return False
    return not listing.get("Versions") and not listing.get("DeleteMarkers")


def new_bucket_name(now: datetime, suffix: str | None = None) -> str:
    suffix = suffix or secrets.token_hex(4)
    name = f"{BUCKET_PREFIX}{now.strftime('%Y%m%d-%H%M%S')}-{suffix}"
    assert bucket_name_problem(name) is None, name
    return name


@dataclass
class Staging:
    bucket: str
    prefix: str  # "" in a bucket of our own
    account: str
    created_bucket: bool
    keys: list[str] = field(default_factory=list)

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def caller_account(sts: Any) -> str:
    with aws_call("read the caller's account (sts:GetCallerIdentity)", "sts:GetCallerIdentity"):
        return str(sts.get_caller_identity()["Account"])


def create_bucket(s3: Any, region: str, account: str, name: str, deploy_id: str, now: datetime) -> None:
    arn = f"arn:aws:s3:::{name}"
    # In us-east-1, CreateBucket on a bucket the caller already owns answers 200 OK instead of
    # BucketAlreadyOwnedByYou, so the error below cannot be relied on there: look first.
    _refuse_existing(s3, name, account)
    with aws_call(f"create bucket {name}", "s3:CreateBucket", "arn:aws:s3:::k3s-deploy-*"):
        try:
            if region == "us-east-1":  # us-east-1 rejects an explicit LocationConstraint
                s3.create_bucket(Bucket=name)
            else:
                s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": region})
        except Exception as exc:
            if error_code(exc) == "BucketAlreadyOwnedByYou":
                # Our own first try made it: botocore retried a CreateBucket whose answer was
                # lost, and _refuse_existing saw no such bucket a moment ago (the name is
                # random). HeadBucket with ExpectedBucketOwner below confirms the account.
                pass
            elif error_code(exc) == "BucketAlreadyExists":
                # Never stage in a bucket we did not just create: someone else may own it.
                raise StagingError(
                    f"bucket {name} already exists ({error_code(exc)}); refusing to use a bucket "
                    "this deploy did not create",
                    fix="Run the deploy again (a new name is drawn each time).",
                ) from None
            else:
                raise
    with aws_call(f"confirm ownership of bucket {name}", "s3:ListBucket", arn):
        s3.head_bucket(Bucket=name, ExpectedBucketOwner=account)
    with aws_call(f"tag bucket {name}", "s3:PutBucketTagging", arn):
        s3.put_bucket_tagging(
            Bucket=name,
            ExpectedBucketOwner=account,
            Tagging={
                "TagSet": [
                    {"Key": MANAGED_TAG, "Value": "staging"},
                    {"Key": "k3s-deploy-id", "Value": deploy_id},
                    {"Key": "k3s-deploy-created", "Value": now.strftime("%Y-%m-%dT%H:%M:%SZ")},
                ]
            },
        )
    with aws_call(f"block public access on bucket {name}", "s3:PutBucketPublicAccessBlock", arn):
        s3.put_public_access_block(
            Bucket=name,
            ExpectedBucketOwner=account,
            PublicAccessBlockConfiguration={
                "BlockPublicAcls": True,
                "IgnorePublicAcls": True,
                "BlockPublicPolicy": True,
                "RestrictPublicBuckets": True,
            },
        )
    with aws_call(f"turn on encryption for bucket {name}", "s3:PutEncryptionConfiguration", arn):
        s3.put_bucket_encryption(
            Bucket=name,
            ExpectedBucketOwner=account,
            ServerSideEncryptionConfiguration={
                "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
            },
        )
    with aws_call(f"set the expiry rule on bucket {name}", "s3:PutLifecycleConfiguration", arn):
        s3.put_bucket_lifecycle_configuration(
            Bucket=name,
            ExpectedBucketOwner=account,
            LifecycleConfiguration={
                "Rules": [
                    {
                        "ID": "k3s-deploy-expire",
                        "Status": "Enabled",
                        "Filter": {"Prefix": ""},
                        "Expiration": {"Days": 1},
                        "NoncurrentVersionExpiration": {"NoncurrentDays": 1},
                        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
                    }
                ]
            },
        )


def _refuse_existing(s3: Any, name: str, account: str) -> None:
    """StagingError when a bucket of that name exists already, whoever owns it."""
    from botocore.exceptions import ClientError

    with aws_call(f"check that bucket {name} does not exist yet", "s3:ListBucket", f"arn:aws:s3:::{name}"):
        try:
            # With ExpectedBucketOwner a bucket of another account answers 403, as it would
            # without: the answer is the same, and no S3 call goes out without the owner.
            s3.head_bucket(Bucket=name, ExpectedBucketOwner=account)
        except ClientError as exc:
            code = error_code(exc)
            if code in ("404", "NoSuchBucket", "NotFound"):
                return
            if code in ("403", "AccessDenied", "Forbidden"):
                raise StagingError(
                    f"bucket {name} exists in another account, or the deploy role may not "
                    "s3:ListBucket it; refusing to use a bucket this deploy did not create",
                    fix="The deploy role needs s3:ListBucket on arn:aws:s3:::k3s-deploy-*; then run "
                    "the deploy again (a new name is drawn each time).",
                ) from None
            raise
    raise StagingError(
        f"bucket {name} already exists; refusing to use a bucket this deploy did not create",
        fix="Run the deploy again (a new name is drawn each time).",
    )


def check_given_bucket(s3: Any, name: str, account: str) -> None:
    with aws_call(
        f"use bucket {name} (it must exist and belong to account {account})",
        "s3:ListBucket",
        f"arn:aws:s3:::{name}",
    ):
        s3.head_bucket(Bucket=name, ExpectedBucketOwner=account)


def upload(s3: Any, staging: Staging, name: str, body: bytes) -> str:
    key = staging.key(name)
    with aws_call(f"upload {name} to {staging.where()}", "s3:PutObject", f"arn:aws:s3:::{staging.bucket}/*"):
        s3.put_object(Bucket=staging.bucket, Key=key, Body=body, ExpectedBucketOwner=staging.account)
    staging.keys.append(key)
    return key


def delete_staged(s3: Any, staging: Staging) -> int:
    """Delete every object version under the staging place, then our bucket. Returns how many
    object versions (and delete markers) it deleted.

    Raises AwsCallFailed when something is left; NoSuchBucket counts as clean.
    """
    arn = f"arn:aws:s3:::{staging.bucket}"
    deleted = 0
    try:
        # Listing and deleting are separate permissions: each error names its own.
        with aws_call(f"list the staged files in {staging.where()}", "s3:ListBucketVersions", arn):
            paginator = s3.get_paginator("list_object_versions")
            pages = list(
                paginator.paginate(
                    Bucket=staging.bucket, Prefix=staging.prefix, ExpectedBucketOwner=staging.account
                )
            )
        for page in pages:
            doomed = [
                {"Key": item["Key"], "VersionId": item["VersionId"]}
                for item in page.get("Versions", []) + page.get("DeleteMarkers", [])
            ]
            if not doomed:
                continue
            with aws_call(
                f"delete the staged files in {staging.where()}",
                "s3:DeleteObject and s3:DeleteObjectVersion",
                f"{arn}/*",
            ):
                result = s3.delete_objects(
                    Bucket=staging.bucket,
                    Delete={"Objects": doomed, "Quiet": True},
                    ExpectedBucketOwner=staging.account,
                )
            if result.get("Errors"):
                first = result["Errors"][0]
                raise StagingError(
                    f"can't delete {first.get('Key')} in {staging.where()}: {first.get('Code')}"
                )
            deleted += len(doomed)
        if staging.created_bucket:
            with aws_call(f"delete bucket {staging.bucket}", "s3:DeleteBucket", arn):
                s3.delete_bucket(Bucket=staging.bucket, ExpectedBucketOwner=staging.account)
    except Exception as exc:
        if error_code(exc.__context__ or exc) == "NoSuchBucket" or "NoSuchBucket" in str(exc):
            return deleted
        raise
    return deleted
