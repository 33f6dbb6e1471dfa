"""Example background worker for the production-platform.

Every WORKER_INTERVAL_SECONDS it checks that Redis answers PING (logging the result) and
touches HEARTBEAT_FILE. The Deployment's probes read that file: readiness needs it to exist,
liveness needs it to be fresh, so a loop that hangs gets the container restarted. A Redis
outage does not stop the heartbeat: restarting the worker would not bring Redis back.

Settings (the ConfigMap in k8s/base/configmap.yaml): REDIS_ADDR ("host:port", empty to skip),
WORKER_INTERVAL_SECONDS (10), HEARTBEAT_FILE (/tmp/worker-heartbeat), LOG_LEVEL (info).
`python worker.py --once` runs a single iteration and exits (used by the tests).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

LOG = logging.getLogger("worker")


def redis_ping(addr: str, timeout: float = 1.0) -> bool:
    """True when the Redis server at "host:port" answers PING with PONG."""
    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host or addr, int(port or 6379)), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except (OSError, ValueError):
        return False


def iteration(heartbeat: Path, redis_addr: str) -> None:
    if redis_addr:
        if redis_ping(redis_addr):
            LOG.debug("redis %s: PONG", redis_addr)
        else:
            LOG.warning("redis %s unreachable", redis_addr)
    heartbeat.touch()


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "info").upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    heartbeat = Path(os.environ.get("HEARTBEAT_FILE", "/tmp/worker-heartbeat"))  # noqa: S108
    interval = float(os.environ.get("WORKER_INTERVAL_SECONDS", "10"))
    redis_addr = os.environ.get("REDIS_ADDR", "")
    stopping = threading.Event()

    def stop(signum: int, _frame: object) -> None:
        LOG.info("signal %d: stopping", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    LOG.info("started: heartbeat %s every %.0fs", heartbeat, interval)
    while True:
        iteration(heartbeat, redis_addr)
        if "--once" in argv or stopping.wait(interval):
            break
    LOG.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
