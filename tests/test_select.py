"""Block top-k selection (`select`, issue 20 part 2), against float64 formulas whose tile selection is
recomputed here in torch (tests/formulas.tile_selection: Python loops over the tiles, slice means),
forward and backward, for every count from 0 to all tiles, at odd lengths and with Lq != Lk; the tiles
the kernels visit (launch.count_visits) against the tiles of that selection; no [Lq, Lk] allocation
(a TorchDispatchMode records every tensor a call makes); the plan API and the errors."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from attnc.runtime import launch

import attnc
from attnc.check.statements import SELECT_TILE_MIN
from attnc.errors import SpecError
from attnc.pipeline import analyse, compile_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
import formulas as F
from allocations import Allocations
from spec_helpers import _load
from spec_helpers import qkv_heads as _qkv

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
T = 128  # the selection tiles of the specs below
D = 16


def expected_visits(mask: torch.Tensor) -> torch.Tensor:
    """The key tiles each forward program of the list walk visits, [B * Hq, query tiles], for the element
    mask `mask` [B, Hq, Lq, Lk] (the selection applied): every plan tile that holds an unmasked pair,
    cut into the kernel's key tiles (the last one by Lk), for the plan tile row of the program's rows."""
    B, Hq, Lq, Lk = mask.shape
    plan_m, plan_n = launch.plan_blocks()
    config = launch.kernel_configs("fwd")[0].kwargs
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    tq, tk = -(-Lq // plan_m), -(-Lk // plan_n)
    padded = torch.zeros(B * Hq, tq * plan_m, tk * plan_n, dtype=torch.bool)
    padded[:, :Lq, :Lk] = mask.reshape(B * Hq, Lq, Lk)
    touched = padded.view(B * Hq, tq, plan_m, tk, plan_n).any(4).any(2)  # [B * Hq, tq, tk]
    key_tiles = torch.tensor([-(-(min((j + 1) * plan_n, Lk) - j * plan_n) // block_n) for j in range(tk)])
    per_plan_row = (touched * key_tiles).sum(-1)  # [B * Hq, tq]
    programs = torch.arange(-(-Lq // block_m)) * block_m // plan_m
    return per_plan_row[:, programs]


def _check(fn, q, k, v, mask, **inputs):
    """The kernels against softmax attention over `mask` (the selection applied) in float64: o and
    dq, dk, dv, and the forward's visits against the selected plan tiles."""
    q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    with launch.count_visits() as log:
        o = fn(q, k, v, **inputs)
    assert len(log) == 1
    assert torch.equal(log[0], expected_visits(mask.expand(q.shape[0], q.shape[1], -1, -1))), "visits"
    qd, kd, vd = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    want, _ = F.attention(qd, kd, vd, mask)
    assert (o.double() - want).abs().max().item() <= 2e-3 * max(want.abs().max().item(), 1e-3)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    o.backward(g.float())
    want.backward(g)
    for name, got, ref in (("dq", q.grad, qd.grad), ("dk", k.grad, kd.grad), ("dv", v.grad, vd.grad)):
        assert (got.double() - ref).abs().max().item() <= 5e-3 * max(ref.abs().max().item(), 1e-3), name


# ---- no mask, no keep: Lq != Lk, two batch entries, two query heads on one key head ----
FULL_TOPK = "param k_tiles = 1\nselect topk(k_tiles, tiles=128)\n"


@pytest.mark.parametrize("count", range(6))  # 5 key tiles: 0 (nothing visible) to all
def test_no_mask_equals_its_selected_tiles(tmp_path, count):
    fn = _load(tmp_path, "topk_full", FULL_TOPK)
    # tiles: 2 query tiles (the last of 22 rows), 5 key tiles (the last of 8 keys); the second batch
    # entry at count 2 only (the plan of the mask, one for every entry, is broadcast)
    B, Hq, Hk, Lq, Lk = 2 if count == 2 else 1, 2, 1, 150, 520
    q, k, v = _qkv(B, Hq, Hk, Lq, Lk, seed=count)
    everything = torch.ones(1, 1, Lq, Lk, dtype=torch.bool)
    visible = F.tile_selection(q, k, everything, torch.zeros_like(everything), count, T)
    assert int(visible.sum(-1).max()) == min(count, 5)
    _check(fn, q, k, v, F.tile_mask(visible, Lq, Lk, T), k_tiles=count)


