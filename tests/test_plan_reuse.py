"""Plans across calls: the plan cache and `plan=` with new parameter values or tensors.

For every catalog spec whose tile plan is a list plan and reads a parameter or a tensor input, two
calls at the same size with different values are each checked against the hand-written formula
(tests/formulas.py), so a plan cached or passed for the first values cannot silently serve the
second; and a `plan=` built for other values, another spec, or another tensor is refused.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from attnc.runtime import launch

import attnc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import formulas as F

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@cache
def load(name):
    return attnc.load(EXAMPLES / f"{name}.attn")


def _mode(fn):
    return sys.modules[fn.__module__].PLAN_MODE


def _qkv(B, H, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, L, 16, generator=g) for _ in range(3))


def _close(o, ref):
    o, ref = o.double(), ref.double()
    return (o - ref).abs().max().item() <= 2e-3 * max(ref.abs().max().item(), 1e-6)


# (spec, length, two sets of inputs, the formula)
L = 48
CASES = {
    "prefix_lm": ([{"prefix": 0}, {"prefix": 40}], F.prefix_lm),
    "dilated_sliding_window": ([{"window": 4, "dilation": 2}, {"window": 40, "dilation": 3}], F.dilated_sliding_window),
    "streaming_sink": ([{"sinks": 0, "window": 8}, {"sinks": 20, "window": 3}], F.streaming_sink),
    "document": ([{"doc_ids": torch.zeros(1, L, dtype=torch.long)},
                  {"doc_ids": (torch.arange(L) // 7)[None]}], F.document),
    "moa": ([{"band": torch.tensor([1, 48])}, {"band": torch.tensor([30, 2])}], F.moa),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_new_values_at_the_same_size_follow_the_formula(name):
    fn = load(name)
    assert _mode(fn) == "lists", f"{name} no longer has a list plan: pick specs that do"
    values, formula = CASES[name]
    B, H = 1, 2
    q, k, v = _qkv(B, H, L)
    for inputs in values:
        with launch.count_visits() as log:
            o = fn(q, k, v, **inputs)
        assert log, "the kernels did not run"
        ref, _ = formula(q.double(), k.double(), v.double(), **inputs)
        assert _close(o, ref), f"{name} with {inputs}"
        # the same with a plan built for these values and passed in
        plan = fn.plan(Lq=L, Lk=L, B=B, Hq=H, **inputs)
        assert _close(fn(q, k, v, plan=plan, **inputs), ref)
    # a plan built for the first values is refused for the second
    first, second = values
    plan = fn.plan(Lq=L, Lk=L, B=B, Hq=H, **first)
    changed = next(n for n in second if not torch.equal(torch.as_tensor(first[n]), torch.as_tensor(second[n])))
    with pytest.raises(ValueError, match=rf"{name}: argument 'plan': built (with|from another) '?{changed}"):
        fn(q, k, v, plan=plan, **second)


def test_plan_for_another_spec_is_refused():
    q, k, v = _qkv(1, 1, L)
    plan = load("prefix_lm").plan(Lq=L, Lk=L, prefix=4)
    with pytest.raises(ValueError, match=r"streaming_sink: argument 'plan': built for spec 'prefix_lm'"):
        load("streaming_sink")(q, k, v, plan=plan)


def test_plan_from_a_modified_tensor_is_refused():
    fn = load("document")
    q, k, v = _qkv(1, 1, L)
    ids = torch.zeros(1, L, dtype=torch.long)
    plan = fn.plan(Lq=L, Lk=L, doc_ids=ids)
    ref, _ = F.document(q.double(), k.double(), v.double(), doc_ids=ids)
    assert _close(fn(q, k, v, doc_ids=ids, plan=plan), ref)  # the very tensor, unchanged: accepted
    with pytest.raises(ValueError, match="built from another 'doc_ids': this call passes a different tensor"):
        fn(q, k, v, doc_ids=ids.clone(), plan=plan)
    ids[0, L // 2:] = 1  # in place: the plan no longer describes the mask
    with pytest.raises(ValueError, match="the same tensor, modified in place since"):
        fn(q, k, v, doc_ids=ids, plan=plan)


def test_plan_without_a_record_is_refused():
    fn = load("document")
    q, k, v = _qkv(1, 1, L)
    ids = torch.zeros(1, L, dtype=torch.long)
    plan = fn.plan(Lq=L, Lk=L, doc_ids=ids)
    plan.built_for = None
    with pytest.raises(ValueError, match="does not record what it was built for"):
        fn(q, k, v, doc_ids=ids, plan=plan)


def test_plan_cache_keys_on_every_size_the_mask_reads(tmp_path):
    """A mask reading the size B (not the index b) is planned once per B, not shared across B."""
    spec = tmp_path / "batch_window.attn"
    spec.write_text("attention batch_window\nmask kv <= q and q - kv < 8 * B or kv == 0\n")
    fn = attnc.load(spec)
    for B in (1, 3):
        q, k, v = _qkv(B, 1, L, seed=B)
        i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
        mask = ((j <= i) & (i - j < 8 * B)) | (j == 0)
        ref, _ = F.attention(q.double(), k.double(), v.double(), mask=mask)
        assert _close(fn(q, k, v), ref), f"B={B}"


def test_plan_on_a_device_torch_lacks():
    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    with pytest.raises(ValueError, match=r"causal: argument 'device': 'cuda' requested, but this torch has no usable CUDA"):
        load("causal").plan(Lq=8, Lk=8, device="cuda")
    with pytest.raises(ValueError, match=r"argument 'device': expected a torch device"):
        load("causal").mask(Lq=8, Lk=8, device="gpu0")
