#!/usr/bin/env python3
"""A kubectl test double for the simulated K3s master.

It answers exactly the kubectl calls the deploy script (deploykit/scripts/k3s-deploy/) makes (get, including
--raw=/readyz, -o name|wide|json|jsonpath=, --ignore-not-found, --field-selector, --sort-by;
apply -f, --dry-run=client|server, --validate; create -f [--dry-run=client|server] and
replace -f (files or `-f -`); annotate [--overwrite]; logs [-c] [--previous] [--tail]; diff -f;
rollout status --timeout; rollout undo; delete [--wait] [--cascade] [--timeout]
[--ignore-not-found]; wait --for=condition=established; global -n and --request-timeout) and
refuses the rest the way kubectl does (unknown flags, bad flag values, unknown commands:
exit 1; diff exits 2 on errors). The cluster lives in one JSON file (env
KUBECTL_DOUBLE_STATE), read and written under an fcntl lock so that concurrent calls see
consistent state and a create is atomic across processes; `devkit.simulate.cluster.Cluster`
edits the same file to set up scenarios and to read results.

What it enforces, because the real API server does:
- a namespaced object needs an existing Namespace; apiVersion, kind and metadata.name are
  required; kinds must be known (built in, or defined by an applied CustomResourceDefinition);
  a Deployment's selector and a StatefulSet's spec outside template/replicas/updateStrategy
  are immutable, and so are a Job's template, selector, completions, completionMode,
  podFailurePolicy, backoffLimitPerIndex, managedBy and successPolicy (the refusal shows the
  new value as JSON where the real server prints a Go struct); a Job needs containers,
  restartPolicy Never or OnFailure and a backoffLimit >= 0; a Lease's times are MicroTime and
  its duration positive;
- metadata.generateName: `create` (and `create --dry-run=server`) names the object PREFIX + 5
  characters; `apply` refuses it as kubectl does;
- every write gives the object the next resourceVersion; `create` fails when the object
  exists; `replace` with metadata.resourceVersion fails with a Conflict when it changed;
- `apply --dry-run=server` and `diff` run every check of a real apply (an admission webhook
  refusal included) on a scratch copy and store nothing, not even for the next document;
  `diff` stops at the first object it cannot dry-run and prints no diff then;
- client-side apply's three-way merge for annotations: what `kubectl annotate` added stays;
  annotations change metadata only (no new generation, no new revision);
- a Deployment's revision annotation moves only when its pod template changes; `rollout undo`
  restores the previous template under a new revision number and needs an earlier revision;
- a StatefulSet's .status.updateRevision / currentRevision name its ControllerRevisions; a pod
  that never became ready keeps running the failed revision after an undo until it is deleted
  (the documented StatefulSet "forced rollback" limitation);
- a DaemonSet runs one pod on the double's one node, counts it in desiredNumberScheduled,
  numberReady, updatedNumberScheduled and numberAvailable (no replicas, no revision in its
  status), keeps its history in ControllerRevisions it owns (named DAEMONSET-HASH, its pods'
  controller-revision-hash label is HASH) and replaces an unready pod itself on an undo;
- a container whose image is broken waits with the kubelet's reason and message; a crash loop
  has its last run in lastState and its log under `logs --previous`; a container that never
  started has no log;
- `rollout status` waits for real (in small sleeps, never past --timeout) and fails at once
  when a Deployment is past its progressDeadlineSeconds;
- a Job runs one pod (owned by the Job, labelled job-name and batch.kubernetes.io/job-name)
  that completes after the Job's slow_rollout delay (none by default): status succeeded 1 and
  the conditions SuccessCriteriaMet and Complete, as Kubernetes 1.31+ sets them; before that
  active 1. An image broken with a crash makes every attempt exit 1 (phase Failed, container
  terminated with reason Error): status failed backoffLimit + 1 (default 6) and the conditions
  FailureTarget and Failed (BackoffLimitExceeded), one Failed pod per attempt as with
  restartPolicy Never; `logs` shows the break_image log (or a default line, as for a completed
  pod). An image that cannot be pulled (any reason but a crash) keeps the pod Pending, waiting
  with that reason, and the Job active. Complete and Failed are terminal: a later change of
  the scenario's images does not change them; a pod that waited for its image starts when the
  scenario fixes it. Deleting the Job deletes its pods.
What it does not model: schema validation (--validate is accepted, not acted on), server-side
apply, field managers, label selectors, controllers other than Deployment, StatefulSet,
DaemonSet and Job, more than one node; for Jobs: the back-off between attempts (all attempts
have failed when the first one's run ends), restartPolicy OnFailure (served as Never),
parallelism and completions above 1, indexed Jobs, suspend, activeDeadlineSeconds, pod
failure policies, Job events, `kubectl get jobs`' own columns; for delete: --cascade=orphan
(every cascade deletes what the double derives from the object) and waiting (an object goes
at once).

Pods are not stored: they are derived from each workload's rollout and each Job's run (when it
began, whether an image is broken, whether the rollout is slowed down) every time they are
read.

Set KUBECTL_DOUBLE_LOG to a file to have every invocation's argv appended as a JSON line (the
honesty test replays them through the real kubectl).
"""

from __future__ import annotations

import base64
import calendar
import contextlib
import copy
import fcntl
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_ENV = "KUBECTL_DOUBLE_STATE"
LOG_ENV = "KUBECTL_DOUBLE_LOG"

# What a K3s master's kubeconfig points at; shown when the API is "down".
SERVER = "127.0.0.1:6443"
API_DOWN = f"The connection to the server {SERVER} was refused - did you specify the right host or port?"
DEFAULT_NAMESPACE = "default"
BUILTIN_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
NODE_NAME = "ip-10-0-1-23"
# Kubernetes' defaults that shape a rollout.
DEFAULT_PROGRESS_DEADLINE = 600
MAX_SURGE_FRACTION = 0.25
MAX_UNAVAILABLE_FRACTION = 0.25
# Kubelet's crash-loop back-off: 10 s, doubling, capped at 5 minutes.
CRASH_BACKOFF_START = 10
CRASH_BACKOFF_CAP = 300
# rollout status re-reads the cluster this often while it waits.
WATCH_STEP_SECONDS = 0.1
# Characters Kubernetes uses for generated names (no vowels, no look-alike digits).
SAFE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


class KubectlError(Exception):
    """Ends the command: the message goes to stderr, kubectl exits 1."""


class UsageError(KubectlError):
    """A flag or argument kubectl's command line parser would refuse."""

    def __init__(self, message: str, command: str) -> None:
        super().__init__(f"error: {message}\nSee 'kubectl {command} --help' for usage.")


# ---------------------------------------------------------------------------------------------
# Kinds


@dataclass(frozen=True)
class Kind:
    kind: str
    group: str
    versions: tuple[str, ...]
    plural: str
    namespaced: bool
    short_names: tuple[str, ...] = ()

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def qualified(self) -> str:
        """How kubectl names the kind in `deployment.apps/api created`."""
        return f"{self.singular}.{self.group}" if self.group else self.singular

    @property
    def resource(self) -> str:
        """How the API names the resource in NotFound errors: `deployments.apps`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def accepts(self, api_version: str) -> bool:
        if not self.group:
            return api_version in self.versions
        group, _, version = api_version.partition("/")
        return group == self.group and version in self.versions

    def aliases(self) -> set[str]:
        names = {self.singular, self.plural, *self.short_names}
        return names | {f"{n}.{self.group}" for n in names if self.group}


BUILTIN_KINDS = (
    Kind("Namespace", "", ("v1",), "namespaces", False, ("ns",)),
    Kind("ConfigMap", "", ("v1",), "configmaps", True, ("cm",)),
    Kind("Secret", "", ("v1",), "secrets", True),
    Kind("ServiceAccount", "", ("v1",), "serviceaccounts", True, ("sa",)),
    Kind("Service", "", ("v1",), "services", True, ("svc",)),
    Kind("PersistentVolumeClaim", "", ("v1",), "persistentvolumeclaims", True, ("pvc",)),
    Kind("ResourceQuota", "", ("v1",), "resourcequotas", True, ("quota",)),
    Kind("LimitRange", "", ("v1",), "limitranges", True, ("limits",)),
    Kind("Pod", "", ("v1",), "pods", True, ("po",)),
    Kind("Event", "", ("v1",), "events", True, ("ev",)),
    Kind("Deployment", "apps", ("v1",), "deployments", True, ("deploy",)),
    Kind("StatefulSet", "apps", ("v1",), "statefulsets", True, ("sts",)),
    Kind("DaemonSet", "apps", ("v1",), "daemonsets", True, ("ds",)),
    Kind("ReplicaSet", "apps", ("v1",), "replicasets", True, ("rs",)),
    Kind("ControllerRevision", "apps", ("v1",), "controllerrevisions", True),
    Kind("Job", "batch", ("v1",), "jobs", True),
    Kind("CronJob", "batch", ("v1",), "cronjobs", True, ("cj",)),
    Kind("Role", "rbac.authorization.k8s.io", ("v1",), "roles", True),
    Kind("RoleBinding", "rbac.authorization.k8s.io", ("v1",), "rolebindings", True),
    Kind("ClusterRole", "rbac.authorization.k8s.io", ("v1",), "clusterroles", False),
    Kind("ClusterRoleBinding", "rbac.authorization.k8s.io", ("v1",), "clusterrolebindings", False),
    Kind("StorageClass", "storage.k8s.io", ("v1",), "storageclasses", False, ("sc",)),
    Kind("PriorityClass", "scheduling.k8s.io", ("v1",), "priorityclasses", False, ("pc",)),
    Kind("Ingress", "networking.k8s.io", ("v1",), "ingresses", True, ("ing",)),
    Kind("NetworkPolicy", "networking.k8s.io", ("v1",), "networkpolicies", True, ("netpol",)),
    Kind("HorizontalPodAutoscaler", "autoscaling", ("v1", "v2"), "horizontalpodautoscalers",
         True, ("hpa",)),
    Kind("PodDisruptionBudget", "policy", ("v1",), "poddisruptionbudgets", True, ("pdb",)),
    Kind("CustomResourceDefinition", "apiextensions.k8s.io", ("v1",),
         "customresourcedefinitions", False, ("crd", "crds")),
    Kind("Lease", "coordination.k8s.io", ("v1",), "leases", True),
)
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
# The Job controller's defaults, and what it sets in a Job's conditions.
JOB_DEFAULT_BACKOFF_LIMIT = 6
JOB_BACKOFF_MESSAGE = "Job has reached the specified backoff limit"
JOB_COMPLETE_MESSAGE = "Reached expected number of succeeded pods"
# A Job's pod whose image is broken with one of these runs and exits 1; with any other reason
# it never starts (it waits with that reason) and the Job stays active.
JOB_CRASH_REASONS = ("CrashLoopBackOff",)
# What a Job's container printed when the scenario (break_image's log, set_log) did not say.
JOB_DEFAULT_LOGS = {"Completed": "{container}: done",
                    "Error": "{container}: error: exit status 1"}
# The API server truncates metadata.generateName to this before adding 5 random characters.
MAX_GENERATE_NAME_PREFIX = 58
# A DaemonSet runs a pod on each node: the double has one (NODE_NAME).
DAEMONSET_NODES = 1


def known_kinds(state: dict) -> list[Kind]:
    """Built-in kinds plus those defined by the CustomResourceDefinitions in the cluster."""
    kinds = list(BUILTIN_KINDS)
    for record in state["objects"].values():
        crd = record["object"]
        if crd["kind"] != "CustomResourceDefinition":
            continue
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        versions = tuple(v.get("name", "") for v in spec.get("versions") or [])
        kinds.append(Kind(names.get("kind", ""), spec.get("group", ""), versions,
                          names.get("plural", ""), spec.get("scope") == "Namespaced",
                          tuple(names.get("shortNames") or ())))
    return kinds


def kind_for_manifest(state: dict, api_version: str, kind: str) -> Kind | None:
    for candidate in known_kinds(state):
        if candidate.kind == kind and candidate.accepts(api_version):
            return candidate
    return None


def kind_for_name(state: dict, name: str) -> Kind:
    """Resolves what a user types (`deploy`, `deployments.apps`, `Deployment`) to a kind."""
    wanted = name.lower()
    for candidate in known_kinds(state):
        if wanted in candidate.aliases() or wanted == candidate.kind.lower():
            return candidate
    raise KubectlError(f'error: the server doesn\'t have a resource type "{name}"')


def object_key(kind: Kind, namespace: str, name: str) -> str:
    return f"{kind.kind}/{namespace if kind.namespaced else ''}/{name}"


# ---------------------------------------------------------------------------------------------
# State file


def empty_state() -> dict:
    now = time.time()
    state: dict[str, Any] = {
        "version": 1,
        "api_healthy": True,
        "broken_images": {},
        "slow_rollouts": {},
        "failing_applies": [],
        "failing_undos": [],
        # image -> what its containers print, and the message of their waiting state
        "container_logs": {},
        "waiting_messages": {},
        "objects": {},
        "events": [],
        "next_uid": 1,
        # etcd's revision: every write of an object gives it the next one
        "next_resource_version": 1,
    }
    for name in BUILTIN_NAMESPACES:
        # A fresh cluster's own namespaces date from long before any deploy.
        store_new_object(state, BUILTIN_KINDS[0],
                         {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
                         now - 86400)
    return state


@contextlib.contextmanager
def open_state(path: str | os.PathLike[str], write: bool) -> Iterator[dict]:
    """Loads the cluster under a lock (shared to read, exclusive to write) and saves it back."""
    path = Path(path)
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
        try:
            state = json.loads(path.read_text()) if path.exists() else empty_state()
            yield state
            if write:
                # Write then rename: a reader without the lock never sees half a file.
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
                os.replace(tmp, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def state_path() -> str:
    path = os.environ.get(STATE_ENV)
    if not path:
        raise KubectlError(f"error: {STATE_ENV} is not set: the kubectl double has no cluster")
    return path


def require_api(state: dict) -> None:
    if not state["api_healthy"]:
        raise KubectlError(API_DOWN)


# ---------------------------------------------------------------------------------------------
# Small helpers


def rfc3339(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def parse_rfc3339(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))


def generated_suffix(seed: str, length: int) -> str:
    digest = hashlib.sha256(seed.encode()).digest()
    return "".join(SAFE_ALPHABET[b % len(SAFE_ALPHABET)] for b in digest[:length])


def template_hash(template: dict) -> str:
    """Stands in for pod-template-hash / controller-revision-hash: same template, same hash."""
    return generated_suffix(json.dumps(template, sort_keys=True), 10)


def human_age(seconds: float) -> str:
    """kubectl's AGE column (duration.HumanDuration), to the same rounding."""
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    minutes, hours, days = s // 60, s // 3600, s // 86400
    if minutes < 10:
        rest = s % 60
        return f"{minutes}m{rest}s" if rest else f"{minutes}m"
    if hours < 3:
        return f"{minutes}m"
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h{rest}m" if rest else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if days < 8:
        rest = hours % 24
        return f"{days}d{rest}h" if rest else f"{days}d"
    return f"{days}d"


