"""The chunked linear-attention algorithm (attnc/analysis/factorize.py proves when a spec may use it).

With per-query features `fq [B, H, Lq, F]`, per-key features `fk [B, H, Lk, F]`, values `v [B, H, Lk, Dv]`
and an optional per-head decay `lam = exp(log_decay)` in (0, 1], the weight is
`W[i, j] = lam^(i - j) * fq_i . fk_j` over the visible keys (all, or `j <= i`), and

    num[i] = sum_j W[i, j] v[j],     den[i] = sum_j W[i, j]   (the row sum, when the spec normalizes)

are computed chunk by chunk: inside a chunk of C positions, the C x C weights with the mask; across
chunks, a running state `S = sum_j lam^(last - j) fk_j v_j^T [F, Dv]` and normalizer
`z = sum_j lam^(last - j) fk_j [F]`, in fp32 (fp64 for fp64 inputs). Every decay factor is
`exp(log_decay * n)` with `n >= 0` counted inside one chunk (chunk-relative exponents), so nothing
overflows however long the sequence: `lam^-j` is never formed. Cost O(L * (C + F) * Dv + L * C * F).

The state after the last key, `(S, z)`, is what `return_state=True` returns; passing it back as
`initial_state=` continues the sequence (the keys it summarizes precede every query of the call).
Gradients come from autograd through these tensor operations: deterministic, no atomics.
"""

from __future__ import annotations

import torch

CHUNK = 64
CPU_CHUNK = 16  # small sequences on the CPU (tests) still cross several chunks


def chunk_size(device) -> int:
    return CHUNK if torch.device(device).type == "cuda" else CPU_CHUNK


def causal_chunked(fq, fk, v, log_decay=None, state=None, need_den=True, chunk=CHUNK):
    """Causal (`j <= i`) num, den and the final state. `log_decay`: [H] (<= 0) or None; `state`: (S, z) or None."""
    B, H, L, F = fq.shape
    Dv = v.shape[-1]
    dt = fq.dtype
    if state is None:
        S = fq.new_zeros(B, H, F, Dv)
        z = fq.new_zeros(B, H, F)
    else:
        S, z = state[0].to(dt), state[1].to(dt)
    nums, dens = [], []
    g = None if log_decay is None else log_decay.to(dt).view(1, H, 1, 1)
    for start in range(0, L, chunk):
        stop = min(start + chunk, L)
        c = stop - start
        qc, kc, vc = fq[:, :, start:stop], fk[:, :, start:stop], v[:, :, start:stop]
        t = torch.arange(c, device=fq.device)
        causal = t[:, None] >= t[None, :]
        a = qc @ kc.transpose(-1, -2)  # [B, H, c, c]
        if g is None:
            a = a.masked_fill(~causal, 0)
            q_in, k_out, carry = qc, kc, None
        else:
            rel = (t[:, None] - t[None, :]).clamp(min=0).to(dt)  # i - j >= 0 inside the chunk
            a = torch.where(causal, a * torch.exp(g * rel), torch.zeros((), dtype=dt, device=fq.device))
            q_in = qc * torch.exp(g * (t + 1).to(dt).view(1, 1, c, 1))  # lam^(i - start + 1)
            k_out = kc * torch.exp(g * (c - 1 - t).to(dt).view(1, 1, c, 1))  # lam^(stop - 1 - j)
            carry = torch.exp(g * c)  # lam^c
        nums.append(a @ vc + q_in @ S)
        if need_den:
            dens.append(a.sum(-1) + (q_in @ z.unsqueeze(-1)).squeeze(-1))
        if carry is None:
            S = S + k_out.transpose(-1, -2) @ vc
            z = z + k_out.sum(-2)
        else:
            S = carry * S + k_out.transpose(-1, -2) @ vc
            z = carry.view(1, H, 1) * z + k_out.sum(-2)
    num = torch.cat(nums, dim=2) if nums else fq.new_zeros(B, H, 0, Dv)
    den = (torch.cat(dens, dim=2) if dens else fq.new_zeros(B, H, 0)) if need_den else None
    return num, den, (S, z)


def full(fq, fk, v, state=None, need_den=True):
    """Every key visible (no decay): num = fq @ S, den = fq @ z with S, z over all keys (and the given state)."""
    S = fk.transpose(-1, -2) @ v
    z = fk.sum(-2)
    if state is not None:
        S, z = S + state[0].to(S.dtype), z + state[1].to(z.dtype)
    num = fq @ S
    den = (fq @ z.unsqueeze(-1)).squeeze(-1) if need_den else None
    return num, den, (S, z)


def poly_features(x, coeffs, scale, query: bool):
    """Features of `c0 + c1 s + c2 s^2`, s = scale * q.k: [sqrt c0, sqrt c1 x', sqrt c2 vec(x' x'^T)],
    x' = x * scale^(1/2); a negative coefficient's sign goes to the query side. Zero terms are dropped."""
    xs = x * scale ** 0.5
    parts = []
    for degree, c in enumerate(coeffs):
        if c == 0:
            continue
        w = abs(c) ** 0.5 * (-1.0 if (c < 0 and query) else 1.0)
        if degree == 0:
            parts.append(torch.full((*x.shape[:-1], 1), w, dtype=x.dtype, device=x.device))
        elif degree == 1:
            parts.append(w * xs)
        else:
            parts.append(w * (xs.unsqueeze(-1) * xs.unsqueeze(-2)).flatten(-2))
    return torch.cat(parts, dim=-1)


def head_matmul(x, w):
    """x [B, H, L, D] times each head's matrix w [H, D, F] -> [B, H, L, F] (a feature map's linear layer)."""
    return torch.einsum("bhld,hdf->bhlf", x, w.to(x.dtype))


def row_factor(x, like):
    """A row-constant factor (a number, [Lq], [1, H, 1] or [B, H, Lq]) as a multiplier of [B, H, Lq, Dv]."""
    x = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    return x.unsqueeze(-1) if x.dim() else x


def expand_heads(x, Hq):
    """[B, Hx, L, D] -> [B, Hq, L, D]: query head h reads head h * Hx // Hq."""
    Hx = x.shape[1]
    if Hx == Hq:
        return x
    idx = torch.arange(Hq, device=x.device) * Hx // Hq
    return x.index_select(1, idx)
