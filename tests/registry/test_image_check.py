"""The pre-flight image check against real registries: Debian's docker-registry on 127.0.0.1,
once over plain HTTP and once over TLS with an htpasswd login.

The images in the registries are pushed with the docker CLI (not the action), from a tiny
`FROM scratch` image, so these tests check the action against what the registry really holds.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest

from deploykit import registry as registry_module
from deploykit.errors import ImageMissing, ImageUnverified, RegistryLoginFailed, RegistryUnavailable
from deploykit.github import Workflow
from deploykit.images import parse_image
from deploykit.registry import RegistryLogin, check_images
from tests.registry.conftest import Registry, bearer_digest, free_port, push_seed

pytestmark = pytest.mark.registry


@pytest.fixture(scope="module")
def plain_seed(plain_registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    return push_seed(plain_registry, tmp_path_factory.mktemp("plain-seed"))


@pytest.fixture(scope="module")
def tls_seed(tls_registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    return push_seed(tls_registry, tmp_path_factory.mktemp("tls-seed"))


@pytest.fixture
def gh() -> Iterator[tuple[Workflow, io.StringIO]]:
    out = io.StringIO()
    yield Workflow({}, out), out


def test_an_image_on_a_registry_with_a_port_is_found_with_its_digest(plain_registry, plain_seed, gh):
    workflow, out = gh
    ref = parse_image(plain_seed)
    expected = plain_registry.digest("acme/seed", "v1")

    described = check_images([ref], None, workflow, verify="true")

    assert described == [f"{plain_seed}@{expected}"]
    assert f"Found {plain_seed} in {plain_registry.host} ({expected})" in out.getvalue()


def test_an_image_given_by_digest_is_found_by_that_digest(plain_registry, plain_seed, gh):
    digest = plain_registry.digest("acme/seed", "v1")
    ref = parse_image(f"{plain_registry.host}/acme/seed@{digest}")
    assert check_images([ref], None, gh[0], verify="true") == [str(ref)]


def test_a_missing_tag_stops_with_a_message_naming_the_image_and_the_tag(plain_registry, plain_seed, gh):
    ref = parse_image(f"{plain_registry.host}/acme/seed:never-pushed")
    with pytest.raises(ImageMissing) as caught:
        check_images([ref], None, gh[0], verify="true")
    assert caught.value.message == (
        f"image {ref} is not in its registry: {plain_registry.host} has no tag never-pushed for "
        "acme/seed; the cluster could not pull it"
    )
    assert "Push the image first" in (caught.value.fix or "")


def test_a_missing_repository_and_a_missing_digest_are_refused_too(plain_registry, plain_seed, gh):
    with pytest.raises(ImageMissing, match="has no tag v1 for acme/nothing-here"):
        check_images([parse_image(f"{plain_registry.host}/acme/nothing-here:v1")], None, gh[0], verify="true")
    absent = "sha256:" + "0" * 64
    with pytest.raises(ImageMissing, match=f"has no digest {absent} for acme/seed"):
        check_images([parse_image(f"{plain_registry.host}/acme/seed@{absent}")], None, gh[0], verify="true")


def test_without_verification_the_references_keep_only_the_digests_known(plain_registry, gh):
    refs = [parse_image(f"{plain_registry.host}/acme/never:v1"), parse_image("redis:7")]
    known = {f"{plain_registry.host}/acme/never:v1": "sha256:" + "1" * 64}
    described = check_images(refs, None, gh[0], verify="false", known=known)
    assert described == [f"{plain_registry.host}/acme/never:v1@sha256:{'1' * 64}", "redis:7"]


def test_a_registry_with_a_login_over_tls_is_checked_with_that_login(tls_registry, tls_seed, gh):
    login = RegistryLogin(tls_registry.host, tls_registry.username, tls_registry.password)
    expected = tls_registry.digest("acme/seed", "v1")
    assert check_images([parse_image(tls_seed)], login, gh[0], verify="true") == [f"{tls_seed}@{expected}"]
    with pytest.raises(ImageMissing, match="has no tag v2 for acme/seed"):
        check_images([parse_image(f"{tls_registry.host}/acme/seed:v2")], login, gh[0], verify="true")


def test_a_wrong_password_is_a_clear_error_without_the_password(tls_registry, tls_seed, gh):
    wrong = "wrong-" + tls_registry.password
    login = RegistryLogin(tls_registry.host, tls_registry.username, wrong)
    with pytest.raises(RegistryLoginFailed) as caught:
        check_images([parse_image(tls_seed)], login, gh[0], verify="true")
    message = caught.value.message
    assert message.startswith(
        f"registry {tls_registry.host} refused the login of user '{tls_registry.username}'"
    )
    assert "wrong password or token" in message
    assert wrong not in message and wrong not in (caught.value.fix or "")
    assert wrong not in gh[1].getvalue()


def test_an_image_behind_a_login_the_step_lacks_is_a_warning_with_auto(tls_registry, tls_seed, gh):
    workflow, out = gh
    assert check_images([parse_image(tls_seed)], None, workflow, verify="auto") == [tls_seed]
    assert "::warning title=Image not verified::" in out.getvalue()
    assert f"registry {tls_registry.host} lets no anonymous client read acme/seed" in out.getvalue()


def test_a_login_for_another_registry_is_not_sent(tls_registry, tls_seed, gh):
    login = RegistryLogin("ghcr.io", tls_registry.username, tls_registry.password)
    check_images([parse_image(tls_seed)], login, gh[0], verify="auto")
    assert "Image not verified" in gh[1].getvalue()
    with pytest.raises(ImageUnverified):
        check_images([parse_image(tls_seed)], login, gh[0], verify="true")


def test_a_certificate_the_machine_does_not_trust_is_named(tls_registry, tls_seed, gh, tmp_path, monkeypatch):
    monkeypatch.setattr(registry_module, "DOCKER_CERTS_DIR", tmp_path / "empty-certs.d")
    login = RegistryLogin(tls_registry.host, tls_registry.username, tls_registry.password)
    with pytest.raises(RegistryUnavailable) as caught:
        check_images([parse_image(tls_seed)], login, gh[0], verify="true")
    assert f"registry {tls_registry.host} presented a certificate this machine does not trust" in (
        caught.value.message
    )
    assert f"/etc/docker/certs.d/{tls_registry.host}/ca.crt" in caught.value.message


def test_a_registry_that_does_not_answer_is_named(gh):
    host = f"127.0.0.1:{free_port()}"
    with pytest.raises(RegistryUnavailable, match=f"registry {host} did not answer"):
        check_images([parse_image(f"{host}/acme/api:v1")], None, gh[0], verify="true")


# Token auth (Docker Hub, GHCR): the registry's challenge names a token service


def test_a_bearer_registry_is_checked_with_a_token_got_with_the_login(token_registry, token_seeds, gh):
    registry, tokens = token_registry
    private, _ = token_seeds
    login = RegistryLogin(registry.host, tokens.username, tokens.password)
    expected = bearer_digest(registry, tokens, "acme/seed", "v1")

    assert check_images([parse_image(private)], login, gh[0], verify="true") == [f"{private}@{expected}"]
    assert {"user": tokens.username, "scope": "repository:acme/seed:pull"} in tokens.requests
    with pytest.raises(ImageMissing, match="has no tag v9 for acme/seed"):
        check_images([parse_image(f"{registry.host}/acme/seed:v9")], login, gh[0], verify="true")


def test_a_bearer_registry_takes_anonymous_clients_for_public_images(token_registry, token_seeds, gh):
    registry, tokens = token_registry
    _, public = token_seeds
    expected = bearer_digest(registry, tokens, "public/seed", "v1")
    assert check_images([parse_image(public)], None, gh[0], verify="true") == [f"{public}@{expected}"]
    with pytest.raises(ImageMissing, match="has no tag v9 for public/seed"):
        check_images([parse_image(f"{registry.host}/public/seed:v9")], None, gh[0], verify="true")


def test_a_bearer_registry_that_refuses_the_login_is_a_clear_error(token_registry, token_seeds, gh):
    registry, tokens = token_registry
    private, _ = token_seeds
    wrong = "wrong-" + tokens.password
    with pytest.raises(RegistryLoginFailed) as caught:
        check_images(
            [parse_image(private)], RegistryLogin(registry.host, tokens.username, wrong), gh[0], verify="true"
        )
    assert caught.value.message.startswith(f"registry {registry.host} refused the login of user 'ci-bearer'")
    assert wrong not in caught.value.message


def test_a_private_image_on_a_bearer_registry_without_login_is_a_warning_with_auto(
    token_registry, token_seeds, gh
):
    private, public = token_seeds
    workflow, out = gh
    registry, tokens = token_registry
    described = check_images([parse_image(private), parse_image(public)], None, workflow, verify="auto")
    assert described[0] == private  # not checked: no digest to add
    # a login is wanted per repository: the public one on the same registry is still checked
    assert described[1] == f"{public}@{bearer_digest(registry, tokens, 'public/seed', 'v1')}"
    warning = out.getvalue()
    assert warning.count("::warning title=Image not verified::Could not check") == 1
    assert "the deploy goes on" in warning
    assert "Give this step a login for" in warning
    assert "verify-images: auto" not in warning


def test_a_private_image_on_a_bearer_registry_without_login_fails_with_true(token_registry, token_seeds, gh):
    registry, _ = token_registry
    private, _ = token_seeds
    with pytest.raises(ImageUnverified) as caught:
        check_images([parse_image(private)], None, gh[0], verify="true")
    assert caught.value.message.startswith(f"could not check {private}: registry {registry.host}")
    assert "'registry-username'" in (caught.value.fix or "")


def test_a_registry_that_does_not_answer_is_a_warning_with_auto_and_asked_once(gh):
    host = f"127.0.0.1:{free_port()}"
    workflow, out = gh
    refs = [parse_image(f"{host}/acme/api:v1"), parse_image(f"{host}/acme/worker:v1")]
    assert check_images(refs, None, workflow, verify="auto") == [str(ref) for ref in refs]
    text = out.getvalue()
    assert text.count("::warning title=Image not verified::") == 1, text
    assert f"Could not check the images on {host}: registry {host} did not answer" in text
    assert f"Not checked: {host}/acme/worker:v1" in text


def test_verify_false_asks_no_registry(gh):
    def refuse(request, host):  # type: ignore[no-untyped-def]
        raise AssertionError(f"asked {host}")

    workflow, out = gh
    ref = parse_image("ghcr.io/acme/api:v1")
    assert check_images([ref], None, workflow, verify="false", transport=refuse) == [str(ref)]
    assert out.getvalue() == ""
