"""Image references: parse, normalise, and pin the images of pod templates.

The grammar is the one of the distribution/reference package that Docker and containerd use:
`[DOMAIN[:PORT]/]PATH[:TAG][@DIGEST]`. The first path component is a registry domain only when
it contains a `.` or a `:` or is `localhost`; otherwise the image is on Docker Hub, where
`redis` means `docker.io/library/redis`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*)(?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"  # ASCII only: Python's \w would accept any letter
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE = re.compile(
    rf"^(?P<name>(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?$"
)
TAG_PATTERN = re.compile(rf"^{_TAG}$")
MAX_NAME_LENGTH = 255
DOCKER_HUB = "docker.io"


@dataclass(frozen=True)
class ImageRef:
    domain: str  # "" when the reference names none (Docker Hub)
    path: str
    tag: str = ""
    digest: str = ""

    @property
    def repository(self) -> str:
        """The repository as written, without tag or digest."""
        return f"{self.domain}/{self.path}" if self.domain else self.path

    @property
    def canonical_repository(self) -> str:
        """The repository with Docker Hub's implicit parts spelled out, for matching."""
        domain = self.domain or DOCKER_HUB
        if domain in ("index.docker.io", "registry-1.docker.io"):
            domain = DOCKER_HUB
        path = self.path
        if domain == DOCKER_HUB and "/" not in path:
            path = f"library/{path}"
        return f"{domain}/{path}"

    def with_tag(self, tag: str) -> ImageRef:
        return ImageRef(self.domain, self.path, tag, self.digest)

    def __str__(self) -> str:
        text = self.repository
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_image(reference: str) -> ImageRef:
    """Parse a reference; ValueError with the reason when it is not one."""
    match = _REFERENCE.fullmatch(reference)  # not match(): `$` would let a trailing newline through
    if not match:
        raise ValueError("not a valid image reference ([REGISTRY[:PORT]/]NAME[:TAG][@DIGEST])")
    name = match["name"]
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"repository name longer than {MAX_NAME_LENGTH} characters")
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        domain, path = first, rest
    else:
        domain, path = "", name
    if domain and not re.fullmatch(_DOMAIN, domain):
        raise ValueError("not a valid registry host")
    return ImageRef(domain, path, match["tag"] or "", match["digest"] or "")


def pod_specs(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The pod specs inside one Kubernetes object, wherever its kind keeps them."""
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return
    if doc.get("kind") == "Pod":
        yield spec
        return
    if doc.get("kind") == "CronJob":
        job_template = spec.get("jobTemplate")
        spec = job_template.get("spec") if isinstance(job_template, dict) else None
    template = spec.get("template") if isinstance(spec, dict) else None
    if isinstance(template, dict) and isinstance(template.get("spec"), dict):
        yield template["spec"]


def containers(pod_spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for key in ("initContainers", "containers"):
        for container in pod_spec.get(key) or []:
            if isinstance(container, dict):
                yield container


def pin_images(doc: dict[str, Any], pins: dict[str, ImageRef]) -> set[str]:
    """Point every container whose repository is in `pins` at the pinned reference.

    `pins` maps canonical repositories to references. Returns the canonical repositories used.
    """
    used: set[str] = set()
    for pod_spec in pod_specs(doc):
        for container in containers(pod_spec):
            image = container.get("image")
            if not isinstance(image, str):
                continue
            try:
                current = parse_image(image)
            except ValueError:
                continue  # not ours to judge; the API server will
            pinned = pins.get(current.canonical_repository)
            if pinned is not None:
                container["image"] = str(pinned)
                used.add(current.canonical_repository)
    return used
