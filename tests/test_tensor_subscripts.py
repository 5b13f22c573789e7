"""Tensor subscripts that are expressions, and tensor inputs with axes of their own (tables):
relative-position biases, T5-style buckets (written with let functions), gathers such as
offsets[doc[q]] and spatial_bias[h, dist[b, q, kv]]. Out-of-range indices read the nearest entry
(the index is clamped to the axis). Each runs through the kernels, forward and backward, against a
float64 formula written here; masks that gather get plans checked against brute force."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import math
import shutil
import subprocess
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

from attnc.errors import SpecError
from attnc.pipeline import compile_text

D = 16


def _load(tmp_path, name, body):
    path = tmp_path / f"{name}.attn"
    path.write_text(f"attention {name}\n{body}")
    return attnc.load(path)


def _qkv(B, H, Lq, Lk, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Lq, D, generator=g), torch.randn(B, H, Lk, D, generator=g),
            torch.randn(B, H, Lk, D, generator=g))


def _formula(q, k, v, mask, add=0.0):
    """Softmax attention in float64: s = q.k / sqrt(D) + add, masked where `mask` is False."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + add
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def _check(fn, q, k, v, mask, add=0.0, **inputs):
    """The kernels (visits counted) against the formula, forward and through autograd backward; the
    reference against the formula too."""
    q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    with launch.count_visits() as log:
        o = fn(q, k, v, **inputs)
    assert log and sum(int(x.clamp(min=0).sum()) for x in log) > 0, "the kernels did not run"
    qd, kd, vd = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    want = _formula(qd, kd, vd, mask, add)
    scale = max(want.abs().max().item(), 1e-3)
    assert (o.double() - want).abs().max().item() <= 2e-3 * scale
    ref = fn.reference(q.detach(), k.detach(), v.detach(), **inputs)
    assert (ref.double() - want.detach()).abs().max().item() <= 2e-3 * scale
    g = torch.randn_like(want)
    o.backward(g.float())
    want.backward(g)
    for got, exp in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert (got.double() - exp).abs().max().item() <= 5e-3 * max(exp.abs().max().item(), 1e-3)


def _ij(Lq, Lk):
    return torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]


def _check_plan(fn, want, Lq, Lk, B, H, **inputs):
    want = torch.broadcast_to(want, (B, H, Lq, Lk))
    for blocks in [(1, 1), (4, 4), (8, 2), (16, 16)]:
        plan = fn.plan(Lq=Lq, Lk=Lk, B=B, Hq=H, block_m=blocks[0], block_n=blocks[1], **inputs)
        expected = brute_force(want, *blocks)
        got = torch.broadcast_to(plan.to_dense(), expected.shape)
        assert ((expected > 0) <= (got > 0)).all(), f"unsound EMPTY at blocks {blocks}"
        assert ((got == 2) <= (expected == 2)).all(), f"unsound FULL at blocks {blocks}"
        assert torch.equal(got > 0, expected > 0), f"inexact at blocks {blocks}"
    assert torch.equal(torch.broadcast_to(fn.mask(Lq=Lq, Lk=Lk, B=B, Hq=H, **inputs), want.shape), want)


# ---- relative-position bias: a per-head table read at q - kv + R, clamped ----------------------------
def test_relative_position_bias_clamps_out_of_range_distances(tmp_path):
    R = 3  # distances past +-3 read the table's ends
    fn = _load(tmp_path, "rel_bias", f"const R = {R}\ninput rel: float[Hq, 2 * R + 1]\nmask kv <= q + 2\n"
                                     "score s + rel[h, q - kv + R]")
    B, H, Lq, Lk = 2, 2, 13, 11
    q, k, v = _qkv(B, H, Lq, Lk, seed=1)
    rel = torch.randn(H, 2 * R + 1, generator=torch.Generator().manual_seed(2))
    i, j = _ij(Lq, Lk)
    add = rel.double()[:, (i - j + R).clamp(0, 2 * R)][None]  # [1, H, Lq, Lk]
    _check(fn, q, k, v, j <= i + 2, add, rel=rel)


