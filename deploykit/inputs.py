"""Read and validate every input, once, before any AWS call.

The action reads `INPUT_<NAME>` variables (the runner keeps hyphens: `INPUT_AWS-REGION`); the
CLI passes the same names as flags. Both end in `parse_settings`, one code path.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from deploykit.build import BuildSpec, parse_build_args, parse_builds
from deploykit.errors import InputError
from deploykit.images import TAG_PATTERN, ImageRef, parse_image
from deploykit.registry import VERIFY_MODES, RegistryLogin, parse_login
from deploykit.stage import bucket_name_problem

# name -> (default, help). The default "" means none. action.yml is checked against this table.
INPUTS: dict[str, tuple[str, str]] = {
    "aws-region": (
        "",
        "AWS region of the instance and the bucket (default: AWS_REGION, then AWS_DEFAULT_REGION)",
    ),
    "instance-id": (
        "",
        "deploy to this instance; skips discovery (with 'fleet': several, one per line or comma-separated)",
    ),
    "instance-tag": ("*k3s-master*", "pattern for the value of tag instance-tag-key; running instances only"),
    "instance-tag-key": ("Name", "tag key used for discovery"),
    "manifests": (
        "k8s/base",
        "folder (searched recursively for .yaml/.yml) or file, relative to the workspace",
    ),
    "namespace": ("production-platform", "namespace whose pods and events are reported"),
    "images": ("", "image references, one per line or comma-separated, pinned in the manifests"),
    "image-tag": ("", "tag for image references given without one (default: GITHUB_SHA)"),
    "timeout": ("600", "seconds the remote deploy may take"),
    "rollback": ("true", "roll back changed workloads when the deploy fails"),
    "rollback-timeout": ("120", "seconds a rollback may wait for the undone workloads"),
    "cleanup": ("true", "delete what was staged when done"),
    "bucket": ("", "stage under a unique prefix in this existing bucket instead of a temporary one"),
    "delivery": (
        "s3",
        "how the master gets the staged files: s3 (the AWS CLI with its instance role) or presigned "
        "(curl and short-lived URLs: the master needs no S3 permission)",
    ),
    "progress": (
        "true",
        "show the master's step lines in the job log while the deploy runs (through a small "
        "object in the staging area); transport ssm only",
    ),
    "ssm-document": (
        "",
        "the custom SSM Command document to run the deploy with (examples/iam/k3s-deploy-document.json); "
        "empty: AWS-RunShellScript",
    ),
    "kubectl": ("kubectl", "kubectl command on the master (e.g. 'k3s kubectl')"),
    "request-timeout": ("60s", "kubectl --request-timeout on the master"),
    "kubectl-validate": ("false", "kubectl --validate on apply (off: slow on a t3.micro)"),
    "build": (
        "",
        "images to build with the Docker engine and push (tags: image-tag and latest) before "
        "deploying, one per line: CONTEXT=IMAGE or CONTEXT:DOCKERFILE=IMAGE; pinned like 'images'",
    ),
    "build-args": ("", "build arguments for every image of 'build', one NAME=VALUE per line"),
    "build-cache": (
        "false",
        "reuse the layers of each image's previous 'latest' from the registry as the build cache "
        "(trusts whoever pushed it last)",
    ),
    "registry": ("", "registry to log in to for pushing and checking images (default: docker.io)"),
    "registry-username": ("", "user name of the registry login"),
    "registry-password": ("", "password or token of the registry login (masked in the log)"),
    "verify-images": (
        "auto",
        "check that every image to deploy exists in its registry before any AWS change (anonymously "
        "where there is no login for it): auto (a registry that cannot be reached or wants a login "
        "is a warning), true (it is an error) or false",
    ),
    "fleet": (
        "false",
        "deploy to every running, SSM-online match of 'instance-tag' (or every id in 'instance-id'), "
        "one server per cluster",
    ),
    "max-concurrency": (
        "50",
        "fleet: instances deploying at once, a number or a percentage (SSM MaxConcurrency)",
    ),
    "max-errors": (
        "0",
        "fleet: failed instances before SSM stops sending, a number or a percentage (SSM MaxErrors)",
    ),
    "cluster-tag-key": (
        "k3s-cluster",
        "tag key whose value names a server's K3s cluster: one server per cluster is deployed to",
    ),
    "transport": (
        "ssm",
        "how the deploy script reaches the cluster: ssm (on the K3s master, through S3 and SSM Run "
        "Command) or local (here, with the job's kubeconfig; no AWS call at all)",
    ),
    "kubeconfig": (
        "",
        "transport local: kubeconfig file relative to the workspace (default: KUBECONFIG, then "
        "~/.kube/config)",
    ),
    "dry-run": (
        "false",
        "check and diff only: server-side dry run and kubectl diff, nothing changed, the diff in "
        "the step summary",
    ),
    "server-dry-run": (
        "true",
        "server-side dry run of the whole bundle before anything is applied (false: skip it on "
        "very small masters)",
    ),
    "lock-timeout": ("300", "seconds to wait for the cluster's deploy lock while another deploy holds it"),
    "prune": (
        "false",
        "once the release is healthy, delete what its previous deploy applied and this one no longer "
        "has: false, true, or all (true keeps PersistentVolumeClaims, PersistentVolumes, Namespaces "
        "and cluster-scoped objects; all deletes them too)",
    ),
    "release": (
        "",
        "the release that prune tracks (default: REPOSITORY:MANIFESTS, e.g. acme/app:k8s/base); "
        "deploys of one release share its inventory",
    ),
}

DELIVERIES = ("s3", "presigned")
PRUNE_MODES = ("false", "true", "all")
RELEASE_ID_LENGTH = 20  # hex digits of the release name's sha256: its label value
_RELEASE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,199}$")
TRANSPORTS = ("ssm", "local")
MIN_LOCK_TIMEOUT, MAX_LOCK_TIMEOUT = 0, 3600
MIN_TIMEOUT, MAX_TIMEOUT = 10, 86400
MIN_ROLLBACK_TIMEOUT, MAX_ROLLBACK_TIMEOUT = 10, 3600
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-[0-9]{1,2}$")
_INSTANCE_ID = re.compile(r"^i-(?:[0-9a-f]{8}|[0-9a-f]{17})$")
_DNS_LABEL = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$")
_KUBECTL_WORD = re.compile(r"^[A-Za-z0-9_./:=-]+$")
_DURATION = re.compile(r"^[1-9][0-9]{0,3}[sm]$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SSM_DOCUMENT = re.compile(r"^(?:arn:aws[a-z-]*:ssm:[a-z0-9-]+:[0-9]{12}:document/)?[A-Za-z0-9_.-]{3,128}\Z")
# SSM's own patterns for SendCommand's MaxConcurrency and MaxErrors.
_MAX_CONCURRENCY = re.compile(r"^(?:[1-9][0-9]{0,6}|[1-9][0-9]?%|100%)$")
_MAX_ERRORS = re.compile(r"^(?:[0]|[1-9][0-9]{0,6}|[0-9]%|[1-9][0-9]%|100%)$")


@dataclass(frozen=True)
class Settings:
    aws_region: str
    instance_id: str | None
    instance_tag: str
    instance_tag_key: str
    workspace: Path
    manifests: Path
    namespace: str
    images: tuple[ImageRef, ...]
    timeout: int
    rollback: bool
    rollback_timeout: int
    cleanup: bool
    bucket: str | None
    kubectl: tuple[str, ...]
    request_timeout: str
    kubectl_validate: bool
    commit: str
    run_url: str
    builds: tuple[BuildSpec, ...] = ()
    build_args: tuple[tuple[str, str], ...] = ()
    build_cache: bool = False  # reuse the previous `latest` as a layer cache (opt-in)
    registry: RegistryLogin | None = None  # its password never shows in a repr
    verify_images: str = "auto"  # "auto", "true" or "false": registry.check_images says what each does
    fleet: bool = False
    progress: bool = True  # live progress: the master's step lines while the deploy runs
    instance_ids: tuple[str, ...] = ()  # every id given in 'instance-id'
    max_concurrency: str = "50"
    max_errors: str = "0"
    cluster_tag_key: str = "k3s-cluster"
    delivery: str = "s3"  # "s3" or "presigned" (DELIVERIES)
    transport: str = "ssm"  # "ssm" or "local" (TRANSPORTS)
    kubeconfig: Path | None = None  # transport local: the file given, else KUBECONFIG
    dry_run: bool = False
    server_dry_run: bool = True
    lock_timeout: int = 300
    ssm_document: str = "AWS-RunShellScript"  # or the custom document (input ssm-document)
    prune: str = "false"  # "false", "true" or "all" (PRUNE_MODES)
    release: str = ""  # the release prune tracks (its name; release_id() is what the cluster holds)

    def release_id(self) -> str:
        """The release as the cluster knows it: a label value and part of the inventory's name."""
        return hashlib.sha256(self.release.encode()).hexdigest()[:RELEASE_ID_LENGTH]


