"""The action's post-entrypoint: a backstop that deletes what the main step staged and left.

The main step deletes its bucket (or its prefix in the user's `bucket`) itself. It cannot when
it is killed (a cancel that outlasts the runner's grace period, a lost runner process) or when
its cleanup fails; the runner then still runs this post step, in a new container from the same
image, with the state the main step saved in GITHUB_STATE as `STATE_<name>` variables:

- `STATE_bucket`: the bucket the main step was creating (saved before CreateBucket, emptied
  once the main step deleted it);
- `STATE_prefix`: the key prefix it staged under in the user's bucket (empty for a bucket of
  its own; emptied once deleted).

It deletes only a bucket that this action made (tag `k3s-deploy-action`, a `k3s-deploy-` name)
and that the caller's account owns (ExpectedBucketOwner), or the saved prefix in the user's
`bucket`. One untagged bucket counts as the action's: an empty one whose name has the exact
shape the main step generates (UTC time and 8 random hex digits), which is what a kill between
creating and tagging the bucket leaves. A bucket already gone is clean. It never fails the job:
problems are warnings.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Mapping
from types import FrameType
from typing import Any, TextIO

from deploykit import stage
from deploykit.errors import DeployError, JobCancelled
from deploykit.github import Workflow
from deploykit.inputs import read_action_inputs

_PREFIX = re.compile(rf"^{re.escape(stage.PREFIX_ROOT)}/[0-9]{{8}}-[0-9]{{6}}-[0-9a-f]{{8}}/$")
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-[0-9]{1,2}$")


class NotOurs(Exception):
    """The state names something this backstop must leave alone."""


def planned_staging(env: Mapping[str, str]) -> tuple[str, str, bool] | None:
    """(bucket, prefix, bucket-is-ours) to delete, from the saved state and the inputs; None
    when nothing was left. Raises NotOurs for a state that does not look like this action's."""
    inputs = read_action_inputs(env)
    saved_bucket = env.get("STATE_bucket", "").strip()
    saved_prefix = env.get("STATE_prefix", "").strip()
    if saved_prefix:
        # Staged under a prefix of the user's bucket: the `bucket` input names it.
        user_bucket = inputs.get("bucket", "").strip()
        if not user_bucket:
            raise NotOurs(f"the saved prefix {saved_prefix!r} has no 'bucket' input to go with it")
        if stage.bucket_name_problem(user_bucket) or not _PREFIX.match(saved_prefix):
            raise NotOurs(f"s3://{user_bucket}/{saved_prefix} is not a prefix this action stages under")
        return user_bucket, saved_prefix, False
    if saved_bucket:
        if stage.bucket_name_problem(saved_bucket) or not saved_bucket.startswith(stage.BUCKET_PREFIX):
            raise NotOurs(f"{saved_bucket!r} is not a name this action gives its buckets")
        return saved_bucket, "", True
    return None


def _region(env: Mapping[str, str]) -> str:
    region = (
        read_action_inputs(env).get("aws-region", "").strip()
        or env.get("AWS_REGION", "").strip()
        or env.get("AWS_DEFAULT_REGION", "").strip()
    )
    if not _REGION.fullmatch(region):
        raise NotOurs(f"no valid AWS region (input 'aws-region', AWS_REGION): got {region!r}")
    return region


def _check_tagged_as_ours(s3: Any, bucket: str, account: str) -> bool:
    """True when the bucket carries MANAGED_TAG; False when it is gone. NotOurs otherwise."""
    from botocore.exceptions import ClientError

    from deploykit.awsapi import error_code

    try:
        tags = s3.get_bucket_tagging(Bucket=bucket, ExpectedBucketOwner=account)
    except ClientError as exc:
        code = error_code(exc)
        if code in ("NoSuchBucket", "404", "NotFound"):
            return False
        if code == "NoSuchTagSet":
            if stage.is_generated_name(bucket) and stage.is_empty_bucket(s3, bucket, account):
                # The main step was killed between CreateBucket and PutBucketTagging. The name
                # is the one it generated (random) and saved just before creating the bucket,
                # the caller's account owns it, and nothing was uploaded yet: it is that run's.
                return True
            raise NotOurs(f"bucket {bucket} has no tags; this action tags every bucket it makes") from None
        if code in ("AccessDenied", "403", "Forbidden"):
            raise NotOurs(
                f"bucket {bucket} belongs to another account, or the role may not read its tags "
                "(s3:GetBucketTagging)"
            ) from None
        raise
    keys = {tag.get("Key") for tag in tags.get("TagSet", [])}
    if stage.MANAGED_TAG not in keys:
        raise NotOurs(f"bucket {bucket} does not carry the tag {stage.MANAGED_TAG}")
    return True


def backstop(env: Mapping[str, str], gh: Workflow) -> None:
    inputs = read_action_inputs(env)
    if inputs.get("cleanup", "").strip().lower() == "false":
        gh.log("Input 'cleanup' is false: leaving what the deploy staged in place")
        return
    plan = planned_staging(env)
    if plan is None:
        gh.log("Nothing staged was left behind by the deploy step")
        return
    bucket, prefix, ours = plan
    from deploykit.awsapi import AwsClients

    aws = AwsClients(_region(env))
    aws.hurry()  # short timeouts: a post step must not hang the job
    account = stage.caller_account(aws.sts)
    staging = stage.Staging(bucket, prefix, account, ours)
    if ours and not _check_tagged_as_ours(aws.s3, bucket, account):
        gh.log(f"Bucket {bucket} is already gone")
        return
    deleted = stage.delete_staged(aws.s3, staging)
    if deleted or ours:
        files = "1 file" if deleted == 1 else f"{deleted} files"
        gh.log(f"Deleted {staging.where()}, which the deploy step had left behind ({files})")
    else:
        gh.log(f"Nothing was left in {staging.where()}")


def _cancelled(signum: int, frame: FrameType | None) -> None:
    raise JobCancelled(signal.Signals(signum).name)


def main(env: Mapping[str, str] | None = None, out: TextIO | None = None) -> int:
    """Run the backstop; always 0 (a backstop never fails the job)."""
    env = os.environ if env is None else env
    if env is os.environ:  # PID 1 in the container: without handlers, signals are ignored
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _cancelled)
    gh = Workflow(env, out)
    try:
        backstop(env, gh)
    except NotOurs as exc:
        gh.warning(f"Left alone: {exc}.", title="Post step: nothing deleted")
    except DeployError as exc:
        gh.warning(
            f"{exc.message}. Delete it by hand if it is still there.", title="Post step: cleanup incomplete"
        )
    except JobCancelled:
        gh.warning("The post step was cancelled before it finished.", title="Post step: cancelled")
    except Exception as exc:  # a bug must not fail the job either
        gh.warning(f"Unexpected error: {type(exc).__name__}: {exc}", title="Post step: cleanup incomplete")
    return 0
