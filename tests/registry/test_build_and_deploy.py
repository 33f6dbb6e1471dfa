"""One step that builds, pushes and deploys, run as the runner runs the action, against the
real Docker engine, a real registry on 127.0.0.1, and the simulated AWS account and master.

The first deploy of this module builds the example api and worker apps from the local base
image, so it is shared by the tests that look at its results (a build takes about a minute on
the vfs storage driver).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from devkit.simulate.runner import ActionRun
from tests.registry.conftest import NS, Registry, World, open_world

pytestmark = pytest.mark.registry

TAG = "0123456789abcdef0123456789abcdef01234567"  # the runner's GITHUB_SHA


def build_inputs(world: World, base_image: str, **more: str) -> dict[str, str]:
    return {
        "build": f"app/api={world.api}\napp/worker={world.worker}",
        "build-args": f"BASE_IMAGE={base_image}",
        **more,
    }


@dataclass
class FirstDeploy:
    world: World
    run: ActionRun


@pytest.fixture(scope="module")
def first(
    plain_registry: Registry, base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FirstDeploy]:
    with open_world(tmp_path_factory.mktemp("build-world"), plain_registry) as world:
        yield FirstDeploy(world, world.deploy(**build_inputs(world, base_image)))


def test_one_step_builds_pushes_and_deploys_the_built_images(first: FirstDeploy) -> None:
    run, world = first.run, first.world
    assert run.returncode == 0, run.log
    assert run.outputs["status"] == "success"
    assert world.cluster.image_of("deployment", NS, "api") == f"{world.api}:{TAG}"
    assert world.cluster.image_of("deployment", NS, "worker") == f"{world.worker}:{TAG}"
    assert world.buckets() == []
    assert "::group::Build and push " + f"{world.api}:{TAG}" in run.log
    assert "Step 6/9 : COPY server.py /app/server.py" in run.log


def test_both_tags_of_both_images_are_in_the_registry(first: FirstDeploy) -> None:
    registry = first.world.registry
    for path in ("acme/api", "acme/worker"):
        assert registry.tags(path) == sorted([TAG, "latest"])
        assert registry.digest(path, TAG) == registry.digest(path, "latest")


def test_the_images_output_carries_the_digests_the_registry_serves(first: FirstDeploy) -> None:
    world, registry = first.world, first.world.registry
    images = json.loads(first.run.outputs["images"])
    assert images == [
        f"{world.api}:{TAG}@{registry.digest('acme/api', TAG)}",
        f"{world.worker}:{TAG}@{registry.digest('acme/worker', TAG)}",
    ]
    assert f"`{images[0]}`" in first.run.summary


def test_the_build_happens_before_any_aws_call(first: FirstDeploy) -> None:
    log = first.run.log
    assert log.index("Built and pushed ") < log.index("Found ") < log.index("Staging in ")


def latest_pulls(world: World) -> int:
    """The registry's answers to a read (GET or HEAD) of the api's `latest` manifest: the
    engine's pulls (a HEAD alone when it has those layers already)."""
    return sum(re.search(r'"(GET|HEAD) /v2/acme/api/manifests/latest ', line) is not None
               for line in world.registry.log().splitlines())


def test_a_build_does_not_pull_the_previous_latest_unless_asked(first: FirstDeploy, base_image: str) -> None:
    """#15: `latest` is whatever its last pusher made it; its layers are reused only with
    `build-cache: true`."""
    world = first.world
    pulls = latest_pulls(world)
    run = world.deploy(**build_inputs(world, base_image, **{"image-tag": "v1b"}))
    assert run.returncode == 0, run.log
    assert "Reusing layers" not in run.log and "No previous" not in run.log
    assert latest_pulls(world) == pulls, world.registry.log()[-3000:]


def test_a_second_build_reuses_the_previous_latest_as_its_cache(first: FirstDeploy, base_image: str) -> None:
    world = first.world
    pulls = latest_pulls(world)
    run = world.deploy(**build_inputs(world, base_image, **{"image-tag": "v2", "build-cache": "true"}))
    assert run.returncode == 0, run.log
    assert f"Reusing layers from {world.api}:latest" in run.log
    assert latest_pulls(world) > pulls, world.registry.log()[-3000:]
    assert " ---> Using cache" in run.log
    assert {TAG, "latest", "v2"} <= set(world.registry.tags("acme/api"))
    assert world.cluster.image_of("deployment", NS, "api") == f"{world.api}:v2"


def test_a_tag_that_was_never_pushed_is_refused_before_any_aws_call(first: FirstDeploy) -> None:
    world = first.world
    commands_before = len(world.sim.sent_commands())
    run = world.deploy(images=f"{world.api}:never-pushed\n{world.worker}:{TAG}", **{"verify-images": "true"})
    assert run.returncode == 1
    assert run.outputs["status"] == "failed"
    assert (
        f"::error title=Image not found in its registry::image {world.api}:never-pushed is not in its "
        f"registry: {world.registry.host} has no tag never-pushed for acme/api"
    ) in run.log
    assert world.buckets() == []
    assert len(world.sim.sent_commands()) == commands_before
    assert run.outputs["instance-id"] == ""