def show(value: str, limit: int = 80) -> str:
    """A value as it may appear in an error message: quoted, escaped, cut."""
    text = value if len(value) <= limit else value[:limit] + "..."
    return repr(text)


def read_action_inputs(env: Mapping[str, str]) -> dict[str, str]:
    """Map each known input to its value, accepting INPUT_AWS-REGION and INPUT_AWS_REGION."""
    raw: dict[str, str] = {}
    for name in INPUTS:
        upper = name.upper()
        for key in (f"INPUT_{upper}", f"INPUT_{upper.replace('-', '_')}"):
            value = env.get(key, "")
            if value.strip():
                raw[name] = value
                break
    return raw


def _bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    raise InputError(f"input '{name}' must be true or false, got {show(value)}")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    lowered = value.strip().lower()
    if lowered not in choices:
        raise InputError(f"input '{name}' must be one of {', '.join(choices)}, got {show(value)}")
    return lowered


def _int(name: str, value: str, low: int, high: int) -> int:
    text = value.strip()
    # not str.isdigit(): it takes '²' (int() then fails) and other scripts' digits
    if not re.fullmatch(r"[0-9]{1,9}", text) or not low <= int(text) <= high:
        raise InputError(
            f"input '{name}' must be a whole number of seconds between {low} and {high}, got {show(value)}"
        )
    return int(text)


