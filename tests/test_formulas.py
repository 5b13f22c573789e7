"""Make the hand-written formulas (tests/formulas.py) trustworthy, independently of attnc.

Three independent constructions:
  * torch's scaled_dot_product_attention (math backend, float64): dense, causal, boolean masks from
    the mask builders, additive float masks for score offsets, an extra key column for sinks;
  * FlexAttention in eager mode on the CPU, with mask_mod/score_mod written here from the catalog
    (NATTEN through the "window start" formula rather than the catalog's centre formula);
  * per-row Python/numpy loops and properties stated in docs/catalog.md.
"""
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F_

sys.path.insert(0, str(Path(__file__).resolve().parent))
import formulas as F  # noqa: E402

DT = torch.float64


def rand(*shape, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else hash(shape) % 2**31)
    return torch.randn(*shape, generator=g, dtype=DT)


def qkv(B=2, Hq=4, Hk=2, Hv=2, Lq=37, Lk=37, D=16, Dv=None, seed=0):
    Dv = Dv or D
    return (rand(B, Hq, Lq, D, seed=seed), rand(B, Hk, Lk, D, seed=seed + 1),
            rand(B, Hv, Lk, Dv, seed=seed + 2))


def sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, extra=None):
    """SDPA with GQA by repeat_interleave (Hq a multiple of Hk and Hv)."""
    Hq = q.shape[1]
    k = k.repeat_interleave(Hq // k.shape[1], dim=1)
    v = v.repeat_interleave(Hq // v.shape[1], dim=1)
    return F_.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           scale=scale)


def close(a, b, tol=1e-10):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    if a.numel() == 0:
        return
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), err


