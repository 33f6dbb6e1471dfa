"""Release helpers for .github/workflows/release.yml (never used by the action at run time).

A release publishes the action's image to GHCR and then a release commit whose action.yml says
`image: docker://ghcr.io/OWNER/REPO@sha256:DIGEST`, so a job pulls that exact image instead of
building the Dockerfile, and a user pinned to the release commit's SHA always gets the same
image. This module plans the tags and rewrites action.yml; standard library only (the workflow
runs it with the runner's python3, before anything is installed).

    python3 -m devkit.release plan --event push --ref-name v1.2.3 --repository o/r --sha SHA
    python3 -m devkit.release pin --file action.yml --image ghcr.io/o/r --digest sha256:...
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

REGISTRY = "ghcr.io"
_VERSION = re.compile(r"^v?(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# GHCR names: lowercase; owner as GitHub allows it, repository path parts as OCI allows them.
_GHCR_IMAGE = re.compile(r"^ghcr\.io/[a-z0-9](?:[a-z0-9-]{0,38})(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)+$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_REPOSITORY = re.compile(r"^[A-Za-z0-9-]+/[A-Za-z0-9_.-]+$")


class ReleaseError(ValueError):
    """A release input is not what a release may publish."""


@dataclass(frozen=True, order=True)
class Version:
    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


def parse_version(text: str) -> Version:
    """`1.2.3` or `v1.2.3` (no leading zeros, no pre-release suffix)."""
    match = _VERSION.fullmatch(text.strip())
    if not match:
        raise ReleaseError(f"version must be X.Y.Z (optionally with a leading v), got {text!r}")
    return Version(*(int(part) for part in match.groups()))


def existing_versions(tags: Iterable[str]) -> list[Version]:
    """The release versions among tag names (`v1.2.3`, `refs/tags/v1.2.3`); others ignored."""
    found = []
    for tag in tags:
        name = tag.strip().split("\t")[-1].removeprefix("refs/tags/")
        if name.startswith("v"):
            try:
                found.append(parse_version(name))
            except ReleaseError:
                continue
    return found


def ghcr_image(repository: str) -> str:
    """`ghcr.io/owner/repo` for a GitHub repository (GHCR wants lowercase)."""
    if not _REPOSITORY.fullmatch(repository):
        raise ReleaseError(f"not a GitHub repository name (OWNER/REPO): {repository!r}")
    image = f"{REGISTRY}/{repository.lower()}"
    _check_image(image)
    return image


def _check_image(image: str) -> None:
    if not image.startswith(f"{REGISTRY}/"):
        raise ReleaseError(f"releases publish to GHCR only ({REGISTRY}/OWNER/REPO), got {image!r}")
    if not _GHCR_IMAGE.fullmatch(image):
        raise ReleaseError(f"not a GHCR image name without tag or digest: {image!r}")


@dataclass(frozen=True)
class Plan:
    version: Version
    image: str
    tags: list[str]  # full image references to push
    move_major: bool  # vX (and image :X) follow this release


def plan(version: Version, image: str, sha: str, released: Iterable[Version]) -> Plan:
    """The image tags of a release: full version, major.minor and major (only when this is the
    newest release of that line, so a fix to an old line never moves them back), commit SHA."""
    _check_image(image)
    if not _SHA.fullmatch(sha):
        raise ReleaseError(f"commit SHA must be 40 hex digits, got {sha!r}")
    others = [v for v in released if v != version]
    newest_minor = all(v < version for v in others if (v.major, v.minor) == (version.major, version.minor))
    newest_major = all(v < version for v in others if v.major == version.major)
    tags = [f"{image}:{version}"]
    if newest_minor:
        tags.append(f"{image}:{version.major}.{version.minor}")
    if newest_major:
        tags.append(f"{image}:{version.major}")
    tags.append(f"{image}:{sha}")
    return Plan(version, image, tags, newest_major)


def pinned_reference(image: str, digest: str) -> str:
    """`docker://ghcr.io/owner/repo@sha256:...`, the value release commits give runs.image."""
    _check_image(image)
    if not _DIGEST.fullmatch(digest):
        raise ReleaseError(f"digest must be sha256: and 64 lowercase hex digits, got {digest!r}")
    return f"docker://{image}@{digest}"


_TOP_KEY = re.compile(r"^([A-Za-z0-9_-]+)\s*:")
_IMAGE_LINE = re.compile(
    r"""^(?P<indent>[ ]+)image(?P<sep>[ ]*:[ ]*)(?P<value>"[^"\n]*"|'[^'\n]*'|[^\s#][^\n#]*?)"""
    r"""(?P<rest>[ ]+\#[^\r\n]*|[ ]*)(?P<eol>\r?\n|)$"""
)