def _plain(name: str, value: str, max_length: int) -> str:
    if _CONTROL.search(value) or not value or len(value) > max_length:
        raise InputError(
            f"input '{name}' must be 1 to {max_length} characters without control characters "
            f"or newlines, got {show(value)}"
        )
    return value


def _release(value: str, repository: str, manifests: str) -> str:
    """The input 'release', or the repository and the manifests path: what stays the same from
    one deploy of the same manifests to the next, and differs between two sets of manifests."""
    given = value.strip()
    if not given:
        return f"{repository or 'local'}:{manifests}"
    if not _RELEASE.match(given):
        raise InputError(
            "input 'release' must be 1 to 200 letters, digits and . _ / : @ + - (starting with a "
            f"letter or digit), got {show(value)}"
        )
    return given


def _workspace_path(workspace: Path, value: str) -> Path:
    relative = value.strip()
    candidate = Path(relative)
    if not relative or _CONTROL.search(relative) or candidate.is_absolute():
        raise InputError(f"input 'manifests' must be a path relative to the workspace, got {show(value)}")
    try:
        resolved = (workspace / candidate).resolve()
        exists = resolved.exists()
    except (OSError, RuntimeError):  # a name too long for the file system, a symlink loop
        raise InputError(f"input 'manifests' is not a usable path, got {show(value)}") from None
    if not resolved.is_relative_to(workspace):
        raise InputError(
            f"input 'manifests' leads outside the workspace ({workspace}), got {show(value)}; "
            "keep the manifests in the repository"
        )
    if not exists:
        raise InputError(
            f"input 'manifests' names nothing in the workspace, got {show(value)}; "
            "did the job check out the repository (actions/checkout) before this step?"
        )
    return resolved


