"""Live progress on the action's side (deploykit/progress.py): the options the script gets, and
the reader that prints the master's step lines while the command runs, against a fake S3 client
(the end-to-end tests in tests/e2e/test_progress.py run it against the simulated account)."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from deploykit import progress
from deploykit.github import Workflow
from deploykit.stage import Staging

ACCOUNT = "123456789012"
OWN = Staging("k3s-deploy-20260101-000000-0123abcd", "", ACCOUNT, True)
GIVEN = Staging("team-artifacts", "k3s-deploy/20260101-000000-0123abcd/", ACCOUNT, False)
ONE = "i-0123456789abcdef0"
TWO = "i-0fedcba9876543210"


def client_error(code: str, status: int = 400) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


class FakeS3:
    """ListObjectsV2 and GetObject as S3 answers them: ETags, IfNoneMatch (304), the expected
    owner checked; `fail` makes the next calls raise."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail: list[Exception] = []

    def put(self, staging: Staging, instance_id: str, text: str) -> None:
        self.objects[(staging.bucket, progress.object_key(staging, instance_id))] = text.encode()

    @staticmethod
    def etag(body: bytes) -> str:
        return f'"{hashlib.md5(body).hexdigest()}"'  # noqa: S324 - S3's ETag, not security

    def _call(self, name: str, kwargs: dict[str, Any]) -> None:
        self.calls.append((name, kwargs))
        assert kwargs["ExpectedBucketOwner"] == ACCOUNT
        if self.fail:
            raise self.fail.pop(0)

    def list_objects_v2(self, **kwargs: Any) -> dict[str, Any]:
        self._call("list", kwargs)
        contents = [{"Key": key, "ETag": self.etag(body)} for (bucket, key), body in self.objects.items()
                    if bucket == kwargs["Bucket"] and key.startswith(kwargs["Prefix"])]
        return {"Contents": contents} if contents else {}

    def get_object(self, **kwargs: Any) -> dict[str, Any]:
        self._call("get", kwargs)
        body = self.objects.get((kwargs["Bucket"], kwargs["Key"]))
        if body is None:
            raise client_error("NoSuchKey", 404)
        if kwargs.get("IfNoneMatch") == self.etag(body):
            raise client_error("304", 304)
        return {"Body": io.BytesIO(body), "ETag": self.etag(body)}

    def gets(self) -> list[dict[str, Any]]:
        return [kwargs for name, kwargs in self.calls if name == "get"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reader(
    s3: FakeS3, staging: Staging = OWN, many: bool = False
) -> tuple[progress.Reader, io.StringIO, Clock]:
    out, clock = io.StringIO(), Clock()
    return progress.Reader(s3, staging, Workflow({}, out), many=many, clock=clock), out, clock


def shown(out: io.StringIO) -> list[str]:
    """The lines printed inside the stop-commands fences, fences left out."""
    lines, token = [], None
    for line in out.getvalue().splitlines():
        if token is None:
            match = re.fullmatch(r"::stop-commands::([0-9a-f]{32})", line)
            if match:
                token = match.group(1)
        elif line == f"::{token}::":
            token = None
        else:
            lines.append(line)
    return lines


# -- the script's options -------------------------------------------------------------------------


def test_delivery_s3_names_the_staging_area_s_progress_folder() -> None:
    assert progress.script_options(delivery="s3", region="eu-west-1", staging=OWN) == {
        "progress-to": f"s3://{OWN.bucket}/progress/",
        "progress-region": "eu-west-1",
        "progress-owner": ACCOUNT,
    }
    # A given bucket: under the deploy's own prefix, as the IAM examples grant it.
    assert progress.script_options(delivery="s3", region="eu-west-1", staging=GIVEN)["progress-to"] == (
        "s3://team-artifacts/k3s-deploy/20260101-000000-0123abcd/progress/"
    )
    assert progress.object_key(GIVEN, ONE) == f"k3s-deploy/20260101-000000-0123abcd/progress/{ONE}.log"


@pytest.mark.parametrize("staging,region", [
    (Staging("Team_Bucket", "", ACCOUNT, False), "eu-west-1"),  # the script would refuse the bucket
    (Staging("team-artifacts", "k3s deploy/x/", ACCOUNT, False), "eu-west-1"),
    (OWN, "eu-west-1\nprogress-to=s3://elsewhere/"),
    (Staging(OWN.bucket, "", "12345", True), "eu-west-1"),
])
def test_options_the_script_would_refuse_are_not_sent(staging: Staging, region: str) -> None:
    """A value the script refuses is a usage error (exit 2): live progress stays off instead."""
    assert progress.script_options(delivery="s3", region=region, staging=staging) == {}


class FakePresigner:
    def __init__(self, url: str = "https://{bucket}.s3.amazonaws.com/{key}?X-Amz-Signature=ab") -> None:
        self.url = url
        self.signed: list[dict[str, Any]] = []

    def generate_presigned_url(self, method: str, Params: dict[str, Any], ExpiresIn: int) -> str:
        assert method == "put_object" and ExpiresIn == 900
        self.signed.append(Params)
        return self.url.format(bucket=Params["Bucket"], key=Params["Key"])


def test_presigned_delivery_signs_one_put_per_instance_with_the_expected_owner() -> None:
    presigner = FakePresigner()
    options = progress.script_options(delivery="presigned", region="eu-west-1", staging=OWN,
                                      s3_presign=presigner, instance_ids=[ONE, TWO, ONE, "i-bad"],
                                      lifetime=900)

    assert sorted(options) == ["progress-owner", f"progress-url-{ONE}", f"progress-url-{TWO}"]
    assert options["progress-owner"] == ACCOUNT
    assert [p["Key"] for p in presigner.signed] == [f"progress/{ONE}.log", f"progress/{TWO}.log"]
    assert all(p["ExpectedBucketOwner"] == ACCOUNT for p in presigner.signed)


def test_a_url_the_script_would_refuse_is_left_out() -> None:
    presigner = FakePresigner("https://{bucket}.example/{key}?a='quoted'")
    assert progress.script_options(delivery="presigned", region="eu-west-1", staging=OWN,
                                   s3_presign=presigner, instance_ids=[ONE], lifetime=900) == {}


# -- the reader -----------------------------------------------------------------------------------


def test_only_new_lines_are_printed_fenced_and_a_cut_line_waits() -> None:
    s3 = FakeS3()
    read, out, clock = reader(s3)
    s3.put(OWN, ONE, "10:00:00 k3s-deploy: deploy d-1\n10:00:01 ==> waiting for deployment/api")

    read.poll()  # not yet READ_EVERY seconds since it started: nothing asked
    assert s3.calls == []
    clock.now += progress.READ_EVERY
    read.poll()
    assert shown(out) == ["10:00:00 k3s-deploy: deploy d-1"]  # the unfinished line waits

    s3.put(OWN, ONE, "10:00:00 k3s-deploy: deploy d-1\n10:00:01 ==> waiting for deployment/api\n"
                     "10:00:05 deployment/api: rolled out, ready 2/2\n")
    clock.now += progress.READ_EVERY
    read.poll()
    assert shown(out) == ["10:00:00 k3s-deploy: deploy d-1", "10:00:01 ==> waiting for deployment/api",
                          "10:00:05 deployment/api: rolled out, ready 2/2"]
    assert read.lines_shown == 3


def test_an_unchanged_object_is_not_read_again() -> None:
    s3 = FakeS3()
    read, out, _ = reader(s3)
    s3.put(OWN, ONE, "10:00:00 ==> a\n")
    read.read()
    read.read()
    read.finish()

    assert len(s3.gets()) == 1  # the listing's ETag matched: no GetObject
    assert s3.gets()[0]["IfNoneMatch"] == '"none"'
    assert shown(out) == ["10:00:00 ==> a"]


def test_a_304_is_not_an_error_and_the_etag_is_sent() -> None:
    s3 = FakeS3()
    read, out, _ = reader(s3)
    s3.put(OWN, ONE, "10:00:00 ==> a\n")
    read.read()
    read.etags.clear()  # as if the listing and the object disagreed for a moment
    read.etags[progress.object_key(OWN, ONE)] = '"stale"'
    s3.put(OWN, ONE, "10:00:00 ==> a\n")
    read.read()
    assert s3.gets()[-1]["IfNoneMatch"] == '"stale"'
    assert shown(out) == ["10:00:00 ==> a"] and not read.off


def test_a_refused_read_turns_reading_off_once_with_a_warning() -> None:
    s3 = FakeS3()
    read, out, clock = reader(s3)
    s3.fail = [client_error("AccessDenied", 403)]
    read.read()
    s3.put(OWN, ONE, "10:00:00 ==> a\n")
    clock.now += 10 * progress.READ_EVERY
    read.poll()
    read.finish()

    assert read.off
    assert len(s3.calls) == 1  # never asked again
    warnings = [line for line in out.getvalue().splitlines() if line.startswith("::warning")]
    assert len(warnings) == 1, out.getvalue()
    assert "title=Live progress off" in warnings[0]
    assert "Live progress not shown: could not read s3://" in warnings[0] and "(AccessDenied)" in warnings[0]
    assert "ReadLiveProgress" in warnings[0]
    assert shown(out) == []


def test_passing_errors_are_tolerated_until_three_in_a_row() -> None:
    s3 = FakeS3()
    read, out, _ = reader(s3)
    s3.put(OWN, ONE, "10:00:00 ==> a\n")
    s3.fail = [client_error("SlowDown", 503), client_error("InternalError", 500)]
    read.read()
    read.read()
    assert not read.off and shown(out) == []
    read.read()  # the error count starts again after a good read
    assert shown(out) == ["10:00:00 ==> a"]

    s3.fail = [ConnectionError("reset")] * progress.MAX_READ_ERRORS
    for _ in range(progress.MAX_READ_ERRORS):
        read.read()
    assert read.off
    warning = [line for line in out.getvalue().splitlines() if line.startswith("::warning")]
    assert len(warning) == 1 and "(ConnectionError)" in warning[0]
    assert "ReadLiveProgress" not in warning[0]  # not a permission problem


def test_fleet_lines_name_their_instance_and_each_object_is_followed_alone() -> None:
    s3 = FakeS3()
    read, out, _ = reader(s3, GIVEN, many=True)
    s3.put(GIVEN, ONE, "10:00:00 ==> a\n")
    s3.put(GIVEN, TWO, "10:00:00 ==> b\n10:00:01 ==> c\n")
    s3.objects[(GIVEN.bucket, "k3s-deploy/other-deploy/progress/i-0aaaaaaaaaaaaaaaa.log")] = b"x\n"
    read.read()
    s3.put(GIVEN, ONE, "10:00:00 ==> a\n10:00:02 ==> d\n")
    read.read()

    assert shown(out) == [f"{ONE}: 10:00:00 ==> a", f"{TWO}: 10:00:00 ==> b", f"{TWO}: 10:00:01 ==> c",
                          f"{ONE}: 10:00:02 ==> d"]
    listed = [kwargs for name, kwargs in s3.calls if name == "list"]
    assert {kwargs["Prefix"] for kwargs in listed} == {f"{GIVEN.prefix}progress/"}


def test_remote_text_cannot_issue_workflow_commands() -> None:
    s3 = FakeS3()
    read, out, _ = reader(s3)
    s3.put(OWN, ONE, "::error::x\n::stop-commands::abc\n  ::warning::y\n##[error]z\n")
    read.read()

    lines = out.getvalue().splitlines()
    assert lines[0].startswith("::stop-commands::") and lines[-1] == f"::{lines[0].split('::')[2]}::"
    inner = lines[1:-1]
    assert not any(line.lstrip().startswith("::") for line in inner), inner
    assert "##[error]z" not in out.getvalue()


def test_the_master_giving_up_is_one_warning_in_the_action_s_words() -> None:
    s3 = FakeS3()
    read, out, _ = reader(s3)
    read.check_output("k3s-deploy: deploy d-1\n==> applying\n")
    assert out.getvalue() == ""
    said = "live progress is off: the upload failed 3 times: AccessDenied; the deploy goes on\n"
    read.check_output("==> applying\n" + said)
    read.check_output(said)  # a second instance of a fleet: still one warning
    read.check_output("  " + said.replace("\n", "") + " ::error::x")  # not at a line's start

    warnings = out.getvalue().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("::warning title=Live progress off::")
    assert "UploadLiveProgress" in warnings[0] and "AccessDenied" not in warnings[0]


def test_the_largest_file_the_script_writes_is_shown_whole() -> None:
    """The script's own limits (55-progress.sh): as many lines as it keeps, each as long as it
    lets one be, with its time stamp; the reader must not cut that short."""
    source = (Path(progress.__file__).parent / "scripts" / "k3s-deploy" / "55-progress.sh").read_text()
    max_lines = int(re.search(r"^readonly PROGRESS_MAX_LINES=(\d+)$", source, re.M).group(1))
    line_max = int(re.search(r"^readonly PROGRESS_LINE_MAX=(\d+)$", source, re.M).group(1))
    lines = [f"10:00:00 ==> {n:04d} " + "x" * (line_max - 10) for n in range(max_lines)]
    s3 = FakeS3()
    read, out, _ = reader(s3)
    s3.put(OWN, ONE, "\n".join(lines) + "\n")

    read.read()

    assert shown(out) == lines


def test_fleet_instances_that_never_put_are_named_once_and_a_long_list_is_cut() -> None:
    s3 = FakeS3()
    read, out, _ = reader(s3, many=True)
    s3.put(OWN, ONE, "10:00:00 ==> a\n")
    read.read()
    others = [f"i-00000000000000{n:03d}" for n in range(7)]

    read.warn_silent([ONE])
    assert "::warning" not in out.getvalue()
    read.warn_silent([ONE, *others])

    (warning,) = [line for line in out.getvalue().splitlines() if line.startswith("::warning")]
    assert "No live progress came from 7 instance(s) that deployed: " in warning
    assert ", ".join(others[:5]) + " and 2 more." in warning
    assert ONE not in warning


def test_no_fleet_warning_once_the_reading_is_off() -> None:
    s3 = FakeS3()
    read, out, _ = reader(s3, many=True)
    s3.fail.append(client_error("AccessDenied", 403))
    read.read()
    before = out.getvalue()

    read.warn_silent([ONE, TWO])

    assert out.getvalue() == before  # the refused read said it already; the lines are unknown
