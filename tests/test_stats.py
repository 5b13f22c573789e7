"""Statistics of the weights (`stat`, issue 20 part 1) against float64 formulas written here: the dense
weights P of each spec computed in torch, then each statistic as its definition reads (received
attention sum_q P and max_q P per key; sum_kv P, max_kv P, entropy -sum P log P and the visible count
per row; totals per head). Softmax and general families, band, plan-list and dense walks, a select,
odd lengths with Lq != Lk, grouped heads; the entropy's gradient (q, k, v and a learnable sink) against
autograd through the formula; torch.compile; nothing of size Lq x Lk allocated; the errors."""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

import attnc
from attnc.errors import SpecError
from attnc.pipeline import compile_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
import formulas as F
from allocations import Allocations
from spec_helpers import _load
from spec_helpers import qkv_heads as _qkv

D = 16
EVERY = """
stat received = sum_q(P)
stat peak_received = max_q(P)
stat mass = sum_kv(P)
stat peak = max_kv(P)
stat entropy = entropy(P)
stat keys = visible
stat head_received = total(sum_q(P))
stat head_entropy = total(entropy(P))
"""


def _scores(q, k):
    kf, _ = F.expand_heads(q, k, k)
    return F.scores(q.double(), kf.double())


def softmax_weights(S, M, sink=None):
    """P = exp(S) / (sum_j M exp(S) + exp(sink)) on M, 0 elsewhere; a row without keys is 0."""
    Sm = torch.where(M, S, -math.inf)
    m = Sm.amax(-1, keepdim=True)
    if sink is not None:
        m = torch.maximum(m, sink)
    m = torch.where(torch.isfinite(m), m, 0.0).detach()
    e = torch.where(M, torch.exp(Sm - m), 0.0)
    den = e.sum(-1, keepdim=True) + (torch.exp(sink - m) if sink is not None else 0.0)
    return e / torch.where(den > 0, den, 1.0)


def formula_stats(P, M):
    """Each statistic by its definition, from dense weights P and mask M [B, Hq, Lq, Lk]."""
    logp = torch.log(torch.where(P > 0, P, 1.0))
    entropy = -(P * logp).sum(-1)
    return {
        "received": P.sum(2),
        "peak_received": torch.where(M, P, -math.inf).amax(2).nan_to_num(neginf=0.0),
        "mass": P.sum(-1),
        "peak": torch.where(M, P, -math.inf).amax(-1).nan_to_num(neginf=0.0),
        "entropy": entropy,
        "keys": M.sum(-1).double(),
        "head_received": P.sum((2, 3)),
        "head_entropy": entropy.sum(-1),
    }


def _mask(B, Hq, Lq, Lk, rule):
    _, _, i, j = F.indices(B, Hq, Lq, Lk)
    return torch.broadcast_to(rule(i, j), (B, Hq, Lq, Lk))


def _normalized(w):
    return w / w.sum(-1, keepdim=True).clamp(min=1e-300)


