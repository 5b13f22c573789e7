"""attnc.distributed.context_parallel: ring attention over gloo processes on the CPU, outputs and
gradients against the single-process call on the whole sequence."""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import attnc
from attnc.distributed import unshard

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import cp_worker
import formulas

EXAMPLES = TESTS.parent / "examples"
L = 32
WRITTEN = {  # specs of the test's own: a learnable table along the sequence (read at global positions), and
    # a softplus normalization over a document mask, whose `visible` has no closed form (counted per shard)
    "key_bias": "attention key_bias\ninput key_bias: float[Lk] learnable\nmask kv <= q\nscore s + key_bias[kv]\n",
    "doc_softplus": "attention doc_softplus\ninput doc_ids: int[B, L]\nmask doc_ids[b, q] == doc_ids[b, kv] and kv <= q\n"
                    "probs softplus(log(visible) * score) / rowsum(softplus(log(visible) * score))\n",
}
SPECS = ["causal", "sliding_window", "document", "alibi", "streaming_sink", "key_bias", "sink_logit", "sink_softmax1",
         "sigmoid", "relu", "softplus", "softplus_reweight", "doc_softplus"]
MULTILINE = {  # masks over two lines, which a line-by-line text edit of the spec changed (issue 22)
    "or_continuation": ("mask kv >= q\n  or kv == 0\n", lambda i, j: (j >= i) | (j == 0)),
    "and_at_line_end": ("mask kv <= q and\n  q - kv < 5\n", lambda i, j: (j <= i) & (i - j < 5)),
}


REACH = {"causal": None, "key_bias": None, "sliding_window": 2}  # contiguous: the owners a rank reads (None: all earlier)


def _spec_path(name):
    if name in WRITTEN or name in MULTILINE:
        path = Path(tempfile.gettempdir()) / f"attnc-cp-{os.getpid()}" / f"{name}.attn"
        path.parent.mkdir(exist_ok=True)
        path.write_text(WRITTEN[name] if name in WRITTEN else f"attention {name}\n" + MULTILINE[name][0])
        return path
    return EXAMPLES / f"{name}.attn"


@functools.cache
def _ring_results(world, layout, kernels=False, specs=None):
    """One spawn of `world` gloo processes running every spec; {spec: [rank results]}."""
    specs = specs or (*SPECS, *sorted(MULTILINE))
    out = Path(tempfile.mkdtemp(prefix="attnc-cp-"))
    paths = [str(_spec_path(s)) for s in specs]
    mp.spawn(cp_worker.run, args=(world, str(out / "init"), paths, layout, kernels, str(out), L),
             nprocs=world, join=True)
    return {s: [torch.load(out / f"{Path(p).name}.rank{r}.pt") for r in range(world)] for s, p in zip(specs, paths)}


def _single(spec):
    attn = attnc.load(spec)
    q, k, v, g, inputs = cp_worker.make_inputs(attn, L)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    learn = {n: x.clone().requires_grad_() for n, x in inputs.items()
             if isinstance(x, torch.Tensor) and x.dtype.is_floating_point}
    o = attn.reference(q, k, v, **{**inputs, **learn})
    (o * g).sum().backward()
    return {"o": o.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad, **{f"d_{n}": x.grad for n, x in learn.items()}}


