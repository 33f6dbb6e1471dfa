"""Scenario control for the kubectl test double: set up a cluster, break it, read it back.

`Cluster` edits the same JSON state file the double (`kubectl_double.py`) serves, under the
same lock, so a test can change the scenario while a deploy is running (heal an image, speed
up a slow rollout) and read the outcome afterwards.
"""

from __future__ import annotations

import contextlib
import shlex
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from devkit.simulate import kubectl_double as double

# A seeded cluster looks like a deploy that finished this long ago.
SEED_AGE_SECONDS = 3600


class Cluster:
    """The simulated K3s cluster kept in one state file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            with double.open_state(self.path, write=True):
                pass

    def install_kubectl(self, bin_dir: str | Path, name: str = "kubectl") -> Path:
        """Writes an executable `kubectl` into bin_dir that serves this cluster."""
        # The double runs by its file path, self-contained (standard library and yaml only, never
        # `devkit`): it needs no PYTHONPATH, wherever the caller's environment comes from.
        bin_dir = Path(bin_dir)
        bin_dir.mkdir(parents=True, exist_ok=True)
        wrapper = bin_dir / name
        wrapper.write_text(
            "#!/bin/sh\n"
            f"# kubectl test double serving the cluster in {self.path.name}\n"
            f'if [ -z "${{{double.STATE_ENV}:-}}" ]; then\n'
            f"  {double.STATE_ENV}={shlex.quote(str(self.path))}\n"
            "fi\n"
            f"export {double.STATE_ENV}\n"
            f'exec {shlex.quote(sys.executable)} {shlex.quote(double.__file__)} "$@"\n'
        )
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return wrapper

    # -- scenario controls ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _changing_pods(self) -> Iterator[dict]:
        """A change of what pods run into: a Job's pod that already started keeps what it ran
        into (a finished Job its outcome), one that waited for its image starts once it has it."""
        with double.open_state(self.path, write=True) as state:
            now = time.time()
            waiting = double.settle_jobs(state, now)
            yield state
            double.start_jobs(state, waiting, now)

    def break_image(self, image_ref: str, reason: str = "CrashLoopBackOff", *,
                    message: str | None = None, log: str | None = None) -> None:
        """Pods running image_ref never become ready; their container waits with `reason`
        (and `message`, else the kubelet's usual one). `log` is what the container printed
        before it crashed (`kubectl logs --previous`). A Job's pod on it fails (exit code 1,
        `log` in `kubectl logs`) when `reason` is a crash, else it never starts."""
        with self._changing_pods() as state:
            state["broken_images"][image_ref] = reason
            if message is not None:
                state.setdefault("waiting_messages", {})[image_ref] = message
            if log is not None:
                state.setdefault("container_logs", {})[image_ref] = log

    def set_log(self, image_ref: str, text: str) -> None:
        """What containers running image_ref print (`kubectl logs`)."""
        with double.open_state(self.path, write=True) as state:
            state.setdefault("container_logs", {})[image_ref] = text

    def fix_image(self, image_ref: str) -> None:
        with self._changing_pods() as state:
            state["broken_images"].pop(image_ref, None)

    def slow_rollout(self, kind: str, namespace: str, name: str, seconds: float) -> None:
        """Every rollout of this workload takes `seconds` to become ready (0: back to normal); for
        a Job ("job"), its pod runs that long before it completes or fails."""
        with self._changing_pods() as state:
            canonical = double.kind_for_name(state, kind).kind
            state["slow_rollouts"][f"{canonical}/{namespace}/{name}"] = seconds

    def set_api_healthy(self, healthy: bool) -> None:
        """An unhealthy API refuses every request, as a K3s server that is down does."""
        with double.open_state(self.path, write=True) as state:
            state["api_healthy"] = healthy

    def fail_apply(self, kind: str, name: str, *, on_dry_run: bool = True) -> None:
        """Applying this object fails (as if an admission webhook refused it). With
        `on_dry_run` false only the real apply fails and a server-side dry run passes (as when
        a quota or a concurrent change bites between the two)."""
        with double.open_state(self.path, write=True) as state:
            canonical = double.kind_for_name(state, kind).kind
            key = "failing_applies" if on_dry_run else "failing_real_applies"
            state.setdefault(key, []).append(f"{canonical}/{name}")

    def fail_delete(self, kind: str, name: str) -> None:
        """`kubectl delete` of this object fails (as if RBAC or an admission webhook refused it)."""
        with double.open_state(self.path, write=True) as state:
            canonical = double.kind_for_name(state, kind).kind
            state.setdefault("failing_deletes", []).append(f"{canonical}/{name}")

    def fail_undo(self, kind: str, name: str, *, failing: bool = True) -> None:
        """`kubectl rollout undo` of this workload fails (as if RBAC or a webhook refused it),
        or works again with `failing=False`."""
        with double.open_state(self.path, write=True) as state:
            canonical = double.kind_for_name(state, kind).kind
            undos = state.setdefault("failing_undos", [])
            key = f"{canonical}/{name}"
            if failing:
                undos.append(key)
            else:
                state["failing_undos"] = [u for u in undos if u != key]

    def seed(self, yaml_text: str) -> None:
        """Applies manifests as a deploy that finished a while ago would have left them."""
        past = time.time() - SEED_AGE_SECONDS
        with double.open_state(self.path, write=True) as state:
            for manifest in double.yaml_documents(yaml_text):
                if manifest is None:
                    continue
                try:
                    double.apply_one(state, "seed", manifest, dry_run=False, now=past,
                                     output=None)
                except double.KubectlError as exc:
                    raise ValueError(f"seed manifest refused: {exc}") from exc

    # -- readers -------------------------------------------------------------------------------

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        """The object as `kubectl get -o json` would show it now, or None."""
        with double.open_state(self.path, write=False) as state:
            resolved = double.kind_for_name(state, kind)
            record = state["objects"].get(double.object_key(resolved, namespace, name))
            if record is None:
                return None
            return double.served_object(state, record, time.time())

    def objects(self) -> dict[tuple[str, str, str], dict]:
        """Every stored object by (kind, namespace, name), as applied (no computed status)."""
        with double.open_state(self.path, write=False) as state:
            return {tuple(key.split("/", 2)): record["object"]  # type: ignore[misc]
                    for key, record in state["objects"].items()}

    def revision(self, kind: str, namespace: str, name: str) -> str | None:
        """What k3s-deploy.sh records: a Deployment's revision annotation, a StatefulSet's
        .status.updateRevision, the name of a DaemonSet's highest-numbered ControllerRevision."""
        obj = self.get(kind, namespace, name)
        if obj is None:
            return None
        if obj["kind"] == "Deployment":
            return obj["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
        if obj["kind"] == "DaemonSet":
            with double.open_state(self.path, write=False) as state:
                revisions = [r for r in double.list_objects(
                    state, double.kind_for_name(state, "controllerrevisions"), namespace,
                    time.time()) if r["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]]
            return max(revisions, key=lambda r: r["revision"])["metadata"]["name"]
        return obj["status"]["updateRevision"]

    def image_of(self, kind: str, namespace: str, name: str) -> str | None:
        """The first container image of the workload's current pod template."""
        obj = self.get(kind, namespace, name)
        if obj is None:
            return None
        return obj["spec"]["template"]["spec"]["containers"][0]["image"]

    def job_status(self, namespace: str, name: str) -> dict | None:
        """The Job's .status as `kubectl get job` serves it now, or None if there is no Job."""
        job = self.get("job", namespace, name)
        return None if job is None else job["status"]

    def job_runs(self, namespace: str, name: str) -> int:
        """How many times a Job of that name was created (a deleted one included)."""
        with double.open_state(self.path, write=False) as state:
            return state.get("job_runs", {}).get(f"{namespace}/{name}", 0)

    def pods(self, namespace: str) -> list[dict]:
        with double.open_state(self.path, write=False) as state:
            return double.list_pods(state, namespace, time.time())

    def events(self, namespace: str) -> list[dict]:
        with double.open_state(self.path, write=False) as state:
            return double.list_events(state, namespace)
