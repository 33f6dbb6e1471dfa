"""A fault-injecting HTTP proxy in front of the simulated AWS account.

The action's `AWS_ENDPOINT_URL` points at the proxy instead of moto's server, so every call the
action makes goes through real botocore (signing, parsing, its standard retry mode) and real
sockets. The proxy names each request's AWS operation, as AWS does:

- JSON services (SSM): the `X-Amz-Target` header (`AmazonSSM.SendCommand`);
- query services (EC2, STS): the `Action` form parameter (`Action=DescribeInstances`);
- S3 (path-style addressing): the method, whether the path names a bucket or an object, and
  the sub-resource in the query (`PUT /bucket?tagging` is PutBucketTagging).

and, by rule, answers it with a fault instead of forwarding it: throttling (400
ThrottlingException; 503 SlowDown for S3; 503 RequestLimitExceeded for EC2), a 500 or 503, a
connection dropped before or after the request reached AWS, AccessDenied, or ExpiredToken, for
the first N matching calls or always. A rule can also run a hook when its operation arrives
(tamper with a staged object, take the master offline, send the action a signal).

It listens on 127.0.0.1 and works the same for the action run in-process, as a subprocess, or
in a container with host networking. It is never imported by the action.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["KINDS", "Call", "Fault", "FaultProxy", "s3_operation"]

THROTTLE = "throttle"
SERVER_ERROR = "server-error"  # 500 InternalError
UNAVAILABLE = "unavailable"  # 503 ServiceUnavailable
DROP = "drop"  # connection closed before the request reached AWS
DROP_AFTER = "drop-after"  # the request reached AWS, its answer is lost
ACCESS_DENIED = "access-denied"
EXPIRED_TOKEN = "expired-token"  # noqa: S105 - a fault kind, not a secret
HOOK = "hook"  # run the rule's hook (it may return a new request body), then forward
ERROR = "error"  # answer with the rule's own (status, code, message)
REWRITE = "rewrite"  # forward, then pass the answer through the rule's `rewrite`
KINDS = (
    THROTTLE,
    SERVER_ERROR,
    UNAVAILABLE,
    DROP,
    DROP_AFTER,
    ACCESS_DENIED,
    EXPIRED_TOKEN,
    HOOK,
    ERROR,
    REWRITE,
)
# Rules of these kinds shape the scenario; they are not counted as injected faults.
SCENARIO_KINDS = (HOOK, REWRITE)

# Hop-by-hop headers are the proxy's own business, never forwarded.
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "upgrade"}

# S3 sub-resources (query keys) that name an operation, and the operation per method.
_S3_BUCKET_SUBRESOURCES: dict[str, dict[str, str]] = {
    "tagging": {"PUT": "PutBucketTagging", "GET": "GetBucketTagging", "DELETE": "DeleteBucketTagging"},
    "publicAccessBlock": {
        "PUT": "PutPublicAccessBlock",
        "GET": "GetPublicAccessBlock",
        "DELETE": "DeletePublicAccessBlock",
    },
    "encryption": {
        "PUT": "PutBucketEncryption",
        "GET": "GetBucketEncryption",
        "DELETE": "DeleteBucketEncryption",
    },
    "lifecycle": {
        "PUT": "PutBucketLifecycleConfiguration",
        "GET": "GetBucketLifecycleConfiguration",
        "DELETE": "DeleteBucketLifecycle",
    },
    "versioning": {"PUT": "PutBucketVersioning", "GET": "GetBucketVersioning"},
    "versions": {"GET": "ListObjectVersions"},
    "policy": {"PUT": "PutBucketPolicy", "GET": "GetBucketPolicy", "DELETE": "DeleteBucketPolicy"},
    "acl": {"PUT": "PutBucketAcl", "GET": "GetBucketAcl"},
    "location": {"GET": "GetBucketLocation"},
    "ownershipControls": {"PUT": "PutBucketOwnershipControls", "GET": "GetBucketOwnershipControls"},
    "delete": {"POST": "DeleteObjects"},
    "uploads": {"GET": "ListMultipartUploads"},
}
_S3_BUCKET_PLAIN = {
    "PUT": "CreateBucket",
    "HEAD": "HeadBucket",
    "DELETE": "DeleteBucket",
    "GET": "ListObjects",
}
_S3_OBJECT_SUBRESOURCES: dict[str, dict[str, str]] = {
    "tagging": {"PUT": "PutObjectTagging", "GET": "GetObjectTagging"},
    "acl": {"PUT": "PutObjectAcl", "GET": "GetObjectAcl"},
    "uploads": {"POST": "CreateMultipartUpload"},
    "uploadId": {"PUT": "UploadPart", "POST": "CompleteMultipartUpload", "DELETE": "AbortMultipartUpload"},
}
_S3_OBJECT_PLAIN = {"PUT": "PutObject", "GET": "GetObject", "HEAD": "HeadObject", "DELETE": "DeleteObject"}


def s3_operation(method: str, path: str, query: dict[str, list[str]], headers: dict[str, str]) -> str:
    """The S3 operation of a path-style request, e.g. ('PUT', '/b', {'tagging': ['']}) ->
    'PutBucketTagging'."""
    parts = urllib.parse.unquote(path).lstrip("/").split("/", 1)
    bucket = parts[0]
    key = parts[1] if len(parts) > 1 else ""
    if not bucket:
        return "ListBuckets" if method == "GET" else f"{method}Service"
    if key:
        for sub, by_method in _S3_OBJECT_SUBRESOURCES.items():
            if sub in query and method in by_method:
                return by_method[method]
        if method == "PUT" and "x-amz-copy-source" in headers:
            return "CopyObject"
        return _S3_OBJECT_PLAIN.get(method, f"{method}Object")
    for sub, by_method in _S3_BUCKET_SUBRESOURCES.items():
        if sub in query and method in by_method:
            return by_method[method]
    if method == "GET" and query.get("list-type") == ["2"]:
        return "ListObjectsV2"
    return _S3_BUCKET_PLAIN.get(method, f"{method}Bucket")


def _service_from_auth(headers: dict[str, str], query: dict[str, list[str]]) -> str:
    """The service in the SigV4 credential scope (header or presigned query), or ''."""
    scope = ""
    auth = headers.get("authorization", "")
    if "Credential=" in auth:
        scope = auth.split("Credential=", 1)[1].split(",", 1)[0]
    elif "X-Amz-Credential" in query:
        scope = query["X-Amz-Credential"][0]
    parts = scope.split("/")
    return parts[3] if len(parts) >= 5 else ""


@dataclass
class Call:
    """One request that reached the proxy."""

    service: str  # ssm, ec2, sts, s3
    operation: str
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float  # time.monotonic()
    fault: str = ""  # the fault injected, "" when forwarded untouched
    status: int = 0  # the status sent back (0: connection dropped)

    def param(self, name: str) -> str:
        """A request parameter: query string, form body, or JSON body (top level)."""
        if name in self.query:
            return self.query[name][0]
        if self.service in ("ec2", "sts"):
            form = urllib.parse.parse_qs(self.body.decode("utf-8", "replace"))
            if name in form:
                return form[name][0]
        if self.service == "ssm" and self.body:
            with contextlib.suppress(ValueError):
                value = json.loads(self.body).get(name)
                return "" if value is None else str(value)
        return ""


@dataclass
class Fault:
    """A rule: answer `operation` with `kind` for `times` matching calls (None: always), after
    letting the first `after` matching calls through."""

    operation: str
    kind: str
    times: int | None = 1
    after: int = 0
    hook: Callable[[Call], bytes | None] | None = None
    service: str = ""  # only when two services share an operation name
    error: tuple[int, str, str] | None = None  # (status, code, message) for kind "error"
    rewrite: Callable[[int, bytes], tuple[int, bytes]] | None = None  # for kind "rewrite"
    seen: int = 0  # matching calls so far
    injected: int = 0  # faults answered so far

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {', '.join(KINDS)}")
        if self.kind == HOOK and self.hook is None:
            raise ValueError("a hook rule needs a hook")
        if self.kind == ERROR and self.error is None:
            raise ValueError("an error rule needs error=(status, code, message)")
        if self.kind == REWRITE and self.rewrite is None:
            raise ValueError("a rewrite rule needs a rewrite")

    def matches(self, call: Call) -> bool:
        return call.operation == self.operation and (not self.service or self.service == call.service)

    def take(self) -> bool:
        """Count a matching call; True when this one gets the fault."""
        self.seen += 1
        if self.seen <= self.after:
            return False
        if self.times is not None and self.injected >= self.times:
            return False
        self.injected += 1
        return True


def _request_id() -> str:
    return str(uuid.uuid4())


def _error_response(
    service: str, kind: str, operation: str, given: tuple[int, str, str] | None = None
) -> tuple[int, str, bytes]:
    """(status, content type, body) of the fault as the service's protocol writes errors."""
    if given is not None:
        status, code, message = given
        if service == "ssm":
            return (
                status,
                "application/x-amz-json-1.1",
                json.dumps({"__type": code, "message": message}).encode(),
            )
        if service == "s3":
            body = (
                f"<Error><Code>{code}</Code><Message>{message}</Message>"
                f"<RequestId>{_request_id()}</RequestId></Error>"
            )
        elif service == "ec2":
            body = (
                f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors>"
                f"<RequestID>{_request_id()}</RequestID></Response>"
            )
        else:
            body = (
                f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message>"
                f"</Error><RequestId>{_request_id()}</RequestId></ErrorResponse>"
            )
        return status, "application/xml", body.encode()
    code, status, message = {
        THROTTLE: ("ThrottlingException", 400, "Rate exceeded"),
        SERVER_ERROR: ("InternalServerError", 500, "We encountered an internal error. Please try again."),
        UNAVAILABLE: ("ServiceUnavailable", 503, "Service is unavailable. Please try again."),
        ACCESS_DENIED: (
            "AccessDeniedException",
            400,
            f"User: arn:aws:sts::123456789012:assumed-role/deploy/gh is not authorized to perform: "
            f"{service}:{operation} because no identity-based policy allows the {service}:{operation} action",
        ),
        EXPIRED_TOKEN: (
            "ExpiredTokenException",
            400,
            "The security token included in the request is expired",
        ),
    }[kind]
    if service == "ssm":
        body = json.dumps({"__type": code, "message": message}).encode()
        return status, "application/x-amz-json-1.1", body
    if service == "s3":
        code, status = {
            THROTTLE: ("SlowDown", 503),
            SERVER_ERROR: ("InternalError", 500),
            UNAVAILABLE: ("ServiceUnavailable", 503),
            ACCESS_DENIED: ("AccessDenied", 403),
            EXPIRED_TOKEN: ("ExpiredToken", 400),
        }[kind]
        message = {
            "SlowDown": "Please reduce your request rate.",
            "AccessDenied": "Access Denied",
            "ExpiredToken": "The provided token has expired.",
        }.get(code, message)
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>{_request_id()}</RequestId></Error>"
        ).encode()
        return status, "application/xml", body
    if service == "ec2":
        code, status = {
            THROTTLE: ("RequestLimitExceeded", 503),
            SERVER_ERROR: ("InternalError", 500),
            UNAVAILABLE: ("Unavailable", 503),
            ACCESS_DENIED: ("UnauthorizedOperation", 403),
            # What EC2 answers a request signed with an expired session token.
            EXPIRED_TOKEN: ("RequestExpired", 400),
        }[kind]
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
            f"<Message>{message}</Message></Error></Errors><RequestID>{_request_id()}</RequestID></Response>"
        ).encode()
        return status, "text/xml", body
    # STS and the other query services
    code, status = {
        THROTTLE: ("Throttling", 400),
        SERVER_ERROR: ("InternalFailure", 500),
        UNAVAILABLE: ("ServiceUnavailable", 503),
        ACCESS_DENIED: ("AccessDenied", 403),
        EXPIRED_TOKEN: ("ExpiredToken", 400),
    }[kind]
    body = (
        f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message>"
        f"</Error><RequestId>{_request_id()}</RequestId></ErrorResponse>"
    ).encode()
    return status, "text/xml", body


