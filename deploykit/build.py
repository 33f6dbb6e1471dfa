"""Build the images named by the `build` input and push them, before anything changes in AWS.

Each `CONTEXT[:DOCKERFILE]=IMAGE` is built through the Docker engine that the runner mounts
into a container action (`/var/run/docker.sock`), tagged with `image-tag` and `latest`, and
both tags are pushed, as the original pipeline did. The previous `latest` is pulled first when
the registry has one and used as `cache_from`, so unchanged layers are not rebuilt.

The Docker SDK is imported only here and only when there is something to build: a deploy that
builds nothing starts without it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from deploykit.errors import BuildFailed, InputError, PushFailed, RegistryLoginFailed
from deploykit.github import Workflow
from deploykit.images import ImageRef, parse_image
from deploykit.registry import LOGIN_REFUSED_FIX, RegistryLogin, image_registry

LATEST = "latest"
MAX_BUILDS = 20
# Seconds the SDK waits for the engine to say anything: a build step can be silent for long.
ENGINE_TIMEOUT = 3600
# Lines of the failing step's output quoted in the error (the whole log is in its group).
ERROR_TAIL_LINES = 30
_BUILD_ARG_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_STEP = re.compile(r"^Step \d+/\d+ : ")
# Push statuses that repeat for every chunk: the log shows each layer's start and end only.
_NOISY_PUSH_STATUSES = {"Pushing", "Waiting", "Preparing", "Downloading", "Extracting"}

FIX_ENGINE = (
    "Building needs the Docker engine: the GitHub runner mounts /var/run/docker.sock into "
    "container actions on ubuntu runners; elsewhere set DOCKER_HOST."
)
FIX_PUSH = (
    "Give this step a login that may push to the registry ('registry', 'registry-username', "
    "'registry-password'); for GHCR the job needs `permissions: packages: write`."
)


@dataclass(frozen=True)
class BuildSpec:
    context: Path  # absolute, inside the workspace
    dockerfile: Path  # absolute, inside the workspace
    image: ImageRef  # the repository tagged with image-tag
    line: str  # as the user wrote it, for messages

    @property
    def latest(self) -> ImageRef:
        return self.image.with_tag(LATEST)


def _show(value: str, limit: int = 80) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _inside(workspace: Path, relative: str, what: str, line: str) -> Path:
    candidate = Path(relative)
    if not relative or _CONTROL.search(relative) or candidate.is_absolute():
        raise InputError(
            f"input 'build': the {what} must be a path relative to the workspace, in {_show(line)}"
        )
    resolved = (workspace / candidate).resolve()
    if not resolved.is_relative_to(workspace):
        raise InputError(f"input 'build': the {what} leads outside the workspace, in {_show(line)}")
    return resolved


def parse_builds(value: str, workspace: Path, image_tag: str) -> tuple[BuildSpec, ...]:
    """Validate the `build` input: one `CONTEXT=IMAGE` or `CONTEXT:DOCKERFILE=IMAGE` per line."""
    specs: list[BuildSpec] = []
    seen: dict[str, str] = {}
    for raw_line in value.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        source, equals, image_text = line.rpartition("=")
        context_text, _, dockerfile_text = source.strip().partition(":")
        if not equals or not context_text.strip() or not image_text.strip():
            raise InputError(
                "input 'build': each line must be CONTEXT=IMAGE or CONTEXT:DOCKERFILE=IMAGE "
                f"(e.g. app/api=ghcr.io/acme/api), got {_show(line)}"
            )
        try:
            image = parse_image(image_text.strip())
        except ValueError as exc:
            raise InputError(f"input 'build': {_show(image_text.strip())} is {exc}") from None
        if image.tag or image.digest:
            raise InputError(
                f"input 'build': give the image without a tag or digest, got {_show(image_text.strip())}; "
                "it is tagged with 'image-tag' and 'latest'"
            )
        if not image_tag:
            raise InputError(
                "input 'build' needs a tag for the images it builds: set 'image-tag' "
                "(its default, GITHUB_SHA, is not set)"
            )
        context = _inside(workspace, context_text.strip(), "context", line)
        if not context.is_dir():
            raise InputError(
                f"input 'build': the context {_show(context_text.strip())} is not a folder in the "
                "workspace; did the job check out the repository before this step?"
            )
        if dockerfile_text.strip():
            dockerfile = _inside(context, dockerfile_text.strip(), "Dockerfile", line)
            if not dockerfile.is_relative_to(workspace):
                raise InputError(
                    f"input 'build': the Dockerfile leads outside the workspace, in {_show(line)}"
                )
        else:
            dockerfile = context / "Dockerfile"
        if not dockerfile.is_file():
            raise InputError(
                f"input 'build': no Dockerfile at {dockerfile.relative_to(workspace).as_posix()} "
                f"(from {_show(line)})"
            )
        repository = image.canonical_repository
        if repository in seen:
            raise InputError(f"input 'build' builds {repository} twice ({seen[repository]} and {line})")
        seen[repository] = line
        specs.append(BuildSpec(context, dockerfile, image.with_tag(image_tag), line))
    if len(specs) > MAX_BUILDS:
        raise InputError(f"input 'build' lists {len(specs)} images; at most {MAX_BUILDS} per step")
    return tuple(specs)


def parse_build_args(value: str) -> tuple[tuple[str, str], ...]:
    """The `build-args` input: one `NAME=VALUE` per line, passed to every build."""
    pairs: dict[str, str] = {}
    for raw_line in value.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        name, equals, arg = line.partition("=")
        if not equals or not _BUILD_ARG_NAME.match(name.strip()):
            raise InputError(f"input 'build-args': each line must be NAME=VALUE, got {_show(line)}")
        pairs[name.strip()] = arg.strip()
    return tuple(pairs.items())


# --------------------------------------------------------------------------------------------
# Building and pushing


def build_images(
    builds: tuple[BuildSpec, ...],
    gh: Workflow,
    *,
    login: RegistryLogin | None = None,
    build_args: tuple[tuple[str, str], ...] = (),
    cache: bool = False,
    client: Any = None,
) -> dict[str, str]:
    """Build and push every image of the `build` input; return {reference: digest}.

    `client` is a docker.DockerClient; by default one for the engine of the environment.
    """
    if not builds:
        return {}
    client = client or _engine_client()
    if login is not None:
        _log_in(client, login)
        gh.log(f"Logged in to {login.registry} as {login.username}")
    digests: dict[str, str] = {}
    for spec in builds:
        auth = _auth_for(login, spec.image)
        with gh.group(f"Build and push {spec.image}"):
            # Opt-in: the previous `latest` is whatever its last pusher made it.
            cache_from = _previous_latest(client, spec, auth, gh) if cache else []
            image_id = _build(client, spec, dict(build_args), cache_from, gh)
            client.api.tag(image_id, spec.image.repository, LATEST, force=True)
            digest = _push(client, spec.image, auth, gh)
            if spec.image.tag != LATEST:
                _push(client, spec.latest, auth, gh)
        gh.log(f"Built and pushed {spec.image} and :{LATEST} ({digest})")
        digests[str(spec.image)] = digest
    return digests


def _engine_client() -> Any:
    import docker  # only when building: start-up stays free of the SDK

    try:
        client = docker.from_env(timeout=ENGINE_TIMEOUT)
        client.ping()
    except docker.errors.DockerException as exc:
        raise BuildFailed(
            f"no Docker engine answers, so the images cannot be built: {exc}", fix=FIX_ENGINE
        ) from None
    return client


def _auth_for(login: RegistryLogin | None, image: ImageRef) -> dict[str, str] | None:
    if login is None or not login.applies_to(image_registry(image)):
        return None
    return {"username": login.username, "password": login.password}


def _log_in(client: Any, login: RegistryLogin) -> None:
    import docker

    # docker-py names Docker Hub by its index URL, every other registry by its host.
    registry = None if login.registry == "docker.io" else login.registry
    try:
        client.login(username=login.username, password=login.password, registry=registry, reauth=True)
    except docker.errors.APIError as exc:
        reason = str(exc.explanation or exc).replace(login.password, "***")
        raise RegistryLoginFailed(
            f"registry {login.registry} refused the login of user {login.username!r}: {reason}",
            fix=LOGIN_REFUSED_FIX,
        ) from None


def _previous_latest(client: Any, spec: BuildSpec, auth: dict[str, str] | None, gh: Workflow) -> list[str]:
    """The previous `latest`, pulled when the registry has one, as a layer cache."""
    import docker

    latest = str(spec.latest)
    try:
        for chunk in client.api.pull(
            spec.image.repository, tag=LATEST, stream=True, decode=True, auth_config=auth
        ):
            if "error" in chunk:
                break
    except docker.errors.APIError:
        pass  # none pushed yet (404), or not readable: build without it
    try:
        client.api.inspect_image(latest)
    except docker.errors.ImageNotFound:
        gh.log(f"No previous {latest} to reuse layers from: building from scratch")
        return []
    gh.log(f"Reusing layers from {latest}")
    return [latest]


def _lines(chunks: Iterator[Mapping[str, Any]]) -> Iterator[tuple[str | None, Mapping[str, Any]]]:
    """Whole lines of the engine's `stream` text (it splits them across chunks), and the chunk."""
    pending = ""
    for chunk in chunks:
        text = chunk.get("stream")
        if isinstance(text, str):
            pending += text
            *complete, pending = pending.split("\n")
            for line in complete:
                yield line.rstrip("\r"), chunk
        else:
            yield None, chunk
    if pending:
        yield pending, {}


