"""Bad input, property-based: every input gets hostile values (unicode, newlines, shell
metacharacters, `$(...)` and backticks, very long values); manifests get path traversal,
symlinks out of the workspace, YAML aliases and bombs, deep nesting, random YAML, invalid image
references and huge files. Each gets a clear error naming the input (or the file), or is handled
safely. A few run end to end with a canary: nothing the user did not send runs on the master."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploykit.errors import DeployError, InputError, ManifestError
from deploykit.images import parse_image
from deploykit.inputs import INPUTS, parse_settings
from deploykit.render import MAX_FILE_BYTES, build_bundle
from tests.reliability import figures
from tests.reliability.conftest import Rig

ROOT = Path(__file__).resolve().parents[2]  # its examples folder has a k8s/base

HOSTILE = [
    "$(touch CANARY)",
    "`touch CANARY`",
    "; touch CANARY",
    "&& touch CANARY",
    "| touch CANARY",
    "x\ntouch CANARY",
    "x\r\n",
    "'\"",
    "${IFS}",
    "../../etc/passwd",
    "/etc",
    "-rf",
    "*",
    "\\",
    "é‮\u200b😀",
    "\x00",
    "\x1b[31m",
    " ",
    "",
]
VALUES = st.one_of(
    st.sampled_from(HOSTILE),
    st.text(max_size=50),
    st.text(max_size=5).map(lambda t: t * 2000),  # very long
    st.builds(lambda a, b: a + b, st.sampled_from(HOSTILE), st.text(max_size=20)),
)
# Inputs whose parsing needs no Docker engine or registry (those have tests/registry).
CHECKED = [name for name in INPUTS if name not in ("build", "build-args")]
_counts: dict[str, int] = {}


def _workspace(tmp: Path) -> Path:
    base = tmp / "ws" / "k8s" / "base"
    base.mkdir(parents=True, exist_ok=True)
    (base / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n")
    return tmp / "ws"


def _count(request: pytest.FixtureRequest, name: str) -> None:
    _counts[name] = _counts.get(name, 0) + 1
    figures.note(request.node, table="bad-input", input=name, examples=_counts[name])


@pytest.mark.parametrize("name", CHECKED)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=VALUES)
def test_every_input_is_refused_clearly_or_accepted_safely(
    name: str, value: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> None:
    _count(request, name)
    workspace = _workspace(tmp_path_factory.mktemp("in"))
    raw = {"aws-region": "eu-west-1", "image-tag": "v1", name: value}
    try:
        result = parse_settings(raw, {"GITHUB_WORKSPACE": str(workspace)})
    except InputError as exc:
        # names this input, or the one it goes with (registry-username for a password alone)
        assert f"'{name}'" in exc.message or re.search(r"input '[a-z-]+'", exc.message), exc.message
        assert "\n" not in exc.message.split("got", 1)[-1], "the value is echoed raw"
        return
    except DeployError as exc:  # e.g. the registry login's own checks
        assert exc.message
        return
    # Accepted: whatever reaches the master's command lines is validated (and quoted anyway:
    # test_security proves the quoting for any value).
    assert all(c not in result.namespace for c in "$`;&|\n' ")
    assert all(all(c not in word for c in "$`;&|\n'\" ") for word in result.kubectl)
    assert all(c not in result.request_timeout for c in "$`;&|\n' ")
    assert result.manifests.resolve().is_relative_to(workspace.resolve())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.one_of(
        st.sampled_from(
            [
                "..",
                "../..",
                "/etc",
                "k8s/../../x",
                "k8s/base/../../..",
                "~",
                "$HOME",
                "k8s/link",
                "k8s/base/evil.yaml",
                "./k8s/base",
                "k8s//base",
                "k8s/base/",
            ]
        ),
        st.text(max_size=30),
    )
)
def test_manifests_never_lead_outside_the_workspace(
    path: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> None:
    _count(request, "manifests (paths, symlinks)")
    root = tmp_path_factory.mktemp("paths")
    workspace = _workspace(root)
    outside = root / "outside"
    outside.mkdir()
    (outside / "stolen.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: stolen\n")
    (workspace / "k8s" / "link").symlink_to(outside)
    (workspace / "k8s" / "base" / "evil.yaml").symlink_to(outside / "stolen.yaml")
    try:
        result = parse_settings(
            {"aws-region": "eu-west-1", "image-tag": "v1", "manifests": path},
            {"GITHUB_WORKSPACE": str(workspace)},
        )
        bundle = build_bundle(result.manifests, result.workspace, ())
    except InputError as exc:
        assert "'manifests'" in exc.message
        return
    except ManifestError as exc:
        assert "outside the workspace" in exc.message or "no .yaml" in exc.message or exc.message
        return
    assert all(m.name != "stolen" for m in bundle.manifests), "read a file outside the workspace"


YAML_CASES = {
    "billion laughs": "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(7)
    ),
    "deep nesting": "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata: " + "[" * 5000 + "]" * 5000,
    "no kind": "apiVersion: v1\nmetadata:\n  name: x\n",
    "list document": "- a\n- b\n",
    "tab in name": 'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: "a\\tb"\n',
    "newline in kind": 'apiVersion: v1\nkind: "ConfigMap\\n$(touch CANARY)"\nmetadata:\n  name: x\n',
    "python tag": "!!python/object/apply:os.system ['touch CANARY']\n",
    "not utf-8": b"\xff\xfe".decode("latin-1"),
}


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_hostile_yaml_is_refused_naming_the_file(
    case: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    _count(request, "manifests (YAML)")
    workspace = _workspace(tmp_path)
    (workspace / "k8s" / "base" / "bad.yaml").write_text(YAML_CASES[case], encoding="latin-1")
    with pytest.raises(ManifestError) as raised:
        build_bundle(workspace / "k8s" / "base", workspace, ())
    assert "bad.yaml" in raised.value.message
    assert not (tmp_path / "CANARY").exists() and not Path("CANARY").exists()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300))
def test_random_yaml_is_read_or_refused_naming_the_file(
    text: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> None:
    _count(request, "manifests (random YAML)")
    workspace = _workspace(tmp_path_factory.mktemp("yaml"))
    (workspace / "k8s" / "base" / "cm.yaml").write_text(text, encoding="utf-8")
    try:
        build_bundle(workspace / "k8s" / "base", workspace, ())
    except ManifestError as exc:
        assert "k8s/base" in exc.message or "cm.yaml" in exc.message, exc.message


@settings(max_examples=200, deadline=None)
@given(
    reference=st.one_of(
        st.text(max_size=80),
        st.sampled_from(
            [
                "localhost:5000/app",
                "a:b:c",
                "UPPER/case",
                "x@sha256:zz",
                "repo:" + "t" * 200,
                "-x",
                "x/../y",
                "ex:port/x",
            ]
        ),
    )
)
def test_image_references_are_parsed_or_refused(reference: str, request: pytest.FixtureRequest) -> None:
    _count(request, "images (references)")
    try:
        ref = parse_image(reference)
    except ValueError:
        if not reference.strip(" ,\n"):
            return  # no reference at all: 'images' is empty
        try:
            parse_settings(
                {"aws-region": "eu-west-1", "image-tag": "v1", "images": reference, "manifests": "."},
                {"GITHUB_WORKSPACE": str(ROOT)},
            )
        except InputError as exc:
            assert "'images'" in exc.message, exc.message
        return
    assert str(ref) == reference or parse_image(str(ref)) == ref
    assert all(c not in str(ref) for c in " \n$`;|&'\"")


def test_huge_manifest_file_is_refused(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    _count(request, "manifests (huge bundle)")
    workspace = _workspace(tmp_path)
    big = (
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: big\ndata:\n  x: " + "y" * MAX_FILE_BYTES + "\n"
    )
    (workspace / "k8s" / "base" / "big.yaml").write_text(big)
    with pytest.raises(ManifestError) as raised:
        build_bundle(workspace / "k8s" / "base", workspace, ())
    assert "big.yaml" in raised.value.message and "MiB" in raised.value.message


# -- end to end, with a canary -----------------------------------------------------------------

E2E_CASES = {
    "command substitution in a config value": ("config.yaml", 'data:\n  LOG_LEVEL: "$(touch {canary})"\n'),
    "backticks in a workload name": ("api.yaml", None),
    "shell in a namespace": ("config.yaml", '  namespace: "x;touch {canary}"\n'),
    "shell in an image": ("worker.yaml", None),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(E2E_CASES))
def test_hostile_manifest_content_never_runs_on_the_master(
    rig: Rig, case: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    _count(request, "manifests (end to end, canary)")
    canary = tmp_path / "CANARY"
    base = rig.workspace / "k8s" / "base"
    if case == "command substitution in a config value":
        text = (base / "config.yaml").read_text().replace("data:\n  LOG_LEVEL: info\n", "")
        (base / "config.yaml").write_text(text + E2E_CASES[case][1].format(canary=canary))
    elif case == "backticks in a workload name":
        (base / "api.yaml").write_text(
            (base / "api.yaml").read_text().replace("  name: api\n", f'  name: "api`touch {canary}`"\n', 1)
        )
    elif case == "shell in a namespace":
        text = (
            (base / "config.yaml")
            .read_text()
            .replace("  namespace: production-platform\n", f'  namespace: "x;touch {canary}"\n')
        )
        (base / "config.yaml").write_text(text)
    else:
        (base / "worker.yaml").write_text(
            (base / "worker.yaml")
            .read_text()
            .replace("docker.io/acme/worker:latest", f'"docker.io/acme/worker:v1;touch${{IFS}}{canary}"')
        )
    run = rig.deploy(
        images="docker.io/acme/api"
        if case == "shell in an image"
        else "docker.io/acme/api\ndocker.io/acme/worker"
    )
    rig.settle()
    assert not canary.exists(), run.log
    assert not any(p.name == "CANARY" for p in rig.tmp.rglob("CANARY")), run.log
    if case == "command substitution in a config value":
        assert run.outputs["status"] == "success", run.log
        stored = rig.cluster.get("configmap", "production-platform", "app-config")
        assert stored is not None and stored["data"]["LOG_LEVEL"] == f"$(touch {canary})"
    rig.assert_nothing_left(run)
