"""`python -m deploykit sweep`: find the staging buckets this action left behind, and delete them.

Every bucket the action creates is named `k3s-deploy-...` and tagged `stage.MANAGED_TAG`. The
action deletes it when the deploy ends; its post step deletes it when the main step could not.
What can still be left: a job killed outright (SIGKILL, a lost runner), credentials that expired
mid-deploy, a role that may not delete. A lifecycle rule expires the objects after a day, but
never the bucket. This command lists those buckets with their age and, only with `--delete`,
deletes every version in them and then the bucket (stage.delete_staged).

It touches only buckets that the caller's account owns (ExpectedBucketOwner on every call) and
that carry the tag, or, untagged, are empty and have the exact name shape the action generates
(what a run killed between creating and tagging its bucket leaves). Any other `k3s-deploy-`
bucket is listed as not ours and left alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from deploykit import stage
from deploykit.awsapi import aws_call, error_code
from deploykit.errors import DeployError, InputError

_AGE = re.compile(r"^([0-9]{1,6})([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> int:
    """Seconds in '90s', '30m', '6h', '2d' ('0s' is valid: every bucket)."""
    match = _AGE.fullmatch(text.strip())
    if not match:
        raise InputError(
            f"--older-than must be a whole number followed by s, m, h or d (e.g. 6h), got {text!r}"
        )
    return int(match[1]) * _UNIT_SECONDS[match[2]]


def describe_age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60}m"
    if seconds >= 60:
        return f"{seconds // 60}m"
    return f"{seconds}s"


@dataclass
class Leftover:
    bucket: str
    created: datetime
    age_seconds: float
    deploy_id: str
    ours: bool  # carries the action's tag
    deleted: bool = False
    error: str = ""


def _tags(s3: Any, bucket: str, account: str) -> dict[str, str]:
    from botocore.exceptions import ClientError

    with aws_call(f"read the tags of bucket {bucket}", "s3:GetBucketTagging", f"arn:aws:s3:::{bucket}"):
        try:
            response = s3.get_bucket_tagging(Bucket=bucket, ExpectedBucketOwner=account)
        except ClientError as exc:
            if error_code(exc) in ("NoSuchTagSet", "NoSuchTagSetError"):
                return {}
            raise
    return {t["Key"]: t["Value"] for t in response.get("TagSet", [])}


def find_leftovers(
    s3: Any, account: str, *, older_than: float, now: datetime | None = None
) -> list[Leftover]:
    """The action's buckets in this account older than `older_than` seconds, oldest first."""
    now = now or datetime.now(UTC)
    with aws_call("list the buckets of the account", "s3:ListAllMyBuckets"):
        buckets = s3.list_buckets().get("Buckets", [])
    found: list[Leftover] = []
    for bucket in buckets:
        name = bucket["Name"]
        if not name.startswith(stage.BUCKET_PREFIX):
            continue
        created = bucket.get("CreationDate") or now
        if created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        age = (now - created).total_seconds()
        if age < older_than:
            continue
        try:
            tags = _tags(s3, name, account)
        except DeployError as exc:
            if "NoSuchBucket" in exc.message:
                continue  # deleted meanwhile
            found.append(Leftover(name, created, age, "", ours=False, error=exc.message))
            continue
        ours = stage.MANAGED_TAG in tags
        if not tags and stage.is_generated_name(name) and stage.is_empty_bucket(s3, name, account):
            # A run killed between creating and tagging it (the post step's rule too): the
            # generated name, empty, in this account.
            ours = True
        found.append(Leftover(name, created, age, tags.get("k3s-deploy-id", ""), ours=ours))
    return sorted(found, key=lambda leftover: leftover.created)


def sweep(
    s3: Any,
    sts: Any,
    *,
    older_than: float,
    delete: bool,
    log: Callable[[str], None] = print,
    now: datetime | None = None,
) -> list[Leftover]:
    """List (and with `delete`, delete) the leftovers; returns them."""
    account = stage.caller_account(sts)
    leftovers = find_leftovers(s3, account, older_than=older_than, now=now)
    if not leftovers:
        log(f"No bucket of this action older than {describe_age(older_than)} in account {account}.")
        return []
    for leftover in leftovers:
        what = f"{leftover.bucket}  age {describe_age(leftover.age_seconds)}"
        if leftover.deploy_id:
            what += f"  deploy {leftover.deploy_id}"
        if not leftover.ours:
            reason = leftover.error or f"no {stage.MANAGED_TAG} tag"
            log(f"{what}  not ours ({reason}): left alone")
            continue
        if not delete:
            log(f"{what}  would be deleted (run with --delete)")
            continue
        try:
            stage.delete_staged(s3, stage.Staging(leftover.bucket, "", account, True))
            leftover.deleted = True
            log(f"{what}  deleted")
        except DeployError as exc:
            leftover.error = exc.message
            log(f"{what}  NOT deleted: {exc.message}")
    return leftovers
