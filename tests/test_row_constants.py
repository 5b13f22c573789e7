"""Score terms that do not depend on the key (per head `hb[h]`, per query `qb[b, h, q]`).

Softmax ignores a row constant, so the kernels leave it out of their logits (SoftmaxForm.offset);
checked here against float64 formulas written in this file:
- with a sink, the softmax is not invariant to it: o, the log-sum-exp and every gradient, the
  learnable row constant's included (it was counted twice), with and without a sink;
- the returned log-sum-exp is that of the score as written (plus the sink), in the kernels, the
  reference and decode: merging two key halves by log-sum-exp gives the full call;
- FoX with a sink, `s + G[b, h, q] - G[b, h, kv]` (fla's naive forgetting attention), in calls and
  attn.varlen.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import pytest
import torch

import attnc
from attnc.runtime import launch

B, H, L, D = 1, 2, 24, 16

SPECS = {
    "hb": "input hb: float[Hq] learnable\nscore s + hb[h]",
    "qb": "input qb: float[B, Hq, Lq] learnable\nscore s + qb[b, h, q]",
    "fox": "input G: float[B, Hq, L] learnable\nmask kv <= q\nscore s + G[b, h, q] - G[b, h, kv]",
}


def _load(tmp_path, name, sink):
    body = SPECS[name] + ("\ninput sink: float[Hq] learnable\nprobs softmax(score, sink=sink[h])" if sink else "")
    path = tmp_path / f"{name}_{int(sink)}.attn"
    path.write_text(f"attention {name}_{int(sink)}\n{body}\n")
    return attnc.load(path)


def _inputs(name, sink, Lq, Lk, g):
    if name == "hb":
        out = {"hb": torch.randn(H, generator=g)}
    elif name == "qb":
        out = {"qb": torch.randn(B, H, Lq, generator=g)}
    else:  # cumulative log forget gates, as FoX builds them
        out = {"G": torch.nn.functional.logsigmoid(torch.randn(B, H, Lq, generator=g) + 2).cumsum(-1)}
    if sink:
        out["sink"] = torch.randn(H, generator=g)
    return {n: t.requires_grad_(True) for n, t in out.items()}


def _formula(name, q, k, v, inputs):
    """float64: x = q.k / sqrt(D) + the spec's terms, masked; P and lse over the keys (and the sink)."""
    q, k, v = q.double(), k.double(), v.double()
    x = q @ k.transpose(-1, -2) * D ** -0.5
    Lq, Lk = x.shape[-2:]
    if name == "hb":
        x = x + inputs["hb"].double()[None, :, None, None]
    elif name == "qb":
        x = x + inputs["qb"].double()[..., None]
    else:
        G = inputs["G"].double()
        x = x + G[..., :, None] - G[..., None, :Lk]
        keep = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None]
        x = x.masked_fill(~keep, float("-inf"))
    if "sink" in inputs:
        x = torch.cat([x, inputs["sink"].double()[None, :, None, None].expand(B, H, Lq, 1)], -1)
    lse = torch.logsumexp(x, -1)
    p = torch.exp(x - lse[..., None])[..., :Lk]
    return p @ v, lse


def _problem(name, sink, Lq=L, Lk=L, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g).requires_grad_(True) for n in (Lq, Lk, Lk))
    return q, k, v, _inputs(name, sink, Lq, Lk, g), g


def _close(what, got, want, tol=2e-4):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.double() - want).abs().max().item()
    assert err <= tol * max(want.abs().max().item(), 1.0), f"{what}: max error {err:.3g}"


def _close_with_grads(got, want, seeds, q, k, v, inputs):
    """o and lse, then the gradients of a loss reading both (seeds: dO and dLSE) for q, k, v and every
    input, against the float64 formula's."""
    (o, lse), (want_o, want_lse), (do, dlse) = got, want, seeds
    _close("o", o, want_o.detach())
    _close("lse", lse, want_lse.detach())
    leaves = [q, k, v, *inputs.values()]
    grads = torch.autograd.grad((o * do).sum() + (lse * dlse).sum(), leaves)
    wants = torch.autograd.grad((want_o * do.double()).sum() + (want_lse * dlse.double()).sum(), leaves)
    for n, a, b in zip(["q", "k", "v", *inputs], grads, wants):
        _close(f"d{n}", a, b)


