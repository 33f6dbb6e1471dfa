"""The fault proxy of the reliability suite in front of the containerised action: the same
botocore inside the image retries what the proxy throttles or drops, and a refusal fails the
deploy with the permission named and nothing left behind.

tests/reliability runs the whole fault matrix against the action as a process; these two runs
show that the image behaves alike (its own botocore, its own retry settings, no test code).
"""

from __future__ import annotations

import pytest

from devkit.simulate.faults import FaultProxy
from tests.e2e.conftest import API, NS

from .conftest import RunAction, World
from .test_runner_contract import RUN_TIMEOUT_S

pytestmark = pytest.mark.container


def test_throttled_and_dropped_calls_are_retried_inside_the_image(
    world: World, run_action: RunAction
) -> None:
    with FaultProxy(world.sim.endpoint_url) as proxy:
        throttled = proxy.add("DescribeInstances", "throttle", times=2)
        dropped = proxy.add("PutObject", "drop", times=1)
        failed = proxy.add("GetCommandInvocation", "server-error", times=2)
        env = {**world.aws_env(), "AWS_ENDPOINT_URL": proxy.url}

        run = run_action(
            world.inputs(**{"image-tag": "v1"}), env, workspace=world.workspace, timeout=RUN_TIMEOUT_S
        )

        assert run.returncode == 0, run.log
        assert run.outputs["status"] == "success"
        assert (throttled.injected, dropped.injected, failed.injected) == (2, 1, 2)
        # each fault cost one retry: the call got through right after them
        assert len(proxy.calls_to("DescribeInstances")) == 3
        assert len(proxy.calls_to("PutObject")) == 3  # two files, one of them twice
    assert len(world.deploy_commands()) == 1
    assert world.cluster.image_of("deployment", NS, "api") == f"{API}:v1"
    assert world.buckets() == []


def test_a_refused_upload_fails_naming_the_permission_and_leaves_nothing(
    world: World, run_action: RunAction
) -> None:
    with FaultProxy(world.sim.endpoint_url) as proxy:
        refused = proxy.add("PutObject", "access-denied", times=None)
        env = {**world.aws_env(), "AWS_ENDPOINT_URL": proxy.url}

        run = run_action(
            world.inputs(**{"image-tag": "v1"}), env, workspace=world.workspace, timeout=RUN_TIMEOUT_S
        )

        assert run.returncode == 1, run.log
        assert run.outputs["status"] == "failed"
        assert refused.injected == 1, "a refused call was retried"
        assert "s3:PutObject" in run.log
    assert world.sim.sent_commands() == []
    assert world.buckets() == []
