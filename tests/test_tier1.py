"""Tier-1 kernels (Triton, through the interpreter on the CPU) against the hand-written formulas.

Every tier-1 catalog entry is loaded from examples/<name>.attn with attnc.load and checked, forward
(o and lse) and backward (dq, dk, dv and the gradient of every learnable input), against
tests/formulas.py evaluated in float64. Tolerances (design.md), as max|got - ref| / max|ref|:
fp32 inputs 2e-3 forward and 5e-3 backward, fp16 1e-2, bf16 2e-2; NaN never passes.

Shapes are tiny and odd (the interpreter is slow): Lq = Lk = 37 (75 for moa, whose 64 global keys
would otherwise hide the band), cross attention 19 x 45, Dqk = 40, GQA/MQA head layouts.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import math
import re
import sys
from functools import cache
from pathlib import Path

import pytest
import torch

import attnc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import formulas as F
from compare import check_close

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TOL = {torch.float32: (2e-3, 5e-3), torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 2e-2)}


@cache
def load(name):
    """Fails (AttributeError) rather than skipping while attnc.load does not exist."""
    return attnc.load(EXAMPLES / f"{name}.attn")


# ----------------------------------------------------------------------------------------------
# The variants: head layout, lengths, and extra inputs (non-default scalars, tensors, learnables)
# ----------------------------------------------------------------------------------------------
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _doc_ids(B, L):
    """Sorted document ids with uneven lengths, different per batch row."""
    g = _gen(11)
    return torch.stack([torch.randint(0, 4, (L,), generator=g).sort().values for _ in range(B)])


VARIANTS = {
    # name: (extra inputs factory (B, Hq, Lq, Lk) -> (plain kwargs, learnable kwargs), options)
    "full": (lambda B, H, Lq, Lk: ({}, {}), {}),
    "causal": (lambda B, H, Lq, Lk: ({}, {}), {}),
    "sliding_window": (lambda B, H, Lq, Lk: ({"window": 7}, {}), {}),
    "prefix_lm": (lambda B, H, Lq, Lk: ({"prefix": 5}, {}), {}),
    "document": (lambda B, H, Lq, Lk: ({"doc_ids": _doc_ids(B, Lq)}, {}), {"cross": False}),
    "alibi": (lambda B, H, Lq, Lk: ({}, {"slopes": 0.05 + 0.5 * torch.rand(H, generator=_gen(1))}),
              {}),
    "softcap": (lambda B, H, Lq, Lk: ({"cap": 2.0}, {}), {}),
    "streaming_sink": (lambda B, H, Lq, Lk: ({"sinks": 3, "window": 5}, {}), {}),
    "sink_logit": (lambda B, H, Lq, Lk: ({}, {"sink": torch.randn(H, generator=_gen(2)) + 1.0}), {}),
    "zerotuning": (lambda B, H, Lq, Lk: ({}, {"gamma": 0.3 + 3 * torch.rand(H, generator=_gen(3))}),
                   {}),
    "moa": (lambda B, H, Lq, Lk: ({"band": torch.tensor([1, 4, 9, 70][:H] + [5] * (H - 4))}, {}),
            {"L": 75, "cross_lens": (83, 70)}),
    "diffqkv": (lambda B, H, Lq, Lk: ({}, {}),
                {"heads": (4, 1, 2), "dims": (24, 40), "cross_heads": (4, 2, 4)}),
}
NAMES = sorted(VARIANTS)


def shapes(name, case):
    """(B, (Hq, Hk, Hv), (Lq, Lk), (Dqk, Dv)) for case 'self' or 'cross'."""
    opts = VARIANTS[name][1]
    dims = opts.get("dims", (40, 40))
    if case == "self":
        L = opts.get("L", 37)
        return 1, opts.get("heads", (4, 2, 1)), (L, L), dims
    return 2, opts.get("cross_heads", (4, 1, 2)), opts.get("cross_lens", (19, 45)), \
        (dims[0], 32 if name != "diffqkv" else dims[1])


def make_inputs(name, case, dtype=torch.float32, seed=0, noncontiguous=False):
    """q, k, v and the extra inputs; learnable ones (and q, k, v) require grad."""
    B, (Hq, Hk, Hv), (Lq, Lk), (Dqk, Dv) = shapes(name, case)
    g = _gen(seed)

    def rnd(b, h, l, d):
        if noncontiguous:  # a transposed, sliced view: padded rows, heads and length swapped
            x = torch.randn(b, l, h, d + 3, generator=g).to(dtype)[..., :d].transpose(1, 2)
            assert not x.is_contiguous()
        else:
            x = torch.randn(b, h, l, d, generator=g).to(dtype)
        return x.requires_grad_(True)

    q, k, v = rnd(B, Hq, Lq, Dqk), rnd(B, Hk, Lk, Dqk), rnd(B, Hv, Lk, Dv)
    plain, learn = VARIANTS[name][0](B, Hq, Lq, Lk)
    learn = {n: t.to(dtype).requires_grad_(True) for n, t in learn.items()}
    return q, k, v, plain, learn


def reference(name, q, k, v, plain, learn, scale=None):
    """float64 formula: (o, lse) and a grad function for (q, k, v, *learnables)."""
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, *learn.values())]
    kw = dict(plain, **dict(zip(learn, leaves[3:])))
    o, lse = getattr(F, name)(*leaves[:3], scale=scale, **kw)

    def grads(do):
        return torch.autograd.grad(o, leaves, do.double())
    return o, lse, grads






def run_and_check(name, q, k, v, plain, learn, dtype=torch.float32, scale=None):
    """One forward with return_lse, one backward through o; everything against float64 formulas."""
    attn = load(name)
    fwd_tol, bwd_tol = TOL[dtype]
    extra = {} if scale is None else {"scale": scale}
    o, lse = attn(q, k, v, return_lse=True, **plain, **learn, **extra)
    ro, rlse, rgrads = reference(name, q, k, v, plain, learn, scale)
    assert o.dtype == q.dtype and o.shape == ro.shape
    check_close("o", o, ro, fwd_tol)
    assert lse.shape == rlse.shape
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin), "lse finite pattern differs"
    check_close("lse", lse.float()[fin], rlse[fin], fwd_tol)
    do = torch.randn(o.shape, generator=_gen(99)).to(dtype)
    leaves = (q, k, v, *learn.values())
    got = torch.autograd.grad(o, leaves, do)
    want = rgrads(do)
    for n, g_, w in zip(["dq", "dk", "dv", *[f"d{n}" for n in learn]], got, want):
        assert g_.shape == w.shape, n
        check_close(n, g_, w, bwd_tol)


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_reference_matches_formula(name):
    """attn.reference (eager, generated) against the hand-written formula, float64, with grads."""
    attn = load(name)
    for case in ("self", "cross") if VARIANTS[name][1].get("cross", True) else ("self",):
        q, k, v, plain, learn = make_inputs(name, case, torch.float64)
        r = attn.reference(q, k, v, **plain, **learn)
        ro, rlse, rgrads = reference(name, q, k, v, plain, learn)
        o = r[0] if isinstance(r, tuple) else r
        check_close("reference o", o, ro, 1e-9)
        r2 = attn.reference(q, k, v, return_lse=True, **plain, **learn)
        assert isinstance(r2, tuple) and len(r2) == 2
        fin = torch.isfinite(rlse)
        assert torch.equal(torch.isfinite(r2[1]), fin)
        # the lse may be kept in float32 (as kernels keep it) even for float64 inputs
        lse_tol = 1e-9 if r2[1].dtype == torch.float64 else 1e-6
        check_close("reference lse", r2[1][fin], rlse[fin], lse_tol)
        do = torch.randn(o.shape, generator=_gen(5), dtype=torch.float64)
        got = torch.autograd.grad(o, (q, k, v, *learn.values()), do)
        for n, g_, w in zip(["dq", "dk", "dv", *learn], got, rgrads(do)):
            check_close(f"reference d{n}", g_, w, 1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_kernel_fp32_self(name):
    q, k, v, plain, learn = make_inputs(name, "self")
    run_and_check(name, q, k, v, plain, learn)
    # return_lse=False returns the tensor alone, equal to the first output
    o = load(name)(q, k, v, **plain, **learn)
    assert isinstance(o, torch.Tensor)
    assert torch.equal(o, load(name)(q, k, v, return_lse=True, **plain, **learn)[0])


@pytest.mark.parametrize("name", [n for n in NAMES if VARIANTS[n][1].get("cross", True)])
def test_kernel_fp32_cross_attention_and_scale(name):
    """Lq != Lk, batch 2, MQA keys, Dv != Dqk, and an explicit scale."""
    q, k, v, plain, learn = make_inputs(name, "cross", seed=1)
    run_and_check(name, q, k, v, plain, learn, scale=0.3)


@pytest.mark.parametrize("name", NAMES)
def test_kernel_noncontiguous_inputs(name):
    q, k, v, plain, learn = make_inputs(name, "self", seed=2, noncontiguous=True)
    run_and_check(name, q, k, v, plain, learn)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_kernel_half_precision(name, dtype):
    """fp16/bf16 inputs against the float64 formula on the same (rounded) inputs."""
    q, k, v, plain, learn = make_inputs(name, "self", dtype, seed=3)
    run_and_check(name, q, k, v, plain, learn, dtype)


@pytest.mark.parametrize("name,params", [
    ("sliding_window", {"window": 0}),          # i - j < 0 never holds: every row is empty
    ("streaming_sink", {"sinks": 0, "window": 0}),
])
def test_fully_masked_rows(name, params):
    q, k, v, _, _ = make_inputs(name, "self", seed=4)
    o, lse = load(name)(q, k, v, return_lse=True, **params)
    assert (o == 0).all(), "fully masked rows must output exactly 0"
    assert (lse == -math.inf).all(), "fully masked rows must have lse = -inf"
    grads = torch.autograd.grad(o, (q, k, v), torch.randn_like(o))
    for g_ in grads:
        assert torch.isfinite(g_).all()
        assert (g_ == 0).all()
    ro, rlse = getattr(F, name)(q.double(), k.double(), v.double(), **params)
    assert (ro == 0).all() and (rlse == -math.inf).all()


# -- argument errors: ValueError naming the argument --------------------------------------------
def _raises_naming(arg, fn):
    with pytest.raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert re.search(rf"\b{re.escape(arg)}\b", msg), f"message does not name {arg!r}: {msg}"


def test_error_wrong_rank_and_shapes():
    attn = load("causal")
    q, k, v, _, _ = make_inputs("causal", "self")
    q, k, v = q.detach(), k.detach(), v.detach()
    _raises_naming("q", lambda: attn(q[0], k, v))
    _raises_naming("k", lambda: attn(q, k[..., :-1], v))                  # Dqk differs from q's
    _raises_naming("v", lambda: attn(q, k, v[:, :, :-1]))                 # Lk differs from k's
    with pytest.raises(ValueError, match=r"causal: argument 'k': batch size 2 differs from q's 1"):
        attn(q, k.expand(2, -1, -1, -1), v)                                # batch differs


def test_error_dtype_mismatch():
    attn = load("causal")
    q, k, v, _, _ = make_inputs("causal", "self")
    _raises_naming("k", lambda: attn(q.detach(), k.detach().half(), v.detach()))


def test_error_missing_and_bad_tensor_inputs():
    q, k, v, plain, learn = make_inputs("alibi", "self")
    _raises_naming("slopes", lambda: load("alibi")(q, k, v))
    _raises_naming("slopes", lambda: load("alibi")(q, k, v, slopes=learn["slopes"][:-1]))
    q, k, v, plain, _ = make_inputs("document", "self")
    _raises_naming("doc_ids", lambda: load("document")(q, k, v))
    _raises_naming("doc_ids", lambda: load("document")(q, k, v, doc_ids=plain["doc_ids"][:, :-1]))
    with pytest.raises(ValueError, match=r"document: argument '(k|doc_ids)': .*(Lq == Lk|shape)"):  # needs Lq == Lk
        load("document")(q[:, :, :-2], k, v, doc_ids=plain["doc_ids"])


def test_int_params_take_the_int64_range_and_say_it():
    """2**63 - 1 is a valid int param (it used to read as 'expected an integer'); past int64 the argument
    check names the param and the range, not the custom op's schema."""
    attn = load("sliding_window")
    L, D = 9, 8
    q, k, v = (torch.randn(1, 1, L, D, generator=torch.Generator().manual_seed(i)) for i in range(3))
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    s = (q.double() @ k.double().transpose(-1, -2)) * D ** -0.5
    causal = torch.softmax(s.masked_fill(j > i, float("-inf")), -1) @ v.double()
    assert (attn(q, k, v, window=2 ** 63 - 1).double() - causal).abs().max().item() <= 2e-3
    for bad in (2 ** 63, 2 ** 64, -2 ** 63 - 1, 1e30):
        with pytest.raises(ValueError, match=r"sliding_window: argument 'window': expected an integer from "
                           r"-2\*\*63 to 2\*\*63 - 1 \(int64\), got"):
            attn(q, k, v, window=bad)
    for bad in (2.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"argument 'window': expected an integer, got"):
            attn(q, k, v, window=bad)
        with pytest.raises(ValueError, match=r"argument 'window': expected an integer, got"):
            attn.plan(Lq=L, Lk=L, window=bad)


