"""`dot(qr[b, h, q], kr[b, kv])`: the inner product over a feature axis of a vector read per query and
a vector read per key (DeepSeek MLA's decoupled rotary part). The kernels, forward and backward (dQ, dK,
dV), and the eager reference against a float64 formula written here; lengths that are not tile
multiples, Lq != Lk, B = 2, Hq = 2, causal; key vectors shared across heads; misuse reported at
file:line:col."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnc.errors import SpecError
from attnc.pipeline import compile_text, generate_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spec_helpers import _check as check_kernels
from spec_helpers import _load

D = 16


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _formula(q, k, v, qr, kr, causal, weight, transform=None, Hk=None):
    """Softmax attention in float64: q k^T / sqrt(D) + weight * qr kr^T, causal (kv <= q) if asked."""
    Hq, Lq, Lk = q.shape[1], q.shape[2], k.shape[2]
    rep = Hq // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if kr.dim() == 3:  # [B, Lk, R]: one key vector per position, shared by every head
        kr = kr[:, None]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    d = qr @ kr.transpose(-1, -2)
    s = s + weight * d if transform is None else transform(s, d)
    if causal:
        s = s.masked_fill(torch.arange(Lk)[None, :] > torch.arange(Lq)[:, None], float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def _check(fn, q, k, v, want_fn, **inputs):
    """The kernels (visits counted) against the formula, forward and backward (spec_helpers), and the
    eager reference against it in float64."""
    check_kernels(fn, q, k, v, want_fn, **inputs)
    qd, kd, vd = (x.detach().double() for x in (q, k, v))
    want = want_fn(qd, kd, vd)
    ref = fn.reference(qd, kd, vd, **{n: x.double() if torch.is_tensor(x) else x for n, x in inputs.items()})
    assert (ref - want).abs().max().item() <= 1e-9 * max(want.abs().max().item(), 1e-3)


MLA = """const R = 16
param rscale = 0.25
input qr: float[B, Hq, Lq, R]
input kr: float[B, Lk, R]
mask kv <= q
score s + rscale * dot(qr[b, h, q], kr[b, kv])
"""


@pytest.mark.parametrize("Lq,Lk", [(37, 37), (21, 45)])
def test_shared_key_vectors_causal(tmp_path, Lq, Lk):
    fn = _load(tmp_path, "mla_rope", MLA)
    B, H, R = 2, 2, 16
    q, k, v = _randn(B, H, Lq, D, seed=0), _randn(B, H, Lk, D, seed=1), _randn(B, H, Lk, D, seed=2)
    qr, kr = _randn(B, H, Lq, R, seed=3), _randn(B, Lk, R, seed=4)
    _check(fn, q, k, v, lambda q, k, v: _formula(q, k, v, qr.double(), kr.double(), True, 0.25), qr=qr, kr=kr)


def test_per_head_vectors_param_length_gqa(tmp_path):
    """A feature length that is an int param (BLOCK_R a constexpr of the launch), not a power of two,
    key vectors per query head (GQA: Hk = 1), the vectors written in the other order, no mask."""
    fn = _load(tmp_path, "rope_param", """param R = 5
input qr: float[B, Hq, Lq, R]
input kr: float[B, Hq, Lk, R]
score s - dot(kr[b, h, kv], qr[b, h, q]) / 2
""")
    B, H, Lq, Lk, R = 2, 2, 19, 33, 5
    q, k, v = _randn(B, H, Lq, D, seed=0), _randn(B, 1, Lk, D, seed=1), _randn(B, 1, Lk, D, seed=2)
    qr, kr = _randn(B, H, Lq, R, seed=3), _randn(B, H, Lk, R, seed=4)
    _check(fn, q, k, v, lambda q, k, v: _formula(q, k, v, qr.double(), kr.double(), False, -0.5),
           qr=qr, kr=kr, R=R)


def test_transformed_score_general_probs(tmp_path):
    """The dot inside a nonlinear score (dS/ds depends on it) and a general normalization (sigmoid)."""
    fn = _load(tmp_path, "rope_tanh", """const R = 8
input qr: float[B, Hq, Lq, R]
input kr: float[B, Lk, R]
mask kv <= q
score 4 * tanh((s + dot(qr[b, h, q], kr[b, kv])) / 4)
""")
    B, H, Lq, Lk, R = 2, 2, 23, 23, 8
    q, k, v = _randn(B, H, Lq, D, seed=0), _randn(B, H, Lk, D, seed=1), _randn(B, H, Lk, D, seed=2)
    qr, kr = _randn(B, H, Lq, R, seed=3), _randn(B, Lk, R, seed=4)
    _check(fn, q, k, v, lambda q, k, v: _formula(q, k, v, qr.double(), kr.double(), True, None,
                                                 transform=lambda s, d: 4 * torch.tanh((s + d) / 4)),
           qr=qr, kr=kr)


def test_sigmoid_probs(tmp_path):
    fn = _load(tmp_path, "rope_sigmoid", """const R = 16
