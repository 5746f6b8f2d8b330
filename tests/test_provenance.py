"""README.md and the prose of docs/*.md carry no run provenance (issue 33: results apart from prose).

Dates, clock times in UTC, commit hashes, machine descriptions ("VM", "2-core", CPU models, load averages)
and measured wall times ("1 min 34 s") belong with the measured results in ``benchmarks/results/*.md``,
each beside its conditions; the prose cites a result in one line and links it. Fenced code blocks are not
prose (a command's printed output may hold a timestamp) and are left out; inline code is prose.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import List

import pytest
from _doc_blocks import ROOT, doc_files
from sybil import Document
from sybil.parsers.markdown.lexers import FencedCodeBlockLexer

MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
PROVENANCE = {
    "a date": re.compile(rf"\b(19|20)\d\d-[01]\d\b|\b({MONTHS}) (\d{{1,2}}, )?(19|20)\d\d\b"),
    "a clock time": re.compile(r"\bUTC\b|\b[0-2]\d:[0-5]\d[–-][0-2]\d:[0-5]\d\b"),
    "a machine description": re.compile(
        r"\bVMs?\b|(?i:\bthis (machine|computer|host|box)\b|\b(project|development|shared) machine\b"
        r"|\b\d+-core\b|\bXeon\b|\bEPYC\b|\blscpu\b|\bload average\b)"
    ),
    "a measured run time": re.compile(r"\b\d+ min \d+ s\b"),
    # 7 to 40 hex digits with a digit and a letter in them: what `git log --oneline` prints
    "a commit hash": re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b"),
}


def prose_lines(path: Path) -> List[str]:
    """The file's lines with every fenced code block blanked (line numbers kept)."""
    text = path.read_text(encoding="utf-8")
    document = Document(text, str(path))
    chars = list(text)
    for region in FencedCodeBlockLexer(r"[\w+-]*")(document):
        for i in range(region.start, region.end):
            if chars[i] != "\n":
                chars[i] = " "
    return "".join(chars).splitlines()


def provenance(path: Path) -> List[str]:
    """``file:line: what (the text)`` for every line of prose that records how or when something ran."""
    found = []
    for number, line in enumerate(prose_lines(path), start=1):
        for what, pattern in PROVENANCE.items():
            match = pattern.search(line)
            if match:
                found.append(f"{path.relative_to(ROOT)}:{number}: {what} ({match.group(0)!r})")
    return found


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_provenance_in_prose(path):
    found = provenance(path)
    assert not found, (
        "run provenance in the prose; move it with its result to benchmarks/results/*.md and cite "
        "the result in one line:\n" + "\n".join(found)
    )


@pytest.mark.parametrize(
    "line",
    [
        "Measured 2026-11-30 on the idle VM.",
        "at 10:15 UTC",
        "commit c8816d2 fixed it",
        "a 2-core machine",
        "(Intel Xeon, load average 2)",
        "the suite took 16 min 16 s",
        "in November 2026",
        "this machine's speed",
        "ran 07:20–08:35 here",
    ],
)
def test_each_kind_of_provenance_is_found(tmp_path, monkeypatch, line):
    page = tmp_path / "page.md"
    page.write_text(f"# Page\n\n```python\nx = 'c8816d2 2026-11-30'\n```\n\n{line}\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert [f.split(":")[1] for f in provenance(page)][:1] == ["7"]


def test_code_blocks_and_plain_prose_are_not_provenance(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n```text\nworkdir runs/digits-20261130-101609, commit c8816d2\n```\n\n"
        "ODConv (ICLR 2022) in float64, 1e-13 apart; 2 workers; conv2d kernels; a 16 GiB GPU.\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert provenance(page) == []
