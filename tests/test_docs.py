"""The README and the docs stay true to the tree: their links lead somewhere, the front page's
commands name real make targets and extras, its code compiles, and the Quick start is the
same on the front page and in the docs. (Running the Quick start for real is
``tests/integration/test_readme.py``; ``make docs`` checks the anchors between pages.)
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

from .markdown import DOCS, README, ROOT, blocks, commands, links, section

PAGES = sorted(DOCS.rglob("*.md"))  # the Integrations pages too (docs/integrations/)
EXTERNAL = ("http://", "https://", "mailto:")


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text("utf-8")
    return set(re.findall(r"^([A-Za-z][\w.-]*):", text, re.M))


def _extras() -> set[str]:
    """The names under ``[project.optional-dependencies]`` (no tomllib on Python 3.10)."""
    text = (ROOT / "pyproject.toml").read_text("utf-8")
    table = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+) = \[", table, re.M))


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file(page: Path) -> None:
    missing = []
    for target in links(page.read_text("utf-8")):
        path = target.split("#", 1)[0]
        if target.startswith(EXTERNAL) or not path:
            continue
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.name} links to files that do not exist: {missing}"


def test_the_link_check_sees_links_in_prose_only() -> None:
    text = "[a](one.md) and ![b](img/two.png)\n`[c](three.md)`\n```bash\n[d](four.md)\n```\n"
    assert links(text) == ["one.md", "img/two.png"]


def test_every_docs_page_is_in_the_site_navigation() -> None:
    # "- Title: page.md", or a bare "- page.md" (a section's index page)
    found = re.findall(
        r"^\s*- (?:[^:\n]+: )?(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M
    )
    assert set(found) == {p.relative_to(DOCS).as_posix() for p in PAGES}


def test_the_front_page_is_a_front_page() -> None:
    assert len(README.read_text("utf-8").splitlines()) <= 200


def test_the_front_page_commands_name_real_make_targets_and_extras() -> None:
    targets, extras = _make_targets(), _extras()
    lines = [c for b in blocks(README.read_text("utf-8"), "bash") for c in commands(b)]
    made = [shlex.split(c)[1] for c in lines if c.startswith("make ")]
    assert made and set(made) <= targets, set(made) - targets
    installs = [c for c in lines if c.startswith("pip install")]
    assert installs
    for line in installs:
        for wanted in re.findall(r"\[([\w,-]+)\]", line):
            assert set(wanted.split(",")) <= extras, line


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_the_python_blocks_compile(page: Path) -> None:
    """Fragments may use names they do not define, but not invalid syntax (``await`` at the
    top level is allowed: the async examples are bodies of a coroutine)."""
    for block in blocks(page.read_text("utf-8"), "python"):
        compile(block.text, page.name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def test_getting_started_repeats_the_quick_start_word_for_word() -> None:
    front = section(README.read_text("utf-8"), "Quick start")
    docs = section((DOCS / "getting-started.md").read_text("utf-8"), "Quick start")
    assert blocks(front) == blocks(docs)
