"""Checker errors: names, types, indices and semantics. Each case asserts the first diagnostic's
message (a substring), line and column."""

from __future__ import annotations

import pytest

from attnc.errors import SpecError
from attnc.pipeline import compile_text

H = "attention t\n"

NAMES = {
    "unknown_name_with_hint": (H + "param window = 3\nmask q - kv < windw\n", 3, 15, "unknown name 'windw'"),
    "infinity_is_a_mask": (H + "score s if kv <= q else -inf\n", 2, 26, "'inf' is not a number of the language"),
    "use_before_definition": (H + "mask kv <= w\nparam w = 3\n", 2, 12, "'w' is used before its definition at line 3"),
    "duplicate_param": (H + "param w = 3\nparam w = 4\n", 3, 7, "'w' is already defined at line 2"),
    "duplicate_in_one_statement": (H + "param w = 3, w = 4\n", 2, 14, "'w' is already defined at line 2"),
    "duplicate_let": (H + "let x = 1\nlet x = 2\n", 3, 1, "'x' is already defined at line 2"),
    "duplicate_in_unravel": (H + "let (a, a) = unravel(q, 2, 2)\n", 2, 1, "'a' is already defined"),
    "redefine_q": (H + "let q = 3\n", 2, 1, "'q' is a built-in name (the query index)"),
    "redefine_kv": (H + "param kv = 3\n", 2, 7, "'kv' is a built-in name (the key index)"),
    "redefine_s": (H + "let s = 3\n", 2, 1, "'s' is a built-in name (the raw score)"),
    "redefine_score": (H + "let score = 3\n", 2, 1, "'score' is a built-in name"),
    "redefine_exp": (H + "let exp = 3\n", 2, 1, "'exp' is a built-in name (a function)"),
    "redefine_visible": (H + "input visible: float[Hq]\n", 2, 1, "'visible' is a built-in name"),
    "underscore_name": (H + "param _w = 3\n", 2, 7, "'_w' starts with '_'"),
    "underscore_variant_name": ("attention _t\nmask kv <= q\n", 1, 11, "variant name '_t' starts with '_'"),
    "python_keyword_lambda": (H + "let lambda = 3\n", 2, 1, "'lambda' is a Python keyword"),
    "python_keyword_variant": ("attention class\nmask kv <= q\n", 1, 11, "'class' is a Python keyword"),
    "unknown_function": (H + "mask nope(q) > 0\n", 2, 6, "unknown function 'nope'"),
    "function_as_name": (H + "mask exp > 0\n", 2, 6, "'exp' is a function; call it as exp(...)"),
    "statement_keyword_as_name": (H + "mask kv <= let\n", 2, 12, "unknown name 'let'"),
    "unknown_head_role": (H + "heads q = Hq, k = 1, z = 2\n", 2, 22, "unknown head role 'z'"),
    "head_named_by_size": (H + "heads q = Lq\n", 2, 7, "'Lq' is the query length"),
    "score_used_before_score_statement": (H + "probs softmax(score)\nscore s * 2\n", 2, 15,
                                          "'score' is used before the score statement at line 3"),
    "score_uses_itself": (H + "score score + 1\n", 2, 7, "the score statement cannot use 'score'"),
}

