"""Read the manifests, check them, pin images, and build the deterministic bundle.

The action parses the YAML so the master does not have to: documents are sorted into apply
phases (Namespaces first: `kubectl apply -f DIR` does not sort by kind), the workloads to
watch are listed in `workloads.tsv` and every object in `objects.tsv`. Layout: docs/internals.md.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deploykit.errors import ManifestError
from deploykit.images import ImageRef, pin_images

# Apply phases, in order. Kinds not listed go to the last phase.
PHASES: tuple[tuple[str, frozenset[str]], ...] = (
    ("1-namespaces", frozenset({"Namespace", "CustomResourceDefinition"})),
    (
        "2-config",
        frozenset(
            {
                "ConfigMap",
                "Secret",
                "ServiceAccount",
                "Role",
                "RoleBinding",
                "ClusterRole",
                "ClusterRoleBinding",
                "PersistentVolumeClaim",
                "PersistentVolume",
                "ResourceQuota",
                "LimitRange",
                "StorageClass",
                "PriorityClass",
            }
        ),
    ),
    ("3-services", frozenset({"Service"})),
    ("4-statefulsets", frozenset({"StatefulSet"})),
    ("5-jobs", frozenset({"Job"})),
    ("6-workloads", frozenset()),
)
# DaemonSets go with the Deployments (phase 6): like them, nothing in the bundle waits for them,
# while StatefulSets come first because Deployments often need them (a database, a queue).
# Jobs (phase 5) are migrations: the script runs each after the StatefulSets are ready and before
# any Deployment or DaemonSet is applied (scripts/k3s-deploy/75-jobs.sh).
WATCHED_KINDS = {"Deployment": "deployment", "StatefulSet": "statefulset", "DaemonSet": "daemonset"}

MAX_FILES = 5000
MAX_FILE_BYTES = 5 * 1024 * 1024
MAX_NODES = 200_000  # per document, aliases expanded: stops "billion laughs" YAML bombs
MAX_DEPTH = 100  # nesting levels per document: deeper ones would overflow the YAML dumper's stack
FIXED_MTIME = 315532800  # 1980-01-01: any fixed time makes the archive reproducible


@dataclass(frozen=True)
class Manifest:
    source: str  # path relative to the workspace, and document number
    kind: str
    namespace: str
    name: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Bundle:
    data: bytes
    sha256: str
    manifests: tuple[Manifest, ...]
    workloads: tuple[tuple[str, str, str], ...]  # (kind, namespace, name)
    # The archive's files, to add options later.
    entries: tuple[tuple[str, bytes], ...] = field(default=(), repr=False, compare=False)


def add_options(bundle: Bundle, options: Mapping[str, str]) -> Bundle:
    """The same bundle with more script options (known only once staged: live progress)."""
    _check_options(options)
    files = dict(bundle.entries)
    extra = "".join(f"{name}={value}\n" for name, value in options.items()).encode()
    files["bundle/options"] = files.get("bundle/options", b"") + extra
    data = pack(files)
    digest = hashlib.sha256(data).hexdigest()
    return Bundle(data, digest, bundle.manifests, bundle.workloads, tuple(files.items()))


def _check_options(options: Mapping[str, str]) -> None:
    # One line each: a line break in a value would add an option (inputs.py refuses them).
    for name, value in options.items():
        if not re.fullmatch(r"[a-z][a-z0-9-]*", name) or re.search(r"[\x00-\x1f\x7f]", value):
            raise ValueError(f"script option {name!r} must be one line of printable text")


FIX_LINK = (
    "Copy the file or folder into the manifests folder instead of linking to it: a link could "
    "make the deploy read (and quote, in an error) any file the job can see."
)


def _refuse_links(path: Path, workspace: Path) -> None:
    """No symbolic link under the manifests folder, to a file or a folder, wherever it leads:
    the folder is what the deploy applies, and nothing else. The target is not named."""
    for link in (p for p in path.rglob("*") if p.is_symlink()):
        where = link.relative_to(workspace) if link.is_relative_to(workspace) else link
        raise ManifestError(f"{where} is a symbolic link; refusing to follow it", fix=FIX_LINK)


def find_manifest_files(path: Path, workspace: Path) -> list[Path]:
    if path.is_file():
        files = [path]
    else:
        _refuse_links(path, workspace)
        files = sorted(
            (p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()),
            key=lambda p: p.relative_to(path).as_posix(),
        )
    for file in files:
        if not file.resolve().is_relative_to(workspace):
            raise ManifestError(
                f"{file.relative_to(workspace) if file.is_relative_to(workspace) else file} "
                "is a link leading outside the workspace; refusing to read it"
            )
    if not files:
        raise ManifestError(
            f"no .yaml or .yml files under {path.relative_to(workspace) or '.'}",
            fix="Point the 'manifests' input at the folder holding your Kubernetes manifests.",
        )
    if len(files) > MAX_FILES:
        raise ManifestError(f"{len(files)} manifest files found; at most {MAX_FILES} are supported")
    return files


def _measure(node: yaml.Node, memo: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(node count with aliases expanded, nesting depth), computed without expanding aliases."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = (1, 1)  # a recursive alias counts once instead of looping
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    measured = [_measure(child, memo) for child in children]
    result = (1 + sum(size for size, _ in measured), 1 + max((depth for _, depth in measured), default=0))
    memo[key] = result
    return result


# libyaml's parser (PyYAML's C extension) reads manifests 5-7 times faster than the pure-Python
# one: it matters with hundreds of manifests (docs/PERFORMANCE.md). It is only a fast path: on
# any error the pure-Python parser reads the file again and decides, for its clearer messages (a
# snippet and a caret) and because libyaml's own nesting limit surfaces as a bug in its binding.
# Both build the same objects (same constructor and resolver). Dumping stays pure-Python: the C
# emitter lays out some multi-line strings differently, and the bundle's bytes are its identity.
_FAST_LOADER = getattr(yaml, "CSafeLoader", None)


def load_documents(text: str, where: str) -> list[Any]:
    if _FAST_LOADER is not None:
        try:
            return _load(_FAST_LOADER, text, where)
        except Exception:  # noqa: S110 - the reference parser below gives the verdict
            pass
    return _load(yaml.SafeLoader, text, where)


def _load(loader_class: Any, text: str, where: str) -> list[Any]:
    documents: list[Any] = []
    try:
        # Inside the try: the reader refuses control characters as soon as it is made.
        loader = loader_class(text)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{where}: not valid YAML: {exc}") from None
    try:
        while loader.check_node():
            node = loader.get_node()
            size, depth = _measure(node, {}) if node is not None else (0, 0)
            if size > MAX_NODES:
                raise ManifestError(
                    f"{where}, document {len(documents) + 1}: more than {MAX_NODES} YAML nodes "
                    "once aliases are expanded; refusing it"
                )
            if depth > MAX_DEPTH:
                raise ManifestError(
                    f"{where}, document {len(documents) + 1}: nested more than {MAX_DEPTH} levels "
                    "deep; refusing it"
                )
            documents.append(loader.construct_document(node) if node is not None else None)
    except yaml.YAMLError as exc:
        raise ManifestError(f"{where}: not valid YAML: {exc}") from None
    except RecursionError:  # the composer recurses per level: stopped before it can be measured
        raise ManifestError(
            f"{where}, document {len(documents) + 1}: nested more than {MAX_DEPTH} levels deep; refusing it"
        ) from None
    finally:
        loader.dispose()
    return documents


def _check(doc: Any, where: str) -> Manifest:
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: a Kubernetes object must be a mapping, got {type(doc).__name__}")
    missing = [
        field
        for field, value in (
            ("apiVersion", doc.get("apiVersion")),
            ("kind", doc.get("kind")),
            (
                "metadata.name",
                (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None,
            ),
        )
        if not isinstance(value, str) or not value.strip()
    ]
    if missing:
        raise ManifestError(f"{where}: missing {', '.join(missing)}")
    metadata = doc["metadata"]
    namespace = metadata.get("namespace") or ""
    if not isinstance(namespace, str):
        raise ManifestError(f"{where}: metadata.namespace must be a string")
    for label, value in (
        ("kind", doc["kind"]),
        ("metadata.name", metadata["name"]),
        ("metadata.namespace", namespace),
    ):
        if "\t" in value or "\n" in value:
            raise ManifestError(f"{where}: {label} contains a tab or newline")
    return Manifest(where, doc["kind"], namespace, metadata["name"], doc)


def read_manifests(path: Path, workspace: Path) -> list[Manifest]:
    manifests: list[Manifest] = []
    for file in find_manifest_files(path, workspace):
        relative = file.relative_to(workspace).as_posix()
        if file.stat().st_size > MAX_FILE_BYTES:
            raise ManifestError(f"{relative}: larger than {MAX_FILE_BYTES // 1024 // 1024} MiB")
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ManifestError(f"{relative}: not UTF-8 text") from None
        for number, doc in enumerate(load_documents(text, relative), start=1):
            if doc is None:  # empty document, e.g. a trailing `---`
                continue
            manifests.append(_check(doc, f"{relative}, document {number}"))
    if not manifests:
        raise ManifestError(f"the manifests under {path.relative_to(workspace)} hold no Kubernetes objects")
    return manifests


def apply_pins(manifests: Iterable[Manifest], images: Iterable[ImageRef]) -> None:
    pins = {ref.canonical_repository: ref for ref in images}
    used: set[str] = set()
    for manifest in manifests:
        used |= pin_images(manifest.body, pins)
    unused = [str(pins[repo]) for repo in pins if repo not in used]
    if unused:
        raise ManifestError(
            f"input 'images' lists {', '.join(unused)}, but no container in the manifests uses "
            "that repository",
            fix="Check the repository spelling against the `image:` fields of your manifests.",
        )


def phase_of(kind: str) -> str:
    for name, kinds in PHASES:
        if kind in kinds:
            return name
    return PHASES[-1][0]


def _defined_kind(manifest: Manifest) -> str:
    """The kind a CustomResourceDefinition defines (empty for other objects)."""
    if manifest.kind != "CustomResourceDefinition":
        return ""
    names = (manifest.body.get("spec") or {}).get("names") or {}
    kind = names.get("kind") if isinstance(names, dict) else None
    if not isinstance(kind, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,62}", kind):
        raise ManifestError(
            f"{manifest.source}: CustomResourceDefinition {manifest.name} has no valid spec.names.kind"
        )
    return kind


def _dump(documents: list[dict[str, Any]]) -> bytes:
    return "---\n".join(
        yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, allow_unicode=True)
        for doc in documents
    ).encode("utf-8")


def pack(files: dict[str, bytes]) -> bytes:
    """A gzipped tar of `files` that is byte-for-byte the same for the same input."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mtime = FIXED_MTIME
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(files[name]))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


