"""Tile plans: interval rules, exactness on the catalog, soundness on random masks, kernels' visits.

A plan classifies every (query tile, key tile) as EMPTY, PARTIAL or FULL. The independent answer is
brute force: the element mask (`attn.mask`, itself checked against tests/formulas.py in
test_formulas/test_tier2) reduced over each tile.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from functools import cache
from pathlib import Path

import pytest
import torch
from attnc.runtime import intervals as I
from attnc.runtime import launch
from attnc.runtime import plan as tile_plan
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc.errors import SpecError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CATALOG = sorted(p.stem for p in EXAMPLES.glob("*.attn"))
# a select's plan is chosen from q and k at every call: tests/test_select.py checks those plans against
# its own selection of tiles; the mask's own plan, the candidates, is checked here through the others
SELECT_EXAMPLES = {"block_topk"}


@cache
def load(name):
    return attnc.load(EXAMPLES / f"{name}.attn")


def brute_force(mask: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """[B, H, Lq, Lk] bool -> [B, H, tiles_q, tiles_k] classes (0 EMPTY, 1 PARTIAL, 2 FULL)."""
    B, H, Lq, Lk = mask.shape
    tq, tk = -(-Lq // block_m), -(-Lk // block_n)
    padded = torch.full((B, H, tq * block_m, tk * block_n), -1, dtype=torch.int8)  # -1: outside
    padded[..., :Lq, :Lk] = mask.to(torch.int8)
    tiles = padded.view(B, H, tq, block_m, tk, block_n).permute(0, 1, 2, 4, 3, 5).reshape(B, H, tq, tk, -1)
    any_unmasked = (tiles == 1).any(-1)
    all_unmasked = (tiles != 0).all(-1)
    return torch.where(all_unmasked, 2, torch.where(any_unmasked, 1, 0)).to(torch.int8)


def _length(fn, L):
    """The spec's token count when its layout fixes one (unravel over constant extents)."""
    try:
        fn.mask(Lq=L, Lk=L, **_inputs(fn, 1, 1, L))
        return L
    except ValueError as err:
        return int(str(err).split("= ")[1].split(" tokens")[0])


def _inputs(fn, B, H, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in fn.signature.tensors:
        if t.name == "doc_ids":
            out[t.name] = torch.randint(0, 4, (B, L), generator=g).sort(-1).values
        elif t.name == "band":
            out[t.name] = torch.randint(1, L, (H,), generator=g)
        else:
            sizes = {"B": B, "Hq": H, "Lq": L, "Lk": L, "L": L, "Dqk": 8}  # Dqk: a feature map's input width
            out[t.name] = 0.5 + torch.rand([sizes[a] if a in sizes else int(a) for a in t.axes], generator=g)
    return out


# ----------------------------------------------------------------------------------------------
# Exactness on the catalog
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(set(CATALOG) - SELECT_EXAMPLES))
def test_catalog_plans_are_exact(name):
    fn = load(name)
    B, H = 2, 3
    for L, block_m, block_n in [(67, 16, 16), (200, 32, 16), (67, 8, 32), (256, 64, 64), (131, 4, 8)]:
        L = _length(fn, L)
        inputs = _inputs(fn, B, H, L)
        plan = fn.plan(Lq=L, Lk=L, B=B, Hq=H, block_m=block_m, block_n=block_n, **inputs)
        want = brute_force(fn.mask(Lq=L, Lk=L, B=B, Hq=H, **inputs), block_m, block_n)
        got = plan.to_dense()
        assert got.shape == want.shape
        # sound: never skips an unmasked pair, never drops the mask where a pair is masked
        assert ((want > 0) <= (got > 0)).all(), f"{name}: EMPTY tile holding an unmasked pair"
        assert ((got == 2) <= (want == 2)).all(), f"{name}: FULL tile holding a masked pair"
        # exact: visits only tiles with an unmasked pair
        assert torch.equal(got > 0, want > 0), f"{name} L={L} {block_m}x{block_n}: visits empty tiles"
        assert plan.tiles_visited == int((want > 0).sum())
        assert plan.tiles_total == want.numel()
        assert plan.density == pytest.approx(plan.tiles_visited / plan.tiles_total)


