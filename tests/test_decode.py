"""attn.decode (split-KV decoding against contiguous and paged KV caches) and attn.varlen, through the
interpreter, against attention formulas written here in float64 over absolute positions.

Decoding: query i of sequence b sits at position cache_seqlens[b] - Lnew + i and sees the keys
[0, cache_seqlens[b]) that the spec's mask lets through; the answer is a masked softmax (with the
spec's score transform and sink) over those keys. Tiny shapes: page size 16, 3 pages a sequence,
ragged lengths including 1 and non-multiples of 16, Lnew in {1, 3}, GQA (4 query heads on 2 key heads)
and DiffQKV (Hk = 1, Hv = 2, Dqk != Dv). Every kernel test asserts that the decode kernel ran
(launch.count_visits)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from attnc.runtime import launch

import attnc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import formulas as F
from compare import check_close

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PAGE = 16
PAGES = 3  # pages a sequence can hold: capacity 48
CAP = PAGE * PAGES


@cache
def load(name):
    return attnc.load(EXAMPLES / f"{name}.attn")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- the formulas: (mask(b, h, q, kv), logits transform(s, b, h, q, kv), sink(h) or None) ----
def _case(name, B, Hq):
    """Spec inputs, and the float64 formula pieces, of one catalog spec."""
    causal = lambda b, h, q, kv: kv <= q
    plain = lambda s, b, h, q, kv: s
    if name in ("causal", "diffqkv"):
        return {}, causal, plain, None
    if name == "sliding_window":
        w = 5
        return {"window": w}, lambda b, h, q, kv: (kv <= q) & (q - kv < w), plain, None
    if name == "streaming_sink":
        sinks, w = 2, 5
        return ({"sinks": sinks, "window": w},
                lambda b, h, q, kv: (kv <= q) & ((kv < sinks) | (q - kv < w)), plain, None)
    if name == "alibi":
        slopes = 0.05 + 0.5 * torch.rand(Hq, generator=_gen(1))
        return {"slopes": slopes}, causal, lambda s, b, h, q, kv: s - slopes[h].double() * (q - kv), None
    if name == "softcap":
        cap = 2.0
        return {"cap": cap}, causal, lambda s, b, h, q, kv: cap * torch.tanh(s / cap), None
    if name == "document":
        g = _gen(11)
        doc = torch.stack([torch.randint(0, 4, (CAP,), generator=g).sort().values for _ in range(B)])
        return ({"doc_ids": doc}, lambda b, h, q, kv: (doc[b, q] == doc[b, kv]) & (kv <= q), plain, None)
    if name == "sink_logit":
        sink = torch.randn(Hq, generator=_gen(2))
        return {"sink": sink}, causal, plain, lambda h: sink[h].double()
    raise KeyError(name)


def formula(q, k, v, lengths, scale, mask, logits, sink):
    """o [B, Hq, Lnew, Dv] and lse [B, Hq, Lnew] from logical caches k [B, Hk, CAP, Dqk], v [B, Hv, CAP, Dv]."""
    B, Hq, Lnew, _ = q.shape
    Hk, Hv = k.shape[1], v.shape[1]
    o = torch.zeros(B, Hq, Lnew, v.shape[3], dtype=torch.float64)
    lse = torch.full((B, Hq, Lnew), -math.inf, dtype=torch.float64)
    for b in range(B):
        L = int(lengths[b])
        qpos = torch.arange(L - Lnew, L)[:, None]
        kpos = torch.arange(L)[None, :]
        for h in range(Hq):
            kh, vh = h * Hk // Hq, h * Hv // Hq
            s = scale * q[b, h].double() @ k[b, kh, :L].double().T
            s = logits(s, b, h, qpos, kpos)
            s = torch.where(mask(b, h, qpos, kpos), s, torch.tensor(-math.inf, dtype=torch.float64))
            if sink is not None:
                s = torch.cat([s, sink(h).expand(Lnew, 1)], 1)
            row_lse = torch.logsumexp(s, 1)
            p = torch.exp(s - row_lse[:, None]).nan_to_num(0.0)[:, :L]
            o[b, h] = p @ v[b, vh, :L].double()
            lse[b, h] = row_lse
    return o, lse


def general_formula(q, k, v, lengths, scale, weights):
    """General normalizations: o = sum_j w_ij v_j, w = weights(s, keep, L) over the causal keys of
    the absolute positions, in float64."""
    B, Hq, Lnew, _ = q.shape
    Hk, Hv = k.shape[1], v.shape[1]
    o = torch.zeros(B, Hq, Lnew, v.shape[3], dtype=torch.float64)
    for b in range(B):
        L = int(lengths[b])
        keep = torch.arange(L)[None, :] <= torch.arange(L - Lnew, L)[:, None]
        for h in range(Hq):
            s = scale * q[b, h].double() @ k[b, h * Hk // Hq, :L].double().T
            o[b, h] = weights(s, keep, L) @ v[b, h * Hv // Hq, :L].double()
    return o


def _sigmoid(bias):
    def w(s, keep, L):
        return torch.where(keep, torch.sigmoid(s + (-math.log(L) if bias is None else bias)), 0.0)
    return w


def _softplus(s, keep, L):
    visible = keep.sum(1, keepdim=True).double()
    w = torch.where(keep, torch.nn.functional.softplus(torch.log(visible) * s), 0.0)
    return w / w.sum(1, keepdim=True)


GENERAL = {
    # name: (weights(s, keep, L), inputs)
    "sigmoid": (_sigmoid(None), {}),  # the default bias -log(Lk) differs per sequence
    "sigmoid_bias": (_sigmoid(-0.5), {"bias": -0.5}),
    "softplus": (_softplus, {}),
    # two passes over the keys: r1 = rowsum(softplus), then r2 from r1 (tests/formulas.py's LSSAR)
    "softplus_reweight": (lambda s, keep, L: F.softplus_reweight_weights(s, keep)[0], {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("lnew", [1, 3])
@pytest.mark.parametrize("case", list(GENERAL))
def test_decode_general_normalizations(case, lnew, layout):
    """Row statistics merged across splits, pass by pass (softplus: the row sum; softplus_reweight: two
    passes), and a length-dependent default (sigmoid's bias = -log(Lk), per sequence)."""
    attn = load(case.removesuffix("_bias"))
    weights, inputs = GENERAL[case]
    q, k, v, lengths = _problem("causal", lnew)
    ref = general_formula(q, k, v, lengths, q.shape[-1] ** -0.5, weights)
    if layout == "paged":
        k_cache, table = paged(k, lengths, 7)
        v_cache, _ = paged(v, lengths, 7)
    else:
        k_cache, v_cache, table = k, v, None
    with launch.count_visits() as log:
        o = attn.decode(q, k_cache, v_cache, lengths, block_table=table, **inputs)
    assert log and all((t >= 0).all() for t in log), "the decode kernel did not run"
    check_close("o", o, ref, 2e-3)


def paged(cache_, lengths, seed):
    """A logical cache [B, H, CAP, D] as pages in a random order: (pages, block_table)."""
    B, H, _, D = cache_.shape
    n = B * PAGES + 2  # two spare pages nobody reads
    perm = torch.randperm(n, generator=_gen(seed))[: B * PAGES].view(B, PAGES)
    pages = torch.randn(n, H, PAGE, D, generator=_gen(seed + 1), dtype=cache_.dtype)
    for b in range(B):
        for j in range(PAGES):
            pages[perm[b, j]] = cache_[b, :, j * PAGE:(j + 1) * PAGE]
    return pages, perm.to(torch.int32)


SPECS = ["causal", "sliding_window", "alibi", "softcap", "streaming_sink", "document", "diffqkv", "sink_logit"]


def _problem(name, lnew, seed=0):
    B, Hq = 3, 4
    Hk, Hv, Dqk, Dv = (1, 2, 16, 8) if name == "diffqkv" else (2, 2, 16, 16)
    g = _gen(seed)
    q = torch.randn(B, Hq, lnew, Dqk, generator=g)
    k = torch.randn(B, Hk, CAP, Dqk, generator=g)
    v = torch.randn(B, Hv, CAP, Dv, generator=g)
    lengths = torch.tensor([1, 37, 20] if lnew == 1 else [37, 3, 16], dtype=torch.int32)
    return q, k, v, lengths


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("lnew", [1, 3])
@pytest.mark.parametrize("name", SPECS)
def test_decode_matches_formula(name, lnew, layout):
    attn = load(name)
    q, k, v, lengths = _problem(name, lnew)
    inputs, mask, logits, sink = _case(name, q.shape[0], q.shape[1])
    ref_o, ref_lse = formula(q, k, v, lengths, q.shape[-1] ** -0.5, mask, logits, sink)
    if layout == "paged":
        k_cache, table = paged(k, lengths, 5)
        v_cache, _ = paged(v, lengths, 5)
    else:
        k_cache, v_cache, table = k, v, None
    with launch.count_visits() as log:
        o, lse = attn.decode(q, k_cache, v_cache, lengths, block_table=table, return_lse=True, **inputs)
    assert log and all((t >= 0).all() for t in log), "the decode kernel did not run"
    assert o.shape == ref_o.shape and lse.shape == ref_lse.shape
    check_close("o", o, ref_o, 2e-3)
    check_close("lse", lse, ref_lse, 2e-3)


@pytest.mark.slow
def test_sliding_window_decode_reads_only_the_window():
    """A band decode visits only the key tiles that the window of its queries reaches, spread over
    the splits: per (sequence, KV head) the visits sum to the tiles [lo(first query), last key]."""
    attn = load("sliding_window")
    q, k, v, lengths = _problem("sliding_window", 3)
    window = 5
    with launch.count_visits() as log:
        attn.decode(q, k, v, lengths, window=window)
    (visits,) = log  # [B * groups, splits * query tiles]
    per_seq = visits.view(3, -1).sum(1)  # rows are (sequence, KV group), sequence-major
    expected = []
    for L in lengths.tolist():
        lo = max(0, L - 3 - window + 1)
        expected.append((L - 1) // 16 - lo // 16 + 1)
    groups = visits.shape[0] // 3
    assert per_seq.tolist() == [e * groups for e in expected]
    assert visits.shape[1] > 1  # several splits (the merge ran)


@pytest.mark.slow
@pytest.mark.parametrize("sinks", [2, 20, 0])
def test_streaming_sink_decode_reads_only_sinks_and_window(sinks):
    """Sinks with a window (a plan-list mask, the union of two bands): a decode visits the tiles of
    [0, sinks) and of the window, once each, overlapping or not, and equals the formula."""
    attn = load("streaming_sink")
    q, k, v, lengths = _problem("streaming_sink", 3)
    lengths = torch.tensor([48, 3, 37], dtype=torch.int32)
    window = 5
    mask = lambda b, h, qp, kv: (kv <= qp) & ((kv < sinks) | (qp - kv < window))
    ref_o, _ = formula(q, k, v, lengths, 0.25, mask, lambda s, *a: s, None)
    with launch.count_visits() as log:
        o = attn.decode(q, k, v, lengths, sinks=sinks, window=window)
    check_close("o", o, ref_o, 2e-3)
    (visits,) = log
    per_seq = visits.view(3, -1).sum(1) // (visits.shape[0] // 3)
    expected = []
    for L in lengths.tolist():
        tiles = set()
        if sinks > 0:
            tiles |= set(range(0, (min(sinks, L) - 1) // 16 + 1))
        tiles |= set(range(max(0, L - 3 - window + 1) // 16, (L - 1) // 16 + 1))
        expected.append(len(tiles))
    assert per_seq.tolist() == expected


@pytest.mark.slow
def test_decode_bf16_and_reference_path():
    attn = load("causal")
    q, k, v, lengths = _problem("causal", 3)
    _, mask, logits, sink = _case("causal", 3, 4)
    ref_o, _ = formula(q, k, v, lengths, 0.25, mask, logits, sink)
    o = attn.decode(q.bfloat16(), k.bfloat16(), v.bfloat16(), lengths)
    assert o.dtype == torch.bfloat16
    check_close("o bf16", o, ref_o, 2e-2)
    o64 = attn.decode(q.double(), k.double(), v.double(), lengths)  # float64: the eager reference
    check_close("o float64", o64, ref_o, 1e-10)


@pytest.mark.slow
def test_decode_mqa_many_rows():
    """MQA with 4 query heads on one KV head and Lnew = 5: 20 rows, more than one row tile (16 rows
    under the interpreter), each row at its own head and position."""
    attn = load("alibi")
    g = _gen(4)
    q = torch.randn(2, 4, 5, 16, generator=g)
    k = torch.randn(2, 1, CAP, 16, generator=g)
    v = torch.randn(2, 1, CAP, 16, generator=g)
    lengths = torch.tensor([5, 41], dtype=torch.int32)
    inputs, mask, logits, sink = _case("alibi", 2, 4)
    ref_o, ref_lse = formula(q, k, v, lengths, 0.25, mask, logits, sink)
    with launch.count_visits() as log:
        o, lse = attn.decode(q, k, v, lengths, return_lse=True, **inputs)
    (visits,) = log
    assert visits.shape[0] == 2 and (visits >= 0).all()  # 2 sequences x 1 group; splits x 2 row tiles
    check_close("o", o, ref_o, 2e-3)
    check_close("lse", lse, ref_lse, 2e-3)


# ---- varlen ----
def _causal_formula(q, k, v, scale, slopes=None):
    """[1, H, Lq, D] per sequence, positions from 0: causal softmax (with ALiBi slopes)."""
    s = scale * q.double() @ k.double().transpose(-1, -2)
    i = torch.arange(q.shape[2])[:, None]
    j = torch.arange(k.shape[2])[None, :]
    if slopes is not None:
        s = s - slopes.double()[None, :, None, None] * (i - j)
    s = s.masked_fill(j > i, -math.inf)
    return torch.softmax(s, -1).nan_to_num(0.0) @ v.double()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["causal", "alibi"])
def test_varlen_matches_per_sequence_formula(name):
    attn = load(name)
    H, D = 2, 16
    lq, lk = [5, 1, 9], [5, 1, 9]
    g = _gen(3)
    q = torch.randn(sum(lq), H, D, generator=g, requires_grad=True)
    k = torch.randn(sum(lk), H, D, generator=g, requires_grad=True)
    v = torch.randn(sum(lk), H, D, generator=g, requires_grad=True)
    cu = lambda ls: torch.tensor([0] + list(torch.tensor(ls).cumsum(0)), dtype=torch.int32)
    inputs = {}
    slopes = None
    if name == "alibi":
        slopes = (0.1 + 0.5 * torch.rand(H, generator=g)).requires_grad_()
        inputs["slopes"] = slopes
    o = attn.varlen(q, k, v, cu(lq), cu(lk), max(lq), max(lk), **inputs)  # (its launches: tests/test_varlen.py)
    do = torch.randn(o.shape, generator=g)
    (o * do).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)] + ([slopes.grad.clone()] if slopes is not None else [])
    for t in (q, k, v) + ((slopes,) if slopes is not None else ()):
        t.grad = None
    refs = []
    cq, ck = cu(lq).tolist(), cu(lk).tolist()
    for i in range(3):
        qi = q[cq[i]:cq[i + 1]].transpose(0, 1)[None]
        ki = k[ck[i]:ck[i + 1]].transpose(0, 1)[None]
        vi = v[ck[i]:ck[i + 1]].transpose(0, 1)[None]
        refs.append(_causal_formula(qi, ki, vi, D ** -0.5, slopes)[0].transpose(0, 1))
    ref = torch.cat(refs)
    check_close("o", o, ref, 2e-3)
    (ref * do.double()).sum().backward()
    for what, got, t in zip(["q", "k", "v", "slopes"], grads, (q, k, v, slopes)):
        check_close(f"d{what}", got, t.grad, 5e-3)


# ---- errors: a ValueError naming the argument ----
def _bad(**overrides):
    q, k, v, lengths = _problem("causal", 3)
    k_cache, table = paged(k, lengths, 5)
    v_cache, _ = paged(v, lengths, 5)
    args = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "cache_seqlens": lengths, "block_table": table}
    args.update(overrides)
    return args


def _table_with(value):
    _, k, _, lengths = _problem("causal", 3)
    _, table = paged(k, lengths, 5)
    table = table.clone()
    table[0, 1] = value  # sequence 0 (37 keys) reads its page 1
    return table


@pytest.mark.parametrize("overrides, arg", [
    ({"block_table": _table_with(99)}, "block_table"),
    ({"block_table": _table_with(-1)}, "block_table"),
    ({"block_table": torch.zeros(3, 3, dtype=torch.int64)}, "block_table"),
    ({"cache_seqlens": torch.tensor([49, 3, 16], dtype=torch.int32)}, "cache_seqlens"),
    ({"cache_seqlens": torch.tensor([37, 2, 16], dtype=torch.int32)}, "cache_seqlens"),
    ({"cache_seqlens": torch.tensor([37, 3, 16], dtype=torch.int64)}, "cache_seqlens"),
    ({"k_cache": torch.randn(8, 2, 8, 16), "v_cache": torch.randn(8, 2, 8, 16)}, "k_cache"),
    ({"v_cache": torch.randn(8, 2, 16, 16).half()}, "v_cache"),
    ({"q": torch.randn(3, 4, 3, 16, dtype=torch.float64).to("meta")}, "k_cache"),
    ({"cache_seqlens": torch.tensor([37, 3, 16], dtype=torch.int32).to("meta")}, "cache_seqlens"),
])
def test_decode_bad_input_names_the_argument(overrides, arg):
    with pytest.raises(ValueError, match=f"argument '{arg}'"):
        load("causal").decode(**_bad(**overrides))


def test_decode_refuses_gradients():
    args = _bad(q=torch.randn(3, 4, 3, 16, requires_grad=True))
    with pytest.raises(ValueError, match="argument 'q'.*forward only"):
        load("causal").decode(**args)


def test_decode_general_normalization_has_no_lse():
    q, k, v, lengths = _problem("causal", 1)
    with pytest.raises(ValueError, match="argument 'return_lse'"):
        load("sigmoid").decode(q, k, v, lengths, return_lse=True)


@pytest.mark.slow
def test_varlen_document_inputs_per_sequence():
    """A batch-axis input (doc_ids [num_sequences, max_seqlen]) is sliced per sequence."""
    attn = load("document")
    H, D, lens = 2, 16, [6, 9]
    g = _gen(6)
    q = torch.randn(sum(lens), H, D, generator=g, requires_grad=True)
    k = torch.randn(sum(lens), H, D, generator=g)
    v = torch.randn(sum(lens), H, D, generator=g)
    doc = torch.tensor([[0, 0, 1, 1, 1, 2, 9, 9, 9], [0, 1, 1, 1, 2, 2, 2, 2, 3]])
    cu = torch.tensor([0, 6, 15], dtype=torch.int32)
    o = attn.varlen(q, k, v, cu, cu, 9, 9, doc_ids=doc)
    o.sum().backward()
    refs = []
    for i, (a, b) in enumerate([(0, 6), (6, 15)]):
        L = b - a
        s = D ** -0.5 * q[a:b].double().transpose(0, 1) @ k[a:b].double().transpose(0, 1).transpose(-1, -2)
        d = doc[i, :L]
        keep = (d[:, None] == d[None, :]) & (torch.arange(L)[None, :] <= torch.arange(L)[:, None])
        refs.append((torch.softmax(s.masked_fill(~keep, -math.inf), -1) @ v[a:b].double().transpose(0, 1))
                    .transpose(0, 1))
    ref = torch.cat(refs)
    check_close("o", o, ref, 2e-3)
    dq = q.grad.clone()
    q.grad = None
    ref.sum().backward()
    check_close("dq", dq, q.grad, 5e-3)
