"""attnc.distributed.context_parallel: ring attention over gloo processes on the CPU, outputs and
gradients against the single-process call on the whole sequence."""

from __future__ import annotations

import sys
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


def _run(tmp_path, spec, world, layout, kernels=False):
    mp.spawn(cp_worker.run, args=(world, str(tmp_path / "init"), str(EXAMPLES / spec), layout, kernels,
                                  str(tmp_path), L), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _single(spec):
    attn = attnc.load(EXAMPLES / spec)
    q, k, v, g, inputs = cp_worker.make_inputs(attn, L)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    learn = {n: x.clone().requires_grad_() for n, x in inputs.items()
             if isinstance(x, torch.Tensor) and x.dtype.is_floating_point}
    o = attn.reference(q, k, v, **{**inputs, **learn})
    (o * g).sum().backward()
    return {"o": o.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad, **{f"d_{n}": x.grad for n, x in learn.items()}}


@pytest.mark.parametrize("spec, world, layout", [
    ("causal.attn", 2, "zigzag"),
    ("causal.attn", 4, "zigzag"),
    ("sliding_window.attn", 4, "contiguous"),
    ("document.attn", 2, "zigzag"),
    ("alibi.attn", 2, "zigzag"),
    ("alibi.attn", 2, "contiguous"),
])
def test_context_parallel_equals_single_process(tmp_path, spec, world, layout):
    ranks = _run(tmp_path, spec, world, layout)
    want = _single(spec)
    for key in ("o", "dq", "dk", "dv"):
        got = unshard([r[key] for r in ranks], layout)
        torch.testing.assert_close(got, want[key], atol=1e-5, rtol=1e-4, msg=key)
    if layout == "contiguous":  # steps skipped: a causal rank reads no later shard, a window its neighbours only
        reach = {"causal.attn": range(world), "sliding_window.attn": range(2), "alibi.attn": range(world)}[spec]
        for rank, r in enumerate(ranks):
            assert sorted(r["steps"]) == sorted({rank - d for d in reach if rank - d >= 0}), (rank, r["steps"])
    for key in (k for k in want if k.startswith("d_")):  # learnable inputs: all-reduced, equal on every rank
        for r in ranks:
            torch.testing.assert_close(r[key], want[key], atol=1e-5, rtol=1e-4, msg=key)


def test_context_parallel_kernels_through_the_interpreter(tmp_path):
    ranks = _run(tmp_path, "causal.attn", 2, "zigzag", kernels=True)
    want = _single("causal.attn")
    for key in ("o", "dq", "dk", "dv"):
        torch.testing.assert_close(unshard([r[key] for r in ranks], "zigzag"), want[key], atol=1e-4, rtol=1e-3)


def test_refusals():
    from attnc.distributed import context_parallel, positions

    with pytest.raises(ValueError, match="not a softmax"):
        context_parallel(attnc.load(EXAMPLES / "softplus.attn"))
    with pytest.raises(ValueError, match="layout must be"):
        positions(0, 2, 4, "striped")
    with pytest.raises(RuntimeError, match="not initialized"):
        context_parallel(attnc.load(EXAMPLES / "causal.attn"))


def test_a_sink_is_refused_rather_than_counted_once_per_rank(tmp_path):
    """Each ring step's log-sum-exp includes the sink's logit; merged over P steps it would count P times."""
    from attnc.distributed import context_parallel

    spec = tmp_path / "sinky.attn"
    spec.write_text("attention sinky\ninput sink: float[Hq]\nmask kv <= q\nprobs softmax(score, sink=sink[h])\n")
    with pytest.raises(ValueError, match="softmax sink"):
        context_parallel(attnc.load(spec))


MULTILINE = {  # masks over two lines, which a line-by-line text edit of the spec changed (issue 22)
    "or_continuation": ("mask kv >= q\n  or kv == 0\n", lambda i, j: (j >= i) | (j == 0)),
    "and_at_line_end": ("mask kv <= q and\n  q - kv < 5\n", lambda i, j: (j <= i) & (i - j < 5)),
}


@pytest.mark.parametrize("case", sorted(MULTILINE))
def test_context_parallel_multiline_mask(tmp_path, case):
    """The ring's shard conditions are ANDed with the whole mask (key 0 of `or kv == 0` is attended
    once, in its owner's step, not in every step): against the single-process call, whose output is
    checked against the float64 formula."""

    text, mask_of = MULTILINE[case]
    spec = tmp_path / f"{case}.attn"
    spec.write_text(f"attention {case}\n" + text)
    ranks = _run(tmp_path, spec, 2, "contiguous")
    want = _single(spec)
    q, k, v, _, _ = cp_worker.make_inputs(attnc.load(spec), L)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    o64, _ = formulas.attention(q.double(), k.double(), v.double(), mask=mask_of(i, j))
    torch.testing.assert_close(want["o"].double(), o64, atol=1e-5, rtol=1e-5)
    for key in ("o", "dq", "dk", "dv"):
        got = unshard([r[key] for r in ranks], "contiguous")
        torch.testing.assert_close(got, want[key], atol=1e-5, rtol=1e-4, msg=key)