# ----------------------------------------------------------------------------------------------
# Against scaled_dot_product_attention
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads", [(4, 4, 4), (4, 2, 2), (4, 1, 1)])
@pytest.mark.parametrize("lens", [(37, 37), (19, 45), (45, 19)])
def test_full_and_causal_vs_sdpa(heads, lens):
    q, k, v = qkv(Hq=heads[0], Hk=heads[1], Hv=heads[2], Lq=lens[0], Lk=lens[1])
    close(F.full(q, k, v)[0], sdpa(q, k, v))
    close(F.causal(q, k, v)[0], sdpa(q, k, v, is_causal=True))  # top-left aligned j <= i
    close(F.full(q, k, v, scale=0.3)[0], sdpa(q, k, v, scale=0.3))
    # lse = logsumexp of the masked scaled scores
    S = (q @ k.repeat_interleave(heads[0] // heads[1], 1).transpose(-1, -2)) / math.sqrt(16)
    close(F.full(q, k, v)[1], torch.logsumexp(S, -1))


def test_head_mapping_not_divisible():
    """Hq=6, Hk=4, Hv=3: head h reads k head floor(4h/6) and v head floor(3h/6)."""
    q, k, v = qkv(Hq=6, Hk=4, Hv=3, Lq=11, Lk=13)
    o, lse = F.causal(q, k, v)
    for h in range(6):
        kh, vh = (4 * h) // 6, (3 * h) // 6
        ref = sdpa(q[:, h:h + 1], k[:, kh:kh + 1], v[:, vh:vh + 1], is_causal=True)
        close(o[:, h:h + 1], ref)
    assert [F.head_index(6, 4)[h].item() for h in range(6)] == [0, 0, 1, 2, 2, 3]


def test_diffqkv_vs_sdpa():
    q, k, v = qkv(Hq=8, Hk=1, Hv=4, Lq=23, Lk=23, D=24, Dv=40)
    o, _ = F.diffqkv(q, k, v)
    assert o.shape == (2, 8, 23, 40)
    ref = F_.scaled_dot_product_attention(q, k.expand(-1, 8, -1, -1),
                                          v.repeat_interleave(2, 1), is_causal=True)
    close(o, ref)


MASKED = {  # name -> (formula kwargs, builder producing a bool mask for Lq=Lk=L, L)
    "sliding_window": (dict(window=7), lambda L: F.mask_sliding_window(L, L, 7), 37),
    "prefix_lm": (dict(prefix=9), lambda L: F.mask_prefix_lm(L, L, 9), 37),
    "streaming_sink": (dict(sinks=3, window=5), lambda L: F.mask_streaming_sink(L, L, 3, 5), 37),
    "moa": (dict(band=torch.tensor([1, 3, 8, 100])),
            lambda L: F.mask_moa(L, L, torch.tensor([1, 3, 8, 100])), 80),
    "neighborhood_1d": (dict(K=5, d=2, s=2), lambda L: F.mask_neighborhood_axis(L, 5, 2, 2), 37),
    "neighborhood_2d": (dict(Y=6, X=7, KY=3, KX=4),
                        lambda L: F.mask_neighborhood((6, 7), (3, 4)), 42),
    "dilated_neighborhood_2d": (dict(Y=6, X=7, KY=3, KX=2, DY=2, DX=2),
                                lambda L: F.mask_neighborhood((6, 7), (3, 2), (2, 2)), 42),
    "neighborhood_3d_causal": (
        dict(T=3, Y=4, X=5, KT=2, KY=3, KX=3, SY=2, SX=2),
        lambda L: F.mask_neighborhood((3, 4, 5), (2, 3, 3), None, (1, 2, 2), (True, False, False)),
        60),
    "maxvit_block": (dict(Y=6, X=8, P=2), lambda L: F.mask_maxvit_block(6, 8, 2), 48),
    "maxvit_grid": (dict(Y=6, X=8, G=2), lambda L: F.mask_maxvit_grid(6, 8, 2), 48),
    "dilated_sliding_window": (dict(window=9, dilation=3),
                               lambda L: F.mask_dilated_sliding_window(L, L, 9, 3), 37),
    "radial": (dict(F=5, T=4), lambda L: F.mask_radial(5, 4), 20),
    "clear": (dict(n_text=3, Y=5, X=6, r=2), lambda L: F.mask_clear(3, 5, 6, 2), 33),
}


@pytest.mark.parametrize("name", sorted(MASKED))
def test_masked_variants_vs_sdpa(name):
    kw, builder, L = MASKED[name]
    q, k, v = qkv(Lq=L, Lk=L)
    M = builder(L)
    assert M.any(-1).all(), "test parameters should leave no row empty (SDPA gives NaN there)"
    close(getattr(F, name)(q, k, v, **kw)[0], sdpa(q, k, v, attn_mask=M))


def test_document_vs_sdpa():
    q, k, v = qkv(Lq=37, Lk=37)
    doc = torch.tensor([[0] * 10 + [1] * 20 + [2] * 7, [0] * 3 + [1] * 30 + [3] * 4])
    M = torch.zeros(2, 1, 37, 37, dtype=torch.bool)
    for b in range(2):
        for i in range(37):
            for j in range(i + 1):
                M[b, 0, i, j] = bool(doc[b, i] == doc[b, j])
    assert torch.equal(F.mask_document(doc), M)
    close(F.document(q, k, v, doc)[0], sdpa(q, k, v, attn_mask=M))


def test_score_offsets_vs_sdpa_float_mask():
    """alibi and zerotuning as additive float masks, temperature as per-head scale."""
    q, k, v = qkv(Lq=29, Lk=29)
    i, j = torch.arange(29).view(-1, 1), torch.arange(29).view(1, -1)
    causal = torch.where(j <= i, 0.0, -math.inf).to(DT)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=DT)
    bias = causal - slopes.view(-1, 1, 1) * (i - j).to(DT)
    close(F.alibi(q, k, v, slopes)[0], sdpa(q, k, v, attn_mask=bias))
    gamma = torch.tensor([0.5, 2.0, 1.0, 7.0], dtype=DT)
    bias = causal + torch.where(j == 0, torch.log(gamma).view(-1, 1, 1), torch.zeros(1, dtype=DT))
    close(F.zerotuning(q, k, v, gamma)[0], sdpa(q, k, v, attn_mask=bias))
    temp = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=DT)
    o = F.temperature(q, k, v, temp)[0]
    for h in range(4):
        ref = sdpa(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], v[:, h // 2:h // 2 + 1], is_causal=True,
                   scale=temp[h].item() / 4.0)
        close(o[:, h:h + 1], ref)


