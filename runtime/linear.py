"""Linear attention as a library of named primitives (attnc/analysis/factorize.py proves when a spec may use
them; a generated linear module calls them, templates/linear.py.j2).

With per-query features `fq [B, H, Lq, F]`, per-key features `fk [B, H, Lk, F]`, values `v [B, H, Lk, Dv]`
and an optional per-head decay `lam = exp(log_decay)` in (0, 1], the weight is
`W[i, j] = lam^(i - j) * fq_i . fk_j` over the visible keys (all, or `j <= i`), and

    num[i] = sum_j W[i, j] v[j],     den[i] = sum_j W[i, j]   (the row sum, when the spec normalizes)

with the state after the last key `S = sum_j lam^(last - j) fk_j v_j^T [F, Dv]` and normalizer
`z = sum_j lam^(last - j) fk_j [F]`. `state=(S0, z0)` continues a sequence: the keys it summarizes
precede every query (`num[i] += lam^(i + 1) fq_i S0`, and the final state adds `lam^L S0`).

    primitive               Triton (CUDA; the CPU under TRITON_INTERPRET=1)   torch reference
    causal, chunked         causal_chunked                                    causal_chunked_reference
    every key visible       full                                              full_reference
    the state of the keys   chunk_state                                       chunk_state_reference
    the quadratic view      -                                                 parallel_reference
    one step (decoding)     -                                                 recurrent_step, recurrent_reference

The Triton primitives read fq, fk and v in place, in any strides and in their own dtype (fp32, fp16,
bf16: 16-bit dots accumulate in fp32, as fla's do) and return fp32 (fp64 for fp64 inputs); the torch
references compute in fp32 (fp64 for fp64 inputs) whatever their inputs' dtypes. Chunked forms work
chunk by chunk: inside a chunk of C positions the C x C weights with the mask; across chunks the running
state. Every decay factor is `exp(log_decay * n)` with `n >= 0` counted inside one chunk
(chunk-relative exponents), so nothing overflows however long the sequence: `lam^-j` is never formed.
Cost O(L * (C + F) * Dv + L * C * F). Gradients: Triton scans for the kernels (autograd through the
chunked reference for a learnable decay), autograd for the references; deterministic, no atomics.
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


def _compute_dtype(*xs):
    """fp32, or fp64 when an input is fp64: the dtype of num, den and the state."""
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _decay_powers(log_decay, n, dt):
    """lam^n per head and position for exponents n [L] (>= 0): [1, H, L, 1]."""
    return torch.exp(log_decay.to(dt).view(1, -1, 1, 1) * n.to(dt).view(1, 1, -1, 1))


def causal_chunked_reference(fq, fk, v, log_decay=None, state=None, need_den=True, chunk=CHUNK):
    """Causal (`j <= i`) num, den and the final state, chunk by chunk in torch (what causal_chunked
    computes). `log_decay`: [H] (<= 0) or None; `state`: (S, z) or None."""
    dt = _compute_dtype(fq, fk, v)  # fp32 (fp64 for fp64) whatever the inputs' dtypes
    fq, fk, v = fq.to(dt), fk.to(dt), v.to(dt)
    B, H, L, F = fq.shape
    Dv = v.shape[-1]
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


def full_reference(fq, fk, v, state=None, need_den=True):
    """Every key visible (no decay): num = fq @ S, den = fq @ z with S, z over all keys (and the given
    state), in torch (what `full` computes)."""
    dt = _compute_dtype(fq, fk, v)
    fq = fq.to(dt)
    S, z = chunk_state_reference(fk, v, None, state)
    num = fq @ S
    den = (fq @ z.unsqueeze(-1)).squeeze(-1) if need_den else None
    return num, den, (S, z)


def chunk_state_reference(fk, v, log_decay=None, state=None):
    """The state after the last key, (S [B, H, F, Dv], z [B, H, F]): S = sum_j lam^(L-1-j) fk_j v_j^T
    + lam^L S0, z likewise, in torch (what chunk_state computes)."""
    dt = _compute_dtype(fk, v)
    fk, v = fk.to(dt), v.to(dt)
    L = fk.shape[2]
    if log_decay is not None:
        fk = fk * _decay_powers(log_decay, torch.arange(L - 1, -1, -1, device=fk.device), dt)
    S, z = fk.transpose(-1, -2) @ v, fk.sum(-2)
    if state is None:
        return S, z
    S0, z0 = state[0].to(dt), state[1].to(dt)
    if log_decay is None:
        return S + S0, z + z0
    lam_l = torch.exp(log_decay.to(dt) * L).view(1, -1, 1, 1)
    return S + lam_l * S0, z + lam_l[..., 0] * z0


def parallel_reference(fq, fk, v, log_decay=None, state=None, causal=True):
    """The quadratic view: the Lq x Lk weights W[i, j] = lam^(i - j) fq_i . fk_j (causal: j <= i) times
    the values, and the final state; num, den, (S, z) as the chunked forms return them, differentiable
    (small sizes: O(Lq * Lk) memory)."""
    dt = _compute_dtype(fq, fk, v)
    fq, fk, v = fq.to(dt), fk.to(dt), v.to(dt)
    Lq, Lk = fq.shape[2], fk.shape[2]
    i = torch.arange(Lq, device=fq.device)[:, None]
    j = torch.arange(Lk, device=fq.device)[None, :]
    w = fq @ fk.transpose(-1, -2)
    if log_decay is not None:
        w = w * torch.exp(log_decay.to(dt).view(1, -1, 1, 1) * (i - j).clamp(min=0))
    if causal:
        w = w.masked_fill(j > i, 0)
    num, den = w @ v, w.sum(-1)
    if state is not None:
        S0, z0 = state[0].to(dt), state[1].to(dt)
        fq_in = fq if log_decay is None else fq * _decay_powers(log_decay, i[:, 0] + 1, dt)  # after the state
        num, den = num + fq_in @ S0, den + (fq_in @ z0.unsqueeze(-1)).squeeze(-1)
    return num, den, chunk_state_reference(fk, v, log_decay, state)


def recurrent_step(fq, fk, v, log_decay=None, state=None):
    """One position of the recurrence (a decoding step): with fq, fk [B, H, F] and v [B, H, Dv] of the new
    position, S' = lam S + fk v^T, z' = lam z + fk, then num = fq . S', den = fq . z'. Returns num, den,
    (S', z') in fp32 (fp64 for fp64 inputs); `state` (S, z) or None (no keys before)."""
    dt = _compute_dtype(fq, fk, v)
    fq, fk, v = fq.to(dt), fk.to(dt), v.to(dt)
    S, z = fk.unsqueeze(-1) * v.unsqueeze(-2), fk
    if state is not None:
        S0, z0 = state[0].to(dt), state[1].to(dt)
        if log_decay is not None:
            lam = torch.exp(log_decay.to(dt)).view(1, -1, 1, 1)
            S0, z0 = lam * S0, lam[..., 0] * z0
        S, z = S + S0, z + z0
    num = (fq.unsqueeze(-1) * S).sum(-2)
    den = (fq * z).sum(-1)
    return num, den, (S, z)


def recurrent_reference(fq, fk, v, log_decay=None, state=None):
    """Causal num, den and the final state, one position at a time through recurrent_step."""
    nums, dens = [], []
    for t in range(fq.shape[2]):
        num, den, state = recurrent_step(fq[:, :, t], fk[:, :, t], v[:, :, t], log_decay, state)
        nums.append(num)
        dens.append(den)
    return torch.stack(nums, 2), torch.stack(dens, 2), state


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


# ---- the Triton kernels -----------------------------------------------------------------------------
# One program per (feature block, value block, batch * head): its slice S[f-block, d-block] of the
# state stays in registers while it walks the chunks. The intra-chunk weights and the inter-chunk
# term are partial sums over its feature block; the feature blocks' partial outputs are summed
# afterwards in a fixed order (deterministic, no atomics).
#
# Inputs are read where they are, as they are: every operand comes with its four strides (b, h, l, d),
# so a transposed [B, L, H, D] tensor needs no copy, and in its own dtype (fp32, fp16, bf16). Dots take
# 16-bit inputs with fp32 accumulation where the data is 16-bit, as fla does: QK_DOT (q.k and q.S) is
# the common dtype of fq and fk, V_DOT (w.v and k^T v) that of v, each fp32 unless 16-bit; the weights,
# decays, row sums and the running state are fp32 (cast to the dot's dtype only as its operand). Under
# the interpreter bf16 goes to fp32 (launch.upcast_dots: it computes bf16 dots wrongly). Offsets are
# int64 to each (batch, head) and int32 inside it (one head's rows: L * stride_l < 2^31).
# The flags serve the backward, which runs the same kernel as scans: REVERSE walks the sequence from
# its end (row L-1-t at step t, outputs written in place: no flipped copies), Q_ONE / K_ONE append a
# column of ones to the feature axis of q / k (the row sums' `v+ = [v, 1]` without a concatenated copy).
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency; the PyTorch form works without it
    triton = None

if triton is not None:

    @triton.jit
    def _initial_state(s0, z0, bh, offs_f, offs_d, F, Dv, HAS_STATE: tl.constexpr, BF: tl.constexpr,
                       BD: tl.constexpr):
        """This program's block of the state (S [F, Dv], z [F]) to start from: the caller's, or zeros."""
        if HAS_STATE:
            f_ok = offs_f < F
            S = tl.load(s0 + (bh * F + offs_f[:, None]) * Dv + offs_d[None, :],
                        mask=f_ok[:, None] & (offs_d < Dv)[None, :], other=0.0).to(tl.float32)
            z = tl.load(z0 + bh * F + offs_f, mask=f_ok, other=0.0).to(tl.float32)
        else:
            S = tl.zeros((BF, BD), dtype=tl.float32)
            z = tl.zeros((BF,), dtype=tl.float32)
        return S, z

    @triton.jit
    def _rows(offs_t, L, REVERSE: tl.constexpr):
        """The sequence rows of steps offs_t."""
        if REVERSE:
            rows = L - 1 - offs_t
        else:
            rows = offs_t
        return rows

    @triton.jit
    def _tile(x, base, rows, t_ok, offs_c, C, s_l, s_c, ONE: tl.constexpr):
        """Rows x columns of one operand in its stored dtype, zero outside; with ONE the column C - 1 (past
        the stored C - 1 columns) is ones."""
        stored = C - ONE
        tile = tl.load(x + base + rows[:, None] * s_l + offs_c[None, :] * s_c,
                       mask=t_ok[:, None] & (offs_c < stored)[None, :], other=0.0)
        if ONE:
            tile = tl.where((offs_c == stored)[None, :], 1.0, tile.to(tl.float32)).to(tile.dtype)
        return tile

    @triton.jit
    def _program(num_part, den_part, log_decay, sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, H, L, Dv,
                 BF: tl.constexpr, BD: tl.constexpr):
        """This program's head (its three operands' int64 offsets), its L rows of the partial outputs (one
        slice per feature block), its feature and value offsets, and its head's log(decay) (<= 0; 0
        without a decay)."""
        pid_f = tl.program_id(0)
        bh = tl.program_id(2)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        part = (pid_f * tl.num_programs(2) + bh).to(tl.int64) * L
        offs_f = pid_f * BF + tl.arange(0, BF)
        offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
        g = tl.load(log_decay + h).to(tl.float32)
        return (bh, b * sq_b + h * sq_h, b * sk_b + h * sk_h, b * sv_b + h * sv_h, num_part + part * Dv,
                den_part + part, offs_f, offs_d, g)

    @triton.jit
    def _absorb(S, z, kc, vc, g, c, rel, t_ok, DECAY: tl.constexpr, V_DOT: tl.constexpr):
        """The state after one more chunk of c keys (rows t < c of kc and vc; zeros past the sequence):
        S = lam^c S + sum_t lam^(c-1-t) k_t v_t^T, z likewise; exponents chunk-relative, in [0, c].
        Without DECAY (lam = 1) the keys go into the dot as they are loaded."""
        if DECAY:
            k_decay = tl.where(t_ok, tl.exp(g * tl.maximum(c - 1 - rel, 0).to(tl.float32)), 0.0)
            kd = kc.to(tl.float32) * k_decay[:, None]
            carry = tl.exp(g * c.to(tl.float32))
            S = carry * S + tl.dot(tl.trans(kd.to(V_DOT)), vc.to(V_DOT))
            z = carry * z + tl.sum(kd, axis=0)
        else:
            S += tl.dot(tl.trans(kc.to(V_DOT)), vc.to(V_DOT))
            z += tl.sum(kc.to(tl.float32), axis=0)
        return S, z

    @triton.jit
    def _store_state(s_out, z_out, S, z, bh, offs_f, offs_d, F, Dv):
        """This program's block of the final state (one value block writes z)."""
        f_ok = offs_f < F
        tl.store(s_out + (bh * F + offs_f[:, None]) * Dv + offs_d[None, :], S, mask=f_ok[:, None] & (offs_d < Dv)[None, :])
        if tl.program_id(1) == 0:
            tl.store(z_out + bh * F + offs_f, z, mask=f_ok)

    @triton.jit
    def _causal_chunk_fwd(fq, fk, v, log_decay, s0, z0, num_part, den_part, s_out, z_out,
                          sq_b, sq_h, sq_l, sq_f, sk_b, sk_h, sk_l, sk_f, sv_b, sv_h, sv_l, sv_d,
                          H, L, F, Dv,
                          HAS_STATE: tl.constexpr, NEED_DEN: tl.constexpr, REVERSE: tl.constexpr,
                          Q_ONE: tl.constexpr, K_ONE: tl.constexpr, QK_DOT: tl.constexpr, V_DOT: tl.constexpr,
                          BC: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr):
        bh, q_base, k_base, v_base, num_out, den_out, offs_f, offs_d, g = _program(
            num_part, den_part, log_decay, sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, H, L, Dv, BF, BD)
        rel = tl.arange(0, BC)
        d_ok = offs_d < Dv
        S, z = _initial_state(s0, z0, bh, offs_f, offs_d, F, Dv, HAS_STATE, BF, BD)
        causal = rel[:, None] >= rel[None, :]
        dist = tl.where(causal, rel[:, None] - rel[None, :], 0).to(tl.float32)
        intra_decay = tl.where(causal, tl.exp(g * dist), 0.0)  # chunk-relative: exponents in [0, BC)
        q_decay = tl.exp(g * (rel + 1).to(tl.float32))
        for start in range(0, L, BC):
            offs_t = start + rel
            t_ok = offs_t < L
            rows = _rows(offs_t, L, REVERSE)
            qc = _tile(fq, q_base, rows, t_ok, offs_f, F, sq_l, sq_f, Q_ONE)
            kc = _tile(fk, k_base, rows, t_ok, offs_f, F, sk_l, sk_f, K_ONE)
            vc = _tile(v, v_base, rows, t_ok, offs_d, Dv, sv_l, sv_d, False).to(V_DOT)
            a = tl.dot(qc.to(QK_DOT), tl.trans(kc.to(QK_DOT))) * intra_decay
            qd = qc.to(tl.float32) * q_decay[:, None]
            num = tl.dot(a.to(V_DOT), vc) + tl.dot(qd.to(QK_DOT), S.to(QK_DOT))
            tl.store(num_out + rows[:, None] * Dv + offs_d[None, :], num,
                     mask=t_ok[:, None] & d_ok[None, :])
            if NEED_DEN:  # one value block writes the row sums
                den = tl.sum(a, axis=1) + tl.sum(qd * z[None, :], axis=1)
                tl.store(den_out + rows, den, mask=t_ok & ((rel * 0 + tl.program_id(1)) == 0))
            S, z = _absorb(S, z, kc, vc, g, tl.minimum(L - start, BC), rel, t_ok, True, V_DOT)
        _store_state(s_out, z_out, S, z, bh, offs_f, offs_d, F, Dv)

    @triton.jit
    def _full_fwd(fq, fk, v, log_decay, s0, z0, num_part, den_part, s_out, z_out,
                  sq_b, sq_h, sq_l, sq_f, sk_b, sk_h, sk_l, sk_f, sv_b, sv_h, sv_l, sv_d,
                  H, Lq, Lk, F, Dv,
                  HAS_STATE: tl.constexpr, NEED_DEN: tl.constexpr, DECAY: tl.constexpr,
                  Q_ONE: tl.constexpr, K_ONE: tl.constexpr, QK_DOT: tl.constexpr, V_DOT: tl.constexpr,
                  BC: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr):
        """Every key visible: the state over all keys first (DECAY: as of the last key, for chunk_state),
        then every query reads it."""
        bh, q_base, k_base, v_base, num_out, den_out, offs_f, offs_d, g = _program(
            num_part, den_part, log_decay, sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, H, Lq, Dv, BF, BD)
        rel = tl.arange(0, BC)
        d_ok = offs_d < Dv
        S, z = _initial_state(s0, z0, bh, offs_f, offs_d, F, Dv, HAS_STATE, BF, BD)
        for start in range(0, Lk, BC):
            offs_t = start + rel
            t_ok = offs_t < Lk
            kc = _tile(fk, k_base, offs_t, t_ok, offs_f, F, sk_l, sk_f, K_ONE)
            vc = _tile(v, v_base, offs_t, t_ok, offs_d, Dv, sv_l, sv_d, False)
            S, z = _absorb(S, z, kc, vc, g, tl.minimum(Lk - start, BC), rel, t_ok, DECAY, V_DOT)
        for start in range(0, Lq, BC):
            offs_t = start + rel
            t_ok = offs_t < Lq
            qc = _tile(fq, q_base, offs_t, t_ok, offs_f, F, sq_l, sq_f, Q_ONE)
            tl.store(num_out + offs_t[:, None] * Dv + offs_d[None, :],
                     tl.dot(qc.to(QK_DOT), S.to(QK_DOT)), mask=t_ok[:, None] & d_ok[None, :])
            if NEED_DEN:  # one value block writes the row sums
                tl.store(den_out + offs_t, tl.sum(qc.to(tl.float32) * z[None, :], axis=1),
                         mask=t_ok & ((rel * 0 + tl.program_id(1)) == 0))
        _store_state(s_out, z_out, S, z, bh, offs_f, offs_d, F, Dv)


