"""Property tests: whatever text goes in, the front end answers with a Variant or a SpecError.

(a) random text over the language's alphabet and keywords; (b) mutations of valid specs (characters,
tokens and lines deleted, inserted, duplicated or swapped; truncation). Every SpecError must carry spans
inside the source (or None for whole-file problems) and render without exceptions.
"""

from __future__ import annotations

import os
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnc import ir
from attnc.errors import SpecError
from attnc.pipeline import compile_text

PER_EXAMPLE_SECONDS = 5.0  # one spec is a few lines; anything slower is a hang worth reporting

VALID = [
    "attention causal\nmask kv <= q\n",
    "attention sliding_window\nparam window = 256\nmask kv <= q and q - kv < window\n",
    "attention document\ninput doc_ids: int[B, L]\nmask doc_ids[b, q] == doc_ids[b, kv] and kv <= q\n",
    "attention alibi\ninput slopes: float[Hq] learnable\nmask kv <= q\nscore s - slopes[h] * (q - kv)\n",
    "attention softcap\nparam cap = 50.0\nmask kv <= q\nscore cap * tanh(s / cap)\n",
    """attention neighborhood_2d
heads q = Hq, k = Hk, v = Hv   # defaults
const Y = 16, X = 16, KY = 7, KX = 7
let (qy, qx) = unravel(q, Y, X)
let (ky, kx) = unravel(kv, Y, X)
let cy = clamp(qy, KY // 2, Y - 1 - KY // 2)
let cx = clamp(qx, KX // 2, X - 1 - KX // 2)
mask abs(cy - ky) <= KY // 2 and abs(cx - kx) <= KX // 2
probs softmax(score)
""",
    """attention softplus_reweight
param p = 3.0, tau = 1.0
mask kv <= q
let A = softplus(log(visible) * score) / rowsum(softplus(log(visible) * score))
let R = relu(visible * A - tau) ** p
probs R / rowsum(R) if rowsum(R) > 0 else A
""",
    "attention sink_softmax1\nmask kv <= q\nprobs exp(score) / (1 + rowsum(exp(score)))\n",
    "attention sink_logit\ninput sink: float[Hq] learnable\nmask kv <= q\nprobs softmax(score, sink=sink[h])\n",
    "attention radial\nconst F = 8, T = 64\nlet d = abs(q // T - kv // T)\n"
    "let w = T if d <= 1 else T >> floor(log2(d))\nmask kv // T == 0 or abs(q % T - kv % T) <= w\n",
    "attention sigmoid\nparam bias: float = 0 - log(Lk)\nmask kv <= q\nprobs sigmoid(score + bias)\n",
    "attention rel_bias\nconst R = 4\ninput rel: float[Hq, 2 * R + 1]\nmask kv <= q\nscore s + rel[h, q - kv + R]\n",
    """attention t5
const NB = 8, E = 2
input t5: float[Hq, NB]
let mag(d) = abs(d) if abs(d) < E else min(E + floor(log2(max(abs(d) // E, 1))), NB // 2 - 1)
let bucket(d) = mag(d) + (NB // 2 if d > 0 else 0)
score s + t5[h, bucket(q - kv)]
""",
    """attention doc_offsets
const NDOC = 4, Y = 2, X = 4
input doc: int[B, L]
input start: int[NDOC]
let coord(i) = unravel(i, Y, X)
let (qy, qx) = coord(q)
let (ky, kx) = coord(kv)
mask doc[b, q] == doc[b, kv] and kv >= start[doc[b, q]] and abs(qx - kx) <= 2
""",
]

KEYWORDS = ["f(x)", "f(q)", "rel[h, q - kv]", "[NB]", "attention", "heads", "param", "const", "input", "let", "mask", "score", "probs", "learnable",
            "int", "float", "bool", "and", "or", "not", "if", "else", "true", "false", "unravel", "softmax",
            "rowsum", "rowmax", "visible", "exp", "log", "clamp", "abs", "min", "max", "sink", "q", "kv", "s",
            "b", "h", "Hq", "Lq", "Lk", "B", "L", "x", "_x", "lambda", "__import__"]