@pytest.mark.parametrize("sink", [False, True])
@pytest.mark.parametrize("name", ["hb", "qb", "fox"])
@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_outputs_lse_and_grads_match_the_formula(tmp_path, name, sink, path):
    attn = _load(tmp_path, name, sink)
    q, k, v, inputs, g = _problem(name, sink)
    do, dlse = torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, generator=g)
    fn = attn if path == "kernel" else attn.reference
    with launch.count_visits() as log:
        o, lse = fn(q, k, v, return_lse=True, **inputs)
    assert bool(log) == (path == "kernel"), "the kernels ran" if log else "the kernels did not run"
    want_o, want_lse = _formula(name, q, k, v, inputs)
    _close_with_grads((o, lse), (want_o, want_lse), (do, dlse), q, k, v, inputs)


def test_row_constant_grad_with_a_sink_is_not_doubled(tmp_path):
    """The issue's repro: d(qb) from the kernels was exactly twice the float64 one (no lse in the loss)."""
    attn = _load(tmp_path, "qb", True)
    q, k, v, inputs, g = _problem("qb", True, seed=3)
    do = torch.randn(B, H, L, D, generator=g)
    got = torch.autograd.grad((attn(q, k, v, **inputs) * do).sum(), inputs["qb"])[0]
    want = torch.autograd.grad((_formula("qb", q, k, v, inputs)[0] * do.double()).sum(), inputs["qb"])[0]
    ratio = (got.double() * want).sum() / (want * want).sum()
    assert abs(ratio.item() - 1) < 1e-3, f"kernel / exact d(qb) = {ratio.item():.4f}"
    _close("dqb", got, want)


@pytest.mark.parametrize("name", ["hb", "qb"])
def test_lse_merge_of_two_key_halves_is_the_full_call(tmp_path, name):
    """Keys split in two: the halves' (o, lse) merged by log-sum-exp equal the full call. With a sink it
    joins one part only: the first half runs the sink spec, the second the same score without it."""
    with_sink, without = _load(tmp_path, name, True), _load(tmp_path, name, False)
    q, k, v, inputs, _ = _problem(name, True)
    full_o, full_lse = with_sink(q, k, v, return_lse=True, **inputs)
    rest = {n: t for n, t in inputs.items() if n != "sink"}
    o1, lse1 = with_sink(q, k[:, :, :10], v[:, :, :10], return_lse=True, **inputs)
    o2, lse2 = without(q, k[:, :, 10:], v[:, :, 10:], return_lse=True, **rest)
    lse = torch.logaddexp(lse1, lse2)
    o = torch.exp(lse1 - lse)[..., None] * o1 + torch.exp(lse2 - lse)[..., None] * o2
    want_o, want_lse = _formula(name, q, k, v, inputs)
    _close("merged lse", lse, want_lse.detach())
    _close("full lse", full_lse, want_lse.detach())
    _close("merged o", o, want_o.detach())
    _close("full o", full_o, want_o.detach())


@pytest.mark.parametrize("sink", [False, True])
def test_decode_lse_is_of_the_score_as_written(tmp_path, sink):
    attn = _load(tmp_path, "fox", sink)
    lnew, lengths = 2, torch.tensor([L], dtype=torch.int32)
    q, k, v, inputs, _ = _problem("fox", sink)
    with launch.count_visits() as log:
        o, lse = attn.decode(q[:, :, -lnew:].detach(), k.detach(), v.detach(), lengths, return_lse=True,
                             **{n: t.detach() for n, t in inputs.items()})
    assert log, "the decode kernel did not run"
    want_o, want_lse = _formula("fox", q, k, v, inputs)
    _close("o", o, want_o[:, :, -lnew:].detach())
    _close("lse", lse, want_lse[:, :, -lnew:].detach())