def test_meta_tensors():
    """Meta q, k, v (and meta tensor inputs) give meta outputs of the right shape; a meta tensor as a
    param's or the scale's value has no value to read, and says so."""
    qm = torch.empty(1, 2, 8, 16, device="meta")
    assert load("sliding_window")(qm, qm, qm).shape == qm.shape
    ids = torch.empty(1, 8, dtype=torch.long, device="meta")
    assert load("document")(qm, qm, qm, doc_ids=ids).device.type == "meta"
    slopes = torch.empty(2, device="meta")
    assert load("alibi")(qm, qm, qm, slopes=slopes).shape == qm.shape
    with pytest.raises(ValueError, match=r"argument 'window': is a meta tensor, which has no value; pass a number"):
        load("sliding_window")(qm, qm, qm, window=torch.tensor(3, device="meta"))
    with pytest.raises(ValueError, match=r"argument 'scale': is a meta tensor"):
        load("sliding_window")(qm, qm, qm, scale=torch.tensor(0.5, device="meta"))


def test_error_unknown_keyword():
    q, k, v, _, _ = make_inputs("sliding_window", "self")
    _raises_naming("windw", lambda: load("sliding_window")(q, k, v, windw=3))
    _raises_naming("window", lambda: load("causal")(q, k, v, window=3))
