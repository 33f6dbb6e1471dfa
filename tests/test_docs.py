"""The documentation tells the truth about the action:

- the README's inputs and outputs tables list exactly what action.yml declares, with its defaults;
- every message in docs/troubleshooting.md is one the action (or its script on the master)
  really prints, every annotation title exists, and every `How to fix` text is quoted verbatim;
- every relative link in the README and the docs leads to a file that exists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
TROUBLESHOOTING = DOCS / "troubleshooting.md"
DEPLOYKIT = ROOT / "deploykit"
# Markdown files whose links are checked: the README, docs/, and the examples' guides written
# alongside them.
LINKED_PAGES = [
    README,
    *sorted(DOCS.glob("*.md")),
    ROOT / "examples" / "iam" / "README.md",
    ROOT / "examples" / "infra" / "terraform" / "k3s" / "README.md",
]
PLACEHOLDER = "…"
ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


# Markdown tables


def split_row(line: str) -> list[str]:
    """Cells of a Markdown table row (no `|` inside the cells of the tables read here)."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table_after(text: str, heading: str) -> list[list[str]]:
    """The rows (header excluded) of the first table after the heading line `heading`."""
    lines = text.splitlines()
    start = lines.index(heading)
    rows: list[list[str]] = []
    for line in lines[start + 1 :]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            rows.append(split_row(line))
        elif rows:
            break
    assert len(rows) >= 2, f"no table under {heading!r}"
    header, separator, *body = rows
    assert all(set(cell) <= set(":-") for cell in separator), f"bad table under {heading!r}"
    return [header, *body]


def code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


def tables_in(text: str) -> list[list[list[str]]]:
    """Every table of a page, each as its rows (header included, separator left out)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            row = split_row(line)
            if not all(set(cell) <= set(":-") and cell for cell in row):
                current.append(row)
        elif current:
            tables.append(current)
            current = []
    return tables


# The action's metadata


def action() -> dict:
    return yaml.safe_load((ROOT / "action.yml").read_text(encoding="utf-8"))


def readme() -> str:
    if not README.exists():
        pytest.fail("README.md is missing")
    return README.read_text(encoding="utf-8")


def test_readme_inputs_table_lists_exactly_the_action_inputs_with_their_defaults() -> None:
    header, *rows = table_after(readme(), "## Inputs")
    assert [h.lower() for h in header[:2]] == ["input", "default"]
    documented = {}
    for row in rows:
        (name,) = code_spans(row[0])
        assert name not in documented, f"input {name} listed twice"
        documented[name] = row[1]
    inputs = action()["inputs"]
    assert list(documented) == list(inputs), "README inputs differ from action.yml (names or order)"
    for name, cell in documented.items():
        default = str(inputs[name].get("default", "") or "")
        if default:
            assert code_spans(cell) == [default] and cell == f"`{default}`", (
                f"input {name}: action.yml default {default!r}, README says {cell!r}"
            )
        else:
            # No literal default: the cell is empty or names where the value comes from instead
            # (environment variables such as `GITHUB_SHA`), never a value of its own.
            spans = code_spans(cell)
            assert all(ENV_NAME.match(span) for span in spans), (
                f"input {name}: action.yml has no default, README says {cell!r}"
            )


def test_readme_outputs_table_lists_exactly_the_action_outputs() -> None:
    header, *rows = table_after(readme(), "## Outputs")
    assert header[0].lower() == "output"
    documented = [code_spans(row[0])[0] for row in rows]
    assert documented == list(action()["outputs"]), "README outputs differ from action.yml"


def test_the_table_reader_sees_a_wrong_default() -> None:
    text = "## Inputs\n\n| input | default | meaning |\n|---|---|---|\n| `timeout` | `60` | x |\n"
    _header, row = table_after(text, "## Inputs")
    assert code_spans(row[1]) == ["60"] != [str(action()["inputs"]["timeout"]["default"])]


# What the action prints


def _python_strings(path: Path) -> list[str]:
    """Every string literal of a module, f-strings with `…` for each replacement field, and
    implicitly concatenated literals joined (as Python joins them)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.JoinedStr):
            found.append(
                "".join(
                    part.value if isinstance(part, ast.Constant) else PLACEHOLDER for part in node.values
                )
            )
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append(node.value)
    return found


