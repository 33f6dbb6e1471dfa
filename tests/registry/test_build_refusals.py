"""What stops a build-and-deploy step before any AWS call, and a login over TLS that works.

Each test opens its own simulated AWS account; the registries and the engine are real.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.registry.conftest import NS, Registry, log_without_masks, open_world
from tests.registry.test_build_and_deploy import TAG, build_inputs
from tests.runner import named

pytestmark = pytest.mark.registry


def test_a_failed_build_stops_before_any_aws_call_with_the_failing_steps_output(
    plain_registry: Registry, base_image: str, tmp_path: Path
) -> None:
    with open_world(tmp_path, plain_registry) as world:
        (world.workspace / "app" / "api" / "Dockerfile").write_text(
            "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\n"
            'RUN echo "compiling the api" && echo "error: no module named frobnicate" >&2 && exit 3\n'
        )
        run = world.deploy(**build_inputs(world, base_image))

        assert run.returncode == 1
        assert run.outputs["status"] == "failed"
        assert f"::error title=Image build failed::docker build of {world.api}:{TAG}" in run.log
        error = next(line for line in run.log.splitlines() if line.startswith("::error"))
        assert "failed at Step 3/3 : RUN echo" in error
        assert "returned a non-zero code: 3" in error
        assert "error: no module named frobnicate" in error
        assert "compiling the api" in run.summary
        assert world.untouched()
        assert f"Build and push {world.worker}" not in run.log  # the first failure stops the step


def test_a_wrong_password_stops_with_a_clear_error_and_is_never_shown(
    tls_registry: Registry, base_image: str, tmp_path: Path
) -> None:
    wrong = "not-" + tls_registry.password
    with open_world(tmp_path, tls_registry) as world:
        run = world.deploy(
            **build_inputs(world, base_image),
            registry=tls_registry.host,
            **{"registry-username": tls_registry.username, "registry-password": wrong},
        )

        assert run.returncode == 1
        assert run.outputs["status"] == "failed"
        assert (
            f"::error title=Registry login failed::registry {tls_registry.host} refused the login of "
            f"user '{tls_registry.username}'"
        ) in run.log
        assert f"::add-mask::{wrong}" in run.log.splitlines()[0]
        assert wrong not in log_without_masks(run.log)
        assert wrong not in json.dumps(run.outputs)
        assert wrong not in run.summary
        assert "refused the login" in run.summary
        assert world.untouched()


def test_a_wrong_password_with_nothing_to_build_is_caught_by_the_image_check(
    tls_registry: Registry, tmp_path: Path
) -> None:
    wrong = "not-" + tls_registry.password
    with open_world(tmp_path, tls_registry) as world:
        run = world.deploy(
            images=f"{world.api}:v1\n{world.worker}:v1",
            registry=tls_registry.host,
            **{"registry-username": tls_registry.username, "registry-password": wrong},
        )
        assert run.returncode == 1
        assert f"registry {tls_registry.host} refused the login of user '{tls_registry.username}'" in run.log
        assert wrong not in log_without_masks(run.log) + run.summary + json.dumps(run.outputs)
        assert world.untouched()


def test_a_login_over_tls_builds_pushes_and_deploys(
    tls_registry: Registry, base_image: str, tmp_path: Path
) -> None:
    with open_world(tmp_path, tls_registry) as world:
        run = world.deploy(
            build=f"app/api={world.api}",
            images=f"{world.worker}:{TAG}",
            **{
                "build-args": f"BASE_IMAGE={base_image}",
                "registry": tls_registry.host,
                "registry-username": tls_registry.username,
                "registry-password": tls_registry.password,
                "verify-images": "false",
            },
        )
        assert run.returncode == 0, run.log
        assert f"Logged in to {tls_registry.host} as {tls_registry.username}" in run.log
        assert tls_registry.tags("acme/api") == sorted([TAG, "latest"])
        images = json.loads(run.outputs["images"])
        assert images == [
            f"{world.api}:{TAG}@{tls_registry.digest('acme/api', TAG)}",
            f"{world.worker}:{TAG}",
        ]
        assert tls_registry.password not in log_without_masks(run.log) + run.summary
        assert world.cluster.image_of("deployment", NS, "api") == f"{world.api}:{TAG}"


def test_build_output_cannot_issue_workflow_commands(
    plain_registry: Registry, base_image: str, tmp_path: Path
) -> None:
    """What a build step prints is the build context's to decide: a progress bar's CR or a line
    feed in it must not start a workflow command (#15, finding 3)."""
    with open_world(tmp_path, plain_registry) as world:
        (world.workspace / "app" / "api" / "Dockerfile").write_text(
            "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\n"
            r"RUN printf '10%%\r::pwned::by a CR\nok\r\n::pwned title=x::by a CRLF\n'"
            r" && printf 'x ##[pwned]old form\n' && exit 3" "\n"
        )
        run = world.deploy(**build_inputs(world, base_image))

        assert run.outputs["status"] == "failed"
        assert "by a CRLF" in run.log  # shown...
        assert named(run.log, "pwned") == []  # ...and issuing nothing
        assert any("failed at Step 3/3" in c.data for c in named(run.log, "error"))
        assert world.untouched()
