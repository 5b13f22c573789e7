"""Tile plans: which (query tile, key tile) pairs a kernel visits, and which of them need the mask.

A tile is EMPTY (every pair masked: skipped), FULL (no pair masked: the kernel skips the mask) or
PARTIAL. Generated modules build plans in one of two ways:

* Masks that are one band `lo(q) <= kv <= hi(q)` get their key range per query tile in closed form
  (the kernels compute the same bounds themselves, so no plan reaches them); `from_ranges` turns
  those bounds into a TilePlan for inspection.
* Every other mask is classified by interval analysis (runtime/intervals.py) from the top down: a
  coarse cell (a block of 2^l x 2^l tiles) that is all masked or all unmasked is settled at once,
  others are split in four, down to single tiles. A tile the analysis leaves open is searched for an
  unmasked pair in sub-cells that shrink down to single pairs, where the analysis is exact: EMPTY
  if there is none, PARTIAL otherwise (and PARTIAL, which is always safe, past a work budget). The
  work follows the tiles on the mask's boundaries and the tiles visited, never Lq * Lk.

Plans are stored as compressed rows (CSR) of runs: for every (batch, head, query tile) row, runs of
consecutive key tiles that are FULL and runs that are PARTIAL, and transposed (for every key tile,
runs of query tiles) for the dK/dV kernel. Memory is O(runs + rows), at most O(visited tiles).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from . import checks

EMPTY, PARTIAL, FULL = 0, 1, 2

# Cells evaluated at once: bounds the interval evaluation's temporary memory.
_CHUNK = 1 << 18
# Sub-cells evaluated at most while proving that open tiles hold an unmasked pair.
_SEARCH_BUDGET = 1 << 20


class Summaries:
    """Per-cell minimum and maximum of tensor inputs, for cells aligned to powers of two.

    A tensor read at `doc_ids[b, q]` inside a cell of queries [c * S, (c + 1) * S) takes values in
    [min, max] of that block; one read at `m[q, kv]` inside a cell of S queries x T keys takes values in
    [min, max] of that S x T block of m (one block along every token axis the read ranges over). The
    blocks of a size are reduced from the largest smaller size already summarized (a pyramid), so
    every size costs O(tensor) at most once and each lookup is a gather."""

    def __init__(self):
        self._cache = {}

    def block_min_max(self, tensor: torch.Tensor, blocks: tuple):
        """(lo, hi): tensor reduced in blocks of `size` along each `axis` of `blocks`, a tuple of
        (axis, size) pairs with distinct axes, sizes powers of two; other axes are kept."""
        blocks = tuple(sorted(blocks))
        axes = tuple(a for a, _ in blocks)
        sizes = tuple(s for _, s in blocks)
        key = (id(tensor), axes, sizes)
        if key not in self._cache:
            if all(s == 1 for s in sizes):
                x = tensor.long() if tensor.dtype == torch.bool else tensor
                self._cache[key] = (x, x, tensor)  # keeps tensor alive while its id is a key
            else:
                # from the largest block size already summarized that divides this one (all sizes are
                # powers of two, so every smaller size along each axis divides)
                finer = [k[2] for k in self._cache if k[:2] == (id(tensor), axes)
                         and all(f <= s for f, s in zip(k[2], sizes)) and k[2] != sizes]
                finer = max(finer, key=lambda f: _prod(f), default=(1,) * len(sizes))
                lo, hi, _ = self.block_min_max(tensor, tuple(zip(axes, finer)))
                for axis, f, s in zip(axes, finer, sizes):
                    lo = _blocks(lo, axis, s // f, torch.amin, _top(lo))
                    hi = _blocks(hi, axis, s // f, torch.amax, _bottom(hi))
                self._cache[key] = (lo, hi, tensor)
        return self._cache[key]


def _prod(xs):
    out = 1
    for x in xs:
        out *= x
    return out


def _top(x):
    return torch.iinfo(x.dtype).max if not x.is_floating_point() else float("inf")


def _bottom(x):
    return torch.iinfo(x.dtype).min if not x.is_floating_point() else float("-inf")


def _steps(counts: torch.Tensor) -> torch.Tensor:
    """0, 1, ..., counts[0] - 1, 0, 1, ..., counts[1] - 1, ...: each element's place in its segment of
    a repeat_interleave by `counts`."""
    total = torch.arange(int(counts.sum()), device=counts.device)
    return total - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)


def _blocks(x, axis, factor, reduce, pad_value):
    """Reduce `axis` in blocks of `factor` (the last block padded with a neutral value)."""
    if factor == 1:
        return x
    x = x.movedim(axis, -1)
    pad = -x.shape[-1] % factor
    if pad:
        x = torch.cat([x, x.new_full((*x.shape[:-1], pad), pad_value)], dim=-1)
    x = reduce(x.reshape(*x.shape[:-1], x.shape[-1] // factor, factor), dim=-1)
    return x.movedim(-1, axis)


class Cells:
    """A batch of N cells at one refinement level, as the generated `_mask_cells` reads them.

    `q`, `kv`, `b`, `h` are intervals (lo, hi); `load` reads a tensor input over each cell."""

    def __init__(self, g, q_lo, q_size, kv_lo, kv_size, sizes, heads, summaries):
        Lq, Lk = sizes["Lq"][0], sizes["Lk"][0]
        self.b_index = torch.div(g, heads, rounding_mode="floor")
        self.h_index = g % heads
        self.b = (self.b_index, self.b_index)
        self.h = (self.h_index, self.h_index)
        self.q = (q_lo, torch.clamp(q_lo + q_size, max=Lq) - 1)
        self.kv = (kv_lo, torch.clamp(kv_lo + kv_size, max=Lk) - 1)
        self.q_size, self.kv_size = q_size, kv_size
        self.sizes = sizes  # B, Hq, Hk, Hv, Lq, Lk as exact intervals
        self.summaries = summaries

    def load(self, tensor: torch.Tensor, *indices: str):
        """min and max of tensor[indices] over each cell; indices name b, h, q or kv per axis.

        Every axis indexed by q or kv is read over the cell's range of that index (a block of the
        summaries), every axis indexed by b or h at the cell's point: exact on single pairs, and for
        a tensor indexed by both q and kv (`m[q, kv]`) the bound of exactly the cell's rectangle."""
        sizes = {"q": self.q_size, "kv": self.kv_size}
        starts = {"q": self.q[0], "kv": self.kv[0]}
        points = {"b": self.b_index, "h": self.h_index}
        blocks = tuple((axis, sizes[name]) for axis, name in enumerate(indices) if name in sizes)
        lo, hi, _ = self.summaries.block_min_max(tensor, blocks) if blocks else (tensor, tensor, None)
        index = tuple(points[name] if name in points
                      else torch.div(starts[name], sizes[name], rounding_mode="floor")
                      for name in indices)
        return lo[index], hi[index]


    def load_at(self, tensor: torch.Tensor, *index):
        """Bounds of tensor[index] over each cell, for a tensor read at index expressions (a table axis,
        a gather such as offsets[doc[q]]); `index` holds an interval (lo, hi) per axis. Where every
        index is one point (always so on single pairs) the value itself: exact; elsewhere the whole
        tensor's min and max, which bound a read at any index (sound, not tight)."""
        x = tensor.to(torch.int64) if tensor.dtype == torch.bool else tensor
        n = self.q[0].shape[0]
        point = torch.ones(n, dtype=torch.bool, device=x.device)
        at = []
        for axis, (lo, hi) in enumerate(index):
            lo = torch.as_tensor(lo, device=x.device).expand(n)
            hi = torch.as_tensor(hi, device=x.device).expand(n)
            point &= lo == hi
            at.append(lo.long().clamp(0, x.shape[axis] - 1))
        exact = x[tuple(at)]
        return torch.where(point, exact, x.amin()), torch.where(point, exact, x.amax())


