"""Generated modules: what they import, how they are cached, how they dispatch, and the reference's
own gradients (float64 gradcheck)."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attnc
from attnc.build import build_source, cache_key, load_text
from attnc.pipeline import compile_text, generate_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
import formulas

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.attn")), ids=lambda p: p.stem)
def test_generated_module_imports_only_torch_triton_and_runtime(path):
    source = build_source(path)
    tree = ast.parse(source)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    allowed = {"collections", "math", "os", "torch", "triton", "triton.language"}
    assert {m for m in imported if not m.startswith("attnc.runtime")} <= allowed, imported
    assert "attnc.runtime" in imported


def test_spec_text_cannot_inject_code():
    # a name that is valid in the language but would shadow generated names is prefixed in kernels
    variant = compile_text("attention inject\nparam o = 3\ninput lse: float[Hq] learnable\n"
                           "mask kv <= q and q - kv < o\nscore s + lse[h]\n")
    source = generate_module(variant)
    compile(source, "<test>", "exec")
    assert "o_," in source and "lse_ptr" in source


def _qkv(B=1, Hq=2, Hk=2, Hv=2, Lq=11, Lk=11, D=8, Dv=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hk, Lk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hv, Lk, Dv, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("name,inputs", [
    ("alibi", {"slopes": torch.rand(2, dtype=torch.float64) + 0.1}),
    ("softcap", {"cap": 2.0}),
    ("sink_logit", {"sink": torch.randn(2, dtype=torch.float64)}),
    ("softplus", {}),
    ("softplus_reweight", {"tau": 0.5}),
    ("sigmoid", {}),
])
def test_reference_gradcheck_float64(name, inputs):
    attn = attnc.load(EXAMPLES / f"{name}.attn")
    q, k, v = (x.requires_grad_() for x in _qkv(Lq=7, Lk=7, D=4, Dv=3))
    learn = {n: x.clone().requires_grad_() for n, x in inputs.items() if isinstance(x, torch.Tensor)}
    fixed = {n: x for n, x in inputs.items() if not isinstance(x, torch.Tensor)}
    names = list(learn)

    def fn(q, k, v, *tensors):
        return attn.reference(q, k, v, **fixed, **dict(zip(names, tensors)))

    assert torch.autograd.gradcheck(fn, (q, k, v, *learn.values()), eps=1e-6, atol=1e-5)


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    attn = attnc.load(EXAMPLES / "causal.attn")
    q, k, v = _qkv(dtype=torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from attnc.runtime import launch

    assert not launch.use_kernels(q)
    torch.testing.assert_close(attn(q, k, v), attn.reference(q, k, v))


def test_float64_inputs_use_the_reference_even_when_interpreting():
    from attnc.runtime import launch

    assert not launch.use_kernels(torch.zeros(1, dtype=torch.float64))


def test_return_lse_on_a_variant_without_one_is_a_clear_error():
    attn = attnc.load(EXAMPLES / "sigmoid.attn")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="sigmoid: argument 'return_lse'.*no log-sum-exp"):
        attn(q, k, v, return_lse=True)


def test_cache_key_depends_on_the_spec_text():
    assert cache_key("attention a\n") != cache_key("attention a\n# changed\n")
    assert cache_key("attention a\n") == cache_key("attention a\n")


def test_and_mask_variants_are_cached_apart(tmp_path, monkeypatch):
    """Variants differing only in their extra mask inputs (ir.Variant.and_mask) get their own modules, and
    each ANDs its input at its index (float64 formula: causal mask and the extra mask)."""
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    text = "attention extra\nmask kv <= q\n"
    at_kv = load_text(text, and_mask=("m", [("m_in", "Lk", "kv")]))
    at_q = load_text(text, and_mask=("m", [("m_in", "Lq", "q")]))
    assert at_kv is not at_q and len(list(tmp_path.glob("extra_m_*.py"))) == 2
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    m = torch.tensor([[True, False, True, True, False, True]])
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    for attn, extra in ((at_kv, m[:, None, None, :]), (at_q, m[:, None, :, None])):
        want, _ = formulas.attention(q.double(), k.double(), v.double(), mask=(j <= i) & extra)
        torch.testing.assert_close(attn(q, k, v, m_in=m).double(), want, atol=1e-5, rtol=1e-5)


def test_two_processes_building_the_same_spec_at_once(tmp_path):
    spec = tmp_path / "window7.attn"
    spec.write_text("attention window7\nmask kv <= q and q - kv < 7\n")
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import os, torch
        os.environ["ATTNC_CACHE_DIR"] = {str(cache)!r}
        import attnc
        attn = attnc.load({str(spec)!r})
        q = torch.randn(1, 1, 9, 4, dtype=torch.float64)
        o = attn(q, q, q)
        print(float(o.sum()))
    """)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    modules = list(cache.glob("window7_*.py"))
    assert len(modules) == 1
    assert not list(cache.glob(".*.tmp"))
    compile(modules[0].read_text(), str(modules[0]), "exec")


def test_learnable_reads_of_every_kind_check_and_build():
    """check accepts exactly what build builds: learnable inputs read per key, per (query, key) pair,
    at an index expression (a table) and at several places all get gradient buffers."""
    specs = {
        "per_key": ("input bias: float[Lk] learnable\nscore s + bias[kv]", "scatter.direct(d_bias_0, (3,))"),
        "table": ("const R = 40\ninput rel: float[Hq, 2 * R + 1] learnable\nscore s + rel[h, q - kv + R]",
                  "scatter.scatter(d_rel_0, rel_.shape, (1, 2, 3), "),  # 81 entries: kept per pair
        "small_table": ("const R = 2\ninput rel: float[Hq, 2 * R + 1] learnable\nscore s + rel[h, q - kv + R]",
                        "scatter.table_grad(d_rel_0, (1,), rel_.shape)"),  # 5 entries: summed by dQ
        "two_reads": ("input pos: float[L] learnable\nscore s + pos[q] - pos[kv]",
                      "scatter.direct(d_pos_0, (3,)) + scatter.direct(d_pos_1, (2,))"),
        "row_table": ("input w: float[4] learnable\nscore s * w[q % 4]",
                      "scatter.scatter(d_w_0, w_.shape, (2,), "),
    }
    for name, (body, host) in specs.items():
        source = generate_module(compile_text(f"attention {name}\n{body}\n"))
        assert host.replace(" ", "") in "".join(source.split()), name  # long lines are wrapped
        # reads per key are summed by dK/dV; only reads per (query, key) pair need a pair buffer
        assert ("torch.zeros((B, Hq, Lq, Lk)" in source) == (name == "table"), name
        assert ("torch.zeros((B, Hq, 1, Lk)" in source) == (name in ("per_key", "two_reads")), name