PUNCT = list("()[],=:+-*/%<>#.\n \t'\"$@;\\{}") + ["//", "**", ">>", "<=", ">=", "==", "!=", "\r\n", "\x00", "é",
                                                  "\u2028", "\x0c"]
TOKENS = KEYWORDS + PUNCT + ["0", "1", "2.5", "1e3", "1e999", ".5", "7"]


def _within(source: str, span) -> bool:
    lines = source.split("\n")
    if not 1 <= span.line <= len(lines) + 1:
        return False
    return 1 <= span.column <= len(lines[span.line - 1] if span.line <= len(lines) else "") + 2


def front_end(source: str):
    start = time.perf_counter()
    try:
        result = compile_text(source, "fuzz.attn")
    except SpecError as err:
        assert err.diagnostics, "a SpecError without diagnostics"
        for d in err.diagnostics:
            assert isinstance(d.message, str) and d.message
            if d.span is not None:
                assert _within(source, d.span), (d, source)
        text = err.render()
        assert "fuzz.attn" in text
        result = err
    else:
        assert isinstance(result, ir.Variant)
    elapsed = time.perf_counter() - start
    assert elapsed < PER_EXAMPLE_SECONDS, f"{elapsed:.1f}s for {source!r}"
    return result


# ATTNC_FUZZ_EXAMPLES=20000 runs a long, random (not derandomized) search instead of the quick fixed one
_LONG = int(os.environ.get("ATTNC_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_LONG or 150, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=not _LONG)


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=40).map(" ".join))
def test_random_tokens(source):
    front_end(source)


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=40).map(lambda ts: "attention t\n" + " ".join(ts)))
def test_random_tokens_after_a_header(source):
    front_end(source)


@FUZZ
@given(st.text(alphabet=st.sampled_from(sorted(set("".join(TOKENS)))), max_size=80))
def test_random_characters(source):
    front_end("attention t\n" + source)


# ---- mutations of valid specs ----
def _tokens(source):
    import re

    return re.findall(r"\w+|\s+|//|\*\*|>>|<=|>=|==|!=|.", source)


@st.composite
def mutated(draw):
    source = draw(st.sampled_from(VALID))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["del_char", "ins_char", "dup_char", "swap_chars", "del_token", "dup_token",
                                     "swap_tokens", "ins_token", "replace_token", "del_line", "dup_line",
                                     "swap_lines", "truncate"]))
        if not source:
            break
        if kind.endswith("char") or kind == "swap_chars" or kind == "truncate":
            i = draw(st.integers(0, len(source) - 1))
            j = draw(st.integers(0, len(source) - 1))
            if kind == "del_char":
                source = source[:i] + source[i + 1:]
            elif kind == "ins_char":
                source = source[:i] + draw(st.sampled_from(PUNCT + list("aqkz09"))) + source[i:]
            elif kind == "dup_char":
                source = source[:i] + source[i] + source[i:]
            elif kind == "swap_chars":
                chars = list(source)
                chars[i], chars[j] = chars[j], chars[i]
                source = "".join(chars)
            else:
                source = source[:i]
        elif kind.endswith("token") or kind == "swap_tokens":
            toks = _tokens(source)
            i = draw(st.integers(0, len(toks) - 1))
            j = draw(st.integers(0, len(toks) - 1))
            if kind == "del_token":
                del toks[i]
            elif kind == "dup_token":
                toks.insert(i, toks[i])
            elif kind == "swap_tokens":
                toks[i], toks[j] = toks[j], toks[i]
            elif kind == "ins_token":
                toks.insert(i, " " + draw(st.sampled_from(TOKENS)) + " ")
            else:
                toks[i] = draw(st.sampled_from(TOKENS))
            source = "".join(toks)
        else:
            lines = source.split("\n")
            i = draw(st.integers(0, len(lines) - 1))
            j = draw(st.integers(0, len(lines) - 1))
            if kind == "del_line":
                del lines[i]
            elif kind == "dup_line":
                lines.insert(i, lines[i])
            else:
                lines[i], lines[j] = lines[j], lines[i]
            source = "\n".join(lines)
    return source