TYPES = {
    "mask_not_bool": (H + "mask q + kv\n", 2, 6, "the mask must be a condition (bool), not int"),
    "and_on_numbers": (H + "mask q and kv\n", 2, 6, "'and' needs conditions on both sides, not int"),
    "floordiv_on_reals": (H + "param w = 2.5\nmask kv <= q // w\n", 3, 17, "'//' needs integers, but this is real"),
    "floordiv_by_real_literal": (H + "mask kv <= q // 2.0\n", 2, 17, "'//' needs integers"),
    "mod_on_score": (H + "score s % 2\n", 2, 7, "'%' needs integers, but this is real"),
    "arith_on_bool": (H + "score s + (q < kv)\n", 2, 12, "'+' needs a number, but this is a condition"),
    "arith_on_true": (H + "score s + true\n", 2, 11, "'+' needs a number, but this is a condition"),
    "neg_of_bool": (H + "mask -(kv <= q)\n", 2, 8, "'-' needs a number, but this is a condition"),
    "if_condition_not_bool": (H + "score s * (1 if q else 2)\n", 2, 17, "the condition of 'if' must be a condition"),
    "const_not_a_number": (H + "const C = q\n", 2, 11, "const 'C' must be a number known at build time"),
    "const_from_param": (H + "param w = 1\nconst C = w\n", 3, 11, "const 'C' must be a number known at build time"),
    "const_log_zero": (H + "const C = log(0)\n", 2, 11, "const 'C' is not a finite real number"),
    "const_complex": (H + "const C = sqrt(-1)\n", 2, 11, "const 'C' is not a finite real number"),
    "const_overflow": (H + "const C = exp(exp(exp(exp(10))))\n", 2, 11, "const 'C' is not a finite real number"),
    "int_param_real_default": (H + "param w: int = 2.5\n", 2, 16, "param 'w' is declared int but its value is real"),
    "bool_param_int_default": (H + "param w: bool = 1\n", 2, 17, "param 'w' is declared bool but its default is int"),
    "bool_param_computed_default": (H + "param w: bool = Lq > 3\n", 2, 17,
                                    "the default of bool param 'w' must be true or false"),
    "int_param_bool_default": (H + "param w: int = true\n", 2, 16, "param 'w' must be a number, not a condition"),
    "bool_const": (H + "const C = true\n", 2, 7, "const 'C' cannot be bool"),
    "bool_compared_with_number": (H + "input g: bool[Lq]\nmask g[q] == 1\n", 3, 6,
                                  "'==' compares two conditions or two numbers"),
    "param_depends_on_index": (H + "param w = q\n", 2, 11, "a parameter's default may use numbers"),
    "param_depends_on_score": (H + "param w = s\n", 2, 11, "a parameter's default cannot depend on the score"),
    "learnable_int_input": (H + "input x: int[Hq] learnable\n", 2, 1, "only float inputs can be learnable"),
    "number_too_large": (H + "score s + 1e999\n", 2, 11, "number 1e999 is too large"),
    "integer_past_int64": (H + "mask kv <= q + 9223372036854775808\n", 2, 16,
                           "integer 9223372036854775808 is out of range"),
    "int_param_past_int64": (H + "param x = 18446744073709551616\n", 2, 11,
                             "integer 18446744073709551616 is out of range"),
    "min_one_argument": (H + "mask min(q) > 0\n", 2, 6, "min() needs at least 2 arguments, got 1"),
    "clamp_two_arguments": (H + "mask clamp(q, 1) > 0\n", 2, 6, "clamp() takes 3 arguments, got 2"),
    "exp_two_arguments": (H + "score exp(s, 2)\n", 2, 7, "exp() takes 1 argument, got 2"),
    "rowsum_keyword": (H + "probs rowsum(exp(s), x=1)\n", 2, 7, "rowsum() takes no keyword arguments"),
    "head_count_zero": (H + "heads q = 0\n", 2, 7, "a head count must be at least 1"),
}