def printed_texts() -> str:
    """What deploykit can print: its Python strings and its shell scripts (quotes unescaped)."""
    parts: list[str] = []
    for path in sorted(DEPLOYKIT.rglob("*.py")):
        parts += _python_strings(path)
    for path in sorted(DEPLOYKIT.rglob("*.sh")):
        parts.append(path.read_text(encoding="utf-8").replace('\\"', '"'))
    return "\n".join(parts)


def annotation_titles() -> set[str]:
    titles: set[str] = set()
    for path in sorted(DEPLOYKIT.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        titles |= set(re.findall(r"\btitle\s*=\s*\"([^\"]+)\"", text))
        titles |= set(re.findall(r"\.error\(\s*\"([^\"]+)\"", text))
    return titles


def message_fragments(message: str) -> list[str]:
    """The fixed parts of a documented message: split at `…`, trimmed of punctuation."""
    fragments = [re.sub(r"^\W+|\W+$", "", part) for part in message.split(PLACEHOLDER)]
    return [fragment for fragment in fragments if fragment]


def troubleshooting_rows() -> list[tuple[str, str]]:
    rows = []
    for table in tables_in(TROUBLESHOOTING.read_text(encoding="utf-8")):
        header, *body = table
        assert [h.lower() for h in header[:2]] == ["title", "message"], header
        for row in body:
            spans = code_spans(row[1])
            assert spans, f"no message in {row}"
            rows.append((row[0], spans[0]))
    return rows


def test_troubleshooting_covers_the_main_failures() -> None:
    messages = " ".join(message for _, message in troubleshooting_rows())
    for expected in ("not Online in SSM", "no running instance has tag", "AccessDenied", "TLS handshake"):
        assert expected in messages


@pytest.mark.parametrize("title,message", troubleshooting_rows(), ids=lambda value: value[:40])
def test_troubleshooting_entry_is_printed_by_the_action(title: str, message: str) -> None:
    assert title in annotation_titles(), f"no annotation has the title {title!r}"
    fragments = message_fragments(message)
    assert max(map(len, fragments)) >= 8, f"{message!r} has too little fixed text to search for"
    printed = printed_texts()
    missing = [fragment for fragment in fragments if fragment not in printed]
    assert not missing, f"{message!r}: deploykit does not print {missing}"


def test_the_message_check_rejects_text_the_action_does_not_print() -> None:
    printed = printed_texts()
    assert "no running instance has tag" in printed
    assert not all(f in printed for f in message_fragments("no running instance … is tagged wrongly"))


def test_every_fix_text_is_quoted_verbatim() -> None:
    from deploykit import errors

    page = TROUBLESHOOTING.read_text(encoding="utf-8")
    fixes = {name: value for name, value in vars(errors).items() if name.startswith("FIX_")}
    assert fixes
    for name, value in fixes.items():
        match = re.search(rf"^### `{name}`\n\n((?:> .*\n)+)", page, re.M)
        assert match, f"{name} has no section in docs/troubleshooting.md"
        quoted = " ".join(line[2:] for line in match[1].splitlines())
        assert quoted == value, f"{name} is quoted differently from deploykit/errors.py"


# Links


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    targets = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_lead_to_existing_files(page: Path) -> None:
    if not page.exists():
        pytest.fail(f"{page.relative_to(ROOT)} is missing")
    broken = []
    for target in relative_links(page):
        path = target.split("#", 1)[0]
        if not (page.parent / path).resolve().exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_the_link_check_finds_links() -> None:
    assert "../examples/iam/deploy-role-policy.json" in relative_links(TROUBLESHOOTING)


# The map in docs/internals.md


def test_the_internals_map_names_every_module_and_every_script_part():
    """A newcomer finds each step from the map: every module of the product package and every
    part of the deploy script is named in its section 0, so a new one cannot be left off."""
    text = (DOCS / "internals.md").read_text(encoding="utf-8")
    section = text[text.index("## 0. The map") : text.index("## 1. ")]
    modules = {p.stem for p in DEPLOYKIT.glob("*.py")} - {"__init__", "__main__"}
    missing = [m for m in sorted(modules) if not re.search(rf"\b{m}(\.py|\.[a-z_A-Z]+)", section)]
    assert missing == []
    parts = sorted(p.name for p in (DEPLOYKIT / "scripts" / "k3s-deploy").glob("*.sh"))
    assert [p for p in parts if f"`{p}`" not in section] == []