def format_table(rows: list[list[str]]) -> str:
    """kubectl's column layout: each column padded to its widest cell plus three spaces."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(widths[i] + 3) for i, cell in enumerate(row[:-1])]
        lines.append("".join(cells) + row[-1])
    return "\n".join(lines) + "\n"


def parse_duration(text: str) -> float | None:
    """Go's time.ParseDuration for the units kubectl users write (h, m, s, ms)."""
    if text == "0":
        return 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def go_duration_error(text: str) -> str:
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return f'time: missing unit in duration "{text}"'
    return f'time: invalid duration "{text}"'


# ---------------------------------------------------------------------------------------------
# Objects and workload rollouts


def store_new_object(state: dict, kind: Kind, manifest: dict, now: float) -> dict:
    obj = copy.deepcopy(manifest)
    meta = obj.setdefault("metadata", {})
    meta["uid"] = f"00000000-0000-4000-8000-{state['next_uid']:012d}"
    state["next_uid"] += 1
    meta["creationTimestamp"] = rfc3339(now)
    meta["generation"] = 1
    bump_resource_version(state, obj)
    if kind.kind == "Namespace":
        obj["status"] = {"phase": "Active"}
    record: dict[str, Any] = {"object": obj, "created": now}
    state["objects"][object_key(kind, meta.get("namespace", ""), meta["name"])] = record
    if kind.kind in WORKLOAD_KINDS:
        record["workload"] = {"history": [], "began": now, "stable": None,
                              "stable_since": now, "stuck": {}}
        change_template(state, record, now)
    if kind.kind == "Job":
        # The Job controller creates its first pod at once; `started` moves when a pod that
        # waited for its image gets it (see settle_jobs).
        record["job"] = {"began": now, "started": now}
        runs = state.setdefault("job_runs", {})
        key = f"{meta.get('namespace', '')}/{meta['name']}"
        runs[key] = runs.get(key, 0) + 1
    return record


def bump_resource_version(state: dict, obj: dict) -> None:
    """A write: the object gets the cluster's next resourceVersion (a string, as the API's)."""
    version = state.setdefault("next_resource_version", 1)
    state["next_resource_version"] = version + 1
    obj.setdefault("metadata", {})["resourceVersion"] = str(version)


def pod_template(record: dict) -> dict:
    return (record["object"].get("spec") or {}).get("template") or {}


def template_images(template: dict) -> list[str]:
    spec = template.get("spec") or {}
    containers = (spec.get("initContainers") or []) + (spec.get("containers") or [])
    return [c.get("image", "") for c in containers]


def broken_reason(state: dict, template: dict) -> str | None:
    for image in template_images(template):
        if image in state["broken_images"]:
            return state["broken_images"][image]
    return None


def replica_set_uid(deployment_uid: str, hash_: str) -> str:
    digest = hashlib.sha256(f"{deployment_uid}/{hash_}".encode()).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-4{digest[13:16]}-8{digest[17:20]}-{digest[20:32]}"


def current_revision(record: dict) -> dict:
    return max(record["workload"]["history"], key=lambda entry: entry["revision"])


def template_of(record: dict, hash_: str) -> dict:
    for entry in record["workload"]["history"]:
        if entry["hash"] == hash_:
            return entry["template"]
    return {}


def change_template(state: dict, record: dict, now: float) -> None:
    """Records a new pod template as the controllers do: a new (or reused) revision."""
    workload = record["workload"]
    template = pod_template(record)
    new_hash = template_hash(template)
    history = workload["history"]
    if history:
        old = current_revision(record)
        if old["hash"] == new_hash:
            return
        view = WorkloadView(state, record, now)
        if view.complete:
            workload["stable"] = old["hash"]
            workload["stable_since"] = workload["began"]
        # A StatefulSet pod that never became ready is not replaced when the template changes
        # again (Kubernetes documents this under "forced rollback"): it stays until deleted.
        if record["object"]["kind"] == "StatefulSet":
            for pod in view.pods():
                broken = broken_reason(state, template_of(record, pod.hash)) is not None
                if broken and not pod.ready and pod.hash != new_hash:
                    workload["stuck"].setdefault(pod.name, [pod.hash, pod.created])
    top = max((entry["revision"] for entry in history), default=0)
    for entry in history:
        if entry["hash"] == new_hash:
            # Going back to an old template reuses its ReplicaSet / ControllerRevision, which
            # gets the next revision number (the old number disappears from the history).
            entry["revision"] = top + 1
            break
    else:
        history.append({"hash": new_hash, "revision": top + 1, "template": template})
    workload["began"] = now
    if record["object"]["kind"] == "Deployment":
        annotations = record["object"]["metadata"].setdefault("annotations", {})
        annotations["deployment.kubernetes.io/revision"] = str(top + 1)
    record_rollout_events(state, record, now)


def record_rollout_events(state: dict, record: dict, now: float) -> None:
    meta = record["object"]["metadata"]
    namespace, name = meta.get("namespace", ""), meta["name"]
    view = WorkloadView(state, record, now)
    if record["object"]["kind"] == "Deployment":
        add_event(state, now, namespace, "Normal", "ScalingReplicaSet", f"deployment/{name}",
                  f"Scaled up replica set {view.replica_set(view.current)} to {view.new_count}")
    reason = broken_reason(state, pod_template(record))
    if reason is None:
        return
    image = next(i for i in template_images(pod_template(record)) if i in state["broken_images"])
    for pod in view.pods():
        if pod.ready or pod.hash != view.current:
            continue
        if reason in ("ImagePullBackOff", "ErrImagePull"):
            add_event(state, now, namespace, "Warning", "Failed", f"pod/{pod.name}",
                      f'Failed to pull image "{image}": rpc error: code = NotFound desc = '
                      f'failed to pull and unpack image "{image}": not found')
            add_event(state, now, namespace, "Warning", "BackOff", f"pod/{pod.name}",
                      f'Back-off pulling image "{image}"')
        elif reason == "CrashLoopBackOff":
            add_event(state, now, namespace, "Warning", "BackOff", f"pod/{pod.name}",
                      f"Back-off restarting failed container {pod.containers[0]} in pod "
                      f"{pod.name}_{namespace}({meta['uid']})")
        else:
            add_event(state, now, namespace, "Warning", "Failed", f"pod/{pod.name}",
                      f"Error: {reason}")


def add_event(state: dict, now: float, namespace: str, type_: str, reason: str, obj: str,
              message: str) -> None:
    state["events"].append({"namespace": namespace, "type": type_, "reason": reason,
                            "object": obj, "message": message, "time": now})


@dataclass
class Pod:
    name: str
    owner_kind: str
    owner_name: str
    hash: str
    created: float
    ready: bool
    waiting: str | None  # container waiting reason when not ready
    restarts: int
    containers: list[str]
    labels: dict[str, str]


class WorkloadView:
    """A Deployment, StatefulSet or DaemonSet as its controller would have it at a moment in
    time."""

    def __init__(self, state: dict, record: dict, now: float) -> None:
        self.state, self.record, self.now = state, record, now
        obj = record["object"]
        self.kind = obj["kind"]
        self.name = obj["metadata"]["name"]
        self.namespace = obj["metadata"].get("namespace", "")
        spec = obj.get("spec") or {}
        self.replicas = DAEMONSET_NODES if self.kind == "DaemonSet" else int(
            spec.get("replicas", 1))
        self.progress_deadline = int(spec.get("progressDeadlineSeconds",
                                              DEFAULT_PROGRESS_DEADLINE))
        workload = record["workload"]
        self.current = current_revision(record)["hash"]
        self.stable = workload["stable"]
        self.began = workload["began"]
        self.reason = broken_reason(state, template_of(record, self.current))
        slow = state["slow_rollouts"].get(f"{self.kind}/{self.namespace}/{self.name}", 0)
        # Going back to the template that ran before is quick: its pods are still there.
        self.settled = self.current == self.stable or now >= self.began + slow
        # Stuck pods: name -> [revision hash, created]; they matter while that image is broken.
        self.stuck = {pod: stuck for pod, stuck in workload["stuck"].items()
                      if broken_reason(state, template_of(record, stuck[0])) is not None}
        self.complete = self.reason is None and self.settled and not self.stuck
        self.has_old = self.stable is not None and self.stable != self.current
        if self.complete or not self.has_old:
            self.old_count, self.new_count = 0, self.replicas
        else:
            unavailable = math.floor(self.replicas * MAX_UNAVAILABLE_FRACTION)
            surge = math.ceil(self.replicas * MAX_SURGE_FRACTION)
            self.old_count = self.replicas - unavailable
            self.new_count = min(self.replicas, surge + unavailable)

    def replica_set(self, hash_: str) -> str:
        return f"{self.name}-{hash_}"

    def owner_uid(self, hash_: str) -> str:
        """The UID of what owns the pods of revision `hash_`: the Deployment's ReplicaSet for
        it (a UID of its own, as the API server gives one to every object), or the
        StatefulSet."""
        uid = self.record["object"]["metadata"]["uid"]
        if self.kind != "Deployment":
            return uid
        return replica_set_uid(uid, hash_)

    def replica_sets(self) -> list[dict]:
        """The Deployment's ReplicaSets, one per revision, as `kubectl get rs` shows them."""
        counts: dict[str, int] = {}
        for pod in self.pods():
            counts[pod.hash] = counts.get(pod.hash, 0) + 1
        owner = self.record["object"]["metadata"]
        items = []
        for entry in self.record["workload"]["history"]:
            hash_ = entry["hash"]
            labels = dict((entry["template"].get("metadata") or {}).get("labels") or {})
            labels["pod-template-hash"] = hash_
            items.append({
                "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "metadata": {
                    "name": self.replica_set(hash_), "namespace": self.namespace,
                    "uid": self.owner_uid(hash_), "labels": labels,
                    "annotations": {"deployment.kubernetes.io/revision": str(entry["revision"])},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                         "name": self.name, "uid": owner["uid"],
                                         "controller": True, "blockOwnerDeletion": True}],
                },
                "spec": {"replicas": counts.get(hash_, 0), "template": entry["template"]},
                "status": {"replicas": counts.get(hash_, 0),
                           "readyReplicas": sum(p.ready for p in self.pods()
                                                if p.hash == hash_)},
            })
        return items

    def revision_name(self, hash_: str) -> str:
        return f"{self.name}-{hash_}"

    def revision_label(self, hash_: str) -> str:
        """The controller-revision-hash label: the ControllerRevision's name for a
        StatefulSet, only the hash for a DaemonSet (as their controllers write them)."""
        return hash_ if self.kind == "DaemonSet" else self.revision_name(hash_)

    def controller_revisions(self) -> list[dict]:
        """The StatefulSet's or DaemonSet's ControllerRevisions, one per template, numbered as
        its history."""
        owner = self.record["object"]["metadata"]
        return [{
            "apiVersion": "apps/v1", "kind": "ControllerRevision",
            "metadata": {
                "name": self.revision_name(entry["hash"]), "namespace": self.namespace,
                "labels": {"controller-revision-hash": self.revision_label(entry["hash"])},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": self.kind,
                                     "name": self.name, "uid": owner["uid"],
                                     "controller": True, "blockOwnerDeletion": True}],
            },
            "data": {"spec": {"template": entry["template"]}},
            "revision": entry["revision"],
        } for entry in self.record["workload"]["history"]]

    def _pod(self, name: str, hash_: str, created: float, ready: bool) -> Pod:
        template = template_of(self.record, hash_)
        containers = [c.get("name", "") for c in (template.get("spec") or {}).get(
            "containers") or []] or ["main"]
        reason = broken_reason(self.state, template)
        waiting = None if ready else (reason or "ContainerCreating")
        restarts = 0
        if waiting == "CrashLoopBackOff":
            restarts, elapsed, backoff = 1, self.now - created - CRASH_BACKOFF_START, \
                CRASH_BACKOFF_START
            while elapsed >= backoff:
                restarts, elapsed = restarts + 1, elapsed - backoff
                backoff = min(backoff * 2, CRASH_BACKOFF_CAP)
        labels = dict((template.get("metadata") or {}).get("labels") or {})
        if self.kind == "Deployment":
            labels["pod-template-hash"] = hash_
            owner_kind, owner_name = "ReplicaSet", self.replica_set(hash_)
        elif self.kind == "DaemonSet":
            labels["controller-revision-hash"] = self.revision_label(hash_)
            owner_kind, owner_name = "DaemonSet", self.name
        else:
            labels["controller-revision-hash"] = self.revision_name(hash_)
            labels["statefulset.kubernetes.io/pod-name"] = name
            owner_kind, owner_name = "StatefulSet", self.name
        return Pod(name, owner_kind, owner_name, hash_, created, ready, waiting, restarts,
                   containers, labels)

    def pods(self) -> list[Pod]:
        current_ready = self.reason is None and self.settled
        stable_since = self.record["workload"]["stable_since"]
        # Pods of the template that ran before are the ones already running.
        current_since = stable_since if self.current == self.stable else self.began
        if self.kind == "Deployment":
            pods = []
            groups = [(self.current, self.new_count, current_since, current_ready)]
            if self.old_count:
                groups.insert(0, (self.stable, self.old_count, stable_since, True))
            for hash_, count, created, ready in groups:
                rs = self.replica_set(hash_)
                for i in range(count):
                    name = f"{rs}-{generated_suffix(f'{rs}/{i}', 5)}"
                    pods.append(self._pod(name, hash_, created, ready))
            return pods
        if self.kind == "DaemonSet":
            # One pod per node, named anew for each revision. RollingUpdate (maxUnavailable 1)
            # replaces one node's pod at a time, and deletes a pod that is not available
            # first: an undo needs no help.
            pods = []
            for node in range(self.replicas):
                if self.has_old and not self.complete and node > 0:
                    hash_, created, ready = self.stable, stable_since, True
                else:
                    hash_, created, ready = self.current, current_since, current_ready
                name = f"{self.name}-{generated_suffix(f'{self.name}/{hash_}/{node}', 5)}"
                pods.append(self._pod(name, hash_, created, ready))
            return pods
        pods = []
        for ordinal in range(self.replicas):
            name = f"{self.name}-{ordinal}"
            if name in self.stuck:
                stuck_hash, created = self.stuck[name]
                pods.append(self._pod(name, stuck_hash, created, False))
            elif self.complete or self.current == self.stable:
                pods.append(self._pod(name, self.current, current_since, current_ready))
            elif self.has_old and ordinal < self.replicas - 1:
                pods.append(self._pod(name, self.stable, stable_since, True))
            elif self.has_old or ordinal == 0:
                # RollingUpdate replaces the highest ordinal first; a new StatefulSet
                # (OrderedReady) creates pod 0 and waits for it before the next one.
                pods.append(self._pod(name, self.current, self.began, current_ready))
        return pods

    def status(self) -> dict:
        pods = self.pods()
        ready = sum(p.ready for p in pods)
        updated = sum(p.hash == self.current for p in pods)
        generation = self.record["object"]["metadata"]["generation"]
        status: dict[str, Any] = {"observedGeneration": generation, "replicas": len(pods)}
        if self.kind == "Deployment":
            rs = self.replica_set(self.current)
            if self.complete:
                progressing = ("True", "NewReplicaSetAvailable",
                               f'ReplicaSet "{rs}" has successfully progressed.')
            elif self.now - self.began >= self.progress_deadline:
                progressing = ("False", "ProgressDeadlineExceeded",
                               f'ReplicaSet "{rs}" has timed out progressing.')
            else:
                progressing = ("True", "ReplicaSetUpdated", f'ReplicaSet "{rs}" is progressing.')
            available = ready >= self.replicas - math.floor(
                self.replicas * MAX_UNAVAILABLE_FRACTION)
            status["conditions"] = [
                {"type": "Available", "status": "True" if available else "False",
                 "reason": "MinimumReplicasAvailable" if available
                 else "MinimumReplicasUnavailable"},
                {"type": "Progressing", "status": progressing[0], "reason": progressing[1],
                 "message": progressing[2]},
            ]
            counts = {"updatedReplicas": updated, "readyReplicas": ready,
                      "availableReplicas": ready}
        elif self.kind == "DaemonSet":
            # Counted per node; these four are always there, the rest left out when zero.
            status = {"observedGeneration": generation, "desiredNumberScheduled": self.replicas,
                      "currentNumberScheduled": len(pods), "numberMisscheduled": 0,
                      "numberReady": ready}
            counts = {"updatedNumberScheduled": updated, "numberAvailable": ready,
                      "numberUnavailable": self.replicas - ready}
        else:
            current_hash = self.current if (self.complete or not self.has_old) else self.stable
            status["currentRevision"] = self.revision_name(current_hash)
            status["updateRevision"] = self.revision_name(self.current)
            counts = {"readyReplicas": ready, "availableReplicas": ready,
                      "currentReplicas": sum(p.hash == current_hash for p in pods),
                      "updatedReplicas": updated}
        # The API leaves out counters that are zero (omitempty).
        status.update({k: v for k, v in counts.items() if v})
        return status

    def rollout_message(self) -> tuple[str, bool]:
        """kubectl's rollout status text for this moment, and whether the rollout is done."""
        status = self.status()
        ready = status.get("readyReplicas", 0)
        updated = status.get("updatedReplicas", 0)
        if self.kind == "DaemonSet":
            # kubectl's DaemonSetStatusViewer.
            strategy = (self.record["object"].get("spec") or {}).get("updateStrategy") or {}
            if strategy.get("type", "RollingUpdate") != "RollingUpdate":
                raise KubectlError("error: rollout status is only available for RollingUpdate "
                                   "strategy type")
            desired = status["desiredNumberScheduled"]
            prefix = f'Waiting for daemon set "{self.name}" rollout to finish: '
            if status.get("updatedNumberScheduled", 0) < desired:
                return (f"{prefix}{status.get('updatedNumberScheduled', 0)} out of {desired} "
                        "new pods have been updated..."), False
            if status.get("numberAvailable", 0) < desired:
                return (f"{prefix}{status.get('numberAvailable', 0)} of {desired} updated pods "
                        "are available..."), False
            return f'daemon set "{self.name}" successfully rolled out', True
        if self.kind == "Deployment":
            for condition in status["conditions"]:
                if condition["reason"] == "ProgressDeadlineExceeded":
                    raise KubectlError(
                        f'error: deployment "{self.name}" exceeded its progress deadline')
            prefix = f'Waiting for deployment "{self.name}" rollout to finish: '
            if updated < self.replicas:
                return (f"{prefix}{updated} out of {self.replicas} new replicas have been "
                        "updated..."), False
            if status["replicas"] > updated:
                return (f"{prefix}{status['replicas'] - updated} old replicas are pending "
                        "termination..."), False
            if ready < updated:
                return f"{prefix}{ready} of {updated} updated replicas are available...", False
            return f'deployment "{self.name}" successfully rolled out', True
        strategy = (self.record["object"].get("spec") or {}).get("updateStrategy") or {}
        if strategy.get("type", "RollingUpdate") != "RollingUpdate":
            raise KubectlError("error: rollout status is only available for RollingUpdate "
                               "strategy type")
        if ready < self.replicas:
            return f"Waiting for {self.replicas - ready} pods to be ready...", False
        partition = int((strategy.get("rollingUpdate") or {}).get("partition", 0))
        if updated < self.replicas - partition:
            return (f"Waiting for partitioned roll out to finish: {updated} out of "
                    f"{self.replicas - partition} new pods have been updated..."), False
        return f"partitioned roll out complete: {updated} new pods have been updated...", True


