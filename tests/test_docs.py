"""The documentation's cross-references resolve: relative links in the Markdown files point at files
and headings that exist, and the code's citations of the performance log name entries it has."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "cluster" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", md.read_text(), re.M)}


def relative_links(md: Path) -> list[str]:
    links = re.findall(r"\]\(([^)\s]+)\)", md.read_text())
    return [link for link in links if not re.match(r"[a-z]+://|mailto:", link)]


def test_slug_follows_githubs_rule():
    assert slug("Results on real images") == "results-on-real-images"
    assert slug("Entry 15 (2026-12-03): two fixed waits in Ray Data's scheduler") == (
        "entry-15-2026-12-03-two-fixed-waits-in-ray-datas-scheduler")


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md):
    broken = []
    for link in relative_links(md):
        path, _, anchor = link.partition("#")
        target = (md.parent / path).resolve() if path else md
        if not target.exists():
            broken.append(f"{link}: no file {target}")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link}: no heading with anchor #{anchor} in {target.name}")
    assert not broken, f"{md.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_the_readme_is_short_and_dateless():
    """The README is for users (12 kB at most); measurements and their dates live in docs/."""
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 12 * 1024, len(text.encode())
    assert not re.search(r"20\d\d-\d\d-\d\d(?!-)", text.replace("20261207-101500", "")), \
        "a date in the README"
    assert "python jobs/train.py" in text and "pip install -e '.[test]' && python -m pytest" in text


def test_code_carries_no_measurement_history():
    """Comments say why, briefly; dates, log entries and sessions belong in docs/."""
    pattern = re.compile(r"entry \d+|20\d\d-\d\d-\d\d|\b\w+(st|nd|rd|th) session|performance-log",
                         re.I)
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
             for p in [*ROOT.glob("raypipe/**/*.py"), *ROOT.glob("raypipe/configs/*.yaml"),
                       *ROOT.glob("jobs/*.py")]
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "\n".join(found)
