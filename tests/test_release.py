"""The release's rewriting of action.yml and its tag plan (devkit/release.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from devkit.release import (
    ReleaseError,
    Version,
    existing_versions,
    ghcr_image,
    parse_version,
    pin_action_yml,
    plan,
)

REPO = Path(__file__).resolve().parents[1]
IMAGE = "ghcr.io/octo-org/k3s-deploy-action"
DIGEST = "sha256:" + "0123456789abcdef" * 4
SHA = "89abcdef" * 5


def test_pins_runs_image_of_the_real_action_yml_and_changes_nothing_else() -> None:
    before = (REPO / "action.yml").read_text()

    after = pin_action_yml(before, IMAGE, DIGEST)

    old, new = yaml.safe_load(before), yaml.safe_load(after)
    assert new["runs"]["image"] == f"docker://{IMAGE}@{DIGEST}"
    new["runs"]["image"] = old["runs"]["image"]
    assert new == old
    changed = [(a, b) for a, b in zip(before.splitlines(True), after.splitlines(True), strict=True) if a != b]
    assert changed == [("  image: Dockerfile\n", f"  image: docker://{IMAGE}@{DIGEST}\n")]


def test_keeps_comments_quotes_and_crlf_byte_for_byte() -> None:
    text = (
        "# top comment\r\n"
        "name: x  # trailing\r\n"
        "description: 'image: not this one'\r\n"
        "inputs:\r\n"
        "  image:\r\n"
        "    description: an input called image\r\n"
        "runs:\r\n"
        "  # image: not this comment\r\n"
        "  using: 'docker'\r\n"
        '  image: "Dockerfile"   # built on every job\r\n'
        "  args:\r\n"
        "    - image: nested\r\n"
        "outputs: {}\r\n"
    )

    after = pin_action_yml(text, IMAGE, DIGEST)

    expected = text.replace(
        '  image: "Dockerfile"   # built on every job',
        f"  image: docker://{IMAGE}@{DIGEST}   # built on every job",
    )
    assert after == expected


def test_repinning_a_release_commit_replaces_the_old_digest() -> None:
    once = pin_action_yml("runs:\n  using: docker\n  image: Dockerfile\n", IMAGE, DIGEST)
    other = "sha256:" + "f" * 64
    assert (
        pin_action_yml(once, IMAGE, other) == f"runs:\n  using: docker\n  image: docker://{IMAGE}@{other}\n"
    )


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:" + "0" * 63,
        "sha256:" + "0" * 65,
        "sha256:" + "A" * 64,
        "sha512:" + "0" * 64,
        "0" * 64,
        "sha256:" + "0" * 63 + "\n",
        "latest",
        "",
    ],
)
def test_refuses_a_digest_that_is_not_sha256_and_64_hex(digest: str) -> None:
    with pytest.raises(ReleaseError, match="digest"):
        pin_action_yml("runs:\n  using: docker\n  image: Dockerfile\n", IMAGE, digest)


@pytest.mark.parametrize(
    "image",
    [
        "docker.io/octo-org/k3s-deploy-action",
        "octo-org/k3s-deploy-action",
        "ghcr.io.evil.example/octo-org/k3s-deploy-action",
        "123456789012.dkr.ecr.eu-west-1.amazonaws.com/k3s-deploy-action",
        "ghcr.io/Octo-Org/k3s-deploy-action",  # GHCR names are lowercase
        "ghcr.io/octo-org/k3s-deploy-action:v1",  # a tag is not a pin
        "ghcr.io/octo-org",
    ],
)
def test_refuses_anything_but_a_ghcr_image_name(image: str) -> None:
    with pytest.raises(ReleaseError):
        pin_action_yml("runs:\n  using: docker\n  image: Dockerfile\n", image, DIGEST)


@pytest.mark.parametrize(
    "text",
    [
        "name: x\nimage: Dockerfile\n",  # no runs block
        "runs:\n  using: docker\n",  # no image
        "runs:\n  using: docker\n  image: a\n  image: b\n",  # two
        "runs: {using: docker, image: Dockerfile}\n",  # flow style
    ],
)
def test_refuses_an_action_yml_without_exactly_one_runs_image(text: str) -> None:
    with pytest.raises(ReleaseError):
        pin_action_yml(text, IMAGE, DIGEST)


def test_plan_tags_version_minor_major_and_sha() -> None:
    result = plan(Version(1, 2, 3), IMAGE, SHA, existing_versions(["v1.2.2", "v1.1.9", "v0.9.0"]))

    assert result.tags == [f"{IMAGE}:1.2.3", f"{IMAGE}:1.2", f"{IMAGE}:1", f"{IMAGE}:{SHA}"]
    assert result.move_major


def test_a_fix_to_an_older_line_does_not_move_the_floating_tags_back() -> None:
    released = existing_versions(["v1.3.0", "v1.2.3", "refs/tags/v2.0.0", "not-a-version", "v1.2"])

    result = plan(Version(1, 2, 4), IMAGE, SHA, released)

    assert result.tags == [f"{IMAGE}:1.2.4", f"{IMAGE}:1.2", f"{IMAGE}:{SHA}"]
    assert not result.move_major


@pytest.mark.parametrize("text", ["1.2", "v1.2.3-rc.1", "01.2.3", "1.2.3.4", "v 1.2.3", "", "1.2.3\n1"])
def test_versions_are_plain_x_y_z(text: str) -> None:
    with pytest.raises(ReleaseError):
        parse_version(text)


def test_ghcr_image_is_lowercase_and_refuses_odd_repository_names() -> None:
    assert ghcr_image("Octo-Org/K3s-Deploy-Action") == "ghcr.io/octo-org/k3s-deploy-action"
    with pytest.raises(ReleaseError):
        ghcr_image("octo-org/repo/extra")


def test_command_line_pins_a_file_and_writes_the_plan_to_github_output(tmp_path: Path) -> None:
    action = tmp_path / "action.yml"
    action.write_bytes((REPO / "action.yml").read_bytes())
    outputs = tmp_path / "output"
    tags = tmp_path / "tags"
    tags.write_text("v1.0.0\nv1.1.0\nv1.2.0\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "devkit.release", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={"GITHUB_OUTPUT": str(outputs), "PATH": "/usr/bin:/bin"},
            check=False,
        )

    planned = run(
        "plan",
        "--event",
        "workflow_dispatch",
        "--version",
        "1.1.1",
        "--repository",
        "octo-org/k3s-deploy-action",
        "--sha",
        SHA,
        "--tags-file",
        str(tags),
    )
    assert planned.returncode == 0, planned.stderr
    text = outputs.read_text()
    assert "version=1.1.1\n" in text and "major=1\n" in text and "move-major=false\n" in text
    assert f"{IMAGE}:1.1.1\n{IMAGE}:1.1\n{IMAGE}:{SHA}\n" in text

    again = run(
        "plan",
        "--event",
        "workflow_dispatch",
        "--version",
        "1.1.0",
        "--repository",
        "octo-org/k3s-deploy-action",
        "--sha",
        SHA,
        "--tags-file",
        str(tags),
    )
    assert again.returncode == 1 and "released already" in again.stderr

    pinned = run("pin", "--file", str(action), "--image", IMAGE, "--digest", DIGEST)
    assert pinned.returncode == 0, pinned.stderr
    assert yaml.safe_load(action.read_text())["runs"]["image"] == f"docker://{IMAGE}@{DIGEST}"

    refused = run("pin", "--file", str(action), "--image", "docker.io/octo/x", "--digest", DIGEST)
    assert refused.returncode == 1 and "GHCR" in refused.stderr