# The deploy script's lock (LOCK_NAMESPACE/LOCK_NAME in scripts/k3s-deploy/10-common.sh, which
# refuses it too): a bundle that held it would overwrite the holder of a running deploy.
LOCK_LEASE = ("Lease", "kube-system", "k3s-deploy-lock")
# Prune's inventory of each release (scripts/k3s-deploy/87-prune.sh): ConfigMap
# kube-system/k3s-deploy-release-ID. A bundle must not write one: it would say what gets deleted.
INVENTORY_PREFIX = "k3s-deploy-release-"
# The label that marks an object as applied for a release (prune deletes only objects with it).
RELEASE_LABEL = "k3s-deploy-action/release"
# The hash of a Job as rendered: a Job's pod template is immutable, so the script replaces a Job
# (delete, then apply) whose live copy has another hash, and leaves one that completed with this
# hash alone.
JOB_HASH_ANNOTATION = "k3s-deploy-action/job-hash"
# A Job's name is also its pods' job-name label (63 characters at most); the server adds 5
# characters to a generateName.
JOB_CHECK_PREFIX_LENGTH = 50


def stamp_job_hash(manifest: Manifest) -> str:
    """Adds the hash of the Job as rendered (pins and labels included) to its own annotations,
    and returns it. The hash covers everything but that annotation."""
    metadata = manifest.body.setdefault("metadata", {})
    annotations = metadata.get("annotations")
    if not isinstance(annotations, dict):
        annotations = metadata["annotations"] = {}
    annotations.pop(JOB_HASH_ANNOTATION, None)
    canonical = json.dumps(manifest.body, sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:20]
    annotations[JOB_HASH_ANNOTATION] = digest
    return digest