def _with_sink_column(q, k, v, sink):
    """An extra key at position Lk with score sink[h] (k = 0 plus float bias) and value 0."""
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    k1 = torch.cat([k, torch.zeros_like(k[:, :, :1])], 2)
    v1 = torch.cat([v, torch.zeros_like(v[:, :, :1])], 2)
    i, j = torch.arange(Lq).view(-1, 1), torch.arange(Lk + 1).view(1, -1)
    bias = torch.where((j <= i) | (j == Lk), 0.0, -math.inf).to(DT).expand(Hq, Lq, Lk + 1).clone()
    bias[:, :, Lk] = sink.view(-1, 1)
    o = sdpa(q, k1, v1, attn_mask=bias)
    S = q @ k1.repeat_interleave(Hq // k.shape[1], 1).transpose(-1, -2) / math.sqrt(q.shape[-1])
    return o, torch.logsumexp(S + bias, -1)


def test_sinks_vs_extra_key_column():
    q, k, v = qkv(Lq=21, Lk=21)
    sink = torch.tensor([-1.0, 0.0, 2.0, 5.0], dtype=DT)
    o, lse = F.sink_logit(q, k, v, sink)
    ro, rlse = _with_sink_column(q, k, v, sink)
    close(o, ro)
    close(lse, rlse)
    o, lse = F.sink_softmax1(q, k, v)
    ro, rlse = _with_sink_column(q, k, v, torch.zeros(4, dtype=DT))
    close(o, ro)
    close(lse, rlse)


# ----------------------------------------------------------------------------------------------
# Against FlexAttention (eager, CPU)
# ----------------------------------------------------------------------------------------------
def flex(q, k, v, mask_mod, score_mod=None, B=None, H=None):
    fa = pytest.importorskip("torch.nn.attention.flex_attention",
                             reason="FlexAttention not available in this torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": eager is what we want
        bm = fa.create_block_mask(mask_mod, B, H, q.shape[2], k.shape[2], device="cpu")
        o, aux = fa.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True,
                                   return_aux=fa.AuxRequest(lse=True))
    return o, aux.lse


def causal_mm(b, h, i, j):
    return j <= i


def _natten_1d(q_idx, kv_idx, L, K, s=1):
    """NATTEN's window-start form: start = clamp(leader - K//2, 0, L - K), K keys from there."""
    leader = torch.clamp((q_idx // s) * s + s // 2, max=L - 1)
    start = torch.clamp(leader - K // 2, min=0, max=L - K)
    return (kv_idx >= start) & (kv_idx < start + K)


def _flex_cases():
    doc = torch.tensor([[0] * 10 + [1] * 20 + [2] * 7, [0] * 3 + [1] * 30 + [3] * 4])
    band = torch.tensor([1, 3, 8, 100])
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=DT)
    gamma = torch.tensor([0.5, 2.0, 1.0, 7.0], dtype=DT)
    temp = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=DT)
    return {
        "sliding_window": (37, 37, lambda b, h, i, j: (j <= i) & (i - j < 7), None,
                           lambda q, k, v: F.sliding_window(q, k, v, window=7)),
        "sliding_window_empty_rows": (37, 37, lambda b, h, i, j: (j <= i) & (i - j < 0), None,
                                      lambda q, k, v: F.sliding_window(q, k, v, window=0)),
        "prefix_lm": (19, 45, lambda b, h, i, j: (j < 9) | (j <= i), None,
                      lambda q, k, v: F.prefix_lm(q, k, v, prefix=9)),
        "document": (37, 37, lambda b, h, i, j: (j <= i) & (doc[b, i] == doc[b, j]), None,
                     lambda q, k, v: F.document(q, k, v, doc)),
        "alibi": (37, 37, causal_mm, lambda s, b, h, i, j: s - slopes[h] * (i - j),
                  lambda q, k, v: F.alibi(q, k, v, slopes)),
        "softcap": (37, 37, causal_mm, lambda s, b, h, i, j: 2.0 * torch.tanh(s / 2.0),
                    lambda q, k, v: F.softcap(q, k, v, cap=2.0)),
        "streaming_sink": (37, 37, lambda b, h, i, j: (j <= i) & ((j < 3) | (i - j < 5)), None,
                           lambda q, k, v: F.streaming_sink(q, k, v, sinks=3, window=5)),
        "moa": (90, 70, lambda b, h, i, j: (j <= i) & ((j < 64) | (i - j < band[h])), None,
                lambda q, k, v: F.moa(q, k, v, band)),
        "zerotuning": (37, 37, causal_mm,
                       lambda s, b, h, i, j: torch.where(j == 0, s + torch.log(gamma[h]), s),
                       lambda q, k, v: F.zerotuning(q, k, v, gamma)),
        "temperature": (37, 37, causal_mm, lambda s, b, h, i, j: s * temp[h],
                        lambda q, k, v: F.temperature(q, k, v, temp)),
        "neighborhood_1d": (37, 37, lambda b, h, i, j: _natten_1d(i, j, 37, 6, 3), None,
                            lambda q, k, v: F.neighborhood_1d(q, k, v, K=6, s=3)),
        "neighborhood_2d": (42, 42, lambda b, h, i, j: _natten_1d(i // 7, j // 7, 6, 3)
                            & _natten_1d(i % 7, j % 7, 7, 4), None,
                            lambda q, k, v: F.neighborhood_2d(q, k, v, Y=6, X=7, KY=3, KX=4)),
        "dilated_sliding_window": (37, 37, lambda b, h, i, j: ((i - j).abs() <= 9)
                                   & ((i - j) % 3 == 0), None,
                                   lambda q, k, v: F.dilated_sliding_window(q, k, v, 9, 3)),
        "maxvit_block": (48, 48, lambda b, h, i, j: (i // 8 // 2 == j // 8 // 2)
                         & (i % 8 // 2 == j % 8 // 2), None,
                         lambda q, k, v: F.maxvit_block(q, k, v, Y=6, X=8, P=2)),
    }


FLEX = _flex_cases()


@pytest.mark.parametrize("name", sorted(FLEX))
def test_vs_flex_attention(name):
    Lq, Lk, mm, sm, formula = FLEX[name]
    q, k, v = qkv(Lq=Lq, Lk=Lk, seed=3)
    ro, rlse = flex(q, k, v, mm, sm, B=2, H=4)
    o, lse = formula(q, k, v)
    assert torch.isfinite(o).all()
    close(o, ro)
    fin = torch.isfinite(rlse)
    assert torch.equal(fin, torch.isfinite(lse))
    assert (lse[~fin] == -math.inf).all()
    close(lse[fin], rlse[fin])
    if not fin.all():
        assert (o[~fin] == 0).all()


# ----------------------------------------------------------------------------------------------
# Properties from docs/catalog.md
# ----------------------------------------------------------------------------------------------
def test_natten_noncausal_sees_exactly_K_and_shifts_at_borders():
    for L in range(1, 14):
        for K in range(1, L + 1):
            for s in range(1, 4):
                M = F.mask_neighborhood_axis(L, K, 1, s)
                assert (M.sum(-1) == K).all(), (L, K, s)
                for q in range(L):
                    idx = M[q].nonzero().flatten()
                    assert idx[-1] - idx[0] == K - 1  # contiguous window
                    # independent "start" formula
                    start = max(0, min(min((q // s) * s + s // 2, L - 1) - K // 2, L - K))
                    assert idx[0].item() == start, (L, K, s, q)
                    # queries of one stride group share one window
                    assert torch.equal(M[q], M[(q // s) * s])
                if s == 1:
                    assert M[0, :K].all()            # shifted, not shrunk, at the left border
                    assert M[L - 1, L - K:].all()    # and at the right border
                    for q in range(K // 2, L - (K // 2 + K % 2 - 1)):
                        idx = M[q].nonzero().flatten()
                        assert idx[0] == q - K // 2  # centred in the interior


def test_natten_dilation_reduces_to_undilated():
    for L in (9, 10, 13):
        for d in (2, 3):
            for K in (1, 2, 3):
                if K > L // d:
                    continue
                M = F.mask_neighborhood_axis(L, K, d, 1)
                assert (M.sum(-1) == K).all()
                for r in range(d):
                    pos = torch.arange(r, L, d)
                    sub = M[pos][:, pos]
                    assert torch.equal(sub, F.mask_neighborhood_axis(len(pos), K, 1, 1))
                    other = torch.tensor([x for x in range(L) if x % d != r], dtype=torch.long)
                    if len(other):
                        assert not M[pos][:, other].any()


def test_natten_causal():
    for L in (5, 11):
        for K in (1, 3, 4):
            M = F.mask_neighborhood_axis(L, K, 1, 1, causal=True)
            for q in range(L):
                assert M[q].nonzero().flatten().tolist() == list(range(max(0, q - K + 1), q + 1))
            # with stride: leader = end of the stride group (clamped)
            M = F.mask_neighborhood_axis(L, K, 1, 2, causal=True)
            for q in range(L):
                leader = min((q // 2) * 2 + 1, L - 1)
                want = [j for j in range(L) if j <= q and leader - j < K]
                assert M[q].nonzero().flatten().tolist() == want


def test_natten_2d_and_3d_counts():
    M = F.mask_neighborhood((6, 7), (3, 4))
    assert (M.sum(-1) == 12).all()
    M = F.mask_neighborhood((6, 7), (7, 7))  # the default 7x7 kernel on a 6-row grid is invalid
    assert M.shape == (42, 42)                # ... but the builder does not crash
    M = F.mask_neighborhood((3, 4, 5), (2, 3, 3), None, (1, 2, 2), (True, False, False))
    t = torch.arange(60) // 20
    assert torch.equal(M.sum(-1), 9 * torch.clamp(t + 1, max=2))


def test_maxvit_radial_clear_by_brute_force():
    Y, X, P, G = 6, 8, 2, 2
    blk, grd = F.mask_maxvit_block(Y, X, P), F.mask_maxvit_grid(Y, X, G)
    for a in range(Y * X):
        for b in range(Y * X):
            (ya, xa), (yb, xb) = divmod(a, X), divmod(b, X)
            assert blk[a, b] == (ya // P == yb // P and xa // P == xb // P)
            assert grd[a, b] == (ya % (Y // G) == yb % (Y // G) and xa % (X // G) == xb % (X // G))
    Fr, T = 9, 8
    rad = F.mask_radial(Fr, T)
    for i in range(Fr * T):
        for j in range(Fr * T):
            dist = abs(i // T - j // T)
            w = T if dist <= 1 else T >> int(math.floor(math.log2(dist)))
            assert rad[i, j] == (j // T == 0 or abs(i % T - j % T) <= w)
    n, Y, X, r = 3, 5, 6, 2
    cl = F.mask_clear(n, Y, X, r)
    for i in range(n + Y * X):
        for j in range(n + Y * X):
            if i < n or j < n:
                want = True
            else:
                (yi, xi), (yj, xj) = divmod(i - n, X), divmod(j - n, X)
                want = (yi - yj) ** 2 + (xi - xj) ** 2 < r * r
            assert cl[i, j] == want


@pytest.mark.parametrize("name", ["full", "causal", "alibi", "softcap", "zerotuning",
                                  "temperature", "sliding_window"])
def test_softmax_rows_sum_to_one(name):
    L = 17
    q, k, _ = qkv(Hk=4, Lq=L, Lk=L)
    eye = torch.eye(L, dtype=DT).expand(2, 4, L, L)  # v = identity: o is the probability matrix
    extra = {"alibi": dict(slopes=torch.rand(4, dtype=DT)),
             "softcap": dict(cap=1.5), "zerotuning": dict(gamma=torch.rand(4, dtype=DT) + 0.1),
             "temperature": dict(temp=torch.rand(4, dtype=DT) * 3),
             "sliding_window": dict(window=4)}.get(name, {})
    P, lse = getattr(F, name)(q, k, eye, **extra)
    close(P.sum(-1), torch.ones(2, 4, L, dtype=DT))
    assert (P >= 0).all()
    if name != "full":
        assert (P[..., ~F.mask_causal(L, L)] == 0).all()


def test_fully_masked_rows_zero_and_neg_inf_lse():
    q, k, v = qkv(Lq=12, Lk=12)
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    M = F.mask_causal(12, 12).clone()
    M[3:6] = False
    o, lse = F.attention(q, k, v, M)
    assert (o[:, :, 3:6] == 0).all()
    assert (lse[:, :, 3:6] == -math.inf).all()
    assert torch.isfinite(lse[:, :, :3]).all() and torch.isfinite(o).all()
    grads = torch.autograd.grad((o * rand(*o.shape)).sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][:, :, 3:6] == 0).all()
    o0, lse0 = F.sliding_window(q, k, v, window=0)
    assert (o0 == 0).all() and (lse0 == -math.inf).all()


def test_sink_softmax1_is_softmax_with_extra_zero_logit():
    q, k, v = qkv(Lq=15, Lk=15)
    o, lse = F.sink_softmax1(q, k, v)
    S = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 4.0
    S = S.masked_fill(~F.mask_causal(15, 15), -math.inf)
    S1 = torch.cat([S, torch.zeros_like(S[..., :1])], -1)
    P1 = torch.softmax(S1, -1)[..., :-1]
    close(o, P1 @ v.repeat_interleave(2, 1))
    close(lse, torch.logsumexp(S1, -1))
    close(lse, torch.log1p(torch.exp(S).sum(-1)))


# -- tier 3 against per-row numpy loops ---------------------------------------------------------
def _rows(q, k, v, b, h):
    Hq = q.shape[1]
    kh, vh = (h * k.shape[1]) // Hq, (h * v.shape[1]) // Hq
    return q[b, h].numpy(), k[b, kh].numpy(), v[b, vh].numpy()


def _loop(q, k, v, row_fn):
    B, Hq, Lq, _ = q.shape
    out = np.zeros((B, Hq, Lq, v.shape[-1]))
    for b in range(B):
        for h in range(Hq):
            qq, kk, vv = _rows(q, k, v, b, h)
            for i in range(Lq):
                n = min(i + 1, kk.shape[0])  # causal: keys 0..i
                s = kk[:n] @ qq[i] / math.sqrt(qq.shape[-1])
                out[b, h, i] = row_fn(s, n, len(kk)) @ vv[:n]
    return torch.from_numpy(out)


def _lssa_row(s, n):
    x = math.log(n) * s
    sp = np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)
    return sp / sp.sum()


def _lssar_row(s, n, p=3.0, tau=1.0):
    A = _lssa_row(s, n)
    R = np.maximum(n * A - tau, 0) ** p
    return R / R.sum() if R.sum() > 0 else A


@pytest.mark.parametrize("lens", [(13, 13), (17, 9)])
def test_tier3_vs_row_loops(lens):
    q, k, v = qkv(Hq=4, Hk=2, Hv=1, Lq=lens[0], Lk=lens[1], D=8, Dv=5)
    close(F.sigmoid(q, k, v), _loop(q, k, v, lambda s, n, Lk: 1 / (1 + np.exp(-(s - math.log(Lk))))))
    close(F.sigmoid(q, k, v, bias=0.5), _loop(q, k, v, lambda s, n, Lk: 1 / (1 + np.exp(-s - 0.5))))
    close(F.relu(q, k, v), _loop(q, k, v, lambda s, n, Lk: np.maximum(s, 0) / n))
    close(F.softplus(q, k, v), _loop(q, k, v, lambda s, n, Lk: _lssa_row(s, n)))
    close(F.softplus_reweight(q, k, v), _loop(q, k, v, lambda s, n, Lk: _lssar_row(s, n)))
    close(F.softplus_reweight(q, k, v, p=2.0, tau=0.5),
          _loop(q, k, v, lambda s, n, Lk: _lssar_row(s, n, 2.0, 0.5)))
    temp = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=DT)
    o = F.temperature(q, k, v, temp)[0]
    for h in range(4):
        ref = _loop(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], v, lambda s, n, Lk, t=temp[h].item():
                    np.exp(t * s - (t * s).max()) / np.exp(t * s - (t * s).max()).sum())
        close(o[:, h:h + 1], ref)


def test_softplus_reweight_falls_back_exactly_where_R_sums_to_zero():
    q, k, v = qkv(Hq=2, Hk=2, Hv=2, Lq=16, Lk=16, D=8)
    q[:, :, 5] = 0.0   # S = 0 on the row: A uniform, N*A - tau = 0 everywhere, R = 0
    q[:, 1, 9] = 0.0
    S = q @ k.transpose(-1, -2) / math.sqrt(8)
    M = F.mask_causal(16, 16).expand(S.shape)
    W, fallback = F.softplus_reweight_weights(S, M)
    A, _ = F.softplus_weights(S, M)
    want = torch.zeros(2, 2, 16, dtype=torch.bool)
    want[:, :, 0] = True   # N = 1: A = 1, N*A - 1 = 0
    want[:, :, 5] = True
    want[:, 1, 9] = True
    assert torch.equal(fallback.squeeze(-1), want)
    assert torch.equal(W[fallback.expand_as(W)], A[fallback.expand_as(A)])
    o_r, o_a = F.softplus_reweight(q, k, v), F.softplus(q, k, v)
    assert torch.equal(o_r[want], o_a[want])
    assert not torch.allclose(o_r[~want], o_a[~want])
    close(W.sum(-1), torch.ones(2, 2, 16, dtype=DT))


# -- autograd ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["alibi", "sink_logit", "zerotuning", "temperature", "softcap",
                                  "sink_softmax1", "sigmoid", "relu", "softplus",
                                  "softplus_reweight", "document"])
def test_formulas_are_differentiable(name):
    q, k, v = qkv(B=1, Hq=2, Hk=1, Hv=1, Lq=6, Lk=6, D=3, seed=7)
    extra = {"alibi": {"slopes": torch.tensor([0.3, 0.7], dtype=DT)},
             "sink_logit": {"sink": torch.tensor([0.3, -0.7], dtype=DT)},
             "zerotuning": {"gamma": torch.tensor([0.3, 1.7], dtype=DT)},
             "temperature": {"temp": torch.tensor([0.3, 1.7], dtype=DT)},
             "softcap": {"cap": 1.0},
             "document": {"doc_ids": torch.tensor([[0, 0, 1, 1, 1, 2]])}}.get(name, {})
    leaves = [q, k, v] + [t for t in extra.values() if torch.is_tensor(t) and t.is_floating_point()]

    def fn(*xs):
        kw = dict(extra)
        for key, x in zip([n for n, t in extra.items()
                           if torch.is_tensor(t) and t.is_floating_point()], xs[3:]):
            kw[key] = x
        out = getattr(F, name)(*xs[:3], **kw)
        return out if isinstance(out, tuple) else (out,)

    leaves = [t.clone().requires_grad_(True) for t in leaves]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)
