"""Helpers of the language tests: load a spec from text, random q/k/v, the softmax attention formula in
float64, and a check of the kernels (visit counts) against a formula, forward and backward."""
import math

import torch
from attnc.runtime import launch

import attnc

L, D = 37, 16


def _load(tmp_path, name, body):
    path = tmp_path / f"{name}.attn"
    path.write_text(f"attention {name}\n{body}")
    return attnc.load(path)


def _qkv(B=1, H=2, Lq=L, Lk=L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Lq, D, generator=g), torch.randn(B, H, Lk, D, generator=g),
            torch.randn(B, H, Lk, D, generator=g))


def qkv_heads(B, Hq, Hk, Lq, Lk, seed=0):
    """q [B, Hq, Lq, D] and k, v [B, Hk, Lk, D] (grouped heads where Hk < Hq)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Lq, D, generator=g), torch.randn(B, Hk, Lk, D, generator=g),
            torch.randn(B, Hk, Lk, D, generator=g))


def _formula(q, k, v, mask, score=None):
    """Softmax attention in float64 from a mask [.., Lq, Lk] and a score map S -> S'."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if score is not None:
        s = score(s)
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # rows with no visible key output 0
    return p @ v


def _ij(Lq=L, Lk=L):
    return torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]


def _check(fn, q, k, v, want_fn, backward=True, **inputs):
    """Kernels (visits counted) against the formula, forward and, through autograd, backward."""
    q, k, v = (x.clone().requires_grad_(backward) for x in (q, k, v))
    with launch.count_visits() as log:
        o = fn(q, k, v, **inputs)
    assert log and sum(int(x.clamp(min=0).sum()) for x in log) > 0, "the kernels did not run"
    qd, kd, vd = (x.detach().double().requires_grad_(backward) for x in (q, k, v))
    want = want_fn(qd, kd, vd)
    scale = max(want.abs().max().item(), 1e-3)
    assert (o.double() - want).abs().max().item() <= 2e-3 * scale
    if backward:
        g = torch.randn_like(want)
        o.backward(g.float())
        want.backward(g)
        for got, ref in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
            assert (got.double() - ref).abs().max().item() <= 5e-3 * max(ref.abs().max().item(), 1e-3)
