"""Prune through the whole action (simulated AWS and master, the kubectl double): what a
release's previous deploy applied and this one lacks is deleted after a healthy deploy, and
only that. tests/real/test_prune.py proves the same on the real API server."""

from __future__ import annotations

from tests import sample_platform as platform
from tests.e2e.conftest import NS, World

PRUNE = {"prune": "true", "image-tag": "v1"}
LABEL = "k3s-deploy-action/release"
CLAIM = f"""apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: data
  namespace: {NS}
spec:
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: 1Gi
"""


def extra_config(name: str, **annotations: str) -> str:
    notes = "".join(f"\n    {k}: \"{v}\"" for k, v in annotations.items())
    return (
        f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {NS}\n"
        + (f"  annotations:{notes}\n" if notes else "")
        + "data:\n  key: value\n"
    )


def inventory(world: World) -> list[str]:
    found = [
        obj for (kind, ns, name), obj in world.cluster.objects().items()
        if kind == "ConfigMap" and ns == "kube-system" and name.startswith("k3s-deploy-release-")
    ]
    assert len(found) == 1, found
    return found[0]["data"]["objects"].splitlines()


def test_an_object_removed_from_the_manifests_is_pruned_after_a_healthy_deploy(world: World) -> None:
    world.write_manifests({"extra.yaml": extra_config("extra")})
    first = world.deploy(**PRUNE)
    assert first.returncode == 0, first.log
    world.cluster.seed(extra_config("by-hand"))  # made by hand: no release label
    assert world.cluster.get("configmap", NS, "extra")["metadata"]["labels"][LABEL]
    assert f"ConfigMap\t{NS}\textra" in inventory(world)

    (world.workspace / "k8s" / "base" / "extra.yaml").unlink()
    second = world.deploy(**PRUNE)

    assert second.returncode == 0, second.log
    assert second.outputs["status"] == "success"
    assert world.cluster.get("configmap", NS, "extra") is None
    assert world.cluster.get("configmap", NS, "by-hand") is not None
    assert world.cluster.get("deployment", NS, "api") is not None
    assert f"ConfigMap\t{NS}\textra" not in inventory(world)
    assert f"Deployment.apps\t{NS}\tapi" in inventory(world)
    assert f"pruned: ConfigMap {NS}/extra" in second.log
    assert "### Pruned" in second.summary and f"ConfigMap {NS}/extra" in second.summary


def test_without_prune_nothing_is_labelled_tracked_or_deleted(world: World) -> None:
    world.write_manifests({"extra.yaml": extra_config("extra")})
    assert world.deploy(**{"image-tag": "v1"}).returncode == 0
    (world.workspace / "k8s" / "base" / "extra.yaml").unlink()
    run = world.deploy(**{"image-tag": "v1"})

    assert run.returncode == 0, run.log
    extra = world.cluster.get("configmap", NS, "extra")
    assert extra is not None
    assert LABEL not in (extra["metadata"].get("labels") or {})
    assert not [k for k in world.cluster.objects() if k[2].startswith("k3s-deploy-release-")]


def test_an_opted_out_object_and_a_claim_are_kept_and_a_dry_run_lists_what_would_go(
    world: World,
) -> None:
    world.write_manifests({
        "extra.yaml": extra_config("extra"),
        "kept.yaml": extra_config("kept", **{"k3s-deploy-action/prune": "false"}),
        "claim.yaml": CLAIM,
    })
    assert world.deploy(**PRUNE).returncode == 0
    for name in ("extra.yaml", "kept.yaml", "claim.yaml"):
        (world.workspace / "k8s" / "base" / name).unlink()

    dry = world.deploy(**PRUNE, **{"dry-run": "true"})
    assert dry.returncode == 0, dry.log
    assert world.cluster.get("configmap", NS, "extra") is not None
    assert f"would prune: ConfigMap {NS}/extra" in dry.log
    assert f"would keep: ConfigMap {NS}/kept (annotated k3s-deploy-action/prune=false)" in dry.log
    assert "a deploy would prune 1 object(s)" in dry.log

    run = world.deploy(**PRUNE)
    assert run.returncode == 0, run.log
    assert world.cluster.get("configmap", NS, "extra") is None
    assert world.cluster.get("configmap", NS, "kept") is not None
    assert world.cluster.get("persistentvolumeclaim", NS, "data") is not None
    assert f"kept: ConfigMap {NS}/kept (annotated k3s-deploy-action/prune=false)" in run.log
    assert (
        f"kept: PersistentVolumeClaim {NS}/data (a PersistentVolumeClaim is pruned only with prune: all)"
    ) in run.log
    # The claim stays in the inventory; the opted-out object left the release.
    assert f"PersistentVolumeClaim\t{NS}\tdata" in inventory(world)
    assert f"ConfigMap\t{NS}\tkept" not in inventory(world)

    everything = world.deploy(**{**PRUNE, "prune": "all"})
    assert everything.returncode == 0, everything.log
    assert world.cluster.get("persistentvolumeclaim", NS, "data") is None
    assert world.cluster.get("configmap", NS, "kept") is not None