def _dot_dtype(*xs):
    """A dot's input dtype for operands loaded from xs: their common 16-bit dtype (fp32 accumulation),
    else fp32; bf16 is fp32 under the interpreter (launch.upcast_dots)."""
    from . import launch

    dtypes = {x.dtype for x in xs}
    if len(dtypes) == 1 and not launch.upcast_dots(xs[0]):
        return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(xs[0].dtype, tl.float32)
    return tl.float32


def _kernel_forward(fq, fk, v, log_decay, S0, z0, need_den, chunk, causal=True, reverse=False,
                    q_one=False, k_one=False):
    """num [B, H, Lq, Dv], den [B, H, Lq] (or None), S [B, H, F, Dv], z [B, H, F], all fp32, of features
    fq [B, H, Lq, F], fk [B, H, Lk, F] and values v [B, H, Lk, Dv] in any strides and dtypes (read in place).
    reverse: the causal scan runs from the last position to the first; q_one / k_one: fq / fk stop one
    column short of F, the last feature being 1."""
    B, H, L = fq.shape[:3]
    F = fq.shape[-1] + q_one
    assert fk.shape[-1] + k_one == F, (fq.shape, fk.shape, q_one, k_one)
    Lk, Dv = v.shape[2], v.shape[-1]
    BF = min(64, max(16, triton.next_power_of_2(F)))
    BD = min(64, max(16, triton.next_power_of_2(Dv)))
    NF = triton.cdiv(F, BF)
    f32 = {"dtype": torch.float32, "device": fq.device}
    num_part = torch.empty(NF, B * H, L, Dv, **f32)
    den_part = torch.empty(NF, B * H, L, **f32) if need_den else num_part
    S = torch.empty(B * H, F, Dv, **f32)
    z = torch.empty(B * H, F, **f32)
    has_state = S0 is not None
    s0 = S0.detach().float().contiguous() if has_state else S  # the state: small, [F, Dv] per head
    zz0 = z0.detach().float().contiguous() if has_state else z
    grid = (NF, triton.cdiv(Dv, BD), B * H)
    BC = max(16, chunk)
    warps = 8 if BC * BF >= 64 * 64 else 4  # 64 x 64 tiles: 8 warps keep them in registers (no spills)
    strides = (*fq.stride(), *fk.stride(), *v.stride())
    flags = {"HAS_STATE": has_state, "NEED_DEN": need_den, "Q_ONE": q_one, "K_ONE": k_one,
             "QK_DOT": _dot_dtype(fq, fk), "V_DOT": _dot_dtype(v), "BC": BC, "BF": BF, "BD": BD, "num_warps": warps}
    g = torch.zeros(H, **f32) if log_decay is None else log_decay.detach().float().expand(H).contiguous()
    if causal:
        _causal_chunk_fwd[grid](fq, fk, v, g, s0, zz0, num_part, den_part, S, z, *strides, H, L, F, Dv,
                                REVERSE=reverse, **flags)
    else:
        assert not reverse
        _full_fwd[grid](fq, fk, v, g, s0, zz0, num_part, den_part, S, z, *strides, H, L, Lk, F, Dv,
                        DECAY=log_decay is not None, **flags)
    num = num_part.sum(0).view(B, H, L, Dv)
    den = den_part.sum(0).view(B, H, L) if need_den else None
    return num, den, S.view(B, H, F, Dv), z.view(B, H, F)


