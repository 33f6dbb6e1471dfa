"""Real registries and a real Docker engine for the build-and-push and image-check tests.

Debian's `docker-registry` (the CNCF distribution registry) runs on 127.0.0.1 on free ports,
started here with a config file in a temporary folder:

- `plain_registry`: plain HTTP, no login (the engine allows HTTP for loopback registries);
- `tls_registry`: HTTPS with a self-signed certificate and an htpasswd login (the registry
  takes htpasswd logins over TLS only). The certificate goes to the engine's
  `/etc/docker/certs.d/127.0.0.1:PORT/ca.crt`, where both the engine and the action look.

The engine is the one `.ci/docker-engine.sh` starts, and the example apps are built on the
local base image of `.ci/base-image.sh`. A missing engine, registry binary or base image
fails the tests: they never skip.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devkit.simulate.aws import Master, SimulatedAWS
from devkit.simulate.cluster import Cluster
from devkit.simulate.runner import ActionRun, run_action
from tests import sample_platform as platform
from tests.sample_platform import NS  # noqa: F401 - the registry tests import it from here

REPO = Path(__file__).resolve().parents[2]
APPS = REPO / "examples" / "production-platform" / "app"
LOCAL_BASE_IMAGE = "k3s-deploy-base:bookworm"
CERTS_D = Path("/etc/docker/certs.d")
START_TIMEOUT_S = 30
SETUP_HINT = "run `bash .ci/run` (it installs docker-registry and starts the engine) or do its steps by hand"
MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "registry: needs Debian's docker-registry and the Docker engine (real parts)"
    )


def docker_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker")
    if exe is None:
        pytest.fail(f"no docker client on PATH: {SETUP_HINT}", pytrace=False)
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, check=False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Registry:
    """One running registry, and what a test needs to look into it without the action."""

    host: str  # 127.0.0.1:PORT
    scheme: str
    root: Path
    process: subprocess.Popen[bytes]
    username: str = ""
    password: str = field(default="", repr=False)
    ca_file: Path | None = None

    def _open(self, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
        headers = dict(headers or {})
        if self.username:
            token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        url = f"{self.scheme}://{self.host}{path}"  # http or https only
        request = urllib.request.Request(url, method=method, headers=headers)  # noqa: S310
        context = ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else None
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        try:
            with opener.open(request, timeout=10) as reply:
                return reply.status, dict(reply.headers), reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def digest(self, path: str, reference: str) -> str | None:
        """The digest the registry serves for `path:reference`, None when it has none."""
        status, headers, _ = self._open(
            "HEAD", f"/v2/{path}/manifests/{reference}", {"Accept": MANIFEST_TYPES}
        )
        if status == 404:
            return None
        assert status == 200, f"registry {self.host} answered {status} for {path}:{reference}"
        return headers["Docker-Content-Digest"]

    def tags(self, path: str) -> list[str]:
        status, _, body = self._open("GET", f"/v2/{path}/tags/list")
        if status == 404:
            return []
        assert status == 200, f"registry {self.host} answered {status} for the tags of {path}"
        return sorted(json.loads(body).get("tags") or [])

    def log(self) -> str:
        path = self.root / "registry.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _config(root: Path, port: int, tls: tuple[Path, Path] | None, htpasswd: Path | None) -> Path:
    lines = [
        "version: 0.1",
        "log:",
        "  level: warn",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {root / 'data'}",
        "  delete:",
        "    enabled: true",
        "http:",
        f"  addr: 127.0.0.1:{port}",
        f"  secret: {secrets.token_hex(16)}",
    ]
    if tls:
        lines += ["  tls:", f"    certificate: {tls[0]}", f"    key: {tls[1]}"]
    if htpasswd:
        lines += ["auth:", "  htpasswd:", "    realm: k3s-deploy-tests", f"    path: {htpasswd}"]
    config = root / "config.yml"
    config.write_text("\n".join(lines) + "\n")
    return config


def _start(binary: str, root: Path, port: int, scheme: str, config: Path, **extra: object) -> Registry:
    log = (root / "registry.log").open("wb")
    process = subprocess.Popen(
        [binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    log.close()
    registry = Registry(f"127.0.0.1:{port}", scheme, root, process, **extra)  # type: ignore[arg-type]
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"docker-registry exited with {process.returncode}:\n{registry.log()}", pytrace=False)
        with contextlib.suppress(OSError):
            status, _, _ = registry._open("GET", "/v2/")
            if status in (200, 401):
                return registry
        if time.monotonic() > deadline:
            _stop(registry)
            pytest.fail(
                f"docker-registry did not answer in {START_TIMEOUT_S}s:\n{registry.log()}", pytrace=False
            )
        time.sleep(0.1)


def _stop(registry: Registry) -> None:
    registry.process.terminate()
    try:
        registry.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        registry.process.kill()
        registry.process.wait(timeout=10)


def _remove_images_of(host: str) -> None:
    """Drop every local image this session tagged for the registry (vfs stores full copies)."""
    listed = docker_cli("image", "ls", "--format", "{{.Repository}}:{{.Tag}}")
    mine = [name for name in listed.stdout.split() if name.startswith(f"{host}/")]
    if mine:
        docker_cli("image", "rm", "--force", *mine)


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA, and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "k3s-deploy test registry")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "registry.crt", folder / "registry.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_file.chmod(0o600)
    return cert_file, key_file


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def docker_engine() -> None:
    proc = docker_cli("info", timeout=60)
    if proc.returncode != 0:
        pytest.fail(
            f"no Docker engine answers (`docker info`: {proc.stderr.strip()[-300:]}): {SETUP_HINT}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def registry_binary() -> str:
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.fail(
            f"Debian's docker-registry is not installed (apt-get install docker-registry): {SETUP_HINT}",
            pytrace=False,
        )
    return binary


@pytest.fixture(scope="session")
def base_image(docker_engine: None) -> str:
    """The local stand-in for python:3.12-slim that the example apps are built FROM."""
    chosen = os.environ.get("K3S_DEPLOY_BASE_IMAGE", "").strip()
    if chosen:
        return chosen
    if docker_cli("image", "inspect", LOCAL_BASE_IMAGE).returncode == 0:
        return LOCAL_BASE_IMAGE
    proc = subprocess.run(
        ["bash", str(REPO / ".ci" / "base-image.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={**os.environ, "BASE_IMAGE_NAME": LOCAL_BASE_IMAGE},
    )
    if proc.returncode != 0:
        pytest.fail(f"bash .ci/base-image.sh failed:\n{proc.stderr[-3000:]}", pytrace=False)
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def plain_registry(
    registry_binary: str, docker_engine: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("plain-registry")
    port = free_port()
    registry = _start(registry_binary, root, port, "http", _config(root, port, None, None))
    try:
        yield registry
    finally:
        _stop(registry)
        _remove_images_of(registry.host)


@pytest.fixture(scope="session")
def tls_registry(
    registry_binary: str, docker_engine: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Registry]:
    import bcrypt

    root = tmp_path_factory.mktemp("tls-registry")
    port = free_port()
    cert, key = self_signed_certificate(root)
    username, password = "ci-pusher", "pw-" + secrets.token_urlsafe(18)
    htpasswd = root / "htpasswd"
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=6)).decode()
    htpasswd.write_text(f"{username}:{hashed}\n")
    trust = CERTS_D / f"127.0.0.1:{port}"
    try:
        trust.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        pytest.fail(f"cannot write {trust}: the engine's certs.d needs root (CI runs as root)", pytrace=False)
    shutil.copyfile(cert, trust / "ca.crt")
    registry = _start(
        registry_binary,
        root,
        port,
        "https",
        _config(root, port, (cert, key), htpasswd),
        username=username,
        password=password,
        ca_file=cert,
    )
    try:
        yield registry
    finally:
        _stop(registry)
        _remove_images_of(registry.host)
        shutil.rmtree(trust, ignore_errors=True)


def platform_manifests(api: str, worker: str) -> dict[str, str]:
    """The example platform's two apps, with the images the tests build."""
    return {
        "namespace.yaml": platform.namespace(),
        "api.yaml": platform.deployment("api", api, progress_deadline=5),
        "worker.yaml": platform.deployment("worker", worker, progress_deadline=5),
    }


