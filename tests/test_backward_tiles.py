"""The backward at the anchors' tile shapes (issue 17): its walks, head groups and masks, against float64
formulas written in tests/formulas.py (independent of the compiler), forward and backward.

What changed and is exercised here:
- dK/dV programs walk GROUP query heads, a constexpr; groups that do not divide Hq (Hq = 3 on Hk = 2)
  run per query head and are summed on the host (launch.sum_head_groups);
- FULL tiles load without length masks, so every tile a length cuts must be visited as PARTIAL:
  lengths that are multiples of the interpreter's 16 x 16 tiles (DIVISIBLE) and lengths that are not,
  Lq < Lk and Lq > Lk;
- one-sided bands (causal) drop loops statically; two-sided bands (sliding windows) keep them;
- a score transform's derivative is folded into p (softcap); plain scores have no derivative tile.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from attnc.runtime import launch

import attnc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import formulas as F

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

HEADS = {  # (Hq, Hk, Hv)
    "mha": (2, 2, 2),
    "gqa": (4, 2, 2),
    "uneven": (3, 2, 2),  # groups of 2 and 1 query heads
    "diffqkv": (4, 2, 1),  # dK and dV have their own groups
}
LENGTHS = {"divisible": (32, 32), "cut": (37, 37), "short_q": (21, 45), "long_q": (45, 21)}
CASES = [  # (spec, formula, inputs): the examples whose walks differ
    ("causal", F.causal, {}),  # band open below (lo = 0)
    ("sliding_window", lambda q, k, v: F.sliding_window(q, k, v, window=9), {"window": 9}),  # two-sided band
    ("full", F.full, {}),  # every tile
    ("softcap", lambda q, k, v: F.softcap(q, k, v, cap=5.0), {"cap": 5.0}),  # a derivative tile
]


def _qkv(heads, lengths, seed=0, D=16):
    g = torch.Generator().manual_seed(seed)
    (Hq, Hk, Hv), (Lq, Lk) = heads, lengths
    return (torch.randn(2, Hq, Lq, D, generator=g), torch.randn(2, Hk, Lk, D, generator=g),
            torch.randn(2, Hv, Lk, D, generator=g))


def _check(attn, formula, q, k, v, **inputs):
    """Kernels against the float64 formula: o, and dq, dk, dv through autograd."""
    q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    with launch.count_visits() as log:
        o = attn(q, k, v, **inputs)
    assert log, "the kernels did not run"
    qd, kd, vd = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    want = formula(qd, kd, vd)[0]
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    o.backward(g.float())
    want.backward(g)
    for name, got, ref in (("o", o, want), ("dq", q.grad, qd.grad), ("dk", k.grad, kd.grad),
                           ("dv", v.grad, vd.grad)):
        err = (got.double() - ref).abs().max().item()
        assert err <= 2e-3 * max(ref.abs().max().item(), 1e-3), f"{name}: {err:.2e}"


@pytest.mark.parametrize("spec,formula,inputs", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
def test_walks_at_divisible_and_cut_lengths(spec, formula, inputs, lengths):
    attn = attnc.load(EXAMPLES / f"{spec}.attn")
    _check(attn, formula, *_qkv(HEADS["gqa"], lengths), **inputs)


@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("spec", ["causal", "full"])
def test_head_groups(spec, heads):
    attn = attnc.load(EXAMPLES / f"{spec}.attn")
    _check(attn, getattr(F, spec), *_qkv(heads, LENGTHS["cut"]))


# more key heads than query heads (Hk > Hq) is refused: tests/test_inline_and_layout.py


def test_document_plan_walk_at_cut_lengths():
    attn = attnc.load(EXAMPLES / "document.attn")
    for L in (32, 37):
        doc_ids = torch.tensor([[0] * 10 + [1] * (L - 20) + [2] * 10, [0] * (L - 5) + [1] * 5])
        q, k, v = _qkv(HEADS["uneven"], (L, L))
        _check(attn, lambda q, k, v, ids=doc_ids: F.document(q, k, v, ids), q, k, v, doc_ids=doc_ids)


def test_sum_head_groups_matches_a_loop():
    x = torch.randn(2, 7, 5, 3, dtype=torch.float64)
    for groups in (1, 2, 3, 4, 7, 9):
        want = torch.zeros(2, groups, 5, 3, dtype=torch.float64)
        for h in range(7):  # the groups of the kernels' head mapping: g = floor(h * groups / Hq)
            want[:, h * groups // 7] += x[:, h]
        assert torch.equal(launch.sum_head_groups(x, groups), want)


def test_lengths_divide_tiles_and_base2_lse():
    assert launch.lengths_divide_tiles(32, 48) and not launch.lengths_divide_tiles(32, 40)  # interpreter: 16
    lse = torch.tensor([0.0, 1.0, float("-inf")])
    assert torch.equal(launch.lse_base2(lse), torch.tensor([0.0, 1.0 / math.log(2), float("inf")]))


def test_generated_backward_has_no_runtime_head_loop_or_plain_derivative_tile():
    causal = attnc.build_source(EXAMPLES / "causal.attn")
    assert "for head_in_group in range(GROUP):" in causal and "range(h_first, h_end)" not in causal
    assert "dscore" not in causal  # plain scores: no derivative tile
    assert "if not DIVISIBLE:" in causal  # the tile cut by a length has its own loop, compiled away
    softcap = attnc.build_source(EXAMPLES / "softcap.attn")
    assert "pT_dscore = pT * dscore" in softcap
    assert softcap.count("rt.tanh(") == 4  # forward, dQ, dK/dV, decode: once per tile, shared with dscore


@pytest.mark.parametrize("heads", [HEADS["gqa"], HEADS["uneven"], HEADS["diffqkv"]], ids=["gqa", "uneven", "diffqkv"])
def test_general_family_dk_and_dv_in_two_launches(heads):
    """softplus reads a row statistic, so its dK and dV run as two launches (GeneralBody.split_dkdv)."""
    attn = attnc.load(EXAMPLES / "softplus.attn")
    assert "groups = [(Hk, True, False), (Hv, False, True)]" in attnc.build_source(EXAMPLES / "softplus.attn")
    _check(attn, lambda q, k, v: (F.softplus(q, k, v),), *_qkv(heads, LENGTHS["cut"]))
