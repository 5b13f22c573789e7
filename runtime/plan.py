"""Tile plans: which (query tile, key tile) pairs a kernel visits, and which of them need the mask.

A tile is EMPTY (every pair masked: skipped), FULL (no pair masked: the kernel skips the mask) or
PARTIAL. Generated modules build plans in one of two ways:

* Masks that are one band `lo(q) <= kv <= hi(q)` get their key range per query tile in closed form
  (the kernels compute the same bounds themselves, so no plan reaches them); `from_ranges` turns
  those bounds into a TilePlan for inspection.
* Every other mask is classified by interval analysis (runtime/intervals.py) from the top down: a
  coarse cell (a block of 2^l x 2^l tiles) that is all masked or all unmasked is settled at once,
  others are split in four, down to single tiles. A tile the analysis cannot settle is PARTIAL only
  once one of its sub-cells is shown to hold an unmasked pair (cells shrink down to single pairs,
  where the analysis is exact); otherwise it is EMPTY. So plans are exact, and the work is
  proportional to the tiles on the mask's boundaries, not to Lq * Lk.

Plans are stored as compressed rows (CSR): for every (batch, head, query tile) row, the key tiles
that are FULL and those that are PARTIAL, and transposed (for every key tile, the query tiles) for
the dK/dV kernel. Memory is O(visited tiles + rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EMPTY, PARTIAL, FULL = 0, 1, 2

# Beyond this many sub-cells in flight the existence check of PARTIAL tiles runs in chunks.
_MAX_CELLS = 1 << 21
# Sub-cells kept per tile while looking for an unmasked pair; tiles whose search dies out are
# searched again exhaustively before they are declared EMPTY.
_BEAM = 4


class Summaries:
    """Per-cell minimum and maximum of tensor inputs, for cells aligned to powers of two.

    A tensor read at `doc_ids[b, q]` inside a cell of queries [c * S, (c + 1) * S) takes values in
    [min, max] of that block; the blocks of size S come from those of size S / 2 (a pyramid), so
    every size costs O(L) once and each lookup is a gather."""

    def __init__(self):
        self._cache = {}

    def block_min_max(self, tensor: torch.Tensor, axis: int, size: int):
        key = (id(tensor), axis, size)
        if key not in self._cache:
            if size == 1:
                x = tensor.movedim(axis, -1)
                x = x.long() if x.dtype == torch.bool else x
                self._cache[key] = (x, x, tensor)  # keeps tensor alive while its id is a key
            else:
                lo, hi, _ = self.block_min_max(tensor, axis, size // 2)
                self._cache[key] = (_pairs(lo, torch.amin, _top(lo)), _pairs(hi, torch.amax, _bottom(hi)), tensor)
        return self._cache[key]


def _top(x):
    return torch.iinfo(x.dtype).max if not x.is_floating_point() else float("inf")


def _bottom(x):
    return torch.iinfo(x.dtype).min if not x.is_floating_point() else float("-inf")


def _pairs(x, reduce, pad_value):
    if x.shape[-1] % 2:
        x = torch.cat([x, x.new_full((*x.shape[:-1], 1), pad_value)], dim=-1)
    return reduce(x.view(*x.shape[:-1], x.shape[-1] // 2, 2), dim=-1)


class Cells:
    """A batch of N cells at one refinement level, as the generated `_mask_cells` reads them.

    `q`, `kv`, `b`, `h` are intervals (lo, hi); `load` reads a tensor input over each cell."""

    def __init__(self, g, q_lo, q_size, kv_lo, kv_size, Lq, Lk, heads, summaries):
        self.b_index = torch.div(g, heads, rounding_mode="floor")
        self.h_index = g % heads
        self.b = (self.b_index, self.b_index)
        self.h = (self.h_index, self.h_index)
        self.q = (q_lo, torch.clamp(q_lo + q_size, max=Lq) - 1)
        self.kv = (kv_lo, torch.clamp(kv_lo + kv_size, max=Lk) - 1)
        self.q_size, self.kv_size = q_size, kv_size
        self.summaries = summaries

    def load(self, tensor: torch.Tensor, *indices: str):
        """min and max of tensor[indices] over each cell; indices name b, h, q or kv per axis."""
        ranged = [axis for axis, name in enumerate(indices) if name in ("q", "kv")]
        sizes = {"q": self.q_size, "kv": self.kv_size}
        points = {"b": self.b_index, "h": self.h_index}
        if len(ranged) > 1 and any(sizes[indices[a]] > 1 for a in ranged):
            # read over two ranges at once: the whole tensor's range still bounds it
            lo, hi = tensor.min(), tensor.max()
            n = self.q[0].shape[0]
            return lo.expand(n), hi.expand(n)
        if not ranged:
            index = tuple(points[name] for name in indices)
            return tensor[index], tensor[index]
        axis = ranged[0]
        name = indices[axis]
        size = sizes[name]
        lo, hi, _ = self.summaries.block_min_max(tensor, axis, size)
        cell = torch.div((self.q if name == "q" else self.kv)[0], size, rounding_mode="floor")
        index = tuple(points[n] if n in points else cell for a, n in enumerate(indices) if a != axis) + (cell,)
        return lo[index], hi[index]


@dataclass
class TilePlan:
    """The tiles one problem size visits. Rows are (batch, head, query tile) with batch and head
    collapsed to 1 when the mask does not depend on them."""

    block_m: int
    block_n: int
    Lq: int
    Lk: int
    batch: int  # B, or 1 when the mask ignores b
    heads: int  # Hq, or 1 when the mask ignores h
    # CSR by query tile: key tiles of row r are index[offsets[r]:offsets[r + 1]]
    q_full_offsets: torch.Tensor
    q_full_index: torch.Tensor
    q_partial_offsets: torch.Tensor
    q_partial_index: torch.Tensor
    # CSR by key tile (rows are (batch, head, key tile)): the query tiles that read it
    kv_full_offsets: torch.Tensor
    kv_full_index: torch.Tensor
    kv_partial_offsets: torch.Tensor
    kv_partial_index: torch.Tensor

    @property
    def tiles_q(self) -> int:
        return -(-self.Lq // self.block_m)

    @property
    def tiles_k(self) -> int:
        return -(-self.Lk // self.block_n)

    @property
    def tiles_full(self) -> int:
        return int(self.q_full_index.numel())

    @property
    def tiles_partial(self) -> int:
        return int(self.q_partial_index.numel())

    @property
    def tiles_visited(self) -> int:
        return self.tiles_full + self.tiles_partial

    @property
    def tiles_total(self) -> int:
        return self.batch * self.heads * self.tiles_q * self.tiles_k

    @property
    def density(self) -> float:
        return self.tiles_visited / max(self.tiles_total, 1)

    @property
    def device(self) -> torch.device:
        return self.q_full_index.device

    def to_dense(self) -> torch.Tensor:
        """The classes as an int8 tensor [batch, heads, tiles_q, tiles_k]: 0 EMPTY, 1 PARTIAL, 2 FULL
        (for inspection at small sizes: this is the one O(tiles_q * tiles_k) object)."""
        dense = torch.zeros(self.batch * self.heads * self.tiles_q, self.tiles_k, dtype=torch.int8)
        for offsets, index, cls in ((self.q_full_offsets, self.q_full_index, FULL),
                                    (self.q_partial_offsets, self.q_partial_index, PARTIAL)):
            rows = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff().long().cpu())
            dense[rows, index.long().cpu()] = cls
        return dense.view(self.batch, self.heads, self.tiles_q, self.tiles_k)

    def kernel_args(self) -> tuple:
        """The plan as the kernels take it (forward and dQ read rows by query tile, dK/dV by key tile)."""
        return (self.q_full_offsets, self.q_full_index, self.q_partial_offsets, self.q_partial_index,
                self.kv_full_offsets, self.kv_full_index, self.kv_partial_offsets, self.kv_partial_index)

    def __repr__(self) -> str:
        return (f"TilePlan(Lq={self.Lq}, Lk={self.Lk}, block={self.block_m}x{self.block_n}, "
                f"batch={self.batch}, heads={self.heads}, visited={self.tiles_visited}/{self.tiles_total} "
                f"(full {self.tiles_full}, partial {self.tiles_partial}), density={self.density:.4f})")


def _csr(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int):
    """Sorted (rows, cols) pairs -> (offsets int32 [n_rows + 1], cols int32)."""
    order = torch.argsort(rows * n_cols + cols)
    counts = torch.bincount(rows, minlength=n_rows)
    offsets = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets.to(torch.int32), cols[order].to(torch.int32)


def from_tiles(full, partial, *, block_m, block_n, Lq, Lk, batch, heads) -> TilePlan:
    """A plan from the (group, query tile, key tile) triples of its FULL and PARTIAL tiles, where
    group = batch index * heads + head index."""
    tq, tk = -(-Lq // block_m), -(-Lk // block_n)
    lists = []
    for g, i, j in (full, partial):
        lists.append(_csr(g * tq + i, j, batch * heads * tq, tk))
    for g, i, j in (full, partial):
        lists.append(_csr(g * tk + j, i, batch * heads * tk, tq))
    (qf, qfi), (qp, qpi), (kf, kfi), (kp, kpi) = lists
    return TilePlan(block_m, block_n, Lq, Lk, batch, heads, qf, qfi, qp, qpi, kf, kfi, kp, kpi)


def from_ranges(n_lo, n_hi, full_lo, full_hi, *, block_m, block_n, Lq, Lk, batch=1, heads=1) -> TilePlan:
    """A plan for a band mask from, per query tile, the first and last key touched (n_lo, n_hi) and
    the keys every query of the tile sees (full_lo..full_hi; empty when full_lo > full_hi); tensors
    [batch * heads * tiles_q]. Tiles meeting [n_lo, n_hi] are visited; those inside the full range
    are FULL. This is the computation the kernels do for such masks, done once on the host."""
    tk = -(-Lk // block_n)
    first = torch.div(n_lo.clamp(min=0), block_n, rounding_mode="floor")
    last = torch.div(n_hi.clamp(max=Lk - 1), block_n, rounding_mode="floor")
    count = (last - first + 1).clamp(min=0)
    count = torch.where(n_lo > n_hi, 0, count)
    rows = torch.repeat_interleave(torch.arange(count.numel(), device=count.device), count)
    start = torch.repeat_interleave(first, count)
    step = torch.arange(rows.numel(), device=count.device) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    j = start + step
    n0, n1 = j * block_n, torch.clamp(j * block_n + block_n, max=Lk) - 1
    is_full = (full_lo[rows] <= n0) & (n1 <= full_hi[rows])
    tq = -(-Lq // block_m)
    g, i = torch.div(rows, tq, rounding_mode="floor"), rows % tq
    return from_tiles((g[is_full], i[is_full], j[is_full]), (g[~is_full], i[~is_full], j[~is_full]),
                      block_m=block_m, block_n=block_n, Lq=Lq, Lk=Lk, batch=batch, heads=heads)


def classify(mask_cells, *, Lq, Lk, block_m, block_n, batch=1, heads=1, device="cpu") -> TilePlan:
    """The exact plan of a mask given as `mask_cells(cells) -> (all, any)` (see module docstring)."""
    tq, tk = -(-Lq // block_m), -(-Lk // block_n)
    summaries = Summaries()
    groups = batch * heads

    def evaluate(g, q_lo, q_size, kv_lo, kv_size):
        all_, any_ = mask_cells(Cells(g, q_lo, q_size, kv_lo, kv_size, Lq, Lk, heads, summaries))
        n = g.shape[0]
        return _as_mask(all_, n, g.device), _as_mask(any_, n, g.device)

    # -- top down over blocks of 2^level x 2^level tiles --
    level = 0
    while (tq - 1) >> level >= 8 or (tk - 1) >> level >= 8:
        level += 1
    nq, nk = ((tq - 1) >> level) + 1, ((tk - 1) >> level) + 1
    g, i, j = torch.meshgrid(torch.arange(groups, device=device), torch.arange(nq, device=device),
                             torch.arange(nk, device=device), indexing="ij")
    g, i, j = g.reshape(-1), i.reshape(-1), j.reshape(-1)
    full = []
    while True:
        span_q, span_k = block_m << level, block_n << level
        all_, any_ = evaluate(g, i * span_q, span_q, j * span_k, span_k)
        full.append(_expand(g[all_], i[all_], j[all_], level, tq, tk))
        open_ = any_ & ~all_
        g, i, j = g[open_], i[open_], j[open_]
        if level == 0:
            break
        level -= 1
        g, i, j = _children(g, i, j, (tq - 1) >> level, (tk - 1) >> level)
    nonempty = _has_unmasked_pair(evaluate, g, i, j, block_m, block_n, Lq, Lk)
    full = tuple(torch.cat(parts) for parts in zip(*full))
    partial = (g[nonempty], i[nonempty], j[nonempty])
    return from_tiles(full, partial, block_m=block_m, block_n=block_n, Lq=Lq, Lk=Lk, batch=batch, heads=heads)


def _as_mask(x, n, device):
    if isinstance(x, torch.Tensor):
        return x.expand(n) if x.dim() == 0 else x
    return torch.full((n,), bool(x), dtype=torch.bool, device=device)


def _children(g, i, j, last_i, last_j):
    """The four sub-blocks of each block, without those past the grid's last row or column."""
    di = torch.tensor([0, 0, 1, 1], device=g.device)
    dj = torch.tensor([0, 1, 0, 1], device=g.device)
    ci = (2 * i[:, None] + di).reshape(-1)
    cj = (2 * j[:, None] + dj).reshape(-1)
    cg = g.repeat_interleave(4)
    keep = (ci <= last_i) & (cj <= last_j)
    return cg[keep], ci[keep], cj[keep]