def test_a_failed_deploy_prunes_nothing_and_the_next_healthy_one_does(world: World) -> None:
    world.write_manifests({"extra.yaml": extra_config("extra")})
    assert world.deploy(**PRUNE).returncode == 0
    (world.workspace / "k8s" / "base" / "extra.yaml").unlink()
    world.cluster.break_image(f"{platform.API}:v2", "CrashLoopBackOff")

    failed = world.deploy(**{**PRUNE, "image-tag": "v2"})
    assert failed.returncode == 1, failed.log
    assert failed.outputs["status"] == "rolled-back"
    assert world.cluster.get("configmap", NS, "extra") is not None

    healthy = world.deploy(**PRUNE)
    assert healthy.returncode == 0, healthy.log
    assert world.cluster.get("configmap", NS, "extra") is None


def test_a_prune_that_fails_leaves_the_status_success_with_a_warning_naming_what_remains(
    world: World,
) -> None:
    world.write_manifests({"extra.yaml": extra_config("extra"), "stuck.yaml": extra_config("stuck")})
    assert world.deploy(**PRUNE).returncode == 0
    for name in ("extra.yaml", "stuck.yaml"):
        (world.workspace / "k8s" / "base" / name).unlink()
    world.cluster.fail_delete("configmap", "stuck")

    run = world.deploy(**PRUNE)

    assert run.returncode == 0, run.log
    assert run.outputs["status"] == "success"
    assert world.cluster.get("configmap", NS, "extra") is None
    assert world.cluster.get("configmap", NS, "stuck") is not None
    assert (
        f"::warning title=Prune incomplete::1 object(s) could not be pruned and remain in the cluster: "
        f"ConfigMap {NS}/stuck (Error from server (Forbidden)"
    ) in run.log
    assert "Could not be deleted, still in the cluster:" in run.summary
    # Still tracked: the next deploy tries again.
    assert f"ConfigMap\t{NS}\tstuck" in inventory(world)


def test_a_long_prune_list_is_cut_to_fit_the_report_and_counted(world: World) -> None:
    names = [f"settings-{i:03d}-" + "x" * 200 for i in range(60)]
    world.write_manifests({f"{name[:12]}.yaml": extra_config(name) for name in names})
    assert world.deploy(**PRUNE).returncode == 0
    for name in names:
        (world.workspace / "k8s" / "base" / f"{name[:12]}.yaml").unlink()

    run = world.deploy(**PRUNE)

    assert run.returncode == 0, run.log
    assert run.outputs["status"] == "success"
    assert not [k for k in world.cluster.objects() if k[2].startswith("settings-")]
    assert "pruned 60 object(s)" in run.log
    listed = [line for line in run.summary.splitlines() if line.startswith("- `ConfigMap")]
    assert 0 < len(listed) < 60
    assert f"- and {60 - len(listed)} more (the log lists them all)" in run.summary


def test_a_namespace_whose_document_left_is_kept_while_this_deploy_has_objects_in_it(world: World) -> None:
    assert world.deploy(**PRUNE).returncode == 0
    (world.workspace / "k8s" / "base" / "namespace.yaml").unlink()  # created elsewhere from now on

    run = world.deploy(**{**PRUNE, "prune": "all"})

    assert run.returncode == 0, run.log
    assert world.cluster.get("namespace", "", NS) is not None
    assert world.cluster.get("deployment", NS, "api") is not None
    assert f"kept: Namespace {NS} (this deploy's objects are in it)" in run.log
    assert f"Namespace\t\t{NS}" in inventory(world)  # still tracked