def _state(fk, v, log_decay, S0, z0, chunk):
    """The state (S, z) after the keys fk and values v: the full kernel with no queries."""
    return _kernel_forward(fk[:, :, :0], fk, v, log_decay, S0, z0, False, chunk, causal=False)[2:]


def _read_state(x, M, chunk):
    """x [B, H, L, F] (any strides and dtype) times M [B, H, F, D] -> [B, H, L, D] fp32: the full kernel
    with M as its state and no keys."""
    B, H = x.shape[:2]
    F, D = M.shape[-2:]
    z0 = torch.zeros(B, H, F, dtype=torch.float32, device=x.device)
    keys = torch.empty(B, H, 0, F, dtype=torch.float32, device=x.device)
    values = torch.empty(B, H, 0, D, dtype=torch.float32, device=x.device)
    return _kernel_forward(x, keys, values, None, M, z0, False, chunk, causal=False)[0]


def _zeros_if_none(x, *shape, device):
    return torch.zeros(*shape, dtype=torch.float32, device=device) if x is None else x.float()


def _kernel_backward(fq, fk, v, log_decay, S0, z0, d_num, d_den, d_S, d_z, need_den, chunk):
    """The causal backward as three more runs of the forward kernel (fixed decay): with the row sums as a
    ones column of v (v+ = [v, 1], dn = [d_num, d_den]) and lam = exp(log_decay),
        dfq_i = sum_{j <= i} lam^(i-j) (dn_i . v+_j) fk_j + lam^(i+1) S0+ dn_i      (a causal scan)
        dfk_j = sum_{i >= j} lam^(i-j) (v+_j . dn_i) fq_i + lam^(L-1-j) (dS v_j + dz)   (reversed in time)
        dv_j  = sum_{i >= j} lam^(i-j) (fq_i . fk_j) dn_i + lam^(L-1-j) dS^T fk_j      (reversed in time)
    and dS0+ = lam sum_i lam^i fq_i dn_i^T + lam^L dS+, the dv scan's final state. Exponents stay
    non-negative. fq, fk and v are read in place (their strides and dtypes); gradients are fp32.
    d_S, d_z (the returned state's gradients) are None when the state was not used."""
    B, H, L = fq.shape[:3]
    Dv = v.shape[-1]
    dev = fq.device
    d_num = _zeros_if_none(d_num, B, H, L, Dv, device=dev)
    dn = torch.cat([d_num, _zeros_if_none(d_den, B, H, L, device=dev).unsqueeze(-1)], -1) if need_den else d_num
    g = torch.zeros(H, dtype=torch.float32, device=dev) if log_decay is None else log_decay.detach().float()
    state = (None, None)
    if S0 is not None:
        S0_aug = torch.cat([S0.float(), z0.float().unsqueeze(-1)], -1) if need_den else S0.float()
        state = (S0_aug.transpose(-1, -2), torch.zeros(B, H, S0_aug.shape[-1], dtype=torch.float32, device=dev))
    dfq = _kernel_forward(dn, v, fk, g, *state, False, chunk, k_one=need_den)[0]
    dfk = _kernel_forward(v, dn, fq, g, None, None, False, chunk, reverse=True, q_one=need_den)[0]
    dv, _, Sd, _ = _kernel_forward(fk, fq, dn if S0 is not None else d_num, g, None, None, False, chunk, reverse=True)
    dv = dv[..., :Dv]
    t = torch.arange(L, dtype=torch.float32, device=dev)
    lam_end = torch.exp(g.view(1, H, 1, 1) * (L - 1 - t).view(1, 1, L, 1))  # lam^(L-1-j)
    if d_S is not None:
        dfk = dfk + lam_end * _read_state(v, d_S.float().transpose(-1, -2), chunk)
        dv = dv + lam_end * _read_state(fk, d_S.float(), chunk)
    if d_z is not None:
        dfk = dfk + lam_end * d_z.float().unsqueeze(-2)
    dS0 = dz0 = None
    if S0 is not None:
        lam, lam_L = torch.exp(g).view(1, H, 1, 1), torch.exp(g * L).view(1, H, 1, 1)
        dS0 = lam * Sd[..., :Dv] + (0 if d_S is None else lam_L * d_S.float())
        dz0 = lam[..., 0] * Sd[..., Dv] if need_den else torch.zeros_like(z0, dtype=torch.float32)
        if d_z is not None:
            dz0 = dz0 + lam_L[..., 0] * d_z.float()
    return dfq, dfk, dv, dS0, dz0