# ---- the catalog's block_topk: causal, sinks and a local window kept ----
# at 520 x 520 the last query tile has 2 candidates besides the kept sink, window and diagonal tiles
# (count 2 is all of them); at 390 x 520 it has 1 (the keys past the queries are masked)
@pytest.mark.parametrize("Lq,Lk,count", [(520, 520, c) for c in range(3)] + [(390, 520, c) for c in range(2)])
def test_block_topk_equals_its_formula(Lq, Lk, count):
    fn = attnc.load(EXAMPLES / "block_topk.attn")
    q, k, v = _qkv(1, 2 if count == 1 else 1, 1, Lq, Lk, seed=count)  # grouped heads at count 1
    inputs = {"k_tiles": count, "sinks": 4, "window": 16}
    _, _, i, j = F.indices(1, 1, Lq, Lk)
    causal = j <= i
    visible = F.tile_selection(q, k, causal, (j < 4) | (i - j < 16), count, T)
    mask = causal & F.tile_mask(visible, Lq, Lk, T)
    # the catalog's formula is this one
    want, _ = F.block_topk(q.double(), k.double(), v.double(), **inputs)
    assert torch.equal(want, F.attention(q.double(), k.double(), v.double(), mask)[0])
    _check(fn, q, k, v, mask, **inputs)


def test_enough_tiles_is_the_dense_spec():
    """With a count at least the number of tiles, block_topk is the causal spec: the same visits as
    the plain causal mask's plan tiles, and its output."""
    fn = attnc.load(EXAMPLES / "block_topk.attn")
    L = 400
    q, k, v = _qkv(1, 1, 1, L, L, seed=3)
    causal = F.mask_causal(L, L)[None, None]
    _check(fn, q, k, v, causal, k_tiles=4, window=1, sinks=1)


# ---- a mask that reads a tensor, per batch entry: the candidates are the mask's plan tiles ----
def test_document_mask_with_a_select(tmp_path):
    fn = _load(tmp_path, "doc_topk", "input doc: int[B, L]\nmask doc[b, q] == doc[b, kv] and kv <= q\n"
                                      "select topk(1, tiles=128) keep q - kv < 8\n")
    B, L = 2, 400
    doc = torch.tensor([[0] * 300 + [1] * 100, [0] * 50 + [1] * 350])
    q, k, v = _qkv(B, 1, 1, L, L, seed=5)
    _, _, i, j = F.indices(1, 1, L, L)
    mask = (doc[:, None, :, None] == doc[:, None, None, :]) & (j <= i)
    visible = F.tile_selection(q, k, mask, i - j < 8, 1, T)
    _check(fn, q, k, v, mask & F.tile_mask(visible, L, L, T), doc=doc)


# ---- the general family: its row statistics are over the selected tiles ----
@pytest.mark.parametrize("name,body,weights", [
    # visible is counted (a select hides tiles), not the mask's closed form q + 1
    ("relu_topk", "mask kv <= q\nprobs relu(score) / visible\n",
     lambda S, mask: torch.relu(S) * mask / mask.sum(-1, keepdim=True).clamp(min=1)),
    ("sigmoid_topk", "param bias = -1.0\nmask kv <= q\nprobs sigmoid(score + bias)\n",
     lambda S, mask: torch.sigmoid(S - 1.0) * mask),
])
def test_general_normalizations_on_selected_tiles(tmp_path, name, body, weights):
    fn = _load(tmp_path, name, body + "select topk(1, tiles=128) keep q - kv < 8\n")
    L = 400
    q, k, v = (x.requires_grad_(True) for x in _qkv(1, 1, 1, L, L, seed=8))
    _, _, i, j = F.indices(1, 1, L, L)
    mask = (j <= i) & F.tile_mask(F.tile_selection(q.detach(), k.detach(), j <= i, i - j < 8, 1, T), L, L, T)
    with launch.count_visits() as log:
        o = fn(q, k, v)
    assert torch.equal(log[0], expected_visits(mask))
    qd, kd, vd = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    want = weights(qd @ kd.transpose(-1, -2) / D ** 0.5, mask) @ vd
    assert (o.double() - want).abs().max().item() <= 2e-3 * want.abs().max().item()
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    o.backward(g.float())
    want.backward(g)
    for got, ref in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert (got.double() - ref).abs().max().item() <= 5e-3 * ref.abs().max().item()


