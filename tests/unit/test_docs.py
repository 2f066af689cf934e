"""Every relative link in README.md and docs/ points to a file (and heading) that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"```.*?```", re.S)


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, '-' for spaces."""
    titles = re.findall(r"^#+ (.*)$", path.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-") for title in titles}


def broken_links(path: Path) -> list[str]:
    """The relative links of one Markdown file whose target or anchor is missing."""
    broken = []
    for link in LINK.findall(FENCE.sub("", path.read_text())):
        if link.startswith(("http://", "https://", "mailto:")):
            continue
        target, _, anchor = link.partition("#")
        destination = (path.parent / target).resolve() if target else path
        if not destination.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and destination.is_file() and anchor not in heading_anchors(destination):
            broken.append(f"{link} (no such heading)")
    return broken


def test_heading_anchors_follow_github():
    assert heading_anchors(ROOT / "docs" / "reference" / "config.md") >= {"meta-metacfg", "modelvision-visioncfg"}


def test_every_relative_link_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    assert len(pages) > 10
    broken = {str(page.relative_to(ROOT)): links for page in pages if (links := broken_links(page))}
    assert not broken, broken


def test_the_docs_tree_is_split_into_guide_reference_and_lab():
    docs = ROOT / "docs"
    assert sorted(p.name for p in docs.iterdir() if p.is_dir()) == ["guide", "lab", "reference"]
    assert not [p.name for p in docs.glob("*.md") if p.name != "README.md"]
    for note in (docs / "lab").glob("*.md"):
        if note.name != "README.md":
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-[a-z0-9.-]+\.md", note.name), note.name
            assert note.name in (docs / "lab" / "README.md").read_text(), f"{note.name} is not in lab/README.md"
