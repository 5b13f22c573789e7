"""Constructs added for issue 10, each run through the kernels (forward and backward) and checked
against a formula written here in float64: bool inputs inside and/or/==/if, bool params, the
functions sin, cos, tan and erf, and the bitwise operators & | ^ << on integers. Their interval
rules (tile plans) are checked against enumeration.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import math
import sys
from pathlib import Path

import pytest
import torch
from attnc.runtime import intervals as I
from hypothesis import given, settings
from hypothesis import strategies as st

from attnc.errors import SpecError
from attnc.pipeline import compile_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spec_helpers import L, _check, _formula, _ij, _load, _qkv

# ---- bool inputs in conditions -------------------------------------------------------------------
BOOL_MASKS = {
    "padding_and_causal": ("mask kv <= q and keep[b, kv]", lambda i, j, keep, g: (j <= i) & keep[:, None, None, :]),
    "row_flag_or_causal": ("mask g[q] or kv <= q", lambda i, j, keep, g: g[None, None, :, None] | (j <= i)),
    "bool_equality": ("mask (q < 20) == (kv < 20)", lambda i, j, keep, g: (i < 20) == (j < 20)),
    "bool_inequality": ("mask keep[b, kv] != (kv < q)", lambda i, j, keep, g: keep[:, None, None, :] != (j < i)),
    "bool_if_else": ("mask keep[b, kv] if q < 10 else kv <= q",
                     lambda i, j, keep, g: torch.where(i < 10, keep[:, None, None, :], j <= i)),
    "not_bool": ("mask not keep[b, kv] or kv == q", lambda i, j, keep, g: ~keep[:, None, None, :] | (j == i)),
}


@pytest.mark.parametrize("case", sorted(BOOL_MASKS))
def test_bool_inputs_in_conditions(tmp_path, case):
    text, formula = BOOL_MASKS[case]
    fn = _load(tmp_path, case, f"input keep: bool[B, Lk]\ninput g: bool[Lq]\n{text}\n")
    gen = torch.Generator().manual_seed(1)
    keep = torch.rand(2, L, generator=gen) < 0.6
    g = torch.rand(L, generator=gen) < 0.3
    q, k, v = _qkv(B=2)
    i, j = _ij()
    mask = formula(i, j, keep, g)
    _check(fn, q, k, v, lambda q, k, v: _formula(q, k, v, mask), keep=keep, g=g)
    # the plan, against the same mask by brute force
    plan = fn.plan(Lq=L, Lk=L, B=2, Hq=2, block_m=8, block_n=8, keep=keep, g=g).to_dense()
    full = torch.broadcast_to(mask, (2, 2, L, L))
    for bi in range(2):
        for ti in range(plan.shape[2]):
            for tj in range(plan.shape[3]):
                tile = full[bi, 0, ti * 8:(ti + 1) * 8, tj * 8:(tj + 1) * 8]
                cls = plan[min(bi, plan.shape[0] - 1), 0, ti, tj]
                assert (cls > 0) == bool(tile.any()) and (cls == 2) == bool(tile.all())


def test_bool_score_condition(tmp_path):
    fn = _load(tmp_path, "bool_score", "input keep: bool[B, Lk]\nscore s + 1.5 if keep[b, kv] else s - 1.5\n")
    keep = torch.rand(1, L, generator=torch.Generator().manual_seed(2)) < 0.5
    q, k, v = _qkv()
    bias = torch.where(keep[:, None, None, :], 1.5, -1.5).double()
    _check(fn, q, k, v, lambda q, k, v: _formula(q, k, v, torch.ones(L, L, dtype=torch.bool), lambda s: s + bias),
           keep=keep)


# ---- bool params ---------------------------------------------------------------------------------
def test_bool_param(tmp_path):
    fn = _load(tmp_path, "maybe_causal", "param causal: bool = true\nmask kv <= q or not causal\n")
    q, k, v = _qkv()
    i, j = _ij()
    for value, mask in ((None, j <= i), (True, j <= i), (False, torch.ones(L, L, dtype=torch.bool)),
                        (0, torch.ones(L, L, dtype=torch.bool))):
        inputs = {} if value is None else {"causal": value}
        _check(fn, q, k, v, lambda q, k, v, mask=mask: _formula(q, k, v, mask), backward=value is None, **inputs)
    with pytest.raises(ValueError, match=r"maybe_causal: argument 'causal': expected True or False, got 2"):
        fn(q, k, v, causal=2)
    with pytest.raises(ValueError, match=r"argument 'causal': expected True or False, got 0.5"):
        fn(q, k, v, causal=0.5)


def test_bool_param_in_a_score(tmp_path):
    fn = _load(tmp_path, "switch", "param on: bool = false\nscore s * 2.0 if on else s\n")
    q, k, v = _qkv()
    everything = torch.ones(L, L, dtype=torch.bool)
    _check(fn, q, k, v, lambda q, k, v: _formula(q, k, v, everything))
    _check(fn, q, k, v, lambda q, k, v: _formula(q, k, v, everything, lambda s: 2 * s), on=True)


# ---- functions -----------------------------------------------------------------------------------
FUNCTIONS = {
    "sin": ("score s + sin(2 * s)", lambda s: s + torch.sin(2 * s)),
    "cos": ("score cos(s) * 3.0", lambda s: torch.cos(s) * 3),
    "tan": ("score tan(s / 4)", lambda s: torch.tan(s / 4)),
    "erf": ("score 2.0 * erf(s)", lambda s: 2 * torch.erf(s)),
    "tanh_sigmoid": ("score tanh(s) + sigmoid(s)", lambda s: torch.tanh(s) + torch.sigmoid(s)),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_functions_forward_and_backward(tmp_path, name):
    text, formula = FUNCTIONS[name]
    fn = _load(tmp_path, name, f"mask kv <= q\n{text}\n")
    q, k, v = _qkv(seed=3)
    q = q * 0.5  # keep tan(s / 4) away from its poles
    i, j = _ij()
    _check(fn, q, k, v, lambda q, k, v: _formula(q, k, v, j <= i, formula))


def test_functions_in_masks_plan_soundly(tmp_path):
    fn = _load(tmp_path, "wavy", "mask sin(q / 3) + cos(kv / 5) > 0.2 or erf(q - kv) > 0.5\n")
    i, j = _ij()
    mask = (torch.sin(i / 3) + torch.cos(j / 5) > 0.2) | (torch.erf((i - j).double()) > 0.5)
    q, k, v = _qkv()
    _check(fn, q, k, v, lambda q, k, v: _formula(q, k, v, mask), backward=False)
    plan = fn.plan(Lq=L, Lk=L, block_m=4, block_n=4).to_dense()[0, 0]
    for ti in range(plan.shape[0]):
        for tj in range(plan.shape[1]):
            tile = mask[ti * 4:(ti + 1) * 4, tj * 4:(tj + 1) * 4]
            assert (plan[ti, tj] > 0) == bool(tile.any()) and (plan[ti, tj] == 2) <= bool(tile.all())


# ---- bitwise operators ---------------------------------------------------------------------------
BITWISE = {
    "morton_bits": ("mask ((q >> 1) & 3) == ((kv >> 1) & 3)", lambda i, j: ((i >> 1) & 3) == ((j >> 1) & 3)),
    "xor_window": ("mask (q ^ kv) < 4", lambda i, j: (i ^ j) < 4),
    "or_subset": ("mask (q | kv) == q", lambda i, j: (i | j) == i),
    "shift_left": ("mask (kv << 2) <= q + 3", lambda i, j: (j << 2) <= i + 3),
    "precedence": ("mask (q & 1) == (kv & 1 | 0)", lambda i, j: (i & 1) == ((j & 1) | 0)),
    "negative": ("mask ((q - 20) & (kv - 20)) < 0 or ((q - kv) ^ 3) == -4",
                 lambda i, j: (((i - 20) & (j - 20)) < 0) | (((i - j) ^ 3) == -4)),
}


@pytest.mark.parametrize("name", sorted(BITWISE))
def test_bitwise_masks(tmp_path, name):
    text, formula = BITWISE[name]
    fn = _load(tmp_path, name, text + "\n")
    i, j = _ij()
    mask = formula(i, j)
    q, k, v = _qkv(seed=4)
    _check(fn, q, k, v, lambda q, k, v: _formula(q, k, v, mask), backward=name == "morton_bits")
    for bm, bn in ((1, 1), (4, 8), (16, 16)):
        plan = fn.plan(Lq=L, Lk=L, block_m=bm, block_n=bn).to_dense()[0, 0]
        for ti in range(plan.shape[0]):
            for tj in range(plan.shape[1]):
                tile = mask[ti * bm:(ti + 1) * bm, tj * bn:(tj + 1) * bn]
                assert (plan[ti, tj] > 0) == bool(tile.any()), (name, ti, tj)
                assert (plan[ti, tj] == 2) <= bool(tile.all())


@pytest.mark.parametrize("source, message", [
    ("mask (q & 1.5) > 0\n", "'&' needs integers, but this is real"),
    ("mask (q << kv) > 0\n", "the shift count of '<<' must be an integer from 0 to 62"),
    ("mask (q << 63) > 0\n", "the shift count of '<<' must be an integer from 0 to 62"),
    ("mask (kv < q) & true\n", "'&' needs a number, but this is a condition"),
])
def test_bitwise_errors(source, message):
    with pytest.raises(SpecError) as info:
        compile_text("attention bad\n" + source, "bad.attn")
    assert message in info.value.first.message and info.value.first.span.line == 2


ranges = st.tuples(st.integers(-40, 40), st.integers(0, 12)).map(lambda t: (t[0], t[0] + t[1]))
_BIT_RULES = {"and": (I.bitand, lambda a, b: a & b), "or": (I.bitor, lambda a, b: a | b),
              "xor": (I.bitxor, lambda a, b: a ^ b)}


@settings(max_examples=300, deadline=None)
@given(a=ranges, b=ranges, tensors=st.booleans(), op=st.sampled_from(sorted(_BIT_RULES)))
def test_bitwise_interval_rules_bound_every_value(a, b, tensors, op):
    rule, exact = _BIT_RULES[op]
    values = [exact(x, y) for x in range(a[0], a[1] + 1) for y in range(b[0], b[1] + 1)]
    wrap = (lambda r: (torch.tensor([r[0]]), torch.tensor([r[1]]))) if tensors else (lambda r: r)
    lo, hi = rule(wrap(a), wrap(b))
    lo, hi = (float(x.item()) if isinstance(x, torch.Tensor) else x for x in (lo, hi))
    assert lo <= min(values) and max(values) <= hi
    if a[0] == a[1] and b[0] == b[1]:
        assert lo == hi == values[0]


@settings(max_examples=200, deadline=None)
@given(x=st.floats(-20, 20), width=st.floats(0, 10), tensors=st.booleans(),
       name=st.sampled_from(["sin", "cos", "tan"]))
def test_bounded_function_rules(x, width, tensors, name):
    fn = getattr(math, name)
    interval = (x, x + width)
    lo, hi = I.bounded(name, (torch.tensor([x], dtype=torch.float64), torch.tensor([x + width], dtype=torch.float64))
                       if tensors else interval)
    lo, hi = (float(v.item()) if isinstance(v, torch.Tensor) else v for v in (lo, hi))
    for t in torch.linspace(interval[0], interval[1], 50, dtype=torch.float64).tolist():
        assert lo - 1e-12 <= fn(t) <= hi + 1e-12
    if width == 0:
        assert lo == hi == pytest.approx(fn(x))