def _full_backward(fq, fk, v, S0, z0, d_num, d_den, d_S, d_z, need_den, chunk):
    """The full mask's backward in four kernel runs: with S+ = [S, z] the state over every key (and S0),
        dfq = dn S+^T,   dS+ = fq^T dn + [d_S, d_z],   dfk_j = dS v_j + dz,   dv_j = dS^T fk_j,
    and the initial state's gradient is dS+ itself. fq, fk and v are read in place."""
    B, H, L, F = fq.shape
    Dv = v.shape[-1]
    dev = fq.device
    d_num = _zeros_if_none(d_num, B, H, L, Dv, device=dev)
    dn = torch.cat([d_num, _zeros_if_none(d_den, B, H, L, device=dev).unsqueeze(-1)], -1) if need_den else d_num
    S, z = _state(fk, v, None, S0, z0, chunk)
    S_aug = torch.cat([S, z.unsqueeze(-1)], -1) if need_den else S
    dfq = _read_state(dn, S_aug.transpose(-1, -2), chunk)
    dS, _ = _state(fq, dn, None, None, None, chunk)
    dSv = dS[..., :Dv] + (0 if d_S is None else d_S.float())
    dz = dS[..., Dv] if need_den else None
    if d_z is not None:
        dz = d_z.float() if dz is None else dz + d_z.float()
    dfk = _read_state(v, dSv.transpose(-1, -2), chunk)
    if dz is not None:
        dfk = dfk + dz.unsqueeze(-2)
    dv = _read_state(fk, dSv, chunk)
    dz0 = torch.zeros(B, H, F, dtype=torch.float32, device=dev) if dz is None else dz
    return dfq, dfk, dv, dSv, dz0


