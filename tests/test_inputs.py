"""Inputs: how they are read from the runner's environment, their defaults, and every refusal.

Each refusal must name the input, the rule and the value, so a user can fix the workflow file
from the message alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from deploykit.errors import InputError
from deploykit.images import ImageRef
from deploykit.inputs import INPUTS, parse_settings, read_action_inputs

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "k8s" / "base").mkdir(parents=True)
    (root / "k8s" / "base" / "app.yaml").write_text("kind: ConfigMap\n")
    return root.resolve()


@pytest.fixture
def env(workspace: Path) -> dict[str, str]:
    return {"GITHUB_WORKSPACE": str(workspace), "AWS_REGION": "eu-west-1", "GITHUB_SHA": SHA}


def refusal(raw: dict[str, str], env: dict[str, str]) -> str:
    with pytest.raises(InputError) as caught:
        parse_settings(raw, env)
    return caught.value.message


# reading INPUT_* variables


def test_read_action_inputs_takes_the_runners_hyphenated_names():
    raw = read_action_inputs({"INPUT_AWS-REGION": "eu-west-1", "INPUT_INSTANCE-TAG-KEY": "Role"})
    assert raw == {"aws-region": "eu-west-1", "instance-tag-key": "Role"}


def test_read_action_inputs_takes_underscore_names_too():
    raw = read_action_inputs({"INPUT_AWS_REGION": "eu-west-1", "INPUT_IMAGE_TAG": "v1"})
    assert raw == {"aws-region": "eu-west-1", "image-tag": "v1"}


def test_read_action_inputs_prefers_the_hyphenated_name_and_falls_back_when_it_is_empty():
    both = read_action_inputs({"INPUT_AWS-REGION": "eu-west-1", "INPUT_AWS_REGION": "us-east-1"})
    fallback = read_action_inputs({"INPUT_AWS-REGION": "", "INPUT_AWS_REGION": "us-east-1"})
    assert both == {"aws-region": "eu-west-1"}
    assert fallback == {"aws-region": "us-east-1"}


def test_read_action_inputs_leaves_out_empty_and_unknown_variables():
    raw = read_action_inputs({"INPUT_TIMEOUT": "", "INPUT_BUCKET": "  ", "INPUT_SOMETHING": "x", "HOME": "/"})
    assert raw == {}


def test_empty_values_mean_the_default(env):
    settings = parse_settings({"timeout": "", "rollback": "  ", "kubectl": "", "namespace": ""}, env)
    assert settings.timeout == 600
    assert settings.rollback is True
    assert settings.kubectl == ("kubectl",)
    assert settings.namespace == "production-platform"


def test_defaults_table(env, workspace):
    settings = parse_settings({}, env)
    assert settings.aws_region == "eu-west-1"
    assert settings.instance_id is None
    assert settings.instance_tag == "*k3s-master*"
    assert settings.instance_tag_key == "Name"
    assert settings.workspace == workspace
    assert settings.manifests == workspace / "k8s" / "base"
    assert settings.namespace == "production-platform"
    assert settings.images == ()
    assert settings.timeout == 600
    assert settings.rollback is True
    assert settings.rollback_timeout == 120
    assert settings.cleanup is True
    assert settings.bucket is None
    assert settings.kubectl == ("kubectl",)
    assert settings.request_timeout == "60s"
    assert settings.kubectl_validate is False
    assert settings.build_cache is False
    assert settings.commit == SHA
    assert {name: default for name, (default, _) in INPUTS.items() if default} == {
        "instance-tag": "*k3s-master*",
        "instance-tag-key": "Name",
        "manifests": "k8s/base",
        "namespace": "production-platform",
        "timeout": "600",
        "rollback": "true",
        "rollback-timeout": "120",
        "cleanup": "true",
        "kubectl": "kubectl",
        "request-timeout": "60s",
        "kubectl-validate": "false",
        "build-cache": "false",
        "verify-images": "auto",
        "fleet": "false",
        "max-concurrency": "50",
        "max-errors": "0",
        "cluster-tag-key": "k3s-cluster",
        "delivery": "s3",
        "transport": "ssm",
        "dry-run": "false",
        "server-dry-run": "true",
        "lock-timeout": "300",
        "prune": "false",
        "progress": "true",
    }


def test_given_values_are_parsed(env, workspace):
    settings = parse_settings(
        {
            "instance-id": "i-0123456789abcdef0",
            "manifests": "k8s/base/app.yaml",
            "timeout": "900",
            "rollback": "FALSE",
            "cleanup": "false",
            "bucket": "my-deploy-bucket",
            "kubectl": "k3s kubectl",
            "request-timeout": "2m",
            "kubectl-validate": "true",
        },
        env,
    )
    assert settings.instance_id == "i-0123456789abcdef0"
    assert settings.manifests == workspace / "k8s" / "base" / "app.yaml"
    assert settings.timeout == 900
    assert settings.rollback is False
    assert settings.cleanup is False
    assert settings.bucket == "my-deploy-bucket"
    assert settings.kubectl == ("k3s", "kubectl")
    assert settings.request_timeout == "2m"
    assert settings.kubectl_validate is True


def test_the_workspace_is_the_current_folder_without_github_workspace(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    settings = parse_settings({}, {"AWS_REGION": "eu-west-1"})
    assert settings.manifests == workspace / "k8s" / "base"


def test_run_url_is_built_from_the_runner_variables_and_dropped_when_they_look_wrong(env):
    good = {
        **env,
        "GITHUB_SERVER_URL": "https://github.com",
        "GITHUB_REPOSITORY": "acme/platform",
        "GITHUB_RUN_ID": "123",
    }
    assert parse_settings({}, good).run_url == "https://github.com/acme/platform/actions/runs/123"
    assert parse_settings({}, {**good, "GITHUB_REPOSITORY": "acme/$(id)"}).run_url == ""
    assert parse_settings({}, {**good, "GITHUB_RUN_ID": "12;3"}).run_url == ""


def test_a_commit_that_is_not_hex_is_not_recorded(env):
    assert parse_settings({"image-tag": "v1"}, {**env, "GITHUB_SHA": "main; rm -rf /"}).commit == ""


# region


def test_region_comes_from_aws_region_first(env):
    settings = parse_settings({}, {**env, "AWS_REGION": "eu-central-1", "AWS_DEFAULT_REGION": "us-west-2"})
    assert settings.aws_region == "eu-central-1"


def test_region_falls_back_to_aws_default_region(env):
    del env["AWS_REGION"]
    assert parse_settings({}, {**env, "AWS_DEFAULT_REGION": "us-west-2"}).aws_region == "us-west-2"


def test_region_input_wins_over_the_environment(env):
    assert parse_settings({"aws-region": "ap-southeast-2"}, env).aws_region == "ap-southeast-2"


def test_missing_region_is_refused_naming_the_input(env):
    del env["AWS_REGION"]
    message = refusal({}, env)
    assert "'aws-region'" in message and "required" in message and "AWS_REGION" in message


@pytest.mark.parametrize("region", ["EU-WEST-1", "eu-west", "eu_west_1", "eu-west-1; id", "eu-west-1\n"])
def test_bad_region_is_refused_naming_input_rule_and_value(env, region):
    message = refusal({}, {**env, "AWS_REGION": region})
    assert "'aws-region'" in message
    assert "region name such as eu-west-1" in message
    assert repr(region) in message


# one test per refusal


def test_timeout_with_a_unit_is_refused(env):
    message = refusal({"timeout": "10m"}, env)
    assert message == "input 'timeout' must be a whole number of seconds between 10 and 86400, got '10m'"


@pytest.mark.parametrize("value", ["5", "86401", "-1", "1e3", "²", "١٢٠", "9" * 5000])
def test_timeout_outside_the_range_or_not_ascii_digits_is_refused(env, value):
    message = refusal({"timeout": value}, env)
    assert "'timeout'" in message and "whole number of seconds between 10 and 86400" in message


def test_rollback_timeout_outside_its_range_is_refused(env):
    message = refusal({"rollback-timeout": "7200"}, env)
    assert "'rollback-timeout'" in message and "between 10 and 3600" in message and "'7200'" in message


def test_rollback_yes_is_refused(env):
    assert refusal({"rollback": "yes"}, env) == "input 'rollback' must be true or false, got 'yes'"


def test_cleanup_and_kubectl_validate_are_booleans_too(env):
    assert refusal({"cleanup": "1"}, env) == "input 'cleanup' must be true or false, got '1'"
    assert "'kubectl-validate'" in refusal({"kubectl-validate": "no"}, env)


@pytest.mark.parametrize(
    "value", ["i-123", "i-0123456789ABCDEF0", "0123456789abcdef0", "i-0123456789abcdef0 x"]
)
def test_bad_instance_id_is_refused(env, value):
    message = refusal({"instance-id": value}, env)
    assert "'instance-id'" in message and "EC2 instance id such as i-0123456789abcdef0" in message
    assert repr(value.strip()) in message


@pytest.mark.parametrize("value", ["Production", "prod_platform", "-prod", "a" * 64, "prod;id"])
def test_bad_namespace_is_refused(env, value):
    message = refusal({"namespace": value}, env)
    assert "'namespace'" in message and "Kubernetes namespace name" in message and repr(value) in message


@pytest.mark.parametrize(
    "value",
    [
        "kubectl; rm -rf /",
        "kubectl $(id)",
        "kubectl `id`",
        "k3s kubectl | tee x",
        "kubectl &",
        "kubectl 'x'",
        "a b c d e f g h i",
    ],
)
def test_kubectl_with_shell_syntax_is_refused(env, value):
    message = refusal({"kubectl": value}, env)
    assert "'kubectl'" in message and "1 to 8 words made of letters, digits and '_./:=-'" in message
    assert repr(value) in message


def test_kubectl_accepts_a_multi_word_command_with_flags(env):
    value = "sudo k3s kubectl --kubeconfig=/etc/rancher/k3s/k3s.yaml --context=default"
    assert parse_settings({"kubectl": value}, env).kubectl == tuple(value.split())


@pytest.mark.parametrize("value", ["60", "0s", "60sec", "1h", "60s;id"])
def test_bad_request_timeout_is_refused(env, value):
    message = refusal({"request-timeout": value}, env)
    assert "'request-timeout'" in message and "duration such as 60s or 2m" in message
    assert repr(value) in message


@pytest.mark.parametrize("value", ["My_Bucket", "ab", "bucket..name", "192.168.1.10", "xn--bucket"])
def test_bad_bucket_name_is_refused(env, value):
    message = refusal({"bucket": value}, env)
    assert "'bucket'" in message and "not a valid S3 bucket name (" in message and repr(value) in message


def test_image_without_tag_and_without_image_tag_or_github_sha_is_refused(env):
    del env["GITHUB_SHA"]
    message = refusal({"images": "ghcr.io/acme/api"}, env)
    assert "'images'" in message and "'ghcr.io/acme/api'" in message
    assert "has no tag" in message and "'image-tag'" in message and "GITHUB_SHA" in message


def test_an_invalid_image_reference_is_refused(env):
    message = refusal({"images": "ghcr.io/acme/API:v1"}, env)
    assert "'images'" in message and "'ghcr.io/acme/API:v1'" in message
    assert "not a valid image reference" in message


def test_the_same_repository_listed_twice_is_refused_even_when_spelled_differently(env):
    message = refusal({"images": "redis:7\ndocker.io/library/redis:7.2"}, env)
    assert "'images'" in message and "docker.io/library/redis twice" in message
    assert "redis:7" in message and "docker.io/library/redis:7.2" in message


@pytest.mark.parametrize("value", ["-v1", ".v1", "v1:2", "a" * 129, "vé"])
def test_bad_image_tag_is_refused(env, value):
    message = refusal({"image-tag": value}, env)
    assert "'image-tag'" in message and "valid image tag" in message


def test_instance_tag_with_a_newline_is_refused(env):
    message = refusal({"instance-tag": "k3s\nmaster"}, env)
    assert (
        "'instance-tag'" in message
        and "without control characters" in message
        and "'k3s\\nmaster'" in message
    )


def test_an_unknown_input_is_refused(env):
    message = refusal({"instance_tag": "x"}, env)
    assert "unknown input 'instance_tag'" in message


# manifests path


def test_manifests_leading_outside_the_workspace_with_dotdot_is_refused(env, workspace):
    (workspace.parent / "elsewhere").mkdir()
    message = refusal({"manifests": "k8s/../../elsewhere"}, env)
    assert "'manifests'" in message and "leads outside the workspace" in message
    assert "'k8s/../../elsewhere'" in message


def test_manifests_with_dotdot_staying_inside_the_workspace_is_accepted(env, workspace):
    assert parse_settings({"manifests": "k8s/../k8s/base"}, env).manifests == workspace / "k8s" / "base"


def test_an_absolute_manifests_path_is_refused(env, workspace):
    message = refusal({"manifests": str(workspace / "k8s")}, env)
    assert "'manifests'" in message and "relative to the workspace" in message
    # the value is quoted, and cut at 80 characters when longer (tmp paths vary in length)
    shown = str(workspace / "k8s")
    assert repr(shown if len(shown) <= 80 else shown[:80] + "...") in message


def test_a_manifests_symlink_leading_outside_the_workspace_is_refused(env, workspace):
    outside = workspace.parent / "secrets"
    outside.mkdir()
    (workspace / "k8s" / "link").symlink_to(outside)
    message = refusal({"manifests": "k8s/link"}, env)
    assert "'manifests'" in message and "leads outside the workspace" in message and "'k8s/link'" in message


def test_a_missing_manifests_path_is_refused_with_the_checkout_hint(env):
    message = refusal({"manifests": "deploy/k8s"}, env)
    assert "'manifests'" in message and "names nothing in the workspace" in message
    assert "'deploy/k8s'" in message and "actions/checkout" in message


# images and image-tag


def test_images_are_split_on_newlines_and_commas(env):
    settings = parse_settings({"images": "ghcr.io/acme/api:v1, redis:7\n\n localhost:5000/web:v2 \n"}, env)
    assert [str(ref) for ref in settings.images] == [
        "ghcr.io/acme/api:v1",
        "redis:7",
        "localhost:5000/web:v2",
    ]


def test_image_tag_defaults_to_github_sha(env):
    settings = parse_settings({"images": "ghcr.io/acme/api"}, env)
    assert settings.images == (ImageRef("ghcr.io", "acme/api", SHA),)


# -- transport, dry run, server dry run, lock --------------------------------------------------


def test_local_transport_needs_no_region_and_takes_a_kubeconfig_in_the_workspace(workspace):
    (workspace / ".kube").mkdir()
    (workspace / ".kube" / "config").write_text("apiVersion: v1\nkind: Config\n")
    env = {"GITHUB_WORKSPACE": str(workspace)}

    settings = parse_settings({"transport": "LOCAL", "kubeconfig": ".kube/config"}, env)

    assert (settings.transport, settings.aws_region) == ("local", "")
    assert settings.kubeconfig == (workspace / ".kube" / "config").resolve()
    assert (settings.dry_run, settings.server_dry_run, settings.lock_timeout) == (False, True, 300)


@pytest.mark.parametrize(("value", "message"), [
    ("/etc/kubeconfig", "must be a path relative to the workspace"),
    ("../outside", "leads outside the workspace"),
    ("missing.yaml", "names no file in the workspace"),
])
def test_a_bad_kubeconfig_is_refused(workspace, value, message):
    with pytest.raises(InputError, match=message):
        parse_settings({"transport": "local", "kubeconfig": value},
                       {"GITHUB_WORKSPACE": str(workspace)})


def test_local_transport_without_any_kubeconfig_says_how_to_give_one(workspace, tmp_path):
    env = {"GITHUB_WORKSPACE": str(workspace), "HOME": str(tmp_path / "home"),
           "KUBECONFIG": str(tmp_path / "nothing-here")}
    with pytest.raises(InputError, match="transport 'local' needs a kubeconfig"):
        parse_settings({"transport": "local"}, env)
    (tmp_path / "there").write_text("apiVersion: v1\n")
    settings = parse_settings({"transport": "local"},
                              {**env, "KUBECONFIG": f"{tmp_path / 'nothing-here'}:{tmp_path / 'there'}"})
    assert settings.kubeconfig is None  # KUBECONFIG is used as it is


@pytest.mark.parametrize(("name", "value", "message"), [
    ("transport", "ssh", "input 'transport' must be one of ssm, local"),
    ("dry-run", "yes", "input 'dry-run' must be true or false"),
    ("server-dry-run", "0", "input 'server-dry-run' must be true or false"),
    ("lock-timeout", "-1", "input 'lock-timeout' must be a whole number of seconds between 0 and 3600"),
    ("lock-timeout", "5m", "input 'lock-timeout' must be a whole number"),
])
def test_bad_transport_dry_run_and_lock_values_are_refused(env, workspace, name, value, message):
    with pytest.raises(InputError, match=message):
        parse_settings({name: value}, env)


def test_ssm_transport_still_needs_a_region(workspace):
    with pytest.raises(InputError, match="input 'aws-region' is required"):
        parse_settings({}, {"GITHUB_WORKSPACE": str(workspace)})


def test_prune_is_off_by_default_and_the_release_is_the_repository_and_the_manifests_path(env):
    settings = parse_settings({}, {**env, "GITHUB_REPOSITORY": "acme/shop"})
    assert settings.prune == "false"
    assert settings.release == "acme/shop:k8s/base"
    assert len(settings.release_id()) == 20 and int(settings.release_id(), 16) >= 0
    other = parse_settings({"manifests": "k8s"}, {**env, "GITHUB_REPOSITORY": "acme/shop"})
    assert other.release == "acme/shop:k8s" and other.release_id() != settings.release_id()
    named = parse_settings({"prune": " ALL ", "release": "shop@eu-west-1"}, env)
    assert (named.prune, named.release) == ("all", "shop@eu-west-1")


@pytest.mark.parametrize("bad", ["-starts-with-a-dash", "has space", "semi;colon", "x" * 201, "line\nbreak"])
def test_a_release_name_that_is_not_plain_is_refused(env, bad):
    assert refusal({"release": bad}, env).startswith("input 'release' must be 1 to 200 letters")


def test_prune_takes_only_false_true_or_all(env):
    assert refusal({"prune": "yes"}, env) == "input 'prune' must be one of false, true, all, got 'yes'"