def _images(value: str, image_tag: str) -> tuple[ImageRef, ...]:
    refs: list[ImageRef] = []
    seen: dict[str, str] = {}
    for entry in re.split(r"[,\n]", value):
        text = entry.strip()
        if not text:
            continue
        try:
            ref = parse_image(text)
        except ValueError as exc:
            raise InputError(f"input 'images': {show(text)} is {exc}") from None
        if not ref.tag and not ref.digest:
            if not image_tag:
                raise InputError(
                    f"input 'images': {show(text)} has no tag, and neither 'image-tag' nor "
                    "GITHUB_SHA gives one; add ':TAG' or set 'image-tag'"
                )
            ref = ref.with_tag(image_tag)
        if ref.canonical_repository in seen:
            raise InputError(
                f"input 'images' lists repository {ref.canonical_repository} twice "
                f"({seen[ref.canonical_repository]} and {text})"
            )
        seen[ref.canonical_repository] = text
        refs.append(ref)
    return tuple(refs)


def _run_url(env: Mapping[str, str]) -> str:
    server, repo, run = (env.get(k, "") for k in ("GITHUB_SERVER_URL", "GITHUB_REPOSITORY", "GITHUB_RUN_ID"))
    valid = (
        run.isdigit()
        and re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", repo)
        and re.fullmatch(r"https://[A-Za-z0-9.-]+(:[0-9]+)?", server)
    )
    return f"{server}/{repo}/actions/runs/{run}" if valid else ""


def _instance_ids(value: str, fleet: bool) -> tuple[str, ...]:
    """One id, or with 'fleet' several (one per line or comma-separated), each checked."""
    ids = [part.strip() for part in re.split(r"[,\n]", value) if part.strip()]
    for instance_id in ids:
        if not _INSTANCE_ID.match(instance_id):
            raise InputError(
                f"input 'instance-id' must be an EC2 instance id such as i-0123456789abcdef0, "
                f"got {show(instance_id)}"
            )
    if len(ids) > 1 and not fleet:
        raise InputError(
            f"input 'instance-id' takes one instance id unless 'fleet' is true, got {len(ids)}: {show(value)}"
        )
    return tuple(dict.fromkeys(ids))


