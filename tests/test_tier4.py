"""Tier-4 linear attention: the six catalog entries run the chunked algorithm (attn.algorithm == "chunked")
and equal their formulas, written here by hand in float64 (quadratic, Lq x Lk), forward and backward
(dq, dk, dv, hedgehog's learnable W, lightning's decay), at odd lengths that cross several chunks
(16 positions per chunk on the CPU). Causal entries also process a sequence in two pieces through
initial_state= / return_state=True, and the state equals its formula. A spec that is not linear
attention (a sliding window) keeps the quadratic kernels and says so.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as tf

import attnc
from attnc.errors import SpecError
from attnc.irdump import dump
from attnc.pipeline import analyse, compile_text

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TIER_4 = ["linear_elu", "linear_elu_full", "based", "hedgehog", "lightning", "mala"]
CAUSAL = {"linear_elu", "based", "hedgehog", "lightning"}


def _elu1(x):
    return tf.elu(x) + 1


def _hedgehog_phi(x, w):  # x [B, H, L, D], w [H, D, 32]
    y = torch.einsum("bhld,hdf->bhlf", x, w)
    return torch.cat([torch.softmax(y, -1), torch.softmax(-y, -1)], -1)


def formula(name, q, k, v, inputs):
    """o [B, H, Lq, Dv] of the catalog's formula; q, k, v with equal head counts; float64."""
    Lq, Lk, D = q.shape[2], k.shape[2], q.shape[3]
    causal = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None]
    if name in ("linear_elu", "linear_elu_full", "mala"):
        a = _elu1(q) @ _elu1(k).transpose(-1, -2)
    elif name == "based":
        t = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        a = 1 + t + t * t / 2
    elif name == "hedgehog":
        a = _hedgehog_phi(q, inputs["W"]) @ _hedgehog_phi(k, inputs["W"]).transpose(-1, -2)
    elif name == "lightning":
        dist = (torch.arange(Lq)[:, None] - torch.arange(Lk)[None, :]).clamp(min=0).to(q.dtype)
        a = inputs["decay"].view(1, -1, 1, 1) ** dist * (q @ k.transpose(-1, -2)) / math.sqrt(D)
    if name in CAUSAL:
        a = torch.where(causal, a, torch.zeros((), dtype=a.dtype))
    if name == "lightning":
        return a @ v
    if name == "mala":
        A = a.sum(-1, keepdim=True)
        p = (1 + 1 / A) * a - A / Lk
        return p @ v
    return (a @ v) / a.sum(-1, keepdim=True)


def state_formula(name, k, v, inputs):
    """(S [B, H, F, Dv], z [B, H, F]) after the last key: sum_j phi(k_j) v_j^T (decayed for lightning)."""
    D, L = k.shape[3], k.shape[2]
    if name in ("linear_elu", "linear_elu_full"):
        f = _elu1(k)
    elif name == "hedgehog":
        f = _hedgehog_phi(k, inputs["W"])
    elif name == "based":
        x = k / D ** 0.25
        f = torch.cat([torch.ones_like(x[..., :1]), x, (x[..., :, None] * x[..., None, :]).flatten(-2) / 2 ** 0.5], -1)
    elif name == "lightning":
        lam = inputs["decay"].view(1, -1, 1, 1) ** (L - 1 - torch.arange(L, dtype=k.dtype)).view(1, 1, -1, 1)
        f = k / D ** 0.25 * lam  # the factorization of s: x' = x * scale^(1/2) on both sides
    return f.transpose(-1, -2) @ v, f.sum(-2)


def make(name, B=1, H=2, L=37, D=8, Dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, d, generator=g, dtype=torch.float64) for d in (D, D, Dv))
    inputs = {}
    if name == "hedgehog":
        inputs["W"] = torch.randn(H, D, 32, generator=g, dtype=torch.float64) * 0.5
    if name == "lightning":
        inputs["decay"] = torch.tensor([0.9, 0.6], dtype=torch.float64)[:H]
    return q, k, v, inputs


def load(name):
    return attnc.load(EXAMPLES / f"{name}.attn")