INDICES = {
    "wrong_index": (H + "input x: float[Hq]\nscore s + x[q]\n", 3, 13, "axis Hq of 'x' must be indexed by 'h'"),
    "wrong_index_for_L": (H + "input d: int[B, L]\nmask d[b, h] > 0\n", 3, 11, "axis L of 'd' must be indexed by 'q' or 'kv'"),
    "wrong_arity": (H + "input x: float[Hq]\nscore s + x[h, q]\n", 3, 11, "'x' has 1 axes [Hq] but is indexed with 2"),
    "unindexed_tensor": (H + "input x: float[Hq]\nscore s + x\n", 3, 11, "tensor 'x' must be indexed"),
    "unknown_axis": (H + "input x: float[Hz]\n", 2, 1, "unknown axis 'Hz' in the shape of 'x'"),
    "axis_twice": (H + "input d: int[B, B]\n", 2, 1, "axis 'B' appears twice in the shape of 'd'"),
    "L_and_Lq": (H + "input d: float[Lq, L]\n", 2, 1, "axis 'L' appears twice"),
    "tensor_called": (H + "input d: float[Hq]\nmask d(h) > 0\n", 3, 6, "tensor 'd' is indexed with [...], not called"),
    "let_indexed": (H + "let x = 1\nmask x[q] > 0\n", 3, 6, "'x' is not a tensor input and cannot be indexed"),
    "unknown_tensor": (H + "mask x[q] > 0\n", 2, 6, "unknown tensor 'x'"),
}

SEMANTICS = {
    "mask_on_score": (H + "mask s > 0\n", 2, 6, "the mask cannot depend on the score"),
    "mask_on_rowsum": (H + "mask rowsum(exp(s)) > 0\n", 2, 17, "the mask cannot depend on the score"),
    "mask_on_visible": (H + "mask visible > 3\n", 2, 6, "the mask cannot depend on row statistics"),
    "mask_on_rowsum_of_index": (H + "mask rowsum(kv) > 3\n", 2, 6, "the mask cannot depend on row statistics"),
    "score_uses_rowsum": (H + "score s / rowsum(exp(s))\n", 2, 11, "the score cannot use row statistics"),
    "duplicate_mask": (H + "mask kv <= q\nmask kv >= 0\n", 3, 1, "duplicate 'mask' statement (the first is at line 2)"),
    "duplicate_probs": (H + "probs softmax(score)\nprobs softmax(score)\n", 3, 1, "duplicate 'probs' statement"),
    "duplicate_score": (H + "score s\nscore s\n", 3, 1, "duplicate 'score' statement"),
    "duplicate_heads": (H + "heads q = Hq\nheads k = 2\n", 3, 1, "duplicate 'heads' statement"),
    "probs_without_score": (H + "probs exp(q)\n", 2, 7, "probs does not depend on the score"),
    "probs_is_a_condition": (H + "probs score > 0\n", 2, 7, "probs must be a number, not a condition"),
    "unravel_outside_let": (H + "mask unravel(q, 4, 4) > 0\n", 2, 6, "unravel(...) gives several coordinates"),
    "unravel_into_one_name": (H + "let y = unravel(q, 4, 4)\n", 2, 9, "unravel(...) gives several coordinates"),
    "unravel_wrong_arity": (H + "let (y, x) = unravel(q, 4)\n", 2, 14, "unravel into 2 names needs an index and 2 extents"),
    "unpack_non_unravel": (H + "let (a, b) = q\n", 2, 14, "only unravel(...) can be unpacked"),
    "unravel_zero_extent": (H + "let (a, b) = unravel(q, 0, 4)\n", 2, 25, "an extent of unravel must be at least 1"),
    "softmax_bad_keyword": (H + "probs softmax(score, temp=2)\n", 2, 27, "softmax() has no argument 'temp'"),
    "softmax_sink_twice": (H + "probs softmax(score, sink=1, sink=2)\n", 2, 35, "sink= twice"),
    "softmax_no_argument": (H + "probs softmax()\n", 2, 7, "softmax() takes 1 argument"),
    "softmax_sink_on_kv": (H + "probs softmax(score, sink=kv)\n", 2, 27, "a sink logit must be constant along the row"),
    "softmax_of_rowstat": (H + "probs softmax(rowsum(exp(s)))\n", 2, 15, "softmax() logits cannot use row statistics"),
    "division_by_zero": (H + "score s / 0\n", 2, 11, "division by zero"),
    "floordiv_by_zero": (H + "mask kv <= q // 0\n", 2, 17, "division by zero in '//'"),
    "mod_by_zero": (H + "mask kv <= q % 0\n", 2, 16, "division by zero in '%'"),
    "const_division_by_zero": (H + "const C = 1 / 0\n", 2, 15, "division by zero"),
    "zero_to_negative_power": (H + "let x = 0 ** -1\n", 2, 9, "0 raised to a negative power"),
}