class Runs:
    """Compressed rows of tile runs: row r holds runs[offsets[r]:offsets[r + 1]], each run a pair
    (first tile, number of tiles) along the other axis. Runs, not single tiles: a document's or a
    causal mask's FULL tiles are one run per row, so plans stay small where masks are dense."""

    def __init__(self, offsets: torch.Tensor, runs: torch.Tensor):
        self.offsets = offsets  # int32 [rows + 1]
        self.runs = runs  # int32 [n, 2]

    @staticmethod
    def build(rows: torch.Tensor, first: torch.Tensor, length: torch.Tensor, n_rows: int, n_cols: int) -> Runs:
        """Runs from unordered (row, first, length) triples that never overlap; touching runs merge."""
        device = rows.device
        rows, first, length = rows.long(), first.long(), length.long()
        if rows.numel():
            order = torch.argsort(rows * (n_cols + 1) + first)
            rows, first, length = rows[order], first[order], length[order]
            joins = torch.zeros_like(rows, dtype=torch.bool)
            joins[1:] = (rows[1:] == rows[:-1]) & (first[1:] == first[:-1] + length[:-1])
            group = torch.cumsum(~joins, 0) - 1
            heads = ~joins
            merged_len = torch.zeros(int(heads.sum()), dtype=length.dtype, device=device).index_add_(0, group, length)
            rows, first, length = rows[heads], first[heads], merged_len
        counts = torch.bincount(rows, minlength=n_rows)
        offsets = torch.zeros(n_rows + 1, dtype=torch.int64, device=device)
        offsets[1:] = torch.cumsum(counts, 0)
        runs = torch.stack([first, length], dim=1) if rows.numel() else torch.zeros((0, 2), dtype=torch.int64, device=device)
        return Runs(offsets.to(torch.int32), runs.to(torch.int32))

    @property
    def tiles(self) -> int:
        return int(self.runs[:, 1].sum()) if self.runs.numel() else 0

    def expand(self):
        """(row, column) of every tile in the runs."""
        device = self.runs.device
        rows = torch.repeat_interleave(torch.arange(self.offsets.numel() - 1, device=device), self.offsets.diff().long())
        length = self.runs[:, 1].long()
        tile_rows = torch.repeat_interleave(rows, length)
        start = torch.repeat_interleave(self.runs[:, 0].long(), length)
        return tile_rows, start + _steps(length)


