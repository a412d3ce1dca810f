"""The documentation as a reader meets it: a short front door, links that resolve, no narrated history."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "recipes").rglob("*.md")])
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_readme_is_a_front_door() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the rest belongs in docs/ or beside a recipe"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    missing = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_describe_the_present(page: Path) -> None:
    text = page.read_text()
    history = re.findall(r"(?:\bissue #?\d+|\bprevious implementation|\bseen once|\bonce in CI|\bno GPU was lent|\{\{MEASURE)[^\n]{0,40}",
                         text, flags=re.IGNORECASE)
    assert not history, f"{page.relative_to(ROOT)}: {history}"


def test_code_comments_describe_the_present() -> None:
    files = [p for d in ("gsoft", "kernels", "recipes", "tests", "configs") for p in sorted((ROOT / d).rglob("*"))
             if p.suffix in (".py", ".yaml", ".sh", ".cu") and p != Path(__file__)]
    history = re.compile(r"\b(?:issue #?\d+|previous implementation|seen once|once in CI|no GPU was lent)", re.IGNORECASE)
    bad = [f"{p.relative_to(ROOT)}:{n}" for p in files for n, line in enumerate(p.read_text().splitlines(), 1)
           if history.search(line)]
    assert not bad, f"comments that narrate history instead of describing the code: {bad}"
