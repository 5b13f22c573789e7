"""Generated code is part of the product: snapshots of eight modules (one per tile walk and family, and the statistics, so
every code-generation change shows its effect in review), a lint check of every example's module, and
the kernel skeleton's invariants read from the generated source.

Refresh the snapshots after an intended change with:  ATTNC_UPDATE_SNAPSHOTS=1 pytest tests/test_generated_code.py
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from attnc.analysis.walks import AllTiles, BandTiles, ListTiles
from attnc.pipeline import analyse, compile_text, generate_module

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SNAPSHOTS = Path(__file__).resolve().parent / "snapshots"
# specs written here, not examples: what the catalog does not show
INLINE = {
    # learnable reads per (query, key) pair (a table: dQ's pair buffer, a scatter-sum on the host) and
    # per key (summed by dK/dV), with a feature-vector dot
    "trained_biases": "attention trained_biases\nconst R = 8, F = 16\ninput rel: float[Hq, 2 * R + 1] learnable\n"
                      "input kb: float[B, Lk] learnable\ninput qr: float[B, Hq, Lq, F]\ninput kr: float[B, Lk, F]\n"
                      "mask kv <= q\nscore s + rel[h, q - kv + R] + kb[b, kv] + 0.1 * dot(qr[b, h, q], kr[b, kv])\n",
    # statistics of the weights: the softmax forward's row statistics, the key-major pass, the entropy's
    # gradient and decode's statistics; and the general family's two statistics passes
    "softmax_stats": "attention softmax_stats\nmask kv <= q\nstat received = sum_q(P)\nstat peak = max_q(P)\n"
                     "stat entropy = entropy(P)\nstat top = max_kv(P)\nstat keys = visible\n",
    "softplus_stats": "attention softplus_stats\nmask kv <= q\nprobs softplus(score) / rowsum(softplus(score))\n"
                      "stat received = sum_q(P)\nstat entropy = entropy(P)\n",
}
# one spec per walk and family: band (causal), learnable per-head input (alibi), plan lists
# (document), no mask (full), the general family with two passes (softplus_reweight), and the
# gradients of learnable reads per pair and per key (trained_biases), the statistics of the weights
# in either family (softmax_stats, softplus_stats)
SNAPSHOT_SPECS = ["causal", "alibi", "document", "full", "softplus_reweight", "trained_biases", "softmax_stats",
                  "softplus_stats"]


def _source(name: str) -> str:
    if name in INLINE:
        return generate_module(compile_text(INLINE[name], f"{name}.attn"))
    path = EXAMPLES / f"{name}.attn"
    return generate_module(compile_text(path.read_text(), f"examples/{name}.attn"))


@pytest.mark.parametrize("name", SNAPSHOT_SPECS)
def test_generated_module_matches_its_snapshot(name):
    got = _source(name)
    snapshot = SNAPSHOTS / f"{name}.py.snap"
    if os.environ.get("ATTNC_UPDATE_SNAPSHOTS"):
        snapshot.write_text(got)
    want = snapshot.read_text()
    if got != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True), "snapshot", "generated", n=2))
        pytest.fail(f"{name}: the generated module differs from tests/snapshots/{name}.py.snap "
                    f"(refresh with ATTNC_UPDATE_SNAPSHOTS=1 if intended):\n{diff[:6000]}")


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_every_generated_module_is_lint_clean(tmp_path):
    """ruff's default rules, outside any project configuration (as in a user's gen/ folder)."""
    for name in [path.stem for path in sorted(EXAMPLES.glob("*.attn"))] + list(INLINE):
        (tmp_path / f"{name}.py").write_text(_source(name))
    run = subprocess.run(["ruff", "check", "--isolated", "--output-format", "concise", "."],
                         cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def _kernel(source: str, name: str) -> str:
    """The text of one generated function, from its def to the next top-level statement."""
    start = source.index(f"\ndef {name}(")
    end = re.search(r"\n(?=[^\s)])", source[start + 1:])
    return source[start: start + 1 + end.start()] if end else source[start:]


def _loops(body: str) -> list[str]:
    """Each `for start_n/start_m in ...:` loop body of a kernel (the lines indented under it)."""
    lines, loops = body.splitlines(), []
    for i, line in enumerate(lines):
        if re.match(r"\s*for start_[mn] in range", line):
            indent = len(line) - len(line.lstrip())
            block = []
            for nxt in lines[i + 1:]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                block.append(nxt)
            loops.append("\n".join(block))
    return loops


@pytest.mark.parametrize("name", ["causal", "sliding_window", "prefix_lm", "streaming_sink", "alibi", "diffqkv",
                                  "document", "neighborhood_2d", "softplus", "softplus_reweight", "full"])
def test_tile_loops_are_branch_free_and_masks_only_partial(name):
    """The property that lets Triton pipeline the K/V loads: every tile loop's body is one tile call with
    a constant APPLY_MASK (no `if` around the loads), and FULL and PARTIAL tiles have loops of their own."""
    source = _source(name)
    for kernel in ("_fwd", "_bwd_dq", "_bwd_dkdv"):
        loops = _loops(_kernel(source, kernel))
        assert loops, f"{kernel} has no tile loop"
        flags = set()
        for body in loops:
            assert not re.search(r"^\s*(if|elif|else)\b", body, re.M), f"{kernel}: a branch inside a tile loop:\n{body}"
            calls = re.findall(r"^\s*[\w, ]+ = (_\w+_tile)\(", body, re.M)
            assert len(calls) == 1, f"{kernel}: expected one tile call per loop body:\n{body}"
            flag = re.search(r"\b(True|False), (BLOCK_M, )?BLOCK_N", body)
            assert flag, body
            flags.add(flag.group(1))
        if name != "full" or kernel != "_bwd_dkdv":  # without a mask, dK/dV has only FULL tiles
            assert flags == {"True", "False"}, f"{kernel}: FULL and PARTIAL tiles need loops of their own"


def test_walks_follow_the_mask():
    walks = {name: type(analyse(compile_text((EXAMPLES / f"{name}.attn").read_text())).walk)
             for name in ("full", "causal", "sliding_window", "alibi", "document", "prefix_lm", "neighborhood_2d")}
    assert walks == {"full": AllTiles, "causal": BandTiles, "sliding_window": BandTiles, "alibi": BandTiles,
                     "document": ListTiles, "prefix_lm": ListTiles, "neighborhood_2d": ListTiles}


def test_offsets_are_int64_and_softmax_uses_exp2():
    source = _source("causal")
    assert "off_b = (pid_bh // Hq).to(tl.int64)" in source
    assert "rows = pid_bh.to(tl.int64) * Lq + offs_m" in source
    assert "tl.exp(" not in _kernel(source, "_fwd_tile") and "tl.exp2(score - m_ref[:, None])" in source
    # the plain score folds log2(e) into the scale; a transformed one is multiplied once
    assert "score = tl.dot(q, kT) * (scale * LOG2E)" in source
    assert "* LOG2E" in _kernel(_source("softcap"), "_fwd_tile")


def test_literals_are_python_reprs():
    """A spec text with quotes and backslashes survives as a Python literal (no JSON spelling)."""
    text = 'attention quoted\n# it\'s "quoted" \\ here, true and false\nmask kv <= q\n'
    source = generate_module(compile_text(text, "quoted.attn"))
    namespace: dict = {}
    spec_block = source[source.index("SPEC = ("): source.index("SIGNATURE =")]
    exec(spec_block, namespace)  # noqa: S102 - the block is a tuple of string literals
    assert "".join(namespace["SPEC"]) == text
    module = compile(source, "quoted.py", "exec")  # warnings (an invalid escape) would be errors here
    docstring = module.co_consts[0]
    assert "it's \"quoted\" \\ here" in docstring