@pytest.mark.parametrize("name", ["causal", "sliding_window", "document", "neighborhood_2d", "radial", "moa"])
def test_cross_lengths_and_cut_tiles(name):
    """Lq != Lk where the spec allows it, and lengths that cut the last tile short."""
    fn = load(name)
    if fn.signature.equal_lengths or _length(fn, 50) != 50:
        Lq = Lk = _length(fn, 50)
    else:
        Lq, Lk = 29, 83
    inputs = _inputs(fn, 1, 2, Lq)
    plan = fn.plan(Lq=Lq, Lk=Lk, B=1, Hq=2, block_m=8, block_n=16, **inputs)
    want = brute_force(fn.mask(Lq=Lq, Lk=Lk, B=1, Hq=2, **inputs), 8, 16)
    got = plan.to_dense()
    assert torch.equal(got > 0, want > 0) and ((got == 2) <= (want == 2)).all()


def test_runs_keep_dense_masks_compact():
    """A causal document mask at 64K tokens: its ~130K visited tiles are a few runs per row."""
    fn = load("document")
    L = 1 << 16
    ids = torch.repeat_interleave(torch.arange(4), L // 4)[None]
    plan = fn.plan(Lq=L, Lk=L, block_m=128, block_n=128, doc_ids=ids)
    rows = plan.tiles_q
    assert plan.tiles_visited == 4 * (128 * 129 // 2)  # four causal 128-tile triangles
    assert plan.q_full.runs.shape[0] <= 2 * rows
    assert plan.q_partial.runs.shape[0] <= 2 * rows
    kv_full, kv_partial = plan.kv_lists
    assert kv_full.tiles == plan.tiles_full and kv_partial.tiles == plan.tiles_partial


def test_transposed_lists_match_rows():
    fn = load("neighborhood_2d")
    plan = fn.plan(Lq=256, Lk=256, block_m=16, block_n=32)
    dense = plan.to_dense()[0, 0]
    for runs, cls in zip(plan.kv_lists, (tile_plan.FULL, tile_plan.PARTIAL)):
        cols, rows = runs.expand()
        got = torch.zeros_like(dense)
        got[rows, cols] = cls
        assert torch.equal(got == cls, dense == cls)


# ----------------------------------------------------------------------------------------------
# Soundness on random masks built from the language's operators
# ----------------------------------------------------------------------------------------------
_LEAVES = ["q", "kv", "w", "3", "5", "Lk"]


def _int_expr(draw, depth):
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(_LEAVES))
    op = draw(st.sampled_from(["+", "-", "*", "//", "%", ">>", "abs", "min", "max", "clamp"]))
    a, b = _int_expr(draw, depth - 1), _int_expr(draw, depth - 1)
    if op in ("//", "%"):
        return f"({a}) {op} {draw(st.sampled_from(['2', '3', '7', 'w']))}"
    if op == ">>":
        return f"({a}) >> {draw(st.sampled_from(['1', '2']))}"
    if op == "abs":
        return f"abs({a})"
    if op in ("min", "max"):
        return f"{op}({a}, {b})"
    if op == "clamp":
        return f"clamp({a}, 2, 9)"
    return f"({a}) {op} ({b})"


@st.composite
def random_masks(draw, depth=3):
    def cond(d):
        if d == 0 or draw(st.integers(0, 2)) == 0:
            rel = draw(st.sampled_from(["<", "<=", "==", "!=", ">", ">="]))
            return f"{_int_expr(draw, 2)} {rel} {_int_expr(draw, 2)}"
        kind = draw(st.sampled_from(["and", "or", "not"]))
        if kind == "not":
            return f"not ({cond(d - 1)})"
        return f"({cond(d - 1)}) {kind} ({cond(d - 1)})"
    return cond(depth)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask=random_masks(), L=st.integers(1, 40), w=st.integers(1, 9),
       blocks=st.sampled_from([(1, 1), (2, 4), (4, 4), (8, 2), (16, 16)]))