class _CausalChunked(torch.autograd.Function):
    """Forward: the Triton kernel; backward: Triton scans (causal, fixed decay) or products (full mask),
    or autograd through the PyTorch form (recomputed) when the decay needs a gradient."""

    @staticmethod
    def forward(ctx, fq, fk, v, log_decay, S0, z0, need_den, chunk, causal):
        ctx.set_materialize_grads(False)  # an unused state's gradient stays None: no terms for it
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
        d_den = d_den if ctx.need_den else None
        if log_decay is None or not ctx.needs_input_grad[3]:  # Triton
            if ctx.causal:
                grads = _kernel_backward(fq, fk, v, log_decay, S0, z0, d_num, d_den, d_S, d_z, ctx.need_den,
                                         ctx.chunk)
            else:
                grads = _full_backward(fq, fk, v, S0, z0, d_num, d_den, d_S, d_z, ctx.need_den, ctx.chunk)
            dfq, dfk, dv, dS0, dz0 = (None if g is None or x is None else g.to(x.dtype)
                                      for g, x in zip(grads, (fq, fk, v, S0, z0)))
            return dfq, dfk, dv, None, dS0, dz0, None, None, None
        with torch.enable_grad():
            leaves = [None if x is None else x.detach().float().requires_grad_(x.requires_grad) for x in saved]
            fq, fk, v, log_decay, S0, z0 = leaves
            state = None if S0 is None else (S0, z0)
            num, den, (S, z) = causal_chunked_reference(fq, fk, v, log_decay, state, ctx.need_den, ctx.chunk)
            pairs = [(o, d) for o, d in ((num, d_num), (S, d_S), (z, d_z), (den, d_den)) if d is not None]
            wrt = [x for x in leaves if x is not None and x.requires_grad]
            got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [d for _, d in pairs], allow_unused=True)
                       if wrt and pairs else [None] * len(wrt))
        result = [next(got) if (x is not None and x.requires_grad) else None for x in leaves]
        result = [None if r is None else r.to(x.dtype) for r, x in zip(result, saved)]
        return (*result, None, None, None)