class FaultProxy:
    """An HTTP proxy to `upstream` (moto's server) that injects faults by rule.

    Use as a context manager; `url` is what AWS_ENDPOINT_URL should be. `calls` records every
    request (operation, headers, the fault it got), so tests can also check what was sent.
    """

    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream!r}")
        self.upstream_host = parsed.hostname
        self.upstream_port = parsed.port or 80
        self.calls: list[Call] = []
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="fault-proxy"
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- rules ------------------------------------------------------------------------------

    def add(
        self,
        operation: str,
        kind: str,
        *,
        times: int | None = 1,
        after: int = 0,
        hook: Callable[[Call], bytes | None] | None = None,
        service: str = "",
        error: tuple[int, str, str] | None = None,
        rewrite: Callable[[int, bytes], tuple[int, bytes]] | None = None,
    ) -> Fault:
        fault = Fault(operation, kind, times, after, hook, service, error, rewrite)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    # -- what happened ------------------------------------------------------------------------

    def calls_to(self, operation: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.operation == operation]

    def operations(self) -> list[str]:
        with self._lock:
            return [c.operation for c in self.calls]

    def injected(self) -> int:
        """Faults answered so far (counted from the calls, so `clear()` does not forget them)."""
        with self._lock:
            return sum(1 for call in self.calls if call.fault)

    # -- the work (in the server's request threads) -------------------------------------------

    def _choose(self, call: Call) -> Fault | None:
        with self._lock:
            self.calls.append(call)
            for fault in self.faults:
                if fault.matches(call) and fault.take():
                    return fault
        return None

    def _forward(self, call: Call, headers: dict[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=120)
        try:
            target = call.path + (
                ("?" + urllib.parse.urlencode(call.query, doseq=True)) if call.query else ""
            )
            connection.request(call.method, target, body=call.body, headers=headers)
            response = connection.getresponse()
            body = response.read()
            return response.status, response.getheaders(), body
        finally:
            connection.close()


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` answered

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _handle(self) -> None:
            split = urllib.parse.urlsplit(self.path)
            # Keep the raw query's order and blanks: S3 sub-resources come as `?tagging`.
            query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
            headers = {k.lower(): v for k, v in self.headers.items()}
            body = self._read_body()
            service = _service_from_auth(headers, query)
            target = headers.get("x-amz-target", "")
            if target:
                operation = target.rsplit(".", 1)[-1]
                service = service or target.split("_", 1)[0].lower()
            elif service in ("ec2", "sts") or (
                headers.get("content-type", "").startswith("application/x-www-form-urlencoded")
                and b"Action=" in body
            ):
                form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
                operation = (form.get("Action") or query.get("Action") or [""])[0]
            else:
                service = service or "s3"
                operation = s3_operation(self.command, split.path, query, headers)
            call = Call(service, operation, self.command, split.path, query, headers, body, time.monotonic())
            fault = proxy._choose(call)
            if fault is not None and fault.hook is not None:
                replaced = fault.hook(call)
                if replaced is not None:
                    body = call.body = replaced
            kind = fault.kind if fault is not None else ""
            call.fault = "" if kind in SCENARIO_KINDS else kind
            if kind == DROP:
                self._drop()
                return
            if kind in (THROTTLE, SERVER_ERROR, UNAVAILABLE, ACCESS_DENIED, EXPIRED_TOKEN, ERROR):
                assert fault is not None
                status, content_type, payload = _error_response(service, kind, operation, fault.error)
                call.status = status
                self._send(
                    status, [("Content-Type", content_type), ("x-amzn-RequestId", _request_id())], payload
                )
                return
            forward_headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            forward_headers["Content-Length"] = str(len(body))
            try:
                status, response_headers, payload = proxy._forward(call, forward_headers)
            except OSError:
                self._drop()
                return
            if kind == DROP_AFTER:
                self._drop()
                return
            if kind == REWRITE:
                assert fault is not None and fault.rewrite is not None
                status, payload = fault.rewrite(status, payload)
            call.status = status
            self._send(status, response_headers, payload)

        def _send(self, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
            self.send_response_only(status)
            for name, value in headers:
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            self.wfile.flush()

        def _drop(self) -> None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler


@contextlib.contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    with FaultProxy(upstream) as proxy:
        yield proxy


def summary(faults: list[Fault]) -> dict[str, Any]:
    """What a list of rules did, for reports."""
    return {
        "rules": [
            {"operation": f.operation, "kind": f.kind, "seen": f.seen, "injected": f.injected} for f in faults
        ],
        "injected": sum(f.injected for f in faults if f.kind not in SCENARIO_KINDS),
    }


__all__ += ["fault_proxy", "summary"]