class JobView:
    """A Job as its controller and the kubelet would have it at a moment in time.

    One pod per attempt, as with restartPolicy Never (OnFailure is served the same way). A
    pod created when the Job was runs its containers for the Job's slow_rollout delay (none by
    default), then completes or, when an image crash-loops, fails with exit code 1. The Job
    controller's back-off between attempts is not modelled: all backoffLimit + 1 attempts have
    failed when the first pod's run ends. A pod whose image cannot be pulled waits (Pending)
    and the Job stays active."""

    def __init__(self, state: dict, record: dict, now: float) -> None:
        self.state, self.record, self.now = state, record, now
        obj = record["object"]
        meta = obj["metadata"]
        self.name, self.namespace, self.uid = meta["name"], meta.get("namespace", ""), meta["uid"]
        spec = obj.get("spec") or {}
        self.template = spec.get("template") or {}
        self.backoff_limit = int(spec.get("backoffLimit", JOB_DEFAULT_BACKOFF_LIMIT))
        job = record["job"]
        self.began, self.started = job["began"], job.get("started", job["began"])
        slow = state["slow_rollouts"].get(f"Job/{self.namespace}/{self.name}", 0)
        # What the pod's containers run into, and when their run ends, stay as they were once
        # they have started (settle_jobs): Complete and Failed are terminal.
        if "reason" in job:
            self.reason, self.culprit = job["reason"], job.get("culprit")
        else:
            # The first container (init containers first) whose image is broken.
            images = template_images(self.template)
            self.culprit = next((i for i, image in enumerate(images)
                                 if image in state["broken_images"]), None)
            self.reason = None if self.culprit is None else state["broken_images"][
                images[self.culprit]]
        self.init_count = len((self.template.get("spec") or {}).get("initContainers") or [])
        self.finished = job.get("finished", self.started + slow)
        if self.reason is not None and self.reason not in JOB_CRASH_REASONS:
            self.outcome = "Pending"
        elif now < self.finished:
            self.outcome = "Running"
        else:
            self.outcome = "Complete" if self.reason is None else "Failed"
        # An init container runs into the crash: the pod is still initializing.
        self.initializing = self.outcome == "Running" and self.culprit is not None and (
            self.culprit < self.init_count)

    def _condition(self, type_: str, reason: str, message: str) -> dict:
        stamp = rfc3339(self.finished)
        return {"type": type_, "status": "True", "reason": reason, "message": message,
                "lastProbeTime": stamp, "lastTransitionTime": stamp}

    def status(self) -> dict:
        """As the Job controller of Kubernetes 1.31+ writes it (zero counters left out)."""
        status: dict[str, Any] = {"startTime": rfc3339(self.began), "ready": 0,
                                  "terminating": 0, "uncountedTerminatedPods": {}}
        if self.outcome == "Running":
            status.update(active=1, ready=0 if self.initializing else 1)
        elif self.outcome == "Pending":
            status["active"] = 1
        elif self.outcome == "Complete":
            status.update(succeeded=1, completionTime=rfc3339(self.finished), conditions=[
                self._condition("SuccessCriteriaMet", "CompletionsReached",
                                JOB_COMPLETE_MESSAGE),
                self._condition("Complete", "CompletionsReached", JOB_COMPLETE_MESSAGE)])
        else:
            status.update(failed=self.backoff_limit + 1, conditions=[
                self._condition("FailureTarget", "BackoffLimitExceeded", JOB_BACKOFF_MESSAGE),
                self._condition("Failed", "BackoffLimitExceeded", JOB_BACKOFF_MESSAGE)])
        return status

    def labels(self) -> dict[str, str]:
        """What the API server adds to the pod template (and the Job controller to its pods)."""
        return {"batch.kubernetes.io/controller-uid": self.uid,
                "batch.kubernetes.io/job-name": self.name,
                "controller-uid": self.uid, "job-name": self.name}

    def pod_name(self, attempt: int) -> str:
        return f"{self.name}-{generated_suffix(f'{self.uid}/{attempt}', 5)}"

    def pods(self, first_index: int = 0) -> list[dict]:
        attempts = self.backoff_limit + 1 if self.outcome == "Failed" else 1
        phase = {"Running": "Pending" if self.initializing else "Running", "Pending": "Pending",
                 "Complete": "Succeeded", "Failed": "Failed"}[self.outcome]
        return [self._pod(attempt, phase, first_index + attempt) for attempt in range(attempts)]

    def _container_statuses(self, pod: Pod, phase: str) -> tuple[list[dict], list[dict]]:
        """(initContainerStatuses, containerStatuses). The first container on a broken image
        is the one that waits (Pending) or exits 1 (Failed); the init containers before it
        completed; the containers after a broken init container wait for it."""
        spec = self.template.get("spec") or {}
        culprit, init_count = self.culprit, self.init_count
        started, finished = rfc3339(self.started), rfc3339(self.finished)
        completed = {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": started,
                                    "finishedAt": finished}}
        error = {"terminated": {"exitCode": 1, "reason": "Error", "startedAt": started,
                                "finishedAt": finished}}
        init_statuses, statuses = [], []
        for i, container in enumerate((spec.get("initContainers") or []) +
                                      (spec.get("containers") or [])):
            name, image = container.get("name", ""), container.get("image", "")
            entry: dict[str, Any] = {"name": name, "image": image, "restartCount": 0,
                                     "ready": False, "started": False}
            if culprit is not None and i == culprit and phase in ("Pending", "Failed"):
                if phase == "Failed":
                    entry["state"] = error
                else:
                    waiting: dict[str, Any] = {"reason": self.reason}
                    message = waiting_message(self.state, self.reason or "", image, name, pod,
                                              self.namespace, self.uid)
                    if message:
                        waiting["message"] = message
                    entry["state"] = {"waiting": waiting}
            elif culprit is not None and culprit < init_count and i > culprit:
                entry["state"] = {"waiting": {"reason": "PodInitializing"}}
            elif i == culprit and self.initializing:
                entry.update(started=True, state={"running": {"startedAt": started}})
            elif i < init_count or phase in ("Succeeded", "Failed"):
                entry["state"] = completed
            else:
                entry.update(ready=True, started=True, state={"running": {"startedAt": started}})
            (init_statuses if i < init_count else statuses).append(entry)
        return init_statuses, statuses

    def _pod(self, attempt: int, phase: str, index: int) -> dict:
        name = self.pod_name(attempt)
        created = self.began if attempt == 0 else self.finished
        containers = [c.get("name", "") for c in (self.template.get("spec") or {}).get(
            "containers") or []] or ["main"]
        labels = {**((self.template.get("metadata") or {}).get("labels") or {}), **self.labels()}
        pod = Pod(name, "Job", self.name, "", created, phase == "Running", self.reason, 0,
                  containers, labels)
        init_statuses, statuses = self._container_statuses(pod, phase)
        ready = phase == "Running"
        condition: dict[str, Any] = {"type": "Ready", "status": "True" if ready else "False"}
        if phase in ("Succeeded", "Failed"):
            condition["reason"] = "PodCompleted" if phase == "Succeeded" else "PodFailed"
        status: dict[str, Any] = {"phase": phase, "podIP": f"10.42.0.{10 + index % 240}",
                                  "hostIP": "10.0.1.23", "startTime": rfc3339(created),
                                  "conditions": [condition]}
        if init_statuses:
            status["initContainerStatuses"] = init_statuses
        status["containerStatuses"] = statuses
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": labels,
                "creationTimestamp": rfc3339(created),
                "uid": replica_set_uid(self.uid, f"pod/{attempt}"),
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": self.name,
                                     "uid": self.uid, "controller": True,
                                     "blockOwnerDeletion": True}],
            },
            "spec": {**(self.template.get("spec") or {}), "nodeName": NODE_NAME},
            "status": status,
        }


def settle_jobs(state: dict, now: float) -> list[str]:
    """Before the scenario changes which images are broken or how slow a run is: a Job whose
    pod has started keeps what it ran into (and a finished one its end: Complete and Failed are
    terminal). Returns the keys of the Jobs whose pod waits for its image (see start_jobs)."""
    waiting = []
    for key, record in state["objects"].items():
        if "job" not in record:
            continue
        view = JobView(state, record, now)
        if view.outcome == "Pending":
            waiting.append(key)
        elif "reason" not in record["job"]:
            record["job"].update(reason=view.reason, culprit=view.culprit)
            if view.outcome != "Running":
                record["job"]["finished"] = view.finished
    return waiting


def start_jobs(state: dict, waiting: list[str], now: float) -> None:
    """After such a change: a pod that waited for its image and now has it starts now."""
    for key in waiting:
        record = state["objects"].get(key)
        if record is not None and JobView(state, record, now).outcome != "Pending":
            record["job"]["started"] = now


