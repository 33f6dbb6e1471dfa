"""The bundle: read and check the manifests, sort them into apply phases, pack them reproducibly."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml

from deploykit.errors import ManifestError
from deploykit.images import parse_image
from deploykit.render import FIXED_MTIME, build_bundle

NAMESPACE = """\
apiVersion: v1
kind: Namespace
metadata:
  name: production-platform
"""
CONFIG = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: api-config
  namespace: production-platform
data:
  LOG_LEVEL: info
"""
REDIS = """\
apiVersion: v1
kind: Service
metadata:
  name: redis
  namespace: production-platform
spec:
  ports: [{port: 6379}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: redis
  namespace: production-platform
spec:
  template:
    spec:
      containers: [{name: redis, image: "redis:7"}]
"""
API = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: api
  namespace: production-platform
spec:
  template:
    spec:
      initContainers: [{name: migrate, image: ghcr.io/acme/api:latest}]
      containers: [{name: api, image: ghcr.io/acme/api:latest}]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: worker
spec:
  template:
    spec:
      containers: [{name: worker, image: "localhost:5000/worker:dev"}]
"""


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = (tmp_path / "repo").resolve()
    # File names sort the Deployments first and the Namespace last: phases, not names, decide.
    write(
        root,
        {
            "k8s/a-api.yaml": API,
            "k8s/b-redis.yml": REDIS,
            "k8s/config/c-config.yaml": CONFIG,
            "k8s/z-namespace.yaml": NAMESPACE,
            "k8s/README.md": "not a manifest",
        },
    )
    return root


def members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def bundle(workspace: Path, images: str = "", path: str = "k8s"):
    refs = [parse_image(r) for r in images.split(",") if r]
    return build_bundle(workspace / path, workspace, refs)


# determinism


def test_the_same_manifests_give_the_same_bytes_and_sha256(workspace):
    first, second = bundle(workspace), bundle(workspace)
    assert first.data == second.data
    assert first.sha256 == second.sha256 == hashlib.sha256(first.data).hexdigest()


def test_file_mtimes_and_the_workspace_location_do_not_change_the_bytes(workspace, tmp_path):
    before = bundle(workspace)
    for path in (workspace / "k8s").rglob("*.y*ml"):
        os.utime(path, (1_000_000_000, 1_000_000_000))
    copy = tmp_path / "elsewhere"
    shutil.copytree(workspace, copy)
    for path in (copy / "k8s").rglob("*.y*ml"):
        os.utime(path, (2_000_000_000, 2_000_000_000))
    assert bundle(workspace).data == before.data
    assert bundle(copy.resolve()).data == before.data


def test_tar_entries_are_sorted_with_fixed_mtime_and_root_owner(workspace):
    with tarfile.open(fileobj=io.BytesIO(bundle(workspace).data), mode="r:gz") as tar:
        entries = tar.getmembers()
    names = [e.name for e in entries]
    assert names == sorted(names)
    assert {(e.mtime, e.uid, e.gid, e.mode) for e in entries} == {(FIXED_MTIME, 0, 0, 0o644)}


# phases


def test_phase_files_apply_namespace_config_service_statefulset_then_deployments(workspace):
    files = members(bundle(workspace).data)
    assert sorted(files) == [
        "bundle/1-namespaces.yaml",
        "bundle/2-config.yaml",
        "bundle/3-services.yaml",
        "bundle/4-statefulsets.yaml",
        "bundle/6-workloads.yaml",
        "bundle/objects.tsv",
        "bundle/workloads.tsv",
    ]
    order = [
        (doc["kind"], doc["metadata"]["name"])
        for name in sorted(files)
        if name.endswith(".yaml")
        for doc in yaml.safe_load_all(files[name])
    ]
    assert order == [
        ("Namespace", "production-platform"),
        ("ConfigMap", "api-config"),
        ("Service", "redis"),
        ("StatefulSet", "redis"),
        ("Deployment", "api"),
        ("Deployment", "worker"),
    ]


def test_phase_files_without_documents_are_left_out(workspace):
    files = members(bundle(workspace, path="k8s/a-api.yaml").data)
    assert sorted(files) == ["bundle/6-workloads.yaml", "bundle/objects.tsv", "bundle/workloads.tsv"]


def test_objects_tsv_indexes_every_object_with_the_kind_a_crd_defines(workspace):
    (workspace / "k8s" / "crd.yaml").write_text(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\n"
        "metadata: {name: widgets.example.com}\n"
        "spec: {group: example.com, scope: Namespaced, names: {kind: Widget, plural: widgets}}\n"
    )
    tsv = members(bundle(workspace).data)["bundle/objects.tsv"].decode()
    lines = tsv.splitlines()
    assert "CustomResourceDefinition\t\twidgets.example.com\tWidget" in lines
    assert "Namespace\t\tproduction-platform\t" in lines
    assert "Deployment\t\tworker\t" in lines
    assert len(lines) == 7


def test_workloads_tsv_lists_statefulsets_then_deployments_with_an_empty_namespace_when_none(workspace):
    result = bundle(workspace)
    tsv = members(result.data)["bundle/workloads.tsv"].decode()
    assert tsv == (
        "statefulset\tproduction-platform\tredis\n"
        "deployment\tproduction-platform\tapi\n"
        "deployment\t\tworker\n"
    )
    assert result.workloads == (
        ("statefulset", "production-platform", "redis"),
        ("deployment", "production-platform", "api"),
        ("deployment", "", "worker"),
    )


LOG_SHIPPER = """\
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: log-shipper
  namespace: production-platform