def test_table_shape_is_checked(tmp_path):
    fn = _load(tmp_path, "rel_shape", "const R = 3\ninput rel: float[Hq, 2 * R + 1]\nscore s + rel[h, q - kv + R]")
    q, k, v = _qkv(1, 2, 5, 5)
    with pytest.raises(ValueError, match=r"argument 'rel': expected shape \[Hq, 7\] = \[2, 7\]"):
        fn(q, k, v, rel=torch.zeros(2, 5))


def test_table_sized_by_a_param(tmp_path):
    fn = _load(tmp_path, "param_table", "param n = 4\ninput t: float[n]\nmask kv <= q\nscore s + t[kv % n]")
    B, H, L = 1, 2, 9
    q, k, v = _qkv(B, H, L, L, seed=4)
    i, j = _ij(L, L)
    for n in (4, 6):
        t = torch.randn(n, generator=torch.Generator().manual_seed(n))
        _check(fn, q, k, v, j <= i, t.double()[j % n], n=n, t=t)
    with pytest.raises(ValueError, match=r"argument 't': expected shape \[n\] = \[6\]"):
        fn(q, k, v, n=6, t=torch.zeros(4))


# ---- T5: buckets of the signed distance, written once as let functions -------------------------------
T5 = """const NB = 12, E = 3
input t5: float[Hq, NB]
let half(d) = NB // 2
let mag(d) = abs(d) if abs(d) < E else min(E + floor(log2(max(abs(d) // E, 1))), half(d) - 1)
let bucket(d) = mag(d) + (half(d) if d > 0 else 0)
mask kv <= q + 4
score s + t5[h, bucket(q - kv)]
"""


