"""`python -m devkit demo`: the example platform deployed to a simulated AWS and K3s master.

Everything runs on this machine: moto's server plays AWS (EC2, S3, SSM, STS), a stand-in for
the SSM agent runs the sent commands in a folder that plays the master, with the real AWS CLI
and a kubectl test double. The action itself runs exactly as the GitHub runner starts it, so
the log, outputs and step summary printed here are the ones a workflow shows.

Two deploys: a good one, then one whose api image crash-loops, which is rolled back.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from devkit.simulate.runner import ActionRun

EXAMPLE = "examples/production-platform/k8s/base"
API = "docker.io/acme/production-platform-api"
WORKER = "docker.io/acme/production-platform-worker"


def _banner(text: str) -> None:
    print(f"\n{'=' * 78}\n{text}\n{'=' * 78}", flush=True)


def run_demo() -> int:
    try:
        from devkit.simulate.aws import PROJECT_ROOT, SimulatedAWS
        from devkit.simulate.cluster import Cluster
        from devkit.simulate.runner import run_action
    except ImportError as exc:
        print(f"The demo needs the simulation extras ({exc}): run `make demo` from a clone.")
        return 1

    with tempfile.TemporaryDirectory(prefix="k3s-deploy-demo-") as tmp, SimulatedAWS() as sim:
        master = sim.add_master("k3s-master")
        print(f"Simulated AWS at {sim.endpoint_url}, region {sim.region}")
        print(f"Simulated K3s master {master.instance_id} (tag Name=k3s-master) in {master.path}")
        # The example's images (acme/*) are in no registry, so the demo does not ask one.
        inputs = {"manifests": EXAMPLE, "images": f"{API}\n{WORKER}", "verify-images": "false"}

        _banner("Deploy 1: the example platform, images pinned to tag v1")
        first = run_action(
            sim, {**inputs, "image-tag": "v1"}, PROJECT_ROOT, Path(tmp) / "run1", echo=True
        )
        _show(first)

        _banner("Deploy 2: tag v2 of the api image crash-loops; the deploy must roll back")
        Cluster(master.cluster_state_path).break_image(f"{API}:v2", "CrashLoopBackOff")
        second = run_action(
            sim, {**inputs, "image-tag": "v2"}, PROJECT_ROOT, Path(tmp) / "run2", echo=True
        )
        _show(second)

        cluster = Cluster(master.cluster_state_path)
        api_image = cluster.image_of("deployment", "production-platform", "api")
        buckets = [b["Name"] for b in sim.client("s3").list_buckets().get("Buckets", [])]
        _banner("After both deploys")
        print(f"api runs {api_image}")
        print(f"S3 buckets left in the account: {buckets or 'none'}")

    ok = (
        first.outputs.get("status") == "success"
        and second.outputs.get("status") == "rolled-back"
        and api_image == f"{API}:v1"
        and not buckets
    )
    print("\nDemo " + ("passed: deployed, then rolled back a bad release." if ok else "FAILED."))
    return 0 if ok else 1


def _show(run: ActionRun) -> None:
    print("\n--- step summary (GITHUB_STEP_SUMMARY) ---")
    print(run.summary)
    print("--- outputs (GITHUB_OUTPUT) ---")
    for name, value in run.outputs.items():
        print(f"{name}={value}")
    print(f"--- exit code: {run.returncode} ---")