spec:
  template:
    spec:
      containers: [{name: shipper, image: "fluent-bit:3"}]
"""


def test_daemonsets_are_watched_in_the_deployments_phase_in_the_manifests_order(workspace):
    # Between the two Deployments of one file: phase 6 applies them in that order.
    write(workspace, {"k8s/a-api.yaml": API.replace("---\n", "---\n" + LOG_SHIPPER + "---\n", 1)})
    result = bundle(workspace)
    files = members(result.data)
    assert result.workloads == (
        ("statefulset", "production-platform", "redis"),
        ("deployment", "production-platform", "api"),
        ("daemonset", "production-platform", "log-shipper"),
        ("deployment", "", "worker"),
    )
    tsv = files["bundle/workloads.tsv"].decode().splitlines()
    assert tsv[2] == "daemonset\tproduction-platform\tlog-shipper"
    documents = yaml.safe_load_all(files["bundle/6-workloads.yaml"])
    phase6 = [(d["kind"], d["metadata"]["name"]) for d in documents]
    assert phase6 == [("Deployment", "api"), ("DaemonSet", "log-shipper"), ("Deployment", "worker")]


def test_pinned_images_are_in_the_bundle(workspace):
    files = members(bundle(workspace, "ghcr.io/acme/api:abc123,localhost:5000/worker:v2,redis:7.2").data)
    deployments = list(yaml.safe_load_all(files["bundle/6-workloads.yaml"]))
    api, worker = (d["spec"]["template"]["spec"] for d in deployments)
    assert api["initContainers"][0]["image"] == api["containers"][0]["image"] == "ghcr.io/acme/api:abc123"
    assert worker["containers"][0]["image"] == "localhost:5000/worker:v2"
    statefulset = yaml.safe_load(files["bundle/4-statefulsets.yaml"])
    assert statefulset["spec"]["template"]["spec"]["containers"][0]["image"] == "redis:7.2"


def test_a_single_file_and_empty_documents_are_fine(workspace):
    write(workspace, {"one.yaml": "---\n# only a comment\n---\n" + CONFIG + "---\n"})
    result = bundle(workspace, path="one.yaml")
    assert [m.source for m in result.manifests] == ["one.yaml, document 2"]


# refusals


@pytest.mark.parametrize(
    ("second_document", "missing"),
    [
        ("kind: ConfigMap\nmetadata: {name: x}\n", "missing apiVersion"),
        ("apiVersion: v1\nmetadata: {name: x}\n", "missing kind"),
        ("apiVersion: v1\nkind: ConfigMap\nmetadata: {namespace: x}\n", "missing metadata.name"),
        ("apiVersion: v1\nkind: ConfigMap\nmetadata: [x]\n", "missing metadata.name"),
        ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ''}\n", "missing metadata.name"),
        ("data: {}\n", "missing apiVersion, kind, metadata.name"),
    ],
)
def test_a_document_without_required_fields_is_named_by_file_and_number(workspace, second_document, missing):
    write(workspace, {"k8s/config/c-config.yaml": CONFIG + "---\n" + second_document})
    with pytest.raises(ManifestError) as caught:
        bundle(workspace)
    assert caught.value.message == f"k8s/config/c-config.yaml, document 2: {missing}"


@pytest.mark.parametrize(
    ("text", "type_name"), [("- a\n- b\n", "list"), ("just text\n", "str"), ("42\n", "int")]
)
def test_a_document_that_is_not_a_mapping_is_refused(workspace, text, type_name):
    write(workspace, {"k8s/bad.yaml": text})
    with pytest.raises(ManifestError) as caught:
        bundle(workspace)
    assert caught.value.message == (
        f"k8s/bad.yaml, document 1: a Kubernetes object must be a mapping, got {type_name}"
    )


def test_invalid_yaml_is_refused_naming_the_file(workspace):
    write(workspace, {"k8s/bad.yaml": "apiVersion: v1\nkind: [unclosed\n"})
    with pytest.raises(ManifestError) as caught:
        bundle(workspace)
    assert caught.value.message.startswith("k8s/bad.yaml: not valid YAML")


def test_a_file_that_is_not_utf8_is_refused(workspace):
    (workspace / "k8s" / "latin1.yaml").write_bytes("data: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"k8s/latin1\.yaml: not UTF-8"):
        bundle(workspace)


def test_a_yaml_alias_bomb_is_refused_without_expanding_it(workspace):
    # 40 levels of two aliases each: 2**40 leaves once expanded. Expanding would never finish.
    lines = ["apiVersion: v1", "kind: ConfigMap", "metadata: {name: bomb}", "l0: &l0 [x, x]"]
    lines += [f"l{i}: &l{i} [*l{i - 1}, *l{i - 1}]" for i in range(1, 40)]
    write(workspace, {"k8s/bomb.yaml": "\n".join(lines) + "\n"})
    with pytest.raises(ManifestError) as caught:
        bundle(workspace)
    assert caught.value.message.startswith("k8s/bomb.yaml, document 1: more than")
    assert "aliases are expanded" in caught.value.message


@pytest.mark.parametrize("depth", [150, 3000])
def test_deeply_nested_yaml_is_refused_as_a_manifest_error(workspace, depth):
    write(workspace, {"k8s/deep.yaml": "a: " + "[" * depth + "]" * depth + "\n"})
    with pytest.raises(ManifestError, match=r"k8s/deep\.yaml, document 1: nested more than"):
        bundle(workspace)


def test_nesting_as_deep_as_real_manifests_is_fine(workspace):
    nested = "{x: " * 60 + "1" + "}" * 60
    write(
        workspace,
        {"k8s/deep.yaml": f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: d}}\ndata: {nested}\n"},
    )
    assert len(bundle(workspace).manifests) == 7


def test_an_images_repository_no_manifest_uses_is_refused_naming_it(workspace):
    with pytest.raises(ManifestError) as caught:
        bundle(workspace, "ghcr.io/acme/api:v1,ghcr.io/acme/billing:v1")
    assert "ghcr.io/acme/billing:v1" in caught.value.message
    assert "ghcr.io/acme/api" not in caught.value.message
    assert "no container in the manifests uses" in caught.value.message


def test_a_symlinked_manifest_leading_outside_the_workspace_is_refused(workspace, tmp_path):
    secret = tmp_path / "secret.yaml"
    secret.write_text(CONFIG)
    (workspace / "k8s" / "linked.yaml").symlink_to(secret)
    with pytest.raises(ManifestError) as caught:
        bundle(workspace)
    assert caught.value.message == "k8s/linked.yaml is a symbolic link; refusing to follow it"
    assert str(secret) not in caught.value.message


@pytest.mark.parametrize("target", ["shared.yaml", "not-yaml.txt", "folder"])
def test_a_symbolic_link_in_the_manifests_folder_is_refused_wherever_it_leads(workspace, target):
    """#15: a link inside the workspace could still lead to any file of it (a .env, a key),
    whose content a parse error would quote."""
    (workspace / "shared.yaml").write_text(CONFIG.replace("api-config", "shared"))
    (workspace / "not-yaml.txt").write_text("API_KEY=secret-value: [\n")
    (workspace / "folder").mkdir()
    (workspace / "k8s" / "sub").mkdir()
    (workspace / "k8s" / "sub" / "link.yaml").symlink_to(workspace / target)
    with pytest.raises(ManifestError) as caught:
        bundle(workspace)
    assert caught.value.message == "k8s/sub/link.yaml is a symbolic link; refusing to follow it"
    assert "secret-value" not in caught.value.message and "Copy the file" in (caught.value.fix or "")


def test_an_empty_folder_is_refused_with_a_fix(workspace):
    (workspace / "empty").mkdir()
    with pytest.raises(ManifestError) as caught:
        bundle(workspace, path="empty")
    assert caught.value.message == "no .yaml or .yml files under empty"
    assert "'manifests'" in (caught.value.fix or "")


def test_files_holding_no_objects_are_refused(workspace):
    write(workspace, {"comments/a.yaml": "# nothing\n---\n"})
    with pytest.raises(ManifestError, match="hold no Kubernetes objects"):
        bundle(workspace, path="comments")


def test_a_name_with_a_tab_is_refused_since_it_would_break_workloads_tsv(workspace):
    write(workspace, {"k8s/tab.yaml": 'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: "a\\tb"}\n'})
    with pytest.raises(ManifestError, match=r"k8s/tab\.yaml, document 1: metadata\.name contains a tab"):
        bundle(workspace)


def test_the_deploy_lock_lease_in_the_manifests_is_refused(workspace):
    """#15: the lock's Lease in the bundle would overwrite a running deploy's hold on it."""
    (workspace / "k8s" / "lease.yaml").write_text(
        "apiVersion: coordination.k8s.io/v1\nkind: Lease\n"
        "metadata: {name: k3s-deploy-lock, namespace: kube-system}\nspec: {holderIdentity: me}\n")
    with pytest.raises(ManifestError) as caught:
        bundle(workspace)
    assert caught.value.message.startswith("k8s/lease.yaml, document 1: Lease kube-system/k3s-deploy-lock")
    (workspace / "k8s" / "lease.yaml").write_text(
        "apiVersion: coordination.k8s.io/v1\nkind: Lease\n"
        "metadata: {name: my-app-leader, namespace: kube-system}\n")
    assert "my-app-leader" in [m.name for m in bundle(workspace).manifests]