def causal_chunked(fq, fk, v, log_decay=None, state=None, need_den=True, chunk=CHUNK):
    """Causal (`j <= i`) num, den and the final state (S, z), forward and backward in Triton (CUDA, or
    the CPU under TRITON_INTERPRET=1): causal_chunked_reference's numbers. fq, fk and v may have any
    strides and be fp32, fp16 or bf16 (each its own): the kernels read them in place. `log_decay`: [H]
    (<= 0) or None; `state`: (S, z) or None."""
    S0, z0 = (None, None) if state is None else state
    num, den, S, z = _CausalChunked.apply(fq, fk, v, log_decay, S0, z0, need_den, chunk, True)
    dtype = _compute_dtype(fq, fk, v)
    return num.to(dtype), (den.to(dtype) if need_den else None), (S, z)


def full(fq, fk, v, state=None, need_den=True, chunk=CHUNK):
    """Every key visible (no decay): full_reference's numbers, forward and backward in Triton (inputs as
    for causal_chunked)."""
    S0, z0 = (None, None) if state is None else state
    num, den, S, z = _CausalChunked.apply(fq, fk, v, None, S0, z0, need_den, chunk, False)
    dtype = _compute_dtype(fq, fk, v)
    return num.to(dtype), (den.to(dtype) if need_den else None), (S, z)


def chunk_state(fk, v, log_decay=None, state=None, chunk=CHUNK):
    """The state after the last key, (S [B, H, F, Dv], z [B, H, F]) in fp32: chunk_state_reference's
    numbers, in Triton (fk and v read in place; a prefill's cache for recurrent_step). Forward only: for
    gradients, take the state that causal_chunked or full returns."""
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (fk, v, log_decay, *(state or ()))):
        raise ValueError("chunk_state: forward only; causal_chunked and full return a differentiable state")
    S0, z0 = (None, None) if state is None else state
    return _state(fk, v, log_decay, S0, z0, chunk)
