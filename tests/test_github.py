"""What the action says to the runner: workflow commands, outputs, summary, and untrusted text."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deploykit.github import SUMMARY_LIMIT, Workflow, escape_data, escape_property, neutralise
from tests.runner import commands, issued_by


def workflow(tmp_path: Path) -> tuple[Workflow, io.StringIO]:
    out = io.StringIO()
    env = {
        "GITHUB_OUTPUT": str(tmp_path / "output"),
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
        "GITHUB_STATE": str(tmp_path / "state"),
    }
    return Workflow(env, out), out


def parse_output_file(text: str) -> dict[str, str]:
    """Read GITHUB_OUTPUT the way the runner does: `name=value` or `name<<DELIMITER` blocks."""
    values: dict[str, str] = {}
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line:
            i += 1
            continue
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delimiter = line.split("<<", 1)
            end = lines.index(delimiter, i + 1)
            values[name] = "\n".join(lines[i + 1 : end])
            i = end + 1
        else:
            name, value = line.split("=", 1)
            values[name] = value
            i += 1
    return values


# escaping


def test_message_escaping_covers_percent_cr_and_lf():
    assert escape_data("50% done\r\nnext") == "50%25 done%0D%0Anext"
    assert escape_data("%0A") == "%250A"  # an escape in the text stays text


def test_property_escaping_also_covers_colon_and_comma():
    assert escape_property("a:b,c%d\ne") == "a%3Ab%2Cc%25d%0Ae"


def test_error_command_escapes_title_and_message(tmp_path):
    gh, out = workflow(tmp_path)
    gh.error("Bad: input, really", "line one\nline two: 100%")
    assert out.getvalue() == "::error title=Bad%3A input%2C really::line one%0Aline two: 100%25\n"


def test_warning_and_notice_without_title(tmp_path):
    gh, out = workflow(tmp_path)
    gh.warning("careful")
    gh.notice("fyi", title="Note")
    assert out.getvalue() == "::warning::careful\n::notice title=Note::fyi\n"


def test_group_is_closed_even_when_the_body_fails(tmp_path):
    gh, out = workflow(tmp_path)
    with pytest.raises(RuntimeError), gh.group("Output\nof the master"):
        raise RuntimeError
    assert out.getvalue() == "::group::Output%0Aof the master\n::endgroup::\n"


# outputs


def test_single_line_outputs_are_name_equals_value(tmp_path):
    gh, _ = workflow(tmp_path)
    gh.set_output("status", "success")
    gh.set_output("bucket", "k3s-deploy-x=y")
    assert (tmp_path / "output").read_text() == "status=success\nbucket=k3s-deploy-x=y\n"


def test_multi_line_outputs_use_a_random_delimiter(tmp_path):
    gh, _ = workflow(tmp_path)
    value = "first\nghadelimiter_fixed\nEOF\nlast"
    gh.set_output("message", value)
    gh.set_output("other", "a\r\nb")
    text = (tmp_path / "output").read_text()
    delimiters = re.findall(r"^\w+<<(\S+)$", text, flags=re.MULTILINE)
    assert len(delimiters) == 2 and len(set(delimiters)) == 2
    assert all(re.fullmatch(r"ghadelimiter_[0-9a-f]{32}", d) for d in delimiters)
    assert all(d not in value for d in delimiters)
    assert parse_output_file(text)["message"] == value


def test_outputs_are_not_written_outside_a_runner(tmp_path):
    gh = Workflow({}, io.StringIO())
    gh.set_output("status", "success")
    gh.summary("# hi")
    gh.save_state("bucket", "b")
    assert list(tmp_path.iterdir()) == []


def test_state_is_appended_for_the_post_step(tmp_path):
    gh, _ = workflow(tmp_path)
    gh.save_state("bucket", "k3s-deploy-x")
    gh.save_state("prefix", "")
    assert (tmp_path / "state").read_text() == "bucket=k3s-deploy-x\nprefix=\n"


# masking


def test_a_value_is_masked_before_it_is_printed(tmp_path):
    gh, out = workflow(tmp_path)
    gh.mask("s3cr3t%\nsecond line")
    gh.log("the token is s3cr3t%")
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["::add-mask::s3cr3t%25", "::add-mask::second line"]
    assert lines[2] == "the token is s3cr3t%"  # the runner hides it from here on
    gh.mask("s3cr3t%")
    assert out.getvalue().count("::add-mask::") == 2  # asked once


def test_masked_values_are_redacted_from_outputs_and_summary(tmp_path):
    gh, _ = workflow(tmp_path)
    gh.mask("123456789012")
    gh.set_output("bucket", "arn:aws:s3:::bucket-123456789012")
    gh.set_output("message", "account 123456789012\nagain 123456789012")
    gh.summary("Account: 123456789012\n")
    outputs = parse_output_file((tmp_path / "output").read_text())
    assert outputs == {"bucket": "arn:aws:s3:::bucket-***", "message": "account ***\nagain ***"}
    assert (tmp_path / "summary.md").read_text() == "Account: ***\n"


# untrusted text


def test_echo_untrusted_wraps_the_text_in_stop_commands_with_a_fresh_token(tmp_path):
    gh, out = workflow(tmp_path)
    remote = "deploying\n::error::fake failure\n::add-mask::x\nlast line"
    gh.echo_untrusted(remote)
    gh.echo_untrusted(remote)
    lines = out.getvalue().splitlines()
    tokens = [
        line.removeprefix("::stop-commands::") for line in lines if line.startswith("::stop-commands::")
    ]
    assert len(tokens) == 2 and tokens[0] != tokens[1]
    assert all(re.fullmatch(r"[0-9a-f]{32}", t) for t in tokens)
    first = lines[: lines.index(f"::{tokens[0]}::") + 1]
    assert first[0] == f"::stop-commands::{tokens[0]}"
    assert first[-1] == f"::{tokens[0]}::"
    assert first[1] == "deploying" and first[-2] == "last line"
    assert len(first) == 6


def test_echo_untrusted_neutralises_lines_starting_with_double_colon(tmp_path):
    gh, out = workflow(tmp_path)
    gh.echo_untrusted("::error::x\n   ::warning::indented\nfine :: in the middle\n::endgroup::")
    body = out.getvalue().splitlines()[1:-1]
    assert not any(line.lstrip().startswith("::") for line in body)
    assert body[2] == "fine :: in the middle"
    assert body[0].replace("\u200b", "") == "::error::x"


def test_remote_text_cannot_guess_the_resume_token(tmp_path):
    gh, out = workflow(tmp_path)
    gh.echo_untrusted("::resume-commands::\n::stop-commands::mine\n::mine::")
    body = out.getvalue().splitlines()[1:-1]
    assert not any(line.startswith("::") for line in body)


@pytest.mark.parametrize("line", ["::error::x", "  ::set-output name=a::b", "\t::add-mask::y"])
def test_neutralise_defuses_command_lines(line):
    assert not neutralise(line).lstrip().startswith("::")


def test_log_neutralises_command_lines_too(tmp_path):
    gh, out = workflow(tmp_path)
    gh.log("::error::from a manifest name")
    assert not out.getvalue().startswith("::")


# summary


def test_summary_is_cut_at_one_mebibyte_and_says_so(tmp_path):
    gh, _ = workflow(tmp_path)
    gh.summary("# Deploy\n")
    gh.summary("é" * SUMMARY_LIMIT)  # 2 MiB of UTF-8
    data = (tmp_path / "summary.md").read_bytes()
    assert len(data) <= SUMMARY_LIMIT
    text = data.decode("utf-8")  # still valid UTF-8 where it was cut
    assert text.startswith("# Deploy\n")
    assert "cut at GitHub's 1 MiB limit" in text


def test_later_summary_parts_stay_within_the_limit(tmp_path):
    gh, _ = workflow(tmp_path)
    for _ in range(3):
        gh.summary("x" * (SUMMARY_LIMIT // 2))
    assert (tmp_path / "summary.md").stat().st_size <= SUMMARY_LIMIT


def test_a_small_summary_is_written_whole(tmp_path):
    gh, _ = workflow(tmp_path)
    gh.summary("# Deploy\n\n| a | b |\n")
    gh.summary("more\n")
    assert (tmp_path / "summary.md").read_text() == "# Deploy\n\n| a | b |\nmore\n"


def test_neutralise_defuses_the_old_hash_bracket_command_form_anywhere_in_a_line():
    line = "progress ##[set-output name=status;]success"
    assert "##[" not in neutralise(line)


# the runner's own reading of the output (tests/runner.py)

# What a build step, a container log or a kubectl error can print: each carries PWNED, so a
# command it manages to issue is found by its line.
HOSTILE = [
    "10%\r::warning::PWNED progress bar",
    "a\n::error::PWNED after a line feed",
    "a\r\n::add-mask::PWNED",
    "\r\n  ::set-output name=status::PWNED",
    "x ##[error]PWNED old form mid-line",
    "::stop-commands::PWNED-token",
    "\x1b[31m\r::group::PWNED behind an ANSI escape and a CR",
    "\u2028::notice::PWNED after a Unicode line separator",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_log_leaves_the_runner_no_command_on_any_line_break(tmp_path, text):
    gh, out = workflow(tmp_path)
    gh.log(text)
    assert issued_by(out.getvalue(), "PWNED") == [], repr(out.getvalue())
    assert "PWNED" in out.getvalue()  # shown, defused


@pytest.mark.parametrize("text", HOSTILE)
def test_untrusted_output_issues_nothing_even_unfenced(tmp_path, text):
    gh, out = workflow(tmp_path)
    gh.echo_untrusted(text)
    assert issued_by(out.getvalue(), "PWNED") == []
    # The fence alone would stop them; each line is defused as well, in case it is left open.
    fenced = out.getvalue().splitlines()
    assert issued_by("\n".join(fenced[1:-1]), "PWNED") == []


@given(st.lists(st.sampled_from(["::", "##[", "]", "\r", "\n", "\r\n", " ", "\t", "error", "x",
                                 "PWNED", "\u2028", "\x85", "%", "\x1b["]), max_size=24))
def test_no_mix_of_separators_and_colons_makes_a_command(parts):
    text = "".join(parts)
    assert issued_by(neutralise(text), "PWNED") == []
    assert commands(neutralise(text)) == []


def test_untrusted_stretch_resumes_commands_even_when_it_raises(tmp_path):
    gh, out = workflow(tmp_path)
    with pytest.raises(RuntimeError), gh.untrusted():
        gh.log("::error::PWNED inside")
        raise RuntimeError("build failed")
    gh.error("Build failed", "ours")
    found = commands(out.getvalue())
    assert [c.name for c in found] == ["stop-commands", found[1].name, "error"]
    assert found[1].name == found[0].data  # the resume token closes the stretch
    assert found[2].data == "ours"
