"""Tier-3 normalizations as kernels (Triton, through the interpreter on the CPU) against hand-written formulas.

sigmoid, relu, softplus and softplus_reweight run the general multi-pass kernels with the backward
derived by sympy (attnc/analysis/rowgrad.py); sink_softmax1 and temperature run the online-softmax
kernels. Everything is checked forward and backward (dq, dk, dv, learnable inputs) against
tests/formulas.py in float64, with the tolerances of design.md as max|got - ref| / max|ref|: fp32 2e-3
forward and 5e-3 backward, fp16 1e-2, bf16 2e-2. No output or gradient may hold NaN or inf.

Shapes are small and odd (the interpreter is slow): L = 37, Dqk = 24, Dv = 40, GQA and DiffQKV heads.
A few specs written here (not in the catalog) cover what the catalog does not: a counted `visible`, a
`rowmax`, a learnable input, fully masked rows; their formulas are written here too.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import math  # noqa: E402
import sys  # noqa: E402
from functools import lru_cache  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import attnc  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import formulas as F  # noqa: E402
from compare import check_close  # noqa: E402


def check(what, got, ref, tol):
    check_close(what, got, ref, tol, finite=True)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TOL = {torch.float32: (2e-3, 5e-3), torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 2e-2)}
GENERAL = ["sigmoid", "relu", "softplus", "softplus_reweight"]
SOFTMAX = ["sink_softmax1", "temperature"]


@lru_cache(maxsize=None)
def load(name):
    return attnc.load(EXAMPLES / f"{name}.attn")


@lru_cache(maxsize=None)
def load_text(text):
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="attnc-tier3-")) / "spec.attn"
    path.write_text(text)
    return attnc.load(path)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_qkv(B, heads, lens, dims, dtype=torch.float32, seed=0, qk_gain=1.0):
    (Hq, Hk, Hv), (Lq, Lk), (Dqk, Dv) = heads, lens, dims
    g = _gen(seed)
    q = (qk_gain * torch.randn(B, Hq, Lq, Dqk, generator=g)).to(dtype).requires_grad_()
    k = (qk_gain * torch.randn(B, Hk, Lk, Dqk, generator=g)).to(dtype).requires_grad_()
    v = torch.randn(B, Hv, Lk, Dv, generator=g).to(dtype).requires_grad_()
    return q, k, v


def learnables(name, Hq):
    if name == "temperature":
        return {"temp": 0.5 + torch.rand(Hq, generator=_gen(7), dtype=torch.float64)}
    return {}






def run_and_check(attn, formula, q, k, v, plain=None, learn=None, dtype=torch.float32, scale=None,
                  has_lse=False, compare_grads=True):
    """One forward and one backward through the kernels; o and every gradient against the float64
    formula on the same (rounded) inputs (gradients only checked finite with compare_grads=False).
    Returns the kernel's o."""
    plain = plain or {}
    learn = {n: t.to(dtype).requires_grad_() for n, t in (learn or {}).items()}
    fwd_tol, bwd_tol = TOL[dtype]
    extra = {} if scale is None else {"scale": scale}
    out = attn(q, k, v, return_lse=has_lse, **plain, **learn, **extra)
    o = out[0] if has_lse else out
    assert o.dtype == q.dtype
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, *learn.values())]
    ref = formula(*leaves[:3], scale=scale, **plain, **dict(zip(learn, leaves[3:])))
    ro, rlse = ref if isinstance(ref, tuple) else (ref, None)
    check("o", o, ro, fwd_tol)
    if has_lse:
        fin = torch.isfinite(rlse)
        assert torch.equal(torch.isfinite(out[1]), fin)
        check("lse", out[1][fin], rlse[fin], fwd_tol)
    do = torch.randn(o.shape, generator=_gen(99)).to(dtype)
    got = torch.autograd.grad(o, (q, k, v, *learn.values()), do)
    want = torch.autograd.grad(ro, leaves, do.double())
    for name, g_, w in zip(["dq", "dk", "dv", *[f"d{n}" for n in learn]], got, want):
        if compare_grads:
            check(name, g_, w, bwd_tol)
        assert torch.isfinite(g_).all(), f"{name}: NaN or inf in the kernel's gradient"
    return o


# ----------------------------------------------------------------------------------------------
# The catalog's six entries
# ----------------------------------------------------------------------------------------------
def test_every_general_normalization_runs_kernels():
    for name in GENERAL:
        assert load(name).has_kernels and not load(name).has_lse


@pytest.mark.parametrize("name", GENERAL + SOFTMAX)
def test_kernels_fp32_gqa(name):
    """GQA (4 query heads on 2 key heads and 1 value head), odd length, Dqk != Dv, non-power-of-two dims."""
    q, k, v = make_qkv(1, (4, 2, 1), (37, 37), (24, 40))
    run_and_check(load(name), getattr(F, name), q, k, v, learn=learnables(name, 4), has_lse=name in SOFTMAX)