input qr: float[B, Hq, Lq, R]
input kr: float[B, Lk, R]
mask kv <= q
score s + dot(qr[b, h, q], kr[b, kv]) / 4
probs sigmoid(score - 2)
""")
    B, H, Lq, Lk, R = 2, 2, 21, 21, 16
    q, k, v = _randn(B, H, Lq, D, seed=0), _randn(B, H, Lk, D, seed=1), _randn(B, H, Lk, D, seed=2)
    qr, kr = _randn(B, H, Lq, R, seed=3), _randn(B, Lk, R, seed=4)

    def want(q, k, v):
        s = q @ k.transpose(-1, -2) / math.sqrt(D) + qr.double() @ kr.double()[:, None].transpose(-1, -2) / 4
        p = torch.sigmoid(s - 2).masked_fill(torch.arange(Lk)[None, :] > torch.arange(Lq)[:, None], 0.0)
        return p @ v

    _check(fn, q, k, v, want, qr=qr, kr=kr)


def test_table_reads_still_work(tmp_path):
    """A tensor with a feature axis read with every axis subscripted is a table read, as before."""
    fn = _load(tmp_path, "rope_table", """const R = 4
input qr: float[B, Hq, Lq, R]
input kr: float[B, Lk, R]
mask kv <= q
score s + qr[b, h, q, 1] * kr[b, kv, 2] + dot(qr[b, h, q], kr[b, kv])
""")
    B, H, L, R = 1, 2, 19, 4
    q, k, v = _randn(B, H, L, D, seed=0), _randn(B, H, L, D, seed=1), _randn(B, H, L, D, seed=2)
    qr, kr = _randn(B, H, L, R, seed=3), _randn(B, L, R, seed=4)
    qd, kd = qr.double(), kr.double()
    _check(fn, q, k, v, lambda q, k, v: _formula(
        q, k, v, qd, kd, True, None,
        transform=lambda s, d: s + qd[..., 1:2] * kd[:, None, None, :, 2] + d), qr=qr, kr=kr)


def test_one_tensor_on_both_sides(tmp_path):
    """dot(x[b, q], x[b, kv]) of one token axis L (Lq == Lk): the two tiles are two loads of one tensor."""
    fn = _load(tmp_path, "rope_self", """const R = 3
