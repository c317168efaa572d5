"""The README and docs/: every relative link and #anchor resolves, the README stays short, and its
generated benchmark table is what ``python -m benchmarks.readme`` would write. Needs nothing but
the repository (no TensorFlow, no network); well under a second."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 150

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"", re.I)


def prose(text: str) -> str:
    """The text without fenced code blocks (links and headings there are not links and headings)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, punctuation dropped, spaces → '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link → its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.lower()
    text = re.sub(r"[^\w\- ]", "", text)  # keeps letters, digits, '_', '-', spaces (unicode-aware)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = prose(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set(HTML_ANCHOR.findall(text))
    for _, heading in HEADING.findall(text):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    text = INLINE_CODE.sub("", prose(path.read_text(encoding="utf-8")))
    return LINK.findall(text)


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: …: not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{target}: {file_part} does not exist")
        elif not linked.is_relative_to(REPO):
            problems.append(f"{target}: points outside the repository")
        elif anchor:
            if linked.suffix != ".md":
                problems.append(f"{target}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(linked):
                problems.append(f"{target}: no heading in {linked.relative_to(REPO)} has the anchor #{anchor}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_links_and_anchors_resolve(page):
    assert broken_links(page) == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README)}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


def test_readme_is_short():
    n_lines = len(README.read_text(encoding="utf-8").splitlines())
    assert n_lines <= README_MAX_LINES, f"README.md has {n_lines} lines; move reference material to docs/"


def test_slug_follows_github():
    assert slug("Which figures are comparable") == "which-figures-are-comparable"
    assert slug("The Keras head's speed") == "the-keras-heads-speed"
    assert slug("Options shared by `cache build` and `finetune run`") == "options-shared-by-cache-build-and-finetune-run"
    assert slug("cache ls, info, verify") == "cache-ls-info-verify"


def test_checker_catches_a_broken_link(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [bad](#nowhere) [gone](missing.md)\n\n```\n[code](ignored.md)\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert broken_links(page) == ["#nowhere: no heading in page.md has the anchor #nowhere",
                                  "missing.md: missing.md does not exist"]


def test_generated_benchmark_table_is_current():
    """``python -m benchmarks.readme --check`` finds its markers in README.md and would change nothing."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.readme", "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