def test_random_masks_are_sound(tmp_path_factory, mask, L, w, blocks):
    folder = tmp_path_factory.mktemp("spec")
    spec = folder / "random_mask.attn"
    spec.write_text(f"attention random_mask\nparam w: int = 4\nmask {mask}\n")
    fn = attnc.load(spec)
    block_m, block_n = blocks
    plan = fn.plan(Lq=L, Lk=L + 3, block_m=block_m, block_n=block_n, w=w)
    want = brute_force(fn.mask(Lq=L, Lk=L + 3, w=w), block_m, block_n)
    got = plan.to_dense()
    assert ((want > 0) <= (got > 0)).all(), f"unsound EMPTY for: {mask}"
    assert ((got == 2) <= (want == 2)).all(), f"unsound FULL for: {mask}"
    # these tiles are small enough for the existence search: exact too
    assert torch.equal(got > 0, want > 0), f"inexact for: {mask}"


# ----------------------------------------------------------------------------------------------
# Interval rules against enumeration
# ----------------------------------------------------------------------------------------------
_UNARY = {
    "neg": (I.neg, lambda a: -a),
    "abs": (I.absolute, abs),
    "floor_log2": (I.floor_log2, lambda a: max(a, 1).bit_length() - 1),
}
_BINARY = {
    "add": (I.add, lambda a, b: a + b),
    "mul": (I.mul, lambda a, b: a * b),
    "min": (I.minimum, min),
    "max": (I.maximum, max),
    "floordiv": (I.floordiv, lambda a, b: a // b if b else None),
    "mod": (I.mod, lambda a, b: a % b if b else None),
    "rshift": (I.rshift, lambda a, b: a >> b if b >= 0 else None),
}
_RELATIONS = {"lt": (I.lt, lambda a, b: a < b), "le": (I.le, lambda a, b: a <= b),
              "eq": (I.eq, lambda a, b: a == b), "ne": (I.ne, lambda a, b: a != b)}


def _interval(lo, hi, as_tensor):
    return (torch.tensor([lo]), torch.tensor([hi])) if as_tensor else (lo, hi)


def _value(x):
    return x.item() if isinstance(x, torch.Tensor) else x


ranges = st.tuples(st.integers(-20, 20), st.integers(0, 12)).map(lambda t: (t[0], t[0] + t[1]))


@settings(max_examples=300, deadline=None)
@given(a=ranges, b=ranges, tensors=st.booleans(), op=st.sampled_from(sorted(_BINARY)))
def test_binary_interval_rules_bound_every_value(a, b, tensors, op):
    rule, exact = _BINARY[op]
    if op == "rshift":
        b = (abs(b[0]) % 4, abs(b[0]) % 4 + (b[1] - b[0]) % 3)
    if op in ("floordiv", "mod") and b[0] <= 0 <= b[1]:
        b = (1, max(1, b[1]))  # the spec language divides by positive amounts
    values = [exact(x, y) for x in range(a[0], a[1] + 1) for y in range(b[0], b[1] + 1)]
    lo, hi = rule(_interval(*a, tensors), _interval(*b, tensors))
    assert _value(lo) <= min(values) and max(values) <= _value(hi)
    if a[0] == a[1] and b[0] == b[1]:
        assert _value(lo) == _value(hi) == values[0]  # exact on points


@settings(max_examples=200, deadline=None)
@given(a=ranges, tensors=st.booleans(), op=st.sampled_from(sorted(_UNARY)))
def test_unary_interval_rules_bound_every_value(a, tensors, op):
    rule, exact = _UNARY[op]
    values = [exact(x) for x in range(a[0], a[1] + 1)]
    lo, hi = rule(_interval(*a, tensors))
    assert _value(lo) <= min(values) and max(values) <= _value(hi)


@settings(max_examples=300, deadline=None)
@given(a=ranges, b=ranges, tensors=st.booleans(), op=st.sampled_from(sorted(_RELATIONS)))
def test_relations_all_and_any(a, b, tensors, op):
    rule, exact = _RELATIONS[op]
    truths = [exact(x, y) for x in range(a[0], a[1] + 1) for y in range(b[0], b[1] + 1)]
    all_, any_ = rule(_interval(*a, tensors), _interval(*b, tensors))
    all_, any_ = bool(_value(all_)), bool(_value(any_))
    assert not all_ or all(truths)
    assert any_ or not any(truths)
    # comparisons of two intervals are exact: independent ranges attain every pair
    assert all_ == all(truths) and any_ == any(truths)


def test_summaries_bound_blocks():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-50, 50, (3, 77), generator=g)
    summaries = tile_plan.Summaries()
    for size in (1, 2, 8, 32, 4, 128):
        lo, hi, _ = summaries.block_min_max(x, ((1, size),))
        for c in range(-(-77 // size)):
            block = x[:, c * size:(c + 1) * size]
            assert torch.equal(lo[:, c], block.amin(1)) and torch.equal(hi[:, c], block.amax(1))


def test_summaries_bound_two_dimensional_blocks():
    """A tensor read over two token axes (`m[q, kv]`) is summarized per rectangle of the cell, with
    block sizes that differ per axis and are reduced from finer ones in any order."""
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-50, 50, (2, 37, 21), generator=g)
    summaries = tile_plan.Summaries()
    for sq, sk in [(1, 1), (4, 1), (1, 8), (4, 8), (2, 2), (16, 4), (64, 32), (8, 16)]:
        lo, hi, _ = summaries.block_min_max(x, ((2, sk), (1, sq)))
        assert lo.shape == (2, -(-37 // sq), -(-21 // sk))
        for i in range(lo.shape[1]):
            for j in range(lo.shape[2]):
                block = x[:, i * sq:(i + 1) * sq, j * sk:(j + 1) * sk].reshape(2, -1)
                assert torch.equal(lo[:, i, j], block.amin(1)) and torch.equal(hi[:, i, j], block.amax(1))


# ----------------------------------------------------------------------------------------------
# Plans in use: caching, rebuilding, and the kernels visiting exactly the plan's tiles
# ----------------------------------------------------------------------------------------------
def _module(fn):
    import sys
    return sys.modules[fn.__module__]


def test_plan_is_reused_when_only_unread_inputs_change(tmp_path, monkeypatch):
    spec = tmp_path / "sliding_alibi_2d.attn"
    spec.write_text(
        "attention sliding_alibi_2d\n"
        "input slopes: float[Hq]\n"
        "const Y = 4, X = 5\n"
        "let (qy, qx) = unravel(q, Y, X)\n"
        "let (ky, kx) = unravel(kv, Y, X)\n"
        "mask abs(qy - ky) <= 1 and abs(qx - kx) <= 1\n"
        "score s - slopes[h] * abs(q - kv)\n"
    )
    fn = attnc.load(spec)
    builds = []
    real = tile_plan.classify
    monkeypatch.setattr(tile_plan, "classify", lambda *a, **k: builds.append(1) or real(*a, **k))
    q, k, v = (torch.randn(1, 2, 20, 16) for _ in range(3))
    o1 = fn(q, k, v, slopes=torch.tensor([0.1, 0.2]))
    o2 = fn(q, k, v, slopes=torch.tensor([0.7, 0.3]))
    assert len(builds) == 1  # the mask reads no tensor: one plan per size
    for o, slopes in ((o1, [0.1, 0.2]), (o2, [0.7, 0.3])):
        ref = fn.reference(q.double(), k.double(), v.double(), slopes=torch.tensor(slopes, dtype=torch.float64))
        assert (o.double() - ref).abs().max() / ref.abs().max() < 2e-3
    fn(torch.randn(1, 2, 20, 16), k, v, slopes=torch.tensor([0.1, 0.2]))
    assert len(builds) == 1


def test_plan_follows_tensor_inputs_of_the_mask():
    """Document ids change the mask: each call plans with its own ids (and stays correct)."""
    fn = load("document")
    q, k, v = (torch.randn(1, 1, 45, 16) for _ in range(3))
    for ids in (torch.zeros(1, 45, dtype=torch.long), torch.arange(45)[None] // 10):
        o = fn(q, k, v, doc_ids=ids)
        ref = fn.reference(q.double(), k.double(), v.double(), doc_ids=ids)
        assert (o.double() - ref).abs().max() / ref.abs().max() < 2e-3


def _expected_visits(plan, Lq, Lk, block_m, block_n):
    """Key sub-tiles (block_n wide) each forward program (block_m queries) visits under `plan`."""
    per_row = []
    for r in range(plan.batch * plan.heads * plan.tiles_q):
        count = 0
        for runs in (plan.q_full, plan.q_partial):
            for first, length in runs.runs[runs.offsets[r]:runs.offsets[r + 1]].tolist():
                start, end = first * plan.block_n, min((first + length) * plan.block_n, Lk)
                count += -(-(end - start) // block_n)
        per_row.append(count)
    programs = -(-Lq // block_m)
    return [per_row[(p * block_m) // plan.block_m] for p in range(programs)]


@pytest.mark.parametrize("name", ["neighborhood_1d", "causal", "maxvit_block"])
def test_forward_visits_exactly_the_planned_tiles(name):
    fn = load(name)
    L = _length(fn, 45)
    q, k, v = (torch.randn(1, 1, L, 16) for _ in range(3))
    block_m = block_n = launch.kernel_configs("fwd")[0].kwargs["BLOCK_M"]
    with launch.count_visits() as log:
        o = fn(q, k, v)
    (visits,) = log
    if _module(fn).PLAN_MODE == "lists":
        plan = fn.plan(Lq=L, Lk=L)  # the plan the kernels used (interpreter plan tiles)
    else:
        plan = fn.plan(Lq=L, Lk=L, block_m=block_m, block_n=block_n)  # kernels bound ranges per tile
    assert visits[0].tolist() == _expected_visits(plan, L, L, block_m, block_n)
    # and skipping is only ever right: the output matches the reference
    ref = fn.reference(q.double(), k.double(), v.double())
    assert (o.double() - ref).abs().max() / ref.abs().max() < 2e-3
    # sparse masks visit a fraction of the tiles
    if name != "causal":
        assert sum(visits[0].tolist()) < (-(-L // block_m)) * (-(-L // block_n))


def test_plan_api_errors():
    fn = load("document")
    with pytest.raises(ValueError, match="document: argument 'doc_ids'"):
        fn.plan(Lq=8, Lk=8)
    with pytest.raises(ValueError, match="argument 'Lk'"):
        fn.plan(Lq=8, Lk=9, doc_ids=torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="argument 'block_m': expected a power of two"):
        load("causal").plan(Lq=8, Lk=8, block_m=12)
    with pytest.raises(ValueError, match="argument 'Lq': expected a positive int"):
        load("causal").plan(Lq=0, Lk=8)
    with pytest.raises(ValueError, match="lays q out as"):
        load("neighborhood_2d").plan(Lq=100, Lk=100)


def test_prebuilt_plan_is_used_and_checked(monkeypatch):
    fn = load("document")
    ids = torch.arange(45)[None] // 12
    q, k, v = (torch.randn(1, 2, 45, 16) for _ in range(3))
    plan = fn.plan(Lq=45, Lk=45, doc_ids=ids)
    builds = []
    real = tile_plan.classify
    monkeypatch.setattr(tile_plan, "classify", lambda *a, **kw: builds.append(1) or real(*a, **kw))
    o = fn(q, k, v, doc_ids=ids, plan=plan)
    assert builds == []  # the call used the given plan
    ref = fn.reference(q.double(), k.double(), v.double(), doc_ids=ids)
    assert (o.double() - ref).abs().max() / ref.abs().max() < 2e-3
    with pytest.raises(ValueError, match="argument 'plan': built for Lq = 44, but this call has 45"):
        fn(q, k, v, doc_ids=ids, plan=fn.plan(Lq=44, Lk=44, doc_ids=ids[:, :44]))
    with pytest.raises(ValueError, match="argument 'plan': built with 16x16 tiles"):
        fn(q, k, v, doc_ids=ids, plan=fn.plan(Lq=45, Lk=45, block_m=16, block_n=16, doc_ids=ids))
    with pytest.raises(ValueError, match="argument 'plan': expected a TilePlan"):
        fn(q, k, v, doc_ids=ids, plan="causal")


def test_plan_arguments_are_reserved_names(tmp_path):
    spec = tmp_path / "clash.attn"
    spec.write_text("attention clash\nparam block_m = 3\nmask kv <= q + block_m\n")
    with pytest.raises(SpecError, match="'block_m' is a built-in name"):
        attnc.load(spec)


@st.composite
def random_tensor_masks(draw):
    """Masks reading tensors per batch entry, head and token (through per-block summaries)."""
    token = draw(st.sampled_from(["ids[b, q]", "ids[b, kv]"]))
    other = draw(st.sampled_from(["ids[b, kv]", "ids[b, q] + 1", "band[h]", "kv // 3", "q - kv"]))
    rel = draw(st.sampled_from(["==", "!=", "<", "<="]))
    extra = draw(st.sampled_from(["", " and kv <= q", " or kv < band[h]", " and abs(q - kv) < band[h]"]))
    return f"({token} {rel} {other}){extra}"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask=random_tensor_masks(), L=st.integers(1, 40), seed=st.integers(0, 10 ** 6),
       blocks=st.sampled_from([(2, 4), (4, 4), (8, 8), (16, 4)]))
def test_random_tensor_masks_are_sound(tmp_path_factory, mask, L, seed, blocks):
    spec = tmp_path_factory.mktemp("spec") / "tensor_mask.attn"
    spec.write_text(f"attention tensor_mask\ninput ids: int[B, L]\ninput band: int[Hq]\nmask {mask}\n")
    fn = attnc.load(spec)
    g = torch.Generator().manual_seed(seed)
    B, H = 2, 3
    inputs = {"ids": torch.randint(-3, 6, (B, L), generator=g), "band": torch.randint(0, L + 1, (H,), generator=g)}
    plan = fn.plan(Lq=L, Lk=L, B=B, Hq=H, block_m=blocks[0], block_n=blocks[1], **inputs)
    want = brute_force(fn.mask(Lq=L, Lk=L, B=B, Hq=H, **inputs), *blocks)
    got = plan.to_dense()
    assert ((want > 0) <= (got > 0)).all(), f"unsound EMPTY for: {mask}"
    assert ((got == 2) <= (want == 2)).all(), f"unsound FULL for: {mask}"
    assert torch.equal(got > 0, want > 0), f"inexact for: {mask}"


def test_masks_without_interval_rules_visit_every_tile_with_the_mask(tmp_path):
    """A power with a varying exponent has no interval rule: every tile is PARTIAL, still correct."""
    spec = tmp_path / "odd_power.attn"
    spec.write_text("attention odd_power\nmask (q % 4 + 1) ** (kv % 3) <= q + 1\n")
    fn = attnc.load(spec)
    assert _module(fn).PLAN_MODE == "dense"
    L = 37
    plan = fn.plan(Lq=L, Lk=L, block_m=16, block_n=16)
    assert plan.tiles_full == 0 and plan.tiles_partial == plan.tiles_total
    q, k, v = (torch.randn(1, 1, L, 16) for _ in range(3))
    ref = fn.reference(q.double(), k.double(), v.double())
    assert (fn(q, k, v).double() - ref).abs().max() / ref.abs().max() < 2e-3


# ----------------------------------------------------------------------------------------------
# Band plans: O(tiles) from the tile corners, equal to the row-by-row reference
# ----------------------------------------------------------------------------------------------
def _random_band(g):
    """lo(q), hi(q) non-decreasing in q, as the band walk's bounds are: max/min of slope-0..2 lines."""
    a, b = (int(x) for x in torch.randint(0, 3, (2,), generator=g))
    c, d, e, f = (int(x) for x in torch.randint(-40, 40, (4,), generator=g))

    def band(q_pos, b_idx, h_idx):
        lo = torch.maximum(a * q_pos + c, torch.full_like(q_pos, d))
        hi = torch.minimum(b * q_pos + e, torch.full_like(q_pos, f + 60))
        return lo, hi
    return band


def test_band_reach_equals_the_row_by_row_reference():
    g = torch.Generator().manual_seed(0)
    opened = 0
    for _ in range(300):
        band = _random_band(g)
        Lq, Lk = (int(x) for x in torch.randint(1, 90, (2,), generator=g))
        block_m = int(2 ** torch.randint(0, 5, (), generator=g))
        q_first = torch.arange(-(-Lq // block_m)) * block_m
        got = tile_plan.band_reach(band, q_first, None, None, Lq=Lq, Lk=Lk, block_m=block_m)
        want = tile_plan.band_rows(band, q_first, None, None, Lq=Lq, Lk=Lk, block_m=block_m)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (Lq, Lk, block_m)
        q_last = torch.clamp(q_first + block_m, max=Lq) - 1
        assert torch.equal(got[2], band(q_last, None, None)[0]) and torch.equal(got[3], band(q_first, None, None)[1])
        opened += int((got[0] == Lk).sum())
    assert opened > 0  # the draws include tiles where no row sees a key


@cache
def _shifted_band(folder):
    """A band whose first rows and, past Lk, last rows see no key: tiles the corners leave open."""
    spec = folder / "shifted_band.attn"
    spec.write_text("attention shifted_band\nparam w: int = 4\nparam shift: int = 2\nmask kv <= q - shift and q - kv < w\n")
    return attnc.load(spec)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(Lq=st.integers(1, 70), Lk=st.integers(1, 70), w=st.integers(-2, 30), shift=st.integers(-5, 30),
       blocks=st.sampled_from([(1, 1), (4, 8), (8, 4), (16, 16)]))
def test_band_plans_are_exact_on_random_bands(tmp_path_factory, Lq, Lk, w, shift, blocks):
    fn = _shifted_band(tmp_path_factory.getbasetemp())
    plan = fn.plan(Lq=Lq, Lk=Lk, block_m=blocks[0], block_n=blocks[1], w=w, shift=shift)
    i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
    mask = (j <= i - shift) & (i - j < w)  # the spec's mask, written out
    want = brute_force(mask[None, None], *blocks)
    got = plan.to_dense()
    assert torch.equal(got, want), (Lq, Lk, w, shift, blocks)


def test_per_head_band_plans_are_exact(tmp_path):
    """A band read per head (b_idx / h_idx reach the tile corners and the rows alike)."""
    spec = tmp_path / "head_band.attn"
    spec.write_text("attention head_band\ninput width: int[Hq]\nmask kv <= q and q - kv < width[h]\n")
    fn = attnc.load(spec)
    assert _module(fn).PLAN_MODE == "band"
    width = torch.tensor([1, 7, 30, 0])
    for Lq, Lk in [(50, 20), (33, 33), (20, 60)]:
        plan = fn.plan(Lq=Lq, Lk=Lk, B=2, Hq=4, block_m=8, block_n=4, width=width)
        i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
        mask = (j <= i) & (i - j < width[:, None, None])  # the spec's mask, written out
        assert torch.equal(plan.to_dense(), brute_force(mask[None], 8, 4)), (Lq, Lk)


@pytest.mark.parametrize("Lq, Lk, w, shift", [(37, 37, 5, 0), (29, 83, 11, 3), (70, 20, 9, 2)])
def test_band_kernel_matches_the_formula(tmp_path, Lq, Lk, w, shift):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import formulas  # tests/formulas.py: the float64 reference

    fn = _shifted_band(tmp_path)
    g = torch.Generator().manual_seed(Lq)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for n in (Lq, Lk, Lk))
    o = fn(q, k, v, w=w, shift=shift)
    i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
    ref, _ = formulas.attention(q.double(), k.double(), v.double(), (j <= i - shift) & (i - j < w))
    assert (o.double() - ref).abs().max() / ref.abs().max() < 2e-3


def test_band_plans_at_long_contexts_read_tile_corners_only(monkeypatch):
    """sliding_window at 2^20 tokens: no tile goes row by row (that would be O(Lq) work), and the plan
    holds the band's tiles, O(L / BLOCK) of them."""
    fn = load("sliding_window")

    def rows(*args, **kwargs):
        raise AssertionError("band plan went row by row")
    monkeypatch.setattr(tile_plan, "band_rows", rows)
    L, block = 1 << 20, 128
    plan = fn.plan(Lq=L, Lk=L, window=256, block_m=block, block_n=block)
    tq = L // block
    # each query tile reaches its own key tile and the two before it (window 256 = 2 tiles)
    assert plan.tiles_visited == 3 * tq - 3
    assert plan.tiles_full == tq - 1  # the key tile just before: every query of the tile sees all of it
    # Lq > Lk: the last rows see no key, and only the tile where that starts goes row by row
    monkeypatch.undo()
    calls = []
    real = tile_plan.band_rows
    monkeypatch.setattr(tile_plan, "band_rows", lambda band, q_first, *a, **k: calls.append(q_first.numel())
                        or real(band, q_first, *a, **k))
    fn.plan(Lq=L, Lk=L // 2, window=200, block_m=block, block_n=block)
    assert calls == [1]
