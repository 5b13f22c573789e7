"""Gradients of learnable inputs read per key, per (query, key) pair and per table entry.

The kernels keep one buffer per read (attnc/codegen/grads.py) and the host reduces it in a fixed order
(runtime/scatter.py). Checked here:
- the scatter-sum against a float64 loop written in this file;
- the general normalizations (softplus over a row sum) with a learnable key bias and a learnable
  relative-position table, forward and backward against a float64 formula written here;
- out-of-range table reads (clamped to the edge entries) get their gradient at the edge;
- determinism: two backward passes agree bit for bit;
- GQA (Hk < Hq) and Lq != Lk.
The softmax family's trained biases (T5, Swin, Graphormer, per-key, per-pair, row tables) are in
tests/test_corpus.py.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import math

import pytest
import torch
from attnc.runtime import scatter

import attnc

D = 16


def _load(tmp_path, name: str, body: str):
    path = tmp_path / f"{name}.attn"
    path.write_text(f"attention {name}\n{body}\n")
    return attnc.load(path)


def _qkv(B, Hq, Hk, Lq, Lk, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k = torch.randn(B, Hk, Lk, D, generator=g)
    v = torch.randn(B, Hk, Lk, D, generator=g)
    return [x.requires_grad_(True) for x in (q, k, v)], g


def _close(what, got, ref, tol):
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got.double() - ref).abs().max().item()
    assert err <= tol * max(ref.abs().max().item(), 1e-3), f"{what}: max error {err:.3g}"


# ---- the host's deterministic scatter-sum ------------------------------------------------------------
def test_segment_sums_match_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3000, generator=g)
    index = torch.randint(0, 7, (3000,), generator=g)
    index[index == 4] = 5  # an entry nobody reads stays 0
    got = scatter.segment_sums(values, index, 9)
    want = [sum(float(x) for x, i in zip(values.double(), index) if int(i) == e) for e in range(9)]
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-4)
    assert got[4] == 0 and got[7] == 0 and got[8] == 0


def test_scatter_sums_unread_grid_axes_and_broadcasts_indices():
    # a [B=2, Hq=3, Lq=4, Lk=5] buffer read as table[h, q - kv + 4] (extent 8, clamped at 7)
    g = torch.Generator().manual_seed(1)
    buf = torch.randn(2, 3, 4, 5, generator=g)
    h = torch.arange(3).view(1, 3, 1, 1)
    i = torch.arange(4).view(1, 1, 4, 1)
    j = torch.arange(5).view(1, 1, 1, 5)
    got = scatter.scatter(buf, (3, 8), (1, 2, 3), [h, (i - j + 4).clamp(0, 7)])
    want = torch.zeros(3, 8, dtype=torch.float64)
    for b in range(2):
        for hh in range(3):
            for ii in range(4):
                for jj in range(5):
                    want[hh, min(max(ii - jj + 4, 0), 7)] += float(buf[b, hh, ii, jj])
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_direct_permutes_to_the_inputs_axis_order():
    buf = torch.randn(2, 3, 4, 5)
    assert torch.allclose(scatter.direct(buf, (3, 1)), buf.sum(dim=(0, 2)).T)
    assert torch.allclose(scatter.direct(buf[..., 0], (2,)), buf[..., 0].sum(dim=(0, 1)))


# ---- general normalizations ----------------------------------------------------------------------------
SOFTPLUS = ("const R = {R}\ninput kb: float[Lk] learnable\ninput rel: float[Hq, 2 * R + 1] learnable\n"
            "mask kv <= q + (Lk - Lq)\nscore s + kb[kv] + rel[h, q - kv + R]\n"
            "probs softplus(score) / rowsum(softplus(score))")


def _softplus_formula(q, k, v, kb, rel, Hq, R):
    Lq, Lk = q.shape[2], k.shape[2]
    rep = Hq // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    i = torch.arange(Lq)[:, None]
    j = torch.arange(Lk)[None, :]
    s = q @ k.transpose(-1, -2) / math.sqrt(D) + kb + rel[:, (i - j + R).clamp(0, 2 * R)][None]
    w = torch.nn.functional.softplus(s) * (j <= i + (Lk - Lq))
    return (w / w.sum(-1, keepdim=True)) @ v


@pytest.mark.parametrize("R", [3, 40])  # a small table (summed per entry by dQ) and a large one (per pair)
def test_general_family_learnable_key_bias_and_table(tmp_path, R):
    fn = _load(tmp_path, f"softplus_bias_{R}", SOFTPLUS.format(R=R))
    B, Hq, Hk, Lq, Lk = 2, 4, 2, 13, 22  # GQA, Lq != Lk; tables read past +-R are clamped
    (q, k, v), g = _qkv(B, Hq, Hk, Lq, Lk, seed=3)
    kb = torch.randn(Lk, generator=g).requires_grad_(True)
    rel = torch.randn(Hq, 2 * R + 1, generator=g).requires_grad_(True)
    o = fn(q, k, v, kb=kb, rel=rel)
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v, kb, rel)]
    want = _softplus_formula(*leaves, Hq, R)
    _close("o", o, want.detach(), 2e-3)
    do = torch.randn_like(want)
    got = torch.autograd.grad(o, (q, k, v, kb, rel), do.float())
    ref = torch.autograd.grad(want, leaves, do)
    for what, a, r in zip(["dq", "dk", "dv", "dkb", "drel"], got, ref):
        _close(what, a, r, 5e-3)


# ---- clamped reads and determinism ---------------------------------------------------------------------
def test_out_of_range_reads_send_their_gradient_to_the_edge_entry(tmp_path):
    # t[kv + 2] reads t's last entry for the last three keys: its gradient collects all three
    fn = _load(tmp_path, "shifted", "input t: float[Lk] learnable\nscore s + t[kv + 2]")
    (q, k, v), g = _qkv(1, 2, 2, 9, 11, seed=4)
    t = torch.randn(11, generator=g).requires_grad_(True)
    o = fn(q, k, v, t=t)
    td = t.detach().double().requires_grad_(True)
    qd, kd, vd = (x.detach().double() for x in (q, k, v))
    s = qd @ kd.transpose(-1, -2) / math.sqrt(D) + td[(torch.arange(11) + 2).clamp(max=10)]
    want = torch.softmax(s, -1) @ vd
    do = torch.randn_like(want)
    (dt,) = torch.autograd.grad(o, (t,), do.float())
    (ref,) = torch.autograd.grad(want, (td,), do)
    _close("dt", dt, ref, 5e-3)
    assert dt[0] == 0 and dt[1] == 0  # entries no key reads
    assert ref[10].abs() > 0


@pytest.mark.parametrize("R", [5, 40])  # 11 entries: summed per entry by dQ; 81: kept per pair, scattered
def test_table_gradients_are_right_and_deterministic(tmp_path, R):
    fn = _load(tmp_path, f"rel_det_{R}", f"const R = {R}\ninput rel: float[Hq, 2 * R + 1] learnable\nmask kv <= q\n"
                                         "score s + rel[h, q - kv + R]")
    (q, k, v), g = _qkv(2, 2, 2, 40, 40, seed=5)
    rel = torch.randn(2, 2 * R + 1, generator=g).requires_grad_(True)
    do = torch.randn(2, 2, 40, D, generator=g)
    runs = [torch.autograd.grad(fn(q, k, v, rel=rel), (rel, k), do) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    reld = rel.detach().double().requires_grad_(True)
    i, j = torch.arange(40)[:, None], torch.arange(40)[None, :]
    s = (q @ k.transpose(-1, -2)).detach().double() / math.sqrt(D) + reld[:, (i - j + R).clamp(0, 2 * R)][None]
    want = torch.softmax(s.masked_fill(j > i, float("-inf")), -1) @ v.detach().double()
    (ref,) = torch.autograd.grad(want, (reld,), do.double())
    _close("drel", runs[0][0], ref, 5e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_table_gradient_keeps_the_inputs_dtype(tmp_path, dtype):
    fn = _load(tmp_path, "rel_dtype", "const R = 2\ninput rel: float[Hq, 2 * R + 1] learnable\n"
                                      "score s + rel[h, q - kv + R]")
    (q, k, v), g = _qkv(1, 2, 2, 8, 8, seed=6)
    rel = torch.randn(2, 5, generator=g).to(dtype).requires_grad_(True)
    o = fn(q.detach().to(dtype), k.detach().to(dtype), v.detach().to(dtype), rel=rel)
    (drel,) = torch.autograd.grad(o.float().sum(), (rel,))
    assert drel.dtype == dtype and drel.shape == rel.shape and torch.isfinite(drel.float()).all()


def test_a_learnable_input_inside_an_index_differentiates_as_piecewise_constant(tmp_path):
    # w[h] is read both as a factor and (through floor) inside t's index: the index part has gradient 0
    fn = _load(tmp_path, "index_of_learnable", "input w: float[Hq] learnable\ninput t: float[8]\nmask kv <= q\n"
                                               "score s + t[kv % 4 + floor(w[h])] * w[h] * (q - kv) * 0.1")
    (q, k, v), g = _qkv(1, 2, 2, 12, 12, seed=7)
    w = torch.tensor([1.3, 2.6]).requires_grad_(True)
    t = torch.randn(8, generator=g)
    o = fn(q, k, v, w=w, t=t)
    wd = w.detach().double().requires_grad_(True)
    qd, kd, vd = (x.detach().double() for x in (q, k, v))
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    index = (j % 4 + torch.floor(wd.detach())[:, None, None].long()).clamp(0, 7)  # [H, 1, L]
    s = qd @ kd.transpose(-1, -2) / math.sqrt(D) + t.double()[index] * wd[:, None, None] * (i - j) * 0.1
    want = torch.softmax(s.masked_fill(j > i, float("-inf")), -1) @ vd
    _close("o", o, want.detach(), 2e-3)
    do = torch.randn_like(want)
    (dw,) = torch.autograd.grad(o, (w,), do.float())
    (ref,) = torch.autograd.grad(want, (wd,), do)
    _close("dw", dw, ref, 5e-3)


def test_a_learnable_row_constant_that_softmax_cancels_has_gradient_zero(tmp_path):
    fn = _load(tmp_path, "cancelled", "input w: float[Hq] learnable\nscore s + 3 * w[h]")
    (q, k, v), _ = _qkv(1, 2, 2, 9, 9, seed=8)
    w = torch.tensor([0.5, -1.0], requires_grad=True)
    o = fn(q, k, v, w=w)
    (dw,) = torch.autograd.grad(o, (w,), torch.randn_like(o))
    assert dw.abs().max() < 1e-5
    _close("o", o, (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1) @ v).detach().double(), 2e-3)


def test_functions_of_constants_print_as_numbers(tmp_path):
    # torch.sqrt(3) and tl.log2(16) take tensors: constant sub-expressions must reach the code as numbers
    fn = _load(tmp_path, "constants", "const MAXD = 128, E = 8\nparam x = 1 / sqrt(192)\n"
                                      "score s * x + log2(MAXD / E) * 0.01 * (q - kv)")
    (q, k, v), _ = _qkv(1, 1, 1, 6, 6, seed=9)
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    s = (q @ k.transpose(-1, -2)).double() / math.sqrt(D) / math.sqrt(192) + 4 * 0.01 * (i - j)
    want = torch.softmax(s, -1) @ v.double()
    _close("o", fn(q, k, v), want.detach(), 2e-3)
    _close("reference", fn.reference(q, k, v), want.detach(), 1e-6)


@pytest.mark.parametrize("general", [False, True])
@pytest.mark.parametrize("Hk,Hv", [(2, 2), (2, 1)])
def test_per_key_reads_are_summed_by_the_dkdv_kernel(tmp_path, Hk, Hv, general):
    # kb[h, kv] depends on the key only: dK/dV sums it per key (no [B, Hq, Lq, Lk] buffer), over every
    # query head of a shared key head, also when key and value heads differ (two dK/dV launches)
    probs = "\nprobs sigmoid(score) / rowsum(sigmoid(score))" if general else ""
    fn = _load(tmp_path, "key_bias_general" if general else "key_bias",
               "input kb: float[Hq, Lk] learnable\nmask kv <= q + (Lk - Lq)\nscore s + kb[h, kv]" + probs)
    B, Hq, Lq, Lk = 2, 4, 9, 21
    g = torch.Generator().manual_seed(10)
    q = torch.randn(B, Hq, Lq, D, generator=g).requires_grad_(True)
    k = torch.randn(B, Hk, Lk, D, generator=g).requires_grad_(True)
    v = torch.randn(B, Hv, Lk, D, generator=g).requires_grad_(True)
    kb = torch.randn(Hq, Lk, generator=g).requires_grad_(True)
    o = fn(q, k, v, kb=kb)
    qd, kd, vd, kbd = (x.detach().double().requires_grad_(True) for x in (q, k, v, kb))
    s = qd @ kd.repeat_interleave(Hq // Hk, 1).transpose(-1, -2) / math.sqrt(D) + kbd[None, :, None, :]
    keep = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + (Lk - Lq)
    if general:
        w = torch.sigmoid(s) * keep
        want = w / w.sum(-1, keepdim=True) @ vd.repeat_interleave(Hq // Hv, 1)
    else:
        want = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ vd.repeat_interleave(Hq // Hv, 1)
    _close("o", o, want.detach(), 2e-3)
    do = torch.randn_like(want)
    got = torch.autograd.grad(o, (q, k, v, kb), do.float())
    ref = torch.autograd.grad(want, (qd, kd, vd, kbd), do)
    for what, a, r in zip(["dq", "dk", "dv", "dkb"], got, ref):
        _close(what, a, r, 5e-3)
