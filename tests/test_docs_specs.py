"""Every complete spec shown in the docs (a code block starting with `attention NAME`, not abbreviated
with `...`, one spec per block) checks and builds: the docs teach the language, so they must not rot."""
import re
from pathlib import Path

import pytest

from attnc.pipeline import compile_text, generate_module

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _specs():
    out = []
    for doc in sorted(DOCS.glob("*.md")):
        for block in re.findall(r"```\n(attention .*?)```", doc.read_text(), re.S):
            if "..." in block or len(re.findall(r"(?:^|\s)attention \w", block)) > 1:
                continue  # abbreviated, or several specs side by side
            out.append(pytest.param(doc.name, block, id=f"{doc.stem}-{block.split()[1]}"))
    return out


SPECS = _specs()


def test_the_docs_show_specs():
    assert len(SPECS) >= 20


@pytest.mark.parametrize("doc,text", SPECS)
def test_doc_spec_checks_and_builds(doc, text):
    generate_module(compile_text(text, doc))
