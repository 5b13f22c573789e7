"""tanh in the kernels is accurate for small arguments (issue 22, item 5).

The old rt.tanh, (1 - exp(-2|x|)) / (1 + exp(-2|x|)), cancels near 0: its error is an ulp of 1, not of
tanh(x), so softcap's cap * tanh(s / cap) lost accuracy as the cap grew (max abs error 3.6e-4 at
cap 1e4, 1.03 at 1e8). Here the softmax kernels (forward and backward), the general kernels and the
decode kernel run a softcapped score at caps 50 .. 1e8 against float64 formulas written below."""
import math
import sys
from pathlib import Path

import pytest
import torch

import attnc
from attnc.runtime import launch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import relerr

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CAPS = [50.0, 1e4, 1e6, 1e8]
TOL = 1e-5  # relative to the output's scale: fp32 rounding, far below the old error at cap >= 1e4


def _qkv(Lq=37, Lk=37, H=2, D=16, seed=0, scale=3.0):
    # scale > 1 spreads the scores (|s| up to ~15) so the softmax is far from uniform
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(1, H, Lq, D, generator=g), torch.randn(1, H, Lk, D, generator=g),
            torch.randn(1, H, Lk, D, generator=g))


def _scores(q, k):
    return (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])


def _causal(Lq, Lk):
    return torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None]


@pytest.mark.parametrize("cap", CAPS)
def test_softcap_softmax_kernels_match_float64(cap):
    attn = attnc.load(EXAMPLES / "softcap.attn")
    q, k, v = (x.requires_grad_(True) for x in _qkv())
    with launch.count_visits() as log:
        o = attn(q, k, v, cap=cap)
    assert log, "the kernels did not run"
    qd, kd, vd = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    s = cap * torch.tanh(_scores(qd, kd) / cap)
    want = torch.softmax(s.masked_fill(~_causal(37, 37), -math.inf), -1) @ vd
    assert relerr(o, want) <= TOL
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    o.backward(g.float())
    want.backward(g)
    for got, ref in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert relerr(got, ref) <= 10 * TOL  # the backward sums more terms


@pytest.mark.parametrize("cap", CAPS)
def test_softcap_general_kernels_match_float64(cap, tmp_path):
    """A general (non-softmax) normalization with a softcapped score: relu weights over visible."""
    path = tmp_path / "capped_relu.attn"
    path.write_text("attention capped_relu\nparam cap = 50.0\nmask kv <= q\n"
                    "probs relu(cap * tanh(score / cap)) / visible\n")
    attn = attnc.load(path)
    q, k, v = _qkv()
    with launch.count_visits() as log:
        o = attn(q, k, v, cap=cap)
    assert log, "the kernels did not run"
    keep = _causal(37, 37)
    w = torch.relu(cap * torch.tanh(_scores(q, k) / cap)) * keep / keep.sum(-1, keepdim=True)
    assert relerr(o, w @ v.double()) <= TOL


@pytest.mark.parametrize("cap", [50.0, 1e8])
def test_softcap_decode_matches_float64(cap):
    attn = attnc.load(EXAMPLES / "softcap.attn")
    B, H, CAP, D, Lnew = 2, 2, 48, 16, 3
    g = torch.Generator().manual_seed(3)
    q = 3.0 * torch.randn(B, H, Lnew, D, generator=g)
    k, v = torch.randn(B, H, CAP, D, generator=g), torch.randn(B, H, CAP, D, generator=g)
    lengths = torch.tensor([37, 20], dtype=torch.int32)
    with launch.count_visits() as log:
        o = attn.decode(q, k, v, lengths, cap=cap)
    assert log, "the decode kernel did not run"
    want = torch.zeros(B, H, Lnew, D, dtype=torch.float64)
    for b, L in enumerate(lengths.tolist()):
        keep = torch.arange(L)[None, :] <= torch.arange(L - Lnew, L)[:, None]
        s = cap * torch.tanh(_scores(q[b], k[b, :, :L]) / cap)
        want[b] = torch.softmax(s.masked_fill(~keep, -math.inf), -1) @ v[b, :, :L].double()
    assert relerr(o, want) <= TOL


def test_verify_draws_float_params_across_magnitudes_inside_their_domain():
    """`attnc verify` runs a float param at its default times 0.5 .. 1e6 (the old tanh failed there at
    cap = 5e5: 8e-3 > 2e-3), skipping values outside the param's `where` condition."""
    from attnc.pipeline import compile_file, compile_text
    from attnc.verify import cases, verify_variant

    path = EXAMPLES / "softcap.attn"
    drawn = [c.params["cap"] for c in cases(compile_file(path)) if c.params]
    assert drawn == [25.0, 5000.0, 500000.0, 50000000.0]
    bounded = compile_text("attention t\nparam cap = 50.0 where cap > 0 and cap < 1e5\nscore cap * tanh(s / cap)\n")
    assert [c.params["cap"] for c in cases(bounded) if c.params] == [25.0, 5000.0]
    rows = verify_variant(path, attnc.load(path))
    assert {r.case for r in rows} >= {"cap=500000", "cap=5e+07"}
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]