def _build(client: Any, spec: BuildSpec, build_args: dict[str, str], cache: list[str], gh: Workflow) -> str:
    import docker

    step = "the start of the build"
    step_output: list[str] = []
    image_id = ""
    # Untrusted: whoever wrote the Dockerfile or the build context decides what it prints.
    with gh.untrusted():
        try:
            chunks = client.api.build(
                path=str(spec.context),
                dockerfile=str(spec.dockerfile),
                tag=str(spec.image),
                buildargs=build_args or None,
                cache_from=cache or None,
                rm=True,
                forcerm=True,
                decode=True,
            )
            for line, chunk in _lines(chunks):
                if line is not None:
                    if _STEP.match(line):
                        step, step_output = line, []
                    else:
                        step_output.append(line)
                    gh.log(line)
                elif "error" in chunk:
                    detail = chunk.get("errorDetail") or {}
                    _build_failed(spec, step, step_output, str(detail.get("message") or chunk["error"]))
                elif isinstance(chunk.get("aux"), dict) and chunk["aux"].get("ID"):
                    image_id = chunk["aux"]["ID"]
        except docker.errors.DockerException as exc:
            _build_failed(spec, step, step_output, str(getattr(exc, "explanation", None) or exc))
    if not image_id:
        _build_failed(spec, step, step_output, "the engine reported no image")
    return image_id