def test_general_reference_in_chunks_of_rows(tmp_path):
    """The eager reference runs its rows in chunks (about 4M scores each) and keeps the selection apart
    from the general family's own `visible` count: at 2500 x 2500 it takes two chunks."""
    fn = _load(tmp_path, "relu_topk", "mask kv <= q\nprobs relu(score) / visible\nselect topk(1, tiles=128) "
                                     "keep q - kv < 8\n")
    L = 2500
    q, k, v = (x.double() for x in _qkv(1, 1, 1, L, L, seed=12))
    _, _, i, j = F.indices(1, 1, L, L)
    mask = (j <= i) & F.tile_mask(F.tile_selection(q, k, j <= i, i - j < 8, 1, T), L, L, T)
    want = (torch.relu(q @ k.transpose(-1, -2) / D ** 0.5) * mask / mask.sum(-1, keepdim=True).clamp(min=1)) @ v
    assert (fn.reference(q, k, v) - want).abs().max().item() <= 1e-9


# ---- memory: nothing of size Lq x Lk ----
def test_no_allocation_of_lq_by_lk():
    """At L = 1024 an [Lq, Lk] tensor holds 1M elements, 64 times q's: planning, forward and backward
    allocate nothing of even an eighth of it, while the dense reference does (the recorder sees it).
    The plan is built and passed in the mode (plan=): the custom op a plain call goes through runs the
    same launchers and plan builder, but a dispatch mode sees only the op itself."""
    fn = attnc.load(EXAMPLES / "block_topk.attn")
    L = 1024
    q, k, v = (x.requires_grad_(True) for x in _qkv(1, 1, 1, L, L, seed=6))
    inputs = {"k_tiles": 1, "sinks": 1, "window": 1}
    with Allocations() as record:
        plan = fn.plan(L, L, q=q, k=k, **inputs)
        o = fn(q, k, v, plan=plan, **inputs)
        o.sum().backward()
    assert len(record.sizes) > 100 and q.grad is not None
    assert max(record.sizes) < L * L // 8, max(record.sizes)
    with Allocations() as dense:
        fn.reference(q.detach(), k.detach(), v.detach(), **inputs)
    assert max(dense.sizes) >= L * L


# ---- torch.compile: the plan is chosen inside the custom op, from the traced call's q and k ----
def test_compiled_select_equals_eager():
    fn = attnc.load(EXAMPLES / "block_topk.attn")
    torch._dynamo.reset()
    q, k, v = (x.requires_grad_(True) for x in _qkv(1, 1, 1, 300, 300, seed=9))

    def call(q, k, v):
        return fn(q, k, v, k_tiles=0, window=16) * 2.0

    explained = torch._dynamo.explain(call)(q, k, v)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    eager = call(q, k, v)
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
    for got, want in zip(torch.autograd.grad(compiled.square().sum(), (q, k, v)),
                         torch.autograd.grad(eager.square().sum(), (q, k, v))):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    _, _, i, j = F.indices(1, 1, 300, 300)
    mask = (j <= i) & F.tile_mask(F.tile_selection(q.detach(), k.detach(), j <= i, (j < 4) | (i - j < 16), 0, T),
                                  300, 300, T)
    want, _ = F.attention(q.detach().double(), k.detach().double(), v.detach().double(), mask)
    assert (compiled.detach().double() / 2 - want).abs().max().item() <= 2e-3 * want.abs().max().item()


