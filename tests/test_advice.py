"""The `How to fix:` advice after a deploy command failed: chosen by the script's exit code
(deploykit/scripts/k3s-deploy/00-header.sh lists them), then by what the output shows."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from deploykit import command, errors, master
from deploykit.inputs import Settings, parse_settings
from deploykit.wait import Invocation


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    (tmp_path / "k8s").mkdir()
    env = {"GITHUB_WORKSPACE": str(tmp_path), "GITHUB_SHA": "0123456789abcdef" * 4}
    return parse_settings({"aws-region": "eu-west-1", "manifests": "k8s"}, env)


def failed(code: int, stdout: str = "", details: str = "Failed") -> Invocation:
    return Invocation("Failed", details, code, stdout, "")


@pytest.mark.parametrize(
    ("code", "fix"),
    [
        (3, errors.FIX_MISSING_TOOL),
        (4, errors.FIX_K3S_UNRESPONSIVE),
        (5, errors.FIX_BUNDLE_REJECTED),
        (6, errors.FIX_LOCK),
        (command.EXIT_CHECKSUM_MISMATCH, errors.FIX_CHECKSUM),
        (7, errors.FIX_ROLLOUT_STUCK),
        (10, errors.FIX_ROLLOUT_STUCK),
    ],
)
def test_each_exit_code_gets_its_own_advice(settings: Settings, code: int, fix: str) -> None:
    assert master.fix_for(settings, failed(code)) == fix


def test_output_decides_when_the_code_does_not(settings: Settings) -> None:
    assert master.fix_for(settings, failed(7, "pod api-1: ImagePullBackOff")) == errors.FIX_IMAGE_PULL
    assert master.fix_for(settings, failed(8, "net/http: TLS handshake timeout")) == errors.FIX_TLS_TIMEOUT
    undelivered = failed(-1, details="DeliveryTimedOut")
    assert master.fix_for(settings, undelivered) == errors.FIX_SSM_AGENT


def test_download_advice_names_the_bucket_the_deploy_used(settings: Settings) -> None:
    fix = master.fix_for(settings, failed(command.EXIT_DOWNLOAD_FAILED))
    assert "s3:GetObject on arn:aws:s3:::k3s-deploy-*/*" in fix
    own = dataclasses.replace(settings, bucket="team-artifacts")
    assert "arn:aws:s3:::team-artifacts/*" in master.fix_for(own, failed(command.EXIT_DOWNLOAD_FAILED))


def test_download_advice_with_presigned_urls_asks_for_curl_and_a_route_not_a_permission(
    settings: Settings,
) -> None:
    presigned = dataclasses.replace(settings, delivery="presigned")
    fix = master.fix_for(presigned, failed(command.EXIT_DOWNLOAD_FAILED))
    assert "curl" in fix and "route to S3" in fix
    assert "s3:GetObject" not in fix
