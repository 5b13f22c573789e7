"""attn.varlen: packed ragged batches in a plain call's kernel launches, whatever the number of sequences.

Checked here, through the Triton interpreter:
- every walk and both families (band: causal, alibi; plan list: document, a mask reading Lk per sequence;
  all: full; dense: a mask outside the interval rules; general: softplus_reweight), GQA (even and
  uneven) and DiffQKV heads, learnable inputs with and without a batch axis (per row, per key, per pair): o and every
  gradient against float64 formulas written in this file, sequence by sequence, with lengths 0 and 1
  and Lq != Lk;
- the same against plain per-sequence calls of the kernels;
- 1, 2, 37 and 1,000 sequences: the launches are a plain call's (3: forward, dQ, dK/dV) for all;
- scalar defaults that depend on the lengths (sigmoid's bias = -log(Lk)) per sequence;
- bad cu_seqlens and max_seqlen: a ValueError naming the argument;
- torch.compile(fullgraph=True) traces the varlen custom op with no graph break.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import math
from pathlib import Path

import pytest
import torch

import attnc

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
D = 16

SPECS = {  # specs beside the catalog's, written here
    "tailkeys": "mask kv < 2 or kv >= Lk - 3",  # a plan list that reads Lk: each sequence's own
    "oddpower": "mask (q % 4 + 1) ** (kv % 3) <= q + 1",  # no interval rule: the dense walk
    "keybias": "input kb: float[B, Lk] learnable\ninput qb: float[B, Hq, Lq] learnable\nmask kv <= q\n"
               "score s + kb[b, kv] + qb[b, h, q]",  # per-key and per-row reads with a batch axis
    "pairbias": "input bias: float[B, Lq, Lk] learnable\nscore s + bias[b, q, kv]",  # per pair
}


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("varlen_specs")
    loaded = {}

    def load(name):
        if name not in loaded:
            if name in SPECS:
                path = folder / f"{name}.attn"
                path.write_text(f"attention {name}\n{SPECS[name]}\n")
            else:
                path = EXAMPLES / f"{name}.attn"
            loaded[name] = attnc.load(path)
        return loaded[name]

    return load


class count_launches:
    """`with count_launches() as n:` counts Triton kernel launches (n.launches)."""

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        self.launches, run = 0, InterpretedFunction.run

        def counted(fn, *args, **kwargs):
            self.launches += 1
            return run(fn, *args, **kwargs)

        self._run, InterpretedFunction.run = run, counted
        return self

    def __exit__(self, *exc):
        from triton.runtime.interpreter import InterpretedFunction

        InterpretedFunction.run = self._run


def cu_of(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)


def packed(lq, lk, Hq, Hk, seed, Hv=None, Dv=D):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), Hq, D, generator=g)
    k = torch.randn(sum(lk), Hk, D, generator=g)
    v = torch.randn(sum(lk), Hk if Hv is None else Hv, Dv, generator=g)
    return [x.requires_grad_(True) for x in (q, k, v)], g


def make_inputs(name, n, Hq, max_q, max_k, g) -> dict:
    """The spec's inputs of n sequences: the padded batch's shapes."""
    if name == "alibi":
        return {"slopes": (0.1 + torch.rand(Hq, generator=g)).requires_grad_(True)}
    if name == "document":  # ids that grow along each sequence; its padding holds junk
        return {"doc_ids": torch.randint(0, 2, (n, max_q), generator=g).cumsum(1)}
    if name == "keybias":
        return {"kb": torch.randn(n, max_k, generator=g).requires_grad_(True),
                "qb": torch.randn(n, Hq, max_q, generator=g).requires_grad_(True)}
    if name == "pairbias":
        return {"bias": torch.randn(n, max_q, max_k, generator=g).requires_grad_(True)}
    return {}


# ---- float64 formulas, per sequence (positions from 0) ----
def _weights(name, s, i, qi, kj, Lk, inputs, b, scale):
    """(score, mask) of one sequence: s [H, Lq, Lk] = scale * q.k, i / j the query / key positions."""
    j = kj
    if name in ("causal", "diffqkv", "alibi", "keybias", "softplus_reweight", "sigmoid"):
        mask = j <= i
    elif name == "document":
        d = inputs["doc_ids"][b]
        mask = (d[i] == d[j]) & (j <= i)
    elif name == "tailkeys":
        mask = (j < 2) | (j >= Lk - 3)
    elif name == "oddpower":
        mask = (i % 4 + 1) ** (j % 3) <= i + 1
    else:
        mask = torch.ones_like(s[0], dtype=torch.bool)
    if name == "alibi":
        s = s - inputs["slopes"].double()[:, None, None] * (i - j)
    if name == "keybias":
        s = s + inputs["kb"].double()[b][j] + inputs["qb"].double()[b][:, i[:, 0]][:, :, None]
    if name == "pairbias":
        s = s + inputs["bias"].double()[b][i, j]
    return s, torch.broadcast_to(mask, s.shape)


def _probs(name, score, mask, Lk):
    if name == "softplus_reweight":  # examples/softplus_reweight.attn with its defaults p = 3, tau = 1
        vis = mask.sum(-1, keepdim=True).clamp(min=1).double()
        a = torch.nn.functional.softplus(torch.log(vis) * score).masked_fill(~mask, 0)
        a = a / a.sum(-1, keepdim=True).clamp(min=1e-300)
        r = torch.relu(vis * a - 1.0) ** 3
        rs = r.sum(-1, keepdim=True)
        return torch.where(rs > 0, r / torch.where(rs > 0, rs, 1), a).masked_fill(~mask, 0)
    if name == "sigmoid":  # examples/sigmoid.attn: sigmoid(score + bias), bias = -log(Lk)
        return torch.sigmoid(score - math.log(Lk)).masked_fill(~mask, 0)
    return torch.softmax(score.masked_fill(~mask, -math.inf), -1).nan_to_num(0.0)


def formula(name, q, k, v, lq, lk, inputs, scale=D ** -0.5):
    """o [total_q, Hq, Dv] in float64, sequence by sequence."""
    cq, ck = cu_of(lq).tolist(), cu_of(lk).tolist()
    Hq, Hk, Hv = q.shape[1], k.shape[1], v.shape[1]
    heads = torch.arange(Hq) * Hk // Hq  # query head h reads key head h * Hk // Hq, value head h * Hv // Hq
    out = []
    for b, (a, c) in enumerate(zip(cq, ck)):
        if b == len(lq):
            break
        Lq, Lk = lq[b], lk[b]
        qi = q[a:a + Lq].double().transpose(0, 1)
        ki = k[c:c + Lk].double().transpose(0, 1)[heads]
        vi = v[c:c + Lk].double().transpose(0, 1)[torch.arange(Hq) * Hv // Hq]
        if Lk == 0:
            out.append(q.new_zeros((Lq, Hq, v.shape[2]), dtype=torch.float64))
            continue
        i = torch.arange(Lq)[:, None]
        j = torch.arange(Lk)[None, :]
        score, mask = _weights(name, scale * qi @ ki.transpose(-1, -2), i, qi, j, Lk, inputs, b, scale)
        out.append((_probs(name, score, mask, Lk) @ vi).transpose(0, 1))
    return torch.cat(out)


def _close(what, got, want, rtol=2e-4):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    assert err <= rtol * max(want.abs().max().item() if want.numel() else 0.0, 1.0), f"{what}: max error {err:.3g}"


def _leaves(qkv, inputs):
    return list(qkv) + [x for x in inputs.values() if x.requires_grad]


def _check(name, attn, lq, lk, Hq=2, Hk=2, seed=0, rtol=2e-4, Hv=None, Dv=D):
    """varlen's o and gradients against the formula; returns the launches of its forward and backward."""
    qkv, g = packed(lq, lk, Hq, Hk, seed, Hv, Dv)
    inputs = make_inputs(name, len(lq), Hq, max(max(lq), 1), max(max(lk), 1), g)
    do = torch.randn(sum(lq), Hq, Dv, generator=g)
    with count_launches() as launches:
        o = attn.varlen(*qkv, cu_of(lq), cu_of(lk), max(max(lq), 1), max(max(lk), 1), **inputs)
        got = torch.autograd.grad((o * do).sum(), _leaves(qkv, inputs))
    want_o = formula(name, *qkv, lq, lk, inputs)
    want = torch.autograd.grad((want_o * do.double()).sum(), _leaves(qkv, inputs))
    _close("o", o, want_o.detach(), rtol)
    for what, a, b in zip(["q", "k", "v", *[n for n, x in inputs.items() if x.requires_grad]], got, want):
        _close(f"d{what}", a, b, rtol)
    return launches.launches