def _build_failed(spec: BuildSpec, step: str, output: list[str], reason: str) -> NoReturn:
    tail = [line for line in output if line.strip()][-ERROR_TAIL_LINES:]
    quoted = "\n".join(tail) if tail else "(no output)"
    raise BuildFailed(
        f"docker build of {spec.image} (from {spec.line}) failed at {step}: {reason.strip()}\n"
        f"Output of that step:\n{quoted}",
        fix="Fix the Dockerfile or the build context; the whole build log is in the group above.",
    )


def _push(client: Any, ref: ImageRef, auth: dict[str, str] | None, gh: Workflow) -> str:
    import docker

    digest = ""
    with gh.untrusted():  # the registry's messages
        try:
            chunks = client.api.push(ref.repository, tag=ref.tag, stream=True, decode=True, auth_config=auth)
            for chunk in chunks:
                if "error" in chunk:
                    reason = (chunk.get("errorDetail") or {}).get("message") or chunk["error"]
                    raise PushFailed(
                        f"could not push {ref} to {image_registry(ref)}: {reason}",
                        fix=FIX_PUSH,
                    )
                aux = chunk.get("aux")
                if isinstance(aux, dict) and aux.get("Digest"):
                    digest = str(aux["Digest"])
                status = chunk.get("status")
                if isinstance(status, str) and status not in _NOISY_PUSH_STATUSES:
                    gh.log(f"{chunk['id']}: {status}" if chunk.get("id") else status)
        except docker.errors.DockerException as exc:
            raise PushFailed(
                f"could not push {ref} to {image_registry(ref)}: {getattr(exc, 'explanation', None) or exc}",
                fix=FIX_PUSH,
            ) from None
    if not digest:
        raise PushFailed(
            f"could not push {ref} to {image_registry(ref)}: the engine reported no digest", fix=FIX_PUSH
        )
    return digest