def pin_action_yml(text: str, image: str, digest: str) -> str:
    """action.yml with `runs.image` set to the pinned image; every other byte unchanged.

    Refuses a file whose `runs:` block does not hold exactly one plain `image:` line.
    """
    reference = pinned_reference(image, digest)
    lines = text.splitlines(keepends=True)
    in_runs = False
    runs_indent: int | None = None
    found: list[int] = []
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        top = _TOP_KEY.match(line)
        if top:  # a top-level key (no indentation) opens or closes the runs block
            in_runs = top.group(1) == "runs"
            runs_indent = None
            if in_runs and line[top.end() :].split("#", 1)[0].strip():
                raise ReleaseError("action.yml: `runs:` must be a block mapping, not an inline value")
            continue
        if not in_runs:
            continue
        indent = len(line) - len(line.lstrip(" "))
        if runs_indent is None:
            runs_indent = indent
        if indent == runs_indent and re.match(r"^\s*image\s*:", line):
            found.append(number)
    if len(found) != 1:
        raise ReleaseError(f"action.yml: expected one `image:` key under `runs:`, found {len(found)}")
    number = found[0]
    match = _IMAGE_LINE.match(lines[number])
    if not match:
        raise ReleaseError(f"action.yml: cannot rewrite line {number + 1}: {lines[number].rstrip()!r}")
    lines[number] = f"{match['indent']}image{match['sep']}{reference}{match['rest']}{match['eol']}"
    return "".join(lines)


def _write_outputs(values: dict[str, str]) -> None:
    """To $GITHUB_OUTPUT when set (multi-line values with a delimiter), else stdout."""
    target = os.environ.get("GITHUB_OUTPUT")
    text = ""
    for name, value in values.items():
        if "\n" in value:
            delimiter = f"EOF_{os.urandom(8).hex()}"
            text += f"{name}<<{delimiter}\n{value}\n{delimiter}\n"
        else:
            text += f"{name}={value}\n"
    if target:
        with open(target, "a", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m devkit.release", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("plan", help="version, image and tags of this release (to GITHUB_OUTPUT)")
    p.add_argument("--event", required=True, help="github.event_name: push (of a tag) or workflow_dispatch")
    p.add_argument("--ref-name", default="", help="github.ref_name (the pushed tag)")
    p.add_argument("--version", default="", help="the workflow_dispatch input")
    p.add_argument("--repository", required=True, help="github.repository (OWNER/REPO)")
    p.add_argument("--sha", required=True, help="github.sha, the commit the image is built from")
    p.add_argument("--tags-file", type=Path, help="existing tag names, one a line (git tag --list)")
    q = commands.add_parser("pin", help="point action.yml's runs.image at the pushed image's digest")
    q.add_argument("--file", type=Path, default=Path("action.yml"))
    q.add_argument("--image", required=True, help="ghcr.io/OWNER/REPO")
    q.add_argument("--digest", required=True, help="sha256:... of the pushed image")
    args = parser.parse_args(argv)
    try:
        if args.command == "plan":
            if args.event == "workflow_dispatch":
                version = parse_version(args.version)
            elif args.event == "push":
                version = parse_version(args.ref_name)
            else:
                raise ReleaseError(f"releases run on a tag push or workflow_dispatch, not {args.event!r}")
            tags = args.tags_file.read_text().splitlines() if args.tags_file else []
            released = existing_versions(tags)
            if args.event == "workflow_dispatch" and version in released:
                raise ReleaseError(f"v{version} is released already; choose a new version")
            result = plan(version, ghcr_image(args.repository), args.sha, released)
            _write_outputs(
                {
                    "version": str(version),
                    "major": str(version.major),
                    "image": result.image,
                    "tags": "\n".join(result.tags),
                    "move-major": str(result.move_major).lower(),
                }
            )
        else:
            with open(args.file, encoding="utf-8", newline="") as f:
                text = f.read()
            with open(args.file, "w", encoding="utf-8", newline="") as f:
                f.write(pin_action_yml(text, args.image, args.digest))
    except (ReleaseError, OSError) as exc:
        print(f"::error title=Release refused::{exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