# (spec body, extra inputs, weights(S, M, inputs), mask(i, j, inputs), Lq, Lk, Hk)
CASES = {
    # band walk, Lq != Lk
    "causal": ("mask kv <= q", {}, lambda S, M, x: softmax_weights(S, M), lambda i, j, x: j <= i, 37, 53, 2),
    # band walk with a lower bound (a window), grouped heads
    "window": ("param window = 9\nmask kv <= q and q - kv < window", {"window": 9},
               lambda S, M, x: softmax_weights(S, M), lambda i, j, x: (j <= i) & (i - j < 9), 45, 45, 1),
    # plan-list walk (a data-dependent mask)
    "document": ("input doc_ids: int[B, L]\nmask doc_ids[b, q] == doc_ids[b, kv]",
                 {"doc_ids": (torch.arange(41) // 13)[None]},
                 lambda S, M, x: softmax_weights(S, M),
                 lambda i, j, x: x["doc_ids"][0][i] == x["doc_ids"][0][j], 41, 41, 2),
    # dense walk (no mask), Lq != Lk, and a learnable sink
    "sink": ("input sink: float[Hq] learnable\nprobs softmax(score, sink=sink[h])",
             {"sink": torch.tensor([0.5, -1.0])},
             lambda S, M, x: softmax_weights(S, M, x["sink"].double().view(1, -1, 1, 1)),
             lambda i, j, x: torch.ones_like(i == j), 30, 47, 2),
    # the general family: elementwise weights, and weights normalized by row statistics
    "sigmoid": ("mask kv <= q\nprobs sigmoid(score - 1.0)", {},
                lambda S, M, x: torch.where(M, torch.sigmoid(S - 1.0), 0.0), lambda i, j, x: j <= i, 33, 40, 2),
    "relu": ("mask kv <= q\nprobs relu(score) / visible", {},
             lambda S, M, x: torch.where(M, torch.relu(S), 0.0) / M.sum(-1, keepdim=True).clamp(min=1),
             lambda i, j, x: j <= i, 35, 35, 2),
    "softplus": ("mask kv <= q\nprobs softplus(score) / rowsum(softplus(score))", {},
                 lambda S, M, x: _normalized(torch.where(M, torch.nn.functional.softplus(S), 0.0)),
                 lambda i, j, x: j <= i, 29, 38, 1),
    # two passes (rowsum of A, then of R), whose backward needs row reductions over the keys
    "reweight": ((Path(__file__).resolve().parents[1] / "examples" / "softplus_reweight.attn").read_text()
                 .split("\n", 4)[4], {}, lambda S, M, x: F.softplus_reweight_weights(S, M)[0],
                 lambda i, j, x: j <= i, 33, 33, 2),
}


def _expected(case, q, k, inputs):
    _, _, weights, rule, _, _, _ = CASES[case]
    M = _mask(q.shape[0], q.shape[1], q.shape[2], k.shape[2], lambda i, j: rule(i, j, inputs))
    return weights(_scores(q, k), M, inputs), M


@pytest.mark.parametrize("case", list(CASES))
def test_statistics_equal_their_formulas(tmp_path, case):
    body, inputs, _, _, Lq, Lk, Hk = CASES[case]
    fn = _load(tmp_path, f"st_{case}", body + EVERY)
    q, k, v = _qkv(1, 2, Hk, Lq, Lk, seed=len(case))
    o, stats = fn(q, k, v, return_stats=True, **inputs)
    assert isinstance(stats, fn.Stats)
    P, M = _expected(case, q, k, inputs)
    want = formula_stats(P, M)
    _, vf = F.expand_heads(q, k, v)
    torch.testing.assert_close(o.double(), P @ vf.double(), atol=2e-5, rtol=1e-4)
    for name, value in want.items():
        got = getattr(stats, name)
        assert got.shape == value.shape and got.dtype == torch.float32, name
        torch.testing.assert_close(got.double(), value, atol=2e-5, rtol=1e-4, msg=name)
    assert fn(q, k, v, **inputs).shape == o.shape  # return_stats=False: the output alone


@pytest.mark.parametrize("case", ["causal", "document", "sink", "sigmoid", "relu", "softplus", "reweight"])
def test_entropy_gradient(tmp_path, case):
    """An entropy regularizer: loss = sum(w * entropy) + sum(g * o), through the kernels' backward,
    against autograd through the float64 formula (learnable inputs included): the softmax's dS and the
    general family's derived chain rule (elementwise weights, a count, a row sum's delta)."""
    body, inputs, _, _, Lq, Lk, Hk = CASES[case]
    fn = _load(tmp_path, f"ent_{case}", body + "\nstat entropy = entropy(P)\n")
    q, k, v = (x.requires_grad_(True) for x in _qkv(1, 2, Hk, Lq, Lk, seed=3))
    inputs = {n: (x.clone().requires_grad_(True) if x.is_floating_point() else x) for n, x in inputs.items()}
    g = torch.Generator().manual_seed(4)
    w, go = torch.randn(1, 2, Lq, generator=g), torch.randn(1, 2, Lq, D, generator=g)
    o, stats = fn(q, k, v, return_stats=True, **inputs)
    ((w * stats.entropy).sum() + (go * o).sum()).backward()
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    inputs64 = {n: (x.detach().double().requires_grad_(True) if x.is_floating_point() else x) for n, x in inputs.items()}
    P, M = _expected(case, q64, k64, inputs64)
    entropy = formula_stats(P, M)["entropy"]
    _, vf = F.expand_heads(q64, k64, v64)
    ((w.double() * entropy).sum() + (go.double() * (P @ vf)).sum()).backward()
    for got, want in [(q, q64), (k, k64), (v, v64)] + [(inputs[n], inputs64[n]) for n in inputs if inputs[n].is_floating_point()]:
        torch.testing.assert_close(got.grad.double(), want.grad, atol=5e-5, rtol=1e-4)


def test_entropy_alone_and_the_others_detached(tmp_path):
    """A loss of the entropy only (o unused) still differentiates; the other statistics carry no gradient."""
    fn = _load(tmp_path, "ent_alone", "mask kv <= q\n" + EVERY)
    q, k, v = (x.requires_grad_(True) for x in _qkv(1, 2, 2, 20, 20, seed=5))
    _, stats = fn(q, k, v, return_stats=True)
    assert stats.entropy.requires_grad and not stats.received.requires_grad and not stats.mass.requires_grad
    stats.head_entropy.sum().backward()
    q64, k64 = (x.detach().double().requires_grad_(True) for x in (q, k))
    P, M = _expected("causal", q64, k64, {})
    formula_stats(P, M)["entropy"].sum().backward()
    torch.testing.assert_close(q.grad.double(), q64.grad, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(k.grad.double(), k64.grad, atol=5e-5, rtol=1e-4)
    assert torch.count_nonzero(v.grad) == 0


def test_select_statistics_follow_the_selected_tiles(tmp_path):
    """A block top-k spec: the statistics are of the weights over the selected tiles (its reference
    recomputes the selection densely; the formula here applies the same tiles as a mask)."""
    body = "mask kv <= q\nselect topk(1, tiles=128) keep kv < 2\nstat received = sum_q(P)\nstat keys = visible\nstat entropy = entropy(P)\n"
    fn = _load(tmp_path, "st_select", body)
    q, k, v = _qkv(1, 2, 1, 300, 300, seed=7)
    _, stats = fn(q, k, v, return_stats=True)
    causal = _mask(1, 2, 300, 300, lambda i, j: j <= i)
    selected = F.tile_selection(q, k, causal, _mask(1, 2, 300, 300, lambda i, j: j < 2), 1, 128)
    tiles = selected.repeat_interleave(128, 2).repeat_interleave(128, 3)[:, :, :300, :300]
    M = causal & tiles
    want = formula_stats(softmax_weights(_scores(q, k), M), M)
    assert (stats.keys.double() < causal.sum(-1)).any()  # the selection hid keys
    for name in ("received", "keys", "entropy"):
        torch.testing.assert_close(getattr(stats, name).double(), want[name], atol=2e-5, rtol=1e-4, msg=name)


def test_compiled_statistics_equal_eager(tmp_path):
    fn = _load(tmp_path, "st_compile", "mask kv <= q\nstat received = sum_q(P)\nstat entropy = entropy(P)\n")
    torch._dynamo.reset()
    q, k, v = (x.requires_grad_(True) for x in _qkv(1, 2, 2, 24, 24, seed=8))

    def call(q, k, v):
        o, stats = fn(q, k, v, return_stats=True)
        return o, stats.received, stats.entropy

    explained = torch._dynamo.explain(call)(q, k, v)
    assert explained.graph_break_count == 0, explained.break_reasons
    eager = call(q, k, v)
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")(q, k, v)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    grads = torch.autograd.grad(compiled[2].sum() + compiled[0].sum(), (q, k))
    for got, want in zip(grads, torch.autograd.grad(eager[2].sum() + eager[0].sum(), (q, k))):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_no_allocation_of_lq_by_lk(tmp_path):
    """At L = 1024 an [Lq, Lk] tensor holds 1M elements: the statistics' forward and the entropy's
    backward allocate nothing of an eighth of it (the plan is passed in, so the recorder sees the
    launchers' own tensors, not only the custom op), while the dense reference does."""
    fn = _load(tmp_path, "st_memory", CASES["document"][0] + "\nstat received = sum_q(P)\nstat peak = max_q(P)\n"
               "stat entropy = entropy(P)\nstat keys = visible\n")
    L = 1024
    doc_ids = (torch.arange(L) // 300)[None]
    q, k, v = (x.requires_grad_(True) for x in _qkv(1, 1, 1, L, L, seed=9))
    with Allocations() as record:
        plan = fn.plan(L, L, doc_ids=doc_ids)
        o, stats = fn(q, k, v, plan=plan, return_stats=True, doc_ids=doc_ids)
        (stats.entropy.sum() + o.sum()).backward()
    assert len(record.sizes) > 50 and q.grad is not None
    assert max(record.sizes) < L * L // 8, max(record.sizes)
    with Allocations() as dense:
        fn.reference(q.detach(), k.detach(), v.detach(), return_stats=True, doc_ids=doc_ids)
    assert max(dense.sizes) >= L * L


@pytest.mark.parametrize("line, message", [
    ("stat x = sum_q(q)", "unknown statistic"),
    ("stat x = entropy(P, 2)", "unknown statistic"),
    ("stat x = total(visible, 1)", "total() takes one statistic"),
    ("stat x = visible\nstat x = entropy(P)", "statistic 'x' is already defined at line 3"),
    ("stat class = visible", "Python keyword"),
    ("input P: float[Lk]\nstat x = sum_q(P)", "'P' names the attention weights"),
])
def test_stat_errors_name_the_problem(line, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        compile_text(f"attention t\nmask kv <= q\n{line}\n")


def test_return_stats_errors(tmp_path):
    fn = _load(tmp_path, "st_err", "mask kv <= q\nstat keys = visible\n")
    q, k, v = _qkv(1, 1, 1, 8, 8)
    with pytest.raises(TypeError, match="return_stats"):
        fn(q, k, v, return_stats="yes")
    plain = _load(tmp_path, "st_plain", "mask kv <= q\n")
    with pytest.raises(ValueError, match="this call returns no statistics"):
        plain(q, k, v, return_stats=True)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="this call returns no statistics"):  # varlen returns none
        fn.varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, 8, 8, return_stats=True)


def test_statistics_keep_a_linear_spec_quadratic_and_refuse_a_feature_map():
    """A weight that factorizes runs quadratic when the spec reduces it per pair; a feature map, which
    runs as linear attention only, cannot be combined with statistics (the error points at the stat)."""
    from attnc.irdump import dump
    from attnc.pipeline import analyse

    a = analyse(compile_text("attention t\nmask kv <= q\nprobs score\nstat r = sum_q(P)\n"))
    assert a.algorithm.name == "quadratic" and "stat" in a.algorithm.reason
    assert "stat       r = sum_q(P): [B, Hq, Lk] per key" in dump(a)
    with pytest.raises(SpecError, match="statistics of the weights need the quadratic kernels") as err:
        analyse(compile_text("attention t\nfeature phi(x) = elu(x) + 1\nmask kv <= q\nlet a = dot(phi(q), phi(k))\n"
                             "probs a / rowsum(a)\nstat r = sum_q(P)\n"))
    assert ":6:" in str(err.value)


# ---- decode: the new queries' statistics against the cache (H2O-style scores per cached key) ----
def _decode_formula(q, k_cache, lengths, window=None, sink=None):
    """Per sequence: the new queries' weights over the first lengths[b] keys (query i of Lnew at
    position L - Lnew + i, causal, a window if given), as dense float64 [Hq, Lnew, L] with the mask."""
    B, Hq, Lnew, _ = q.shape
    Hk = k_cache.shape[1]
    out = []
    for b in range(B):
        L = int(lengths[b])
        kf = k_cache[b, torch.arange(Hq) * Hk // Hq, :L].double()
        S = q[b].double() @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
        pos, key = L - Lnew + torch.arange(Lnew)[:, None], torch.arange(L)[None]
        M = (key <= pos) & ((pos - key < window) if window else True)
        M = torch.broadcast_to(M, S.shape)
        out.append((softmax_weights(S, M, None if sink is None else sink.double().view(-1, 1, 1)), M))
    return out


def _paged(cache, page, seed):
    """A logical cache [B, H, CAP, D] as pages in a shuffled order: (pages, block_table)."""
    B, H, cap, D = cache.shape
    n = cap // page
    perm = torch.randperm(B * n + 1, generator=torch.Generator().manual_seed(seed))[: B * n].view(B, n)
    pages = torch.zeros(B * n + 1, H, page, D)
    for b in range(B):
        for j in range(n):
            pages[perm[b, j]] = cache[b, :, j * page:(j + 1) * page]
    return pages, perm.to(torch.int32)


@pytest.mark.parametrize("case, paged", [("causal", False), ("window", True), ("sink", False)])
def test_decode_statistics_equal_their_formulas(tmp_path, case, paged):
    body = {"causal": "mask kv <= q", "window": "param window = 20\nmask kv <= q and q - kv < window",
            "sink": "input sink: float[Hq]\nmask kv <= q\nprobs softmax(score, sink=sink[h])"}[case]
    fn = _load(tmp_path, f"dec_{case}", body + "\nstat received = sum_q(P)\nstat peak_received = max_q(P)\n"
               "stat entropy = entropy(P)\nstat keys = visible\nstat head_received = total(sum_q(P))\n")
    g = torch.Generator().manual_seed(11)
    B, Hq, Hk, Lnew, cap = 2, 4, 2, 3, 64
    q, k_cache, v_cache = torch.randn(B, Hq, Lnew, D, generator=g), torch.randn(B, Hk, cap, D, generator=g), \
        torch.randn(B, Hk, cap, D, generator=g)
    lengths = torch.tensor([37, 61], dtype=torch.int32)
    inputs = {"sink": torch.tensor([0.3, -0.5, 1.0, 0.0])} if case == "sink" else {}
    table = None
    if paged:
        k_cache, table = _paged(k_cache, 16, 1)
        v_cache, _ = _paged(v_cache, 16, 1)
    _, stats = fn.decode(q, k_cache, v_cache, lengths, block_table=table, return_stats=True, **inputs)
    logical = k_cache if table is None else torch.stack([torch.cat([k_cache[p] for p in row], dim=1) for row in table])
    for b, (P, M) in enumerate(_decode_formula(q, logical, lengths, 20 if case == "window" else None,
                                               inputs.get("sink"))):
        L = int(lengths[b])
        want = formula_stats(P[None], M[None])
        torch.testing.assert_close(stats.received[b, :, :L].double(), want["received"][0], atol=2e-6, rtol=1e-5)
        assert torch.count_nonzero(stats.received[b, :, L:]) == 0  # past the sequence's keys
        torch.testing.assert_close(stats.peak_received[b, :, :L].double(), want["peak_received"][0], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(stats.entropy[b].double(), want["entropy"][0], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(stats.keys[b].double(), want["keys"][0])
        torch.testing.assert_close(stats.head_received[b].double(), want["head_received"][0], atol=2e-5, rtol=1e-5)
    # the eager reference path (float64) returns the same statistics
    _, stats64 = fn.decode(q.double(), k_cache.double(), v_cache.double(), lengths, block_table=table,
                             return_stats=True, **{n: x.double() for n, x in inputs.items()})
    for name in stats._fields:
        torch.testing.assert_close(getattr(stats, name).double(), getattr(stats64, name), atol=2e-5, rtol=1e-5, msg=name)


def test_decode_statistics_of_a_select(tmp_path):
    """Decode selects per new query: the statistics are of the weights over each query's own tiles."""
    fn = _load(tmp_path, "dec_select", "mask kv <= q\nselect topk(1, tiles=128) keep kv < 2\n"
               "stat received = sum_q(P)\nstat keys = visible\n")
    g = torch.Generator().manual_seed(12)
    q, k_cache, v_cache = torch.randn(1, 2, 2, D, generator=g), torch.randn(1, 1, 512, D, generator=g), \
        torch.randn(1, 1, 512, D, generator=g)
    lengths = torch.tensor([500], dtype=torch.int32)
    _, stats = fn.decode(q, k_cache, v_cache, lengths, return_stats=True)
    _, ref = fn.decode(q.double(), k_cache.double(), v_cache.double(), lengths, return_stats=True)
    assert (stats.keys < 499).all()  # the selection hid tiles
    torch.testing.assert_close(stats.keys.double(), ref.keys)
    torch.testing.assert_close(stats.received.double(), ref.received, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("case", ["sigmoid", "relu", "softplus"])
def test_decode_statistics_of_the_general_family(tmp_path, case):
    """The general family's decode: its merged row statistics make P exact for the statistics' pass
    (elementwise weights; visible in closed form; a row sum)."""
    body, _, weights, _, _, _, _ = CASES[case]
    fn = _load(tmp_path, f"dec_{case}", body + "\nstat received = sum_q(P)\nstat entropy = entropy(P)\nstat mass = sum_kv(P)\n")
    g = torch.Generator().manual_seed(16)
    q, k_cache, v_cache = torch.randn(2, 2, 3, D, generator=g), torch.randn(2, 1, 48, D, generator=g), \
        torch.randn(2, 1, 48, D, generator=g)
    lengths = torch.tensor([29, 48], dtype=torch.int32)
    _, stats = fn.decode(q, k_cache, v_cache, lengths, return_stats=True)
    for b, (_, M) in enumerate(_decode_formula(q, k_cache, lengths)):
        L = int(lengths[b])
        S = q[b].double() @ k_cache[b, [0, 0], :L].double().transpose(-1, -2) / math.sqrt(D)
        want = formula_stats(weights(S[None], M[None], {}), M[None])
        torch.testing.assert_close(stats.received[b, :, :L].double(), want["received"][0], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(stats.entropy[b].double(), want["entropy"][0], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(stats.mass[b].double(), want["mass"][0], atol=2e-6, rtol=1e-5)
        assert torch.count_nonzero(stats.received[b, :, L:]) == 0


def test_verify_checks_the_statistics_and_the_entropy_gradient(tmp_path):
    """`attnc verify` compares every statistic and takes the entropy's gradient with the output's; a
    broken statistic fails it (the kernels' entropy scaled by 1.01 against the reference's)."""
    from attnc.verify import verify_variant

    path = tmp_path / "vstats.attn"
    path.write_text("attention vstats\nmask kv <= q\nstat received = sum_q(P)\nstat entropy = entropy(P)\n")
    fn = attnc.load(path)
    rows = verify_variant(path, fn, length=20)
    assert {"received", "entropy", "dq"} <= {r.tensor for r in rows} and all(r.ok for r in rows)

    def broken(*args, **kwargs):
        o, lse, stats = fn(*args, **kwargs)
        return o, lse, stats._replace(entropy=stats.entropy * 1.01)

    broken.has_lse, broken.Stats, broken.reference = fn.has_lse, fn.Stats, fn.reference
    assert not all(r.ok for r in verify_variant(path, broken, length=20) if r.tensor == "entropy")


# ---- the examples (Tier 6), against the formulas above ----
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_retrieval_heads_example():
    fn = attnc.load(EXAMPLES / "retrieval_heads.attn")
    q, k, v = _qkv(2, 2, 1, 45, 45, seed=13)
    _, stats = fn(q, k, v, return_stats=True)
    P, M = _expected("causal", q, k, {})
    want = formula_stats(P, M)
    torch.testing.assert_close(stats.received.double(), want["received"], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(stats.peak.double(), want["peak_received"], atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(stats.head_focus.double(), want["peak"].sum(-1), atol=2e-5, rtol=1e-4)


def test_entropy_monitor_example_forward_and_backward():
    fn = attnc.load(EXAMPLES / "entropy_monitor.attn")
    q, k, v = (x.requires_grad_(True) for x in _qkv(1, 2, 2, 40, 40, seed=14))
    o, stats = fn(q, k, v, return_stats=True)
    (stats.head_entropy.sum() + o.sum()).backward()
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    P, M = _expected("causal", q64, k64, {})
    want = formula_stats(P, M)
    torch.testing.assert_close(stats.entropy.detach().double(), want["entropy"], atol=2e-5, rtol=1e-4)
    _, vf = F.expand_heads(q64, k64, v64)
    (want["head_entropy"].sum() + (P @ vf).sum()).backward()
    for got, ref in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=5e-5, rtol=1e-4)


def test_h2o_decode_example_scores_accumulate_over_steps():
    """Two decode steps' scores summed per cached key (H2O's accumulation) against the formula's."""
    fn = attnc.load(EXAMPLES / "h2o_decode.attn")
    g = torch.Generator().manual_seed(15)
    k_cache, v_cache = torch.randn(1, 2, 48, D, generator=g), torch.randn(1, 2, 48, D, generator=g)
    total, want = torch.zeros(1, 4, 48), torch.zeros(1, 4, 48, dtype=torch.float64)
    for length in (30, 31):
        q = torch.randn(1, 4, 1, D, generator=g)
        lengths = torch.tensor([length], dtype=torch.int32)
        _, stats = fn.decode(q, k_cache, v_cache, lengths, return_stats=True)
        total += stats.received
        (P, _), = _decode_formula(q, k_cache, lengths)
        want[0, :, :length] += P.sum(1)
        torch.testing.assert_close(stats.head_received.double(), P.sum((1, 2))[None], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(total.double(), want, atol=4e-6, rtol=1e-5)


def test_check_lists_the_statistics():
    from click.testing import CliRunner

    from attnc.cli import main

    result = CliRunner().invoke(main, ["check", str(EXAMPLES / "h2o_decode.attn")])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(
        "(softmax, 1 pass; params: none; inputs: none; stat received = sum_q(P); "
        "stat head_received = total(sum_q(P)))")


def test_maxima_of_negative_weights(tmp_path):
    """Weights below 0 (probs = score - 8): a maximum is over the kept entries only, never a masked 0,
    in the forward's passes and in decode's."""
    fn = _load(tmp_path, "st_negative", "mask kv <= q\nprobs score - 8.0\nstat peak_received = max_q(P)\n"
               "stat peak = max_kv(P)\n")
    q, k, v = _qkv(1, 2, 2, 30, 30, seed=17)
    _, stats = fn(q, k, v, return_stats=True)
    M = _mask(1, 2, 30, 30, lambda i, j: j <= i)
    want = formula_stats(torch.where(M, _scores(q, k) - 8.0, 0.0), M)
    assert (want["peak"] < 0).all() and (want["peak_received"] < 0).all()
    torch.testing.assert_close(stats.peak.double(), want["peak"], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(stats.peak_received.double(), want["peak_received"], atol=2e-6, rtol=1e-5)
    lengths = torch.tensor([30], dtype=torch.int32)
    _, dec = fn.decode(q[:, :, -3:], k, v, lengths, return_stats=True)
    (_, Md), = _decode_formula(q[:, :, -3:], k, lengths)
    S = q[0, :, -3:].double() @ k[0].double().transpose(-1, -2) / math.sqrt(D)
    want = formula_stats(torch.where(Md, S - 8.0, 0.0)[None], Md[None])
    torch.testing.assert_close(dec.peak_received.double(), want["peak_received"], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(dec.peak.double(), want["peak"], atol=2e-6, rtol=1e-5)


def test_row_mass_and_peak_alone_come_from_the_softmax_state(tmp_path):
    """sum_kv(P) and max_kv(P) of a softmax without a sink need no accumulator of their own (l and m
    give them): the forward's epilogue computes them, and no row pass is generated."""
    fn = _load(tmp_path, "st_state", "mask kv <= q\nstat mass = sum_kv(P)\nstat top = max_kv(P)\n")
    source = Path(sys.modules[fn.__module__].__file__).read_text()
    assert "def _row_stats(" not in source and "ROW_STATS_OUT" in source
    q, k, v = _qkv(1, 2, 2, 37, 37, seed=18)
    _, stats = fn(q, k, v, return_stats=True)
    P, M = _expected("causal", q, k, {})
    want = formula_stats(P, M)
    torch.testing.assert_close(stats.mass.double(), want["mass"], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(stats.top.double(), want["peak"], atol=2e-6, rtol=1e-5)
