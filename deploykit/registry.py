"""Pre-flight check: every image the manifests will run exists in its registry.

The original pipeline learned about a tag that was never pushed minutes into the deploy, from
pods stuck in ImagePullBackOff. This module asks each registry first, through the registry
HTTP API v2 (the protocol every registry speaks: Docker Hub, GHCR, ECR, Harbor, Debian's
docker-registry): a manifest HEAD answers 200 with the digest, or 404 when the tag is missing.

Authentication follows the registry's `WWW-Authenticate` challenge: `Bearer` (Docker Hub, GHCR:
a token from the realm it names, with the login when it is for that registry, anonymous
otherwise) or `Basic` (htpasswd, ECR). Plain HTTP is used only for registries on the loopback
interface, and only when they do not speak TLS; everything else is HTTPS, trusting the system's
CAs plus the engine's `/etc/docker/certs.d/HOST[:PORT]/*.crt`, as Docker does.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploykit.errors import (
    ImageMissing,
    ImageUnverified,
    InputError,
    RegistryLoginFailed,
    RegistryUnavailable,
)
from deploykit.github import Workflow
from deploykit.images import DOCKER_HUB, ImageRef, containers, parse_image, pod_specs

# Docker Hub's names for itself; its API lives on another host than its name.
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_CERTS_DIR = Path("/etc/docker/certs.d")
# Every manifest type a tag can point to; without the list types a registry answers 404 for a
# multi-platform image, and without the Docker ones it may convert and report another digest.
MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)
REQUEST_TIMEOUT = 20
VERIFY_MODES = ("auto", "true", "false")  # the input 'verify-images'; check_images says what each does
MAX_PASSWORD_LENGTH = 16384  # ECR's tokens are about 2,000 characters, GCP's about 1,000
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Shown when a registry answers 404 for an image the manifests will deploy.
IMAGE_MISSING_FIX = (
    "Push the image first (or let this step build it with the 'build' input), check the tag "
    "(input 'image-tag', default GITHUB_SHA), or set 'verify-images: false' if the registry is "
    "reachable only from the cluster."
)
# Shown when a registry cannot be reached (verify-images: auto goes on with it as a warning).
UNREACHABLE_FIX = (
    "Set 'verify-images: false' for a registry that only the cluster can reach, or 'true' to "
    "make this an error."
)
LOGIN_REFUSED_FIX = (
    "Check 'registry-username' and 'registry-password' (for GHCR a token with read:packages / "
    "write:packages, for Docker Hub an access token, for ECR the output of "
    "aws-actions/amazon-ecr-login)."
)


@dataclass(frozen=True)
class RegistryLogin:
    registry: str  # host[:port] as `docker login` takes it; docker.io for Docker Hub
    username: str
    password: str = field(repr=False)  # never in a repr, a log line or an error

    def applies_to(self, host: str) -> bool:
        return registry_host(self.registry) == registry_host(host)


def registry_host(host: str) -> str:
    """The registry's canonical host: Docker Hub's aliases become docker.io."""
    return DOCKER_HUB if host in DOCKER_HUB_ALIASES or not host else host


def image_registry(ref: ImageRef) -> str:
    return registry_host(ref.domain)


def image_path(ref: ImageRef) -> str:
    """The repository path inside its registry (`redis` on Docker Hub is `library/redis`)."""
    return ref.canonical_repository.split("/", 1)[1]


def is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_login(registry: str, username: str, password: str) -> RegistryLogin | None:
    """Validate the three login inputs. Messages never show the password."""
    registry, username = registry.strip(), username.strip()
    password = password.strip("\r\n")
    if not username and not password:
        if registry:
            raise InputError(
                f"input 'registry' ({registry!r}) needs 'registry-username' and 'registry-password'"
            )
        return None
    if not username or not password:
        missing = "registry-password" if username else "registry-username"
        raise InputError(f"input '{missing}' is required when the other half of the login is set")
    if _CONTROL.search(username) or len(username) > 255:
        raise InputError(
            f"input 'registry-username' must be 1 to 255 characters without control characters, "
            f"got {username[:80]!r}"
        )
    if _CONTROL.search(password) or len(password) > MAX_PASSWORD_LENGTH:
        raise InputError(
            f"input 'registry-password' must be 1 to {MAX_PASSWORD_LENGTH} characters without "
            "control characters or inner newlines (value not shown)"
        )
    host = registry or DOCKER_HUB
    host = re.sub(r"^https?://", "", host).rstrip("/")
    if host.endswith("/v1") or host.endswith("/v2"):  # `docker login https://index.docker.io/v1/`
        host = host[:-3]
    try:
        valid = parse_image(f"{host}/probe").domain == host
    except ValueError:
        valid = False
    if not valid:
        raise InputError(
            "input 'registry' must be a registry host such as ghcr.io, docker.io or "
            f"localhost:5000, got {registry!r}"
        )
    return RegistryLogin(registry_host(host), username, password)


def images_in(manifests: Iterable[Any]) -> list[ImageRef]:
    """Every distinct, valid container image reference in the rendered manifests, sorted."""
    found: dict[str, ImageRef] = {}
    for manifest in manifests:
        for pod_spec in pod_specs(manifest.body):
            for container in containers(pod_spec):
                image = container.get("image")
                if not isinstance(image, str):
                    continue
                try:
                    found.setdefault(image, parse_image(image))
                except ValueError:
                    continue  # the API server will refuse it with its own message
    return [found[key] for key in sorted(found)]


def with_digest(ref: ImageRef, digest: str) -> str:
    """The reference with the digest it resolved to, as `docker pull` takes it."""
    return str(ImageRef(ref.domain, ref.path, ref.tag, digest or ref.digest))


# --------------------------------------------------------------------------------------------
# The registry API


class _NoRedirectToHttp(urllib.request.HTTPRedirectHandler):
    """Registries redirect blob and token requests to storage; never follow one to plain HTTP
    off the loopback interface with credentials."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        parsed = urllib.parse.urlsplit(newurl)
        if parsed.scheme != "https" and not is_loopback(parsed.netloc):
            raise urllib.error.HTTPError(newurl, code, "redirect to plain HTTP refused", headers, fp)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(req.full_url).netloc != parsed.netloc:
            new.remove_header("Authorization")  # credentials are for the registry, not storage
        return new


