"""Reading the README and docs/*.md as the tests need: sections, fenced blocks, links.

Only the small subset of Markdown this project writes: ``## `` headings, fences of three
backticks with a language, and ``[text](target)`` links.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.S | re.M)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Block:
    """A fenced block: its language (``python``, ``bash``, ``text``; ``""`` when none)."""

    lang: str
    text: str


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section of ``text`` (up to the next ``## ``)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    if match is None:
        raise LookupError(f"no '## {title}' section")
    return match.group(1)


def blocks(text: str, lang: str | None = None) -> list[Block]:
    """The fenced blocks of ``text`` in order, only those of ``lang`` when given."""
    found = [Block(m.group(1), m.group(2)) for m in _FENCE.finditer(text)]
    return [b for b in found if lang is None or b.lang == lang]


def without_blocks(text: str) -> str:
    """``text`` with its fenced blocks blanked out (links in code are not links)."""
    return _FENCE.sub("", text)


def links(text: str) -> list[str]:
    """The targets of every link and image outside fenced blocks and inline code."""
    prose = re.sub(r"`[^`\n]*`", "", without_blocks(text))
    return [a or b for a, b in _LINK.findall(prose)]


def commands(block: Block) -> list[str]:
    """The command lines of a shell block: comments dropped, ``\\`` continuations joined
    (the backslash and newline removed, as the shell does)."""
    joined = block.text.replace("\\\n", "")
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out