def test_the_script_options_travel_in_the_bundle_one_line_each(tmp_path: Path) -> None:
    """The options are covered by the bundle's sha256; a value cannot add a line (an option)."""
    (tmp_path / "k8s").mkdir()
    (tmp_path / "k8s" / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n")
    bundle = build_bundle(tmp_path / "k8s", tmp_path, (), {"namespace": "shop", "timeout": "600"})
    with tarfile.open(fileobj=io.BytesIO(bundle.data)) as tar:
        options = tar.extractfile("bundle/options").read().decode()
    assert options == "namespace=shop\ntimeout=600\n"
    for hostile in ("shop\ntimeout=1", "shop\rx", "a\x00b"):
        with pytest.raises(ValueError, match="one line"):
            build_bundle(tmp_path / "k8s", tmp_path, (), {"namespace": hostile})


# prune


def test_with_a_release_every_object_is_labelled_and_listed_in_the_inventory(workspace):
    result = build_bundle(workspace / "k8s", workspace, [], release_id="0123456789abcdef0123")
    files = members(result.data)
    inventory = files["bundle/inventory.tsv"].decode().splitlines()
    # in the order the manifests were read; KIND.GROUP as kubectl takes it, so two kinds of one
    # name never mix
    assert inventory == [
        "Deployment.apps\tproduction-platform\tapi",
        "Deployment.apps\t\tworker",
        "Service\tproduction-platform\tredis",
        "StatefulSet.apps\tproduction-platform\tredis",
        "ConfigMap\tproduction-platform\tapi-config",
        "Namespace\t\tproduction-platform",
    ]
    for name in ("1-namespaces", "2-config", "3-services", "4-statefulsets", "6-workloads"):
        for doc in yaml.safe_load_all(files[f"bundle/{name}.yaml"]):
            assert doc["metadata"]["labels"]["k3s-deploy-action/release"] == "0123456789abcdef0123"
            template = (doc.get("spec") or {}).get("template") or {}
            assert "k3s-deploy-action/release" not in ((template.get("metadata") or {}).get("labels") or {})


def test_without_a_release_the_bundle_is_as_before(workspace):
    files = members(bundle(workspace).data)
    assert "bundle/inventory.tsv" not in files
    assert b"k3s-deploy-action/release" not in b"".join(files.values())


def test_a_configmap_named_like_a_prune_inventory_in_kube_system_is_refused(workspace):
    write(workspace, {"k8s/inventory.yaml": (
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: k3s-deploy-release-abc\n"
        "  namespace: kube-system\n"
    )})
    with pytest.raises(ManifestError, match="has the name of a release's prune inventory"):
        bundle(workspace)


MIGRATE = """\
apiVersion: batch/v1
kind: Job
metadata:
  name: migrate
  namespace: production-platform
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers: [{name: migrate, image: "ghcr.io/acme/api:old"}]
---
apiVersion: batch/v1
kind: Job
metadata:
  name: seed-a-rather-long-job-name-that-goes-on-and-on-for-ever
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: seed, image: "ghcr.io/acme/api:old"}]
"""


def test_jobs_have_their_phase_a_file_each_in_order_and_a_hash_of_what_they_run(workspace):
    write(workspace, {"k8s/jobs.yaml": MIGRATE})
    files = members(bundle(workspace, "ghcr.io/acme/api:abc123").data)
    assert [(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(files["bundle/5-jobs.yaml"])] == [
        ("Job", "migrate"), ("Job", "seed-a-rather-long-job-name-that-goes-on-and-on-for-ever")]
    lines = [line.split("\t") for line in files["bundle/jobs.tsv"].decode().splitlines()]
    assert [(ns, name) for ns, name, _ in lines] == [
        ("production-platform", "migrate"),
        ("", "seed-a-rather-long-job-name-that-goes-on-and-on-for-ever"),
    ]
    for number, (_, name, digest) in enumerate(lines, 1):
        job = yaml.safe_load(files[f"bundle/jobs/{number}.yaml"])
        assert job["metadata"]["name"] == name
        assert job["metadata"]["annotations"]["k3s-deploy-action/job-hash"] == digest
        assert len(digest) == 20 and int(digest, 16) >= 0
        assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/acme/api:abc123"
    # Not a workload: nothing waits for a Job as for a rollout.
    assert "migrate" not in files["bundle/workloads.tsv"].decode()


def test_a_job_hash_follows_what_the_job_runs(workspace):
    write(workspace, {"k8s/jobs.yaml": MIGRATE})

    def digests(images: str) -> list[str]:
        tsv = members(bundle(workspace, images).data)["bundle/jobs.tsv"].decode()
        return [line.split("\t")[2] for line in tsv.splitlines()]

    first = digests("ghcr.io/acme/api:abc123")
    assert digests("ghcr.io/acme/api:abc123") == first
    changed = digests("ghcr.io/acme/api:def456")
    assert changed[0] != first[0] and changed[1] != first[1]
    write(workspace, {"k8s/jobs.yaml": MIGRATE.replace("backoffLimit: 0", "backoffLimit: 1")})
    after = digests("ghcr.io/acme/api:abc123")
    assert after[0] != first[0] and after[1] == first[1]


def test_the_jobs_check_copies_get_a_name_from_the_server_short_enough_for_a_job(workspace):
    write(workspace, {"k8s/jobs.yaml": MIGRATE})
    files = members(bundle(workspace).data)
    checks = list(yaml.safe_load_all(files["bundle/jobs/check.yaml"]))
    assert [c["metadata"].get("name") for c in checks] == [None, None]
    prefixes = [c["metadata"]["generateName"] for c in checks]
    assert prefixes[0] == "migrate-check-"
    # The server adds 5 characters; a Job's name must fit its pods' 63-character label.
    assert prefixes[1].startswith("seed-a-rather-long") and len(prefixes[1]) + 5 <= 63
    originals = list(yaml.safe_load_all(files["bundle/5-jobs.yaml"]))
    assert [c["spec"] for c in checks] == [o["spec"] for o in originals]