input x: float[B, L, R]
mask kv <= q
score s + dot(x[b, q], x[b, kv])
""")
    B, H, L, R = 2, 2, 21, 3
    q, k, v = _randn(B, H, L, D, seed=0), _randn(B, H, L, D, seed=1), _randn(B, H, L, D, seed=2)
    x = _randn(B, L, R, seed=3)
    xd = x.double()[:, None]
    _check(fn, q, k, v, lambda q, k, v: _formula(q, k, v, xd, xd, True, 1.0), x=x)


def test_decode_refused(tmp_path):
    fn = _load(tmp_path, "mla_decode", MLA)
    q, kc, vc = _randn(1, 2, 1, D, seed=0), _randn(1, 2, 8, D, seed=1), _randn(1, 2, 8, D, seed=2)
    with pytest.raises(ValueError, match="dot\\(\\) of feature vectors"):
        fn.decode(q, kc, vc, torch.tensor([8], dtype=torch.int32), qr=_randn(1, 2, 1, 16, seed=3),
                  kr=_randn(1, 8, 16, seed=4))


PARAM_LENGTH = """param R = 5
input qr: float[B, Hq, Lq, R]
input kr: float[B, Hq, Lk, R]
probs sigmoid(s - dot(kr[b, h, kv], qr[b, h, q]) / 2)
"""


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_generated_modules_are_lint_clean(tmp_path):
    """ruff's default rules; a param read only by the feature length is not assigned in the reference."""
    for name, body in (("mla_rope", MLA), ("rope_param", PARAM_LENGTH)):
        source = generate_module(compile_text(f"attention {name}\n{body}", f"{name}.attn"))
        assert "tl.dot(t_qr_qvec0, t_kr_kvec0)" in source and "tl.dot(t_kr_kvec0, t_qr_qvec0)" in source
        (tmp_path / f"{name}.py").write_text(source)
    assert "BLOCK_R_qr_: tl.constexpr" in (tmp_path / "rope_param.py").read_text()
    run = subprocess.run(["ruff", "check", "--isolated", "--output-format", "concise", "."],
                         cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


_HEAD = "attention bad\nconst R = 16\ninput qr: float[B, Hq, Lq, R]\ninput kr: float[B, Lk, R]\n"


@pytest.mark.parametrize("body,where,message", [
    ("score s + qr[b, h, q]\n", "5:11", "'qr' read without its last axis (of extent 16) is a feature vector, not a number"),
    ("score s + dot(qr[b, h, q], qr[b, h, q])\n", "5:11", "dot() of two query-side vectors"),
    ("score s + dot(kr[b, kv], kr[b, kv])\n", "5:11", "dot() of two key-side vectors"),
    ("input kr2: float[B, Lk, 8]\nscore s + dot(qr[b, h, q], kr2[b, kv])\n", "6:11",
     "the feature vectors of dot() have different lengths: 16 ('qr') and 8 ('kr2')"),
    ("input x: float[Lq, Lk, R]\nscore s + dot(x[q, kv], kr[b, kv])\n", "6:15",
     "the feature vector 'x[...]' is read at both q and kv"),
    ("input u: float[Hq, R]\nscore s + dot(u[h], kr[b, kv])\n", "6:15", "must be read at q"),
    ("score s + dot(qr[b, h], kr[b, kv])\n", "5:15", "subscripts every axis but the last"),
    ("input t: float[B, Lk]\nscore s + dot(qr[b, h, q], t[b])\n", "6:28", "'t' has no feature axis"),
    ("mask dot(qr[b, h, q], kr[b, kv]) > 0\n", "5:6", "the mask cannot use dot() of feature vectors"),
    ("input w: float[B, Lk, R] learnable\nscore s + dot(qr[b, h, q], w[b, kv - 1])\n", "6:28",
     "a learnable feature vector is read at bare indices: 'w' has an index expression"),
    ("probs softmax(score, sink=dot(qr[b, h, q], kr[b, kv]))\n", "5", "sink"),
    ("score s + dot(qr[b, h, q], 1)\n", "5:28", "must be a tensor read"),
    ("feature phi(x) = elu(x) + 1\nscore dot(qr[b, h, q], kr[b, kv])\n", "6:7", "combined with feature maps"),
])
def test_errors(body, where, message):
    with pytest.raises(SpecError) as err:
        compile_text(_HEAD + body, "bad.attn")
    text = str(err.value)
    assert f"bad.attn:{where}" in text, text
    assert message in text, text


# ---- learnable feature vectors: MLA's rotary parts are activations that need gradients ----------------
@pytest.mark.parametrize("general", [False, True])
def test_learnable_feature_vectors_get_gradients(tmp_path, general):
    body = ("const R = 5\ninput qr: float[B, Hq, Lq, R] learnable\ninput kr: float[B, Lk, R] learnable\n"
            "mask kv <= q + (Lk - Lq)\nscore s + 0.5 * dot(qr[b, h, q], kr[b, kv])\n")
    if general:
        body += "probs sigmoid(score) / rowsum(sigmoid(score))\n"
    fn = _load(tmp_path, "mla_learn_general" if general else "mla_learn", body)
    B, Hq, Hk, Lq, Lk = 2, 4, 2, 11, 19  # GQA, Lq != Lk, R not a power of two
    q, k, v = _randn(B, Hq, Lq, D, seed=1), _randn(B, Hk, Lk, D, seed=2), _randn(B, Hk, Lk, D, seed=3)
    qr, kr = _randn(B, Hq, Lq, 5, seed=4), _randn(B, Lk, 5, seed=5)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, qr, kr)]
    o = fn(*leaves[:3], qr=leaves[3], kr=leaves[4])
    ref = [x.double().requires_grad_(True) for x in (q, k, v, qr, kr)]
    qd, kd, vd, qrd, krd = ref
    kd, vd = kd.repeat_interleave(2, 1), vd.repeat_interleave(2, 1)
    s = qd @ kd.transpose(-1, -2) / math.sqrt(D) + 0.5 * qrd @ krd[:, None].transpose(-1, -2)
    keep = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + (Lk - Lq)
    if general:
        w = torch.sigmoid(s) * keep
        want = w / w.sum(-1, keepdim=True) @ vd
    else:
        want = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ vd
    assert (o.double() - want).abs().max().item() <= 2e-3 * want.abs().max().item()
    g = _randn(*want.shape, seed=9).double()
    got = torch.autograd.grad(o, leaves, g.float())
    exp = torch.autograd.grad(want, ref, g)
    for name, a, e in zip(["dq", "dk", "dv", "dqr", "dkr"], got, exp):
        assert a.shape == e.shape, name
        assert (a.double() - e).abs().max().item() <= 5e-3 * max(e.abs().max().item(), 1e-3), name


def test_one_learnable_tensor_on_both_sides(tmp_path):
    # dot(x[b, q], x[b, kv]): x gets the gradient of both sides, summed
    fn = _load(tmp_path, "self_dot", "const R = 8\ninput x: float[B, L, R] learnable\n"
                                     "score s + 0.3 * dot(x[b, q], x[b, kv])\n")
    q, k, v = (_randn(2, 2, 13, D, seed=i).requires_grad_(True) for i in (1, 2, 3))
    x = _randn(2, 13, 8, seed=4).requires_grad_(True)
    o = fn(q, k, v, x=x)
    qd, kd, vd, xd = (t.detach().double().requires_grad_(True) for t in (q, k, v, x))
    s = qd @ kd.transpose(-1, -2) / math.sqrt(D) + 0.3 * (xd @ xd.transpose(-1, -2))[:, None]
    want = torch.softmax(s, -1) @ vd
    g = _randn(*want.shape, seed=5).double()
    (dx,) = torch.autograd.grad(o, (x,), g.float())
    (ref,) = torch.autograd.grad(want, (xd,), g)
    assert (dx.double() - ref).abs().max().item() <= 5e-3 * ref.abs().max().item()
