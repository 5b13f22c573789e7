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

import os

import torch

CHUNK = 64
CPU_CHUNK = 16  # small sequences on the CPU (tests) still cross several chunks


def chunk_size(device) -> int:
    """64 on the GPU, 16 on the CPU; ATTNC_LINEAR_CHUNK (16, 32, 64, 128) overrides both."""
    forced = os.environ.get("ATTNC_LINEAR_CHUNK")
    if forced:
        return int(forced)
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


# ---- the Triton kernel of the causal chunked forward ----------------------------------------------
# One program per (feature block, value block, batch * head): its slice S[f-block, d-block] of the
# state stays in registers while it walks the chunks. The intra-chunk weights and the inter-chunk
# term are partial sums over its feature block; the feature blocks' partial outputs are summed
# afterwards in a fixed order (deterministic, no atomics). The backward recomputes through the PyTorch
# form above (autograd), also deterministic.
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency; the PyTorch form works without it
    triton = None

if triton is not None:

    @triton.jit
    def _initial_state(s0, z0, bh, offs_f, offs_d, f_ok, d_ok, F, Dv,
                       HAS_STATE: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr):
        """This program's block of the state (S [F, Dv], z [F]) to start from: the caller's, or zeros."""
        if HAS_STATE:
            S = tl.load(s0 + (bh * F + offs_f[:, None]) * Dv + offs_d[None, :],
                        mask=f_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            z = tl.load(z0 + bh * F + offs_f, mask=f_ok, other=0.0).to(tl.float32)
        else:
            S = tl.zeros((BF, BD), dtype=tl.float32)
            z = tl.zeros((BF,), dtype=tl.float32)
        return S, z

    @triton.jit
    def _causal_chunk_fwd(fq, fk, v, log_decay, s0, z0, num_part, den_part, s_out, z_out,
                          H, L, F, Dv,
                          HAS_STATE: tl.constexpr, NEED_DEN: tl.constexpr,
                          BC: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr):
        pid_f = tl.program_id(0)
        pid_d = tl.program_id(1)
        bh = tl.program_id(2)
        n_bh = tl.num_programs(2)
        offs_f = pid_f * BF + tl.arange(0, BF)
        offs_d = pid_d * BD + tl.arange(0, BD)
        rel = tl.arange(0, BC)
        f_ok = offs_f < F
        d_ok = offs_d < Dv
        g = tl.load(log_decay + bh % H).to(tl.float32)  # log(decay) <= 0; 0 without a decay
        S, z = _initial_state(s0, z0, bh, offs_f, offs_d, f_ok, d_ok, F, Dv, HAS_STATE, BF, BD)
        causal = rel[:, None] >= rel[None, :]
        dist = tl.where(causal, rel[:, None] - rel[None, :], 0).to(tl.float32)
        intra_decay = tl.where(causal, tl.exp(g * dist), 0.0)  # chunk-relative: exponents in [0, BC)
        q_decay = tl.exp(g * (rel + 1).to(tl.float32))
        for start in range(0, L, BC):
            offs_t = start + rel
            t_ok = offs_t < L
            qc = tl.load(fq + (bh * L + offs_t[:, None]) * F + offs_f[None, :],
                         mask=t_ok[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
            kc = tl.load(fk + (bh * L + offs_t[:, None]) * F + offs_f[None, :],
                         mask=t_ok[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
            vc = tl.load(v + (bh * L + offs_t[:, None]) * Dv + offs_d[None, :],
                         mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            a = tl.dot(qc, tl.trans(kc)) * intra_decay
            qd = qc * q_decay[:, None]
            num = tl.dot(a, vc) + tl.dot(qd, S)
            tl.store(num_part + ((pid_f * n_bh + bh) * L + offs_t[:, None]) * Dv + offs_d[None, :], num,
                     mask=t_ok[:, None] & d_ok[None, :])
            if NEED_DEN:  # one value block writes the row sums
                den = tl.sum(a, axis=1) + tl.sum(qd * z[None, :], axis=1)
                tl.store(den_part + (pid_f * n_bh + bh) * L + offs_t, den, mask=t_ok & ((rel * 0 + pid_d) == 0))
            c = tl.minimum(L - start, BC)
            k_decay = tl.where(t_ok, tl.exp(g * tl.maximum(c - 1 - rel, 0).to(tl.float32)), 0.0)
            kd = kc * k_decay[:, None]
            carry = tl.exp(g * c.to(tl.float32))
            S = carry * S + tl.dot(tl.trans(kd), vc)
            z = carry * z + tl.sum(kd, axis=0)
        tl.store(s_out + (bh * F + offs_f[:, None]) * Dv + offs_d[None, :], S, mask=f_ok[:, None] & d_ok[None, :])
        if pid_d == 0:
            tl.store(z_out + bh * F + offs_f, z, mask=f_ok)


    @triton.jit
    def _full_fwd(fq, fk, v, s0, z0, num_part, den_part, s_out, z_out, Lq, Lk, F, Dv,
                  HAS_STATE: tl.constexpr, NEED_DEN: tl.constexpr,
                  BC: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr):
        """Every key visible: the state over all keys first, then every query reads it."""
        pid_f = tl.program_id(0)
        pid_d = tl.program_id(1)
        bh = tl.program_id(2)
        n_bh = tl.num_programs(2)
        offs_f = pid_f * BF + tl.arange(0, BF)
        offs_d = pid_d * BD + tl.arange(0, BD)
        rel = tl.arange(0, BC)
        f_ok = offs_f < F
        d_ok = offs_d < Dv
        S, z = _initial_state(s0, z0, bh, offs_f, offs_d, f_ok, d_ok, F, Dv, HAS_STATE, BF, BD)
        for start in range(0, Lk, BC):
            offs_t = start + rel
            t_ok = offs_t < Lk
            kc = tl.load(fk + (bh * Lk + offs_t[:, None]) * F + offs_f[None, :],
                         mask=t_ok[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
            vc = tl.load(v + (bh * Lk + offs_t[:, None]) * Dv + offs_d[None, :],
                         mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            S += tl.dot(tl.trans(kc), vc)
            z += tl.sum(kc, axis=0)
        for start in range(0, Lq, BC):
            offs_t = start + rel
            t_ok = offs_t < Lq
            qc = tl.load(fq + (bh * Lq + offs_t[:, None]) * F + offs_f[None, :],
                         mask=t_ok[:, None] & f_ok[None, :], other=0.0).to(tl.float32)
            tl.store(num_part + ((pid_f * n_bh + bh) * Lq + offs_t[:, None]) * Dv + offs_d[None, :],
                     tl.dot(qc, S), mask=t_ok[:, None] & d_ok[None, :])
            if NEED_DEN:  # one value block writes the row sums
                tl.store(den_part + (pid_f * n_bh + bh) * Lq + offs_t, tl.sum(qc * z[None, :], axis=1),
                         mask=t_ok & ((rel * 0 + pid_d) == 0))
        tl.store(s_out + (bh * F + offs_f[:, None]) * Dv + offs_d[None, :], S, mask=f_ok[:, None] & d_ok[None, :])
        if pid_d == 0:
            tl.store(z_out + bh * F + offs_f, z, mask=f_ok)


def _kernel_forward(fq, fk, v, log_decay, S0, z0, need_den, chunk, causal=True):
    B, H, L, F = fq.shape
    Lk, Dv = v.shape[2], v.shape[-1]
    BF = min(64, max(16, triton.next_power_of_2(F)))
    BD = min(64, max(16, triton.next_power_of_2(Dv)))
    NF = triton.cdiv(F, BF)
    f32 = {"dtype": torch.float32, "device": fq.device}
    fq, fk, v = fq.float().contiguous(), fk.float().contiguous(), v.float().contiguous()
    num_part = torch.empty(NF, B * H, L, Dv, **f32)
    den_part = torch.empty(NF, B * H, L, **f32) if need_den else num_part
    S = torch.empty(B * H, F, Dv, **f32)
    z = torch.empty(B * H, F, **f32)
    g = torch.zeros(H, **f32) if log_decay is None else log_decay.detach().float().expand(H).contiguous()
    has_state = S0 is not None
    s0 = S0.detach().float().contiguous() if has_state else S
    zz0 = z0.detach().float().contiguous() if has_state else z
    grid = (NF, triton.cdiv(Dv, BD), B * H)
    BC = max(16, chunk)
    warps = 8 if BC * BF >= 64 * 64 else 4  # 64 x 64 tiles: 8 warps keep them in registers (no spills)
    if causal:
        _causal_chunk_fwd[grid](fq, fk, v, g, s0, zz0, num_part, den_part, S, z, H, L, F, Dv,
                                HAS_STATE=has_state, NEED_DEN=need_den, BC=BC, BF=BF, BD=BD, num_warps=warps)
    else:
        _full_fwd[grid](fq, fk, v, s0, zz0, num_part, den_part, S, z, L, Lk, F, Dv,
                        HAS_STATE=has_state, NEED_DEN=need_den, BC=BC, BF=BF, BD=BD, num_warps=warps)
    num = num_part.sum(0).view(B, H, L, Dv)
    den = den_part.sum(0).view(B, H, L) if need_den else None
    return num, den, S.view(B, H, F, Dv), z.view(B, H, F)


def _kernel_backward(fq, fk, v, log_decay, S0, z0, d_num, d_den, d_S, d_z, need_den, chunk):
    """The causal backward as three more runs of the forward kernel (fixed decay): with the row sums as a
    ones column of v (v+ = [v, 1], dn = [d_num, d_den]) and lam = exp(log_decay),
        dfq_i = sum_{j <= i} lam^(i-j) (dn_i . v+_j) fk_j + lam^(i+1) S0+ dn_i      (a causal scan)
        dfk_j = sum_{i >= j} lam^(i-j) (v+_j . dn_i) fq_i + lam^(L-1-j) dS+ v+_j    (reversed in time)
        dv_j  = sum_{i >= j} lam^(i-j) (fq_i . fk_j) dn_i + lam^(L-1-j) dS+^T fk_j  (reversed in time)
    and dS0+ = sum_i lam^(i+1) fq_i dn_i^T + lam^L dS+. Exponents stay non-negative."""
    B, H, L = fq.shape[:3]
    Dv = v.shape[-1]
    fq, fk, v = fq.float(), fk.float(), v.float()
    ones = torch.ones(B, H, L, 1, dtype=torch.float32, device=fq.device)
    v_aug = torch.cat([v, ones], -1) if need_den else v
    dn = torch.cat([d_num.float(), d_den.float().unsqueeze(-1)], -1) if need_den else d_num.float()
    dS = torch.cat([d_S.float(), d_z.float().unsqueeze(-1)], -1)  # [B, H, F, Dv + 1]: z is S's ones column
    if not need_den:
        dS = dS[..., :Dv]
    g = torch.zeros(H, dtype=torch.float32, device=fq.device) if log_decay is None else log_decay.detach().float()
    state = None
    if S0 is not None:
        S0_aug = torch.cat([S0.float(), z0.float().unsqueeze(-1)], -1) if need_den else S0.float()
        state = (S0_aug.transpose(-1, -2).contiguous(), torch.zeros(B, H, S0_aug.shape[-1], device=fq.device))
    dfq = _kernel_forward(dn, v_aug, fk, g, *(state or (None, None)), False, chunk)[0]

    def flip(x):  # reversed in time: the scans over later queries become causal scans
        return x.flip(2)

    dfk = flip(_kernel_forward(flip(v_aug), flip(dn), flip(fq), g, None, None, False, chunk)[0])
    dv = flip(_kernel_forward(flip(fk), flip(fq), flip(dn), g, None, None, False, chunk)[0])[..., :Dv]
    t = torch.arange(L, dtype=torch.float32, device=fq.device)
    lam_end = torch.exp(g.view(1, H, 1, 1) * (L - 1 - t).view(1, 1, L, 1))  # lam^(L-1-j)
    dfk = dfk + lam_end * (v_aug @ dS.transpose(-1, -2))
    dv = dv + lam_end * (fk @ dS[..., :Dv])
    dS0 = dz0 = None
    if S0 is not None:
        lam_q = torch.exp(g.view(1, H, 1, 1) * (t + 1).view(1, 1, L, 1))
        dS0_aug = (fq * lam_q).transpose(-1, -2) @ dn + torch.exp(g * L).view(1, H, 1, 1) * dS
        dS0 = dS0_aug[..., :Dv]
        dz0 = dS0_aug[..., Dv] if need_den else torch.exp(g * L).view(1, H, 1) * d_z.float()
    return dfq, dfk, dv, dS0, dz0


class _CausalChunked(torch.autograd.Function):
    """Forward: the Triton kernel; backward: autograd through the PyTorch form (recomputed)."""

    @staticmethod
    def forward(ctx, fq, fk, v, log_decay, S0, z0, need_den, chunk, causal):
        ctx.save_for_backward(fq, fk, v, log_decay, S0, z0)
        ctx.need_den, ctx.chunk, ctx.causal = need_den, chunk, causal
        num, den, S, z = _kernel_forward(fq, fk, v, log_decay, S0, z0, need_den, chunk, causal)
        if den is None:
            den = num.new_zeros(0)
        return num, den, S, z

    @staticmethod
    def backward(ctx, d_num, d_den, d_S, d_z):
        saved = ctx.saved_tensors
        fq, fk, v, log_decay, S0, z0 = saved
        if ctx.causal and (log_decay is None or not ctx.needs_input_grad[3]):  # Triton scans
            grads = _kernel_backward(fq, fk, v, log_decay, S0, z0, d_num, d_den, d_S, d_z, ctx.need_den, ctx.chunk)
            dfq, dfk, dv, dS0, dz0 = (None if g is None else g.to(x.dtype) if x is not None else None
                                      for g, x in zip(grads, (fq, fk, v, S0, z0)))
            return dfq, dfk, dv, None, dS0, dz0, None, None, None
        with torch.enable_grad():
            leaves = [None if x is None else x.detach().float().requires_grad_(x.requires_grad) for x in saved]
            fq, fk, v, log_decay, S0, z0 = leaves
            state = None if S0 is None else (S0, z0)
            if ctx.causal:
                num, den, (S, z) = causal_chunked(fq, fk, v, log_decay, state, ctx.need_den, ctx.chunk)
            else:
                num, den, (S, z) = full(fq, fk, v, state, ctx.need_den)
            outs, grads = [num, S, z], [d_num, d_S, d_z]
            if ctx.need_den:
                outs.append(den)
                grads.append(d_den)
            wrt = [x for x in leaves if x is not None and x.requires_grad]
            got = iter(torch.autograd.grad(outs, wrt, grads, allow_unused=True)) if wrt else iter(())
        result = [next(got) if (x is not None and x.requires_grad) else None for x in leaves]
        result = [None if r is None else r.to(x.dtype) for r, x in zip(result, saved)]
        return (*result, None, None, None)


def causal_chunked_kernel(fq, fk, v, log_decay=None, state=None, need_den=True, chunk=CHUNK):
    """As causal_chunked, with the forward in Triton (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    S0, z0 = (None, None) if state is None else state
    num, den, S, z = _CausalChunked.apply(fq, fk, v, log_decay, S0, z0, need_den, chunk, True)
    dtype = fq.dtype
    return num.to(dtype), (den.to(dtype) if need_den else None), (S, z)


def full_kernel(fq, fk, v, state=None, need_den=True, chunk=CHUNK):
    """As full, with the forward in Triton."""
    S0, z0 = (None, None) if state is None else state
    num, den, S, z = _CausalChunked.apply(fq, fk, v, None, S0, z0, need_den, chunk, False)
    dtype = fq.dtype
    return num.to(dtype), (den.to(dtype) if need_den else None), (S, z)
