"""The build and registry inputs: parsing, every refusal, and the password kept out of sight.

No engine or registry needed here: these are the checks that run before anything else.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploykit.errors import InputError
from deploykit.images import parse_image
from deploykit.inputs import INPUTS, parse_settings
from deploykit.registry import RegistryClient, image_path, image_registry, is_loopback

REPO = Path(__file__).resolve().parents[2]
SHA = "0123456789abcdef0123456789abcdef01234567"
SECRET = "s3cr3t-Pa55word-never-shown"
MY_INPUTS = ("build", "build-args", "registry", "registry-username", "registry-password", "verify-images")


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "k8s" / "base").mkdir(parents=True)
    (root / "k8s" / "base" / "app.yaml").write_text("kind: ConfigMap\n")
    for app in ("api", "worker"):
        (root / "app" / app).mkdir(parents=True)
        (root / "app" / app / "Dockerfile").write_text("FROM scratch\n")
    (root / "app" / "api" / "Dockerfile.prod").write_text("FROM scratch\n")
    return root.resolve()


@pytest.fixture
def env(workspace: Path) -> dict[str, str]:
    return {"GITHUB_WORKSPACE": str(workspace), "AWS_REGION": "eu-west-1", "GITHUB_SHA": SHA}


def refusal(raw: dict[str, str], env: dict[str, str]) -> str:
    with pytest.raises(InputError) as caught:
        parse_settings(raw, env)
    return caught.value.message


def test_build_lines_become_specs_tagged_with_image_tag_and_pinned_like_images(env, workspace):
    settings = parse_settings(
        {"build": "app/api:Dockerfile.prod=localhost:5000/acme/api\n\napp/worker=acme/worker\n"}, env
    )
    api, worker = settings.builds
    assert api.context == workspace / "app" / "api"
    assert api.dockerfile == workspace / "app" / "api" / "Dockerfile.prod"
    assert str(api.image) == f"localhost:5000/acme/api:{SHA}"
    assert str(api.latest) == "localhost:5000/acme/api:latest"
    assert worker.dockerfile == workspace / "app" / "worker" / "Dockerfile"
    assert worker.image.canonical_repository == "docker.io/acme/worker"
    assert [str(ref) for ref in settings.images] == [str(api.image), str(worker.image)]


def test_image_tag_input_tags_the_built_images(env):
    settings = parse_settings({"build": "app/api=ghcr.io/acme/api", "image-tag": "v1.2.3"}, env)
    assert str(settings.builds[0].image) == "ghcr.io/acme/api:v1.2.3"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("app/api", "each line must be CONTEXT=IMAGE or CONTEXT:DOCKERFILE=IMAGE"),
        ("=ghcr.io/acme/api", "each line must be CONTEXT=IMAGE"),
        ("app/api=", "each line must be CONTEXT=IMAGE"),
        ("app/api=ghcr.io/acme/api:v1", "give the image without a tag or digest"),
        ("app/api=Not_An_Image!", "is not a valid image reference"),
        ("../elsewhere=ghcr.io/acme/api", "the context leads outside the workspace"),
        ("/abs/path=ghcr.io/acme/api", "the context must be a path relative to the workspace"),
        ("app/missing=ghcr.io/acme/api", "the context 'app/missing' is not a folder in the workspace"),
        ("app/api:../../../etc/passwd=ghcr.io/acme/api", "the Dockerfile leads outside the workspace"),
        ("app/api:Dockerfile.dev=ghcr.io/acme/api", "no Dockerfile at app/api/Dockerfile.dev"),
        ("k8s=ghcr.io/acme/api", "no Dockerfile at k8s/Dockerfile"),
    ],
)
def test_bad_build_lines_are_refused_with_the_rule_and_the_line(env, line, expected):
    message = refusal({"build": line}, env)
    assert message.startswith("input 'build'")
    assert expected in message


def test_an_image_built_twice_or_also_listed_in_images_is_refused(env):
    twice = refusal({"build": "app/api=acme/api\napp/worker=docker.io/acme/api"}, env)
    assert "builds docker.io/acme/api twice" in twice
    both = refusal({"build": "app/api=acme/api", "images": "index.docker.io/acme/api:v1"}, env)
    assert "builds docker.io/acme/api, which 'images' lists too" in both


def test_building_without_any_tag_is_refused(env):
    del env["GITHUB_SHA"]
    assert "input 'build' needs a tag" in refusal({"build": "app/api=acme/api"}, env)


def test_build_args_are_name_value_lines(env):
    settings = parse_settings({"build-args": "BASE_IMAGE=python:3.12-slim\n APP_VERSION = 1.0 \n"}, env)
    assert settings.build_args == (("BASE_IMAGE", "python:3.12-slim"), ("APP_VERSION", "1.0"))
    assert "input 'build-args': each line must be NAME=VALUE" in refusal({"build-args": "1BAD=x"}, env)


def test_registry_login_is_parsed_and_docker_hub_is_the_default(env):
    hub = parse_settings({"registry-username": "bot", "registry-password": SECRET + "\n"}, env).registry
    assert hub is not None
    assert (hub.registry, hub.username, hub.password) == ("docker.io", "bot", SECRET)
    ghcr = parse_settings(
        {"registry": "https://ghcr.io/", "registry-username": "bot", "registry-password": SECRET}, env
    ).registry
    assert ghcr is not None and ghcr.registry == "ghcr.io"
    local = parse_settings(
        {"registry": "localhost:5000", "registry-username": "bot", "registry-password": SECRET}, env
    ).registry
    assert local is not None and local.registry == "localhost:5000"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"registry-username": "bot"}, "input 'registry-password' is required"),
        ({"registry-password": SECRET}, "input 'registry-username' is required"),
        ({"registry": "ghcr.io"}, "input 'registry' ('ghcr.io') needs 'registry-username'"),
        (
            {"registry": "not a host", "registry-username": "bot", "registry-password": SECRET},
            "input 'registry' must be a registry host",
        ),
        (
            {"registry-username": "bot", "registry-password": SECRET + "\x00tail"},
            "input 'registry-password' must be 1 to 16384 characters",
        ),
    ],
)
def test_bad_logins_are_refused_and_the_password_is_never_in_the_message(env, raw, expected):
    message = refusal(raw, env)
    assert expected in message
    assert SECRET not in message


def test_the_password_is_not_in_the_settings_repr(env):
    settings = parse_settings({"registry-username": "bot", "registry-password": SECRET}, env)
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings.registry)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({}, "auto"),
        ({"verify-images": "true"}, "true"),
        ({"verify-images": "FALSE", "build": "app/api=acme/api"}, "false"),
        ({"build": "app/api=acme/api"}, "auto"),
        ({"verify-images": " Auto ", "images": "acme/api:v1"}, "auto"),
    ],
)
def test_verify_images_is_auto_by_default_whether_or_not_the_step_builds(env, raw, expected):
    assert parse_settings(raw, env).verify_images == expected


def test_verify_images_takes_only_auto_true_or_false(env):
    message = refusal({"verify-images": "yes"}, env)
    assert message == "input 'verify-images' must be auto, true or false, got 'yes'"


def test_docker_hub_short_names_mean_library_images_on_docker_io():
    redis = parse_image("redis:7")
    assert (image_registry(redis), image_path(redis)) == ("docker.io", "library/redis")
    acme = parse_image("index.docker.io/acme/api:v1")
    assert (image_registry(acme), image_path(acme)) == ("docker.io", "acme/api")
    local = parse_image("localhost:5000/team/api@sha256:" + "a" * 64)
    assert (image_registry(local), image_path(local)) == ("localhost:5000", "team/api")


def test_only_loopback_registries_count_as_loopback():
    assert is_loopback("127.0.0.1:5000") and is_loopback("localhost:5000") and is_loopback("127.8.9.1")
    assert not is_loopback("registry.example.com:5000")
    assert not is_loopback("10.0.0.5:5000")
    assert not is_loopback("localhost.example.com")


def test_action_yml_declares_the_build_and_registry_inputs_and_the_images_output():
    action = yaml.safe_load((REPO / "action.yml").read_text())
    for name in MY_INPUTS:
        assert name in action["inputs"], name
        assert action["inputs"][name].get("default", "") == INPUTS[name][0], name
        assert action["inputs"][name]["description"].strip(), name
    assert "images" in action["outputs"]


def test_start_up_does_not_import_the_docker_sdk():
    code = (
        "import sys, deploykit.cli, deploykit.deploy, deploykit.inputs, deploykit.registry, "
        "deploykit.build; print('docker' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert proc.stdout.strip() == "False"


def test_registries_are_asked_over_https_and_docker_hub_at_its_api_host():
    assert RegistryClient("docker.io", None).base_url() == "https://registry-1.docker.io"
    assert RegistryClient("index.docker.io", None).base_url() == "https://registry-1.docker.io"
    assert RegistryClient("ghcr.io", None).base_url() == "https://ghcr.io"
    # a port does not make a registry insecure: plain HTTP only on the loopback interface
    assert RegistryClient("registry.example.com:5000", None).base_url() == "https://registry.example.com:5000"