def test_fox_with_sink_varlen(tmp_path):
    """attn.varlen of FoX with a sink: per sequence, o and every gradient against the formula."""
    attn = _load(tmp_path, "fox", True)
    lens = [7, 13]
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(sum(lens), H, D, generator=g).requires_grad_(True) for _ in range(3))
    G = torch.nn.functional.logsigmoid(torch.randn(len(lens), H, max(lens), generator=g) + 2).cumsum(-1)
    G.requires_grad_(True)
    sink = torch.randn(H, generator=g).requires_grad_(True)
    cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32)
    do = torch.randn(sum(lens), H, D, generator=g)
    o = attn.varlen(q, k, v, cu, cu, max(lens), max(lens), G=G, sink=sink)
    got = torch.autograd.grad((o * do).sum(), [q, k, v, G, sink])
    loss = 0
    for i, n in enumerate(lens):
        rows = slice(int(cu[i]), int(cu[i + 1]))
        seq = [x[rows].transpose(0, 1)[None] for x in (q, k, v)]
        want_o, _ = _formula("fox", *seq, {"G": G[i:i + 1, :, :n], "sink": sink})
        loss = loss + (want_o[0].transpose(0, 1) * do[rows].double()).sum()
        _close(f"o of sequence {i}", o[rows], want_o[0].transpose(0, 1).detach())
    want = torch.autograd.grad(loss, [q, k, v, G, sink])
    for n, a, b in zip(["q", "k", "v", "G", "sink"], got, want):
        _close(f"d{n}", a, b)


def test_fla_naive_forgetting_attention_agrees(tmp_path):
    """A second check of the kernels against fla's naive reference, where flash-linear-attention is
    installed (fla layout [B, T, H, D], per-step log forget gates)."""
    naive = pytest.importorskip("fla.ops.forgetting_attn.naive")
    attn = _load(tmp_path, "fox", False)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, L, H, D, generator=g) for _ in range(3))
    logf = torch.nn.functional.logsigmoid(torch.randn(B, L, H, generator=g) + 2)
    want = naive.naive_forgetting_attn(q.double(), k.double(), v.double(), logf.double())
    got = attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), G=logf.cumsum(1).transpose(1, 2))
    _close("o", got.transpose(1, 2), want.double())


def test_learnable_terms_inside_a_scaled_softmax(tmp_path):
    """`softmax(2 * score, sink=...)`: a read's gradient goes through the softmax's argument, not the
    score line (a key bias got half its gradient), and the offset 2 * qb[b, h, q] is in the LSE."""
    path = tmp_path / "scaled.attn"
    path.write_text("attention scaled\ninput kb: float[B, Hq, Lk] learnable\ninput qb: float[B, Hq, Lq] learnable\n"
                    "input sink: float[Hq] learnable\nscore s + kb[b, h, kv] + qb[b, h, q]\n"
                    "probs softmax(2 * score, sink=sink[h])\n")
    attn = attnc.load(path)
    q, k, v, _, g = _problem("hb", False, Lq=12, Lk=12)
    inputs = {"kb": torch.randn(B, H, 12, generator=g), "qb": torch.randn(B, H, 12, generator=g),
              "sink": torch.randn(H, generator=g)}
    inputs = {n: t.requires_grad_(True) for n, t in inputs.items()}
    do, dlse = torch.randn(B, H, 12, D, generator=g), torch.randn(B, H, 12, generator=g)
    o, lse = attn(q, k, v, return_lse=True, **inputs)
    x = 2 * (q.double() @ k.double().transpose(-1, -2) * D ** -0.5 + inputs["kb"].double()[..., None, :]
             + inputs["qb"].double()[..., None])
    x = torch.cat([x, inputs["sink"].double()[None, :, None, None].expand(B, H, 12, 1)], -1)
    want_lse = torch.logsumexp(x, -1)
    want_o = torch.exp(x - want_lse[..., None])[..., :12] @ v.double()
    _close_with_grads((o, lse), (want_o, want_lse), (do, dlse), q, k, v, inputs)
