"""Hand-written dense reference formulas for every entry of the variant catalog.

Written directly from `docs/catalog.md` (the contract), independently of the `.attn` specs and of the
compiler: full score matrices, float64-friendly, differentiable with torch.autograd. Tests compute
reference outputs *and* reference gradients (q, k, v and learnable inputs) from these functions.

Calling convention (docs/catalog.md):
  q [B, Hq, Lq, Dqk], k [B, Hk, Lk, Dqk], v [B, Hv, Lk, Dv]  ->  o [B, Hq, Lq, Dv]
  query head h reads key head floor(h*Hk/Hq) and value head floor(h*Hv/Hq);
  S = scale * q.k with scale = 1/sqrt(Dqk) unless given;
  a row that sees no key outputs exactly 0 and has lse = -inf.

Softmax-family functions return `(o, lse)`, lse being the natural log of the softmax denominator
(a sink's exp term included). The other normalizations (sigmoid, relu, softplus, softplus_reweight)
return `o` only.

Mask builders return bool tensors whose last two dims are [Lq, Lk] (leading dims broadcast against
[B, Hq, Lq, Lk]); they are separate so tests can inspect them.
"""
from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------
# Shared machinery
# ----------------------------------------------------------------------------------------------
def head_index(Hq: int, Hsrc: int) -> torch.Tensor:
    """Source head read by each query head: floor(h * Hsrc / Hq)."""
    return torch.tensor([(h * Hsrc) // Hq for h in range(Hq)], dtype=torch.long)


def expand_heads(q, k, v):
    """k, v gathered so that head h of the result is the head query head h reads."""
    Hq = q.shape[1]
    k = k.index_select(1, head_index(Hq, k.shape[1]).to(k.device))
    v = v.index_select(1, head_index(Hq, v.shape[1]).to(v.device))
    return k, v


def check_shapes(q, k, v):
    assert q.dim() == k.dim() == v.dim() == 4, "q, k, v must be [B, H, L, D]"
    assert q.shape[0] == k.shape[0] == v.shape[0], "batch mismatch"
    assert q.shape[3] == k.shape[3], "q and k head dims differ"
    assert k.shape[2] == v.shape[2], "k and v lengths differ"


def scores(q, k, scale=None):
    """S[b, h, i, j] = scale * q[b,h,i] . k[b,kh,j] (k already expanded to Hq heads)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return scale * (q @ k.transpose(-1, -2))


def indices(B, H, Lq, Lk, device=None):
    """Broadcastable index tensors b [B,1,1,1], h [1,H,1,1], i [1,1,Lq,1], j [1,1,1,Lk]."""
    ar = lambda n: torch.arange(n, device=device)  # noqa: E731
    return (ar(B).view(B, 1, 1, 1), ar(H).view(1, H, 1, 1),
            ar(Lq).view(1, 1, Lq, 1), ar(Lk).view(1, 1, 1, Lk))


def _full_mask(mask, shape, device):
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    return torch.as_tensor(mask, device=device).to(torch.bool).expand(shape)


def per_head(x, H, dtype):
    """A per-head parameter (tensor [H] or python scalar) as a [1, H, 1, 1] tensor."""
    x = torch.as_tensor(x, dtype=dtype) if not torch.is_tensor(x) else x
    return x.reshape(-1).expand(H).reshape(1, H, 1, 1) if x.numel() == 1 else x.reshape(1, H, 1, 1)


def attention(q, k, v, mask=None, score_mod=None, scale=None, sink=None):
    """Generic masked softmax attention.

    mask: bool, broadcastable to [B, Hq, Lq, Lk] (None = all true).
    score_mod: callable (S, b, h, i, j) -> S' applied to the scaled scores.
    sink: None, or a per-head logit [Hq] (tensor or scalar) that joins the denominator with no value.
    Returns (o [B, Hq, Lq, Dv], lse [B, Hq, Lq]).
    """
    check_shapes(q, k, v)
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    k, v = expand_heads(q, k, v)
    S = scores(q, k, scale)
    if score_mod is not None:
        S = score_mod(S, *indices(B, Hq, Lq, Lk, q.device))
    M = _full_mask(mask, S.shape, S.device)
    Sm = torch.where(M, S, torch.full_like(S, NEG_INF))
    m = Sm.amax(dim=-1, keepdim=True)
    if sink is not None:
        sk = per_head(sink, Hq, S.dtype).to(S.device).expand(B, Hq, Lq, 1)
        m = torch.maximum(m, sk)
    # [Note] fully masked rows: m = -inf; use 0 so exp(-inf - 0) = 0 and no NaN appears.
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.where(M, torch.exp(Sm - m), torch.zeros_like(S))
    denom = e.sum(dim=-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sk - m)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    P = e / safe
    o = P @ v
    lse = torch.where(denom > 0, m + torch.log(safe), torch.full_like(denom, NEG_INF)).squeeze(-1)
    return o, lse


def weighted(q, k, v, weights_fn, scale=None):
    """Non-softmax normalizations: o = W v with W = weights_fn(S, i, j) (already masked)."""
    check_shapes(q, k, v)
    B, Hq, Lq, _ = q.shape
    k, v = expand_heads(q, k, v)
    S = scores(q, k, scale)
    _, _, i, j = indices(B, Hq, Lq, k.shape[2], q.device)
    return weights_fn(S, i, j) @ v


# ----------------------------------------------------------------------------------------------
# Mask builders (bool, last two dims [Lq, Lk])
# ----------------------------------------------------------------------------------------------
def _ij(Lq, Lk):
    return torch.arange(Lq).view(Lq, 1), torch.arange(Lk).view(1, Lk)


def mask_full(Lq, Lk):
    return torch.ones(Lq, Lk, dtype=torch.bool)


def mask_causal(Lq, Lk):
    i, j = _ij(Lq, Lk)
    return j <= i


def mask_sliding_window(Lq, Lk, window=256):
    i, j = _ij(Lq, Lk)
    return (j <= i) & (i - j < window)


def mask_prefix_lm(Lq, Lk, prefix=64):
    i, j = _ij(Lq, Lk)
    return (j < prefix) | (j <= i)


def mask_document(doc_ids):
    """doc_ids int [B, L] -> [B, 1, L, L]."""
    L = doc_ids.shape[1]
    same = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
    return same & mask_causal(L, L)


def mask_streaming_sink(Lq, Lk, sinks=4, window=256):
    i, j = _ij(Lq, Lk)
    return (j <= i) & ((j < sinks) | (i - j < window))


def mask_moa(Lq, Lk, band):
    """band int [Hq] -> [1, Hq, Lq, Lk]."""
    i, j = _ij(Lq, Lk)
    bnd = torch.as_tensor(band).view(-1, 1, 1)
    return ((j <= i) & ((j < 64) | (i - j < bnd))).unsqueeze(0)


def neighborhood_axis_window(q, L, K, d=1, s=1, causal=False):
    """The literal per-axis NATTEN rule of docs/catalog.md: True/False for every kv in range(L)."""
    out = []
    r = q % d
    Lr = len(range(r, L, d))  # L' = positions in q's residue class
    qr = q // d
    left, right = K // 2, K // 2 + K % 2 - 1
    for kv in range(L):
        if kv % d != r:
            out.append(False)
            continue
        kr = kv // d
        if causal:
            leader = min((qr // s) * s + s - 1, Lr - 1)
            out.append(kr <= qr and leader - kr < K)
        else:
            leader = min((qr // s) * s + s // 2, Lr - 1)
            centre = min(max(leader, left), Lr - 1 - right)
            out.append(centre - left <= kr <= centre + right)
    return out


def mask_neighborhood_axis(L, K, d=1, s=1, causal=False):
    """[L, L] bool: one axis of neighborhood attention (kernel K, dilation d, stride s)."""
    return torch.tensor([neighborhood_axis_window(q, L, K, d, s, causal) for q in range(L)],
                        dtype=torch.bool)


def unravel(n, shape):
    """Row-major coordinates of token indices 0..n-1 for a grid `shape` (list of LongTensors)."""
    idx = torch.arange(n)
    coords = []
    for ext in reversed(shape):
        coords.append(idx % ext)
        idx = idx // ext
    return list(reversed(coords))


def mask_product(shape, axis_masks):
    """AND of per-axis [Lx, Lx] masks over a row-major grid -> [L, L]."""
    L = math.prod(shape)
    coords = unravel(L, shape)
    M = torch.ones(L, L, dtype=torch.bool)
    for c, am in zip(coords, axis_masks):
        M &= am[c.view(L, 1), c.view(1, L)]
    return M


def mask_neighborhood(shape, kernel, dilation=None, stride=None, causal=None):
    n = len(shape)
    dilation = dilation or (1,) * n
    stride = stride or (1,) * n
    causal = causal or (False,) * n
    return mask_product(shape, [mask_neighborhood_axis(L, K, d, s, c) for L, K, d, s, c
                                in zip(shape, kernel, dilation, stride, causal)])


def mask_maxvit_block(Y=16, X=16, P=4):
    y, x = unravel(Y * X, (Y, X))
    return ((y.view(-1, 1) // P == y.view(1, -1) // P) & (x.view(-1, 1) // P == x.view(1, -1) // P))


def mask_maxvit_grid(Y=16, X=16, G=4):
    y, x = unravel(Y * X, (Y, X))
    gy, gx = Y // G, X // G
    return ((y.view(-1, 1) % gy == y.view(1, -1) % gy) & (x.view(-1, 1) % gx == x.view(1, -1) % gx))


def mask_dilated_sliding_window(Lq, Lk, window=64, dilation=4):
    i, j = _ij(Lq, Lk)
    dist = (i - j).abs()
    return (dist <= window) & (dist % dilation == 0)


def _floor_log2(x):
    """floor(log2(x)) for integer tensors x >= 1, exactly."""
    out = torch.zeros_like(x)
    for b in range(1, 63):
        out += (x >= (1 << b)).to(x.dtype)
    return out


def mask_radial(F=8, T=64):
    L = F * T
    i, j = _ij(L, L)
    fi, fj = i // T, j // T
    r, c = i % T, j % T
    dist = (fi - fj).abs()
    w = torch.where(dist <= 1, torch.full_like(dist, T),
                    T >> _floor_log2(torch.clamp(dist, min=1)))
    return (fj == 0) | ((r - c).abs() <= w)


def mask_clear(n_text=16, Y=16, X=16, r=4):
    L = n_text + Y * X
    i, j = _ij(L, L)
    ti, tj = i - n_text, j - n_text
    dy = ti // X - tj // X
    dx = ti % X - tj % X
    img = (i >= n_text) & (j >= n_text) & (dy * dy + dx * dx < r * r)
    return (i < n_text) | (j < n_text) | img


# ----------------------------------------------------------------------------------------------
# Tier 1
# ----------------------------------------------------------------------------------------------
def _lens(q, k):
    return q.shape[2], k.shape[2]


def full(q, k, v, scale=None):
    return attention(q, k, v, None, scale=scale)


def causal(q, k, v, scale=None):
    return attention(q, k, v, mask_causal(*_lens(q, k)), scale=scale)


def sliding_window(q, k, v, window=256, scale=None):
    return attention(q, k, v, mask_sliding_window(*_lens(q, k), window), scale=scale)


def prefix_lm(q, k, v, prefix=64, scale=None):
    return attention(q, k, v, mask_prefix_lm(*_lens(q, k), prefix), scale=scale)


def document(q, k, v, doc_ids, scale=None):
    assert q.shape[2] == k.shape[2] == doc_ids.shape[1], "document needs Lq == Lk == doc_ids len"
    return attention(q, k, v, mask_document(doc_ids), scale=scale)


def alibi(q, k, v, slopes, scale=None):
    def mod(S, b, h, i, j):
        return S - slopes.view(1, -1, 1, 1).to(S.dtype) * (i - j).to(S.dtype)
    return attention(q, k, v, mask_causal(*_lens(q, k)), mod, scale)


def softcap(q, k, v, cap=50.0, scale=None):
    return attention(q, k, v, mask_causal(*_lens(q, k)),
                     lambda S, b, h, i, j: cap * torch.tanh(S / cap), scale)


def streaming_sink(q, k, v, sinks=4, window=256, scale=None):
    return attention(q, k, v, mask_streaming_sink(*_lens(q, k), sinks, window), scale=scale)


def sink_logit(q, k, v, sink, scale=None):
    return attention(q, k, v, mask_causal(*_lens(q, k)), scale=scale, sink=sink)


def zerotuning(q, k, v, gamma, scale=None):
    def mod(S, b, h, i, j):
        lg = torch.log(gamma.to(S.dtype)).view(1, -1, 1, 1)
        return S + torch.where(j == 0, lg, torch.zeros_like(lg))
    return attention(q, k, v, mask_causal(*_lens(q, k)), mod, scale)


def moa(q, k, v, band, scale=None):
    return attention(q, k, v, mask_moa(*_lens(q, k), band), scale=scale)


def diffqkv(q, k, v, scale=None):
    return causal(q, k, v, scale)


# ----------------------------------------------------------------------------------------------
# Tier 2 (Lq == Lk == product of the extents)
# ----------------------------------------------------------------------------------------------
def _grid(q, k, L):
    assert q.shape[2] == k.shape[2] == L, f"this variant needs Lq == Lk == {L}"


def neighborhood_1d(q, k, v, K=7, d=1, s=1, scale=None):
    L = q.shape[2]
    _grid(q, k, L)
    return attention(q, k, v, mask_neighborhood_axis(L, K, d, s), scale=scale)


def neighborhood_2d(q, k, v, Y=16, X=16, KY=7, KX=7, scale=None):
    _grid(q, k, Y * X)
    return attention(q, k, v, mask_neighborhood((Y, X), (KY, KX)), scale=scale)


def dilated_neighborhood_2d(q, k, v, Y=16, X=16, KY=3, KX=3, DY=2, DX=2, scale=None):
    _grid(q, k, Y * X)
    return attention(q, k, v, mask_neighborhood((Y, X), (KY, KX), (DY, DX)), scale=scale)


def neighborhood_3d_causal(q, k, v, T=4, Y=8, X=8, KT=3, KY=3, KX=3, SY=2, SX=2, scale=None):
    _grid(q, k, T * Y * X)
    M = mask_neighborhood((T, Y, X), (KT, KY, KX), (1, 1, 1), (1, SY, SX), (True, False, False))
    return attention(q, k, v, M, scale=scale)


def maxvit_block(q, k, v, Y=16, X=16, P=4, scale=None):
    _grid(q, k, Y * X)
    return attention(q, k, v, mask_maxvit_block(Y, X, P), scale=scale)


def maxvit_grid(q, k, v, Y=16, X=16, G=4, scale=None):
    _grid(q, k, Y * X)
    return attention(q, k, v, mask_maxvit_grid(Y, X, G), scale=scale)


def dilated_sliding_window(q, k, v, window=64, dilation=4, scale=None):
    return attention(q, k, v, mask_dilated_sliding_window(*_lens(q, k), window, dilation),
                     scale=scale)


def radial(q, k, v, F=8, T=64, scale=None):
    _grid(q, k, F * T)
    return attention(q, k, v, mask_radial(F, T), scale=scale)


def clear(q, k, v, n_text=16, Y=16, X=16, r=4, scale=None):
    _grid(q, k, n_text + Y * X)
    return attention(q, k, v, mask_clear(n_text, Y, X, r), scale=scale)


# ----------------------------------------------------------------------------------------------
# Tier 3
# ----------------------------------------------------------------------------------------------
def _visible(M):
    return M.sum(dim=-1, keepdim=True).to(torch.float64)


def sigmoid(q, k, v, bias=None, scale=None):
    """o[i] = sum_j M sigmoid(S + bias) v[j], causal, no row normalization; bias = -log(Lk)."""
    if bias is None:
        bias = -math.log(k.shape[2])

    def w(S, i, j):
        return torch.where(j <= i, torch.sigmoid(S + bias), torch.zeros_like(S))
    return weighted(q, k, v, w, scale)


def relu(q, k, v, scale=None):
    """o[i] = sum_j M relu(S) v[j] / N_i, causal (rows with N_i = 0 give 0)."""
    def w(S, i, j):
        M = (j <= i).expand(S.shape)
        N = _visible(M).to(S.dtype)
        W = torch.where(M, torch.relu(S), torch.zeros_like(S))
        return W / torch.where(N > 0, N, torch.ones_like(N))
    return weighted(q, k, v, w, scale)


def _softplus(x):
    return torch.logaddexp(x, torch.zeros_like(x))  # exact log(1 + e^x), smooth gradient


def softplus_weights(S, M):
    """A = M softplus(lam S) / sum_j M softplus(lam S), lam_i = log(N_i). Returns (A, N)."""
    N = _visible(M).to(S.dtype)
    lam = torch.log(torch.where(N > 0, N, torch.ones_like(N)))
    Wt = torch.where(M, _softplus(lam * S), torch.zeros_like(S))
    den = Wt.sum(-1, keepdim=True)
    return Wt / torch.where(den > 0, den, torch.ones_like(den)), N


def softplus(q, k, v, scale=None):
    """LSSA: o = A v with A as in softplus_weights, causal."""
    def w(S, i, j):
        return softplus_weights(S, (j <= i).expand(S.shape))[0]
    return weighted(q, k, v, w, scale)


def softplus_reweight_weights(S, M, p=3.0, tau=1.0):
    """The final weights of LSSAR and the bool [.., Lq, 1] of rows that fall back to A."""
    A, N = softplus_weights(S, M)
    R = torch.where(M, torch.relu(N * A - tau) ** p, torch.zeros_like(S))
    sR = R.sum(-1, keepdim=True)
    use_R = sR > 0
    W = torch.where(use_R, R / torch.where(use_R, sR, torch.ones_like(sR)), A)
    return W, ~use_R


def softplus_reweight(q, k, v, p=3.0, tau=1.0, scale=None):
    """LSSAR (our reading): R = M relu(N_i A - tau)^p; o = R v / sum R, or A v where sum R == 0."""
    def w(S, i, j):
        return softplus_reweight_weights(S, (j <= i).expand(S.shape), p, tau)[0]
    return weighted(q, k, v, w, scale)


def sink_softmax1(q, k, v, scale=None):
    """softmax with a fixed zero logit in the denominator: exp(S) / (1 + sum_j M exp(S)), causal."""
    return attention(q, k, v, mask_causal(*_lens(q, k)), scale=scale, sink=0.0)


def temperature(q, k, v, temp, scale=None):
    """Causal softmax of S * temp[h]."""
    def mod(S, b, h, i, j):
        return S * temp.to(S.dtype).view(1, -1, 1, 1)
    return attention(q, k, v, mask_causal(*_lens(q, k)), mod, scale)


# ----------------------------------------------------------------------------------------------
# Block top-k selection (Tier 5): the selected tiles as a mask
# ----------------------------------------------------------------------------------------------
def tile_selection(q, k, mask, keep, count, tile):
    """bool [B, Hq, tiles_q, tiles_k], per query tile I of `tile` queries (per batch entry and head):
    key tile J is kept where `mask and keep` holds for some pair of (I, J); of the other tiles with
    a pair under `mask`, the `count` with the largest dot(mean q over tile I, mean k over tile J) are
    chosen (ties: the lower J). mask, keep: bool broadcastable to [B, Hq, Lq, Lk]. Python loops over
    the tiles, the means one slice at a time (independent of the compiler's padded sums and sort)."""
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    k = k.index_select(1, head_index(Hq, k.shape[1]))
    mask = mask.expand(B, Hq, Lq, Lk)
    both = (mask & keep).expand(B, Hq, Lq, Lk)
    tq, tk = -(-Lq // tile), -(-Lk // tile)
    visible = torch.zeros(B, Hq, tq, tk, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            for i in range(tq):
                rows = slice(i * tile, (i + 1) * tile)
                q_mean = q[b, h, rows].double().mean(0)
                ranked = []
                for j in range(tk):
                    cols = slice(j * tile, (j + 1) * tile)
                    if both[b, h, rows, cols].any():
                        visible[b, h, i, j] = True
                    elif mask[b, h, rows, cols].any():
                        ranked.append((-float(q_mean @ k[b, h, cols].double().mean(0)), j))
                for _, j in sorted(ranked)[:count]:
                    visible[b, h, i, j] = True
    return visible


def tile_mask(visible, Lq, Lk, tile):
    """The tile selection [B, H, tiles_q, tiles_k] as an element mask [B, H, Lq, Lk]."""
    return visible.repeat_interleave(tile, 2)[:, :, :Lq].repeat_interleave(tile, 3)[..., :Lk]


def block_topk(q, k, v, k_tiles=8, sinks=4, window=256, tile=128, scale=None):
    """Kinetics / The Sparse Frontier style block top-k, causal: `k_tiles` key tiles per query tile
    chosen by mean-pooled scores, and the tiles holding the sinks (j < sinks) or the local window
    (i - j < window) always; softmax over the causal mask restricted to the selected tiles."""
    Lq, Lk = q.shape[2], k.shape[2]
    _, _, i, j = indices(1, 1, Lq, Lk)
    causal = j <= i
    visible = tile_selection(q.detach(), k.detach(), causal, (j < sinks) | (i - j < window), k_tiles, tile)
    return attention(q, k, v, causal & tile_mask(visible, Lq, Lk, tile), scale=scale)


SOFTMAX_FAMILY = {
    "full", "causal", "sliding_window", "prefix_lm", "document", "alibi", "softcap",
    "streaming_sink", "sink_logit", "zerotuning", "moa", "diffqkv", "neighborhood_1d",
    "neighborhood_2d", "dilated_neighborhood_2d", "neighborhood_3d_causal", "maxvit_block",
    "maxvit_grid", "dilated_sliding_window", "radial", "clear", "sink_softmax1", "temperature",
}
OTHER_NORMALIZATIONS = {"sigmoid", "relu", "softplus", "softplus_reweight"}
CATALOG = SOFTMAX_FAMILY | OTHER_NORMALIZATIONS