@pytest.mark.parametrize("name", GENERAL)
def test_kernels_fp32_cross_diffqkv(name):
    """Lq != Lk, batch 2, DiffQKV heads (Hk = 1 != Hv = 3), an explicit scale, a non-default parameter."""
    plain = {"tau": 0.5, "p": 2.0} if name == "softplus_reweight" else {"bias": -1.5} if name == "sigmoid" else {}
    q, k, v = make_qkv(2, (3, 1, 3), (19, 45), (32, 20), seed=1)
    run_and_check(load(name), getattr(F, name), q, k, v, plain, scale=0.3)


def test_noncontiguous_inputs():
    """Transposed, sliced views of q, k, v: the kernels take strides."""
    g = _gen(13)
    q, k, v = (torch.randn(1, 23, 2, d + 3, generator=g)[..., :d].transpose(1, 2).requires_grad_()
               for d in (24, 24, 16))
    assert not q.is_contiguous()
    run_and_check(load("softplus_reweight"), F.softplus_reweight, q, k, v)


def test_rows_with_one_visible_key():
    """Causal row 0 sees one key: visible = 1, log(visible) = 0, so softplus weighs it softplus(0) / softplus(0)
    = 1 and o[0] = v[0]; re-weighting gives relu(1 * 1 - tau) = 0 there with tau = 1 and falls back to A."""
    q, k, v = make_qkv(1, (2, 2, 2), (5, 5), (16, 16), seed=2)
    for name in ("softplus", "softplus_reweight"):
        o = run_and_check(load(name), getattr(F, name), q, k, v)
        torch.testing.assert_close(o[:, :, 0], v[:, :, 0].detach(), rtol=1e-6, atol=1e-6)
    o = run_and_check(load("relu"), F.relu, q, k, v)
    s00 = (q[:, :, 0] * k[:, :, 0]).sum(-1, keepdim=True).detach() / 4.0
    torch.testing.assert_close(o[:, :, 0], torch.relu(s00) * v[:, :, 0].detach(), rtol=1e-5, atol=1e-6)


def test_reweighting_falls_back_in_some_rows_and_not_others():
    """With the defaults (tau = 1), row 0 falls back to A and the other rows do not: both branches of the
    Piecewise, forward and backward, in one call."""
    q, k, v = make_qkv(1, (2, 1, 1), (37, 37), (24, 24), seed=3)
    S = F.scores(q.double(), k.double().expand(-1, 2, -1, -1))
    _, fallback = F.softplus_reweight_weights(S, F.mask_causal(37, 37).expand(S.shape))
    assert fallback.any() and not fallback.all()
    run_and_check(load("softplus_reweight"), F.softplus_reweight, q, k, v)


