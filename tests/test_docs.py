"""The documentation holds together: README.md stays short, and every relative link and
``#anchor`` in README.md and docs/*.md points at a file and heading that exist."""

from __future__ import annotations

import re
from pathlib import Path

from tests.helpers import ROOT

README_MAX_LINES = 250
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`]+`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """Markdown without fenced code blocks and code spans (links there are not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the text of its links, lowercased, punctuation other
    than '-' and '_' dropped, spaces turned into '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``path`` (repeats get -1, -2, ...)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(paths: list[Path]) -> list[str]:
    """``file: target`` for each relative link whose file or heading does not exist."""
    broken = []
    for path in paths:
        for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{path.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{path.name}: {target} (no such heading)")
    return broken


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"
    )


def test_every_relative_link_and_anchor_resolves() -> None:
    assert not broken_links(doc_files()), "\n".join(broken_links(doc_files()))


def test_every_code_path_named_in_the_docs_exists() -> None:
    """A module or test file named in `backticks` (``pipeline/...``, ``tests/...``,
    ``conf/...``) exists: moving code updates the docs that name it."""
    named = {
        (path.name, span.strip("`"))
        for path in doc_files()
        for span in CODE_SPAN.findall(FENCE.sub("", path.read_text(encoding="utf-8")))
        if re.fullmatch(r"`(pipeline|tests|conf)/[\w./-]*`", span)
    }
    missing = sorted(f"{name}: {target}" for name, target in named if not (ROOT / target).exists())
    assert not missing, "\n".join(missing)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme = prose((ROOT / "README.md").read_text(encoding="utf-8"))
    linked = {target.partition("#")[0] for target in LINK.findall(readme)}
    pages = {f"docs/{path.name}" for path in doc_files()[1:]}
    assert not pages - linked, f"not linked from README.md: {sorted(pages - linked)}"


def test_slugs_follow_github() -> None:
    assert slug("The transformer: `pretrain` and `finetune`") == (
        "the-transformer-pretrain-and-finetune"
    )
    assert slug("Stage `calibrate@<model>` / the_gate (v2)") == "stage-calibratemodel--the_gate-v2"
    assert slug("See [the docs](docs/x.md)") == "see-the-docs"


def test_broken_links_and_anchors_are_found(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Same\n\n## Same\n", encoding="utf-8")
    (tmp_path / "README.md").write_text(
        "# Title\n\n[ok](docs/a.md#a-page) [ok](docs/a.md#same-1) [ok](#title)\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#same-2) [bad](#nope)\n"
        "![img](docs/missing.png) [web](https://example.com/x#y) `[code](docs/c.md)`\n"
        "```\n[fenced](docs/d.md)\n```\n",
        encoding="utf-8",
    )
    assert broken_links(doc_files(tmp_path)) == [
        "README.md: docs/b.md (no such file)",
        "README.md: docs/a.md#same-2 (no such heading)",
        "README.md: #nope (no such heading)",
        "README.md: docs/missing.png (no such file)",
    ]
