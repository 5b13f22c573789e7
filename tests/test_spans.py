"""Spans survive lowering: the IR keeps where each statement was written (ir.Variant.spans), so an
error found after the check points at file:line:col of the statement it is about, with no search of
the source text. The feature-map error of pipeline.choose_algorithm is the case in point: the
statement factorize says it failed on (a typed field, not words in its reason) is where it points."""

from __future__ import annotations

import pytest

from attnc import ir
from attnc.analysis import factorize
from attnc.errors import SpecError
from attnc.pipeline import analyse, compile_text

FEATURE = "feature phi(x) = elu(x) + 1\n"
WEIGHT = "let a = dot(phi(q), phi(k))\nprobs a / rowsum(a)\n"

CASES = {
    # an input named `mask` read on a continuation line of the mask: a search of lines starting with
    # 'mask' finds that line (6), not the statement (4)
    "mask_read_on_a_continuation_line": (
        "attention bad\ninput mask: bool[B, Lk]\n" + FEATURE + "mask kv <= q and\n  q - kv < 8 and\n"
        "  mask[b, kv]\n" + WEIGHT, 4, 1),
    # the mask written after another statement on its line, below comments about the mask: no line
    # starts with it
    "mask_after_a_statement_and_comments": (
        "attention bad\n# mask: causal, with a window of 8\n" + FEATURE + "# the mask follows the weight\n"
        "let a = dot(phi(q), phi(k)) mask kv <= q and\n  q - kv < 8\nprobs a / rowsum(a)\n", 5, 29),
    # a score transform fails at the score, not at probs
    "score_transform": ("attention bad\n" + FEATURE + "mask kv <= q  # a causal mask\nscore s + 1\n" + WEIGHT, 4, 1),
    # probs left to the default softmax: at the feature map that asks for linear attention
    "default_softmax": ("attention bad\n\n" + FEATURE + "score dot(phi(q), phi(k))\n", 3, 1),
    # row factors a running state cannot know: `attnc check` refused these only at build before
    "row_factor_reads_lq": ("attention bad\n" + FEATURE + "mask kv <= q\nlet a = dot(phi(q), phi(k))\n"
                            "probs a / rowsum(a) * Lq\n", 5, 1),
    "row_factor_reads_a_per_row_input": (
        "attention bad\ninput gate: float[B, Lq]\n" + FEATURE + "mask kv <= q\nlet a = dot(phi(q), phi(k))\n"
        "probs a / rowsum(a) * gate[b, q]\n", 6, 1),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_feature_map_error_points_at_the_failing_statement(name):
    src, line, column = CASES[name]
    with pytest.raises(SpecError, match="feature map but cannot run as linear attention") as err:
        analyse(compile_text(src, "bad.attn"))
    assert err.value.first.span.line == line and err.value.first.span.column == column
    assert err.value.render().startswith(f"bad.attn:{line}:{column}: error:")


def test_factorize_names_the_statement_it_fails_on():
    def failed_at(src):
        return factorize.factorize(compile_text("attention t\n" + src, "t.attn")).failed_at

    assert failed_at("param w = 8\nmask kv <= q and q - kv < w\nprobs s / rowsum(s)\n") is ir.Statement.MASK
    assert failed_at("mask kv <= q\n") is ir.Statement.PROBS  # softmax
    assert failed_at("mask kv <= q\nscore s * s\nprobs score / rowsum(score)\n") is ir.Statement.SCORE
    assert failed_at("mask kv <= q\nprobs s / rowsum(s)\n") is None  # it factorizes


def test_spans_of_every_kept_statement():
    src = ("attention t\nparam w = 8, c: float = 1.0\nconst C = 2\ninput bias: float[Hq]\n" + FEATURE
           + "mask kv <= q and\n  q - kv < w\nscore s * c\nprobs s / rowsum(s)\n")
    spans = compile_text(src, "t.attn").spans
    at = {(kind, name): (span.line, span.column) for kind, name, span in spans.entries}
    assert at == {(ir.Statement.PARAM, "w"): (2, 7), (ir.Statement.PARAM, "c"): (2, 14),
                  (ir.Statement.INPUT, "bias"): (4, 1), (ir.Statement.FEATURE, "phi"): (5, 1),
                  (ir.Statement.MASK, None): (6, 1), (ir.Statement.SCORE, None): (8, 1),
                  (ir.Statement.PROBS, None): (9, 1)}
    assert spans.of(ir.Statement.MASK).end_line == 7
    assert compile_text("attention t\n", "t.attn").spans.of(ir.Statement.MASK) is None  # no mask written


def test_derived_variants_keep_the_spans_and_compare_without_them():
    src = "attention t\nparam window = 8\nmask kv <= q and q - kv < window\n"
    v = compile_text(src, "t.attn")
    mask = v.spans.of(ir.Statement.MASK)
    padded = v.and_mask("pad", [("keep", "Lk", "kv")])
    assert padded.spans.of(ir.Statement.MASK) == mask  # the written part of the mask, as written
    assert padded.spans.of(ir.Statement.INPUT, "keep") is None  # not in the text
    full = v.unbounded("window", "full")
    assert full.spans.of(ir.Statement.MASK) == mask and full.spans.of(ir.Statement.PARAM, "window") is None
    assert v.spans.of(ir.Statement.PARAM, "window") is not None
    # where a statement was written is not part of what the variant means
    same_elsewhere = compile_text(src.replace("mask", "\n\nmask"), "t.attn")
    assert same_elsewhere.spans != v.spans
    assert (same_elsewhere.mask, same_elsewhere.params) == (v.mask, v.params)
    from dataclasses import replace
    assert replace(v, spans=ir.Spans()) == v