def test_reweighting_falls_back_everywhere_for_large_tau():
    """visible * A <= visible < tau: R = 0 in every row, so the output and gradients are softplus's."""
    q, k, v = make_qkv(1, (2, 2, 1), (37, 37), (24, 24), seed=4)
    o = run_and_check(load("softplus_reweight"), F.softplus_reweight, q, k, v, {"tau": 1e3})
    torch.testing.assert_close(o, load("softplus")(q, k, v), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Robustness
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", GENERAL + ["sink_softmax1"])
def test_large_scores_fp32(name):
    """|S| up to 1e4: sigmoid and softplus saturate, relu is linear in huge values; nothing overflows.

    A softmax this sharp is one-hot: its exact gradients are ~1e-198, below fp32's rounding of
    dP - delta, so for sink_softmax1 they are only checked to be finite."""
    q, k, v = make_qkv(1, (2, 1, 1), (37, 37), (24, 24), seed=5)
    raw = (q.detach() @ k.detach().transpose(-1, -2)).abs().max().item()
    scale = 1e4 / raw
    run_and_check(load(name), getattr(F, name), q, k, v, scale=scale, has_lse=name in SOFTMAX,
                  compare_grads=name not in SOFTMAX)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", GENERAL)
def test_half_precision(name, dtype):
    """fp16/bf16 inputs (fp32 accumulation inside) against the float64 formula on the same rounded inputs."""
    q, k, v = make_qkv(1, (2, 1, 2), (37, 37), (24, 40), dtype, seed=6)
    run_and_check(load(name), getattr(F, name), q, k, v, dtype=dtype)


@pytest.mark.parametrize("name", GENERAL)
def test_return_lse_is_a_clear_error(name):
    q, k, v = make_qkv(1, (1, 1, 1), (3, 3), (8, 8))
    with pytest.raises(ValueError, match=rf"{name}: argument 'return_lse'.*no log-sum-exp"):
        load(name)(q, k, v, return_lse=True)


def test_backward_is_deterministic():
    q, k, v = make_qkv(1, (4, 1, 1), (37, 37), (24, 24), seed=8)
    attn = load("softplus_reweight")
    do = torch.randn(1, 4, 37, 24, generator=_gen(1))
    first = torch.autograd.grad(attn(q, k, v), (q, k, v), do)
    second = torch.autograd.grad(attn(q, k, v), (q, k, v), do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# New normalizations need only a spec: counted visible, rowmax, learnable inputs, empty rows
# ----------------------------------------------------------------------------------------------
def _document_softplus(q, k, v, doc_ids, scale=None):
    """LSSA within causal documents: visible is counted (the mask is not linear in kv)."""
    k, v = F.expand_heads(q, k, v)
    S = F.scores(q, k, scale)
    M = F.mask_document(doc_ids)  # [B, 1, L, L], causal included
    return F.softplus_weights(S, M.expand(S.shape))[0] @ v


def _max_normalized(q, k, v, scale=None):
    """exp(S - rowmax S) / N_i over causal keys: a rowmax that is not a softmax."""
    k, v = F.expand_heads(q, k, v)
    S = F.scores(q, k, scale)
    M = F.mask_causal(q.shape[2], k.shape[2]).expand(S.shape)
    m = torch.where(M, S, torch.full_like(S, -math.inf)).amax(-1, keepdim=True)
    W = torch.where(M, torch.exp(S - m), torch.zeros_like(S))
    return W / M.sum(-1, keepdim=True) @ v


def _windowed_sigmoid(q, k, v, bias, window, scale=None):
    k, v = F.expand_heads(q, k, v)
    S = F.scores(q, k, scale)
    i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
    M = (j <= i) & (i - j < window)
    return torch.where(M, torch.sigmoid(S + bias.view(1, -1, 1, 1)), torch.zeros_like(S)) @ v


DOC_SOFTPLUS = """attention document_softplus
input doc_ids: int[B, L]
mask doc_ids[b, q] == doc_ids[b, kv] and kv <= q
probs softplus(log(visible) * score) / rowsum(softplus(log(visible) * score))
"""
MAX_NORMALIZED = """attention max_normalized
mask kv <= q
probs exp(score - rowmax(score)) / visible
"""
WINDOWED_SIGMOID = """attention windowed_sigmoid
input bias: float[Hq] learnable
param window = 8
mask kv <= q and q - kv < window
probs sigmoid(score + bias[h])
"""


def test_counted_visible():
    q, k, v = make_qkv(2, (2, 1, 1), (37, 37), (24, 24), seed=9)
    doc_ids = torch.stack([torch.randint(0, 4, (37,), generator=_gen(b)).sort().values for b in range(2)])
    run_and_check(load_text(DOC_SOFTPLUS), _document_softplus, q, k, v, {"doc_ids": doc_ids})


def test_rowmax_statistic():
    q, k, v = make_qkv(1, (2, 2, 2), (37, 37), (24, 24), seed=10)
    run_and_check(load_text(MAX_NORMALIZED), _max_normalized, q, k, v)


START_VISIBLE = """attention start_visible
input start: int[B]
mask kv <= q and kv >= start[b]
probs exp(score - rowmax(score) / visible) / visible
"""


def _start_visible(q, k, v, start, scale=None):
    """Keys from start[b] on, causal: visible in closed form reads an input, and so does the row
    adjoint of rowmax (it reads visible). Rows before start[b] see no key."""
    k, v = F.expand_heads(q, k, v)
    S = F.scores(q, k, scale)
    i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
    M = ((j <= i) & (j >= start.view(-1, 1, 1, 1))).expand(S.shape)
    n = M.sum(-1, keepdim=True).clamp(min=1).double()
    m = torch.where(M, S, torch.full_like(S, -math.inf)).amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return torch.where(M, torch.exp(S - m / n), torch.zeros_like(S)) / n @ v


def test_row_adjoint_reads_a_closed_form_visible_that_reads_an_input():
    q, k, v = make_qkv(2, (2, 1, 1), (37, 37), (24, 24), seed=13)
    run_and_check(load_text(START_VISIBLE), _start_visible, q, k, v, {"start": torch.tensor([0, 9])})


def test_learnable_input_of_a_general_normalization():
    q, k, v = make_qkv(1, (4, 2, 2), (37, 37), (24, 24), seed=11)
    bias = torch.randn(4, generator=_gen(3), dtype=torch.float64)
    run_and_check(load_text(WINDOWED_SIGMOID), _windowed_sigmoid, q, k, v, {"window": 8}, {"bias": bias})


def test_fully_masked_rows_output_zero_and_zero_gradients():
    """window = 0: no key is visible anywhere. o = 0 exactly; every gradient 0, never NaN."""
    q, k, v = make_qkv(1, (2, 1, 1), (9, 9), (16, 16), seed=12)
    bias = torch.randn(2, generator=_gen(4)).requires_grad_()
    o = load_text(WINDOWED_SIGMOID)(q, k, v, window=0, bias=bias)
    assert (o == 0).all()
    for g_ in torch.autograd.grad(o, (q, k, v, bias), torch.randn_like(o)):
        assert torch.isfinite(g_).all() and (g_ == 0).all()
