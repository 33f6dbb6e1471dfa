"""Images are checked by default (`verify-images: auto`), with no login, through the registry's
anonymous token flow: the action runs as the runner runs it, against a registry on 127.0.0.1
that answers only bearer tokens (as Docker Hub and GHCR do), and the simulated AWS account.

On the token registry anyone may pull `public/*`; `acme/*` needs the login.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.registry.conftest import (
    NS,
    Registry,
    TokenService,
    World,
    bearer_digest,
    open_world,
    platform_manifests,
)

pytestmark = pytest.mark.registry


@pytest.fixture
def world(token_registry: tuple[Registry, TokenService], tmp_path: Path) -> Iterator[World]:
    registry, _ = token_registry
    with open_world(tmp_path, registry) as world:
        yield world


def use_images(world: World, api: str, worker: str) -> None:
    """Point the workspace's manifests at these images (`images` pins them to `image-tag`)."""
    for name, text in platform_manifests(api, worker).items():
        (world.workspace / "k8s" / "base" / name).write_text(text)


def test_a_public_tag_never_pushed_fails_before_any_aws_call_with_no_login(
    world: World, token_registry: tuple[Registry, TokenService], token_seeds: tuple[str, str]
) -> None:
    registry, tokens = token_registry
    public = f"{registry.host}/public/seed"
    use_images(world, public, public)
    asked = len(tokens.requests)

    run = world.deploy(images=public, **{"image-tag": "never-pushed"})  # verify-images not given

    assert run.returncode == 1, run.log
    assert run.outputs["status"] == "failed"
    assert (
        f"::error title=Image not found in its registry::image {public}:never-pushed is not in its "
        f"registry: {registry.host} has no tag never-pushed for public/seed"
    ) in run.log
    assert world.untouched(), "an AWS change was made before the image check"
    # asked anonymously, through the token service the registry's challenge named
    assert {"user": "", "scope": "repository:public/seed:pull"} in tokens.requests[asked:]


def test_a_public_tag_that_exists_is_checked_anonymously_and_deployed_by_digest_in_the_output(
    world: World, token_registry: tuple[Registry, TokenService], token_seeds: tuple[str, str]
) -> None:
    registry, tokens = token_registry
    public = f"{registry.host}/public/seed"
    use_images(world, public, public)
    digest = bearer_digest(registry, tokens, "public/seed", "v1")

    run = world.deploy(images=public, **{"image-tag": "v1"})

    assert run.returncode == 0, run.log
    assert run.outputs["status"] == "success"
    prefix = f"Found {public}:v1 in {registry.host} (sha256:"
    found = [line for line in run.log.splitlines() if line.startswith(prefix)]
    assert len(found) == 1, run.log
    shown = found[0].rsplit("(", 1)[1].rstrip(")")
    assert shown == digest
    assert json.loads(run.outputs["images"]) == [f"{public}:v1@{shown}"]
    assert "Image not verified" not in run.log
    assert world.cluster.image_of("deployment", NS, "api") == f"{public}:v1"


def test_a_private_image_without_a_login_is_a_warning_and_the_deploy_goes_on(
    world: World, token_seeds: tuple[str, str]
) -> None:
    # the world's manifests use acme/api and acme/worker, which anonymous clients may not read
    run = world.deploy(images=f"{world.api}\n{world.worker}", **{"image-tag": "v1"})

    assert run.returncode == 0, run.log
    assert run.outputs["status"] == "success"
    # one warning per image: a login is wanted per repository, not per registry
    assert run.log.count("::warning title=Image not verified::Could not check ") == 2, run.log
    assert "the deploy goes on" in run.log
    assert world.cluster.image_of("deployment", NS, "worker") == f"{world.worker}:v1"


def test_a_private_image_without_a_login_fails_before_any_aws_call_with_verify_true(
    world: World, token_seeds: tuple[str, str]
) -> None:
    run = world.deploy(images=f"{world.api}\n{world.worker}", **{"image-tag": "v1", "verify-images": "true"})

    assert run.returncode == 1, run.log
    assert run.outputs["status"] == "failed"
    assert f"::error title=Image not verified::could not check {world.api}:v1: registry " in run.log
    assert world.untouched()
