"""Domains of params and inputs (issue 22, item 7): `param cap = 50.0 where cap > 0` and
`input decay: float[Hq] where decay > 0 and decay <= 1` are checked at every call, by the kernels'
entry points, the reference and decode alike: a ValueError naming the argument and the condition,
never an all-NaN output. Float params also refuse inf and values beyond float32 (the kernels' type).
Values inside the domain still run, and match float64 formulas written here."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import attnc
from attnc.runtime import launch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import relerr, run_cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _qkv(L=20, H=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, H, L, D, generator=g) for _ in range(3))


def _scores(q, k):
    return q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])


# ---- softcap: cap > 0, finite, within float32 ----
@pytest.mark.parametrize("cap,message", [
    (0.0, "violates 'where cap > 0': got 0.0"),
    (-1.0, "violates 'where cap > 0': got -1.0"),
    (math.inf, "is inf; float parameters must be finite"),
    (-math.inf, "is -inf; float parameters must be finite"),
    (math.nan, "is NaN"),
    (1e39, "beyond float32's range"),
])
@pytest.mark.parametrize("entry", ["kernels", "reference", "decode"])
def test_softcap_refuses_caps_outside_its_domain(cap, message, entry):
    attn = attnc.load(EXAMPLES / "softcap.attn")
    q, k, v = _qkv()
    call = {"kernels": lambda: attn(q, k, v, cap=cap), "reference": lambda: attn.reference(q, k, v, cap=cap),
            "decode": lambda: attn.decode(q[:, :, :1], k, v, torch.tensor([20], dtype=torch.int32), cap=cap)}
    with pytest.raises(ValueError) as info:
        call[entry]()
    assert str(info.value).startswith("softcap: argument 'cap': ") and message in str(info.value)


def test_softcap_inside_its_domain_matches_float64():
    attn = attnc.load(EXAMPLES / "softcap.attn")
    q, k, v = _qkv()
    cap = 1e-3  # tiny but positive: allowed
    with launch.count_visits() as log:
        o = attn(q, k, v, cap=cap)
    assert log, "the kernels did not run"
    s = cap * torch.tanh(_scores(q, k) / cap)
    causal = torch.arange(20)[None, :] <= torch.arange(20)[:, None]
    want = torch.softmax(s.masked_fill(~causal, -math.inf), -1) @ v.double()
    assert relerr(o, want) <= 1e-5


# ---- lightning: every decay[h] in (0, 1] ----
@pytest.mark.parametrize("decay,bad", [([0.5, 0.0], 0.0), ([-0.5, 0.9], -0.5), ([0.9, 1.5], 1.5)])
@pytest.mark.parametrize("entry", ["kernels", "reference"])
def test_lightning_refuses_decays_outside_its_domain(decay, bad, entry):
    attn = attnc.load(EXAMPLES / "lightning.attn")
    q, k, v = _qkv()
    fn = attn if entry == "kernels" else attn.reference
    with pytest.raises(ValueError) as info:
        fn(q, k, v, decay=torch.tensor(decay))
    msg = str(info.value)
    assert msg.startswith("lightning: argument 'decay': violates 'where decay > 0 and decay <= 1'"), msg
    assert f"1 element does not, e.g. {bad}" in msg


def test_lightning_at_the_domain_edge_matches_float64():
    """decay = 1 (no decay) is allowed: W = decay^(q - kv) * s over the causal keys, unnormalized."""
    attn = attnc.load(EXAMPLES / "lightning.attn")
    q, k, v = _qkv()
    decay = torch.tensor([1.0, 0.7])
    o = attn(q, k, v, decay=decay)
    i, j = torch.arange(20)[:, None], torch.arange(20)[None, :]
    w = decay.double().view(1, 2, 1, 1) ** (i - j).clamp(min=0) * _scores(q, k) * (j <= i)
    assert relerr(o, w @ v.double()) <= 1e-5


# ---- the language: what a condition may say ----
def test_int_param_domain_and_tensor_domain_inline(tmp_path):
    path = tmp_path / "windowed.attn"
    path.write_text("attention windowed\nparam window = 4 where window >= 1\n"
                    "input bias: float[Hq] where bias <= 0\nmask kv <= q and q - kv < window\nscore s + bias[h]\n")
    attn = attnc.load(path)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"windowed: argument 'window': violates 'where window >= 1': got 0"):
        attn(q, k, v, window=0, bias=torch.zeros(2))
    with pytest.raises(ValueError, match=r"argument 'bias': violates 'where bias <= 0': 2 elements do not"):
        attn(q, k, v, bias=torch.tensor([0.5, 0.25]))
    bias = torch.tensor([-0.5, 0.0])
    o = attn(q, k, v, window=3, bias=bias)
    i, j = torch.arange(20)[:, None], torch.arange(20)[None, :]
    s = (_scores(q, k) + bias.double().view(1, 2, 1, 1)).masked_fill(~((j <= i) & (i - j < 3)), -math.inf)
    assert relerr(o, torch.softmax(s, -1) @ v.double()) <= 1e-5


def test_check_accepts_what_build_builds(tmp_path):
    """`attnc check` and `attnc build` agree on specs with conditions: both accept the examples."""
    for name in ("softcap", "lightning"):
        code, out = run_cli("check", EXAMPLES / f"{name}.attn")
        assert code == 0 and ": ok: " in out, out
        code, out = run_cli("build", EXAMPLES / f"{name}.attn", "-o", tmp_path)
        assert code == 0, out
        assert "domains=" in (tmp_path / f"{name}.py").read_text()
    bad = tmp_path / "bad.attn"
    bad.write_text("attention t\nparam cap = -1.0 where cap > 0\n")  # a default outside its condition
    for cmd in ("check", "build"):
        code, out = run_cli(cmd, bad, *(["-o", tmp_path] if cmd == "build" else []))
        assert code == 1 and "2:13: error: the default -1.0" in out, out


def test_verify_draws_inputs_inside_their_domain():
    """verify's random inputs meet the `where` conditions (its default draw, 0.5 + U(0, 1), does not
    for lightning's decay <= 1), so verify exercises the kernels instead of stopping at the check."""
    from attnc import verify
    from attnc.pipeline import compile_file

    variant = compile_file(EXAMPLES / "lightning.attn")
    for seed in range(5):
        drawn = verify.random_inputs(variant, verify.Case(1, 4, 4, 4, 8, 8, 8, 8), torch.Generator().manual_seed(seed))
        assert ((drawn["decay"] > 0) & (drawn["decay"] <= 1)).all()
