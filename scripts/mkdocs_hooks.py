"""mkdocs hooks (mkdocs.yml ``hooks:``): the measured results of ``benchmarks/results/`` as pages of the site.

The guides link a result as ``../benchmarks/results/NAME.md``, which works where the repository is read as
files; the site has no page outside ``docs/``. These hooks add every ``benchmarks/results/*.md`` as the page
``results/NAME.md`` and point those links at it. A link to a result that does not exist is left alone, so
the strict build still fails on it.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
LINK = re.compile(r"\]\(\.\./benchmarks/results/([^)#\s]+\.md)")


def on_files(files, config):
    for path in sorted(RESULTS.glob("*.md")):
        page = File.generated(config, f"results/{path.name}", abs_src_path=str(path))
        page.inclusion = InclusionLevel.NOT_IN_NAV  # reached from the guides' links
        files.append(page)
    return files


def on_page_markdown(markdown, page, config, files):
    def relink(match):
        name = match.group(1)
        if not (RESULTS / name).is_file():
            return match.group(0)
        depth = page.file.src_uri.count("/")
        return "](" + "../" * depth + f"results/{name}"

    return LINK.sub(relink, markdown)
