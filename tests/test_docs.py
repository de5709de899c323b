"""The documentation's links: every relative link of the hand-written pages (the README,
``docs/*.md``, the READMEs of the result folders) names a file of the repository, and every
``#anchor`` a heading of the page it points into (GitHub's slugs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "results" / "README.md",
    *sorted((ROOT / "bench" / "results").glob("*/README.md")),
]

_LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces turned to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a Markdown page (repeats get GitHub's ``-1``, ``-2`` suffixes)."""
    seen: dict[str, int] = {}
    out = set()
    for line in _FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    """The link targets of a page's prose (code blocks and inline code left out)."""
    text = _CODE.sub("", _FENCE.sub("", page.read_text(encoding="utf-8")))
    return [m.group(1) for m in _LINK.finditer(text)]


def test_slug_follows_github():
    assert slug("Losses (MATH.md sections 1-5)") == "losses-mathmd-sections-1-5"
    assert slug("With post-hoc temperature scaling (`--calibrate`)") == (
        "with-post-hoc-temperature-scaling---calibrate"
    )
    assert slug("DeepLoc (the paper's protein task, two real teachers)") == (
        "deeploc-the-papers-protein-task-two-real-teachers"
    )


def test_link_extraction_skips_code():
    page = ROOT / "README.md"
    assert all(not t.startswith("`") for t in links(page))
    assert links(page), "the README has links"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_relative_to(ROOT):
            broken.append(f"{target} (outside the repository)")
            continue
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(ROOT)})")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)