def _tls_context(host: str) -> ssl.SSLContext:
    context = ssl.create_default_context()
    folder = DOCKER_CERTS_DIR / host
    if folder.is_dir():
        for cert in sorted(folder.glob("*.crt")):
            context.load_verify_locations(cafile=str(cert))
    return context


@dataclass
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes


Transport = Callable[[urllib.request.Request, str], Response]


def _send(request: urllib.request.Request, host: str) -> Response:
    handlers: list[Any] = [_NoRedirectToHttp(), urllib.request.HTTPSHandler(context=_tls_context(host))]
    if is_loopback(host):
        handlers.append(urllib.request.ProxyHandler({}))  # a proxy cannot reach our loopback
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(request, timeout=REQUEST_TIMEOUT) as reply:
            return Response(reply.status, reply.headers, reply.read(1_000_000))
    except urllib.error.HTTPError as exc:
        return Response(exc.code, exc.headers, exc.read(1_000_000) if exc.fp else b"")


class RegistryClient:
    """Manifest look-ups on one registry, with the auth it asks for."""

    def __init__(self, host: str, login: RegistryLogin | None, transport: Transport = _send) -> None:
        self.host = registry_host(host)
        self.login = login if login is not None and login.applies_to(self.host) else None
        self._transport = transport
        self._base: str | None = None
        self._tokens: dict[str, str] = {}

    def _api_host(self) -> str:
        return DOCKER_HUB_API if self.host == DOCKER_HUB else self.host

    def base_url(self) -> str:
        """https://HOST, or http://HOST for a loopback registry that does not speak TLS."""
        if self._base is None:
            https = f"https://{self._api_host()}"
            if not is_loopback(self.host):
                self._base = https
            else:
                try:
                    self._request("GET", f"{https}/v2/")
                    self._base = https
                except RegistryUnavailable as exc:
                    if not isinstance(exc.__cause__, ssl.SSLError) or isinstance(
                        exc.__cause__, ssl.SSLCertVerificationError
                    ):
                        raise
                    self._base = f"http://{self._api_host()}"
        return self._base

    def _request(self, method: str, url: str, headers: Mapping[str, str] | None = None) -> Response:
        # every URL here is https:// or http:// built by this class (S310 warns of file:)
        request = urllib.request.Request(url, method=method, headers=dict(headers or {}))  # noqa: S310
        try:
            return self._transport(request, self.host)
        except OSError as exc:  # urllib's URLError is one, and wraps the socket's or TLS's error
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            cause = reason if isinstance(reason, BaseException) else exc
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise RegistryUnavailable(
                    f"registry {self.host} presented a certificate this machine does not trust "
                    f"({reason.verify_message}); add its CA to /etc/docker/certs.d/{self.host}/ca.crt "
                    "(as for the Docker engine) or to SSL_CERT_FILE"
                ) from cause
            raise RegistryUnavailable(f"registry {self.host} did not answer at {url}: {reason}") from cause

    def manifest_digest(self, path: str, reference: str) -> str | None:
        """The digest `reference` (a tag or a digest) resolves to, or None when it is missing."""
        url = f"{self.base_url()}/v2/{path}/manifests/{reference}"
        headers = {"Accept": MANIFEST_TYPES}
        reply = self._authorized("HEAD", url, headers, path)
        if reply.status == 404:
            return None
        if reply.status in (401, 403):
            if self.login is None:
                raise NeedsLogin(f"registry {self.host} lets no anonymous client read {path}")
            raise RegistryLoginFailed(
                _refused(self.host, self.login.username, reply.status, path), fix=LOGIN_REFUSED_FIX
            )
        if reply.status != 200:
            raise RegistryUnavailable(
                f"registry {self.host} answered HTTP {reply.status} for the manifest of {path}:{reference}"
            )
        digest = reply.headers.get("Docker-Content-Digest", "")
        if not digest and reference.startswith("sha256:"):
            digest = reference
        return digest

    def _authorized(self, method: str, url: str, headers: dict[str, str], path: str) -> Response:
        scope = f"repository:{path}:pull"
        if scope in self._tokens:
            headers = {**headers, "Authorization": self._tokens[scope]}
        reply = self._request(method, url, headers)
        if reply.status != 401 or "Authorization" in headers:
            return reply
        challenge = reply.headers.get("WWW-Authenticate", "")
        scheme, _, params_text = challenge.partition(" ")
        params = dict(_CHALLENGE_PARAM.findall(params_text))
        if scheme.lower() == "basic":
            if self.login is None:
                return reply
            self._tokens[scope] = "Basic " + _basic(self.login)
        elif scheme.lower() == "bearer" and params.get("realm"):
            self._tokens[scope] = "Bearer " + self._token(params, scope)
        else:
            return reply
        return self._request(method, url, {**headers, "Authorization": self._tokens[scope]})

    def _token(self, params: Mapping[str, str], scope: str) -> str:
        realm = params["realm"]
        parsed = urllib.parse.urlsplit(realm)
        if parsed.scheme != "https" and not (parsed.scheme == "http" and is_loopback(parsed.netloc)):
            raise RegistryUnavailable(f"registry {self.host} sends logins to {realm!r}, which is not HTTPS")
        query = {"scope": scope}
        if params.get("service"):
            query["service"] = params["service"]
        url = realm + ("&" if parsed.query else "?") + urllib.parse.urlencode(query)
        headers = {"Authorization": "Basic " + _basic(self.login)} if self.login else {}
        reply = self._request("GET", url, headers)
        if reply.status in (401, 403):
            if self.login is None:
                raise NeedsLogin(f"registry {self.host}'s token service refuses anonymous clients")
            raise RegistryLoginFailed(
                _refused(self.host, self.login.username, reply.status, scope), fix=LOGIN_REFUSED_FIX
            )
        try:
            answer = json.loads(reply.body)
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if reply.status != 200 or not isinstance(token, str) or not token:
            raise RegistryUnavailable(
                f"registry {self.host}'s token service answered HTTP {reply.status} without a token"
            )
        return token


