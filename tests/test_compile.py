"""torch.compile and torch.export through the generated custom operators (attnc.runtime.ops).

The kernels run through Triton's interpreter (tiny shapes); compiled outputs and gradients are compared
with the uncompiled call and with the eager reference, and graph breaks are counted by dynamo."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from attnc.build import import_module_from, load

ROOT = Path(__file__).resolve().parent.parent
B, H, L, D = 1, 2, 16, 16

CASES = {
    # spec: (inputs, gradients wanted of these inputs)
    "causal": (dict, ()),
    "alibi": (lambda: {"slopes": torch.rand(H, requires_grad=True)}, ("slopes",)),  # a learnable input
    "document": (lambda: {"doc_ids": torch.tensor([[0] * 6 + [1] * 10])}, ()),  # a tile plan (lists walk)
    "sliding_window": (lambda: {"window": 5}, ()),  # a scalar parameter in the op's schema
    "softplus": (dict, ()),  # the general family (row statistics instead of a log-sum-exp)
}


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read at launch time: the ops run the kernels
    torch._dynamo.reset()


def _qkv(seed=0):
    torch.manual_seed(seed)
    return [torch.randn(B, H, L, D, requires_grad=True) for _ in range(3)]


def _grads(out, leaves):
    return torch.autograd.grad(out.square().sum(), leaves)


def _close(a, b, tol=1e-5):
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("spec", sorted(CASES))
def test_compiled_fullgraph_equals_eager(spec):
    make_inputs, grad_inputs = CASES[spec]
    _check_compiled(load(ROOT / "examples" / f"{spec}.attn"), make_inputs(), grad_inputs)


def test_compiled_learnable_table(tmp_path):
    """A learnable table read per (query, key) pair: its gradient is a scatter-sum in the backward op."""
    path = tmp_path / "rel_table.attn"
    path.write_text("attention rel_table\nconst R = 3\ninput rel: float[Hq, 2 * R + 1] learnable\n"
                    "input kb: float[Lk] learnable\nmask kv <= q\nscore s + rel[h, q - kv + R] + kb[kv]\n")
    inputs = {"rel": torch.randn(H, 7, requires_grad=True), "kb": torch.randn(L, requires_grad=True)}
    _check_compiled(load(path), inputs, ("rel", "kb"))


def _check_compiled(attn, inputs, grad_inputs):
    q, k, v = _qkv()
    leaves = [q, k, v, *(inputs[n] for n in grad_inputs)]

    def fn(q, k, v, inputs):
        return attn(q, k, v, **inputs) * 2.0

    explained = torch._dynamo.explain(fn)(q, k, v, inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    eager = fn(q, k, v, inputs)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, inputs)
    reference = attn.reference(q, k, v, **inputs) * 2.0
    _close(compiled, eager, 0)
    _close(compiled, reference)
    for got, eager_grad, ref_grad in zip(_grads(compiled, leaves), _grads(eager, leaves), _grads(reference, leaves)):
        _close(got, eager_grad, 0)
        _close(got, ref_grad, 1e-4)


def test_compiled_lse_and_its_gradient():
    attn = load(ROOT / "examples" / "causal.attn")
    q, k, v = _qkv(1)

    def fn(q, k, v):
        o, lse = attn(q, k, v, return_lse=True)
        return o.sum() + lse.square().sum()  # the lse's gradient enters the backward op

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    ref_o, ref_lse = attn.reference(q, k, v, return_lse=True)
    ref = ref_o.sum() + ref_lse.square().sum()
    got = compiled(q, k, v)
    _close(got, ref, 1e-4)
    for a, b in zip(torch.autograd.grad(got, [q, k, v]), torch.autograd.grad(ref, [q, k, v])):
        _close(a, b, 1e-4)


def test_graph_holds_the_custom_op():
    attn = load(ROOT / "examples" / "alibi.attn")
    q, k, v = _qkv()
    slopes = torch.rand(H)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(lambda q, k, v: attn(q, k, v, slopes=slopes), fullgraph=True, backend=backend)(q, k, v)
    (gm,) = graphs
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert any(t.startswith("attnc.alibi_") for t in targets), targets


@pytest.mark.parametrize("spec", ["alibi", "document", "softplus"])
def test_export_round_trip(spec):
    attn = load(ROOT / "examples" / f"{spec}.attn")
    make_inputs, _ = CASES[spec]
    inputs = {name: x.detach() for name, x in make_inputs().items()}

    class Model(torch.nn.Module):
        def forward(self, q, k, v):
            return attn(q, k, v, **inputs)

    q, k, v = (x.detach() for x in _qkv(2))
    program = torch.export.export(Model(), (q, k, v))
    ops = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert any(t.startswith(f"attnc.{spec}_") for t in ops), ops
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    _close(loaded.module()(q, k, v), attn.reference(q, k, v, **inputs))


def test_opcheck_fake_and_autograd_registrations():
    """torch.library.opcheck: schema, fake (meta) implementation and autograd registration agree with
    the real kernels."""
    attn = load(ROOT / "examples" / "alibi.attn")
    module = __import__("sys").modules[attn.__module__]
    q, k, v = _qkv(3)
    slopes = torch.rand(H, requires_grad=True)
    torch.library.opcheck(module._op, (q, k, v, 0.25, slopes),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_registration_is_idempotent_across_imports(tmp_path):
    """The same module imported twice (under two names) shares one op; the last import serves it."""
    attn = load(ROOT / "examples" / "causal.attn")
    path = Path(__import__("sys").modules[attn.__module__].__file__)
    copy = tmp_path / "causal_copy.py"
    copy.write_text(path.read_text())
    again = import_module_from(copy, "attnc_test_reimport.causal_copy")
    first = __import__("sys").modules[attn.__module__]
    assert again._op is first._op and again._op_bwd is first._op_bwd
    q, k, v = _qkv(4)
    _close(again.causal(q, k, v), attn.reference(q, k, v))
    _close(attn(q, k, v), attn.reference(q, k, v))


def test_reference_path_compiles_without_graph_breaks(monkeypatch):
    """CPU tensors without the interpreter run the eager reference: dynamo traces it (no op needed)."""
    monkeypatch.delenv("TRITON_INTERPRET")
    attn = load(ROOT / "examples" / "alibi.attn")
    q, k, v = _qkv(5)
    slopes = torch.rand(H, requires_grad=True)

    def fn(q, k, v, slopes):
        return attn(q, k, v, slopes=slopes)

    explained = torch._dynamo.explain(fn)(q, k, v, slopes)
    assert explained.graph_break_count == 0, explained.break_reasons
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, slopes)
    want = attn.reference(q, k, v, slopes=slopes)
    _close(got, want)
    for a, b in zip(_grads(got, [q, k, v, slopes]), _grads(want, [q, k, v, slopes])):
        _close(a, b, 1e-4)


def test_inductor_compiles_around_the_op():
    """The default backend (inductor) keeps the op as an extern call."""
    attn = load(ROOT / "examples" / "causal.attn")
    q, k, v = _qkv(6)
    got = torch.compile(lambda q, k, v: attn(q, k, v) + 1.0, fullgraph=True)(q, k, v)
    want = attn.reference(q, k, v) + 1.0
    _close(got, want)
    for a, b in zip(_grads(got, [q, k, v]), _grads(want, [q, k, v])):
        _close(a, b, 1e-4)
