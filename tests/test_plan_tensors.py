"""Tile plans of masks that read tensors, checked against an evaluator of the mask written here.

The plan tests in test_plan.py compare with `fn.mask`, which is generated from the same IR as the
plan; here every random mask is built twice from one tree: as `.attn` text, and as a function that
evaluates it with torch over the whole [B, H, Lq, Lk] grid. The masks read tensors with two token
axes (`m[q, kv]`, `c[b, h, q, kv]`), per-row and per-key floats, per-head ints, and the leaves b, h,
Lq, Lk; Lq and Lk differ both ways and are not tile multiples.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import sys
from pathlib import Path

import pytest
import torch
from attnc.runtime import launch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import brute_force

B, H = 2, 3
DECLS = (
    "input m: bool[Lq, Lk]\n"
    "input c: int[B, Hq, Lq, Lk]\n"
    "input r: float[Lq]\n"
    "input w: float[B, Lk]\n"
    "input band: int[Hq]\n"
)


def _floor_div(a, d):
    return torch.div(a, d, rounding_mode="floor")


def _inputs(Lq, Lk, seed):
    g = torch.Generator().manual_seed(seed)
    density = torch.rand((), generator=g).item()
    return {
        "m": torch.rand(Lq, Lk, generator=g) < density,
        "c": torch.randint(0, 4, (B, H, Lq, Lk), generator=g),
        # dyadic values (see _FLOAT_LEAVES)
        "r": torch.randint(0, 9, (Lq,), generator=g).float() / 8,
        "w": torch.randint(-8, 9, (B, Lk), generator=g).float() / 8,
        "band": torch.randint(0, max(Lq, Lk) + 1, (H,), generator=g),
    }


def _env(Lq, Lk, inputs):
    """Every leaf as a tensor broadcastable to [B, H, Lq, Lk] (int64 or float64)."""
    b = torch.arange(B)[:, None, None, None]
    h = torch.arange(H)[None, :, None, None]
    q = torch.arange(Lq)[None, None, :, None]
    kv = torch.arange(Lk)[None, None, None, :]
    return {
        "b": b, "h": h, "q": q, "kv": kv, "Lq": torch.tensor(Lq), "Lk": torch.tensor(Lk),
        "m": inputs["m"][None, None], "c": inputs["c"].long(),
        "r": inputs["r"].double()[None, None, :, None], "w": inputs["w"].double()[:, None, None, :],
        "band": inputs["band"].long()[None, :, None, None],
    }


# ---- random masks: each node is (spec text, evaluator over the env) ----
_INT_LEAVES = [
    ("q", lambda e: e["q"]), ("kv", lambda e: e["kv"]), ("b", lambda e: e["b"]), ("h", lambda e: e["h"]),
    ("Lq", lambda e: e["Lq"]), ("Lk", lambda e: e["Lk"]), ("band[h]", lambda e: e["band"]),
    ("c[b, h, q, kv]", lambda e: e["c"]), ("3", lambda e: torch.tensor(3)), ("7", lambda e: torch.tensor(7)),
]


def _int_expr(draw, depth):
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        return draw(st.sampled_from(_INT_LEAVES))
    (ta, fa), (tb, fb) = _int_expr(draw, depth - 1), _int_expr(draw, depth - 1)
    op = draw(st.sampled_from(["+", "-", "*", "//", "%", "abs", "min", "max"]))
    if op == "+":
        return f"({ta} + {tb})", lambda e: fa(e) + fb(e)
    if op == "-":
        return f"({ta} - {tb})", lambda e: fa(e) - fb(e)
    if op == "*":
        return f"({ta} * {tb})", lambda e: fa(e) * fb(e)
    if op in ("//", "%"):
        d = draw(st.sampled_from([2, 3, 5]))
        if op == "//":
            return f"({ta} // {d})", lambda e: _floor_div(fa(e), d)
        return f"({ta} % {d})", lambda e: torch.remainder(fa(e), d)
    if op == "abs":
        return f"abs({ta})", lambda e: fa(e).abs()
    if op == "min":
        return f"min({ta}, {tb})", lambda e: torch.minimum(*torch.broadcast_tensors(fa(e), fb(e)))
    return f"max({ta}, {tb})", lambda e: torch.maximum(*torch.broadcast_tensors(fa(e), fb(e)))


_FLOAT_LEAVES = [
    ("r[q]", lambda e: e["r"]), ("w[b, kv]", lambda e: e["w"]),
    # dyadic quotients only: float32 and float64 round them alike, so no tie flips a comparison
    ("kv / 8", lambda e: e["kv"].double() / 8), ("q / 4", lambda e: e["q"].double() / 4),
    ("Lk / 16", lambda e: e["Lk"].double() / 16), ("0.5", lambda e: torch.tensor(0.5, dtype=torch.float64)),
]


def _float_expr(draw):
    (ta, fa), (tb, fb) = draw(st.sampled_from(_FLOAT_LEAVES)), draw(st.sampled_from(_FLOAT_LEAVES))
    op = draw(st.sampled_from(["+", "-", "only"]))
    if op == "only":
        return ta, fa
    if op == "+":
        return f"({ta} + {tb})", lambda e: fa(e) + fb(e)
    return f"({ta} - {tb})", lambda e: fa(e) - fb(e)


_RELATIONS = {"<": torch.lt, "<=": torch.le, "==": torch.eq, "!=": torch.ne, ">": torch.gt, ">=": torch.ge}


def _cond(draw, depth):
    kind = draw(st.sampled_from(["m", "int", "int", "float", "and", "or", "not"] if depth else ["m", "int", "float"]))
    if kind == "m":
        return "m[q, kv]", lambda e: e["m"]
    if kind in ("int", "float"):
        (ta, fa), (tb, fb) = (_int_expr(draw, 2), _int_expr(draw, 2)) if kind == "int" else (_float_expr(draw), _float_expr(draw))
        rel = draw(st.sampled_from(sorted(_RELATIONS) if kind == "int" else ["<", "<=", ">", ">="]))
        return f"{ta} {rel} {tb}", lambda e: _RELATIONS[rel](fa(e), fb(e))
    if kind == "not":
        t, f = _cond(draw, depth - 1)
        return f"not ({t})", lambda e: ~f(e)
    (ta, fa), (tb, fb) = _cond(draw, depth - 1), _cond(draw, depth - 1)
    if kind == "and":
        return f"({ta}) and ({tb})", lambda e: fa(e) & fb(e)
    return f"({ta}) or ({tb})", lambda e: fa(e) | fb(e)


@st.composite
def tensor_masks(draw):
    return _cond(draw, 3)


def _spec(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("spec") / "tensor_mask2.attn"
    path.write_text(f"attention tensor_mask2\n{DECLS}mask {text}\n")
    return attnc.load(path)


def _want(fn_eval, Lq, Lk, inputs):
    return torch.broadcast_to(fn_eval(_env(Lq, Lk, inputs)), (B, H, Lq, Lk))


def _check_plan(fn, text, want, Lq, Lk, inputs, blocks):
    plan = fn.plan(Lq=Lq, Lk=Lk, B=B, Hq=H, block_m=blocks[0], block_n=blocks[1], **inputs)
    got = plan.to_dense()
    expected = brute_force(want, *blocks)
    got = torch.broadcast_to(got, expected.shape)
    assert ((expected > 0) <= (got > 0)).all(), f"unsound EMPTY for: {text}"
    assert ((got == 2) <= (expected == 2)).all(), f"unsound FULL for: {text}"
    assert torch.equal(got > 0, expected > 0), f"inexact for: {text}"
    return plan


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask=tensor_masks(), Lq=st.integers(1, 37), Lk=st.integers(1, 37), seed=st.integers(0, 10 ** 6),
       blocks=st.sampled_from([(1, 1), (2, 4), (4, 4), (8, 2), (16, 8), (4, 32)]))
def test_tensor_masks_plans_match_brute_force(tmp_path_factory, mask, Lq, Lk, seed, blocks):
    text, fn_eval = mask
    fn = _spec(tmp_path_factory, text)
    inputs = _inputs(Lq, Lk, seed)
    want = _want(fn_eval, Lq, Lk, inputs)
    _check_plan(fn, text, want, Lq, Lk, inputs, blocks)


def _m2(tmp_path, decl, mask):
    path = tmp_path / "pair_mask.attn"
    path.write_text(f"attention pair_mask\n{decl}\nmask {mask}\n")
    return attnc.load(path)


@pytest.mark.parametrize("Lq, Lk", [(64, 64), (80, 48), (48, 80), (45, 29)])
@pytest.mark.parametrize("form", ["bool", "int", "bhqk"])
def test_pair_mask_off_the_diagonal(tmp_path, Lq, Lk, form):
    """The issue's repro: m false except m[0, 40], m[10, 50] and rows 32.. true. Single-pair cells
    used to read m[q, q] (EMPTY tiles holding unmasked pairs; IndexError when Lq > Lk)."""
    m = torch.zeros(Lq, Lk, dtype=torch.bool)
    m[0, min(40, Lk - 1)] = True
    m[10, min(50, Lk - 1)] = True
    m[32:] = True
    if form == "bool":
        fn, inputs = _m2(tmp_path, "input m: bool[Lq, Lk]", "m[q, kv]"), {"m": m}
    elif form == "int":
        fn, inputs = _m2(tmp_path, "input m: int[Lq, Lk]", "m[q, kv] == 1"), {"m": m.long()}
    else:
        fn = _m2(tmp_path, "input m: bool[B, Hq, Lq, Lk]", "m[b, h, q, kv]")
        inputs = {"m": m.expand(1, 2, Lq, Lk).clone()}
        inputs["m"][0, 1] = ~m  # the second head differs
    want = m[None, None].expand(1, 2 if form == "bhqk" else 1, Lq, Lk).clone()
    if form == "bhqk":
        want[0, 1] = ~m
    heads = 2 if form == "bhqk" else 1
    for blocks in [(16, 16), (32, 32), (8, 32)]:
        plan = fn.plan(Lq=Lq, Lk=Lk, Hq=heads, block_m=blocks[0], block_n=blocks[1], **inputs)
        expected = brute_force(want, *blocks)
        got = torch.broadcast_to(plan.to_dense(), expected.shape)
        assert torch.equal(got > 0, expected > 0) and torch.equal(got == 2, expected == 2)
    # the kernels, following the default plan, against a float64 softmax written here
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, Lq, 32, generator=g)
    k = torch.randn(1, heads, Lk, 32, generator=g)
    v = torch.randn(1, heads, Lk, 32, generator=g)
    with launch.count_visits() as log:
        o = fn(q, k, v, **inputs)
    assert log and sum(int(x.clamp(min=0).sum()) for x in log) > 0  # the kernels ran
    s = (q.double() @ k.double().transpose(-1, -2)) / 32 ** 0.5
    s = s.masked_fill(~want, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    ref = p @ v.double()
    assert (o.double() - ref).abs().max() < 2e-3 * max(ref.abs().max().item(), 1.0)