DOMAINS = {  # `where` conditions on params and inputs (tests/test_domains.py checks them at call)
    "not_a_condition": (H + "param cap = 50.0 where cap\n", 2, 24, "must be a condition, not a real value"),
    "other_names": (H + "param cap = 50.0 where cap > Lq\n", 2, 24, "may use only 'cap', numbers and consts"),
    "unknown_name": (H + "param cap = 50.0 where x > 0\n", 2, 24, "unknown name 'x'"),
    "const": (H + "const c = 1 where c > 0\n", 2, 19, "const 'c' cannot have a 'where' condition"),
    "bool_param": (H + "param f = true where f\n", 2, 22, "bool param 'f' cannot have a 'where' condition"),
    "bool_input": (H + "input m: bool[Hq] where m\n", 2, 25, "bool input 'm' cannot have a 'where' condition"),
    "default_outside": (H + "param cap = -1.0 where cap > 0\n", 2, 13,
                        "the default -1.0 of param 'cap' does not meet its condition 'cap > 0'"),
    "never_true": (H + "param cap = 1.0 where false\n", 2, 23, "is never true"),
}

ALL = {**{f"names-{k}": v for k, v in NAMES.items()}, **{f"types-{k}": v for k, v in TYPES.items()},
       **{f"indices-{k}": v for k, v in INDICES.items()}, **{f"semantics-{k}": v for k, v in SEMANTICS.items()},
       **{f"domains-{k}": v for k, v in DOMAINS.items()}}


@pytest.mark.parametrize("source,line,column,message", list(ALL.values()), ids=list(ALL))
def test_check_error(source, line, column, message):
    with pytest.raises(SpecError) as info:
        compile_text(source, "bad.attn")
    err = info.value
    d = err.first
    assert message in d.message, (d.message, err.render())
    assert d.span is not None
    assert (d.span.line, d.span.column) == (line, column), err.render()
    rendered = err.render()
    assert rendered.startswith(f"bad.attn:{line}:{column}: error: ")


def test_enough_distinct_cases():
    assert len(ALL) >= 30
    assert len({source for source, *_ in ALL.values()}) == len(ALL)


def test_did_you_mean_hint():
    with pytest.raises(SpecError) as info:
        compile_text(H + "param window = 3\nmask q - kv < windw\n")
    assert info.value.first.hint == "did you mean 'window'?"
    assert "hint: did you mean 'window'?" in info.value.render()


def test_redefining_a_builtin_hints_another_name():
    with pytest.raises(SpecError) as info:
        compile_text(H + "let s = 3\n")
    assert "s_" in info.value.first.hint


def test_several_errors_are_reported_together_in_order():
    source = H + "param w = 3\nparam w = 4\nmask kv <= windw\nscore s / 0\n"
    with pytest.raises(SpecError) as info:
        compile_text(source, "bad.attn")
    err = info.value
    lines = [d.span.line for d in err.diagnostics]
    assert lines == sorted(lines) and len(lines) == 3
    assert err.render().count(": error: ") == 3


@pytest.mark.parametrize("source", [
    H + "probs score\n",  # no normalization at all: legal, like sigmoid attention
    H + "mask 1 < 2 < 3\n",
    H + "param w: float = 3\n",
    H + "param w = Lk // 2\nmask kv <= q - w\n",
    H + "mask kv <= q\nprobs relu(score) / visible\n",
    H + "heads q = H, k = H, v = H\n",
    H + "score s + .5\n",
], ids=["probs_score", "chained_compare", "float_param_int_literal", "param_from_size", "relu_visible",
        "shared_head_name", "leading_dot_number"])
