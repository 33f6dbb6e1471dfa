"""Live progress: the master's step lines in the job log while the deploy runs (input `progress`).

SSM returns a command's output only when it ends. So the deploy script (55-progress.sh) writes
its step lines to a small file and puts it, when it changed and at most every few seconds, as
one object per instance under the staging area: `PREFIX/progress/INSTANCE.log`. The action,
while it polls the command, lists that folder (one ListObjectsV2 call at most every
READ_EVERY seconds, whatever the fleet's size), reads the objects whose ETag changed and prints
their new lines, fenced like every other remote text (`Workflow.echo_untrusted`). The folder is
inside the staging area, which the cleanup deletes.

Where the script puts it comes with the verified bundle's options (`script_options`): with
`delivery: s3`, the folder, region and expected owner (the master's instance role needs
s3:PutObject there); with `delivery: presigned`, one presigned PUT URL per instance that may run
the command (signed with the expected owner, which curl sends as a header). Nothing here may
fail a deploy: a read that is refused turns the reading off with one log line, and the deploy
goes on as before (the "Waiting for command ..." lines).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from deploykit.awsapi import error_code
from deploykit.github import Workflow
from deploykit.stage import Staging

FOLDER = "progress/"
READ_EVERY = 5.0  # seconds between two looks at the folder
# The script keeps at most 400 lines of 300 characters with a time stamp (PROGRESS_MAX_LINES,
# PROGRESS_LINE_MAX), about 124 KB in single-byte text: a larger object is read only this far.
MAX_OBJECT_BYTES = 256 * 1024
MAX_READ_ERRORS = 3  # errors in a row (other than a refusal) before the reading stops
INSTANCE_ID = re.compile(r"^m?i-[0-9a-f]{8,17}$")
# A presigned PUT URL as the script accepts it (PROGRESS_URL_PATTERN in 55-progress.sh):
# https, or plain http to the loopback address only (the development rig's S3).
URL_PATTERN = re.compile(r"^(https://|http://127\.0\.0\.1[:/])[A-Za-z0-9._~:/?#@!&()*+,;=%-]+$")
# What the script accepts for its other options (PROGRESS_TO_PATTERN and check_progress_options):
# a value it would refuse is a usage error (exit 2), so such options are never sent.
TO_PATTERN = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/([A-Za-z0-9._/-]*/)?$")
REGION_PATTERN = re.compile(r"^[a-z0-9-]{1,30}$")
OWNER_PATTERN = re.compile(r"^[0-9]{12}$")
# The script's line when it turned live progress off (progress_off), at a line's start.
_MASTER_OFF = re.compile(r"^live progress is off: ", re.M)
_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId"}


def folder(staging: Staging) -> str:
    return staging.key(FOLDER)


def object_key(staging: Staging, instance_id: str) -> str:
    return staging.key(f"{FOLDER}{instance_id}.log")


def script_options(
    *,
    delivery: str,
    region: str,
    staging: Staging,
    s3_presign: Any = None,
    instance_ids: Iterable[str] = (),
    lifetime: int = 0,
) -> dict[str, str]:
    """The script's options for live progress (added to the bundle's `options` file); {} when
    the script would not accept them (then live progress stays off and the deploy is as before)."""
    if not OWNER_PATTERN.fullmatch(staging.account):
        return {}
    if delivery != "presigned":
        target = f"s3://{staging.bucket}/{folder(staging)}"
        if not (TO_PATTERN.fullmatch(target) and REGION_PATTERN.fullmatch(region)):
            return {}
        return {"progress-to": target, "progress-region": region, "progress-owner": staging.account}
    options = {"progress-owner": staging.account}
    for instance_id in dict.fromkeys(instance_ids):
        if not INSTANCE_ID.fullmatch(instance_id):
            continue
        url = s3_presign.generate_presigned_url(
            "put_object",
            Params={
                "Bucket": staging.bucket,
                "Key": object_key(staging, instance_id),
                "ExpectedBucketOwner": staging.account,
            },
            ExpiresIn=lifetime,
        )
        if URL_PATTERN.fullmatch(url):  # else that instance's progress is off (the script says so)
            options[f"progress-url-{instance_id}"] = url
    return options if len(options) > 1 else {}


class Reader:
    """Reads the progress objects while the deploy runs and prints their new lines.

    `poll()` is called on every turn of the wait loop; it does something at most every
    READ_EVERY seconds. `finish()` reads once more after the command ended (the script puts its
    file a last time before it exits). With `many` (fleet mode) each line names its instance.
    """

    def __init__(
        self,
        s3: Any,
        staging: Staging,
        gh: Workflow,
        *,
        many: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.s3, self.staging, self.gh, self.many, self.clock = s3, staging, gh, many, clock
        self.etags: dict[str, str] = {}  # key -> ETag last read
        self.shown: dict[str, int] = {}  # key -> lines printed
        self.next_read = clock() + READ_EVERY
        self.errors = 0
        self.off = False
        self.lines_shown = 0
        self.master_off_warned = False

    def poll(self) -> None:
        if self.off or self.clock() < self.next_read:
            return
        self.read()

    def finish(self) -> None:
        if not self.off:
            self.read()

    def check_output(self, stdout: str) -> None:
        """After the command: if the master's output says that it turned live progress off
        (55-progress.sh progress_off), one warning with the fix, in the action's own words
        (the output itself is remote text and stays fenced)."""
        if self.master_off_warned or not _MASTER_OFF.search(stdout or ""):
            return
        self.master_off_warned = True
        self.gh.warning(
            "The master could not put its live progress (its output says why, on the line "
            "starting 'live progress is off:'); the deploy went on. With delivery s3 its "
            "instance role needs s3:PutObject on the staging area's progress/ folder "
            "(examples/iam, statement UploadLiveProgress), or set input 'progress' to false.",
            title="Live progress off",
        )

    def warn_silent(self, instance_ids: Iterable[str]) -> None:
        """Fleet mode, after the command: the instances that ran the deploy to the end but
        never put a progress object (the action reads the whole output of failed instances
        only, so their own 'live progress is off' line goes unseen). One warning with the fix."""
        if self.off:
            return
        heard = {self._instance(key) for key in self.etags}
        silent = [instance_id for instance_id in instance_ids if instance_id not in heard]
        if not silent:
            return
        shown = ", ".join(silent[:5]) + (f" and {len(silent) - 5} more" if len(silent) > 5 else "")
        self.gh.warning(
            f"No live progress came from {len(silent)} instance(s) that deployed: {shown}. Their "
            "instance role needs s3:PutObject on the staging area's progress/ folder with delivery "
            "s3 (examples/iam, statement UploadLiveProgress), and the AWS CLI (or curl with "
            "delivery presigned); or set input 'progress' to false.",
            title="Live progress off",
        )

    def read(self) -> None:
        self.next_read = self.clock() + READ_EVERY
        try:
            self._read()
            self.errors = 0
        except Exception as exc:  # never a reason to fail a deploy
            code = error_code(exc)
            self.errors += 1
            if code in _DENIED or self.errors >= MAX_READ_ERRORS:
                self.off = True
                why = code or type(exc).__name__
                hint = (
                    " The deploy role needs s3:ListBucket and s3:GetObject on that folder "
                    "(examples/iam, statement ReadLiveProgress), or set input 'progress' to false."
                    if code in _DENIED
                    else ""
                )
                self.gh.warning(
                    f"Live progress not shown: could not read s3://{self.staging.bucket}/"
                    f"{folder(self.staging)} ({why}); the master's output follows when it "
                    f"ends, and the deploy goes on.{hint}",
                    title="Live progress off",
                )

    def _read(self) -> None:
        listed = self.s3.list_objects_v2(
            Bucket=self.staging.bucket,
            Prefix=folder(self.staging),
            ExpectedBucketOwner=self.staging.account,
        )
        for item in sorted(listed.get("Contents", []), key=lambda i: i["Key"]):
            key, etag = item["Key"], item.get("ETag", "")
            if self.etags.get(key) == etag:
                continue
            try:
                body = self.s3.get_object(
                    Bucket=self.staging.bucket,
                    Key=key,
                    IfNoneMatch=self.etags.get(key, '"none"'),
                    ExpectedBucketOwner=self.staging.account,
                )
            except Exception as exc:
                if error_code(exc) in ("304", "NotModified", "NoSuchKey"):
                    continue
                raise
            self.etags[key] = body.get("ETag", etag)
            self._show(key, body["Body"].read(MAX_OBJECT_BYTES).decode("utf-8", "replace"))

    def _show(self, key: str, text: str) -> None:
        lines = text.splitlines()
        if not text.endswith("\n") and lines:
            lines.pop()  # a line still being written (a cut read): shown next time
        new = lines[self.shown.get(key, 0) :]
        if not new:
            return
        self.shown[key] = len(lines)
        self.lines_shown += len(new)
        if self.many:
            instance = self._instance(key)
            new = [f"{instance}: {line}" for line in new]
        # Remote text: fenced (stop-commands under a token) and neutralised, like the output.
        self.gh.echo_untrusted("\n".join(new))

    def _instance(self, key: str) -> str:
        """The instance id in a progress object's key (object_key's inverse)."""
        return key[len(folder(self.staging)) :].removesuffix(".log")
