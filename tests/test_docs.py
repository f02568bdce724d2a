"""The repository is self-contained: no file cites documents kept outside it,
every `docs/<file>.md#<anchor>` citation in code resolves to a file and a
heading, and every relative Markdown link resolves (docs/README.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "outputs", ".pytest_cache", "__pycache__", "node_modules"}
# The documents that once lived outside the repository (this file is exempt from its own check).
OUTSIDE_RE = re.compile(r"\b(?:REFERENCES|FIELD_NOTES|ARCHITECTURE|STYLE)\.md\b|\bFIELD_NOTES\b|/work/shared/")
CITATION_RE = re.compile(r"\bdocs/([\w./-]+?\.md)(?:#([\w-]+))?")
LINK_RE = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE_RE = re.compile(r"^\s*(```|~~~)")
HEADING_RE = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
MAX_BYTES = 2 << 20


def repo_files() -> list[Path]:
    out = []
    stack = [REPO]
    while stack:
        d = stack.pop()
        for p in sorted(d.iterdir()):
            if p.is_dir():
                if p.name not in SKIP_DIRS and not p.is_symlink():
                    stack.append(p)
            elif p.is_file() and p.stat().st_size <= MAX_BYTES:
                out.append(p)
    return sorted(out)


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary (e.g. a checkpoint or an image): nothing to cite


def text_files() -> list[tuple[Path, str]]:
    return [(p, t) for p in repo_files() if (t := read_text(p)) is not None]


def github_anchor(heading: str) -> str:
    """GitHub's heading id: rendered text, lowercased, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images keep their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def markdown_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE_RE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, line


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in markdown_lines(path.read_text(encoding="utf-8")):
        m = HEADING_RE.match(line)
        if not m:
            continue
        base = github_anchor(m.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def test_github_anchor_rules():
    assert github_anchor("S2-Attention") == "s2-attention"
    assert github_anchor("LASP-2 and LASP-2H") == "lasp-2-and-lasp-2h"
    assert github_anchor("S2 block rule (vLLM / Phi-3-small layout)") == "s2-block-rule-vllm--phi-3-small-layout"
    assert github_anchor("`impl` and lse: exact, coarse") == "impl-and-lse-exact-coarse"


def test_no_citation_of_documents_outside_the_repository():
    me = Path(__file__).resolve()
    bad = []
    for path, text in text_files():
        if path == me or path.relative_to(REPO).parts[0] == "docs":
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if OUTSIDE_RE.search(line):
                bad.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not bad, "cite docs/<file>.md#<section> instead of documents outside the repository:\n" + "\n".join(bad)


def test_docs_citations_resolve():
    bad = []
    cache: dict[Path, set[str]] = {}
    found = 0
    for path, text in text_files():
        if path.relative_to(REPO).parts[0] == "docs":
            continue  # docs/ links to itself with relative links (checked below)
        for n, line in enumerate(text.splitlines(), 1):
            for m in CITATION_RE.finditer(line):
                found += 1
                target = REPO / "docs" / m.group(1)
                where = f"{path.relative_to(REPO)}:{n}: docs/{m.group(1)}"
                if not target.is_file():
                    bad.append(f"{where}: no such file")
                    continue
                if m.group(2):
                    if target not in cache:
                        cache[target] = anchors(target)
                    if m.group(2) not in cache[target]:
                        bad.append(f"{where}#{m.group(2)}: no such heading")
    assert found, "no docs/ citation found at all: the scan is broken"
    assert not bad, "citations that do not resolve:\n" + "\n".join(bad)


MARKDOWN = [p for p, _ in text_files() if p.suffix == ".md"]


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_markdown_links_resolve(path):
    bad = []
    for n, line in markdown_lines(path.read_text(encoding="utf-8")):
        line = re.sub(r"`[^`]*`", "", line)  # links inside code spans are not links
        for m in LINK_RE.finditer(line):
            url = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", url, re.I) or url.startswith("//"):
                continue  # http(s), mailto, ...
            file_part, _, anchor = url.partition("#")
            target = (path.parent / file_part).resolve() if file_part else path
            if not target.exists():
                bad.append(f"{n}: {url}: no such file")
            elif anchor and target.suffix == ".md" and anchor not in anchors(target):
                bad.append(f"{n}: {url}: no heading #{anchor} in {target.relative_to(REPO)}")
    assert not bad, f"{path.relative_to(REPO)}:\n" + "\n".join(bad)


def test_docs_index_links_every_document():
    index = (REPO / "docs" / "README.md").read_text(encoding="utf-8")
    for doc in sorted((REPO / "docs").glob("*.md")):
        if doc.name != "README.md":
            assert f"({doc.name}" in index, f"docs/README.md does not link {doc.name}"