def test_near_misses_are_accepted(source):
    compile_text(source)


@pytest.mark.parametrize("source", [
    H + "probs score\n",
    H + "mask 1 < 2 < 3\n",
    H + "param w = Lk // 2\nmask kv <= q - w\n",
    H + "mask kv <= q\nprobs relu(score) / visible\n",
    H + "input keep: bool[B, Lk]\nmask kv <= q and keep[b, kv]\n",
    H + "param on: bool = true\nmask kv <= q or not on\n",
    H + "mask (q < 8) == (kv < 8)\n",
    H + "mask (q ^ kv) < 4 and sin(q) > -2\n",
    H + "score s + .5\n",
], ids=["probs_score", "chained_compare", "param_from_size", "relu_visible", "bool_padding", "bool_param",
        "bool_equality", "bitwise_and_trig", "constant_score_shift"])
def test_what_checks_builds_and_runs(tmp_path, source):
    """check accepts exactly what build builds: each accepted spec builds, and its mask, plan and
    reference run at B=2, Hq=2."""
    import torch

    import attnc

    spec = tmp_path / "t.attn"
    spec.write_text(source)
    fn = attnc.load(spec)
    inputs = {"keep": torch.ones(2, 12, dtype=torch.bool)} if "keep" in source else {}
    mask = fn.mask(Lq=12, Lk=12, B=2, Hq=2, **inputs)
    plan = fn.plan(Lq=12, Lk=12, B=2, Hq=2, block_m=4, block_n=4, **inputs)
    assert plan.tiles_visited >= int(mask.view(mask.shape[0], mask.shape[1], 3, 4, 3, 4).any(-1).any(-2).sum())
    q, k, v = (torch.randn(2, 2, 12, 8, dtype=torch.float64) for _ in range(3))
    assert torch.isfinite(fn.reference(q, k, v, **inputs)).all()


@pytest.mark.parametrize("source, line", [
    (H + "param flag: bool = 1\nmask kv <= q or flag\n", 2),
    (H + "param w: int = 2.5\nmask kv <= q - w\n", 2),
    (H + "input g: blob[Lq]\nmask g[q]\n", 2),
    (H + "let a = q // 0\nmask kv <= a\n", 2),
    (H + "score s + (q < 3) * 1\nprobs softmax(score)\n", 2),
    (H + "score s + (q < 3) * 1\nlet z = score * 2\nprobs softmax(z)\n", 2),
])
def test_a_failed_definition_is_reported_once(source, line):
    """A use of a name whose definition had an error adds no 'used before its definition' error."""
    with pytest.raises(SpecError) as info:
        compile_text(source, "bad.attn")
    err = info.value
    assert [d.span.line for d in err.diagnostics] == [line], err.render()
    assert "before its definition" not in err.render()


# ---- Python's precedence trap: `&` / `|` / `^` between comparisons ----------------------------------
@pytest.mark.parametrize("source, op, column, reads, hint", [
    ("mask kv <= q & q - kv < 8\n", "&", 14, "kv <= (q & (q - kv)) < 8", "write 'and': kv <= q and q - kv < 8"),
    ("mask kv <= q | q - kv < 8\n", "|", 14, "kv <= (q | (q - kv)) < 8", "write 'or': kv <= q or q - kv < 8"),
    ("mask q & 1 == kv & 1\n", "&", 8, "(q & 1) == kv & 1", "for the bitwise '&' put it in parentheses"),
    ("mask kv < q ^ 3\n", "^", 13, "kv < (q ^ 3)", "'and', 'or' or '!='"),
    ("let m = (kv <= q &\n  q - kv < 8)\nmask m\n", "&", 18, "kv <= (q &\n  (q - kv)) < 8", "write 'and'"),
], ids=["and", "or", "bitwise_first", "xor", "multiline_in_parens"])
def test_bitwise_between_comparisons_is_refused(source, op, column, reads, hint):
    """`kv <= q & q - kv < 8` parses as `kv <= (q & (q - kv)) < 8`, a different mask that passes every
    type check; it is refused at the operator, with the reading and the fix."""
    with pytest.raises(SpecError) as info:
        compile_text(H + source, "bad.attn")
    d = info.value.first
    assert d.message.startswith(f"'{op}' inside a comparison"), d.message
    assert f"this reads as {reads}," in d.message, d.message
    assert hint in d.hint, d.hint
    assert (d.span.line, d.span.column) == (2, column), info.value.render()
    assert info.value.render().startswith(f"bad.attn:2:{column}: error: ")