def parse_settings(raw: Mapping[str, str], env: Mapping[str, str] | None = None) -> Settings:
    """Validate the inputs (names as in action.yml; missing or empty means the default)."""
    env = os.environ if env is None else env
    unknown = sorted(set(raw) - set(INPUTS))
    if unknown:
        raise InputError(f"unknown input {show(unknown[0])}; known inputs: {', '.join(INPUTS)}")

    def get(name: str) -> str:
        value = raw.get(name, "")
        return value if value.strip() else INPUTS[name][0]

    region = get("aws-region").strip() or env.get("AWS_REGION", "") or env.get("AWS_DEFAULT_REGION", "")
    transport = get("transport").strip().lower()
    if transport not in TRANSPORTS:
        raise InputError(
            f"input 'transport' must be one of {', '.join(TRANSPORTS)}, got {show(get('transport'))}"
        )
    if transport == "local" and not get("aws-region").strip():
        region = ""  # no AWS call at all: a region from the environment is not needed
    elif not region:
        raise InputError(
            "input 'aws-region' is required: set it, or AWS_REGION (configure-aws-credentials sets it)"
        )
    if region and not _REGION.fullmatch(region):  # the environment's value is not stripped
        raise InputError(f"input 'aws-region' must be a region name such as eu-west-1, got {show(region)}")

    fleet = _bool("fleet", get("fleet"))
    instance_ids = _instance_ids(get("instance-id"), fleet)
    instance_id = instance_ids[0] if len(instance_ids) == 1 else None
    max_concurrency = get("max-concurrency").strip()
    if not _MAX_CONCURRENCY.match(max_concurrency):
        raise InputError(
            "input 'max-concurrency' must be a number of instances (1 or more) or a percentage "
            f"(1% to 100%), got {show(get('max-concurrency'))}"
        )
    max_errors = get("max-errors").strip()
    if not _MAX_ERRORS.match(max_errors):
        raise InputError(
            "input 'max-errors' must be a number of instances (0 or more) or a percentage "
            f"(0% to 100%), got {show(get('max-errors'))}"
        )

    workspace = Path(env.get("GITHUB_WORKSPACE") or os.getcwd()).resolve()
    namespace = get("namespace").strip()
    if not _DNS_LABEL.match(namespace):
        raise InputError(
            "input 'namespace' must be a Kubernetes namespace name (lowercase letters, digits "
            f"and '-', at most 63), got {show(namespace)}"
        )

    image_tag = get("image-tag").strip() or env.get("GITHUB_SHA", "").strip()
    if image_tag and not TAG_PATTERN.match(image_tag):
        raise InputError(
            "input 'image-tag' must be a valid image tag (letters, digits, '_', '.', '-', at most "
            f"128, not starting with '.' or '-'), got {show(image_tag)}"
        )

    timeout = _int("timeout", get("timeout"), MIN_TIMEOUT, MAX_TIMEOUT)
    rollback_timeout = _int(
        "rollback-timeout", get("rollback-timeout"), MIN_ROLLBACK_TIMEOUT, MAX_ROLLBACK_TIMEOUT
    )

    bucket = get("bucket").strip() or None
    if bucket is not None:
        problem = bucket_name_problem(bucket)
        if problem:
            raise InputError(f"input 'bucket' is not a valid S3 bucket name ({problem}), got {show(bucket)}")

    kubectl = tuple(get("kubectl").split())
    if not 1 <= len(kubectl) <= 8 or not all(_KUBECTL_WORD.match(w) for w in kubectl):
        raise InputError(
            "input 'kubectl' must be a command of 1 to 8 words made of letters, digits and "
            f"'_./:=-' (e.g. 'k3s kubectl'), got {show(get('kubectl'))}"
        )

    request_timeout = get("request-timeout").strip()
    if not _DURATION.match(request_timeout):
        raise InputError(
            f"input 'request-timeout' must be a duration such as 60s or 2m, got {show(request_timeout)}"
        )

    images = _images(get("images"), image_tag)
    workspace_builds = parse_builds(get("build"), workspace, image_tag)
    listed = {ref.canonical_repository for ref in images}
    for spec in workspace_builds:
        if spec.image.canonical_repository in listed:
            raise InputError(
                f"input 'build' builds {spec.image.canonical_repository}, which 'images' lists too; "
                "name it in one of them"
            )
    login = parse_login(get("registry"), get("registry-username"), get("registry-password"))
    verify = get("verify-images").strip().lower()
    if verify not in VERIFY_MODES:
        raise InputError(
            f"input 'verify-images' must be auto, true or false, got {show(get('verify-images'))}"
        )

    commit = env.get("GITHUB_SHA", "").strip()
    if not re.fullmatch(r"[0-9a-f]{7,64}", commit):
        commit = ""

    # After the other inputs' checks: a bad value elsewhere is named even before a checkout.
    manifests = _workspace_path(workspace, get("manifests"))
    manifests_path = manifests.relative_to(workspace).as_posix()
    return Settings(
        aws_region=region,
        instance_id=instance_id,
        instance_tag=_plain("instance-tag", get("instance-tag"), 255),
        instance_tag_key=_plain("instance-tag-key", get("instance-tag-key"), 128),
        workspace=workspace,
        manifests=manifests,
        namespace=namespace,
        # built images are pinned like listed ones
        images=images + tuple(spec.image for spec in workspace_builds),
        timeout=timeout,
        rollback=_bool("rollback", get("rollback")),
        rollback_timeout=rollback_timeout,
        cleanup=_bool("cleanup", get("cleanup")),
        progress=_bool("progress", get("progress")),
        bucket=bucket,
        kubectl=kubectl,
        request_timeout=request_timeout,
        kubectl_validate=_bool("kubectl-validate", get("kubectl-validate")),
        commit=commit,
        run_url=_run_url(env),
        builds=workspace_builds,
        build_args=parse_build_args(get("build-args")),
        build_cache=_bool("build-cache", get("build-cache")),
        registry=login,
        verify_images=verify,
        fleet=fleet,
        instance_ids=instance_ids,
        max_concurrency=max_concurrency,
        max_errors=max_errors,
        cluster_tag_key=_plain("cluster-tag-key", get("cluster-tag-key"), 128),
        delivery=_choice("delivery", get("delivery"), DELIVERIES),
        transport=transport,
        kubeconfig=_kubeconfig(get("kubeconfig"), workspace, env) if transport == "local" else None,
        dry_run=_bool("dry-run", get("dry-run")),
        server_dry_run=_bool("server-dry-run", get("server-dry-run")),
        lock_timeout=_int("lock-timeout", get("lock-timeout"), MIN_LOCK_TIMEOUT, MAX_LOCK_TIMEOUT),
        prune=_choice("prune", get("prune"), PRUNE_MODES),
        release=_release(get("release"), env.get("GITHUB_REPOSITORY", ""), manifests_path),
        ssm_document=_ssm_document(get("ssm-document"), transport),
    )