# lengths with 0 and 1, Lq != Lk where the spec allows it
LQ, LK = [3, 0, 1, 7, 2, 18], [4, 2, 1, 5, 0, 21]


@pytest.mark.parametrize("name", ["causal", "alibi", "document", "tailkeys", "full", "oddpower", "softplus_reweight",
                                  "keybias", "pairbias"])
def test_matches_the_formula_in_a_plain_calls_launches(specs, name):
    attn = specs(name)
    lk = LQ if attn.signature.equal_lengths else LK
    launches = _check(name, attn, LQ, lk, rtol=1e-3 if name == "softplus_reweight" else 2e-4)
    q = k = v = torch.randn(1, 2, 8, D, requires_grad=True)
    with count_launches() as plain:
        attn(q, k, v, **make_inputs(name, 1, 2, 8, 8, torch.Generator().manual_seed(0))).sum().backward()
    assert launches == plain.launches, "varlen launches what a plain call launches"


# GQA: groups of 2 heads; uneven groups (summed on the host); DiffQKV: Hk != Hv, Dv != Dqk
@pytest.mark.parametrize("name, Hq, Hk, Hv, Dv", [("causal", 4, 2, 2, D), ("causal", 3, 2, 2, D),
                                                  ("diffqkv", 4, 1, 2, 2 * D)])