class _TensorStamp:
    """Which tensor a plan read, and in which state: the tensor itself (weakly held), its storage
    address and its version counter (bumped by every in-place change)."""

    def __init__(self, tensor: torch.Tensor):
        self.ref = weakref.ref(tensor)
        self.data_ptr = tensor.data_ptr()
        self.version = tensor._version
        self.shape = tuple(tensor.shape)

    def differs(self, tensor: torch.Tensor) -> str | None:
        """Why `tensor` is not what the plan read (None when it is)."""
        if self.ref() is not tensor or tensor.data_ptr() != self.data_ptr:
            return "a different tensor"
        if tensor._version != self.version:
            return "the same tensor, modified in place since"
        return None


@dataclass
class BuiltFor:
    """What a plan depends on: the spec (name and content hash), the sizes and tile sizes, the values
    of the params its mask reads and the tensor inputs it read. A call given `plan=` compares its own
    with the plan's and refuses a plan built for anything else."""

    spec: str
    spec_hash: str
    sizes: dict  # the sizes the mask depends on (Lq, Lk always)
    blocks: tuple  # (block_m, block_n)
    params: dict  # name -> value, the params the mask reads
    tensors: dict  # name -> _TensorStamp, the tensor inputs the mask reads

    @staticmethod
    def of(spec, spec_hash, *, sizes, blocks, params, tensors) -> BuiltFor:
        return BuiltFor(spec, spec_hash, dict(sizes), tuple(blocks), dict(params),
                        {name: _TensorStamp(t) for name, t in tensors.items()})


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
    q_full: Runs  # by (batch, head, query tile): runs of key tiles
    q_partial: Runs
    _kv_lists: tuple | None = None  # by (batch, head, key tile): runs of query tiles (FULL, PARTIAL)
    built_for: BuiltFor | None = None  # what the plan was built for (set by a generated plan())

    @property
    def tiles_q(self) -> int:
        return -(-self.Lq // self.block_m)

    @property
    def tiles_k(self) -> int:
        return -(-self.Lk // self.block_n)

    @property
    def tiles_full(self) -> int:
        return self.q_full.tiles

    @property
    def tiles_partial(self) -> int:
        return self.q_partial.tiles

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
    def kv_lists(self) -> tuple:
        """(FULL, PARTIAL) runs by key tile, for the dK/dV kernel (built from the rows if needed)."""
        if self._kv_lists is None:
            tq, tk = self.tiles_q, self.tiles_k
            lists = []
            for runs in (self.q_full, self.q_partial):
                row, col = runs.expand()
                g, i = torch.div(row, tq, rounding_mode="floor"), row % tq
                lists.append(Runs.build(g * tk + col, i, torch.ones_like(i), self.batch * self.heads * tk, tq))
            self._kv_lists = tuple(lists)
        return self._kv_lists

    def to_dense(self) -> torch.Tensor:
        """The classes as an int8 tensor [batch, heads, tiles_q, tiles_k] on the CPU: 0 EMPTY, 1 PARTIAL,
        2 FULL (for inspection at small sizes: this is the one O(tiles_q * tiles_k) object)."""
        return self.classes().cpu()

    def classes(self) -> torch.Tensor:
        """`to_dense` on the plan's device (a select restricts the classes there: `restrict`)."""
        device = self.q_full.offsets.device
        dense = torch.zeros(self.batch * self.heads * self.tiles_q, self.tiles_k, dtype=torch.int8, device=device)
        for runs, cls in ((self.q_full, FULL), (self.q_partial, PARTIAL)):
            rows, cols = runs.expand()
            dense[rows, cols] = cls
        return dense.view(self.batch, self.heads, self.tiles_q, self.tiles_k)

    def kernel_args(self) -> tuple:
        """The plan as the kernels take it (forward and dQ read rows by query tile, dK/dV by key tile)."""
        kv_full, kv_partial = self.kv_lists
        return (self.q_full.offsets, self.q_full.runs, self.q_partial.offsets, self.q_partial.runs,
                kv_full.offsets, kv_full.runs, kv_partial.offsets, kv_partial.runs)

    def __repr__(self) -> str:
        return (f"TilePlan(Lq={self.Lq}, Lk={self.Lk}, block={self.block_m}x{self.block_n}, "
                f"batch={self.batch}, heads={self.heads}, visited={self.tiles_visited}/{self.tiles_total} "
                f"(full {self.tiles_full}, partial {self.tiles_partial}), density={self.density:.4f})")


def from_blocks(full, partial, *, block_m, block_n, Lq, Lk, batch, heads) -> TilePlan:
    """A plan from square blocks of tiles: `full` holds (group, block row, block column, side) of
    FULL blocks of side x side tiles (group = batch index * heads + head index), `partial` holds
    (group, query tile, key tile) of PARTIAL tiles."""
    tq, tk = -(-Lq // block_m), -(-Lk // block_n)
    g, i, j, side = full
    # every query tile row a block covers gets one run of key tiles, and every key tile column one run
    # of query tiles (for the transposed lists)
    q_full = _block_runs(g, i, j, side, batch * heads, tq, tk)
    kv_full = _block_runs(g, j, i, side, batch * heads, tk, tq)
    pg, pi, pj = partial
    ones = torch.ones_like(pi)
    q_partial = Runs.build(pg * tq + pi, pj, ones, batch * heads * tq, tk)
    kv_partial = Runs.build(pg * tk + pj, pi, ones, batch * heads * tk, tq)
    return TilePlan(block_m, block_n, Lq, Lk, batch, heads, q_full, q_partial, (kv_full, kv_partial))


def from_classes(classes: torch.Tensor, *, block_m, block_n, Lq, Lk) -> TilePlan:
    """A plan from its classes, int8 [batch, heads, tiles_q, tiles_k] (0 EMPTY, 1 PARTIAL, 2 FULL), on
    their device: the rows and the transposed lists, one run per tile before touching runs merge."""
    batch, heads, tq, tk = classes.shape
    lists = []
    for cls in (FULL, PARTIAL):
        row, j = (classes == cls).reshape(batch * heads * tq, tk).nonzero(as_tuple=True)
        g, i = torch.div(row, tq, rounding_mode="floor"), row % tq
        ones = torch.ones_like(j)
        lists.append((Runs.build(row, j, ones, batch * heads * tq, tk), Runs.build(g * tk + j, i, ones, batch * heads * tk, tq)))
    (q_full, kv_full), (q_partial, kv_partial) = lists
    return TilePlan(block_m, block_n, Lq, Lk, batch, heads, q_full, q_partial, (kv_full, kv_partial))


def _block_runs(g, major, minor, side, groups, n_major, n_minor) -> Runs:
    """Square blocks (group, major, minor, side) of side x side tiles -> one run along `minor` for each
    row along `major` a block covers (rows past n_major and tiles past n_minor cut off)."""
    span = torch.clamp(n_major - major * side, max=side)
    row_g, row_major, row_minor, row_side = (x.repeat_interleave(span) for x in (g, major, minor, side))
    rows = row_g * n_major + row_major * row_side + _steps(span)
    return Runs.build(rows, row_minor * row_side, torch.clamp(n_minor - row_minor * row_side, max=row_side),
                      groups * n_major, n_minor)


def from_ranges(n_lo, n_hi, full_lo, full_hi, *, block_m, block_n, Lq, Lk, batch=1, heads=1) -> TilePlan:
    """A plan for a band mask from, per query tile, the first and last key touched (n_lo, n_hi) and
    the keys every query of the tile sees (full_lo..full_hi; empty when full_lo > full_hi); tensors
    [batch * heads * tiles_q]. Tiles meeting [n_lo, n_hi] are visited; those inside the full range
    are FULL. This is the computation the kernels do for such masks, done once on the host."""
    tk = -(-Lk // block_n)
    rows = torch.arange(n_lo.numel(), device=n_lo.device)
    visited = n_lo.clamp(min=0) <= n_hi.clamp(max=Lk - 1)
    first = torch.div(n_lo.clamp(min=0), block_n, rounding_mode="floor")
    last = torch.div(n_hi.clamp(max=Lk - 1), block_n, rounding_mode="floor")
    # FULL tiles: those inside [full_lo, full_hi], with the last key tile cut at Lk
    full_first = torch.div(full_lo.clamp(min=0) + block_n - 1, block_n, rounding_mode="floor")
    full_last = torch.where(full_hi >= Lk - 1, tk - 1, torch.div(full_hi + 1, block_n, rounding_mode="floor") - 1)
    full_first, full_last = torch.maximum(full_first, first), torch.minimum(full_last, last)
    has_full = visited & (full_first <= full_last)
    before_last = torch.where(has_full, full_first - 1, last)
    after_first = torch.where(has_full, full_last + 1, last + 1)
    q_full = Runs.build(rows[has_full], full_first[has_full], (full_last - full_first + 1)[has_full], rows.numel(), tk)
    pieces = [(visited & (first <= before_last), first, before_last), (visited & has_full & (after_first <= last), after_first, last)]
    p_rows = torch.cat([rows[keep] for keep, _, _ in pieces])
    p_first = torch.cat([a[keep] for keep, a, _ in pieces])
    p_len = torch.cat([(b - a + 1)[keep] for keep, a, b in pieces])
    q_partial = Runs.build(p_rows, p_first, p_len, rows.numel(), tk)
    return TilePlan(block_m, block_n, Lq, Lk, batch, heads, q_full, q_partial)


def band_reach(band, q_first, b_idx, h_idx, *, Lq, Lk, block_m):
    """Per query tile of a band mask lo(q) <= kv <= hi(q) (bounds non-decreasing in q): the keys its
    rows reach, (n_lo, n_hi) = [lo(first row that sees a key), hi(last such row)] ((Lk, -1) when no row
    does: a zero-width band), and the keys every row sees, (full_lo, full_hi) = [lo(last), hi(first)].
    `band(q_pos, b_idx, h_idx) -> (lo, hi)`; tensors [tiles] (b_idx, h_idx None where unused).

    O(tiles): the bounds are read at each tile's first and last query. A row sees a key when
    max(lo, 0) <= min(hi, Lk - 1); by monotonicity, when both corner rows do they are the first and last
    such rows, and when max(lo(first), 0) > min(hi(last), Lk - 1) no row does. Only tiles between (a
    corner row sees nothing but a middle one may, e.g. where the window passes Lk) go row by row
    (band_rows), a few per batch entry and head for the catalog's bands."""
    q_last = torch.clamp(q_first + block_m, max=Lq) - 1
    lo_first, hi_first = band(q_first, b_idx, h_idx)
    lo_last, hi_last = band(q_last, b_idx, h_idx)

    def sees(lo, hi):
        return lo.clamp(min=0) <= hi.clamp(max=Lk - 1)

    both = sees(lo_first, hi_first) & sees(lo_last, hi_last)
    n_lo = torch.where(both, lo_first, Lk)
    n_hi = torch.where(both, hi_last, -1)
    open_ = (~both & sees(lo_first, hi_last)).nonzero()[:, 0]
    if open_.numel():
        n_lo[open_], n_hi[open_] = band_rows(
            band, q_first[open_], None if b_idx is None else b_idx[open_],
            None if h_idx is None else h_idx[open_], Lq=Lq, Lk=Lk, block_m=block_m)
    return n_lo, n_hi, lo_last, hi_first


def band_rows(band, q_first, b_idx, h_idx, *, Lq, Lk, block_m):
    """(n_lo, n_hi) of band_reach for the given tiles, row by row (O(tiles * block_m)): the reference
    band_reach follows, used only where the tile corners leave the answer open."""
    q_rows = torch.clamp(q_first[:, None] + torch.arange(block_m, device=q_first.device), max=Lq - 1)
    lo, hi = band(q_rows, None if b_idx is None else b_idx[:, None], None if h_idx is None else h_idx[:, None])
    seen = lo.clamp(min=0) <= hi.clamp(max=Lk - 1)
    return torch.where(seen, lo, Lk).amin(1), torch.where(seen, hi, -1).amax(1)


def classify(mask_cells, *, Lq, Lk, block_m, block_n, batch=1, heads=1, device="cpu", sizes=None,
             lengths=None) -> TilePlan:
    """The exact plan of a mask given as `mask_cells(cells) -> (all, any)` (see module docstring);
    `sizes` gives B, Hq, Hk, Hv for masks that read them.

    `lengths`: (query lengths, key lengths), int tensors [batch], for a packed batch (varlen): entry b is
    planned for its own lengths, at most Lq and Lk (its cells are cut at them, the mask sees them as Lq
    and Lk, and tiles past them are EMPTY), all entries in one pass over the cells."""
    tq, tk = -(-Lq // block_m), -(-Lk // block_n)
    summaries = Summaries()
    groups = batch * heads
    sizes = {name: (value, value) for name, value in {**(sizes or {}), "Lq": Lq, "Lk": Lk}.items()}
    if lengths is not None:
        lengths = tuple(torch.as_tensor(x, device=device).long() for x in lengths)

    def cell_sizes(g):
        """The sizes the cells of groups g see: per cell Lq and Lk for a packed batch."""
        if lengths is None:
            return sizes
        b = torch.div(g, heads, rounding_mode="floor")
        lq, lk = lengths[0][b], lengths[1][b]
        return {**sizes, "Lq": (lq, lq), "Lk": (lk, lk)}

    def evaluate(g, q_lo, q_size, kv_lo, kv_size):
        # in chunks: the interval form's temporaries are a few dozen tensors the size of the batch
        out_all, out_any = [], []
        for start in range(0, max(g.shape[0], 1), _CHUNK):
            part = slice(start, start + _CHUNK)
            g_part = g[part].long()
            cells = Cells(g_part, q_lo[part].long(), q_size, kv_lo[part].long(), kv_size, cell_sizes(g_part), heads,
                          summaries)
            all_, any_ = mask_cells(cells)
            n = cells.q[0].shape[0]
            all_, any_ = _as_mask(all_, n, g.device), _as_mask(any_, n, g.device)
            if lengths is not None:  # a cell past its entry's lengths holds no pair
                inside = (cells.q[0] <= cells.q[1]) & (cells.kv[0] <= cells.kv[1])
                all_, any_ = all_ & inside, any_ & inside
            out_all.append(all_)
            out_any.append(any_)
        return torch.cat(out_all), torch.cat(out_any)

    # -- top down over blocks of 2^level x 2^level tiles --
    level = 0
    while (tq - 1) >> level >= 8 or (tk - 1) >> level >= 8:
        level += 1
    nq, nk = ((tq - 1) >> level) + 1, ((tk - 1) >> level) + 1
    # cell coordinates are stored as int32 (the interval form computes in int64, chunk by chunk)
    g, i, j = torch.meshgrid(*(torch.arange(n, device=device, dtype=torch.int32) for n in (groups, nq, nk)),
                             indexing="ij")
    g, i, j = g.reshape(-1), i.reshape(-1), j.reshape(-1)
    full = []
    while True:
        span_q, span_k = block_m << level, block_n << level
        all_, any_ = evaluate(g, i * span_q, span_q, j * span_k, span_k)
        full.append((g[all_], i[all_], j[all_], torch.full_like(g[all_], 1 << level)))
        open_ = any_ & ~all_
        g, i, j = g[open_], i[open_], j[open_]
        if level == 0:
            break
        level -= 1
        g, i, j = _children(g, i, j, (tq - 1) >> level, (tk - 1) >> level)
    nonempty = _has_unmasked_pair(evaluate, g, i, j, block_m, block_n, Lq, Lk)  # (sub-cells past a packed
    # entry's lengths are cut to nothing by evaluate, which proves no pair there)
    full = tuple(torch.cat(parts) for parts in zip(*full))
    partial = (g[nonempty], i[nonempty], j[nonempty])
    return from_blocks(full, partial, block_m=block_m, block_n=block_n, Lq=Lq, Lk=Lk, batch=batch, heads=heads)


def _as_mask(x, n, device):
    if isinstance(x, torch.Tensor):
        return x.expand(n) if x.dim() == 0 else x
    return torch.full((n,), bool(x), dtype=torch.bool, device=device)


def _children(g, i, j, last_i, last_j):
    """The four sub-blocks of each block, without those past the grid's last row or column."""
    di = torch.tensor([0, 0, 1, 1], device=g.device, dtype=g.dtype)
    dj = torch.tensor([0, 1, 0, 1], device=g.device, dtype=g.dtype)
    ci = (2 * i[:, None] + di).reshape(-1)
    cj = (2 * j[:, None] + dj).reshape(-1)
    cg = g.repeat_interleave(4)
    keep = (ci <= last_i) & (cj <= last_j)
    return cg[keep], ci[keep], cj[keep]


def _has_unmasked_pair(evaluate, g, i, j, block_m, block_n, Lq, Lk):
    """For tiles the analysis left open: does each hold at least one unmasked pair?

    Sub-cells halve down to single pairs, where the analysis is exact; a tile is settled as soon as one
    sub-cell is all unmasked, and is EMPTY once no sub-cell may hold an unmasked pair. A first pass
    follows one open sub-cell per tile (enough wherever the analysis is tight: it then proves every
    open tile non-empty); tiles it leaves unproven are searched exhaustively. The work is bounded by
    _SEARCH_BUDGET sub-cells: past it, tiles stay PARTIAL, which is always safe (the kernels apply the
    mask) and only costs a visit. The catalog's masks are tight at tile level (tests check exactness
    by brute force), so the budget matters only for masks the interval rules see coarsely."""
    n = g.shape[0]
    nonempty = torch.ones(n, dtype=torch.bool, device=g.device)
    depth = max(block_m, block_n).bit_length()
    if n == 0 or n * 4 * depth > _SEARCH_BUDGET:
        return nonempty
    tiles = torch.arange(n, device=g.device)
    proven = _search(evaluate, g, i, j, tiles, block_m, block_n, Lq, Lk, beam=1)
    unproven = tiles[~proven]
    exhaustive = unproven[: max(0, _SEARCH_BUDGET // (block_m * block_n))]
    for start in range(0, exhaustive.numel(), 64):
        chunk = exhaustive[start:start + 64]
        nonempty[chunk] = _search(evaluate, g, i, j, chunk, block_m, block_n, Lq, Lk, beam=None)
    return nonempty


def _search(evaluate, g, i, j, tiles, block_m, block_n, Lq, Lk, beam):
    """Whether each tile in `tiles` holds an unmasked pair (beam: open sub-cells kept per tile and level;
    None keeps all, so a False is then a proof of emptiness)."""
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


# ---- block top-k (a spec's `select`): the plan chosen at every call from q and k ----------------------
# A select cuts queries and keys into tiles of SELECT_TILE positions (a multiple of the plan tiles). Per
# query tile it keeps the key tiles where the mask and the keep condition hold for some pair, and the
# `count` other tiles the mask lets through with the largest estimate, dot(mean(q), mean(k)); the kernels
# then visit the mask's plan tiles inside the tiles kept. Every step is O(L * D) or O(tiles * D), on the
# inputs' device: never a [Lq, Lk] product.
def check_select_blocks(spec: str, tile: int, block_m: int, block_n: int):
    """The plan tiles must cut every selection tile into whole plan tiles."""
    for arg, block in (("block_m", block_m), ("block_n", block_n)):
        if block > tile or tile % block:
            raise ValueError(f"{spec}: argument '{arg}': the select's tiles ({tile} positions) must be a multiple "
                             f"of the plan's tiles, got {arg} = {block}")


def tile_means(x: torch.Tensor, tile: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, H, ceil(L / tile), D], float64: the mean vector of each tile of `tile`
    positions (the last tile's over the positions it holds). A padded copy and a sum: deterministic,
    where an index_add would sum in any order on a GPU."""
    B, H, L, D = x.shape
    n = -(-L // tile)
    padded = torch.nn.functional.pad(x.detach().double(), (0, 0, 0, n * tile - L))
    sums = padded.view(B, H, n, tile, D).sum(3)
    counts = torch.clamp(L - torch.arange(n, device=x.device) * tile, max=tile)
    return sums / counts.double()[:, None]


def tile_estimate(q: torch.Tensor, k: torch.Tensor, tile: int) -> torch.Tensor:
    """The estimate dot(mean(q), mean(k)) of every (query tile, key tile): float64 [B, Hq, tiles_q,
    tiles_k], query head h against key head h * Hk // Hq (float64, so that a GPU and the CPU rank alike
    but for exact ties)."""
    Hq, Hk = q.shape[1], k.shape[1]
    key_means = tile_means(k, tile)[:, torch.arange(Hq, device=k.device) * Hk // Hq]
    return tile_means(q, tile) @ key_means.transpose(-1, -2)


def top_tiles(estimate: torch.Tensor, count: int, nonempty: torch.Tensor, kept: torch.Tensor,
              spec: str = "select") -> torch.Tensor:
    """The key tiles each query tile visits, bool like `estimate` [B, Hq, tiles_q, tiles_k]: the `kept`
    ones, and the `count` others among the `nonempty` ones with the largest estimate, the lower tile
    first among equal estimates (a stable sort). `nonempty`, `kept`: bool, broadcastable to it."""
    if isinstance(count, bool) or int(count) != count or count < 0:
        raise ValueError(f"{spec}: the count of topk() must be a whole number >= 0, got {count!r}")
    candidates = (nonempty & ~kept).expand(estimate.shape)
    ranked = torch.where(candidates, estimate, float("-inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :int(count)]
    chosen = torch.zeros_like(candidates).scatter_(-1, order, True)
    return kept | (chosen & candidates)


def tiles_touched(plan: TilePlan, tile: int) -> torch.Tensor:
    """bool [batch, heads, tiles, tiles]: the selection tiles of `tile` positions that hold a tile the
    plan visits (a plan tile divides `tile`)."""
    touched = (plan.classes() > 0).to(torch.int8)
    for axis, block in ((2, plan.block_m), (3, plan.block_n)):
        touched = _blocks(touched, axis, tile // block, torch.amax, 0)
    return touched > 0


def restrict(plan: TilePlan, visible: torch.Tensor, tile: int) -> TilePlan:
    """The plan's tiles inside the selection tiles `visible` (bool [B, Hq, tiles, tiles] of `tile`
    positions), each keeping its class: a plan per batch entry and head."""
    shown = visible
    for axis, block, n in ((2, plan.block_m, plan.tiles_q), (3, plan.block_n, plan.tiles_k)):
        shown = shown.repeat_interleave(tile // block, dim=axis).narrow(axis, 0, n)
    classes = torch.where(shown, plan.classes(), 0).to(torch.int8)
    return from_classes(classes, block_m=plan.block_m, block_n=plan.block_n, Lq=plan.Lq, Lk=plan.Lk)


def check_plan(plan, spec: str, *, Lq, Lk, batch, heads, device, block_m, block_n,
               built_for: BuiltFor | None = None, values: dict | None = None) -> TilePlan:
    """A plan passed to a generated function (`attn(q, k, v, plan=...)`) must be one built by this
    spec's plan() for this call's sizes, tiles, device, the values of the params its mask reads and
    the very tensors it read, unchanged: the message says which differs and how to build the right
    one. `built_for` is what this call would build; `values` the call's inputs (for the messages)."""
    def fail(message):
        raise ValueError(f"{spec}: argument 'plan': {message}")

    if not isinstance(plan, TilePlan):
        fail(f"expected a TilePlan from {spec}.plan(...), got {type(plan).__name__}")
    mine = plan.built_for
    if built_for is not None:
        if mine is None:
            fail(f"this plan does not record what it was built for; build it with {spec}.plan(...)")
        if (mine.spec, mine.spec_hash) != (built_for.spec, built_for.spec_hash):
            other = "another version of this spec" if mine.spec == built_for.spec else f"spec '{mine.spec}'"
            fail(f"built for {other} (hash {mine.spec_hash[:12]}), not this one (hash {built_for.spec_hash[:12]}); "
                 f"build it with {spec}.plan(...)")
    for what, got, want in (("Lq", plan.Lq, Lq), ("Lk", plan.Lk, Lk), ("batch entries", plan.batch, batch),
                            ("query heads", plan.heads, heads)):
        if got != want:
            fail(f"built for {what} = {got}, but this call has {want}")
    if (plan.block_m, plan.block_n) != (block_m, block_n):
        fail(f"built with {plan.block_m}x{plan.block_n} tiles, the kernels use {block_m}x{block_n}: "
             f"leave block_m and block_n at their defaults")
    if not checks.same_device(plan.q_full.offsets.device, torch.device(device)):
        fail(f"is on {plan.q_full.offsets.device}, the inputs on {device}: build it with device=q.device")
    if built_for is None:
        return plan
    for name, want in built_for.sizes.items():
        got = mine.sizes.get(name)
        if got != want:
            fail(f"built for {name} = {got}, but this call has {want}")
    for name, want in built_for.params.items():
        got = mine.params.get(name)
        if got != want:
            fail(f"built with {name} = {got!r}, but this call has {name} = {want!r}; "
                 f"build the plan with {spec}.plan(..., {name}={want!r})")
    for name in built_for.tensors:
        stamp = mine.tensors.get(name)
        tensor = (values or {}).get(name)
        why = "no record of it" if stamp is None else (stamp.differs(tensor) if tensor is not None else None)
        if why:
            fail(f"built from another '{name}': this call passes {why}; pass the tensor the plan was "
                 f"built from, unchanged, or build a new plan with {spec}.plan(..., {name}=...)")
    return plan