def _expand(g, i, j, level, tq, tk):
    """Blocks of 2^level x 2^level tiles -> their tiles inside the grid."""
    if level == 0:
        return g, i, j
    side = 1 << level
    di = torch.arange(side, device=g.device).repeat_interleave(side)
    dj = torch.arange(side, device=g.device).repeat(side)
    ti = (i[:, None] * side + di).reshape(-1)
    tj = (j[:, None] * side + dj).reshape(-1)
    tg = g.repeat_interleave(side * side)
    keep = (ti < tq) & (tj < tk)
    return tg[keep], ti[keep], tj[keep]


def _has_unmasked_pair(evaluate, g, i, j, block_m, block_n, Lq, Lk):
    """For tiles the analysis left open: does each hold at least one unmasked pair?

    Sub-cells halve down to single pairs, where the analysis is exact. A tile is settled as soon as one
    sub-cell is all unmasked; a beam of a few open sub-cells per tile keeps the search cheap, and tiles
    whose beam dies out are searched again keeping every open sub-cell, so EMPTY is always proven."""
    n = g.shape[0]
    found = torch.zeros(n, dtype=torch.bool, device=g.device)
    if n == 0:
        return found
    for start in range(0, n, max(1, _MAX_CELLS // 64)):
        tiles = torch.arange(start, min(n, start + _MAX_CELLS // 64), device=g.device)
        beam = _search(evaluate, g, i, j, tiles, block_m, block_n, Lq, Lk, _BEAM)
        found[tiles] = beam
        retry = tiles[~beam]
        if retry.numel():
            found[retry] = _search(evaluate, g, i, j, retry, block_m, block_n, Lq, Lk, None)
    return found


def _search(evaluate, g, i, j, tiles, block_m, block_n, Lq, Lk, beam):
    found = torch.zeros(tiles.numel(), dtype=torch.bool, device=g.device)
    owner = torch.arange(tiles.numel(), device=g.device)  # sub-cell -> position in `tiles`
    q_lo, kv_lo = i[tiles] * block_m, j[tiles] * block_n
    sm, sn = block_m, block_n
    while owner.numel() and (sm > 1 or sn > 1):
        hm, hn = max(sm // 2, 1), max(sn // 2, 1)
        dq = torch.arange(0, sm, hm, device=g.device)
        dk = torch.arange(0, sn, hn, device=g.device)
        per = dq.numel() * dk.numel()
        owner = owner.repeat_interleave(per)
        q_lo = (q_lo[:, None, None] + dq[None, :, None]).expand(-1, dq.numel(), dk.numel()).reshape(-1)
        kv_lo = (kv_lo[:, None, None] + dk[None, None, :]).expand(-1, dq.numel(), dk.numel()).reshape(-1)
        inside = (q_lo < Lq) & (kv_lo < Lk)  # the grid's last tiles may be cut short
        owner, q_lo, kv_lo = owner[inside], q_lo[inside], kv_lo[inside]
        sm, sn = hm, hn
        cg = g[tiles][owner]
        all_, any_ = evaluate(cg, q_lo, sm, kv_lo, sn)
        found[owner[all_]] = True
        keep = any_ & ~all_ & ~found[owner]
        owner, q_lo, kv_lo = owner[keep], q_lo[keep], kv_lo[keep]
        if beam is not None and owner.numel():
            # the first `beam` open sub-cells of each tile
            rank = torch.arange(owner.numel(), device=g.device) - torch.searchsorted(owner, owner)
            keep = rank < beam
            owner, q_lo, kv_lo = owner[keep], q_lo[keep], kv_lo[keep]
    return found
