"""The step summary as GitHub shows it: rendered by cmark-gfm, GitHub's own Markdown parser.

GitHub renders a step summary as GitHub Flavored Markdown (tables, autolinks, strikethrough)
and lets raw HTML through its sanitizer, which keeps tags such as `<a>`, `<img>` and
`<details>`: so raw HTML is rendered here too (the "unsafe" option), to see what would reach it.
"""

from __future__ import annotations

import html
import re

import cmarkgfm
from cmarkgfm.cmark import Options

EXTENSIONS = ["table", "autolink", "strikethrough", "tagfilter"]
# The elements the action's summary is made of; anything else came from untrusted text.
SUMMARY_TAGS = {"h2", "h3", "p", "table", "thead", "tbody", "tr", "th", "td", "strong", "code",
                "pre", "br", "blockquote", "a"}
TAG = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9]*)")


def render(markdown: str) -> str:
    return cmarkgfm.markdown_to_html_with_extensions(
        markdown, options=Options.CMARK_OPT_UNSAFE, extensions=EXTENSIONS
    )


def tags(rendered: str) -> set[str]:
    """The names of the HTML elements in the rendered summary."""
    return {m[2].lower() for m in TAG.finditer(rendered)}


def text(rendered: str) -> str:
    """What a reader sees: the rendered summary without its tags, entities decoded."""
    return html.unescape(re.sub(r"<[^>]*>", "", rendered))


def shown(markdown: str) -> str:
    """What a reader sees of a summary written in Markdown."""
    return text(render(markdown))
