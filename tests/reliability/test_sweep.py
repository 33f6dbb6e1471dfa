"""`python -m deploykit sweep`: finds the action's buckets left behind, lists them with their
age, deletes them (every version, then the bucket) only with --delete, never touches a bucket
without the action's tag."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from deploykit import stage, sweep
from deploykit.errors import InputError
from devkit.simulate.aws import PROJECT_ROOT, SimulatedAWS


@pytest.fixture
def sim() -> Iterator[SimulatedAWS]:
    with SimulatedAWS() as sim:
        yield sim


def _leftover(sim: SimulatedAWS, name: str, *, tagged: bool = True, versions: int = 1) -> None:
    s3 = sim.client("s3")
    if tagged:
        stage.create_bucket(
            s3, sim.region, sim.account_id, name, "20260101-000000-abcdef01", datetime.now(UTC)
        )
    else:
        s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": sim.region})
    if versions > 1:
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    for i in range(versions):
        s3.put_object(Bucket=name, Key="manifests.tar.gz", Body=f"v{i}".encode())


def _names(sim: SimulatedAWS) -> list[str]:
    return sorted(b["Name"] for b in sim.client("s3").list_buckets()["Buckets"])


@pytest.mark.parametrize(
    ("text", "seconds"), [("0s", 0), ("90s", 90), ("30m", 1800), ("6h", 21600), ("2d", 172800)]
)
def test_older_than_takes_seconds_minutes_hours_and_days(text: str, seconds: int) -> None:
    assert sweep.parse_age(text) == seconds


@pytest.mark.parametrize("text", ["6", "h", "-1h", "1.5h", "6 h", "6w", "", "6H"])
def test_older_than_refuses_anything_else(text: str) -> None:
    with pytest.raises(InputError, match="--older-than"):
        sweep.parse_age(text)


def test_lists_without_deleting_and_deletes_only_with_delete(sim: SimulatedAWS) -> None:
    _leftover(sim, "k3s-deploy-20260101-000000-aaaaaaaa", versions=3)
    _leftover(sim, "k3s-deploy-20260101-000000-bbbbbbbb", tagged=False)
    sim.client("s3").create_bucket(
        Bucket="someone-elses", CreateBucketConfiguration={"LocationConstraint": sim.region}
    )
    lines: list[str] = []

    found = sweep.sweep(sim.client("s3"), sim.client("sts"), older_than=0, delete=False, log=lines.append)

    assert [(f.bucket, f.ours) for f in found] == [
        ("k3s-deploy-20260101-000000-aaaaaaaa", True),
        ("k3s-deploy-20260101-000000-bbbbbbbb", False),
    ]
    assert "would be deleted" in lines[0] and "age" in lines[0] and "not ours" in lines[1]
    assert len(_names(sim)) == 3

    sweep.sweep(sim.client("s3"), sim.client("sts"), older_than=0, delete=True, log=lines.append)

    assert _names(sim) == ["k3s-deploy-20260101-000000-bbbbbbbb", "someone-elses"]


def test_an_empty_untagged_bucket_with_a_generated_name_counts_as_ours(sim: SimulatedAWS) -> None:
    """What a run killed between CreateBucket and PutBucketTagging leaves."""
    s3 = sim.client("s3")
    for name in ("k3s-deploy-20260101-000000-eeeeeeee", "k3s-deploy-keep-me"):
        s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": sim.region})

    found = sweep.sweep(s3, sim.client("sts"), older_than=0, delete=True, log=lambda _: None)

    assert [(f.bucket, f.ours, f.deleted) for f in found] == [
        ("k3s-deploy-20260101-000000-eeeeeeee", True, True),
        ("k3s-deploy-keep-me", False, False),
    ]
    assert _names(sim) == ["k3s-deploy-keep-me"]


def test_older_than_spares_recent_buckets(sim: SimulatedAWS) -> None:
    _leftover(sim, "k3s-deploy-20260101-000000-cccccccc")
    now = datetime.now(UTC)
    assert sweep.find_leftovers(sim.client("s3"), sim.account_id, older_than=3600, now=now) == []
    later = sweep.find_leftovers(
        sim.client("s3"), sim.account_id, older_than=3600, now=now + timedelta(hours=2)
    )
    assert [f.bucket for f in later] == ["k3s-deploy-20260101-000000-cccccccc"]
    assert sweep.describe_age(later[0].age_seconds).startswith("2h")


def test_command_line_lists_then_deletes(sim: SimulatedAWS) -> None:
    _leftover(sim, "k3s-deploy-20260101-000000-dddddddd")
    env = sim.env() | {"PYTHONPATH": str(PROJECT_ROOT)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "deploykit", "sweep", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=PROJECT_ROOT,
        )

    listed = run("--older-than", "0s", "--aws-region", sim.region)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "k3s-deploy-20260101-000000-dddddddd  age " in listed.stdout and "--delete" in listed.stdout
    assert _names(sim) == ["k3s-deploy-20260101-000000-dddddddd"]

    deleted = run("--older-than", "0s", "--delete")
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert "deleted" in deleted.stdout and _names(sim) == []

    bad = run("--older-than", "soon")
    assert bad.returncode == 1 and "--older-than" in bad.stdout