def _t5_bucket(d, NB=12, E=3):
    a = d.abs()
    big = (E + torch.floor(torch.log2(torch.clamp(a // E, min=1).double())).long()).clamp(max=NB // 2 - 1)
    return torch.where(a < E, a, big) + torch.where(d > 0, NB // 2, 0)


def test_t5_bucketed_bias(tmp_path):
    fn = _load(tmp_path, "t5_bias", T5)
    B, H, Lq, Lk = 1, 2, 33, 29
    q, k, v = _qkv(B, H, Lq, Lk, seed=5)
    t5 = torch.randn(H, 12, generator=torch.Generator().manual_seed(6))
    i, j = _ij(Lq, Lk)
    bucket = _t5_bucket(i - j)
    assert set(bucket.unique().tolist()) <= set(range(12)) and bucket.unique().numel() >= 8
    _check(fn, q, k, v, j <= i + 4, t5.double()[:, bucket][None], t5=t5)


# ---- gathers -----------------------------------------------------------------------------------------
GATHER = """const NDOC = 4
input doc: int[B, L]
input offs: int[NDOC]
mask doc[b, q] == doc[b, kv] and kv + offs[doc[b, q]] <= q
"""


def test_gather_in_the_mask_runs_and_plans_exactly(tmp_path):
    fn = _load(tmp_path, "gather_mask", GATHER)
    B, H, L = 2, 2, 23
    g = torch.Generator().manual_seed(7)
    doc = torch.sort(torch.randint(0, 4, (B, L), generator=g), -1).values
    doc[1, -3:] = 9  # out of the table's range: reads offs[3]
    offs = torch.tensor([0, 2, 5, 1])
    q, k, v = _qkv(B, H, L, L, seed=8)
    i, j = _ij(L, L)
    dq, dk = doc[:, None, :, None], doc[:, None, None, :]
    mask = (dq == dk) & (j + offs[dq.clamp(0, 3)] <= i)
    _check(fn, q, k, v, mask, doc=doc, offs=offs)
    _check_plan(fn, mask, L, L, B, H, doc=doc, offs=offs)
    offs2 = torch.tensor([3, 0, 0, 7])  # new values: a new plan, still exact
    mask2 = (dq == dk) & (j + offs2[dq.clamp(0, 3)] <= i)
    _check_plan(fn, mask2, L, L, B, H, doc=doc, offs=offs2)


def test_spatial_bias_gathered_through_a_distance_tensor(tmp_path):
    fn = _load(tmp_path, "spatial", "input dist: int[B, Lq, Lk]\ninput sb: float[Hq, 10]\n"
                                    "mask kv <= q or dist[b, q, kv] < 3\nscore s + sb[h, dist[b, q, kv]]")
    B, H, Lq, Lk = 2, 2, 12, 17
    g = torch.Generator().manual_seed(9)
    dist = torch.randint(-3, 14, (B, Lq, Lk), generator=g)  # some outside [0, 10): clamped
    sb = torch.randn(H, 10, generator=g)
    q, k, v = _qkv(B, H, Lq, Lk, seed=10)
    i, j = _ij(Lq, Lk)
    add = sb.double()[torch.arange(H)[None, :, None, None], dist.clamp(0, 9)[:, None]]
    mask = (j <= i) | (dist[:, None] < 3)
    _check(fn, q, k, v, mask, add, dist=dist, sb=sb)
    _check_plan(fn, mask, Lq, Lk, B, H, dist=dist, sb=sb)


def test_table_read_in_the_mask_plans_exactly(tmp_path):
    """A per-head window table indexed by a bucket of the distance: the plan bounds the read by the
    table's min and max on cells and reads it exactly on single pairs."""
    fn = _load(tmp_path, "table_mask", "input w: int[Hq, 4]\nmask kv <= q and q - kv < w[h, (q - kv) // 4]")
    B, H, L = 1, 3, 21
    w = torch.tensor([[4, 3, 12, 9], [1, 8, 8, 16], [0, 0, 2, 20]])
    i, j = _ij(L, L)
    mask = (j <= i) & (i - j < w[torch.arange(H)[:, None, None], ((i - j) // 4).clamp(0, 3)])[None]
    _check_plan(fn, mask, L, L, B, H, w=w)
    q, k, v = _qkv(B, H, L, L, seed=11)
    _check(fn, q, k, v, mask, w=w)


def test_bool_and_float_tables_in_the_mask_plan_exactly(tmp_path):
    fn = _load(tmp_path, "tables_mask", "input tbl: float[5]\ninput allow: bool[8]\ninput keep: bool[B, Lk]\n"
                                        "mask tbl[abs(q - kv)] > 0.5 and keep[b, kv] or allow[(q - kv) % 8] and kv <= q")
    B, H, Lq, Lk = 2, 1, 18, 23
    g = torch.Generator().manual_seed(12)
    tbl = torch.tensor([0.9, 0.1, 0.7, 0.6, 0.2])  # distances past 4 read tbl[4]
    allow = torch.tensor([True, False, False, True, True, False, True, False])
    keep = torch.rand(B, Lk, generator=g) < 0.8
    i, j = _ij(Lq, Lk)
    mask = ((tbl[(i - j).abs().clamp(max=4)] > 0.5) & keep[:, None, None, :]) | (allow[(i - j) % 8] & (j <= i))
    _check_plan(fn, mask, Lq, Lk, B, H, tbl=tbl, allow=allow, keep=keep)
    q, k, v = _qkv(B, H, Lq, Lk, seed=13)
    _check(fn, q, k, v, mask, tbl=tbl, allow=allow, keep=keep)


def test_index_expressions_on_token_axes_are_clamped_to_the_length(tmp_path):
    """`doc[b, q - 1]` (the previous token's document) and `w[b, kv + 1]` (the next key's weight):
    token axes take index expressions too, clamped to [0, L - 1]."""
    fn = _load(tmp_path, "shifted", "input doc: int[B, L]\ninput w: float[B, Lk]\n"
                                    "mask doc[b, q] == doc[b, kv] or doc[b, q - 1] == doc[b, kv]\n"
                                    "score s + w[b, kv + 1]")
    B, H, L = 2, 2, 19
    g = torch.Generator().manual_seed(14)
    doc = torch.sort(torch.randint(0, 5, (B, L), generator=g), -1).values
    w = torch.randn(B, L, generator=g)
    i, j = _ij(L, L)
    prev = doc[:, (i - 1).clamp(0, L - 1)]  # [B, L, 1]
    mask = ((doc[:, :, None] == doc[:, None, :]) | (prev == doc[:, None, :]))[:, None]
    add = w.double()[:, (j + 1).clamp(0, L - 1)][:, None]  # [B, 1, 1, L]
    _check(fn, *_qkv(B, H, L, L, seed=15), mask, add, doc=doc, w=w)
    _check_plan(fn, mask, L, L, B, H, doc=doc, w=w)


# ---- what check refuses --------------------------------------------------------------------------------
ERRORS = {
    "real_index": ("input t: float[4]\nscore s + t[q / 2]", 3, 13, "an index of 't' must be an integer, not real"),
    "real_index_on_a_token_axis": ("input t: float[Lq]\nscore s + t[q * 0.5]", 3, 13,
                                   "an index of 't' must be an integer, not real"),
    "extent_not_integer": ("input t: float[2.5]\nscore s", 2, 16, "an axis extent of 't' must be an integer"),
    "extent_from_an_index": ("input t: float[q]\nscore s", 2, 1, "an axis extent of 't' may use"),
    "extent_zero": ("const Z = 0\ninput t: float[Z]\nscore s", 3, 1, "must be at least 1"),
    "unknown_axis": ("input t: float[R]\nscore s", 2, 1, "unknown axis 'R' in the shape of 't'"),
    "score_in_index": ("input t: float[4]\nscore s + t[floor(s)]", 3, 13, "cannot depend on the score"),
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_refused_with_file_line_col(name):
    body, line, col, message = ERRORS[name]
    with pytest.raises(SpecError) as err:
        compile_text(f"attention e\n{body}\n", "e.attn")
    text = str(err.value)
    assert f"e.attn:{line}:{col}: error: " in text and message in text, text


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_generated_modules_are_lint_clean(tmp_path):
    from attnc.pipeline import generate_module

    specs = {"t5_bias": T5, "gather_mask": GATHER,
             "rel_bias": "const R = 3\ninput rel: float[Hq, 2 * R + 1]\nmask kv <= q\nscore s + rel[h, q - kv + R]",
             "param_table": "param n = 4\ninput t: float[n]\nmask kv <= q\nscore s + t[kv % n]"}
    for name, body in specs.items():
        (tmp_path / f"{name}.py").write_text(generate_module(compile_text(f"attention {name}\n{body}", f"{name}.attn")))
    run = subprocess.run(["ruff", "check", "--isolated", "--output-format", "concise", "."],
                         check=False, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


# ---- random table reads in masks: plans against brute force --------------------------------------------
_INDEXES = [
    ("q - kv", lambda i, j, doc: i - j),
    ("kv - 2 * q + 5", lambda i, j, doc: j - 2 * i + 5),
    ("q // 3 - kv // 2", lambda i, j, doc: i // 3 - j // 2),
    ("(q ^ kv) % 7", lambda i, j, doc: (i ^ j) % 7),
    ("doc[b, kv]", lambda i, j, doc: doc[:, None, None, :]),
    ("doc[b, kv] - doc[b, kv - 3] + 2",
     lambda i, j, doc: doc[:, None, None, :] - doc[:, (torch.arange(doc.shape[1]) - 3).clamp(min=0)][:, None, None, :] + 2),
    ("abs(q - kv) >> 1", lambda i, j, doc: (i - j).abs() >> 1),
]


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(index=st.sampled_from(_INDEXES), cut=st.integers(-2, 2), causal=st.booleans(), Lq=st.integers(1, 23),
       Lk=st.integers(1, 23), seed=st.integers(0, 1000))
def test_random_table_reads_plan_exactly(tmp_path_factory, index, cut, causal, Lq, Lk, seed):
    text, f = index
    path = tmp_path_factory.mktemp("tab") / "tab_mask.attn"
    path.write_text("attention tab_mask\ninput tab: int[Hq, 6]\ninput doc: int[B, Lk]\n"
                    f"mask tab[h, {text}] > {cut}" + (" and kv <= q" if causal else "") + "\n")
    fn = attnc.load(path)
    B, H = 2, 2
    g = torch.Generator().manual_seed(seed)
    tab = torch.randint(-3, 4, (H, 6), generator=g)
    doc = torch.randint(-1, 8, (B, max(Lq, Lk)), generator=g)[:, :Lk]
    i = torch.arange(Lq)[None, None, :, None]
    j = torch.arange(Lk)[None, None, None, :]
    h = torch.arange(H)[None, :, None, None]
    idx = f(i, j, doc)
    want = tab[h, torch.as_tensor(idx).clamp(0, 5)] > cut
    if causal:
        want = want & (j <= i)
    _check_plan(fn, torch.broadcast_to(want, (B, H, Lq, Lk)), Lq, Lk, B, H, tab=tab, doc=doc)
