"""A corpus of what users write: masks and score mods as attention-gym and FlexAttention document them,
written here as `.attn` specs in our own words. Each runs through the kernels (interpreter, tiny
shapes): forward against a float64 formula written in this file, backward against float64 autograd of
that formula, and its tile plan against brute force over a mask evaluator written here."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from attnc.runtime import launch

import attnc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import brute_force

D = 16


@dataclass
class Case:
    spec: str  # the spec's body (after `attention <name>`)
    mask: object  # (i, j, b, h, inp) -> bool broadcastable to [B, H, Lq, Lk]; None: no mask
    score: object = None  # (s, i, j, b, h, inp) -> s'
    inputs: object = None  # (B, H, Lq, Lk, generator) -> dict of tensors and params
    Lq: int = 21
    Lk: int = 21
    B: int = 2
    H: int = 2
    kw: dict = field(default_factory=dict)
    learn: tuple = ()  # learnable inputs: their gradients are checked against the formula's too


def _doc(B, L, g, n=4):
    return torch.sort(torch.randint(0, n, (B, L), generator=g), -1).values


def _t5_bucket(d, NB=8, E=2):
    a = d.abs()
    big = (E + torch.floor(torch.log2(torch.clamp(a // E, min=1).double())).long()).clamp(max=NB // 2 - 1)
    return torch.where(a < E, a, big) + torch.where(d > 0, NB // 2, 0)


def _t5_log_bucket(d, NB=8, E=2, MAXD=16):
    """T5's bucket: exact below E, then logarithmic up to MAXD (constants folded: log2(MAXD / E))."""
    a = d.abs()
    far = E + torch.floor(torch.log2(a.clamp(min=1).double() / E) / math.log2(MAXD / E) * (NB // 2 - E)).long()
    return torch.where(a < E, a, far.clamp(max=NB // 2 - 1)) + torch.where(d > 0, NB // 2, 0)


def _morton(i, X=4):
    y, x = i // X, i % X
    return (x & 1) | (y & 1) << 1 | (x & 2) << 1 | (y & 2) << 2


def _hh(h):
    return h.double()


CASES = {
    "causal": Case("mask kv <= q", lambda i, j, b, h, inp: j <= i),
    "sliding_window": Case("param window = 5\nmask kv <= q and q - kv < window",
                           lambda i, j, b, h, inp: (j <= i) & (i - j < 5)),
    "sliding_window_other_value": Case("param window = 5\nmask kv <= q and q - kv < window",
                                       lambda i, j, b, h, inp: (j <= i) & (i - j < 9), kw={"window": 9}),
    "prefix_lm": Case("param prefix = 6\nmask kv <= q or kv < prefix", lambda i, j, b, h, inp: (j <= i) | (j < 6)),
    "document": Case("input doc: int[B, L]\nmask doc[b, q] == doc[b, kv]",
                     lambda i, j, b, h, inp: inp["doc"][:, None, :, None] == inp["doc"][:, None, None, :],
                     inputs=lambda B, H, Lq, Lk, g: {"doc": _doc(B, Lq, g)}),
    "document_causal": Case("input doc: int[B, L]\nmask doc[b, q] == doc[b, kv] and kv <= q",
                            lambda i, j, b, h, inp: (inp["doc"][:, None, :, None] == inp["doc"][:, None, None, :])
                            & (j <= i), inputs=lambda B, H, Lq, Lk, g: {"doc": _doc(B, Lq, g)}),
    "alibi": Case("mask kv <= q\nscore s - 2 ** (-8 * (h + 1) / Hq) * (q - kv)", lambda i, j, b, h, inp: j <= i,
                  lambda s, i, j, b, h, inp: s - 2.0 ** (-8 * (_hh(h) + 1) / 2) * (i - j)),
    "alibi_learned_slopes": Case("input slopes: float[Hq]\nmask kv <= q\nscore s - slopes[h] * (q - kv)",
                                 lambda i, j, b, h, inp: j <= i,
                                 lambda s, i, j, b, h, inp: s - inp["slopes"].double()[h] * (i - j),
                                 inputs=lambda B, H, Lq, Lk, g: {"slopes": torch.rand(H, generator=g)}),
    "softcap": Case("param cap = 2.0\nscore cap * tanh(s / cap)", None,
                    lambda s, i, j, b, h, inp: 2.0 * torch.tanh(s / 2.0)),
    "relative_position": Case("mask kv <= q\nscore s + 0.1 * (q - kv)", lambda i, j, b, h, inp: j <= i,
                              lambda s, i, j, b, h, inp: s + 0.1 * (i - j)),
    "relative_bias_table": Case("const R = 4\ninput rel: float[Hq, 2 * R + 1]\nscore s + rel[h, q - kv + R]", None,
                                lambda s, i, j, b, h, inp: s + inp["rel"].double()[h, (i - j + 4).clamp(0, 8)],
                                inputs=lambda B, H, Lq, Lk, g: {"rel": torch.randn(H, 9, generator=g)}),
    "t5_bias": Case("const NB = 8, E = 2\ninput t5: float[Hq, NB]\n"
                    "let mag(d) = abs(d) if abs(d) < E else min(E + floor(log2(max(abs(d) // E, 1))), NB // 2 - 1)\n"
                    "let bucket(d) = mag(d) + (NB // 2 if d > 0 else 0)\nscore s + t5[h, bucket(q - kv)]", None,
                    lambda s, i, j, b, h, inp: s + inp["t5"].double()[h, _t5_bucket(i - j)],
                    inputs=lambda B, H, Lq, Lk, g: {"t5": torch.randn(H, 8, generator=g)}),
    # trained biases: gradients of reads per key, per (query, key) pair and per table entry
    "relative_bias_table_learned": Case(
        "const R = 4\ninput rel: float[Hq, 2 * R + 1] learnable\nmask kv <= q\nscore s + rel[h, q - kv + R]",
        lambda i, j, b, h, inp: j <= i,
        lambda s, i, j, b, h, inp: s + inp["rel"][h, (i - j + 4).clamp(0, 8)],
        inputs=lambda B, H, Lq, Lk, g: {"rel": torch.randn(H, 9, generator=g)}, learn=("rel",)),
    "t5_bias_learned": Case("const NB = 8, E = 2\ninput t5: float[Hq, NB] learnable\n"
                            "let mag(d) = abs(d) if abs(d) < E else min(E + floor(log2(max(abs(d) // E, 1))), NB // 2 - 1)\n"
                            "let bucket(d) = mag(d) + (NB // 2 if d > 0 else 0)\nscore s + t5[h, bucket(q - kv)]", None,
                            lambda s, i, j, b, h, inp: s + inp["t5"][h, _t5_bucket(i - j)],
                            inputs=lambda B, H, Lq, Lk, g: {"t5": torch.randn(H, 8, generator=g)}, Lq=17, Lk=23,
                            learn=("t5",)),
    "t5_log_buckets_learned": Case(
        "const NB = 8, E = 2, MAXD = 16\ninput t5: float[Hq, NB] learnable\n"
        "let mag(d) = abs(d) if abs(d) < E else min(E + floor(log2(max(abs(d), 1) / E) / log2(MAXD / E) * (NB // 2 - E)), "
        "NB // 2 - 1)\nlet bucket(d) = mag(d) + (NB // 2 if d > 0 else 0)\nmask kv <= q\nscore s + t5[h, bucket(q - kv)]",
        lambda i, j, b, h, inp: j <= i, lambda s, i, j, b, h, inp: s + inp["t5"][h, _t5_log_bucket(i - j)],
        inputs=lambda B, H, Lq, Lk, g: {"t5": torch.randn(H, 8, generator=g)}, Lq=30, Lk=30, learn=("t5",)),
    "key_bias_learned": Case("input kb: float[B, Lk] learnable\ninput keep: bool[B, Lk]\nmask keep[b, kv]\n"
                             "score s + kb[b, kv]", lambda i, j, b, h, inp: inp["keep"][:, None, None, :],
                             lambda s, i, j, b, h, inp: s + inp["kb"][:, None, None, :],
                             inputs=lambda B, H, Lq, Lk, g: {"kb": torch.randn(B, Lk, generator=g),
                                                             "keep": torch.rand(B, Lk, generator=g) < 0.7},
                             Lq=15, Lk=26, learn=("kb",)),
    "position_difference_learned": Case("input pos: float[L] learnable\nmask kv <= q\nscore s + pos[q] - pos[kv]",
                                        lambda i, j, b, h, inp: j <= i,
                                        lambda s, i, j, b, h, inp: s + inp["pos"][i] - inp["pos"][j],
                                        inputs=lambda B, H, Lq, Lk, g: {"pos": torch.randn(Lq, generator=g)},
                                        learn=("pos",)),
    "pair_bias_learned": Case("input bias: float[Hq, Lq, Lk] learnable\nscore s + bias[h, q, kv]", None,
                              lambda s, i, j, b, h, inp: s + inp["bias"][None],
                              inputs=lambda B, H, Lq, Lk, g: {"bias": torch.randn(H, Lq, Lk, generator=g)},
                              Lq=19, Lk=13, learn=("bias",)),
    "row_table_learned": Case("input w: float[4] learnable\nmask kv <= q\nscore s * w[q % 4]",
                              lambda i, j, b, h, inp: j <= i, lambda s, i, j, b, h, inp: s * inp["w"][i % 4],
                              inputs=lambda B, H, Lq, Lk, g: {"w": torch.rand(4, generator=g) + 0.5}, learn=("w",)),
    "padding": Case("input keep: bool[B, Lk]\nmask keep[b, kv]", lambda i, j, b, h, inp: inp["keep"][:, None, None, :],
                    inputs=lambda B, H, Lq, Lk, g: {"keep": torch.rand(B, Lk, generator=g) < 0.7}),
    "padding_causal": Case("input keep: bool[B, Lk]\nmask kv <= q and keep[b, kv]",
                           lambda i, j, b, h, inp: (j <= i) & inp["keep"][:, None, None, :],
                           inputs=lambda B, H, Lq, Lk, g: {"keep": torch.rand(B, Lk, generator=g) < 0.7}),
    "lengths_per_batch": Case("input lens: int[B]\nmask kv < lens[b] and q < lens[b]",
                              lambda i, j, b, h, inp: (j < inp["lens"][b]) & (i < inp["lens"][b]),
                              inputs=lambda B, H, Lq, Lk, g: {"lens": torch.tensor([7, 21][:B])}),
    "dilated_sliding_window": Case("param w = 3, d = 2\nmask kv <= q and q - kv < w * d and (q - kv) % d == 0",
                                   lambda i, j, b, h, inp: (j <= i) & (i - j < 6) & ((i - j) % 2 == 0)),
    "global_tokens": Case("const G = 2, W = 2\nmask kv < G or q < G or abs(q - kv) <= W",
                          lambda i, j, b, h, inp: (j < 2) | (i < 2) | ((i - j).abs() <= 2)),
    "chunked_causal": Case("const C = 4\nmask q // C == kv // C and kv <= q",
                           lambda i, j, b, h, inp: (i // 4 == j // 4) & (j <= i)),
    "morton_blocks": Case("const Y = 4, X = 4\nlet coord(i) = unravel(i, Y, X)\nlet (qy, qx) = coord(q)\n"
                          "let (ky, kx) = coord(kv)\nlet z(y, x) = (x & 1) | (y & 1) << 1 | (x & 2) << 1 | (y & 2) << 2\n"
                          "mask z(qy, qx) >> 2 == z(ky, kx) >> 2 or kv == q",
                          lambda i, j, b, h, inp: (_morton(i) >> 2 == _morton(j) >> 2) | (i == j), Lq=16, Lk=16),
    "xor_blocks": Case("mask (q ^ kv) < 4", lambda i, j, b, h, inp: (i ^ j) < 4),
    "explicit_pair_mask": Case("input m: bool[Lq, Lk]\nmask m[q, kv]", lambda i, j, b, h, inp: inp["m"],
                               inputs=lambda B, H, Lq, Lk, g: {"m": torch.rand(Lq, Lk, generator=g) < 0.4},
                               Lq=19, Lk=13),
    "per_head_window": Case("input w: int[Hq]\nmask kv <= q and q - kv < w[h]",
                            lambda i, j, b, h, inp: (j <= i) & (i - j < inp["w"][h]),
                            inputs=lambda B, H, Lq, Lk, g: {"w": torch.tensor([3, 10][:H])}),
    "causal_aligned_to_the_end": Case("mask kv <= q + (Lk - Lq)", lambda i, j, b, h, inp: j <= i + (29 - 17),
                                      Lq=17, Lk=29),
    "document_offsets_gather": Case("const NDOC = 4\ninput doc: int[B, L]\ninput start: int[NDOC]\n"
                                    "mask doc[b, q] == doc[b, kv] and kv >= start[doc[b, q]]",
                                    lambda i, j, b, h, inp: (inp["doc"][:, None, :, None] == inp["doc"][:, None, None, :])
                                    & (j >= inp["start"][inp["doc"][:, None, :, None]]),
                                    inputs=lambda B, H, Lq, Lk, g: {"doc": _doc(B, Lq, g),
                                                                    "start": torch.tensor([0, 3, 8, 12])}),
    "bidirectional_switch": Case("param causal: bool = true\nmask kv <= q or not causal",
                                 lambda i, j, b, h, inp: (j <= i) | (i >= 0) & (j >= 0), kw={"causal": False}),
    "softcap_alibi_causal": Case("param cap = 3.0\nmask kv <= q\nscore cap * tanh((s - 0.25 * (q - kv)) / cap)",
                                 lambda i, j, b, h, inp: j <= i,
                                 lambda s, i, j, b, h, inp: 3.0 * torch.tanh((s - 0.25 * (i - j)) / 3.0)),
    "swin_relative_bias": Case("const WY = 3, WX = 4\ninput rpb: float[Hq, (2 * WY - 1) * (2 * WX - 1)]\n"
                               "let coord(i) = unravel(i, WY, WX)\nlet (qy, qx) = coord(q)\nlet (ky, kx) = coord(kv)\n"
                               "score s + rpb[h, (qy - ky + WY - 1) * (2 * WX - 1) + (qx - kx + WX - 1)]", None,
                               lambda s, i, j, b, h, inp: s + inp["rpb"].double()[
                                   h, (i // 4 - j // 4 + 2) * 7 + (i % 4 - j % 4 + 3)],
                               inputs=lambda B, H, Lq, Lk, g: {"rpb": torch.randn(H, 35, generator=g)}, Lq=12, Lk=12),
    "graphormer_spatial_bias": Case("input dist: int[B, Lq, Lk]\ninput sb: float[Hq, 6]\nmask dist[b, q, kv] < 5\n"
                                    "score s + sb[h, dist[b, q, kv]]",
                                    lambda i, j, b, h, inp: inp["dist"][:, None] < 5,
                                    lambda s, i, j, b, h, inp: s + inp["sb"].double()[h, inp["dist"][:, None].clamp(0, 5)],
                                    inputs=lambda B, H, Lq, Lk, g: {"dist": torch.randint(0, 8, (B, Lq, Lk), generator=g),
                                                                    "sb": torch.randn(H, 6, generator=g)}),
    "swin_relative_bias_learned": Case(
        "const WY = 3, WX = 4\ninput rpb: float[Hq, (2 * WY - 1) * (2 * WX - 1)] learnable\n"
        "let coord(i) = unravel(i, WY, WX)\nlet (qy, qx) = coord(q)\nlet (ky, kx) = coord(kv)\n"
        "score s + rpb[h, (qy - ky + WY - 1) * (2 * WX - 1) + (qx - kx + WX - 1)]", None,
        lambda s, i, j, b, h, inp: s + inp["rpb"][h, (i // 4 - j // 4 + 2) * 7 + (i % 4 - j % 4 + 3)],
        inputs=lambda B, H, Lq, Lk, g: {"rpb": torch.randn(H, 35, generator=g)}, Lq=12, Lk=12, learn=("rpb",)),
    "graphormer_spatial_bias_learned": Case(
        "input dist: int[B, Lq, Lk]\ninput sb: float[Hq, 6] learnable\nmask dist[b, q, kv] < 5\n"
        "score s + sb[h, dist[b, q, kv]]",
        lambda i, j, b, h, inp: inp["dist"][:, None] < 5,
        lambda s, i, j, b, h, inp: s + inp["sb"][h, inp["dist"][:, None].clamp(0, 5)],
        inputs=lambda B, H, Lq, Lk, g: {"dist": torch.randint(0, 8, (B, Lq, Lk), generator=g),
                                        "sb": torch.randn(H, 6, generator=g)}, Lq=14, Lk=18, learn=("sb",)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_corpus(tmp_path, name):
    c = CASES[name]
    path = tmp_path / f"{name}.attn"
    path.write_text(f"attention {name}\n{c.spec}\n")
    fn = attnc.load(path)
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    inp = c.inputs(c.B, c.H, c.Lq, c.Lk, g) if c.inputs else {}
    i = torch.arange(c.Lq)[None, None, :, None]
    j = torch.arange(c.Lk)[None, None, None, :]
    b = torch.arange(c.B)[:, None, None, None]
    h = torch.arange(c.H)[None, :, None, None]
    full = (c.B, c.H, c.Lq, c.Lk)
    mask = torch.ones(full, dtype=torch.bool) if c.mask is None else torch.broadcast_to(c.mask(i, j, b, h, inp), full)

    q = torch.randn(c.B, c.H, c.Lq, D, generator=g, requires_grad=True)
    k = torch.randn(c.B, c.H, c.Lk, D, generator=g, requires_grad=True)
    v = torch.randn(c.B, c.H, c.Lk, D, generator=g, requires_grad=True)
    for name in c.learn:
        inp[name].requires_grad_(True)
    with launch.count_visits() as log:
        o = fn(q, k, v, **inp, **c.kw)
    assert log and sum(int(x.clamp(min=0).sum()) for x in log) > 0, "the kernels did not run"

    # the formula, in float64; learnable inputs are float64 leaves of their own
    ind = {n: x.detach().double().requires_grad_(True) if n in c.learn else x for n, x in inp.items()}
    qd, kd, vd = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    s = qd @ kd.transpose(-1, -2) / math.sqrt(D)
    if c.score is not None:
        s = c.score(s, i, j, b, h, {n: x.double() if x.is_floating_point() else x for n, x in ind.items()})
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    want = p @ vd
    tol = max(want.abs().max().item(), 1e-3)
    assert (o.double() - want).abs().max().item() <= 2e-3 * tol, "forward"
    grad = torch.randn_like(want)
    got = torch.autograd.grad(o, (q, k, v) + tuple(inp[n] for n in c.learn), grad.float())
    ref = torch.autograd.grad(want, (qd, kd, vd) + tuple(ind[n] for n in c.learn), grad)
    for what, a, r in zip(["q", "k", "v", *c.learn], got, ref):
        assert a.shape == r.shape, f"d{what} shape"
        assert (a.double() - r).abs().max().item() <= 5e-3 * max(r.abs().max().item(), 1e-3), f"d{what}"

    for blocks in [(1, 1), (4, 4), (8, 4), (16, 16)]:
        plan = fn.plan(Lq=c.Lq, Lk=c.Lk, B=c.B, Hq=c.H, block_m=blocks[0], block_n=blocks[1], **inp, **c.kw)
        expected = brute_force(mask, *blocks)
        dense = torch.broadcast_to(plan.to_dense(), expected.shape)
        assert ((expected > 0) <= (dense > 0)).all(), f"unsound EMPTY tile at blocks {blocks}"
        assert ((dense == 2) <= (expected == 2)).all(), f"unsound FULL tile at blocks {blocks}"
        assert torch.equal(dense > 0, expected > 0), f"a visited tile holds no visible pair at blocks {blocks}"
