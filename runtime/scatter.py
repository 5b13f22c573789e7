"""Gradients of learnable inputs, reduced from the backward kernels' buffers in a fixed order.

The dQ kernel writes, for every read of a learnable input, dL/d(read) either summed per query row
([B, Hq, Lq]: reads that do not depend on the key, such as `slopes[h]`) or per (query, key) pair
([B, Hq, Lq, Lk]: reads such as `bias[kv]` or `rel[h, q - kv + R]`). The host turns a buffer into the
input's gradient here:

- `direct`: a read at bare indices (`bias[h, kv]`) is a sum over the grid axes it does not index and
  a permutation;
- `table_grad`: a small table whose entries the dQ kernel summed already: the query tiles' partials
  summed, then the axes the read does not index;
- `vector_grad`: one side of a dot of feature vectors is the buffer times the other side's vectors;
- `scatter`: a read at index expressions (a table) is a scatter-sum. Many grid entries read the same
  table entry; their contributions are summed by `_segment_sums` in sorted order (a stable sort of the
  entries by table index), one program per table entry. No float atomics: the result is the same bit
  for bit on every run, which is what trained biases (T5, Swin, Graphormer) need.

Every buffer is 4-D here: a row buffer [B, Hq, Lq] is viewed as [B, Hq, Lq, 1].
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

GRID_AXES = 4  # B, Hq, Lq, Lk


def grid_indices(B: int, Hq: int, Lq: int, Lk: int, device) -> tuple[torch.Tensor, ...]:
    """b, h, q and kv as int64 tensors that broadcast over the [B, Hq, Lq, Lk] grid."""
    out = []
    for axis, size in enumerate((B, Hq, Lq, Lk)):
        shape = [1] * GRID_AXES
        shape[axis] = size
        out.append(torch.arange(size, device=device).view(shape))
    return tuple(out)


def _as_grid(buffer: torch.Tensor) -> torch.Tensor:
    return buffer.unsqueeze(-1) if buffer.dim() == GRID_AXES - 1 else buffer


def direct(buffer: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The gradient of a read at bare indices: tensor axis i is grid axis dims[i] (0 = b, 1 = h,
    2 = q, 3 = kv). Sums the other grid axes in torch's fixed order."""
    grid = _as_grid(buffer)
    summed = tuple(d for d in range(GRID_AXES) if d not in dims)
    out = grid.sum(dim=summed) if summed else grid
    kept = sorted(dims)  # out's axes, in grid order
    return out.permute(*[kept.index(d) for d in dims]) if len(dims) > 1 else out


def table_grad(buffer: torch.Tensor, dims: tuple[int, ...], shape) -> torch.Tensor:
    """The gradient of a small table summed per entry by the dQ kernel: buffer [B, Hq, query tiles,
    entries (padded to a power of two)]; `dims`: the grid axes (0 = b, 1 = h) of the table's leading
    subscripts, its own axes following. Sums the query tiles and the grid axes the read does not index."""
    per_head = buffer.sum(dim=2)[..., :math.prod(shape[len(dims):])]  # [B, Hq, entries]
    summed = tuple(d for d in (0, 1) if d not in dims)
    out = per_head.sum(dim=summed) if summed else per_head
    kept = sorted(dims)
    out = out.permute(*[kept.index(d) for d in dims], len(dims))
    return out.reshape(tuple(shape))


def vector_grad(buffer: torch.Tensor, other: torch.Tensor, dims: tuple[int, ...], other_dims: tuple[int, ...]):
    """The gradient of one side of `dot(qr[b, h, q], kr[b, kv])`: buffer [B, Hq, Lq, Lk] holds dL/d(dot)
    per pair; `other` is the other side's input, whose axes are the grid axes `other_dims` and then the
    feature axis; `dims` are this side's grid axes (a query side's among b, h, q; a key side's among
    b, h, kv). Both sides are read at bare indices. A matmul over the other side's tokens, then the
    sums of `direct`."""
    key_side = 3 in dims
    grid = buffer.transpose(2, 3) if key_side else buffer  # [B, Hq, this side's tokens, other side's]
    out = torch.matmul(grid, _on_grid(other.to(grid.dtype), other_dims))  # [B, Hq, this side's tokens, R]
    return direct(out, tuple(2 if d == 3 else d for d in dims) + (3,))


def _on_grid(vectors: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Feature vectors whose axes are the grid axes `dims` then the feature axis, as a
    [B | 1, Hq | 1, tokens | 1, R] tensor (the token axis, q or kv, third)."""
    place = [min(d, 2) for d in dims]
    order = sorted(range(len(dims)), key=lambda i: place[i])
    out = vectors.permute(*order, len(dims))
    for axis in range(3):
        if axis not in place:
            out = out.unsqueeze(axis)
    return out


def scatter(buffer: torch.Tensor, shape: tuple[int, ...], reads: tuple[int, ...], indices) -> torch.Tensor:
    """The gradient of a read at index expressions. `reads`: the grid axes the indices depend on (the
    others are summed first); `indices`: one integer tensor (or int) per tensor axis, broadcasting
    over the grid, already clamped to the axis as the kernels read it."""
    grid = _as_grid(buffer)
    summed = tuple(d for d in range(GRID_AXES) if d not in reads)
    values = grid.sum(dim=summed, keepdim=True) if summed else grid
    flat = torch.zeros((), dtype=torch.int64, device=values.device)
    for size, index in zip(shape, indices):
        flat = flat * size + torch.as_tensor(index, device=values.device).to(torch.int64)
    flat = torch.broadcast_to(flat, values.shape)
    return segment_sums(values, flat, math.prod(shape)).view(shape)


def segment_sums(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """out[e] = the sum of values[i] over every i with index[i] == e, in a fixed order."""
    values = values.reshape(-1).float()
    index = index.reshape(-1)
    order = torch.argsort(index, stable=True)
    ordered = index[order]
    starts = torch.searchsorted(ordered, torch.arange(size + 1, device=index.device, dtype=index.dtype))
    out = torch.empty(size, device=values.device, dtype=torch.float32)
    if size:
        _segment_sums[(size,)](values[order].contiguous(), starts, out, BLOCK=1024)
    return out


@triton.jit
def _segment_sums(VALUES, STARTS, OUT, BLOCK: tl.constexpr):
    """One table entry: the sum of its run of the sorted values, lane by lane and then across lanes."""
    entry = tl.program_id(0)
    start = tl.load(STARTS + entry)
    end = tl.load(STARTS + entry + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for first in range(start, end, BLOCK):
        offs = first + tl.arange(0, BLOCK)
        acc += tl.load(VALUES + offs, mask=offs < end, other=0.0)
    tl.store(OUT + entry, tl.sum(acc, 0))
