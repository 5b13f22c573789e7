"""Merging partial attention results of one row computed in different places (split-KV decoding's
splits, context parallelism's ring steps): each part holds its normalized output o_s and log-sum-exp lse_s over its own keys, and

    lse = log(sum_s exp(lse_s)),   o = sum_s exp(lse_s - lse) * o_s.

A part that saw no key has lse_s = -inf and o_s = 0 and drops out; a row no part saw outputs 0 and an
lse of -inf. One spec-independent kernel serves every softmax-family module's splits; `merge_pair` is the
same merge of two parts in torch (differentiable), for parts that arrive one at a time."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_lse(O_PART, LSE_PART, O, LSE, ROWS, S, Dv, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < S
    lse_s = tl.load(LSE_PART + offs_s * ROWS + row, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)  # [Note] no part saw a key: weights exp(-inf) = 0
    w = tl.exp(lse_s - m_ref)
    total = tl.sum(w, 0)
    o_s = tl.load(O_PART + (offs_s[:, None] * ROWS + row) * Dv + offs_d[None, :],
                  mask=s_ok[:, None] & (offs_d[None, :] < Dv), other=0.0)
    empty = total == 0.0
    total_safe = tl.where(empty, 1.0, total)
    o = tl.sum(o_s * w[:, None], 0) / total_safe
    tl.store(O + row * Dv + offs_d, o.to(O.dtype.element_ty), mask=offs_d < Dv)
    tl.store(LSE + row, tl.where(empty, float("-inf"), m_ref + tl.log(total_safe)))


def merge_lse(o_part: torch.Tensor, lse_part: torch.Tensor, dtype: torch.dtype):
    """o_part [S, *rows, Dv] and lse_part [S, *rows] (fp32, contiguous) -> o [*rows, Dv] in `dtype` and
    lse [*rows] (fp32)."""
    S, Dv = o_part.shape[0], o_part.shape[-1]
    rows_shape = lse_part.shape[1:]
    rows = lse_part[0].numel()
    o = torch.empty((*rows_shape, Dv), device=o_part.device, dtype=dtype)
    lse = torch.empty(rows_shape, device=o_part.device, dtype=torch.float32)
    _merge_lse[(rows,)](o_part, lse_part, o, lse, rows, S, Dv,
                        BLOCK_S=max(2, triton.next_power_of_2(S)), BLOCK_DV=max(16, triton.next_power_of_2(Dv)))
    return o, lse


def merge_pair(o, lse, o_s, lse_s):
    """The merge of a running part (o [..., Dv] fp32, lse [...]; o None for none yet) with a new one
    (o_s, lse_s), in torch: differentiable, and -inf parts drop out as in `merge_lse`."""
    if o is None:
        return o_s.float(), lse_s
    new = torch.logaddexp(lse, lse_s)
    safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
    a = torch.where(torch.isfinite(lse), torch.exp(lse - safe), torch.zeros_like(lse))
    b = torch.where(torch.isfinite(lse_s), torch.exp(lse_s - safe), torch.zeros_like(lse_s))
    return a[..., None] * o + b[..., None] * o_s.float(), new
