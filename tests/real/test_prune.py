"""Prune on the real API, through the whole action (`transport: local`, real kubectl, a real
API server, controllers and garbage collector): a manifest removed between two deploys is gone
after the second with `prune: true` and untouched without it, and objects made by hand or by
another release in the same namespace survive both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests import markdown
from tests.real.plane import ControlPlane
from tests.real.test_action import run_local

LABEL = "k3s-deploy-action/release"


def config_map(name: str, ns: str, **labels: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"key": "value"}}


def deployment(name: str, ns: str) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "app", "image": "example.test/app:v1"}]},
            },
        },
    }


def write(folder: Path, docs: dict[str, dict[str, Any]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.yaml"):
        old.unlink()
    for name, doc in docs.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def release_docs(ns: str) -> dict[str, dict[str, Any]]:
    return {
        "namespace": {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
        "web": deployment("web", ns),
        "old-worker": deployment("old-worker", ns),
        "settings": config_map("settings", ns),
        "old-settings": config_map("old-settings", ns),
    }


def deploy(plane: ControlPlane, workspace: Path, files: Path, **inputs: str) -> Any:
    run = run_local(plane, workspace, files, {"manifests": "k8s", "timeout": "120", **inputs})
    assert run.returncode == 0, run.log
    assert run.outputs["status"] == "success", run.log
    return run


def test_prune_deletes_what_the_release_dropped_and_nothing_else_and_only_when_asked(
    control_plane: ControlPlane, ns: str, tmp_path: Path
) -> None:
    workspace = tmp_path / "workspace"
    files = tmp_path / "files"
    other = tmp_path / "other"  # another release, in the same namespace
    docs = release_docs(ns)

    write(workspace / "k8s", docs)
    mine = {"release": f"acme/{ns}:k8s"}  # one release per test: the control plane is shared
    first = deploy(control_plane, workspace, files, prune="true", **mine)
    assert "### Pruned" in first.summary and "Nothing to prune" in markdown.shown(first.summary)
    release_id = control_plane.get("configmap", ns, "settings")["metadata"]["labels"][LABEL]
    # Made by hand: the same names' neighbours, one even with a label that is not the release's.
    control_plane.apply([config_map("by-hand", ns), config_map("look-alike", ns, **{LABEL: "0" * 20})])
    write(other / "k8s", {"theirs": config_map("theirs", ns)})
    deploy(control_plane, other, tmp_path / "other-files", prune="true", release=f"acme/{ns}-other:k8s")
    assert control_plane.get("configmap", ns, "theirs")["metadata"]["labels"][LABEL] != release_id

    # With prune: the dropped ConfigMap and a dropped Deployment (and its pods) go.
    del docs["old-settings"], docs["old-worker"]
    write(workspace / "k8s", docs)
    dry = deploy(control_plane, workspace, files, prune="true", **mine, **{"dry-run": "true"})
    assert control_plane.get("configmap", ns, "old-settings") is not None
    assert "a deploy would prune 2 object(s)" in markdown.shown(dry.summary)
    assert "### Would prune" in dry.summary
    pruned = deploy(control_plane, workspace, files, prune="true", **mine)

    assert control_plane.get("configmap", ns, "old-settings") is None, pruned.log
    assert control_plane.get("deployment", ns, "old-worker") is None, pruned.log
    control_plane.wait_for(
        "the old worker's pods to go", lambda: not pods_of(control_plane, ns, "old-worker-")
    )
    for name in ("settings", "by-hand", "look-alike", "theirs"):
        assert control_plane.get("configmap", ns, name) is not None, name
    assert control_plane.get("deployment", ns, "web") is not None
    assert pods_of(control_plane, ns, "web-")
    assert control_plane.get("namespace", "", ns) is not None
    shown = markdown.shown(pruned.summary)
    assert f"ConfigMap {ns}/old-settings" in shown and f"Deployment.apps {ns}/old-worker" in shown
    assert "pruned 2 object(s)" in shown

    # What was pruned is no longer tracked: deploying again prunes nothing.
    again = deploy(control_plane, workspace, files, prune="true", **mine)
    assert "Nothing to prune" in markdown.shown(again.summary)
    inventory = control_plane.get("configmap", "kube-system", f"k3s-deploy-release-{release_id}")
    assert inventory is not None
    assert sorted(inventory["data"]["objects"].splitlines()) == sorted(
        [f"ConfigMap\t{ns}\tsettings", f"Deployment.apps\t{ns}\tweb", f"Namespace\t\t{ns}"]
    )

    # Without prune: a dropped manifest stays, and nothing is deleted.
    del docs["settings"]
    write(workspace / "k8s", docs)
    off = deploy(control_plane, workspace, files, **mine)
    assert control_plane.get("configmap", ns, "settings") is not None
    assert "### Pruned" not in off.summary
    # That deploy applied web without the release's label (kubectl apply takes away a label it
    # set before): web has left the release, and a later prune keeps it rather than guess.
    assert LABEL not in (control_plane.get("deployment", ns, "web")["metadata"].get("labels") or {})
    del docs["web"]
    write(workspace / "k8s", docs)
    later = deploy(control_plane, workspace, files, prune="true", **mine)
    assert control_plane.get("deployment", ns, "web") is not None
    assert control_plane.get("configmap", ns, "settings") is None  # still labelled: pruned now
    assert f"kept: Deployment.apps {ns}/web (not labelled {LABEL}=" in later.log


def pods_of(plane: ControlPlane, ns: str, prefix: str) -> list[str]:
    return [
        p["metadata"]["name"] for p in plane.items("pods", ns) if p["metadata"]["name"].startswith(prefix)
    ]