# ---- the plan API ----
def test_plan_is_the_calls_and_is_checked(tmp_path):
    fn = attnc.load(EXAMPLES / "block_topk.attn")
    L = 300
    q, k, v = _qkv(1, 2, 2, L, L, seed=7)
    inputs = {"k_tiles": 0, "window": 16}
    plan = fn.plan(L, L, 1, 2, q=q, k=k, **inputs)
    assert (plan.batch, plan.heads) == (1, 2)
    _, _, i, j = F.indices(1, 1, L, L)
    visible = F.tile_selection(q, k, j <= i, (j < 4) | (i - j < 16), 0, T)
    pm, pn = launch.plan_blocks()
    mask = (j <= i) & F.tile_mask(visible, L, L, T)
    touched = torch.nn.functional.pad(mask.expand(1, 2, L, L), (0, -L % pn, 0, -L % pm))
    touched = touched.reshape(1, 2, -1, pm, touched.shape[-1] // pn, pn).any(-1).any(-2)
    assert torch.equal(plan.to_dense() > 0, touched)
    with launch.count_visits() as given:
        o = fn(q, k, v, plan=plan, **inputs)
    with launch.count_visits() as own:
        want = fn(q, k, v, **inputs)
    assert torch.equal(given[0], own[0]) and torch.allclose(o, want)
    with pytest.raises(ValueError, match="argument 'plan': built from another 'k'"):
        fn(q, k.clone(), v, plan=plan, **inputs)
    with pytest.raises(ValueError, match="argument 'q': the select chooses the plan's tiles from q and k"):
        fn.plan(L, L, 1, 2, **inputs)
    with pytest.raises(ValueError, match=r"argument 'k': expected shape \[1, 2, 300, 16\]"):
        fn.plan(L, L, 1, 2, q=q, k=k[:, :, :200], **inputs)
    with pytest.raises(ValueError, match="argument 'block_m': the select's tiles"):
        fn.plan(L, L, 1, 2, q=q, k=k, block_m=256, **inputs)
    with pytest.raises(ValueError, match="the count of topk"):
        fn(q, k, v, k_tiles=-1)


# ---- decode: each new query chooses its own tiles ----
def decode_formula(q, k, v, lengths, count, sinks, window):
    """block_topk's decode in float64: new query i of sequence b at position p = lengths[b] - Lnew + i is a
    query tile of its own: of the key tiles its causal row reaches, those holding a key j < sinks or
    p - j < window are kept, and the `count` others with the largest dot(q_i, mean of the tile's valid
    keys) chosen (ties: the lower tile); softmax over its causal row inside those tiles. Also returns
    the tiles chosen per (sequence, new query, head): [B][Lnew][Hq] sets."""
    B, Hq, Lnew, _ = q.shape
    Hk = k.shape[1]
    o = torch.zeros(B, Hq, Lnew, v.shape[-1], dtype=torch.float64)
    chosen = []
    for b in range(B):
        L = int(lengths[b])
        keys, values = k[b, :, :L].double(), v[b, :, :L].double()
        tiles = -(-L // T)
        means = [keys[:, j * T:(j + 1) * T].mean(1) for j in range(tiles)]  # per tile: [Hk, D]
        per_query = []
        for i in range(Lnew):
            p, j_all = L - Lnew + i, torch.arange(L)
            row = j_all <= p
            kept = row & ((j_all < sinks) | (p - j_all < window))
            per_head = []
            for h in range(Hq):
                kh, qi = h * Hk // Hq, q[b, h, i].double()
                visible = {t for t in range(tiles) if kept[t * T:(t + 1) * T].any()}
                ranked = sorted((-float(qi @ means[t][kh]), t) for t in range(tiles)
                                if t not in visible and row[t * T:(t + 1) * T].any())
                visible |= {t for _, t in ranked[:count]}
                per_head.append(visible)
                mask = row & torch.tensor([j // T in visible for j in range(L)])
                s = (keys[kh] @ qi / D ** 0.5).masked_fill(~mask, float("-inf"))
                o[b, h, i] = torch.softmax(s, 0) @ values[kh]
            per_query.append(per_head)
        chosen.append(per_query)
    return o, chosen


def _paged(cache, lengths, page, seed):
    """A logical cache [B, H, capacity, D] as pages in a random order: (pages, block_table)."""
    B, H, capacity, Dh = cache.shape
    per = capacity // page
    perm = torch.randperm(B * per + 1, generator=torch.Generator().manual_seed(seed))[: B * per].view(B, per)
    pages = torch.randn(B * per + 1, H, page, Dh, generator=torch.Generator().manual_seed(seed + 1))
    for b in range(B):
        for j in range(per):
            pages[perm[b, j]] = cache[b, :, j * page:(j + 1) * page]
    return pages, perm.to(torch.int32)


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("lnew,count", [(1, 0), (3, 1), (1, 2), (3, 6)])
def test_decode_chooses_per_new_query(layout, lnew, count):
    fn = attnc.load(EXAMPLES / "block_topk.attn")
    B, Hq, Hk, capacity = 3, 2, 1, 704
    q, k, v = _qkv(B, Hk, Hk, capacity, capacity, seed=10 + count)
    q = torch.randn(B, Hq, lnew, D, generator=torch.Generator().manual_seed(count))
    lengths = torch.tensor([650, 300, 3], dtype=torch.int32)  # 6, 3 and 1 key tiles, the last one cut
    inputs = {"k_tiles": count, "sinks": 4, "window": 16}
    want, chosen = decode_formula(q, k, v, lengths, count=count, sinks=4, window=16)
    k_cache, table = (k, None) if layout == "contiguous" else _paged(k, lengths, 64, 3)
    v_cache = v if layout == "contiguous" else _paged(v, lengths, 64, 3)[0]
    with launch.count_visits() as log:
        o = fn.decode(q, k_cache, v_cache, lengths, block_table=table, **inputs)
    assert (o.double() - want).abs().max().item() <= 2e-3 * want.abs().max().item()
    # one program row per sequence (the two query heads share the key head: one group), its splits
    # visit each kernel key tile once that some new query of some head chose
    block_n = launch.decode_config(Hq * lnew, None)["BLOCK_N"]
    for b, L in enumerate(lengths.tolist()):
        union = set().union(*(tiles for per_head in chosen[b] for tiles in per_head))
        expected = sum(1 for start in range(0, L, block_n) if start // T in union)
        assert int(log[0][b].clamp(min=0).sum()) == expected, (b, union)
    assert torch.allclose(fn.decode(q.double(), k_cache.double(), v_cache.double(), lengths, block_table=table,
                                    **inputs), want, atol=1e-9)  # the reference chooses alike


def test_what_does_not_run_a_select_yet_says_so(tmp_path):
    fn = _load(tmp_path, "relu_select", "mask kv <= q\nprobs relu(score) / visible\nselect topk(1, tiles=128)\n")
    q = torch.randn(1, 1, 1, D)
    cache = torch.randn(1, 1, 64, D)
    with pytest.raises(ValueError, match="decode has no split-KV kernel for this spec: .* select"):
        fn.decode(q, cache, cache, torch.tensor([10], dtype=torch.int32))
    fn = attnc.load(EXAMPLES / "block_topk.attn")
    tokens = torch.randn(40, 1, D)
    cu = torch.tensor([0, 15, 40], dtype=torch.int32)
    with pytest.raises(ValueError, match="packed batches .varlen. cannot run the select yet"):
        fn.varlen(tokens, tokens, tokens, cu, cu, 25, 25)
    variant = compile_text((EXAMPLES / "block_topk.attn").read_text())
    with pytest.raises(ValueError, match="a block of a longer problem cannot run the select"):
        variant.shifted("block")


# ---- the runtime's pieces, against loops written here ----
def test_tile_means_and_ties():
    from attnc.runtime import plan as tile_plan

    x = torch.randn(2, 3, 300, 5, generator=torch.Generator().manual_seed(11))
    means = tile_plan.tile_means(x, 128)
    want = torch.stack([x[:, :, j * 128:(j + 1) * 128].double().mean(2) for j in range(3)], 2)  # the last of 44
    assert torch.allclose(means, want, rtol=0, atol=1e-12)
    # equal estimates: the lower tile first; tiles not nonempty and kept tiles are never chosen
    estimate = torch.tensor([[[[1.0, 2.0, 2.0, 2.0, 5.0]]]], dtype=torch.float64)
    nonempty = torch.tensor([True, True, True, True, False])
    kept = torch.tensor([False, False, True, False, False])
    got = tile_plan.top_tiles(estimate, 1, nonempty, kept)
    assert got[0, 0, 0].tolist() == [False, True, True, False, False]  # kept 2; 1 and 3 tie: 1 chosen
    assert tile_plan.top_tiles(estimate, 9, nonempty, kept)[0, 0, 0].tolist() == [True, True, True, True, False]
    with pytest.raises(ValueError, match="the count of topk"):
        tile_plan.top_tiles(estimate, 1.5, nonempty, kept)


# ---- the language: what check accepts is what build builds ----
def test_the_select_tile_is_the_gpu_plan_tile():
    """A selection tile holds whole plan tiles on the GPU (runtime/launch.plan_blocks without the
    interpreter) and in the interpreter."""
    import os

    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        gpu = launch.plan_blocks()
    finally:
        os.environ["TRITON_INTERPRET"] = saved
    assert gpu == (SELECT_TILE_MIN, SELECT_TILE_MIN)
    assert SELECT_TILE_MIN % launch.plan_blocks()[0] == 0


def test_the_estimate_and_the_count_are_the_specs():
    walk = analyse(compile_text("attention a\nparam n = 3\nconst C = 256\nselect topk(n + 1, tiles=C) "
                                "by dot(mean(q), mean(k)) keep kv < 2\n")).walk
    assert str(walk.select.count) == "n + 1" and walk.select.tile == 256 and walk.params == ("n",)
    assert (walk.uses_b, walk.uses_h, walk.mask_uses_b, walk.mask_uses_h) == (True, True, False, False)


@pytest.mark.parametrize("line,message,at", [
    ("select topk(8)", "topk() takes the count of key tiles and tiles=T", "select topk(8)"),
    ("select top(8, tiles=128)", "unknown selection 'top'", "top"),
    ("select topk(8, tiles=192)", "tiles= must be a power of two, at least 128, got 192", "192"),
    ("select topk(8, tiles=64)", "at least 128, got 64", "64"),
    ("param t = 128\nselect topk(8, tiles=t)", "tiles= must be a number known at build time", "t"),
    ("select topk(8, tiles=128, size=3)", "topk() has no argument 'size'", "3"),
    ("select topk(q, tiles=128)", "the count of topk() may use numbers, params and consts only", "q"),
    ("select topk(Lk // 128, tiles=128)", "the count of topk() may use numbers, params and consts only",
     "Lk // 128"),
    ("select topk(-2, tiles=128)", "the count of topk() must be at least 0, got -2", "-2"),
    ("select topk(1.5, tiles=128)", "the count of topk() must be an integer", "1.5"),
    ("select topk(8, tiles=128) by dot(q, k)", "unknown estimate of a tile pair's score", "dot(q, k)"),
    ("select topk(8, tiles=128) by dot(mean(k), mean(q))", "unknown estimate", "dot(mean(k), mean(q))"),
    ("select topk(8, tiles=128) keep kv + 1", "the keep condition must be a condition (bool), not int", "kv + 1"),
    ("select topk(8, tiles=128) keep s > 0", "the keep condition cannot depend on the score", "s"),
    ("select topk(8, tiles=128) keep visible > 3", "the keep condition cannot depend on row statistics",
     "visible"),
    ("select topk(8, tiles=128) keep sinks > kv", "unknown name 'sinks'", "sinks"),
    ("select topk(1, tiles=128)\nselect topk(2, tiles=128)", "duplicate 'select' statement",
     "select topk(2, tiles=128)"),
])
def test_bad_selects_are_errors_at_their_place(line, message, at):
    text = f"attention bad\nmask kv <= q\n{line}\n"
    with pytest.raises(SpecError) as info:
        compile_text(text, "bad.attn")
    diagnostic = info.value.first
    assert message in diagnostic.message, info.value.render()
    lines = text.split("\n")
    written = lines[diagnostic.span.line - 1][diagnostic.span.column - 1:diagnostic.span.end_column - 1]
    assert written == at, info.value.render()


def test_the_cli_checks_a_select(tmp_path):
    import subprocess

    run = subprocess.run([sys.executable, "-m", "attnc.cli", "check", str(EXAMPLES / "block_topk.attn")],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0 and "ok: attention block_topk (softmax" in run.stdout, run.stderr
    bad = tmp_path / "bad.attn"
    bad.write_text("attention bad\nselect topk(8, tiles=100)\n")
    run = subprocess.run([sys.executable, "-m", "attnc.cli", "check", str(bad)], capture_output=True, text=True, check=False)
    assert run.returncode == 1 and "bad.attn:2:22: error: tiles= must be a power of two" in run.stderr