def make_workspace(root: Path, api: str, worker: str) -> Path:
    """A checked-out repository: the example apps under app/ and manifests under k8s/base."""
    workspace = root / "workspace"
    shutil.copytree(APPS, workspace / "app")
    manifests = workspace / "k8s" / "base"
    manifests.mkdir(parents=True)
    for name, text in platform_manifests(api, worker).items():
        (manifests / name).write_text(text)
    return workspace


@dataclass
class World:
    """A simulated AWS account with a K3s master, a workspace, and the registry the apps go to."""

    sim: SimulatedAWS
    master: Master
    workspace: Path
    files: Path
    registry: Registry

    @property
    def api(self) -> str:
        return f"{self.registry.host}/acme/api"

    @property
    def worker(self) -> str:
        return f"{self.registry.host}/acme/worker"

    @property
    def cluster(self) -> Cluster:
        return Cluster(self.master.cluster_state_path)

    def deploy(self, **inputs: str) -> ActionRun:
        defaults = {"aws-region": self.sim.region, "timeout": "60"}
        return run_action(self.sim, {**defaults, **inputs}, self.workspace, self.files, timeout=900)

    def buckets(self) -> list[str]:
        return [b["Name"] for b in self.sim.client("s3").list_buckets().get("Buckets", [])]

    def untouched(self) -> bool:
        """Nothing happened in AWS: no bucket, no command sent."""
        return self.buckets() == [] and self.sim.sent_commands() == []


