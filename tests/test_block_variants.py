"""The IR's derived variants that context parallelism runs (ir.Variant.shifted, rows_given, statistic;
pipeline.sink_free_variant), in one process: a block of queries against blocks of keys, merged, equals
the catalog's float64 formula on the whole problem (tests/formulas.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from attnc.runtime.merge import merge_pair

import attnc
from attnc import build, ir, pipeline
from attnc.distributed import KV_START, Q_START, TOTAL_LK, TOTAL_LQ

sys.path.insert(0, str(Path(__file__).resolve().parent))
import formulas

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
L, ROWS, KEYS = 40, (9, 31), ((0, 13), (13, 29), (29, 40))  # odd blocks: tiles straddle them


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, L, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, L, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, v


def _at(a, name, inputs=None, B=2, Hq=4, Hk=2, Hv=2):
    """The block call's inputs for keys from position a: the whole sequence's defaults, the inputs, the
    blocks' positions."""
    attn = attnc.load(EXAMPLES / f"{name}.attn")
    return {**attn.defaults(L, L, B, Hq, Hk, Hv), **(inputs or {}), Q_START: ROWS[0], KV_START: a, TOTAL_LQ: L,
            TOTAL_LK: L}


FORMULAS = {
    "causal": (formulas.causal, {}),
    "sliding_window": (formulas.sliding_window, {"window": 5}),
    "alibi": (formulas.alibi, {"slopes": torch.linspace(0.1, 1.0, 4, dtype=torch.float64)}),
    "streaming_sink": (formulas.streaming_sink, {"sinks": 2, "window": 6}),
    "sink_logit": (formulas.sink_logit, {"sink": torch.tensor([-1.0, 0.0, 0.5, 2.0], dtype=torch.float64)}),
}


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_a_block_of_the_sequence_sees_global_positions(name):
    """The shifted variant's key blocks, merged by log-sum-exp (a sink added once, after), equal the
    formula's rows ROWS of the whole sequence."""
    formula, inputs = FORMULAS[name]
    q, k, v = _problem()
    want, _ = formula(q, k, v, **inputs)
    text = (EXAMPLES / f"{name}.attn").read_text()
    sink = name == "sink_logit"
    block = build.load_text(text, name, shifted="cp", sink_free=sink)
    qs = q[:, :, ROWS[0]:ROWS[1]]
    o = lse = None
    for a, b in KEYS:
        part = block.reference(qs, k[:, :, a:b], v[:, :, a:b], return_lse=True, **_at(a, name, inputs))
        o, lse = merge_pair(o, lse, *part)
    if sink:
        logits = build.load_text(text, name, shifted="cp").sink_logits(qs, _at(0, name, inputs))
        total = torch.logaddexp(lse, logits)
        o = o * torch.exp(lse - total)[..., None]
    # (merge_pair accumulates in float32, as the ring does)
    torch.testing.assert_close(o.double(), want[:, :, ROWS[0]:ROWS[1]], atol=1e-6, rtol=1e-6)


def test_a_block_runs_through_the_kernels():
    """The same through the Triton kernels (the interpreter): the band bounds read the offsets."""
    q, k, v = (x.float() for x in _problem())
    want, _ = formulas.sliding_window(q.double(), k.double(), v.double(), window=5)
    block = build.load_text((EXAMPLES / "sliding_window.attn").read_text(), "sliding_window", shifted="cp")
    qs = q[:, :, ROWS[0]:ROWS[1]]
    o = lse = None
    for a, b in KEYS:
        part = block(qs, k[:, :, a:b], v[:, :, a:b], return_lse=True, **_at(a, "sliding_window", {"window": 5}))
        o, lse = merge_pair(o, lse, *part)
    torch.testing.assert_close(o.double(), want[:, :, ROWS[0]:ROWS[1]], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["softplus", "softplus_reweight"])
def test_row_statistics_computed_by_key_blocks_then_given(name):
    """Each row statistic as an output (`statistic`, v = 1) summed over the key blocks, the later ones
    reading the earlier as inputs (`rows_given`), then the output given them all: the formula, forward
    and (q's) gradient."""
    q, k, v = _problem()
    q.requires_grad_()
    want = getattr(formulas, name)(q, k, v)
    text = (EXAMPLES / f"{name}.attn").read_text()
    variant = pipeline.block_variant(pipeline.compile_text(text, name), "cp")
    stats = [stat for stat, _ in pipeline.analyse(variant).rows.stats_in_order]
    names = {stat: f"r{i}" for i, stat in enumerate(stats)}
    qs, given = q[:, :, ROWS[0]:ROWS[1]], {}
    ones = v.new_ones((*v.shape[:3], 1))
    for i, stat in enumerate(stats):
        earlier = {s: names[s] for s in stats[:i]}
        inner = stat.xreplace({s: ir.row_input(n) for s, n in earlier.items()})
        f = build.load_variant(variant.rows_given(earlier, f"g{i}").statistic(inner, f"s{i}"), [text, "test", str(i)])
        given[names[stat]] = sum(f.reference(qs, k[:, :, a:b], ones[:, :, a:b], **_at(a, name, given))[..., 0]
                                 for a, b in KEYS)
    out = build.load_variant(variant.rows_given(names, "given"), [text, "test", "out"])
    o = sum(out.reference(qs, k[:, :, a:b], v[:, :, a:b], **_at(a, name, given)) for a, b in KEYS)
    # (float64 throughout; the formula's softplus and the reference's round differently, at 1e-8)
    torch.testing.assert_close(o, want[:, :, ROWS[0]:ROWS[1]], atol=1e-7, rtol=1e-7)
    (dq,) = torch.autograd.grad(o.sum(), q)
    (dq_rows,) = torch.autograd.grad(want[:, :, ROWS[0]:ROWS[1]].sum(), q)  # rows' queries and, through
    # the statistics, none else: a block's gradient reaches only its rows
    torch.testing.assert_close(dq, dq_rows, atol=1e-7, rtol=1e-7)
    assert dq_rows[:, :, ROWS[0]:ROWS[1]].abs().min() > 0


def test_derived_variants_refuse_what_they_cannot_express():
    variant = pipeline.compile_text("attention m\nmask kv <= q\nprobs relu(score - rowmax(score) + 1) / visible\n")
    (stat,) = [s for s in ir.row_stats(variant.probs) if isinstance(s, ir.RowMax)]
    with pytest.raises(ValueError, match="not a sum or a count"):
        variant.statistic(stat, "s")
    spec = pipeline.compile_text("attention n\ninput attnc_q_start: float[Hq]\nscore s + attnc_q_start[h]\n")
    with pytest.raises(ValueError, match="clashes"):
        spec.shifted("cp")
    assert pipeline.sink_free_variant(variant, "x") is variant  # no sink: the spec itself
