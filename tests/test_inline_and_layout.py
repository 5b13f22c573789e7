"""Issue 22, friction items: specs compiled from text (`attnc.compile`) and FlashAttention's [B, L, H, D]
layout (`layout="bshd"`), forward and backward against float64 formulas (tests/formulas.py); more key or
value heads than query heads are refused, and [B, L, H, D] tensors passed as [B, H, L, D] get a hint."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import math
import re
import sys
from pathlib import Path

import pytest
import torch
from attnc.runtime import launch

import attnc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import formulas as F

CAUSAL = "# inline\nattention causal\nmask kv <= q\n"


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(what, got, ref, tol=2e-3):
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got.double() - ref).abs().max().item()
    assert err <= tol * max(ref.abs().max().item(), 1e-3), f"{what}: max error {err:.3g}"


# ---- attnc.compile ----------------------------------------------------------------------------------
def test_compile_from_text_equals_the_file_build(tmp_path):
    path = tmp_path / "causal.attn"
    path.write_text(CAUSAL)
    from_file = attnc.load(path)
    from_text = attnc.compile(CAUSAL)
    assert from_text is from_file  # one build cache, keyed by the text and the compiler
    q, k, v = (_rand(1, 2, 19, 16, seed=s) for s in range(3))
    with launch.count_visits() as log:
        o = from_text(q, k, v)
    assert log, "the kernels did not run"
    _close("o", o, F.causal(q.double(), k.double(), v.double())[0])
    assert torch.equal(o, from_file(q, k, v))


def test_compile_reports_errors_under_its_name():
    with pytest.raises(attnc.SpecError) as err:
        attnc.compile("attention broken\nmask kv <=\n", name="inline")
    assert "inline:2:" in str(err.value)
    with pytest.raises(TypeError, match="expected the spec as a str"):
        attnc.compile(CAUSAL.encode())


def test_load_given_spec_text_points_to_compile():
    with pytest.raises(ValueError, match=r"looks like spec text.*attnc\.compile"):
        attnc.load("attention x\nmask kv <= q")


# ---- layout="bshd" ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,Lq,Lk", [("causal", 21, 21), ("full", 13, 21)])
def test_bshd_equals_bhsd_transposed_and_the_formula(spec, Lq, Lk):
    attn = attnc.compile(f"attention {spec}\n" + ("mask kv <= q\n" if spec == "causal" else ""))
    B, Hq, Hk, D = 2, 4, 2, 16  # GQA: the head axis is dim 2 in bshd
    q = _rand(B, Lq, Hq, D, seed=0).requires_grad_(True)
    k = _rand(B, Lk, Hk, D, seed=1).requires_grad_(True)
    v = _rand(B, Lk, Hk, D, seed=2).requires_grad_(True)
    with launch.count_visits() as log:
        o = attn(q, k, v, layout="bshd")
    assert log, "the kernels did not run"
    assert o.shape == (B, Lq, Hq, D)
    qd, kd, vd = (x.detach().double().transpose(1, 2).requires_grad_(True) for x in (q, k, v))
    want = getattr(F, spec)(qd, kd, vd)[0]  # [B, H, L, D]
    _close("o", o, want.transpose(1, 2))
    g = _rand(B, Lq, Hq, D, seed=3)
    o.backward(g)
    want.backward(g.double().transpose(1, 2))
    for name, got, ref in (("dq", q.grad, qd.grad), ("dk", k.grad, kd.grad), ("dv", v.grad, vd.grad)):
        _close(name, got, ref.transpose(1, 2))
    bhsd = attn(*(x.detach().transpose(1, 2) for x in (q, k, v)))
    torch.testing.assert_close(o.detach(), bhsd.transpose(1, 2), rtol=1e-5, atol=1e-5)
    # the module and the reference take the same layout
    module_o = attn.Module(layout="bshd")(q.detach(), k.detach(), v.detach())
    torch.testing.assert_close(module_o, o.detach(), rtol=1e-5, atol=1e-5)
    _close("reference", attn.reference(q.detach(), k.detach(), v.detach(), layout="bshd"), want.transpose(1, 2))


def test_bshd_linear_attention_equals_bhsd_transposed():
    attn = attnc.load(Path(__file__).resolve().parents[1] / "examples" / "linear_elu.attn")
    q, k, v = (_rand(1, 20, 2, 16, seed=s) for s in range(3))
    o = attn(q, k, v, layout="bshd")
    assert o.shape == (1, 20, 2, 16)
    want = attn.reference(*(x.double().transpose(1, 2) for x in (q, k, v)))  # the Lq x Lk weights, float64
    _close("o", o, want.transpose(1, 2))


def test_unknown_layout_is_refused():
    attn = attnc.compile(CAUSAL)
    q = _rand(1, 2, 8, 16, seed=0)
    with pytest.raises(ValueError, match=r"argument 'layout': expected 'bhsd'.*'bshd'.*got 'BSHD'"):
        attn(q, q, q, layout="BSHD")


# ---- head counts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["k", "v"])
def test_more_key_or_value_heads_than_query_heads_is_refused(role):
    attn = attnc.compile(CAUSAL)
    q = _rand(1, 2, 8, 16, seed=0)
    wide = _rand(1, 4, 8, 16, seed=1)
    args = (q, wide, q) if role == "k" else (q, q, wide)
    with pytest.raises(ValueError, match=rf"argument '{role}': has 4 heads but q has 2"):
        attn(*args)
    with pytest.raises(ValueError, match=rf"argument '{role}_cache': has 4 heads but q has 2"):
        attn.decode(q[:, :, :1], *args[1:], torch.full((1,), 8, dtype=torch.int32))


def test_bshd_tensors_passed_as_bhsd_get_a_layout_hint():
    attn = attnc.compile(CAUSAL)
    q = _rand(1, 6, 2, 16, seed=0)  # [B, Lq, H, D]
    kv = _rand(1, 9, 2, 16, seed=1)  # [B, Lk, H, D], Lk > Lq: read as 9 key heads on 6 query heads
    with pytest.raises(ValueError, match=r"has 9 heads but q has 6.*pass layout='bshd'"):
        attn(q, kv, kv)
    fixed = attnc.compile("attention fixed\nheads q = 2, k = 2, v = 2\nmask kv <= q\n")
    with pytest.raises(ValueError, match=r"fixes 2 q heads, got 6.*pass layout='bshd'"):
        fixed(q, q, q)
    with pytest.raises(ValueError, match=r"fixes 2 q heads, got 6") as err:  # no hint where it would not help
        fixed(q, kv.transpose(1, 2), kv.transpose(1, 2))
    assert "layout" not in str(err.value)


# ---- the README's T5 spec, compiled from text -------------------------------------------------------
def _t5_bucket(relative_position: int, num_buckets=32, max_distance=128) -> int:
    """T5's bidirectional bucket (Raffel et al.; transformers' T5Attention._relative_position_bucket),
    in float64: relative_position = key - query."""
    num_buckets //= 2
    bucket = num_buckets if relative_position > 0 else 0
    n = abs(relative_position)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return bucket + min(large, num_buckets - 1)


def test_readme_t5_spec_matches_t5s_buckets_forward_and_table_gradient():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    text = re.search(r'attnc\.compile\("""\n(attention t5_relative_bias.*?)"""\)', readme, re.DOTALL).group(1)
    t5 = attnc.compile(text, name="README.md")
    B, H, L, D = 1, 2, 150, 16  # distances past MAXD = 128: the last bucket of each half
    q, k, v = (_rand(B, H, L, D, seed=s).requires_grad_(True) for s in range(3))
    table = (0.5 * _rand(H, 32, seed=3)).requires_grad_(True)
    with launch.count_visits() as log:
        o = t5(q, k, v, t5=table)
    assert log, "the kernels did not run"
    buckets = torch.tensor([[_t5_bucket(j - i) for j in range(L)] for i in range(L)])
    assert buckets.unique().tolist() == [n for n in range(32) if n != 16]  # 16 (key after query by 0) is never read
    td = table.detach().double().requires_grad_(True)
    qd, kd, vd = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    want = F.attention(qd, kd, vd, score_mod=lambda S, *_: S + td[:, buckets][None])[0]
    _close("o", o, want)
    g = _rand(B, H, L, D, seed=4)
    o.backward(g)
    want.backward(g.double())
    for name, got, ref in (("dq", q.grad, qd.grad), ("dk", k.grad, kd.grad), ("dv", v.grad, vd.grad),
                           ("dtable", table.grad, td.grad)):
        _close(name, got, ref)


def test_param_defaults_that_read_the_sizes_are_host_scalars():
    """A param default computed from the sizes (sqrt, exp, log of Lq/Lk) is evaluated on the host at each
    call: the output equals the float64 formula with that value."""
    spec = attnc.compile("attention size_scaled\nparam c = sqrt(Lk) / 4 + exp(-Lq / 8) + log(Lk) / 10\n"
                         "score s * c\n", name="size_scaled")
    q, k, v = _rand(1, 2, 5, 8, seed=3), _rand(1, 2, 9, 8, seed=4), _rand(1, 2, 9, 8, seed=5)
    c = math.sqrt(9) / 4 + math.exp(-5 / 8) + math.log(9) / 10
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(8) * c
    want = torch.softmax(s, -1) @ v.double()
    _close("size-reading default", spec(q, k, v), want)