def served_object(state: dict, record: dict, now: float) -> dict:
    """The object as `kubectl get` shows it: what was applied plus what the cluster adds."""
    obj = copy.deepcopy(record["object"])
    if obj["kind"] in WORKLOAD_KINDS:
        spec = obj.setdefault("spec", {})
        if obj["kind"] == "DaemonSet":
            spec.setdefault("revisionHistoryLimit", 10)
            spec.setdefault("updateStrategy", {"type": "RollingUpdate", "rollingUpdate": {
                "maxSurge": 0, "maxUnavailable": 1}})
        else:
            spec.setdefault("replicas", 1)
        if obj["kind"] == "Deployment":
            spec.setdefault("progressDeadlineSeconds", DEFAULT_PROGRESS_DEADLINE)
            spec.setdefault("revisionHistoryLimit", 10)
        elif obj["kind"] == "StatefulSet":
            spec.setdefault("updateStrategy", {"type": "RollingUpdate",
                                               "rollingUpdate": {"partition": 0}})
        obj["status"] = WorkloadView(state, record, now).status()
    elif obj["kind"] == "Job":
        view = JobView(state, record, now)
        spec = obj.setdefault("spec", {})
        if "completions" not in spec and "parallelism" not in spec:
            spec["completions"] = 1
        for field, default in (("parallelism", 1), ("backoffLimit", JOB_DEFAULT_BACKOFF_LIMIT),
                               ("completionMode", "NonIndexed"), ("suspend", False),
                               ("podReplacementPolicy", "TerminatingOrFailed")):
            spec.setdefault(field, default)
        # The API server generates the selector and labels the pod template to match it.
        spec.setdefault("selector", {"matchLabels": {
            "batch.kubernetes.io/controller-uid": view.uid}})
        template_meta = spec.setdefault("template", {}).setdefault("metadata", {})
        template_meta["labels"] = {**(template_meta.get("labels") or {}), **view.labels()}
        obj["status"] = view.status()
    return obj


PULL_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull")


def waiting_message(state: dict, reason: str, image: str, container: str, pod: Pod,
                    namespace: str, uid: str) -> str:
    """The kubelet's message for a container waiting with `reason` (a scenario may set its own)."""
    given = state.get("waiting_messages", {}).get(image)
    if given:
        return given
    if reason == "CrashLoopBackOff":
        backoff = min(CRASH_BACKOFF_START * 2 ** max(pod.restarts - 1, 0), CRASH_BACKOFF_CAP)
        shown = f"{backoff // 60}m{backoff % 60}s" if backoff >= 60 else f"{backoff}s"
        return (f"back-off {shown} restarting failed container={container} "
                f"pod={pod.name}_{namespace}({uid})")
    if reason == "ImagePullBackOff":
        return f'Back-off pulling image "{image}"'
    if reason == "ErrImagePull":
        return (f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": '
                f'failed to resolve reference "{image}": {image}: not found')
    if reason == "InvalidImageName":
        return (f'Failed to apply default image tag "{image}": couldn\'t parse image name '
                f'"{image}": invalid reference format')
    if reason == "ErrImageNeverPull":
        return f'Container image "{image}" is not present with pull policy of Never'
    if reason == "CreateContainerConfigError":
        return 'secret "app-secrets" not found'
    if reason in ("CreateContainerError", "RunContainerError"):
        return ('failed to create containerd task: failed to create shim task: OCI runtime '
                'create failed: exec: "/app/start": stat /app/start: no such file or directory')
    return ""


def container_statuses(view: WorkloadView, pod: Pod, uid: str) -> tuple[list[dict], list[dict]]:
    """(initContainerStatuses, containerStatuses): only a container whose own image is broken
    waits with the broken reason; the others run (or wait for the init containers)."""
    template = template_of(view.record, pod.hash)
    spec = template.get("spec") or {}
    broken = view.state["broken_images"]
    started = rfc3339(pod.created)
    init_statuses, statuses = [], []
    init_blocked = False
    for container in spec.get("initContainers") or []:
        name, image = container.get("name", ""), container.get("image", "")
        if not pod.ready and image in broken:
            init_blocked = True
            reason = broken[image]
            state: dict[str, Any] = {"waiting": {"reason": reason, "message": waiting_message(
                view.state, reason, image, name, pod, view.namespace, uid)}}
            init_statuses.append({"name": name, "image": image, "ready": False,
                                  "restartCount": 0, "state": state, "started": False})
        else:
            init_statuses.append({"name": name, "image": image, "ready": True, "restartCount": 0,
                                  "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                                                           "startedAt": started,
                                                           "finishedAt": started}},
                                  "started": False})
    for container in spec.get("containers") or []:
        name, image = container.get("name", ""), container.get("image", "")
        entry: dict[str, Any] = {"name": name, "image": image, "restartCount": 0}
        template_broken = any(i in broken for i in template_images(template))
        if init_blocked and not pod.ready:
            entry.update(ready=False, started=False,
                         state={"waiting": {"reason": "PodInitializing"}})
        elif pod.ready or (template_broken and image not in broken):
            # A ready pod, or a healthy container next to a broken one.
            entry.update(ready=True, started=True, state={"running": {"startedAt": started}})
        else:
            reason = broken.get(image) or pod.waiting or "ContainerCreating"
            waiting: dict[str, Any] = {"reason": reason}
            message = waiting_message(view.state, reason, image, name, pod, view.namespace, uid)
            if message:
                waiting["message"] = message
            entry.update(ready=False, started=False, state={"waiting": waiting})
            if reason == "CrashLoopBackOff":
                entry["restartCount"] = pod.restarts
                entry["lastState"] = {"terminated": {"exitCode": 1, "reason": "Error",
                                                     "startedAt": started,
                                                     "finishedAt": started}}
        statuses.append(entry)
    return init_statuses, statuses


def pod_object(view: WorkloadView, pod: Pod, index: int) -> dict:
    template = template_of(view.record, pod.hash)
    uid = f"{view.record['object']['metadata']['uid'][:-4]}{index:04d}"
    init_statuses, statuses = container_statuses(view, pod, uid)
    status: dict[str, Any] = {
        "phase": "Running" if pod.ready or pod.waiting == "CrashLoopBackOff" else "Pending",
        "podIP": f"10.42.0.{10 + index % 240}",
        "hostIP": "10.0.1.23",
        "conditions": [{"type": "Ready", "status": "True" if pod.ready else "False"}],
    }
    if init_statuses:
        status["initContainerStatuses"] = init_statuses
    status["containerStatuses"] = statuses
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name,
            "namespace": view.namespace,
            "labels": pod.labels,
            "creationTimestamp": rfc3339(pod.created),
            "uid": uid,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": pod.owner_kind,
                                 "name": pod.owner_name, "controller": True,
                                 "blockOwnerDeletion": True,
                                 "uid": view.owner_uid(pod.hash)}],
        },
        "spec": {**(template.get("spec") or {}), "nodeName": NODE_NAME},
        "status": status,
    }


def list_pods(state: dict, namespace: str, now: float) -> list[dict]:
    pods = []
    for record in state["objects"].values():
        obj = record["object"]
        if obj["kind"] == "Pod" and obj["metadata"].get("namespace") == namespace:
            # A bare Pod applied from a manifest: the double just runs it.
            served = copy.deepcopy(obj)
            served["status"] = {"phase": "Running", "containerStatuses": [
                {"name": c.get("name", ""), "ready": True, "restartCount": 0,
                 "state": {"running": {}}} for c in (obj.get("spec") or {}).get("containers")
                or []]}
            pods.append(served)
        elif obj["kind"] in WORKLOAD_KINDS and obj["metadata"].get("namespace") == namespace:
            view = WorkloadView(state, record, now)
            pods.extend(pod_object(view, pod, len(pods)) for pod in view.pods())
        elif obj["kind"] == "Job" and obj["metadata"].get("namespace") == namespace:
            pods.extend(JobView(state, record, now).pods(len(pods)))
    return sorted(pods, key=lambda p: p["metadata"]["name"])


def list_events(state: dict, namespace: str) -> list[dict]:
    events = []
    for i, event in enumerate(state["events"]):
        if event["namespace"] != namespace:
            continue
        kind, _, name = event["object"].partition("/")
        kind = {"pod": "Pod", "deployment": "Deployment", "statefulset": "StatefulSet",
                "daemonset": "DaemonSet"}[kind]
        stamp = rfc3339(event["time"])
        events.append({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{name}.{i:016x}", "namespace": namespace,
                         "creationTimestamp": stamp},
            "type": event["type"], "reason": event["reason"], "message": event["message"],
            "involvedObject": {"kind": kind, "name": name, "namespace": namespace},
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        })
    return events


# ---------------------------------------------------------------------------------------------
# jsonpath (the subset of kubectl's that k3s-deploy.sh uses, with kubectl's output rules)


class JsonPathError(KubectlError):
    pass


@dataclass
class _Text:
    text: str


@dataclass
class _Path:
    steps: list[tuple[str, Any]]


@dataclass
class _Range:
    path: _Path
    body: list


def _parse_path(expr: str, template: str) -> _Path:
    text = expr.strip()
    if text.startswith("$"):
        text = text[1:]
    steps: list[tuple[str, Any]] = []
    i = 0
    while i < len(text):
        if text.startswith("..", i):
            raise JsonPathError(f"error: the kubectl double does not support recursive descent "
                                f"in jsonpath {template}")
        if text[i] == ".":
            i += 1
            key = []
            while i < len(text) and text[i] not in ".[":
                if text[i] == "\\" and i + 1 < len(text):
                    i += 1
                key.append(text[i])
                i += 1
            name = "".join(key)
            steps.append(("wildcard", None) if name == "*" else ("field", name))
        elif text[i] == "[":
            end = _closing_bracket(text, i)
            if end < 0:
                raise JsonPathError(f"error: error parsing jsonpath {template}, unterminated "
                                    "array")
            inner = text[i + 1:end].strip()
            filter_ = re.fullmatch(r"\?\(\s*@(\S*?)\s*(?:(==|!=)\s*(\"[^\"]*\"|'[^']*'|-?\d+))?\s*\)",
                                   inner)
            if filter_:
                left = _parse_path(filter_.group(1), template)
                operator, literal = filter_.group(2), filter_.group(3)
                right: Any = None
                if literal is not None:
                    right = literal[1:-1] if literal[0] in "\"'" else int(literal)
                steps.append(("filter", (left, operator, right)))
            elif inner == "*":
                steps.append(("wildcard", None))
            elif re.fullmatch(r"-?\d+", inner):
                steps.append(("index", int(inner)))
            elif re.fullmatch(r"'[^']*'|\"[^\"]*\"", inner):
                steps.append(("field", inner[1:-1]))
            else:
                raise JsonPathError(f"error: the kubectl double does not support [{inner}] in "
                                    f"jsonpath {template}")
            i = end + 1
        else:
            raise JsonPathError(f"error: error parsing jsonpath {template}, unrecognized "
                                f"character in action: {text[i]!r}")
    return _Path(steps)


def _closing_bracket(text: str, start: int) -> int:
    """The index of the "]" that closes the "[" at `start` (nested brackets and quoted
    strings skipped), or -1."""
    depth, quote = 0, None
    for j in range(start, len(text)):
        ch = text[j]
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth == 0:
                return j
    return -1


def _unquote(literal: str, template: str) -> str:
    body = literal[1:-1]
    escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "0": "\0"}
    out, i = [], 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", body[i + 2:i + 4]):
                out.append(chr(int(body[i + 2:i + 4], 16)))
                i += 4
                continue
            if nxt not in escapes:
                raise JsonPathError(f"error: error parsing jsonpath {template}, invalid syntax")
            out.append(escapes[nxt])
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


def parse_jsonpath(template: str) -> list:
    nodes: list = []
    stack: list[list] = [nodes]
    i = 0
    while i < len(template):
        start = template.find("{", i)
        if start < 0:
            stack[-1].append(_Text(template[i:]))
            break
        if start > i:
            stack[-1].append(_Text(template[i:start]))
        # The action ends at the first "}" outside quotes, as in kubectl's lexer.
        j, quote = start + 1, None
        while j < len(template):
            ch = template[j]
            if quote:
                if ch == "\\":
                    j += 1
                elif ch == quote:
                    quote = None
            elif ch in "\"'":
                quote = ch
            elif ch == "}":
                break
            j += 1
        if j >= len(template):
            if quote:
                raise JsonPathError(f"error: error parsing jsonpath {template}, unterminated "
                                    "quoted string")
            raise JsonPathError(f"error: error parsing jsonpath {template}, unclosed action")
        action = template[start + 1:j].strip()
        if action.startswith(("\"", "'")):
            stack[-1].append(_Text(_unquote(action, template)))
        elif action.startswith("range "):
            node = _Range(_parse_path(action[len("range "):], template), [])
            stack[-1].append(node)
            stack.append(node.body)
        elif action == "end":
            if len(stack) == 1:
                raise JsonPathError(f'error: error executing jsonpath "{template}": Error '
                                    "executing template: not in range, nothing to end.")
            stack.pop()
        else:
            stack[-1].append(_parse_path(action, template))
        i = j + 1
    return nodes


def _walk(path: _Path, root: Any, template: str, *, lenient: bool = False) -> list:
    """The values `path` selects from `root`. `lenient` (a filter's left side): an index out of
    range selects nothing, as kubectl's filters treat a missing value."""
    values = [root]
    for kind, arg in path.steps:
        found = []
        for value in values:
            if kind == "field":
                if isinstance(value, dict) and arg in value:
                    found.append(value[arg])
            elif kind == "filter":
                # kubectl: filters apply to arrays; each element whose left side gives one
                # value that compares true (or, with no operator, that has it) is kept.
                if not isinstance(value, list):
                    raise JsonPathError(f'error: error executing jsonpath "{template}": Error '
                                        f"executing template: {_format(value)} is not array "
                                        "or slice and cannot be filtered")
                left, operator, right = arg
                for element in value:
                    lefts = _walk(left, element, template, lenient=True)
                    if operator is None:
                        if lefts:
                            found.append(element)
                        continue
                    if not lefts:
                        continue
                    if len(lefts) > 1:
                        raise JsonPathError(f'error: error executing jsonpath "{template}": '
                                            "Error executing template: can only compare one "
                                            "element at a time")
                    if (lefts[0] == right) == (operator == "=="):
                        found.append(element)
            elif kind == "wildcard":
                if isinstance(value, list):
                    found.extend(value)
                elif isinstance(value, dict):
                    found.extend(value[k] for k in sorted(value))
            elif isinstance(value, list):
                index = arg + len(value) if arg < 0 else arg
                if not 0 <= index < len(value) and lenient:
                    continue
                if not 0 <= index < len(value):
                    raise JsonPathError(
                        f'error: error executing jsonpath "{template}": Error executing '
                        f"template: array index out of bounds: index {arg}, length "
                        f"{len(value)}.")
                found.append(value[index])
        values = found
    return values


