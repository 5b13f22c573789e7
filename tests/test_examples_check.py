"""Every catalog entry exists as examples/<name>.attn and checks; mutated examples fail cleanly through the
real CLI (exit 1, file:line:col, never a traceback)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attnc.errors import SpecError
from attnc.pipeline import compile_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CATALOG_MD = ROOT / "docs" / "catalog.md"

CATALOG = [
    "full", "causal", "sliding_window", "prefix_lm", "document", "alibi", "softcap", "streaming_sink", "sink_logit",
    "zerotuning", "moa", "diffqkv",
    "neighborhood_1d", "neighborhood_2d", "dilated_neighborhood_2d", "neighborhood_3d_causal", "maxvit_block",
    "maxvit_grid", "dilated_sliding_window", "radial", "clear",
    "sigmoid", "relu", "softplus", "softplus_reweight", "sink_softmax1", "temperature",
]
TIER_4 = ["linear_elu", "linear_elu_full", "based", "hedgehog", "lightning", "mala"]  # linear attention (chunked)
TIER_5 = ["block_topk"]  # query-aware block sparsity (a select)
TIER_6 = ["retrieval_heads", "entropy_monitor", "h2o_decode"]  # statistics of the weights (stat)


def catalog_names(tiers=(1, 2, 3)) -> list[str]:
    """The first column of the tables of the given tiers of docs/catalog.md (in the repository)."""
    sections = re.split(r"^## ", CATALOG_MD.read_text(), flags=re.M)
    names = []
    for section in sections:
        match = re.match(r"Tier (\d+)", section)
        if match and int(match.group(1)) in tiers:
            names += re.findall(r"^\|\s*`([a-z0-9_]+)`", section, re.M)
    return names


def example_paths() -> list[Path]:
    return sorted(EXAMPLES.glob("*.attn"))


def test_catalog_list_matches_the_catalog():
    assert len(catalog_names()) == 27
    assert sorted(catalog_names()) == sorted(CATALOG)
    assert catalog_names((4,)) == TIER_4
    assert catalog_names((5,)) == TIER_5
    assert catalog_names((6,)) == TIER_6
    assert sorted(catalog_names((1, 2, 3, 4, 5, 6))) == sorted(CATALOG + TIER_4 + TIER_5 + TIER_6)


def test_docs_point_to_the_catalog_in_the_repository():
    for doc in (ROOT / "docs" / "language.md", ROOT / "examples" / "README.md"):
        text = doc.read_text()
        assert "variants.md" not in text, doc
        assert "catalog.md" in text, doc


def test_examples_are_exactly_the_catalog():
    assert sorted(p.stem for p in example_paths()) == sorted(CATALOG + TIER_4 + TIER_5 + TIER_6)


@pytest.mark.parametrize("path", example_paths(), ids=lambda p: p.stem)
def test_example_checks(path):
    try:
        variant = compile_file(path)
    except SpecError as err:
        pytest.fail(err.render())
    assert variant.name == path.stem, "the header's name must match the file name"


# ---- mutated examples through the real CLI ----
def _attnc():
    script = shutil.which("attnc")
    return [script] if script else [sys.executable, "-m", "attnc.cli"]


_STATEMENT = re.compile(r"^\s*(mask|score|probs|let)\b")
_OPERATOR = re.compile(r"(<=|>=|==|!=|<|>|\band\b|\bor\b|\+|-|\*|/|\(|,|=)")


def _mutations(text: str) -> dict[str, str]:
    """Named ways to break a spec, each of which must be an error."""
    lines = text.split("\n")
    code = [line.split("#", 1)[0] for line in lines]  # what the parser sees, comments aside
    header = next(i for i, line in enumerate(code) if line.strip().startswith("attention"))
    body = [i for i, line in enumerate(code) if _STATEMENT.match(line)]
    out = {}

    def with_line(i, new):
        return "\n".join(lines[:i] + [new] + lines[i + 1:])

    # a typo: a built-in name used after a statement keyword gets a stray letter
    for i in body:
        m = re.search(r"\b(kv|q|score|s)\b", code[i][len(code[i].split()[0]) + 1:])
        if m:
            at = len(code[i].split()[0]) + 1 + m.end(1)
            out["typo"] = with_line(i, lines[i][:at] + "z" + lines[i][at:])
            break
    # truncation: right after 'attention', and right after operators (an expression left incomplete)
    offset = lambda i: sum(len(line) + 1 for line in lines[:i])  # noqa: E731
    out["truncated_header"] = text[: offset(header) + code[header].index("attention") + len("attention")]
    cuts = [offset(i) + m.end() for i in body for m in _OPERATOR.finditer(code[i])]
    for n, cut in enumerate(sorted(set(cuts[:1] + cuts[len(cuts) // 2: len(cuts) // 2 + 1] + cuts[-1:]))):
        out[f"truncated_{n}"] = text[:cut]
    out["dangling_operator"] = text.rstrip() + "\n and"
    # junk: a '$' after the keyword of the first statement (or the header)
    target = body[0] if body else header
    word = code[target].split()[0]
    at = code[target].index(word) + len(word)
    out["junk_char"] = with_line(target, lines[target][:at] + " $" + lines[target][at:])
    # a duplicated mask / score / probs statement (or header)
    dup = next((i for i in body if not code[i].lstrip().startswith("let")), header)
    out["duplicated_statement"] = "\n".join(lines[: dup + 1] + [lines[dup]] + lines[dup + 1:])
    return out


MUTATED = [(p, kind) for p in example_paths() for kind in _mutations(p.read_text())]


def test_mutations_are_errors_in_process():
    """The same mutations, in process (fast): each is a SpecError with a location inside the file."""
    for path, kind in MUTATED:
        text = _mutations(path.read_text())[kind]
        try:
            from attnc.pipeline import compile_text

            compile_text(text, str(path))
        except SpecError as err:
            span = err.first.span
            assert span is not None and 1 <= span.line <= text.count("\n") + 1, (path.stem, kind, err.render())
            continue
        pytest.fail(f"{path.stem}/{kind} compiled:\n{text}")


@pytest.mark.skipif(not MUTATED, reason="no examples yet")
def test_mutated_examples_through_the_cli(tmp_path):
    files = []
    for path, kind in MUTATED:
        f = tmp_path / f"{path.stem}__{kind}.attn"
        f.write_text(_mutations(path.read_text())[kind])
        files.append(f)
    # one process for all of them: `attnc check` reports every file and exits 1
    proc = subprocess.run([*_attnc(), "check", *map(str, files)], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    for f in files:
        assert re.search(re.escape(str(f)) + r":\d+:\d+: error: ", proc.stderr), f"no located error for {f.name}"
    assert "ok:" not in proc.stdout


def test_one_mutated_example_alone_exits_1(tmp_path):
    path = EXAMPLES / "sliding_window.attn"
    if not path.exists():
        pytest.skip("examples/sliding_window.attn not written yet")
    f = tmp_path / "sliding_window.attn"
    f.write_text("windw".join(path.read_text().rsplit("window", 1)))  # the last use of the parameter
    proc = subprocess.run([*_attnc(), "check", str(f)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stdout
    assert re.search(re.escape(str(f)) + r":\d+:\d+: error: unknown name 'windw'", proc.stderr)
    assert "hint: did you mean 'window'?" in proc.stderr
    assert "Traceback" not in proc.stderr
