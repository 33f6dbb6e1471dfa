"""The platform the end-to-end suites deploy, written once: the original pipeline's namespace,
config, Redis StatefulSet and the api and worker Deployments, as manifest text.

tests/e2e deploys all of it; tests/reliability leaves Redis out (its fault runs stay small);
tests/registry deploys the api and worker images it builds itself. (Not `platform`: that is a module
of the standard library.)
"""

from __future__ import annotations

NS = "production-platform"
API = "docker.io/acme/api"
WORKER = "docker.io/acme/worker"


def namespace(name: str = NS) -> str:
    return f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n"


def config_map(log_level: str = "info", namespace: str = NS) -> str:
    return (
        f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app-config\n  namespace: {namespace}\n"
        f"data:\n  LOG_LEVEL: {log_level}\n"
    )


def deployment(name: str, image: str, *, replicas: int = 1, progress_deadline: int = 3) -> str:
    """A Deployment of `image:latest` (the action pins the tag); a pod that never becomes ready
    fails its rollout after `progress_deadline` seconds."""
    return f"""apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  namespace: {NS}
spec:
  replicas: {replicas}
  progressDeadlineSeconds: {progress_deadline}
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      containers:
        - name: {name}
          image: {image}:latest
"""


def redis() -> str:
    return f"""apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: redis
  namespace: {NS}
spec:
  replicas: 1
  serviceName: redis
  selector:
    matchLabels: {{app: redis}}
  template:
    metadata:
      labels: {{app: redis}}
    spec:
      containers:
        - name: redis
          image: redis:7-alpine
"""


def pinned(manifests: dict[str, str], tag: str, images: tuple[str, ...] = (API, WORKER)) -> str:
    """The manifests as one YAML stream, as a deploy of `tag` left them (to seed a cluster)."""
    text = "---\n".join(manifests.values())
    for image in images:
        text = text.replace(f"{image}:latest", f"{image}:{tag}")
    return text