def job_check_copy(body: dict[str, Any]) -> dict[str, Any]:
    """The Job under a name the server makes up (`create --dry-run=server`): the server-side
    check of a changed Job, which `apply --dry-run=server` would refuse on its immutable
    template although the script replaces it rather than patching it."""
    copy = json.loads(json.dumps(body, default=str))
    metadata = copy["metadata"]
    name = str(metadata.pop("name"))
    metadata["generateName"] = name[:JOB_CHECK_PREFIX_LENGTH].rstrip("-.") + "-check-"
    return copy


def inventory_key(manifest: Manifest) -> str:
    """How prune names an object to kubectl: KIND.GROUP (KIND for the core group), as
    `kubectl get Deployment.apps NAME` takes it, so that two kinds of one name never mix."""
    api_version = str(manifest.body.get("apiVersion", ""))
    group = api_version.rsplit("/", 1)[0] if "/" in api_version else ""
    return f"{manifest.kind}.{group}" if group else manifest.kind


def label_release(manifests: Iterable[Manifest], release_id: str) -> None:
    """Mark every object as this release's. On the object's own metadata only: a pod template's
    labels would roll the pods."""
    for manifest in manifests:
        metadata = manifest.body.setdefault("metadata", {})
        labels = metadata.get("labels")
        if not isinstance(labels, dict):
            labels = metadata["labels"] = {}
        labels[RELEASE_LABEL] = release_id