@pytest.mark.parametrize("source", [
    "mask (q & 1) == (kv & 1)\n",
    "mask kv <= (q & 7) + 1\n",
    "mask kv <= q + (q & 7)\n",
    "let x = q & 7\nmask kv <= x\n",
])
def test_parenthesized_bitwise_in_comparisons_is_accepted(source):
    compile_text(H + source)


@pytest.mark.parametrize("op, column, hint", [
    ("&", 7, "to combine conditions write 'and'"),
    ("|", 7, "to combine conditions write 'or'"),
    ("^", 7, "to combine conditions write '!=' (exclusive or)"),
])
def test_bitwise_on_conditions_hints_and_or(op, column, hint):
    """`(kv <= q) & (q - kv < 8)`, FlexAttention's spelling: the hint is 'and' / 'or', not 'x if c else y'."""
    with pytest.raises(SpecError) as info:
        compile_text(H + f"mask (kv <= q) {op} (q - kv < 8)\n", "bad.attn")
    d = info.value.first
    assert d.message == f"'{op}' needs a number, but this is a condition"
    assert (d.span.line, d.span.column) == (2, column) and d.hint == hint


def test_a_token_index_on_a_batch_axis_hints_the_batch_index():
    """`lens[q]` for lens: int[B]: no hint about clamped index expressions, which do not apply."""
    with pytest.raises(SpecError) as info:
        compile_text(H + "input lens: int[B]\nmask kv < lens[q]\n", "bad.attn")
    d = info.value.first
    assert d.message == "axis B of 'lens' must be indexed by 'b'" and (d.span.line, d.span.column) == (3, 16)
    assert d.hint == "'lens' is declared [B]: axis B is the batch, indexed by 'b', and 'q' is the query index"
    with pytest.raises(SpecError) as info:  # between token axes an index expression may be meant
        compile_text(H + "input w: float[Lq]\nmask w[kv] > 0\n", "bad.attn")
    assert "index expression" in info.value.first.hint


def test_and_between_comparisons_is_the_sliding_window_and_the_ampersand_form_is_refused(tmp_path):
    """The fix the '&' error suggests computes the sliding window: kernels against a float64 formula."""
    import torch
    from attnc.runtime import launch

    import attnc

    with pytest.raises(SpecError, match="'&' inside a comparison"):
        compile_text(H + "mask kv <= q & q - kv < 8\n", "bad.attn")
    spec = tmp_path / "window.attn"
    spec.write_text(H + "mask kv <= q and q - kv < 8\n")
    fn = attnc.load(spec)
    L, D = 20, 16
    q, k, v = (torch.randn(1, 2, L, D, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with launch.count_visits() as log:
        o = fn(q, k, v)
    assert log and sum(int(x.clamp(min=0).sum()) for x in log) > 0, "the kernels did not run"
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    window = (j <= i) & (i - j < 8)
    s = (q.double() @ k.double().transpose(-1, -2)) * D ** -0.5
    want = torch.softmax(s.masked_fill(~window, float("-inf")), -1) @ v.double()
    assert (o.double() - want).abs().max().item() <= 2e-3 * want.abs().max().item()