def test_grouped_query_heads(specs, name, Hq, Hk, Hv, Dv):
    _check(name, specs(name), LQ, LK, Hq=Hq, Hk=Hk, seed=1, Hv=Hv, Dv=Dv)


def test_equals_per_sequence_calls(specs):
    """varlen against the plain call on each sequence's [1, H, L, D] views (the kernels, not a formula)."""
    attn = specs("document")
    lens = [5, 1, 0, 9]
    (q, k, v), g = packed(lens, lens, 4, 2, 2)
    doc = make_inputs("document", len(lens), 4, 9, 9, g)["doc_ids"]
    cu = cu_of(lens)
    o = attn.varlen(q, k, v, cu, cu, 9, 9, doc_ids=doc)
    got = torch.autograd.grad(o.square().sum(), [q, k, v])
    parts = []
    for i, n in enumerate(lens):
        rows = slice(int(cu[i]), int(cu[i + 1]))
        if n:
            views = [x[rows].transpose(0, 1)[None] for x in (q, k, v)]
            parts.append(attn(*views, doc_ids=doc[i:i + 1, :n])[0].transpose(0, 1))
    want_o = torch.cat(parts)
    want = torch.autograd.grad(want_o.square().sum(), [q, k, v])
    _close("o", o, want_o, 1e-6)
    for what, a, b in zip("qkv", got, want):
        _close(f"d{what}", a, b, 1e-5)


@pytest.mark.parametrize("sequences", [1, 2, 37, 1000])
def test_launches_do_not_grow_with_the_sequences(specs, sequences):
    """One forward launch and two backward launches (dQ, dK/dV), for 1 sequence as for 1,000. The 1,000
    are mostly empty (the interpreter runs every non-empty tile's program in Python)."""
    g = torch.Generator().manual_seed(sequences)
    lq = torch.randint(0, 5, (sequences,), generator=g)
    lk = torch.randint(0, 5, (sequences,), generator=g)
    if sequences == 1000:
        lq, lk = lq * (torch.rand(sequences, generator=g) < 0.08), lk * (torch.rand(sequences, generator=g) < 0.3)
    lq[0], lk[0] = 1, 1  # a sequence of length 1
    assert _check("causal", specs("causal"), lq.tolist(), lk.tolist(), Hq=2, Hk=1) == 3


