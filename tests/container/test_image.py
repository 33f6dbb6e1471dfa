"""The action's image: what it holds, what it leaves out, and how it fails on bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import REPO, docker, image_config

pytestmark = pytest.mark.container


def sh(image: str, script: str) -> tuple[int, str]:
    """Run a shell snippet in the image, without network, bypassing the entrypoint."""
    proc = docker("run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c", script)
    return proc.returncode, proc.stdout + proc.stderr


def test_image_builds_with_exec_form_entrypoint_and_venv_on_path(action_image: str) -> None:
    config = image_config(action_image)["Config"]
    assert config["Entrypoint"] == ["python", "/app/entrypoint.py"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")
    # GitHub runs container actions as the image's default user, which must be root.
    assert config.get("User", "") in ("", "root", "0")


def test_image_holds_the_entry_file_and_the_deploy_script(action_image: str) -> None:
    wanted = [
        "/app/entrypoint.py",
        "/app/deploykit/__init__.py",
        "/app/deploykit/cli.py",
        # The deploy script's parts: deploykit/command.py joins them when it stages the script.
        "/app/deploykit/scripts/k3s-deploy/00-header.sh",
        "/app/deploykit/scripts/k3s-deploy/95-main.sh",
    ]
    rc, out = sh(action_image, "".join(f"test -f {f} || echo missing {f}; " for f in wanted) + "echo checked")
    assert rc == 0 and "checked" in out, out
    assert "missing" not in out, out


def test_image_leaves_out_the_rig_the_tests_and_caches(action_image: str) -> None:
    # The development rig (devkit/: the simulator, the demo, the benchmark) is not the product:
    # no copy of it, nor of its old place inside deploykit, may reach the image or its venv.
    rig = "-name devkit -o -name simulate -o -name bench.py -o -name demo.py -o -name release.py"
    rc, out = sh(
        action_image,
        "test ! -e /app/tests"
        f' && test -z "$(find /app {rig})" && test -z "$(find /opt/venv -name devkit)"'
        " && test -z \"$(find /app -name __pycache__ -o -name '*.pyc')\" && echo clean",
    )
    assert rc == 0 and "clean" in out, out


def test_runtime_dependencies_are_the_locked_versions_in_the_venv(action_image: str) -> None:
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)", (REPO / "requirements.lock").read_text(), re.M))
    script = (
        "import importlib.metadata as m, boto3, botocore, yaml, tenacity, docker;"
        f"pins = {pins!r};"
        "bad = {n: m.version(n) for n, v in pins.items() if m.version(n) != v};"
        "assert not bad, bad;"
        "assert boto3.__file__.startswith('/opt/venv/'), boto3.__file__;"
        "print('locked')"
    )
    proc = docker("run", "--rm", "--network", "none", "--entrypoint", "python", action_image, "-c", script)
    assert proc.returncode == 0 and "locked" in proc.stdout, proc.stdout + proc.stderr


def test_image_has_no_compiler_or_build_tools(action_image: str) -> None:
    tools = ["gcc", "cc", "c++", "g++", "clang", "make", "ld", "as"]
    rc, out = sh(
        action_image,
        f"for t in {' '.join(tools)}; do command -v $t && echo FOUND $t; done;"
        " test ! -e /opt/venv/bin/pip || echo FOUND venv-pip; echo done",
    )
    assert rc == 0 and "done" in out, out
    assert "FOUND" not in out, out


def test_bad_timeout_input_exits_1_and_writes_status_failed(run_action, tmp_path: Path) -> None:
    workspace = tmp_path / "checkout"
    manifests = workspace / "k8s" / "base"
    manifests.mkdir(parents=True)
    (manifests / "namespace.yaml").write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: production-platform\n"
    )
    # No network: a bad input must be rejected before any AWS call.
    result = run_action({"aws-region": "eu-west-1", "timeout": "abc"}, workspace=workspace, network="none")
    assert result.returncode == 1, result.log
    assert result.outputs.get("status") == "failed", (result.outputs, result.log)
    assert "'timeout'" in result.log, result.log