def test_valid_specs_compile():
    for source in VALID:
        assert isinstance(front_end(source), ir.Variant), source


@settings(FUZZ, max_examples=_LONG or 300)
@given(mutated())
def test_mutated_specs(source):
    front_end(source)


# ---- everything that checks, builds ----
def build_and_run(source: str, tmp_path) -> bool:
    """A spec `attnc check` accepts must build, and its mask, plan and reference run at B=2, Hq=2
    (False when check refuses it)."""
    import torch

    import attnc
    from attnc import verify

    try:
        variant = compile_text(source, "fuzz.attn")
    except SpecError:
        return False
    path = tmp_path / "fuzz.attn"
    path.write_text(source)
    fn = attnc.load(path)
    L = verify._fixed_length(variant) or 12
    hq, hk, hv = verify._heads(variant, 2, 2, 2)
    inputs = verify.random_inputs(variant, verify.Case(2, hq, hk, hv, L, L, 8, 8), torch.Generator().manual_seed(0))
    heads = {"Hq": hq, "Hk": hk, "Hv": hv}
    mask = fn.mask(Lq=L, Lk=L, B=2, **heads, **inputs)
    plan = fn.plan(Lq=L, Lk=L, B=2, **heads, block_m=4, block_n=4, **inputs)
    dense = torch.broadcast_to(plan.to_dense(), (2, hq, -(-L // 4), -(-L // 4)))
    tiles = torch.broadcast_to(mask, (2, hq, L, L))
    tiles = torch.nn.functional.pad(tiles, (0, -L % 4, 0, -L % 4))
    visible = tiles.reshape(2, hq, -(-L // 4), 4, -(-L // 4), 4).any(-1).any(-2)
    assert (visible <= (dense > 0)).all(), f"a tile with visible pairs is EMPTY in the plan of {source!r}"
    q, k, v = (torch.randn(2, n, L, 8, dtype=torch.float64) for n in (hq, hk, hv))
    out = fn.reference(q, k, v, **inputs)
    assert out.shape == (2, hq, L, 8)
    return True


BUILD = settings(FUZZ, max_examples=_LONG or 150)


def test_every_valid_spec_builds_and_runs(tmp_path):
    for source in VALID:
        assert build_and_run(source, tmp_path), source


# specs the build fuzzer found: each passed check, then failed to build or run
FOUND = [
    "attention t\n#   heads \x00 comment\nmask kv <= q\n",  # a NUL in a comment broke the module's docstring
    "attention t\nmask abs(q >>- kv) <= 3\n",  # a negative shift count
    "attention t\nconst T = 4\nmask kv // T == 0 or q //   - kv // T < 2\n",  # a divisor that is 0 at run time
    "attention t\nmask q % (2 - kv) < 1\n",
    "attention t\ninput slopes: float[Hq] learnable\nmask kv <= q\nscore s - s\n",  # a constant score
]


def test_specs_the_fuzzer_found_build_and_run(tmp_path):
    for source in FOUND:
        assert build_and_run(source, tmp_path), source


@BUILD
@given(mutated())
def test_mutated_specs_that_check_build_and_run(tmp_path_factory, source):
    build_and_run(source, tmp_path_factory.mktemp("fuzz"))


@BUILD
@given(st.lists(st.sampled_from(TOKENS), max_size=40).map(lambda ts: "attention t\n" + " ".join(ts)))
def test_random_specs_that_check_build_and_run(tmp_path_factory, source):
    build_and_run(source, tmp_path_factory.mktemp("fuzz"))
