"""Example API for the production-platform: a standard-library HTTP server.

Endpoints:
  GET /healthz  liveness: 200 while the process serves requests.
  GET /readyz   readiness: 200 when Redis answers PING (or REDIS_ADDR is empty), else 503.
  GET /         a small JSON document naming the service and its version.

Settings come from the environment (the ConfigMap in k8s/base/configmap.yaml):
  HTTP_PORT (8080), REDIS_ADDR ("host:port", empty to skip the check), LOG_LEVEL (info),
  APP_VERSION (set by the image build; "dev" otherwise).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOG = logging.getLogger("api")
REDIS_TIMEOUT_SECONDS = 1.0


def redis_ping(addr: str, timeout: float = REDIS_TIMEOUT_SECONDS) -> bool:
    """True when the Redis server at "host:port" answers PING with PONG."""
    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host or addr, int(port or 6379)), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except (OSError, ValueError):
        return False


class Handler(BaseHTTPRequestHandler):
    server_version = "production-platform-api"

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._reply(200, {"status": "ok"})
        elif self.path == "/readyz":
            addr = os.environ.get("REDIS_ADDR", "")
            if not addr or redis_ping(addr):
                self._reply(200, {"status": "ready"})
            else:
                self._reply(503, {"status": "not ready", "reason": f"redis {addr} unreachable"})
        elif self.path == "/":
            self._reply(200, {"service": "api", "version": os.environ.get("APP_VERSION", "dev")})
        else:
            self._reply(404, {"error": "not found"})

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        # Probes hit the server every few seconds: log requests only at debug level.
        LOG.debug("%s %s", self.address_string(), format % args)


def main() -> int:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "info").upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    host = os.environ.get("HTTP_HOST", "0.0.0.0")  # noqa: S104 - a container listens on all interfaces
    port = int(os.environ.get("HTTP_PORT", "8080"))
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True

    def stop(signum: int, _frame: object) -> None:
        LOG.info("signal %d: shutting down", signum)
        # shutdown() waits for serve_forever() to return: call it from another thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    LOG.info("listening on %s:%d", host, server.server_address[1])
    # The port actually bound (HTTP_PORT=0 picks a free one) goes to stdout for the tests.
    print(f"LISTENING {server.server_address[1]}", flush=True)
    server.serve_forever()
    server.server_close()
    LOG.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
