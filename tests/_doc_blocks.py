"""The fenced code blocks of README.md and docs/*.md as runnable units (tests/test_docs.py runs them).

Why this collector: the fences and the HTML-comment directives are read with Sybil's Markdown
lexers (``sybil.parsers.markdown.lexers``: fences inside list items and quotes, their line numbers,
comments a reader never sees), while grouping and running are ours: Sybil's own pytest items share one
namespace per page and are split over xdist workers like any test (scripts/test.sh runs ``-n 2``), so
a chain of blocks could run on two processes. Here one pytest test is one chain, run from its first
block in a fresh namespace and a fresh folder. pytest's ``--doctest-glob`` reads ``>>>`` prompts only,
not fenced blocks, so it could run neither the Markdown code as written nor its shell commands.

Directives (one HTML comment each, on the lines just before the fence; several may stand together)::

    <!-- docs: continue -->            this block runs after the previous block of the page, in its
                                       namespace and folder (an explicit chain; nothing else is shared)
    <!-- docs: skip REASON -->         documented, not run; REASON is printed with the skip
    <!-- docs: needs FILE[, FILE] -->  the test makes these files (tests/_shared_files.py)
    <!-- docs: slow -->                the chain is a @pytest.mark.slow test
    <!-- docs: script -->              python: run as a script in a fresh interpreter (what a user does
                                       with a saved file), not in the test process

Languages: ``python`` runs in the test process (or as a script), ``bash`` runs with ``bash -e``,
``console`` runs each ``$ command`` and compares the lines after it with doctest's ``...`` ellipsis;
``text`` (output, file contents) is not run. A fence without one of these languages is an error.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import List, Optional, Tuple

from sybil import Document
from sybil.parsers.markdown.lexers import DirectiveInHTMLCommentLexer, FencedCodeBlockLexer

ROOT = Path(__file__).resolve().parent.parent
RUN_LANGUAGES = ("python", "bash", "console")
LANGUAGES = RUN_LANGUAGES + ("text",)


def doc_files() -> List[Path]:
    """README.md, CONTRIBUTING.md and every page of docs/, in a fixed order."""
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md"] + sorted((ROOT / "docs").glob("*.md"))


@dataclasses.dataclass
class Block:
    path: Path
    line: int  # line of the opening fence (1-based)
    language: str
    source: str
    source_line: int  # line of the first source line
    chained: bool = False
    skip: Optional[str] = None
    needs: Tuple[str, ...] = ()
    slow: bool = False
    script: bool = False

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


@dataclasses.dataclass
class Chain:
    blocks: List[Block]

    @property
    def id(self) -> str:
        return self.blocks[0].where

    @property
    def skip(self) -> Optional[str]:
        reasons = [b.skip for b in self.blocks if b.skip]
        return f"{self.blocks[0].where}: {reasons[0]}" if reasons else None

    @property
    def slow(self) -> bool:
        return any(b.slow for b in self.blocks)

    @property
    def needs(self) -> Tuple[str, ...]:
        return tuple(dict.fromkeys(n for b in self.blocks for n in b.needs))


class DirectiveError(ValueError):
    """A malformed ``<!-- docs: ... -->`` comment or a fence without a known language."""


def _apply(block: Block, arguments: str, where: str) -> None:
    word, _, rest = arguments.strip().partition(" ")
    rest = rest.strip()
    if word == "continue" and not rest:
        block.chained = True
    elif word == "slow" and not rest:
        block.slow = True
    elif word == "script" and not rest:
        block.script = True
    elif word == "skip" and rest:
        block.skip = rest
    elif word == "needs" and rest:
        block.needs += tuple(n.strip() for n in rest.split(",") if n.strip())
    else:
        raise DirectiveError(
            f"{where}: unknown directive <!-- docs: {arguments.strip()} --> "
            "(expected continue, slow, script, skip REASON or needs FILE, ...)"
        )


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def parse(path: Path) -> List[Block]:
    """The fenced blocks of one Markdown file with the directives written just before each."""
    document = Document(path.read_text(encoding="utf-8"), str(path))
    text = document.text
    fences = list(FencedCodeBlockLexer(r"[\w+-]*")(document))
    directives = list(DirectiveInHTMLCommentLexer("docs")(document))
    blocks, pending, d = [], [], 0
    for region in fences:
        while d < len(directives) and directives[d].start < region.start:
            pending.append(directives[d])
            d += 1
        language = region.lexemes["language"]
        line = _line(text, region.start)
        where = f"{path.relative_to(ROOT)}:{line}"
        if language not in LANGUAGES:
            raise DirectiveError(
                f"{where}: fence language {language!r}; give every fence one of "
                f"{', '.join(LANGUAGES)} (text: shown, not run)"
            )
        source = region.lexemes["source"]
        block = Block(path, line, language, str(source), _line(text, region.start + source.offset))
        for directive in pending:
            between = re.sub(r"^\s*--+>", "", text[directive.end : region.start])  # the region ends before -->
            if between.strip() and not re.fullmatch(r"(\s*<!--.*?-->\s*)*", between, re.S):
                raise DirectiveError(
                    f"{path.relative_to(ROOT)}:{_line(text, directive.start)}: a "
                    "<!-- docs: ... --> directive must stand just before a fence"
                )
            _apply(block, directive.lexemes["arguments"], where)
        pending = []
        if block.language == "text" and (block.chained or block.skip or block.needs or block.slow):
            raise DirectiveError(f"{where}: a text block is never run; it takes no directive")
        blocks.append(block)
    if pending:
        raise DirectiveError(
            f"{path.relative_to(ROOT)}:{_line(text, pending[0].start)}: "
            "a <!-- docs: ... --> directive after the last fence"
        )
    return blocks


def chains(blocks: List[Block]) -> List[Chain]:
    """Group the runnable blocks: a block marked ``continue`` joins the chain of the block before it."""
    out: List[Chain] = []
    for block in blocks:
        if block.language not in RUN_LANGUAGES:
            continue
        if block.chained:
            if not out or out[-1].blocks[0].path != block.path:
                raise DirectiveError(f"{block.where}: <!-- docs: continue --> with no runnable block before it")
            out[-1].blocks.append(block)
        else:
            out.append(Chain([block]))
    return out


def all_chains() -> List[Chain]:
    return [chain for path in doc_files() for chain in chains(parse(path))]