def _format(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return str(value)


def _render(nodes: list, root: Any, template: str) -> str:
    out = []
    for node in nodes:
        if isinstance(node, _Text):
            out.append(node.text)
        elif isinstance(node, _Range):
            for item in _walk(node.path, root, template):
                out.append(_render(node.body, item, template))
        else:
            out.append(" ".join(_format(v) for v in _walk(node, root, template)))
    return "".join(out)


def render_jsonpath(template: str, obj: Any) -> str:
    """Evaluates a kubectl -o jsonpath template; missing keys print nothing, as in kubectl."""
    return _render(parse_jsonpath(template), obj, template)


# ---------------------------------------------------------------------------------------------
# Command line


@dataclass(frozen=True)
class Flag:
    name: str
    short: str | None = None
    boolean: bool = False
    repeatable: bool = False
    bare: str | None = None  # the value of a flag given without one (pflag's NoOptDefVal)


GLOBAL_FLAGS = (Flag("namespace", "n"), Flag("request-timeout"))
COMMAND_FLAGS = {
    "get": (Flag("output", "o"), Flag("ignore-not-found", boolean=True), Flag("raw"),
            Flag("field-selector"), Flag("sort-by")),
    "apply": (Flag("filename", "f", repeatable=True), Flag("dry-run"), Flag("validate"),
              Flag("output", "o")),
    "rollout status": (Flag("timeout"),),
    "rollout undo": (Flag("to-revision"),),
    "delete": (Flag("wait", boolean=True), Flag("ignore-not-found", boolean=True),
               Flag("cascade", bare="background"), Flag("timeout")),
    "wait": (Flag("for"), Flag("timeout")),
    "create": (Flag("filename", "f", repeatable=True), Flag("output", "o"), Flag("dry-run")),
    "replace": (Flag("filename", "f", repeatable=True), Flag("output", "o")),
    "annotate": (Flag("overwrite", boolean=True),),
    "logs": (Flag("container", "c"), Flag("previous", "p", boolean=True), Flag("tail")),
    "diff": (Flag("filename", "f", repeatable=True),),
    "api-resources": (Flag("namespaced", boolean=True), Flag("no-headers", boolean=True)),
}


def command_words(argv: list[str]) -> list[str]:
    """The words before the first flag that is not a global one (`kubectl -n x get pods`)."""
    words, i = [], 0
    global_flags = {f"--{f.name}" for f in GLOBAL_FLAGS} | {f"-{f.short}" for f in GLOBAL_FLAGS
                                                            if f.short}
    while i < len(argv) and len(words) < 2:
        arg = argv[i]
        if arg in global_flags:
            i += 2
            continue
        if not arg.startswith("-"):
            words.append(arg)
        i += 1
    return words


def parse_command_line(argv: list[str]) -> tuple[str, list[str], dict[str, Any]]:
    words = command_words(argv)
    if not words:
        raise KubectlError("error: the kubectl double needs a command (get, apply, rollout, "
                           "delete, wait)")
    command = words[0]
    if command == "rollout":
        if len(words) < 2 or words[1] not in ("status", "undo"):
            wanted = " ".join(a for a in argv[argv.index("rollout") + 1:] if not a.startswith("-"))
            raise KubectlError(f'error: unknown command "{wanted}"\nSee \'kubectl rollout -h\' '
                               "for help and examples")
        command = f"rollout {words[1]}"
    elif command not in COMMAND_FLAGS:
        raise KubectlError(f'error: unknown command "{command}" for "kubectl"')
    flags_spec = {f.name: f for f in GLOBAL_FLAGS + COMMAND_FLAGS[command]}
    shorts = {f.short: f for f in flags_spec.values() if f.short}
    positional: list[str] = []
    flags: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag: Flag | None
        if arg.startswith("--") and len(arg) > 2:
            name, has_value, value = arg[2:].partition("=")
            flag = flags_spec.get(name)
            if flag is None:
                raise UsageError(f"unknown flag: --{name}", command)
            shown = f"--{name}"
        elif arg.startswith("-") and len(arg) > 1:
            flag = shorts.get(arg[1])
            if flag is None:
                raise UsageError(f"unknown shorthand flag: '{arg[1]}' in {arg}", command)
            has_value, value = ("=", arg[2:].removeprefix("=")) if len(arg) > 2 else ("", "")
            shown = f"'{arg[1]}' in {arg}"
        else:
            positional.append(arg)
            i += 1
            continue
        if flag.boolean:
            if has_value:
                if value.lower() not in ("true", "false", "1", "0", "t", "f"):
                    raise UsageError(f'invalid argument "{value}" for "--{flag.name}" flag: '
                                     f'strconv.ParseBool: parsing "{value}": invalid syntax',
                                     command)
                flags[flag.name] = value.lower() in ("true", "1", "t")
            else:
                flags[flag.name] = True
        else:
            if not has_value and flag.bare is not None:
                value = flag.bare
            elif not has_value:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: {shown}", command)
                value = argv[i]
            if flag.repeatable:
                flags.setdefault(flag.name, []).append(value)
            else:
                flags[flag.name] = value
        i += 1
    skip = 2 if command.startswith("rollout") else 1
    return command, positional[skip:], flags


# What Go's strconv.ParseBool accepts.
GO_BOOLEANS = {**dict.fromkeys(("1", "t", "T", "true", "TRUE", "True"), True),
               **dict.fromkeys(("0", "f", "F", "false", "FALSE", "False"), False)}


def check_request_timeout(flags: dict) -> None:
    value = flags.get("request-timeout")
    if value is not None and not re.fullmatch(r"\d+[smh]?", value):
        raise KubectlError("error: Invalid timeout value. Timeout must be a single integer in "
                           "seconds, or an integer followed by a corresponding time unit "
                           "(e.g. 1s | 2m | 3h)")


# ---------------------------------------------------------------------------------------------
# Commands


def yaml_documents(text: str) -> Iterator[Any]:
    """YAML documents as Kubernetes reads them: timestamps stay strings."""
    import yaml  # only apply needs YAML; keeping it out of the other calls keeps them fast

    class KubernetesLoader(yaml.SafeLoader):
        pass

    KubernetesLoader.yaml_implicit_resolvers = {
        first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    return yaml.load_all(text, Loader=KubernetesLoader)


def load_manifests(path: str, validate: bool) -> tuple[list[dict], list[str]]:
    """Documents of one -f file, and the decode errors kubectl reports for it."""
    import yaml

    if path == "-":
        text, path = sys.stdin.read(), "STDIN"
    else:
        file = Path(path)
        if not file.exists():
            raise KubectlError(f'error: the path "{path}" does not exist')
        text = file.read_text()
    docs, errors = [], []
    try:
        for doc in yaml_documents(text):
            if doc is None:
                continue
            if not isinstance(doc, dict):
                errors.append(f'error: unable to decode "{path}": json: cannot unmarshal '
                              f"{type(doc).__name__} into Go value of type map[string]interface {{}}")
                continue
            missing = [f for f in ("apiVersion", "kind") if not doc.get(f)]
            if missing:
                if validate:
                    errors.append(f'error: error validating "{path}": error validating data: '
                                  f"[{', '.join(f'{m} not set' for m in missing)}]; if you "
                                  "choose to ignore these errors, turn validation off with "
                                  "--validate=false")
                else:
                    field = "Kind" if "kind" in missing else "apiVersion"
                    errors.append(f'error: unable to decode "{path}": Object \'{field}\' is '
                                  f"missing in '{json.dumps(doc, separators=(',', ':'))}'")
                continue
            docs.append(doc)
    except yaml.YAMLError as exc:
        errors.append(f"error: error parsing {path}: error converting YAML to JSON: yaml: "
                      f"{str(exc).splitlines()[0]}")
    return docs, errors


# The Job spec fields the API server refuses to change (ValidateJobSpecUpdate), in its order.
JOB_IMMUTABLE_FIELDS = ("completions", "selector", "template", "completionMode",
                        "podFailurePolicy", "backoffLimitPerIndex", "managedBy", "successPolicy")


def defaulted_job_spec(spec: dict) -> dict:
    """The Job spec fields the API server defaults, as they are once stored."""
    spec = dict(spec)
    if "completions" not in spec and "parallelism" not in spec:
        spec["completions"] = 1
    spec.setdefault("completionMode", "NonIndexed")
    return spec


def go_value(value: Any) -> str:
    """A value in a field error. The real server prints a struct as Go source
    (core.PodTemplateSpec{...}); the double prints its JSON."""
    if isinstance(value, str):
        return json.dumps(value)
    if value is None:
        return "null"
    return _format(value)


def check_job_update(old_spec: dict, new_spec: dict, name: str) -> None:
    stored = defaulted_job_spec(old_spec)
    # What the server defaulted and the new manifest leaves out stays (apply's three-way merge).
    kept = {k: v for k, v in stored.items() if k not in old_spec}
    wanted = defaulted_job_spec({**kept, **new_spec})
    errors = [f"spec.{field}: Invalid value: {go_value(wanted.get(field))}: field is immutable"
              for field in JOB_IMMUTABLE_FIELDS if stored.get(field) != wanted.get(field)]
    if errors:
        shown = errors[0] if len(errors) == 1 else f"[{', '.join(errors)}]"
        raise KubectlError(f'The Job "{name}" is invalid: {shown}')


def check_update_allowed(kind: Kind, old: dict, new: dict) -> None:
    name = new["metadata"]["name"]
    old_spec, new_spec = old.get("spec") or {}, new.get("spec") or {}
    if kind.kind == "Job":
        check_job_update(old_spec, new_spec, name)
    if kind.kind in ("Deployment", "DaemonSet") and old_spec.get("selector") != new_spec.get(
            "selector"):
        raise KubectlError(f'The {kind.kind} "{name}" is invalid: spec.selector: Invalid value: '
                           f"{json.dumps(new_spec.get('selector'))}: field is immutable")
    if kind.kind == "StatefulSet":
        mutable = ("replicas", "ordinals", "template", "updateStrategy",
                   "persistentVolumeClaimRetentionPolicy", "minReadySeconds")
        if {k: v for k, v in old_spec.items() if k not in mutable} != {
                k: v for k, v in new_spec.items() if k not in mutable}:
            raise KubectlError(
                f'The StatefulSet "{name}" is invalid: spec: Forbidden: updates to statefulset '
                "spec for fields other than 'replicas', 'ordinals', 'template', "
                "'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and "
                "'minReadySeconds' are forbidden")


def check_workload_spec(kind: Kind, manifest: dict) -> None:
    if kind.kind not in WORKLOAD_KINDS:
        return
    name = manifest["metadata"]["name"]
    spec = manifest.get("spec") or {}
    selector = (spec.get("selector") or {}).get("matchLabels")
    labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    if not selector:
        raise KubectlError(f'The {kind.kind} "{name}" is invalid: spec.selector: Required value')
    if any(labels.get(k) != v for k, v in selector.items()):
        raise KubectlError(f'The {kind.kind} "{name}" is invalid: spec.template.metadata.labels: '
                           "Invalid value: `selector` does not match template `labels`")
    if not ((spec.get("template") or {}).get("spec") or {}).get("containers"):
        raise KubectlError(f'The {kind.kind} "{name}" is invalid: spec.template.spec.containers: '
                           "Required value")


def check_job_spec(manifest: dict) -> None:
    """What the API server validates in a Job (ValidateJobSpec), the first error only."""
    name = manifest["metadata"]["name"]
    spec = manifest.get("spec") or {}
    pod_spec = (spec.get("template") or {}).get("spec") or {}
    problem = None
    backoff = spec.get("backoffLimit")
    if backoff is not None and (not isinstance(backoff, int) or backoff < 0):
        problem = f"spec.backoffLimit: Invalid value: {backoff}: must be greater than or equal to 0"
    elif not pod_spec.get("containers"):
        problem = "spec.template.spec.containers: Required value"
    elif pod_spec.get("restartPolicy", "Always") not in ("OnFailure", "Never"):
        problem = (f"spec.template.spec.restartPolicy: Unsupported value: "
                   f'"{pod_spec.get("restartPolicy", "Always")}": supported values: '
                   '"OnFailure", "Never"')
    if problem:
        raise KubectlError(f'The Job "{name}" is invalid: {problem}')


REVISION_ANNOTATION = "deployment.kubernetes.io/revision"


def merged_annotations(record: dict, manifest: dict) -> dict:
    """Client-side apply's three-way merge, for annotations: what the last apply set and this
    one leaves out goes; what others set (the revision, `kubectl annotate`) stays."""
    live = record["object"]["metadata"].get("annotations") or {}
    last = record.get("last_applied_annotations")
    if last is None:
        last = [k for k in live if k != REVISION_ANNOTATION]
    new = manifest["metadata"].get("annotations") or {}
    merged = {k: v for k, v in live.items() if k not in last or k in new}
    merged.update(new)
    return merged


MICRO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)")


def check_spec(kind: Kind, manifest: dict, path: str, action: str) -> None:
    """What the API server validates for the kinds the double knows well."""
    check_workload_spec(kind, manifest)
    if kind.kind == "Job":
        check_job_spec(manifest)
    if kind.kind != "Lease":
        return
    name = manifest["metadata"]["name"]
    spec = manifest.get("spec") or {}
    for field in ("acquireTime", "renewTime"):
        value = spec.get(field)
        if value is not None and not (isinstance(value, str) and MICRO_TIME.fullmatch(value)):
            raise KubectlError(
                f'Error from server (BadRequest): error when {action} "{path}": Lease in version '
                f'"v1" cannot be handled as a Lease: parsing time "{value}" as '
                '"2006-01-02T15:04:05.000000Z07:00": cannot parse')
    duration = spec.get("leaseDurationSeconds")
    if duration is not None and (not isinstance(duration, int) or duration <= 0):
        raise KubectlError(f'The Lease "{name}" is invalid: spec.leaseDurationSeconds: Invalid '
                           f"value: {duration}: must be greater than 0")


def apply_one(state: dict, path: str, manifest: dict, dry_run: bool, now: float,
              output: str | None) -> str:
    kind = kind_for_manifest(state, manifest["apiVersion"], manifest["kind"])
    meta = manifest.get("metadata") or {}
    name = meta.get("name") or ""
    namespace = meta.get("namespace") or ""
    if kind is None:
        raise KubectlError(f'error: resource mapping not found for name: "{name}" namespace: '
                           f'"{namespace}" from "{path}": no matches for kind '
                           f'"{manifest["kind"]}" in version "{manifest["apiVersion"]}"\n'
                           "ensure CRDs are installed first")
    if kind.namespaced:
        namespace = namespace or DEFAULT_NAMESPACE
    if not name and meta.get("generateName"):
        # kubectl's own check (apply needs the name to find the live object).
        raise KubectlError(f"error: from {meta['generateName']}: cannot use generate name "
                           "with apply")
    if not name:
        group_version = manifest["apiVersion"] if "/" in manifest["apiVersion"] else (
            f"/{manifest['apiVersion']}")
        raise KubectlError(f'error: error when retrieving current configuration of:\nResource: '
                           f'"{group_version}, Resource={kind.plural}", GroupVersionKind: '
                           f'"{group_version}, Kind={kind.kind}"\nName: "", Namespace: '
                           f'"{namespace}"\nfrom server for: "{path}": resource name may not be '
                           "empty")
    manifest = copy.deepcopy(manifest)
    manifest.setdefault("metadata", {})
    if kind.kind == "Secret" and isinstance(manifest.get("stringData"), dict):
        # The API server writes stringData into data (base64) and never stores stringData.
        data = manifest.setdefault("data", {}) or {}
        for field, value in manifest.pop("stringData").items():
            data[field] = base64.b64encode(str(value).encode()).decode()
        manifest["data"] = data
    if kind.namespaced:
        manifest["metadata"]["namespace"] = namespace
    else:
        manifest["metadata"].pop("namespace", None)
    key = object_key(kind, namespace, name)
    existing = state["objects"].get(key)
    verb = "created" if existing is None else "configured"
    if dry_run:
        if output:
            return render_output(output, manifest, kind)
        return f"{kind.qualified}/{name} {verb} (dry run)\n"
    if kind.namespaced and object_key(BUILTIN_KINDS[0], "", namespace) not in state["objects"]:
        raise KubectlError(f'Error from server (NotFound): error when creating "{path}": '
                           f'namespaces "{namespace}" not found')
    if f"{kind.kind}/{name}" in state["failing_applies"] + state.get("failing_real_applies", []):
        action = "creating" if existing is None else "patching"
        raise KubectlError(f'Error from server (Forbidden): error when {action} "{path}": '
                           f'admission webhook "deny.k3s-deploy.test" denied the request: '
                           f"{kind.kind} {name} is refused by the test scenario")
    check_spec(kind, manifest, path, "creating" if existing is None else "patching")
    applied_annotations = sorted(manifest["metadata"].get("annotations") or {})
    if existing is None:
        existing = store_new_object(state, kind, manifest, now)
    else:
        old = existing["object"]
        check_update_allowed(kind, old, manifest)
        applied = {k: v for k, v in manifest.items() if k not in ("metadata", "status")}
        before = {k: v for k, v in old.items() if k not in ("metadata", "status")}
        old_meta = {k: old["metadata"].get(k) for k in ("labels",)}
        new_meta = {k: manifest["metadata"].get(k) for k in ("labels",)}
        annotations = merged_annotations(existing, manifest)
        if applied == before and old_meta == new_meta and annotations == (
                old["metadata"].get("annotations") or {}):
            verb = "unchanged"
        else:
            server_meta = {k: old["metadata"][k] for k in ("uid", "creationTimestamp",
                                                           "generation") if k in old["metadata"]}
            if applied.get("spec") != before.get("spec"):
                server_meta["generation"] = old["metadata"].get("generation", 1) + 1
            manifest["metadata"].update(server_meta)
            manifest["metadata"].pop("annotations", None)
            if annotations:
                manifest["metadata"]["annotations"] = annotations
            existing["object"] = manifest
            bump_resource_version(state, manifest)
            if kind.kind in WORKLOAD_KINDS:
                change_template(state, existing, now)
    # What client-side apply records as last applied (kubectl keeps it in an annotation; the
    # double keeps it beside the object): what a later apply may remove.
    existing["last_applied_annotations"] = applied_annotations
    if output:
        return render_output(output, state["objects"][key]["object"], kind)
    return f"{kind.qualified}/{name} {verb}\n"


def server_dry_run(state: dict, path: str, manifest: dict, now: float,
                   output: str | None) -> str:
    """--dry-run=server: the API server runs every check of a real apply (namespace, admission,
    validation, immutable fields) on each object and stores nothing, not even for the next
    document of the same file."""
    scratch = copy.deepcopy(state)
    scratch["failing_real_applies"] = []
    result = apply_one(scratch, path, manifest, dry_run=False, now=now, output=output)
    if output:
        return result
    return result.rstrip("\n") + " (server dry run)\n"


def render_output(output: str, obj: dict, kind: Kind) -> str:
    if output == "name":
        return f"{kind.qualified}/{obj['metadata']['name']}\n"
    if output == "json":
        return json.dumps(obj, indent=4) + "\n"
    if output.startswith("jsonpath="):
        return render_jsonpath(output[len("jsonpath="):], obj)
    raise KubectlError(f"error: unable to match a printer suitable for the output format "
                       f'"{output}", allowed formats are: json,jsonpath,name,wide')


def command_apply(positional: list[str], flags: dict) -> int:
    if positional:
        raise KubectlError("error: Unexpected args: " + str(positional) +
                           "\nSee 'kubectl apply -h' for help and examples")
    files = flags.get("filename") or []
    if not files:
        raise KubectlError("error: must specify one of -f and -k")
    dry_run = flags.get("dry-run", "none")
    if dry_run not in ("none", "client", "server"):
        raise KubectlError(f'error: Invalid dry-run value ({dry_run}). Must be "none", '
                           '"server", or "client".')
    validate = flags.get("validate", "strict")
    if validate.lower() not in ("true", "false", "strict", "warn", "ignore"):
        raise KubectlError(f'error: invalid - validate option "{validate}"; must be one of: '
                           "strict (or true), warn, ignore (or false)")
    output = flags.get("output")
    if output is not None and output not in ("name", "json") and not output.startswith(
            "jsonpath="):
        raise KubectlError(f'error: unable to match a printer suitable for the output format '
                           f'"{output}", allowed formats are: json,jsonpath,name')
    errors: list[str] = []
    with open_state(state_path(), write=dry_run == "none") as state:
        require_api(state)
        now = time.time()
        applied = 0
        for path in files:
            docs, decode_errors = load_manifests(path, validate.lower() in ("true", "strict"))
            errors.extend(decode_errors)
            for manifest in docs:
                applied += 1
                try:
                    if dry_run == "server":
                        sys.stdout.write(server_dry_run(state, path, manifest, now, output))
                    else:
                        sys.stdout.write(apply_one(state, path, manifest, dry_run == "client",
                                                   now, output))
                except KubectlError as exc:
                    errors.append(str(exc))
        if not applied and not errors:
            raise KubectlError("error: no objects passed to apply")
    for error in errors:
        print(error, file=sys.stderr)
    return 1 if errors else 0


def command_get(positional: list[str], flags: dict) -> int:
    raw = flags.get("raw")
    if raw is not None:
        if flags.get("output") is not None:
            raise KubectlError("error: --raw and --output are mutually exclusive")
        with open_state(state_path(), write=False) as state:
            require_api(state)
        if raw in ("/readyz", "/livez", "/healthz"):
            print("ok", end="")
            return 0
        raise KubectlError("Error from server (NotFound): the server could not find the "
                           "requested resource")
    if not positional:
        raise KubectlError('You must specify the type of resource to get. Use "kubectl '
                           'api-resources" for a complete list of supported resources.\n\n'
                           "error: Required resource not specified.")
    type_name, _, name = positional[0].partition("/")
    names = [name] if name else positional[1:]
    output = flags.get("output", "")
    if output and output not in ("wide", "name", "json") and not output.startswith("jsonpath="):
        raise KubectlError(f'error: unable to match a printer suitable for the output format '
                           f'"{output}", allowed formats are: json,jsonpath,name,wide')
    with open_state(state_path(), write=False) as state:
        require_api(state)
        kind = kind_for_name(state, type_name)
        namespace = flags.get("namespace") or DEFAULT_NAMESPACE
        now = time.time()
        items = list_objects(state, kind, namespace, now)
    selector = flags.get("field-selector")
    if selector:
        items = filter_by_fields(items, selector, kind)
    if flags.get("sort-by"):
        field = flags["sort-by"]
        template = field if field.startswith("{") else "{" + field + "}"
        items.sort(key=lambda obj: render_jsonpath(template, obj))
    if names:
        found = {obj["metadata"]["name"]: obj for obj in items}
        missing = [n for n in names if n not in found]
        for n in missing:
            if not flags.get("ignore-not-found"):
                print(f'Error from server (NotFound): {kind.resource} "{n}" not found',
                      file=sys.stderr)
        items = [found[n] for n in names if n in found]
        if not items:
            return 0 if flags.get("ignore-not-found") else 1
        single = len(names) == 1
    else:
        single = False
    if output.startswith("jsonpath="):
        target = items[0] if single else {"apiVersion": "v1", "kind": "List", "items": items,
                                          "metadata": {"resourceVersion": ""}}
        sys.stdout.write(render_jsonpath(output[len("jsonpath="):], target))
        return 0
    if output == "json":
        target = items[0] if single else {"apiVersion": "v1", "kind": "List", "items": items}
        print(json.dumps(target, indent=4))
        return 0
    if output == "name":
        for obj in items:
            print(f"{kind.qualified}/{obj['metadata']['name']}")
        return 0
    if not items:
        where = f" in {namespace} namespace" if kind.namespaced else ""
        print(f"No resources found{where}.", file=sys.stderr)
        return 0
    sys.stdout.write(format_table(table_rows(kind, items, output == "wide", now)))
    return 0


def list_objects(state: dict, kind: Kind, namespace: str, now: float) -> list[dict]:
    if kind.kind == "Pod":
        return list_pods(state, namespace, now)
    if kind.kind == "Event":
        return list_events(state, namespace)
    # What the controllers make per revision, served from their workload's history.
    made_by = {"ReplicaSet": (("Deployment",), WorkloadView.replica_sets),
               "ControllerRevision": (("StatefulSet", "DaemonSet"),
                                      WorkloadView.controller_revisions)}
    if kind.kind in made_by:
        owner_kinds, revisions = made_by[kind.kind]
        return sorted(
            (item for record in state["objects"].values()
             if record["object"]["kind"] in owner_kinds
             and record["object"]["metadata"].get("namespace") == namespace
             for item in revisions(WorkloadView(state, record, now))),
            key=lambda o: o["metadata"]["name"])
    items = []
    for record in state["objects"].values():
        obj = record["object"]
        if obj["kind"] != kind.kind:
            continue
        if kind.namespaced and obj["metadata"].get("namespace") != namespace:
            continue
        items.append(served_object(state, record, now))
    return sorted(items, key=lambda o: o["metadata"]["name"])


def filter_by_fields(items: list[dict], selector: str, kind: Kind) -> list[dict]:
    """--field-selector with the fields the API supports for these kinds (=, ==, !=)."""
    terms = []
    for term in selector.split(","):
        match = re.fullmatch(r"([A-Za-z.]+)(==|!=|=)(.*)", term)
        if not match:
            raise KubectlError(f"Error from server (BadRequest): invalid selector: '{selector}'; "
                               f"can't understand '{term}'")
        field, op, value = match.groups()
        supported = {"metadata.name", "metadata.namespace"}
        if kind.kind == "Event":
            supported |= {"type", "reason"}
        if field not in supported:
            raise KubectlError(f'Error from server (BadRequest): Unable to find "/v1, '
                               f'Resource={kind.plural}" that match label selector "", field '
                               f'selector "{selector}": field label not supported: {field}')
        terms.append((field, op == "!=", value))
    return [obj for obj in items
            if all((render_jsonpath("{." + f + "}", obj) == v) != negate
                   for f, negate, v in terms)]


def table_rows(kind: Kind, items: list[dict], wide: bool, now: float) -> list[list[str]]:
    def age(obj: dict) -> str:
        return human_age(now - parse_rfc3339(obj["metadata"]["creationTimestamp"]))

    if kind.kind == "Pod":
        header = ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
        if wide:
            header += ["IP", "NODE", "NOMINATED NODE", "READINESS GATES"]
        rows = [header]
        for pod in items:
            statuses = pod["status"].get("containerStatuses") or []
            ready = sum(1 for s in statuses if s.get("ready"))
            waiting = [f"Init:{s['state']['waiting']['reason']}"
                       for s in pod["status"].get("initContainerStatuses") or []
                       if "waiting" in s.get("state", {})]
            waiting += [s["state"]["waiting"]["reason"] for s in statuses
                        if "waiting" in s.get("state", {})]
            # A container that ran to its end shows its reason (a Job's pod: Completed, Error).
            waiting += [s["state"]["terminated"]["reason"] for s in statuses
                        if "terminated" in s.get("state", {})]
            row = [pod["metadata"]["name"], f"{ready}/{len(statuses)}",
                   waiting[0] if waiting else pod["status"]["phase"],
                   str(sum(s.get("restartCount", 0) for s in statuses)), age(pod)]
            if wide:
                row += [pod["status"].get("podIP", "<none>"), NODE_NAME, "<none>", "<none>"]
            rows.append(row)
        return rows
    if kind.kind == "Event":
        rows = [["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]]
        for event in items:
            involved = event["involvedObject"]
            rows.append([human_age(now - parse_rfc3339(event["lastTimestamp"])), event["type"],
                         event["reason"], f"{involved['kind'].lower()}/{involved['name']}",
                         event["message"]])
        return rows
    if kind.kind == "Deployment":
        rows = [["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]]
        for obj in items:
            status = obj["status"]
            rows.append([obj["metadata"]["name"],
                         f"{status.get('readyReplicas', 0)}/{obj['spec']['replicas']}",
                         str(status.get("updatedReplicas", 0)),
                         str(status.get("availableReplicas", 0)), age(obj)])
        return rows
    if kind.kind == "StatefulSet":
        rows = [["NAME", "READY", "AGE"]]
        for obj in items:
            rows.append([obj["metadata"]["name"],
                         f"{obj['status'].get('readyReplicas', 0)}/{obj['spec']['replicas']}",
                         age(obj)])
        return rows
    if kind.kind == "DaemonSet":
        rows = [["NAME", "DESIRED", "CURRENT", "READY", "UP-TO-DATE", "AVAILABLE",
                 "NODE SELECTOR", "AGE"]]
        for obj in items:
            status = obj["status"]
            rows.append([obj["metadata"]["name"], str(status["desiredNumberScheduled"]),
                         str(status["currentNumberScheduled"]), str(status["numberReady"]),
                         str(status.get("updatedNumberScheduled", 0)),
                         str(status.get("numberAvailable", 0)), "<none>", age(obj)])
        return rows
    if kind.kind == "Namespace":
        return [["NAME", "STATUS", "AGE"]] + [
            [obj["metadata"]["name"], "Active", age(obj)] for obj in items]
    return [["NAME", "AGE"]] + [[obj["metadata"]["name"], age(obj)] for obj in items]


def workload_target(state: dict, positional: list[str], flags: dict, command: str) -> tuple[
        Kind, str, str]:
    if not positional:
        raise KubectlError("error: required resource not specified")
    type_name, _, name = positional[0].partition("/")
    if not name and len(positional) > 1:
        name = positional[1]
    kind = kind_for_name(state, type_name)
    if kind.kind not in WORKLOAD_KINDS:
        if command == "rollout status":
            raise KubectlError(f"error: no status viewer has been implemented for {kind.kind}")
        raise KubectlError(f'error: no rollbacker has been implemented for "{kind.kind}"')
    return kind, flags.get("namespace") or DEFAULT_NAMESPACE, name


def command_rollout_status(positional: list[str], flags: dict) -> int:
    timeout_text = flags.get("timeout", "0s")
    timeout = parse_duration(timeout_text)
    if timeout is None:
        raise UsageError(f'invalid argument "{timeout_text}" for "--timeout" flag: '
                         f"{go_duration_error(timeout_text)}", "rollout status")
    path = state_path()
    started = time.monotonic()
    last = None
    while True:
        with open_state(path, write=False) as state:
            require_api(state)
            kind, namespace, name = workload_target(state, positional, flags, "rollout status")
            record = state["objects"].get(object_key(kind, namespace, name))
            if record is None:
                raise KubectlError(f'Error from server (NotFound): {kind.resource} "{name}" not '
                                   "found")
            message, done = WorkloadView(state, record, time.time()).rollout_message()
        if message != last:
            print(message, flush=True)
            last = message
        if done:
            return 0
        left = timeout - (time.monotonic() - started) if timeout else WATCH_STEP_SECONDS
        if left <= 0:
            raise KubectlError("error: timed out waiting for the condition")
        time.sleep(min(WATCH_STEP_SECONDS, left))


def command_rollout_undo(positional: list[str], flags: dict) -> int:
    with open_state(state_path(), write=True) as state:
        require_api(state)
        kind, namespace, name = workload_target(state, positional, flags, "rollout undo")
        record = state["objects"].get(object_key(kind, namespace, name))
        if record is None:
            raise KubectlError(f'Error from server (NotFound): {kind.resource} "{name}" not found')
        history = sorted(record["workload"]["history"], key=lambda e: e["revision"])
        current = history[-1]
        earlier = [e for e in history[:-1] if e["hash"] != current["hash"]]
        to_revision = int(flags.get("to-revision") or 0)
        if to_revision:
            # kubectl's rollback.go: the revision must be in the workload's history.
            earlier = [e for e in history if e["revision"] == to_revision]
            if not earlier:
                raise KubectlError(f"error: unable to find specified revision {to_revision} in history")
            if earlier[0]["hash"] == current["hash"]:
                print(f"{kind.qualified}/{name} skipped rollback (current template already "
                      f"matches revision {to_revision})")
                return 0
        if not earlier:
            if kind.kind == "Deployment":
                raise KubectlError(f'error: no rollout history found for deployment "{name}"')
            raise KubectlError("error: no last revision to roll back to")
        if kind.kind == "Deployment" and (record["object"].get("spec") or {}).get("paused"):
            raise KubectlError("error: you cannot rollback a paused deployment; resume it first "
                               "with 'kubectl rollout resume' and try again")
        if f"{kind.kind}/{name}" in state.get("failing_undos", []):
            raise KubectlError(f'Error from server (Forbidden): {kind.resource} "{name}" is '
                               "forbidden: the test scenario refuses this undo")
        record["object"]["spec"]["template"] = copy.deepcopy(earlier[-1]["template"])
        record["object"]["metadata"]["generation"] += 1
        bump_resource_version(state, record["object"])
        change_template(state, record, time.time())
    print(f"{kind.qualified}/{name} rolled back")
    return 0


def command_delete(positional: list[str], flags: dict) -> int:
    """`kubectl delete TYPE NAME...`: gone at once (--wait and --timeout have nothing to wait
    for). --cascade is checked as kubectl does; every value deletes what the double derives
    from the object (pods, ReplicaSets): orphans are not modelled."""
    timeout_text = flags.get("timeout", "0s")
    if parse_duration(timeout_text) is None:
        raise UsageError(f'invalid argument "{timeout_text}" for "--timeout" flag: '
                         f"{go_duration_error(timeout_text)}", "delete")
    cascade = flags.get("cascade", "background")
    if cascade in GO_BOOLEANS:
        replacement = "background" if GO_BOOLEANS[cascade] else "orphan"
        print(f"warning: --cascade={cascade} is deprecated (boolean value) and can be replaced "
              f"with --cascade={replacement}.", file=sys.stderr)
    elif cascade not in ("background", "foreground", "orphan"):
        raise KubectlError(f'error: invalid cascade value ({cascade}). Must be "background", '
                           '"foreground", or "orphan"')
    if len(positional) < 2 and "/" not in (positional[0] if positional else ""):
        raise KubectlError("error: resource(s) were provided, but no name was specified")
    type_name, _, name = positional[0].partition("/")
    names = [name] if name else positional[1:]
    with open_state(state_path(), write=True) as state:
        require_api(state)
        kind = kind_for_name(state, type_name)
        if kind.kind != "Pod":
            return _delete_objects(state, kind, names, flags)
        namespace = flags.get("namespace") or DEFAULT_NAMESPACE
        now = time.time()
        present = {p["metadata"]["name"] for p in list_pods(state, namespace, now)}
        failed = False
        for pod in names:
            if pod not in present:
                if not flags.get("ignore-not-found"):
                    print(f'Error from server (NotFound): pods "{pod}" not found',
                          file=sys.stderr)
                    failed = True
                continue
            for record in state["objects"].values():
                if record["object"]["metadata"].get("namespace") != namespace:
                    continue
                if record["object"]["kind"] == "Pod" and record["object"]["metadata"][
                        "name"] == pod:
                    record["deleted"] = True
                workload = record.get("workload")
                if workload and pod in workload["stuck"]:
                    # The controller recreates the pod from the current template.
                    del workload["stuck"][pod]
            print(f'pod "{pod}" deleted')
        state["objects"] = {k: r for k, r in state["objects"].items() if not r.get("deleted")}
    return 1 if failed else 0


def _delete_objects(state: dict, kind: Kind, names: list[str], flags: dict) -> int:
    """Any other object (prune deletes them): gone at once, as with --wait=false. A workload's
    pods go with it (the double derives them from it); a Namespace takes what is in it."""
    namespace = (flags.get("namespace") or DEFAULT_NAMESPACE) if kind.namespaced else ""
    shown = f"{kind.singular}.{kind.group}" if kind.group else kind.singular
    failed = False
    for name in names:
        key = object_key(kind, namespace, name)
        if f"{kind.kind}/{name}" in state.get("failing_deletes", []):
            print(f'Error from server (Forbidden): {kind.resource} "{name}" is forbidden: '
                  "denied by the test's admission policy", file=sys.stderr)
            failed = True
            continue
        if key not in state["objects"]:
            if not flags.get("ignore-not-found"):
                print(f'Error from server (NotFound): {kind.resource} "{name}" not found', file=sys.stderr)
                failed = True
            continue
        del state["objects"][key]
        if kind.kind == "Namespace":
            state["objects"] = {k: r for k, r in state["objects"].items()
                                if r["object"]["metadata"].get("namespace") != name}
        print(f'{shown} "{name}" deleted')
    return 1 if failed else 0


def command_wait(positional: list[str], flags: dict) -> int:
    """Only what the script waits for: a CustomResourceDefinition to be served. The double's
    API server serves a new kind at once, so the condition is met when the object exists."""
    condition = flags.get("for", "")
    timeout_text = flags.get("timeout", "30s")
    if parse_duration(timeout_text) is None:
        raise UsageError(f'invalid argument "{timeout_text}" for "--timeout" flag: '
                         f"{go_duration_error(timeout_text)}", "wait")
    if not condition:
        raise KubectlError("error: --for must be set")
    if condition.lower() != "condition=established":
        raise KubectlError(f"error: the kubectl double waits only for condition=established, "
                           f"not {condition}")
    if not positional:
        raise KubectlError("error: resource(s) were provided, but no name was specified")
    with open_state(state_path(), write=False) as state:
        require_api(state)
        for target in positional:
            type_name, _, name = target.partition("/")
            kind = kind_for_name(state, type_name)
            if kind.kind != "CustomResourceDefinition":
                raise KubectlError(f"error: the kubectl double waits only for "
                                   f"customresourcedefinitions, not {kind.plural}")
            if object_key(kind, "", name) not in state["objects"]:
                raise KubectlError(f'Error from server (NotFound): {kind.resource} "{name}" '
                                   "not found")
            print(f"{kind.qualified}/{name} condition met")
    return 0


def manifests_of(flags: dict, command: str) -> list[tuple[str, dict]]:
    """(path as kubectl names it, document) for every -f of create / replace / diff."""
    files = flags.get("filename") or []
    if not files:
        raise KubectlError("error: must specify one of -f and -k\n\n"
                           f"See 'kubectl {command} -h' for help and examples")
    found, errors = [], []
    for path in files:
        docs, decode_errors = load_manifests(path, validate=True)
        errors.extend(decode_errors)
        shown = "STDIN" if path == "-" else path
        found.extend((shown, doc) for doc in docs)
    if errors:
        raise KubectlError("\n".join(errors))
    if not found:
        raise KubectlError("error: no objects passed to " + command)
    return found


def resolve_manifest(state: dict, path: str, manifest: dict, generate: str | None = None
                     ) -> tuple[Kind, str, str, dict]:
    """Kind, namespace and name of a document, and a copy with its namespace set as the API
    would (namespaced kinds default to `default`; cluster-scoped ones have none). `generate`
    (a create): a document with only metadata.generateName gets a name as the API server
    generates one, seeded with `generate`."""
    kind = kind_for_manifest(state, manifest["apiVersion"], manifest["kind"])
    meta = manifest.get("metadata") or {}
    name, namespace = meta.get("name") or "", meta.get("namespace") or ""
    if kind is None:
        raise KubectlError(f'error: resource mapping not found for name: "{name}" namespace: '
                           f'"{namespace}" from "{path}": no matches for kind '
                           f'"{manifest["kind"]}" in version "{manifest["apiVersion"]}"\n'
                           "ensure CRDs are installed first")
    namespace = (namespace or DEFAULT_NAMESPACE) if kind.namespaced else ""
    if not name and generate is not None and meta.get("generateName"):
        name = generated_name(state, kind, namespace, meta["generateName"], generate)
    if not name:
        raise KubectlError("error: resource name may not be empty")
    manifest = copy.deepcopy(manifest)
    manifest.setdefault("metadata", {})
    if generate is not None and not manifest["metadata"].get("name"):
        manifest["metadata"]["name"] = name
    if kind.namespaced:
        manifest["metadata"]["namespace"] = namespace
    else:
        manifest["metadata"].pop("namespace", None)
    return kind, namespace, name, manifest


def generated_name(state: dict, kind: Kind, namespace: str, prefix: str, seed: str) -> str:
    """metadata.generateName + 5 characters, as the API server names the object (it retries
    on a name that is taken). Random-looking, deterministic for one cluster state and seed."""
    prefix = prefix[:MAX_GENERATE_NAME_PREFIX]
    for attempt in range(100):
        name = prefix + generated_suffix(
            f"{seed}/{kind.kind}/{namespace}/{prefix}/{state['next_uid']}/{attempt}", 5)
        if object_key(kind, namespace, name) not in state["objects"]:
            return name
    raise KubectlError(f'Error from server (AlreadyExists): {kind.resource} "{name}" already '
                       "exists")


def command_create(positional: list[str], flags: dict) -> int:
    """`kubectl create -f`: atomic, as the API server's create is: it fails when the object
    exists, however many clients race (every call holds the state's exclusive lock). A
    document with metadata.generateName and no name is stored under a generated name.
    `--dry-run=server` runs every check on a scratch copy and stores nothing (a generated name
    is then one the server made up for this dry run only); `--dry-run=client` checks nothing."""
    output = flags.get("output")
    dry_run = flags.get("dry-run", "none")
    if dry_run not in ("none", "client", "server"):
        raise KubectlError(f'error: Invalid dry-run value ({dry_run}). Must be "none", '
                           '"server", or "client".')
    documents = manifests_of(flags, "create")
    errors = []
    with open_state(state_path(), write=dry_run == "none") as state:
        require_api(state)
        now = time.time()
        for path, document in documents:
            try:
                if dry_run == "client":
                    kind, _, name, manifest = resolve_manifest(state, path, document)
                    sys.stdout.write(render_output(output, manifest, kind) if output
                                     else f"{kind.qualified}/{name} created (dry run)\n")
                    continue
                target = copy.deepcopy(state) if dry_run == "server" else state
                sys.stdout.write(create_one(target, path, document, now, output,
                                            "dry-run" if dry_run == "server" else "create"))
            except KubectlError as exc:
                errors.append(str(exc))
    for error in errors:
        print(error, file=sys.stderr)
    return 1 if errors else 0


def create_one(state: dict, path: str, document: dict, now: float, output: str | None,
               mode: str) -> str:
    """One document of `kubectl create`: `mode` is "create" or "dry-run" (on a scratch copy)."""
    kind, namespace, name, manifest = resolve_manifest(state, path, document, generate=mode)
    key = object_key(kind, namespace, name)
    if key in state["objects"]:
        raise KubectlError(f'Error from server (AlreadyExists): error when creating '
                           f'"{path}": {kind.resource} "{name}" already exists')
    if manifest["metadata"].get("resourceVersion"):
        raise KubectlError(f'Error from server (BadRequest): error when creating '
                           f'"{path}": resourceVersion should not be set on objects '
                           "to be created")
    if kind.namespaced and object_key(BUILTIN_KINDS[0], "", namespace) not in state["objects"]:
        raise KubectlError(f'Error from server (NotFound): error when creating '
                           f'"{path}": namespaces "{namespace}" not found')
    check_spec(kind, manifest, path, "creating")
    record = store_new_object(state, kind, manifest, now)
    if output:
        return render_output(output, record["object"], kind)
    return f"{kind.qualified}/{name} created{' (server dry run)' if mode == 'dry-run' else ''}\n"


def command_replace(positional: list[str], flags: dict) -> int:
    """`kubectl replace -f`: a PUT. With metadata.resourceVersion set it is conditional: the
    API server refuses it with a Conflict when the object changed since that version."""
    output = flags.get("output")
    documents = manifests_of(flags, "replace")
    errors = []
    with open_state(state_path(), write=True) as state:
        require_api(state)
        now = time.time()
        for path, document in documents:
            try:
                kind, namespace, name, manifest = resolve_manifest(state, path, document)
                record = state["objects"].get(object_key(kind, namespace, name))
                if record is None:
                    raise KubectlError(f'Error from server (NotFound): error when replacing '
                                       f'"{path}": {kind.resource} "{name}" not found')
                old = record["object"]
                wanted = manifest["metadata"].get("resourceVersion")
                if wanted and str(wanted) != old["metadata"].get("resourceVersion"):
                    raise KubectlError(
                        f'Error from server (Conflict): error when replacing "{path}": Operation '
                        f'cannot be fulfilled on {kind.resource} "{name}": the object has been '
                        "modified; please apply your changes to the latest version and try "
                        "again")
                check_spec(kind, manifest, path, "replacing")
                check_update_allowed(kind, old, manifest)
                server_meta = {k: old["metadata"][k] for k in ("uid", "creationTimestamp",
                                                               "generation") if k in old["metadata"]}
                if manifest.get("spec") != old.get("spec"):
                    server_meta["generation"] = old["metadata"].get("generation", 1) + 1
                manifest["metadata"].update(server_meta)
                record["object"] = manifest
                bump_resource_version(state, manifest)
                if kind.kind in WORKLOAD_KINDS:
                    change_template(state, record, now)
                sys.stdout.write(render_output(output, manifest, kind) if output
                                 else f"{kind.qualified}/{name} replaced\n")
            except KubectlError as exc:
                errors.append(str(exc))
    for error in errors:
        print(error, file=sys.stderr)
    return 1 if errors else 0


ANNOTATION_KEY = re.compile(r"([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?"
                            r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


def command_annotate(positional: list[str], flags: dict) -> int:
    """`kubectl annotate [--overwrite] TYPE/NAME KEY=VALUE... KEY-...`: changes the object's
    own metadata only (no new generation, so no new revision), as the API does."""
    resources = [a for a in positional if "=" not in a and not a.endswith("-")]
    updates = [a for a in positional if a not in resources]
    if not updates:
        raise KubectlError("error: at least one annotation update is required\n"
                           "See 'kubectl annotate -h' for help and examples")
    changes: dict[str, str | None] = {}
    for update in updates:
        key, has_value, value = update.partition("=")
        if not has_value:
            key, value = update[:-1], None  # KEY- removes it
        if not ANNOTATION_KEY.fullmatch(key):
            raise KubectlError(f"error: invalid annotation format: {update}")
        changes[key] = value
    if not resources:
        raise KubectlError("error: one or more resources must be specified as <resource> "
                           "<name> or <resource>/<name>")
    type_name, _, name = resources[0].partition("/")
    names = [name] if name else resources[1:]
    with open_state(state_path(), write=True) as state:
        require_api(state)
        kind = kind_for_name(state, type_name)
        namespace = (flags.get("namespace") or DEFAULT_NAMESPACE) if kind.namespaced else ""
        for target in names:
            record = state["objects"].get(object_key(kind, namespace, target))
            if record is None:
                raise KubectlError(f'Error from server (NotFound): {kind.resource} "{target}" '
                                   "not found")
            meta = record["object"]["metadata"]
            annotations = dict(meta.get("annotations") or {})
            if not flags.get("overwrite"):
                taken = [k for k, v in changes.items()
                         if v is not None and k in annotations and annotations[k] != v]
                if taken:
                    raise KubectlError(
                        "error: --overwrite is false but found the following declared "
                        f"annotation(s): '{taken[0]}' already has a value ({annotations[taken[0]]})")
            for key, value in changes.items():
                if value is None:
                    annotations.pop(key, None)
                else:
                    annotations[key] = value
            meta.pop("annotations", None)
            if annotations:
                meta["annotations"] = annotations
            bump_resource_version(state, record["object"])
            print(f"{kind.qualified}/{target} annotated")
    return 0


def command_logs(positional: list[str], flags: dict) -> int:
    """`kubectl logs POD [-c C] [--previous] [--tail N]`, as the kubelet answers it: a crash-looping
    container has its previous run's log; one that never started has none."""
    if not positional:
        raise KubectlError("error: expected 'logs [-f] [-p] (POD | TYPE/NAME) [-c CONTAINER]'.\n"
                           "POD or TYPE/NAME is a required argument for the logs command\n"
                           "See 'kubectl logs -h' for help and examples")
    pod_name = positional[0].removeprefix("pod/").removeprefix("pods/")
    tail_text = flags.get("tail", "-1")
    if not re.fullmatch(r"-?\d+", tail_text):
        raise UsageError(f'invalid argument "{tail_text}" for "--tail" flag: strconv.ParseInt: '
                         f'parsing "{tail_text}": invalid syntax', "logs")
    namespace = flags.get("namespace") or DEFAULT_NAMESPACE
    with open_state(state_path(), write=False) as state:
        require_api(state)
        pods = {p["metadata"]["name"]: p for p in list_pods(state, namespace, time.time())}
        logs = dict(state.get("container_logs", {}))
    pod = pods.get(pod_name)
    if pod is None:
        raise KubectlError(f'Error from server (NotFound): pods "{pod_name}" not found')
    statuses = (pod["status"].get("initContainerStatuses") or []) + pod["status"][
        "containerStatuses"]
    names = [c.get("name", "") for c in pod["spec"].get("containers") or []]
    container = flags.get("container")
    if not container:
        container = names[0]
        if len(names) > 1:
            print(f'Defaulted container "{container}" out of: {", ".join(names)}',
                  file=sys.stderr)
    status = next((s for s in statuses if s["name"] == container), None)
    if status is None:
        raise KubectlError(f"error: container {container} is not valid for pod {pod_name}")
    text = logs.get(status["image"], "")
    terminated = status["state"].get("terminated") or {}
    owner = (pod["metadata"].get("ownerReferences") or [{}])[0]
    if owner.get("kind") == "Job" and status["image"] not in logs and terminated:
        # A Job's container that ran to its end printed something (the scenario may say what).
        text = JOB_DEFAULT_LOGS[terminated["reason"]].format(container=container) + "\n"
    waiting = status["state"].get("waiting") or {}
    if flags.get("previous"):
        if "terminated" not in (status.get("lastState") or {}):
            raise KubectlError(f'Error from server (BadRequest): previous terminated container '
                               f'"{container}" in pod "{pod_name}" not found')
    elif waiting and waiting.get("reason") != "CrashLoopBackOff":
        detail = ("trying and failing to pull image" if waiting.get("reason") in PULL_REASONS
                  else waiting.get("reason"))
        raise KubectlError(f'Error from server (BadRequest): container "{container}" in pod '
                           f'"{pod_name}" is waiting to start: {detail}')
    # Lines end at LF only, as the kubelet's log lines do: a CR stays inside its line, as real
    # kubectl passes it through (a progress bar's, or a hostile one's).
    lines = text.split("\n")
    if lines and not lines[-1]:
        lines.pop()
    tail = int(tail_text)
    if tail >= 0:
        lines = lines[-tail:] if tail else []
    for line in lines:
        print(line)
    return 0


DIFF_ROOT = "/tmp"  # noqa: S108 - a name kubectl prints, never a file the double opens


def diff_file_name(kind: Kind, obj: dict) -> str:
    """kubectl diff's file name for an object: [GROUP.]VERSION.KIND.NAMESPACE.NAME."""
    version = obj["apiVersion"].rpartition("/")[2]
    group = f"{kind.group}." if kind.group else ""
    meta = obj["metadata"]
    return f"{group}{version}.{kind.kind}.{meta.get('namespace', '')}.{meta['name']}"


def diff_yaml(obj: dict | None) -> list[str]:
    import yaml

    if obj is None:
        return []
    return yaml.safe_dump(obj, default_flow_style=False, sort_keys=True).splitlines(keepends=True)


def mask_secret_data(live: dict | None, merged: dict) -> tuple[dict | None, dict]:
    """kubectl diff's Masker: a Secret's data values become `***`, or `*** (before)` and
    `*** (after)` where they differ, so that a diff shows which keys changed and no value."""
    live, merged = copy.deepcopy(live), copy.deepcopy(merged)
    before = (live or {}).get("data") or {}
    after = merged.get("data") or {}
    for key in list(before):
        if key in after and before[key] != after[key]:
            before[key], after[key] = "*** (before)", "*** (after)"
            continue
        if key in after:
            after[key] = "***"
        before[key] = "***"
    for key in after:
        if key not in before:
            after[key] = "***"
    return live, merged


def command_diff(positional: list[str], flags: dict) -> int:
    """`kubectl diff -f`: each object as it is (LIVE) and as a server-side dry run of the apply
    would leave it (MERGED), compared with `diff -u -N`. Exit 0: no differences, 1: some, 2: an
    error (kubectl stops at the first object it cannot dry-run and prints no diff at all)."""
    import difflib

    try:
        documents = manifests_of(flags, "diff")
        pairs = []
        with open_state(state_path(), write=False) as state:
            require_api(state)
            now = time.time()
            for path, document in documents:
                kind, namespace, name, _ = resolve_manifest(state, path, document)
                key = object_key(kind, namespace, name)
                live_record = state["objects"].get(key)
                live = served_object(state, live_record, now) if live_record else None
                scratch = copy.deepcopy(state)
                scratch["failing_real_applies"] = []
                try:
                    apply_one(scratch, path, document, dry_run=False, now=now, output=None)
                except KubectlError as exc:
                    raise KubectlError(re.sub(r'error when (creating|patching) "[^"]*": ', "",
                                              str(exc))) from None
                merged = served_object(scratch, scratch["objects"][key], now)
                # The revision annotation is the controller's, written after the change.
                merged_annotations_ = merged["metadata"].get("annotations") or {}
                live_revision = ((live or {}).get("metadata", {}).get("annotations") or {}).get(
                    REVISION_ANNOTATION)
                merged_annotations_.pop(REVISION_ANNOTATION, None)
                if live_revision is not None:
                    merged_annotations_[REVISION_ANNOTATION] = live_revision
                if not merged_annotations_:
                    merged["metadata"].pop("annotations", None)
                if live is not None:
                    # A dry run stores nothing: same resourceVersion, the live status.
                    merged["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
                    merged.pop("status", None)
                    if "status" in live:
                        merged["status"] = live["status"]
                elif kind.kind != "Namespace":
                    merged.pop("status", None)
                if kind.kind == "Secret":
                    live, merged = mask_secret_data(live, merged)
                pairs.append((diff_file_name(kind, merged), live, merged))
    except KubectlError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    # Only printed: the double compares in memory (kubectl writes both sides under TMPDIR).
    live_dir = f"{DIFF_ROOT}/LIVE-{generated_suffix(str(time.time()), 10)}"
    merged_dir = f"{DIFF_ROOT}/MERGED-{generated_suffix(str(time.time()) + 'm', 10)}"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S.000000000 +0000", time.gmtime())
    differs = False
    for file_name, live, merged in sorted(pairs, key=lambda pair: pair[0]):
        before, after = diff_yaml(live), diff_yaml(merged)
        if before == after:
            continue
        differs = True
        print(f"diff -u -N {live_dir}/{file_name} {merged_dir}/{file_name}")
        lines = difflib.unified_diff(
            before, after, f"{live_dir}/{file_name}", f"{merged_dir}/{file_name}",
            "1970-01-01 00:00:00.000000000 +0000" if live is None else stamp, stamp)
        for line in lines:
            sys.stdout.write(line if line.endswith("\n") else line + "\n")
    return 1 if differs else 0


def command_api_resources(positional: list[str], flags: dict) -> int:
    """`kubectl api-resources [--namespaced=BOOL] [--no-headers]`: the kinds the API serves
    (the built-in ones the double knows and those of the cluster's CRDs), in kubectl's columns
    NAME SHORTNAMES APIVERSION NAMESPACED KIND. `--namespaced` filters only when given."""
    if positional:
        raise KubectlError(f"error: unexpected arguments: {positional}")
    with open_state(state_path(), write=False) as state:
        require_api(state)
        kinds = known_kinds(state)
    wanted = flags.get("namespaced")
    rows = [["NAME", "SHORTNAMES", "APIVERSION", "NAMESPACED", "KIND"]]
    for kind in sorted(kinds, key=lambda k: (k.group, k.plural)):
        if wanted is not None and kind.namespaced != wanted:
            continue
        version = f"{kind.group}/{kind.versions[-1]}" if kind.group else kind.versions[-1]
        rows.append([kind.plural, ",".join(kind.short_names), version, str(kind.namespaced).lower(),
                     kind.kind])
    table = format_table(rows).splitlines(keepends=True)
    print("".join(table[1:] if flags.get("no-headers") else table), end="")
    return 0


COMMANDS = {
    "api-resources": command_api_resources,
    "create": command_create,
    "replace": command_replace,
    "annotate": command_annotate,
    "logs": command_logs,
    "diff": command_diff,
    "wait": command_wait,
    "get": command_get,
    "apply": command_apply,
    "rollout status": command_rollout_status,
    "rollout undo": command_rollout_undo,
    "delete": command_delete,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    log = os.environ.get(LOG_ENV)
    if log:
        with open(log, "a") as handle:
            handle.write(json.dumps(argv) + "\n")
    try:
        command, positional, flags = parse_command_line(argv)
        check_request_timeout(flags)
        return COMMANDS[command](positional, flags)
    except KubectlError as exc:
        sys.stdout.flush()
        print(str(exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