@pytest.mark.parametrize("name", TIER_4)
def test_chunked_forward_and_backward_equal_the_formula(name):
    attn = load(name)
    assert attn.algorithm == "chunked"
    q, k, v, inputs = make(name)
    leaves = [q, k, v] + [inputs[n] for n in ("W", "decay") if n in inputs]
    for x in leaves:
        x.requires_grad_(True)
    o = attn(q, k, v, **inputs)
    ref = formula(name, q, k, v, inputs)
    assert torch.allclose(o, ref, rtol=1e-9, atol=1e-9), (o - ref).abs().max()
    do = torch.randn_like(ref)
    got = torch.autograd.grad((o * do).sum(), leaves)
    want = torch.autograd.grad((ref * do).sum(), leaves)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-9), (name, i, (a - b).abs().max())


@pytest.mark.parametrize("name", TIER_4)
def test_chunked_fp32_and_grouped_heads(name):
    """fp32 inputs (fp32 state), and GQA: 4 query heads over 2 key/value heads."""
    attn = load(name)
    q, k, v, inputs = make(name, H=4, L=21, seed=1)
    k, v = k[:, ::2], v[:, ::2]
    if "decay" in inputs:
        inputs["decay"] = torch.tensor([0.95, 0.9, 0.7, 0.5], dtype=torch.float64)
    o = attn(q.float(), k.float(), v.float(), **{n: x.float() for n, x in inputs.items()})
    ref = formula(name, q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), inputs)
    assert o.dtype == torch.float32
    assert (o.double() - ref).abs().max() <= 2e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("name", sorted(CAUSAL))
def test_state_round_trip(name):
    """A call on x[:L1] returning its state, then a call on x[L1:] given it, equals one call on x; the
    state equals its formula."""
    attn = load(name)
    q, k, v, inputs = make(name, L=45, seed=2)
    whole, (S, z) = attn(q, k, v, return_state=True, **inputs)
    L1 = 19
    first, state = attn(q[:, :, :L1], k[:, :, :L1], v[:, :, :L1], return_state=True, **inputs)
    second, (S2, z2) = attn(q[:, :, L1:], k[:, :, L1:], v[:, :, L1:], initial_state=state, return_state=True,
                            **inputs)
    assert torch.allclose(torch.cat([first, second], 2), whole, rtol=1e-10, atol=1e-10)
    assert torch.allclose(S2, S, rtol=1e-10, atol=1e-10) and torch.allclose(z2, z, rtol=1e-10, atol=1e-10)
    S_ref, z_ref = state_formula(name, k, v, inputs)
    assert torch.allclose(S, S_ref, rtol=1e-10, atol=1e-10)
    if z_ref is not None:
        assert torch.allclose(z, z_ref, rtol=1e-10, atol=1e-10)
    # one decode step is a state update: a single query after the state
    step, _ = attn(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], return_state=True, **inputs,
                   initial_state=attn(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], return_state=True, **inputs)[1])
    assert torch.allclose(step, whole[:, :, -1:], rtol=1e-10, atol=1e-10)


def test_reference_matches_the_chunked_call():
    attn = load("lightning")
    q, k, v, inputs = make("lightning", L=33, seed=3)
    o, st = attn(q, k, v, return_state=True, **inputs)
    r, rst = attn.reference(q, k, v, return_state=True, **inputs)
    assert torch.allclose(o, r, rtol=1e-10, atol=1e-10) and torch.allclose(st[0], rst[0], rtol=1e-10, atol=1e-10)