def test_defaults_that_depend_on_the_lengths_are_per_sequence(specs):
    """sigmoid's bias = -log(Lk): one plain call's launches per group of sequences with the same Lk."""
    lq, lk = [3, 5, 0, 3], [3, 5, 4, 3]
    assert _check("sigmoid", specs("sigmoid"), lq, lk) == 2 * 3


def _call(attn, **changes):
    lens = [2, 3]
    args = {"q": torch.randn(5, 2, D), "k": torch.randn(5, 2, D), "v": torch.randn(5, 2, D), "cu_seqlens_q": cu_of(lens),
            "cu_seqlens_k": cu_of(lens), "max_seqlen_q": 3, "max_seqlen_k": 3}
    args.update(changes)
    return attn.varlen(**args)


@pytest.mark.parametrize("changes, arg", [
    ({"cu_seqlens_q": torch.tensor([0, 2, 5])}, "cu_seqlens_q"),  # int64
    ({"cu_seqlens_q": torch.tensor([1, 2, 5], dtype=torch.int32)}, "cu_seqlens_q"),  # not from 0
    ({"cu_seqlens_q": torch.tensor([0, 3, 2, 5], dtype=torch.int32)}, "cu_seqlens_q"),  # decreasing
    ({"cu_seqlens_k": torch.tensor([0, 2, 4], dtype=torch.int32)}, "cu_seqlens_k"),  # not to the total
    ({"cu_seqlens_k": torch.tensor([[0, 2, 5]], dtype=torch.int32)}, "cu_seqlens_k"),  # 2-D
    ({"cu_seqlens_k": torch.tensor([0, 2, 5], dtype=torch.int32, device="meta")}, "cu_seqlens_k"),  # device
    ({"cu_seqlens_k": torch.tensor([0, 5], dtype=torch.int32)}, "cu_seqlens_k"),  # another sequence count
    ({"max_seqlen_q": 2}, "max_seqlen_q"),
    ({"max_seqlen_k": 3.0}, "max_seqlen_k"),
    ({"q": torch.randn(1, 5, 2, D)}, "q"),
    ({"v": torch.randn(4, 2, D)}, "v"),
])
def test_bad_arguments_name_them(specs, changes, arg):
    with pytest.raises(ValueError, match=f"argument '{arg}'"):
        _call(specs("causal"), **changes)


def test_one_axis_specs_need_as_many_keys_as_queries(specs):
    attn = specs("document")
    doc = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="argument 'cu_seqlens_k'.*one axis L"):
        _call(attn, cu_seqlens_k=cu_of([3, 2]), doc_ids=doc)


def test_fake_tensors_give_the_output_shape(specs):
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    lens = [2, 3]
    q, k, v = (mode.from_tensor(torch.randn(5, 2, D)) for _ in range(3))
    cu = mode.from_tensor(cu_of(lens))
    with mode:
        o = specs("causal").varlen(q, k, v, cu, cu, 3, 3)
    assert o.shape == (5, 2, D)


def test_torch_compile_traces_one_graph(specs):
    attn = specs("alibi")
    lens = [3, 0, 6]
    (q, k, v), g = packed(lens, lens, 2, 2, 3)
    slopes = make_inputs("alibi", 3, 2, 6, 6, g)["slopes"]
    cu = cu_of(lens)

    def fn(q, k, v, slopes):
        return attn.varlen(q, k, v, cu, cu, 6, 6, slopes=slopes) * 2.0

    explained = torch._dynamo.explain(fn)(q, k, v, slopes)
    assert explained.graph_break_count == 0, explained.break_reasons
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, slopes)
    want = fn(q, k, v, slopes)
    _close("o", got, want, 0)
    for a, b in zip(torch.autograd.grad(got.sum(), [q, k, v, slopes]), torch.autograd.grad(want.sum(), [q, k, v, slopes])):
        _close("grad", a, b, 0)