@contextlib.contextmanager
def open_world(root: Path, registry: Registry) -> Iterator[World]:
    with SimulatedAWS(root=root / "aws") as sim:
        master = sim.add_master("k3s-master")
        api, worker = f"{registry.host}/acme/api", f"{registry.host}/acme/worker"
        workspace = make_workspace(root, api, worker)
        yield World(sim, master, workspace, root / "file_commands", registry)


def log_without_masks(log: str) -> str:
    """The log as the runner shows it: it swallows `::add-mask::` lines (and hides the value)."""
    return "\n".join(line for line in log.splitlines() if not line.startswith("::add-mask::"))


# --------------------------------------------------------------------------------------------
# A registry with token auth, as Docker Hub and GHCR do it


@dataclass
class TokenService:
    """The `realm` of a token-auth registry: hands out JWTs signed with the key whose
    certificate the registry trusts. Anyone may pull `public/*`; the login may push and pull
    everything; anonymous clients get a token without access to the rest (as Docker Hub does)."""

    url: str
    username: str
    password: str = field(repr=False)
    requests: list[dict[str, str]] = field(default_factory=list)


def _jwt(key, cert_der: bytes, claims: dict) -> str:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(cert_der).decode()]}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(signature)}"


@pytest.fixture(scope="session")
def token_registry(
    registry_binary: str, docker_engine: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Registry, TokenService]]:
    import http.server
    import threading
    import urllib.parse

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    root = tmp_path_factory.mktemp("token-registry")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "k3s-deploy test token issuer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    bundle = root / "token-issuer.crt"
    bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    cert_der = cert.public_bytes(serialization.Encoding.DER)
    service_name, issuer = "k3s-deploy-tests", "k3s-deploy-test-issuer"
    tokens = TokenService("", "ci-bearer", "pw-" + secrets.token_urlsafe(18))

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            auth = self.headers.get("Authorization", "")
            user = ""
            if auth.startswith("Basic "):
                given = base64.b64decode(auth[6:]).decode(errors="replace")
                if given != f"{tokens.username}:{tokens.password}":
                    self.send_response(401)
                    self.end_headers()
                    return
                user = tokens.username
            tokens.requests.append({"user": user, "scope": " ".join(query.get("scope", []))})
            access = []
            for scope in query.get("scope", []):
                kind, repository, actions = scope.split(":", 2)
                if user:
                    allowed = actions.split(",")
                elif repository.startswith("public/"):
                    allowed = [a for a in actions.split(",") if a == "pull"]
                else:
                    allowed = []
                access.append({"type": kind, "name": repository, "actions": allowed})
            moment = int(time.time())
            claims = {
                "iss": issuer,
                "sub": user,
                "aud": query.get("service", [""])[0],
                "exp": moment + 300,
                "nbf": moment - 10,
                "iat": moment,
                "jti": secrets.token_hex(8),
                "access": access,
            }
            body = json.dumps({"token": _jwt(key, cert_der, claims), "expires_in": 300}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    tokens.url = f"http://127.0.0.1:{server.server_address[1]}/token"

    port = free_port()
    config = _config(root, port, None, None)
    config.write_text(
        config.read_text()
        + "auth:\n  token:\n"
        + f"    realm: {tokens.url}\n    service: {service_name}\n    issuer: {issuer}\n"
        + f"    rootcertbundle: {bundle}\n"
    )
    registry = _start(registry_binary, root, port, "http", config)
    try:
        yield registry, tokens
    finally:
        _stop(registry)
        server.shutdown()
        server.server_close()
        _remove_images_of(registry.host)


def push_seed(registry: Registry, tmp: Path, path: str = "acme/seed") -> str:
    """Build a tiny image, push it as PATH:v1 with the docker CLI, return its reference."""
    context = tmp / "seed"
    context.mkdir()
    (context / "hello.txt").write_text(f"seed for {registry.host}\n")
    (context / "Dockerfile").write_text("FROM scratch\nCOPY hello.txt /hello.txt\n")
    reference = f"{registry.host}/{path}:v1"
    env = {**os.environ, "DOCKER_CONFIG": str(tmp / "docker-config")}  # leave root's config alone

    def run(*args: str, stdin: str | None = None) -> None:
        proc = subprocess.run(
            ["docker", *args], input=stdin, capture_output=True, text=True, env=env, timeout=300, check=False
        )
        assert proc.returncode == 0, f"docker {args[0]} failed: {proc.stdout}\n{proc.stderr}"

    run("build", "-t", reference, str(context))
    if registry.username:
        run("login", "-u", registry.username, "--password-stdin", registry.host, stdin=registry.password)
    run("push", reference)
    docker_cli("image", "rm", reference)
    return reference


@pytest.fixture(scope="session")
def token_seeds(token_registry, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """acme/seed:v1 (private: only the login may pull it) and public/seed:v1 (anyone may)."""
    registry, tokens = token_registry
    as_pusher = Registry(
        registry.host, "http", registry.root, registry.process, tokens.username, tokens.password
    )
    private = push_seed(as_pusher, tmp_path_factory.mktemp("token-seed"))
    public = push_seed(as_pusher, tmp_path_factory.mktemp("token-seed-public"), path="public/seed")
    return private, public


def bearer_digest(registry: Registry, tokens: TokenService, path: str, reference: str) -> str:
    """The digest the registry serves, fetched by hand with a token from the token service."""
    login = base64.b64encode(f"{tokens.username}:{tokens.password}".encode()).decode()
    query = urllib.parse.urlencode({"service": "k3s-deploy-tests", "scope": f"repository:{path}:pull"})
    url = f"{tokens.url}?{query}"  # the token service: http on 127.0.0.1
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {login}"})  # noqa: S310
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10) as reply:
        token = json.loads(reply.read())["token"]
    head = urllib.request.Request(
        f"http://{registry.host}/v2/{path}/manifests/{reference}",
        method="HEAD",
        headers={"Authorization": f"Bearer {token}", "Accept": MANIFEST_TYPES},
    )
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(head, timeout=10) as reply:
        return reply.headers["Docker-Content-Digest"]