class NeedsLogin(Exception):
    """The registry answers only clients with a login, and this step has none for it."""


def _refused(host: str, username: str, status: int, what: str) -> str:
    # Shown when the registry turns the login down: a wrong password, or a user without access.
    return (
        f"registry {host} refused the login of user {username!r} (HTTP {status} for {what}): "
        "wrong password or token, or no read access"
    )


def _basic(login: RegistryLogin | None) -> str:
    assert login is not None
    return base64.b64encode(f"{login.username}:{login.password}".encode()).decode()


# --------------------------------------------------------------------------------------------
# The pre-flight step


def check_images(
    refs: Iterable[ImageRef],
    login: RegistryLogin | None,
    gh: Workflow,
    *,
    verify: str,
    known: Mapping[str, str] | None = None,
    transport: Transport = _send,
) -> list[str]:
    """Check that every reference exists, as `verify` (the input 'verify-images') says, and
    return the references with the digests they resolve to: the `images` output. `known` maps
    the references this step pushed to their digests; they are checked too (the registry is the
    one the cluster pulls from).

    - `false`: nothing is asked.
    - `auto`: every registry is asked, anonymously unless the login is for it (public images on
      Docker Hub, GHCR and ECR Public answer anonymous clients through the token flow). A tag
      the registry says is missing stops the deploy. A registry that cannot be reached, or
      that answers only clients with a login this step does not have, is a warning: the image
      may well exist, and the cluster may have its own way in (a mirror, imagePullSecrets).
    - `true`: the same, but that warning is an error.

    A login the registry refuses is an error either way: it was given for that registry.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    known = dict(known or {})
    clients: dict[str, RegistryClient] = {}
    # host -> why it could not be reached: asked once per run. (A login is wanted per repository:
    # Docker Hub serves public and private ones side by side.)
    skipped: dict[str, str] = {}
    refs = list(refs)
    if verify != "false" and refs:
        hosts = {image_registry(ref) for ref in refs}
        gh.log(f"Checking {_count(len(refs), 'image')} in {_count(len(hosts), 'registry')}")
    described: list[str] = []
    for ref in refs:
        digest = ref.digest or known.get(str(ref), "")
        host = image_registry(ref)
        if verify != "false" and host not in skipped:
            client = clients.setdefault(host, RegistryClient(host, login, transport))
            try:
                found = client.manifest_digest(image_path(ref), ref.digest or ref.tag or "latest")
            except NeedsLogin as exc:
                fix = (
                    f"Give this step a login for {host} ('registry', 'registry-username', "
                    "'registry-password') to check it"
                )
                if verify == "true":
                    raise ImageUnverified(
                        f"could not check {ref}: {exc}",
                        fix=f"{fix}, or set 'verify-images: auto' to go on with a warning.",
                    ) from None
                gh.warning(
                    f"Could not check {ref}: {exc}; the deploy goes on. {fix}.", title="Image not verified"
                )
                found = digest
            except RegistryUnavailable as exc:
                if verify == "true":
                    raise
                skipped[host] = exc.message
                gh.warning(
                    f"Could not check the images on {host}: {exc.message}; the deploy goes on. "
                    f"{UNREACHABLE_FIX}",
                    title="Image not verified",
                )
                found = digest
            if found is None:
                what = f"digest {ref.digest}" if ref.digest else f"tag {ref.tag or 'latest'}"
                raise ImageMissing(
                    f"image {ref} is not in its registry: {host} has no {what} for "
                    f"{image_path(ref)}; the cluster could not pull it",
                    fix=IMAGE_MISSING_FIX,
                )
            if found:
                gh.log(f"Found {ref} in {host} ({found})")
            digest = found
        elif verify != "false":
            gh.log(f"Not checked: {ref} ({host}: {skipped[host]})")
        described.append(with_digest(ref, digest))
    return described


def _count(number: int, noun: str) -> str:
    plural = {"registry": "registries"}.get(noun, noun + "s")
    return f"{number} {noun if number == 1 else plural}"

