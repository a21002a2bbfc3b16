"""The Markdown every reference page is made of: a header, headings and tables."""

from __future__ import annotations

import re
from collections.abc import Sequence

COMMAND = "make docs"
# Code spans (any run of backticks to the same run), links and HTML line breaks: kept as is.
_LITERAL = re.compile(r"((`+).*?\2|\[[^\]]*\]\([^)]*\)|<br>)")


def header(title: str, sources: Sequence[str]) -> list[str]:
    """The page's first lines: that it is generated, from what, by which command."""
    return [
        f"<!-- Generated from {', '.join(sources)} by `{COMMAND}` "
        "(python -m tools.reference): do not edit by hand. -->",
        "",
        f"# {title}",
        "",
    ]


def table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A GitHub table; a column empty in every row is left out."""
    kept = [i for i in range(len(columns)) if any(row[i] for row in rows)]
    lines = ["| " + " | ".join(columns[i] for i in kept) + " |"]
    lines.append("|" + "---|" * len(kept))
    lines += ["| " + " | ".join(cell(row[i]) for i in kept) + " |" for row in rows]
    return [*lines, ""]


def cell(text: str) -> str:
    """One table cell: a `|` would end the cell (even in a code span), a newline the row."""
    return prose(text).replace("|", "\\|").replace("\n", " ").strip()


def prose(text: str) -> str:
    """`text` with what Markdown would take for markup escaped outside its code spans and
    links: `<name>` would be an HTML tag, and two `*` emphasis."""
    escaped, start = [], 0
    for literal in _LITERAL.finditer(text):
        escaped += [_escape(text[start : literal.start()]), literal.group()]
        start = literal.end()
    return "".join([*escaped, _escape(text[start:])])


def _escape(text: str) -> str:
    return text.replace("<", "&lt;").replace("*", "\\*")


def code(text: object) -> str:
    """`text` as a code span, with enough backticks around it for those it holds."""
    value = str(text)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", value)), default=0) + 1)
    padding = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{padding}{value}{padding}{fence}"


def anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lowercase, punctuation dropped, spaces to '-'."""
    return "#" + re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def paragraph(text: str) -> list[str]:
    return [prose(text), ""] if text else []