def _check(ranks, want, layout, atol=1e-5):
    for key in ("o", "dq", "dk", "dv"):
        got = unshard([r[key] for r in ranks], layout)
        torch.testing.assert_close(got, want[key], atol=atol, rtol=1e-4, msg=key)
    for key in (k for k in want if k.startswith("d_")):  # learnable inputs: all-reduced, equal on every rank
        for r in ranks:
            torch.testing.assert_close(r[key], want[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("world, layout", [(2, "zigzag"), (4, "zigzag"), (4, "contiguous")])
@pytest.mark.parametrize("spec", SPECS)
def test_context_parallel_equals_single_process(spec, world, layout):
    ranks = _ring_results(world, layout)[spec]
    # softplus_reweight's relu(...) ** 3 amplifies float32 rounding: its gradients reach 11, errors 3e-5
    _check(ranks, _single(_spec_path(spec)), layout, atol=1e-4 if spec == "softplus_reweight" else 1e-5)
    if layout == "contiguous" and spec in REACH:  # steps skipped: a causal rank reads no later shard,
        reach = REACH[spec] or world  # a window (5 < the shard) its neighbours only
        for rank, r in enumerate(ranks):
            assert sorted(r["steps"]) == sorted({rank - d for d in range(reach) if rank - d >= 0}), (rank, r["steps"])


def test_context_parallel_kernels_through_the_interpreter():
    specs = ("causal", "sink_logit", "doc_softplus")  # band and list walks, a sink, statistic rings
    ranks = _ring_results(2, "zigzag", kernels=True, specs=specs)
    for spec in specs:
        _check(ranks[spec], _single(_spec_path(spec)), "zigzag")


def test_refusals(tmp_path):
    from attnc.distributed import context_parallel, positions

    rowmax = tmp_path / "rowmax.attn"
    rowmax.write_text("attention rowmax\nmask kv <= q\nprobs relu(score - rowmax(score) + 1) / visible\n")
    with pytest.raises(ValueError, match="a rowmax is not supported"):
        context_parallel(attnc.load(rowmax))
    with pytest.raises(ValueError, match="linear attention"):
        context_parallel(attnc.load(EXAMPLES / "linear_elu.attn"))
    with pytest.raises(ValueError, match="layout must be"):
        positions(0, 2, 4, "striped")
    with pytest.raises(RuntimeError, match="not initialized"):
        context_parallel(attnc.load(EXAMPLES / "causal.attn"))


@pytest.mark.parametrize("case", sorted(MULTILINE))
def test_context_parallel_multiline_mask(case):
    """The ring's shard conditions are ANDed with the whole mask (key 0 of `or kv == 0` is attended
    once, in its owner's step, not in every step): against the single-process call, whose output is
    checked against the float64 formula."""

    _, mask_of = MULTILINE[case]
    spec = _spec_path(case)
    ranks = _ring_results(4, "contiguous")[case]
    want = _single(spec)
    q, k, v, _, _ = cp_worker.make_inputs(attnc.load(spec), L)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    o64, _ = formulas.attention(q.double(), k.double(), v.double(), mask=mask_of(i, j))
    torch.testing.assert_close(want["o"].double(), o64, atol=1e-5, rtol=1e-5)
    for key in ("o", "dq", "dk", "dv"):
        got = unshard([r[key] for r in ranks], "contiguous")
        torch.testing.assert_close(got, want[key], atol=1e-5, rtol=1e-4, msg=key)


def test_per_rank_memory_shrinks_with_the_ranks(tmp_path):
    """Forward and backward of causal attention at L = 8K, zigzag, through the eager path: the peak of
    the memory a rank allocates at 4 ranks is at most a third of the 1-rank figure, and no tensor made
    has an axis longer than the shard (the old ring placed every step on the global length)."""
    L_, B, H, D = 8192, 1, 1, 16
    peaks = {}
    for world in (1, 2, 4):
        out = tmp_path / f"w{world}"
        out.mkdir()
        mp.spawn(cp_worker.memory, args=(world, str(out / "init"), str(EXAMPLES / "causal.attn"), str(out), L_, B, H, D),
                 nprocs=world, join=True)
        ranks = [torch.load(out / f"memory.rank{r}.pt") for r in range(world)]
        for r in ranks:
            assert r["longest"] <= r["shard"], (world, r)
        peaks[world] = max(r["peak"] for r in ranks)
    print({w: f"{p / 2**20:.1f} MiB" for w, p in peaks.items()})
    assert peaks[2] < peaks[1]
    assert peaks[4] <= peaks[1] / 3, peaks


def test_a_one_dimensional_device_mesh_is_a_group(tmp_path):
    mp.spawn(cp_worker.mesh, args=(str(tmp_path / "init"), str(EXAMPLES / "causal.attn"), str(tmp_path), L), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"mesh.rank{r}.pt") for r in range(2)]
    want = _single(EXAMPLES / "causal.attn")
    torch.testing.assert_close(unshard([g["o"] for g in got], "zigzag"), want["o"], atol=1e-5, rtol=1e-4)
    assert all("must be 1-D" in g["refusal"] for g in got)