def build_bundle(
    path: Path,
    workspace: Path,
    images: Iterable[ImageRef],
    options: Mapping[str, str] | None = None,
    *,
    release_id: str = "",
) -> Bundle:
    """The bundle of `path`'s manifests, pinned to `images`, with the script's `options`. With a
    `release_id` (input 'prune' on), every object carries the release's label and the bundle
    lists them in `inventory.tsv` for the script's prune."""
    manifests = read_manifests(path, workspace)
    for m in manifests:
        if (m.kind, m.namespace, m.name) == LOCK_LEASE:
            raise ManifestError(
                f"{m.source}: Lease kube-system/k3s-deploy-lock is the deploy lock itself; "
                "applying it would break the lock of a deploy that holds it",
                fix="Remove that Lease from the manifests: the deploy takes and releases it.",
            )
        if m.kind == "ConfigMap" and m.namespace == "kube-system" and m.name.startswith(INVENTORY_PREFIX):
            raise ManifestError(
                f"{m.source}: ConfigMap kube-system/{m.name} has the name of a release's prune "
                "inventory; applying it would change what a later deploy deletes",
                fix=f"Rename it: names starting with {INVENTORY_PREFIX} in kube-system are the action's.",
            )
    apply_pins(manifests, images)
    if release_id:
        label_release(manifests, release_id)
    jobs = [(m, stamp_job_hash(m)) for m in manifests if m.kind == "Job"]
    phases: dict[str, list[dict[str, Any]]] = {}
    for manifest in manifests:
        phases.setdefault(phase_of(manifest.kind), []).append(manifest.body)
    workloads = tuple(
        (WATCHED_KINDS[m.kind], m.namespace, m.name) for m in manifests if m.kind in WATCHED_KINDS
    )
    # StatefulSets are applied (and so watched) before Deployments and DaemonSets, which keep
    # the manifests' order: the order phase 6 applies them in.
    workloads = tuple(sorted(workloads, key=lambda w: w[0] != "statefulset"))
    files = {f"bundle/{name}.yaml": _dump(docs) for name, docs in phases.items()}
    files["bundle/workloads.tsv"] = "".join(f"{k}\t{ns}\t{n}\n" for k, ns, n in workloads).encode()
    # Every object, so that the script need not ask kubectl to list the bundle back (a
    # multi-document file comes back from it as one `List`, and as nothing when one object errs).
    files["bundle/objects.tsv"] = "".join(
        f"{m.kind}\t{m.namespace}\t{m.name}\t{_defined_kind(m)}\n" for m in manifests
    ).encode()
    if jobs:
        # One file per Job, run one after the other in the manifests' order; the check copies
        # in one file for the server-side dry run.
        files["bundle/jobs.tsv"] = "".join(
            f"{m.namespace}\t{m.name}\t{digest}\n" for m, digest in jobs
        ).encode()
        for number, (m, _digest) in enumerate(jobs, 1):
            files[f"bundle/jobs/{number}.yaml"] = _dump([m.body])
        files["bundle/jobs/check.yaml"] = _dump([job_check_copy(m.body) for m, _ in jobs])
    if release_id:
        files["bundle/inventory.tsv"] = "".join(
            f"{inventory_key(m)}\t{m.namespace}\t{m.name}\n" for m in manifests
        ).encode()
    if options:
        # The script's options (command.bundle_options): verified with the bundle's sha256.
        _check_options(options)
        files["bundle/options"] = "".join(f"{name}={value}\n" for name, value in options.items()).encode()
    data = pack(files)
    return Bundle(data, hashlib.sha256(data).hexdigest(), tuple(manifests), workloads, tuple(files.items()))