def _ssm_document(value: str, transport: str) -> str:
    """A document name (or a shared document's ARN); empty means AWS-RunShellScript."""
    name = value.strip()
    if not name:
        return "AWS-RunShellScript"
    if transport == "local":
        raise InputError(
            "input 'ssm-document' applies to transport ssm; transport local runs the script here",
            fix="Remove input 'ssm-document', or use transport ssm.",
        )
    if not _SSM_DOCUMENT.match(name):
        raise InputError(
            f"input 'ssm-document' must be an SSM document name (3-128 letters, digits, _ . -) or "
            f"its ARN, got {show(value)}"
        )
    return name


def _kubeconfig(value: str, workspace: Path, env: Mapping[str, str]) -> Path | None:
    """transport local: the kubeconfig input (a file in the workspace), else None for KUBECONFIG
    or ~/.kube/config, one of which must exist. Inside the action's container only the
    workspace is shared with the job, and the runner rewrites a KUBECONFIG under the workspace
    to its path in the container."""
    text = value.strip()
    if text:
        candidate = Path(text)
        if _CONTROL.search(text) or candidate.is_absolute():
            raise InputError(
                f"input 'kubeconfig' must be a path relative to the workspace, got {show(value)}"
            )
        resolved = (workspace / candidate).resolve()
        if not resolved.is_relative_to(workspace):
            raise InputError(
                f"input 'kubeconfig' leads outside the workspace ({workspace}), got {show(value)}; "
                "write the kubeconfig into the workspace (the action's container sees only that)"
            )
        if not resolved.is_file():
            raise InputError(f"input 'kubeconfig' names no file in the workspace, got {show(value)}")
        return resolved
    listed = [part for part in env.get("KUBECONFIG", "").split(os.pathsep) if part.strip()]
    home = env.get("HOME", "")
    candidates = [Path(part) for part in listed] or ([Path(home) / ".kube" / "config"] if home else [])
    if not any(path.is_file() for path in candidates):
        where = f"KUBECONFIG ({show(env.get('KUBECONFIG', ''))})" if listed else "~/.kube/config"
        raise InputError(
            f"transport 'local' needs a kubeconfig: input 'kubeconfig' is empty and {where} is no "
            "file here; write one into the workspace and give its path in 'kubeconfig'"
        )
    return None
