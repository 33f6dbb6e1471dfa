"""Image references: parsing as Docker does, matching by canonical repository, and pinning."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from deploykit.images import ImageRef, parse_image, pin_images
from deploykit.inputs import parse_settings

DIGEST = "sha256:" + "ab" * 32


def pins_for(*references: str) -> dict[str, ImageRef]:
    refs = [parse_image(r) for r in references]
    return {ref.canonical_repository: ref for ref in refs}


# parsing


@pytest.mark.parametrize(
    ("reference", "domain", "path", "tag", "digest", "canonical"),
    [
        ("redis:7", "", "redis", "7", "", "docker.io/library/redis"),
        ("redis", "", "redis", "", "", "docker.io/library/redis"),
        ("bitnami/redis:7.2", "", "bitnami/redis", "7.2", "", "docker.io/bitnami/redis"),
        ("docker.io/library/redis:7", "docker.io", "library/redis", "7", "", "docker.io/library/redis"),
        ("docker.io/redis", "docker.io", "redis", "", "", "docker.io/library/redis"),
        (
            "index.docker.io/library/redis",
            "index.docker.io",
            "library/redis",
            "",
            "",
            "docker.io/library/redis",
        ),
        ("localhost:5000/app", "localhost:5000", "app", "", "", "localhost:5000/app"),
        ("localhost:5000/team/app:1.2", "localhost:5000", "team/app", "1.2", "", "localhost:5000/team/app"),
        ("localhost/app:v1", "localhost", "app", "v1", "", "localhost/app"),
        ("registry.example.com:8443/a/b/c:v_1-2", "registry.example.com:8443", "a/b/c", "v_1-2", "", None),
        ("ghcr.io/acme/api@" + DIGEST, "ghcr.io", "acme/api", "", DIGEST, "ghcr.io/acme/api"),
        ("ghcr.io/acme/api:v1@" + DIGEST, "ghcr.io", "acme/api", "v1", DIGEST, "ghcr.io/acme/api"),
        ("123456789012.dkr.ecr.eu-west-1.amazonaws.com/api:abc", None, "api", "abc", "", None),
    ],
)
def test_references_parse_like_docker(reference, domain, path, tag, digest, canonical):
    ref = parse_image(reference)
    if domain is not None:
        assert ref.domain == domain
    assert (ref.path, ref.tag, ref.digest) == (path, tag, digest)
    if canonical is not None:
        assert ref.canonical_repository == canonical
    assert str(ref) == reference


def test_a_single_name_with_a_port_like_suffix_is_a_tag_not_a_registry():
    ref = parse_image("localhost:5000")
    assert (ref.domain, ref.path, ref.tag) == ("", "localhost", "5000")


@pytest.mark.parametrize(
    "reference",
    [
        "",
        "Redis:7",
        "redis:",
        "redis:-7",
        "redis:.7",
        "redis:7 ",
        "redis:7\n",
        "redis:vé",
        "redis:" + "a" * 129,
        "a//b",
        "/redis",
        "redis/",
        "https://ghcr.io/acme/api",
        "ghcr.io/acme/api@sha256:abc",
        "ghcr.io/acme/api@" + DIGEST + ":v1",
        "ghcr.io/acme/api:v1;id",
        "ghcr.io/acme/$(id)",
        "-registry.io/app",
        "a/" + "b" * 260,
    ],
)
def test_invalid_references_are_refused(reference):
    with pytest.raises(ValueError):
        parse_image(reference)


def test_with_tag_keeps_repository_and_digest():
    assert str(parse_image("localhost:5000/app").with_tag("v9")) == "localhost:5000/app:v9"


# canonical matching


@pytest.mark.parametrize(
    ("in_manifest", "listed", "matches"),
    [
        ("redis", "docker.io/library/redis:7.2", True),
        ("library/redis:6", "redis:7.2", True),
        ("index.docker.io/library/redis:6", "redis:7.2", True),
        ("docker.io/redis:6", "redis:7.2", True),
        ("bitnami/redis:6", "redis:7.2", False),
        ("app:1", "localhost:5000/app:2", False),
        ("localhost:5000/app:1", "localhost:5000/app:2", True),
        ("localhost:5001/app:1", "localhost:5000/app:2", False),
        ("ghcr.io/acme/api@" + DIGEST, "ghcr.io/acme/api:v2", True),
        ("ghcr.io/acme/api-worker:v1", "ghcr.io/acme/api:v2", False),
    ],
)
def test_repositories_match_by_their_canonical_name(in_manifest, listed, matches):
    assert (
        parse_image(in_manifest).canonical_repository == parse_image(listed).canonical_repository
    ) is matches


# pinning


def pod_spec(image: str, init_image: str | None = None) -> dict:
    spec: dict = {"containers": [{"name": "main", "image": image}, {"name": "side", "image": "busybox:1.36"}]}
    if init_image:
        spec["initContainers"] = [{"name": "init", "image": init_image}]
    return spec


def workload(kind: str, spec: dict) -> dict:
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": "x"}, "spec": spec}


def images_of(spec: dict) -> list[str]:
    return [c["image"] for key in ("initContainers", "containers") for c in spec.get(key, [])]


def test_pinning_a_deployment_sets_containers_and_init_containers_of_the_repository():
    doc = workload("Deployment", {"replicas": 2, "template": {"spec": pod_spec("redis", "redis:6")}})
    used = pin_images(doc, pins_for("redis:7.2"))
    assert used == {"docker.io/library/redis"}
    assert images_of(doc["spec"]["template"]["spec"]) == ["redis:7.2", "redis:7.2", "busybox:1.36"]


def test_pinning_a_statefulset():
    doc = workload("StatefulSet", {"template": {"spec": pod_spec("localhost:5000/db:old")}})
    assert pin_images(doc, pins_for("localhost:5000/db:new")) == {"localhost:5000/db"}
    assert images_of(doc["spec"]["template"]["spec"]) == ["localhost:5000/db:new", "busybox:1.36"]


def test_pinning_a_cronjob_reaches_the_job_template():
    spec = {
        "schedule": "* * * * *",
        "jobTemplate": {"spec": {"template": {"spec": pod_spec("a/b:1", "a/b:1")}}},
    }
    doc = workload("CronJob", spec)
    assert pin_images(doc, pins_for("docker.io/a/b@" + DIGEST)) == {"docker.io/a/b"}
    pod = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert images_of(pod) == ["docker.io/a/b@" + DIGEST, "docker.io/a/b@" + DIGEST, "busybox:1.36"]


def test_pinning_a_pod_uses_its_own_spec():
    doc = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": pod_spec("ghcr.io/acme/api:v1"),
    }
    assert pin_images(doc, pins_for("ghcr.io/acme/api:v2")) == {"ghcr.io/acme/api"}
    assert images_of(doc["spec"]) == ["ghcr.io/acme/api:v2", "busybox:1.36"]


@pytest.mark.parametrize("kind", ["Job", "DaemonSet", "ReplicaSet"])
def test_pinning_other_kinds_with_a_pod_template(kind):
    doc = workload(kind, {"template": {"spec": pod_spec("ghcr.io/acme/api:v1")}})
    assert pin_images(doc, pins_for("ghcr.io/acme/api:v2")) == {"ghcr.io/acme/api"}


def test_pinning_leaves_other_repositories_and_objects_without_pods_alone():
    doc = workload("Deployment", {"template": {"spec": pod_spec("ghcr.io/acme/web:v1")}})
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"image": "redis"}}
    before = copy.deepcopy((doc, config))
    assert pin_images(doc, pins_for("ghcr.io/acme/api:v2")) == set()
    assert pin_images(config, pins_for("redis:7")) == set()
    assert (doc, config) == before


@pytest.mark.parametrize(
    "spec",
    [
        {"jobTemplate": "nonsense"},
        {"jobTemplate": ["a"]},
        {"jobTemplate": {"spec": "x"}},
        {"jobTemplate": {"spec": {"template": {"spec": {"containers": "redis"}}}}},
        {
            "jobTemplate": {
                "spec": {"template": {"spec": {"containers": [{"image": 7}, "x", {"image": "UP:x"}]}}}
            }
        },
    ],
)
def test_pinning_skips_malformed_objects_without_crashing(spec):
    doc = workload("CronJob", spec)
    before = copy.deepcopy(doc)
    assert pin_images(doc, pins_for("redis:7")) == set()
    assert doc == before


# an entry without a tag


def _settings(tmp_path: Path, images: str, image_tag: str = "", sha: str = ""):
    (tmp_path / "k8s" / "base").mkdir(parents=True, exist_ok=True)
    env = {"GITHUB_WORKSPACE": str(tmp_path), "AWS_REGION": "eu-west-1", "GITHUB_SHA": sha}
    return parse_settings({"images": images, "image-tag": image_tag}, env)


def test_an_entry_without_tag_gets_image_tag(tmp_path):
    settings = _settings(tmp_path, "localhost:5000/app\nredis:7", image_tag="build-42", sha="ab" * 20)
    assert [str(ref) for ref in settings.images] == ["localhost:5000/app:build-42", "redis:7"]


def test_an_entry_without_tag_gets_github_sha_when_image_tag_is_empty(tmp_path):
    settings = _settings(tmp_path, "ghcr.io/acme/api", sha="ab" * 20)
    assert str(settings.images[0]) == "ghcr.io/acme/api:" + "ab" * 20


def test_an_entry_with_only_a_digest_gets_no_tag(tmp_path):
    settings = _settings(tmp_path, "ghcr.io/acme/api@" + DIGEST, image_tag="v1")
    assert str(settings.images[0]) == "ghcr.io/acme/api@" + DIGEST
