"""The docs' Markdown tables: every row has its header's columns (a row with more or fewer renders broken)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]


def columns(line: str) -> int:
    line = re.sub(r"`[^`]*`", "code", line).replace("\\|", "")  # pipes inside code spans and escaped ones
    return line.strip().strip("|").count("|") + 1


def tables(text: str):
    """(line number, header columns, [(line number, columns)]) of each table outside code blocks."""
    lines, in_code, found = text.splitlines(), False, []
    for i, line in enumerate(lines):
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("|") or i + 1 >= len(lines):
            continue
        if re.match(r"^\|\s*:?-{3,}", lines[i + 1]) and (i == 0 or not lines[i - 1].startswith("|")):
            rows, j = [], i + 1
            while j < len(lines) and lines[j].startswith("|"):
                rows.append((j + 1, columns(lines[j])))
                j += 1
            found.append((i + 1, columns(line), rows))
    return found


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_table_row_has_the_headers_columns(path):
    for header_line, width, rows in tables(path.read_text(encoding="utf-8")):
        for line, count in rows:
            assert count == width, f"{path.name}:{line} has {count} columns, its header (line {header_line}) {width}"


def test_the_check_sees_a_broken_table():
    assert tables("| a | b |\n| --- | --- | --- |\n| 1 | 2 |\n") == [(1, 2, [(2, 3), (3, 2)])]