def test_long_decay_is_numerically_safe():
    """lam^-kv at kv = 4000 with lam = 0.5 is 2^4000 (inf); chunk-relative exponents never form it."""
    attn = load("lightning")
    q, k, v, inputs = make("lightning", B=1, H=2, L=4000, D=4, Dv=4, seed=4)
    inputs["decay"] = torch.tensor([0.5, 0.999], dtype=torch.float64)
    o = attn(q.float(), k.float(), v.float(), decay=inputs["decay"].float())
    assert torch.isfinite(o).all()
    rows = torch.arange(3940, 4000)  # the last rows by the formula (lam^(i - j) underflows to 0, never inf)
    dist = (rows[:, None] - torch.arange(4000)[None, :]).to(torch.float64)
    w = inputs["decay"].view(1, -1, 1, 1) ** dist.clamp(min=0) * (q[:, :, rows] @ k.transpose(-1, -2)) / 2
    ref = torch.where(dist >= 0, w, torch.zeros((), dtype=w.dtype)) @ v
    assert (o[:, :, rows].double() - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_sliding_window_falls_back_to_quadratic_and_says_so():
    src = "attention sw\nparam window = 8\nmask kv <= q and q - kv < window\nlet t = 1 + s + s * s / 2\n" \
          "probs t / rowsum(t)\n"
    a = analyse(compile_text(src, "sw.attn"))
    assert a.algorithm.name == "quadratic"
    assert "algorithm  quadratic (not linear attention: the mask is neither full nor causal" in dump(a)
    causal = analyse(compile_text(src.replace(" and q - kv < window", ""), "c.attn"))
    assert causal.algorithm.name == "chunked"
    assert "algorithm  chunked" in dump(causal)


def test_softmax_stays_quadratic():
    a = analyse(compile_text("attention causal\nmask kv <= q\n", "c.attn"))
    assert a.algorithm.name == "quadratic" and "rowmax" in a.algorithm.reason


def test_feature_map_needs_a_factorizable_mask():
    src = ("attention bad\nparam window = 8\nfeature phi(x) = elu(x) + 1\nmask kv <= q and q - kv < window\n"
           "let a = dot(phi(q), phi(k))\nprobs a / rowsum(a)\n")
    with pytest.raises(SpecError, match="feature map but cannot run as linear attention") as err:
        analyse(compile_text(src, "bad.attn"))
    assert "bad.attn:4:1: error:" in err.value.render()


@pytest.mark.parametrize("src, message", [
    ("feature phi(x) = elu(x) + 1\nprobs dot(phi(q), phi(q))", "argument 2 of dot"),
    ("feature phi(x) = elu(x) + s\nprobs dot(phi(q), phi(k))", "may use only its argument"),
    ("probs elu(s)", "feature-map function"),
    ("feature phi(x) = x\nprobs phi(q)", "is used inside dot"),
    ("const F = 4\ninput W: float[Hq, Dqk, F]\nprobs s * W[h]", "feature map's weights"),
    ("input W: float[Hq, Dqk, G]\nprobs s", "feature map's weights are declared"),
    ("const F = 4\ninput W: float[Hq, Dqk, F]\nfeature phi(x) = softmax(2 * W[h])\nprobs dot(phi(q), phi(k))",
     "weights are used as 'v @ W[h]'"),
    (("const F = 4\ninput W: float[Hq, Dqk, F]\nfeature phi(x) = softmax((x @ W[h]) @ W[h])\n"
      "probs dot(phi(q), phi(k))"), "weights are used as 'v @ W[h]'"),
])
def test_feature_errors_point_at_the_spec(src, message):
    with pytest.raises(SpecError) as err:
        compile_text("attention bad\n" + src + "\n", "bad.attn")
    text = str(err.value)
    assert message in text and "bad.attn:" in text


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("name", TIER_4)
def test_triton_kernel_fp32_forward_backward_and_state(name, monkeypatch):
    """fp32 runs the Triton forward kernel (the interpreter on the CPU); checked against the float64
    formula with the design tolerances (2e-3 forward, 5e-3 backward), and pieces equal one call."""
    from attnc.runtime import linear

    launched = []
    real = linear._kernel_forward
    monkeypatch.setattr(linear, "_kernel_forward", lambda *a, **kw: launched.append(1) or real(*a, **kw))
    attn = load(name)
    q, k, v, inputs = make(name, L=37, seed=5)
    leaves64 = [q, k, v] + [inputs[n] for n in ("W", "decay") if n in inputs]
    leaves32 = [x.float().requires_grad_(True) for x in leaves64]
    for x in leaves64:
        x.requires_grad_(True)
    o = attn(*leaves32[:3], **{n: x for n, x in zip([n for n in ("W", "decay") if n in inputs], leaves32[3:])})
    assert launched, "the Triton kernel did not run"
    ref = formula(name, q, k, v, inputs)
    assert _rel(o, ref) <= 2e-3
    do = torch.randn_like(ref)
    got = torch.autograd.grad((o * do.float()).sum(), leaves32)
    want = torch.autograd.grad((ref * do).sum(), leaves64)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and _rel(a, b) <= 5e-3
    if name not in CAUSAL:
        return
    q32, k32, v32 = (x.detach() for x in leaves32[:3])
    extra = {n: x.detach() for n, x in zip([n for n in ("W", "decay") if n in inputs], leaves32[3:])}
    whole = attn(q32, k32, v32, **extra)
    first, state = attn(q32[:, :, :20], k32[:, :, :20], v32[:, :, :20], return_state=True, **extra)
    second = attn(q32[:, :, 20:], k32[:, :, 20:], v32[:, :, 20:], initial_state=state, **extra)
    assert (torch.cat([first, second], 2) - whole).abs().max() <= 1e-4 * whole.abs().max()


def test_a_row_whose_weights_sum_to_zero_outputs_zero(tmp_path):
    """relu features: a query with no positive element has weights 0 everywhere: output 0, no NaN,
    forward and backward."""
    spec = tmp_path / "relu_lin.attn"
    spec.write_text("attention relu_lin\nfeature phi(x) = relu(x)\nmask kv <= q\nlet a = dot(phi(q), phi(k))\n"
                    "probs a / rowsum(a)\n")
    attn = attnc.load(spec)
    q, k, v, _ = make("linear_elu", L=21, D=4, seed=6)
    q[:, :, 3] = -1.0  # row 3 sees only zero features
    q.requires_grad_(True)
    o = attn(q, k, v)
    a = torch.relu(q) @ torch.relu(k).transpose(-1, -2)
    a = torch.where(torch.arange(21)[None, :] <= torch.arange(21)[:, None], a, torch.zeros((), dtype=a.dtype))
    r = a.sum(-1, keepdim=True)
    ref = torch.where(r == 0, torch.zeros((), dtype=a.dtype), (a @ v) / torch.where(r == 0, 1, r))
    assert torch.allclose(o, ref, rtol=1e-10, atol=1e-12) and (o[:, :, 3] == 0).all()
    (g,) = torch.autograd.grad(o.sum(), [q])
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("name", ["linear_elu", "lightning"])
def test_triton_backward_through_pieces(name, monkeypatch):
    """fp32, two pieces joined by the state, fixed decay: the backward runs as Triton scans (3 per piece,
    and 2 reads of the first piece's state gradient; counted) and the gradients of the whole sequence (through the state) equal the float64 formula's."""
    from attnc.runtime import linear

    launched = []
    real = linear._kernel_forward
    monkeypatch.setattr(linear, "_kernel_forward", lambda *a, **kw: launched.append(1) or real(*a, **kw))
    attn = load(name)
    q, k, v, inputs = make(name, L=41, seed=7)
    leaves64 = [x.requires_grad_(True) for x in (q, k, v)]
    leaves32 = [x.detach().float().requires_grad_(True) for x in (q, k, v)]
    extra = {n: x.float() for n, x in inputs.items()}
    q32, k32, v32 = leaves32
    first, state = attn(q32[:, :, :18], k32[:, :, :18], v32[:, :, :18], return_state=True, **extra)
    second = attn(q32[:, :, 18:], k32[:, :, 18:], v32[:, :, 18:], initial_state=state, **extra)
    o = torch.cat([first, second], 2)
    ref = formula(name, *leaves64, inputs)
    do = torch.randn_like(ref)
    got = torch.autograd.grad((o * do.float()).sum(), leaves32)
    assert len(launched) == 2 + 2 * 3 + 2, "the backward did not run the Triton scans"
    want = torch.autograd.grad((ref * do).sum(), leaves64)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and _rel(a, b) <= 5e-3


# ---- strides and native dtypes: the kernels read q, k and v in place --------------------------------------

IDENTITY_SPEC = "attention ident\nfeature phi(x) = x\nmask kv <= q\nlet a = dot(phi(q), phi(k))\nprobs a\n"
NATIVE = {torch.float32: (2e-3, 5e-3), torch.float16: (2e-3, 3e-3), torch.bfloat16: (1e-2, 2e-2)}  # fwd, bwd (measured: 5x below)


def _load_any(name, tmp_path):
    if name != "ident":
        return load(name)
    spec = tmp_path / "ident.attn"
    spec.write_text(IDENTITY_SPEC)
    return attnc.load(spec)


def _formula_any(name, q, k, v, inputs):
    if name != "ident":
        return formula(name, q, k, v, inputs)
    a = q @ k.transpose(-1, -2)  # the identity map, causal, unnormalized
    causal = torch.arange(k.shape[2])[None, :] <= torch.arange(q.shape[2])[:, None]
    return torch.where(causal, a, torch.zeros((), dtype=a.dtype)) @ v


def _transposed(x, dtype):
    """x [B, H, L, D] stored as [B, L, H, D] in `dtype` (a leaf), and its [B, H, L, D] view (strided)."""
    base = x.transpose(1, 2).contiguous().to(dtype).requires_grad_(True)
    view = base.transpose(1, 2)
    assert not view.is_contiguous()
    return base, view


@pytest.mark.parametrize("dtype", list(NATIVE), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", ["linear_elu", "linear_elu_full", "lightning", "ident"])
def test_triton_kernels_take_strides_and_native_dtypes(name, dtype, tmp_path):
    """q, k, v as transposed views of [B, L, H, D] tensors in fp32, fp16 or bf16: the output (in that
    dtype) and the gradients (in that dtype and layout) equal the contiguous fp32 call on the same values
    and the float64 formula, within the dtype's tolerance; a strided fp32 call equals the contiguous one."""
    attn = _load_any(name, tmp_path)
    q, k, v, inputs = make("linear_elu" if name == "ident" else name, L=37, seed=8)
    extra = {n: x.float() for n, x in inputs.items()}
    bases, views = zip(*(_transposed(x, dtype) for x in (q, k, v)))
    o = attn(*views, **extra)
    assert o.dtype == dtype and o.shape == (*q.shape[:3], v.shape[3])
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got = torch.autograd.grad((o.double() * do).sum(), bases)
    assert all(g.dtype == dtype and g.shape == b.shape for g, b in zip(got, bases))
    got = [g.transpose(1, 2).double() for g in got]  # back to [B, H, L, D]

    leaves64 = [x.detach().double().requires_grad_(True) for x in views]  # the same (rounded) values
    ref = _formula_any(name, *leaves64, inputs)
    want = torch.autograd.grad((ref * do).sum(), leaves64)
    leaves32 = [x.detach().float().contiguous().requires_grad_(True) for x in views]
    o32 = attn(*leaves32, **extra)
    got32 = torch.autograd.grad((o32.double() * do).sum(), leaves32)
    fwd_tol, bwd_tol = NATIVE[dtype]
    assert _rel(o, ref) <= fwd_tol and _rel(o, o32.double()) <= fwd_tol, (_rel(o, ref), _rel(o, o32.double()))
    for g, g32, w in zip(got, got32, want):
        assert torch.isfinite(g).all() and _rel(g, w) <= bwd_tol and _rel(g, g32.double()) <= bwd_tol, \
            (_rel(g, w), _rel(g, g32.double()))
    if dtype == torch.float32:  # the same values read through other strides: the same numbers
        assert torch.allclose(o, o32, rtol=1e-6, atol=1e-6)
        for g, g32 in zip(got, got32):
            assert torch.allclose(g, g32.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["linear_elu", "ident"])
def test_no_copy_of_v_or_of_identity_features(name, tmp_path, monkeypatch):
    """bf16 transposed v goes to the kernels in place (its own data pointer, forward and backward scans),
    and no .to / .float / .contiguous / .clone copies it; with the identity map q and k do too."""
    from attnc.runtime import linear

    attn = _load_any(name, tmp_path)
    q, k, v, _ = make("linear_elu", L=21, seed=10)
    (qb, qv), (kb, kv), (vb, vv) = (_transposed(x, torch.bfloat16) for x in (q, k, v))
    watched = {x.untyped_storage().data_ptr(): n for n, x in (("q", qb), ("k", kb), ("v", vb))}
    if name != "ident":
        del watched[qb.untyped_storage().data_ptr()], watched[kb.untyped_storage().data_ptr()]
    copies, launches = [], []

    def spy(method):
        real = getattr(torch.Tensor, method)

        def wrapper(self, *args, **kwargs):
            out = real(self, *args, **kwargs)
            src = self.untyped_storage().data_ptr()
            if src in watched and isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() != src:
                copies.append((watched[src], method))
            return out
        monkeypatch.setattr(torch.Tensor, method, wrapper)

    for method in ("to", "float", "contiguous", "clone"):
        spy(method)

    class Kernel:  # records the data pointers of each launch's q, k, v arguments
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append([watched.get(a.data_ptr()) for a in args[:3]])
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(linear, "_causal_chunk_fwd", Kernel(linear._causal_chunk_fwd))
    o = attn(qv, kv, vv)
    assert launches[0][2] == "v" and len(launches) == 1
    torch.autograd.grad(o.float().sum(), [qb, kb, vb])
    monkeypatch.undo()
    # the backward's three scans: (dn, v+, fk), (v+, dn, fq), (fk, fq, dn)
    assert len(launches) == 4 and launches[1][1] == "v" and launches[2][0] == "v", launches
    if name == "ident":
        assert launches == [["q", "k", "v"], [None, "v", "k"], ["v", None, "q"], ["k", "q", None]], launches
    assert not copies, copies


def test_pytorch_form_takes_mixed_dtypes():
    """The PyTorch chunked form (no kernels) computes in fp32 whatever its inputs' dtypes, as the kernel."""
    from attnc.runtime import linear

    q, k, v, _ = make("linear_elu", L=21, seed=11)
    fq, fk = (_elu1(x).float() for x in (q, k))
    vb = v.to(torch.bfloat16).transpose(2, 3).contiguous().transpose(2, 3)
    num, den, (S, z) = linear.causal_chunked_reference(fq, fk, vb, chunk=16)
    knum, kden, (kS, kz) = linear.causal_chunked(fq, fk, vb, chunk=16)
    assert num.dtype == knum.dtype == torch.float32
    for a, b in ((num, knum), (den, kden), (S, kS), (z, kz)):
        assert _rel(a, b.double()) <= 1e-5
    full = linear.full_reference(fq, fk, vb)
    kfull = linear.full(fq, fk, vb, chunk=16)
    assert _rel(full[0], kfull[0].double()) <= 1e-5 and _rel(full[1], kfull[1].double()) <= 1e-5


UNTIED = ("attention hedgehog_untied\nconst F = 32\ninput Wq: float[Hq, Dqk, F] learnable\n"
          "input Wk: float[Hq, Dqk, F] learnable\n"
          "feature phi_q(x) = cat(softmax(x @ Wq[h]), softmax(-x @ Wq[h]))\n"
          "feature phi_k(x) = cat(softmax(x @ Wk[h]), softmax(-x @ Wk[h]))\n"
          "mask kv <= q\nlet a = dot(phi_q(q), phi_k(k))\nprobs a / rowsum(a)\n")


def test_untied_feature_maps_run_chunked_and_equal_the_formula(tmp_path):
    """Hedgehog with separate query and key maps (flash-linear-attention's default): phi_q(q) . phi_k(k),
    forward and backward (dq, dk, dv, both weights) in float64, fp32 through the Triton kernel, and GQA."""
    spec = tmp_path / "hedgehog_untied.attn"
    spec.write_text(UNTIED)
    attn = attnc.load(spec)
    assert attn.algorithm == "chunked"
    q, k, v, inputs = make("hedgehog", L=37, seed=7)
    g = torch.Generator().manual_seed(8)
    wq, wk = inputs["W"], torch.randn(2, 8, 32, generator=g, dtype=torch.float64) * 0.5
    leaves = [x.requires_grad_(True) for x in (q, k, v, wq, wk)]

    def ref_of(q, k, v, wq, wk):
        a = _hedgehog_phi(q, wq) @ _hedgehog_phi(k, wk).transpose(-1, -2)
        a = torch.where(torch.arange(k.shape[2])[None, :] <= torch.arange(q.shape[2])[:, None], a, 0.0)
        return (a @ v) / a.sum(-1, keepdim=True)

    o = attn(q, k, v, Wq=wq, Wk=wk)
    ref = ref_of(q, k, v, wq, wk)
    assert torch.allclose(o, ref, rtol=1e-9, atol=1e-9), (o - ref).abs().max()
    do = torch.randn_like(ref)
    got = torch.autograd.grad((o * do).sum(), leaves)
    want = torch.autograd.grad((ref * do).sum(), leaves)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-9), (i, (a - b).abs().max())
    # the maps are not swapped: with the weights exchanged the answer differs
    assert (ref_of(q, k, v, wk, wq) - ref).abs().max() > 1e-3
    # fp32: the Triton kernel (interpreter), design tolerance 2e-3
    o32 = attn(q.detach().float(), k.detach().float(), v.detach().float(), Wq=wq.detach().float(), Wk=wk.detach().float())
    assert _rel(o32, ref.detach()) <= 2e-3
    # GQA: 4 query heads over 2 key/value heads, per-query-head weights on both sides
    q4, _, _, _ = make("hedgehog", H=4, L=21, seed=9)
    w4q, w4k = (torch.randn(4, 8, 32, generator=g, dtype=torch.float64) * 0.5 for _ in range(2))
    k2, v2 = k.detach()[:, :, :21], v.detach()[:, :, :21]
    o4 = attn(q4, k2, v2, Wq=w4q, Wk=w4k)
    ref4 = ref_of(q4, k2.repeat_interleave(2, 1), v2.repeat_interleave(2, 1), w4q, w4k)
    assert torch.allclose(o4, ref4, rtol=1e-9, atol=1e-9)


def test_untied_feature_maps_of_different_widths_are_refused(tmp_path):
    spec = tmp_path / "untied_widths.attn"
    spec.write_text("attention untied_widths\nconst F = 4\ninput Wq: float[Hq, Dqk, F]\n"
                    "feature phi_q(x) = softmax(x @ Wq[h])\nfeature phi_k(x) = elu(x) + 1\n"
                    "mask kv <= q\nlet a = dot(phi_q(q), phi_k(k))\nprobs a / rowsum(a)\n")
    attn = attnc.load(spec)
    q, k, v, _ = make("linear_elu", L=9, D=8, seed=10)
    with pytest.raises(ValueError, match=r"untied_widths: dot\(phi_q\(q\), phi_k\(k\)\): the query map gives 4 "
                                         r"features, the key map 8"):
        attn(q, k, v, Wq=torch.randn(2, 8, 4, dtype=torch.float64))


@pytest.mark.parametrize("body", ["softmax(2 * (x @ W[h]))", "softmax((x @ W[h]) * 2 - (x @ W[h]) / 2)"])
def test_a_scalar_times_a_matmul_in_a_feature_map(tmp_path, body):
    """`2 * (x @ W[h])` scales the product like `(2 * x) @ W[h]` does: both are accepted; vs float64."""
    spec = tmp_path / "scaled.attn"
    spec.write_text(f"attention scaled\nconst F = 8\ninput W: float[Hq, Dqk, F]\nfeature phi(x) = {body}\n"
                    "mask kv <= q\nlet a = dot(phi(q), phi(k))\nprobs a / rowsum(a)\n")
    attn = attnc.load(spec)
    q, k, v, _ = make("linear_elu", L=23, D=8, seed=11)
    w = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    c = 2.0 if body.startswith("softmax(2") else 1.5  # the scalar each body multiplies x @ W[h] by

    def phi(x):
        return torch.softmax(c * torch.einsum("bhld,hdf->bhlf", x, w), -1)
    a = phi(q) @ phi(k).transpose(-1, -2)
    a = torch.where(torch.arange(23)[None, :] <= torch.arange(23)[:, None], a, 0.0)
    ref = (a @ v) / a.sum(-1, keepdim=True)
    o = attn(q, k, v, W=w)
    assert torch.allclose(o, ref, rtol=1e-9, atol=1e-9), (o - ref).abs().max()
