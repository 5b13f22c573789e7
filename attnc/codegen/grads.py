"""Gradients of learnable inputs: what the backward kernels keep for each read, and how the host turns
it into the input's gradient (runtime/scatter.py).

Every read (tensor load) of a learnable input gets its own buffer, named `d_<name>_<i>`:
- a read that does not depend on the key (`slopes[h]`, `gate[b, q]`) is summed over the row's keys in
  the dQ kernel: a row buffer [B, Hq, Lq];
- a read that depends on the key but not on the query (`bias[b, kv]`) is summed
  over the queries in the dK/dV kernel, which owns a key tile: a key buffer [B, Hq, Lk];
- a read of a small table (at most SMALL_TABLE entries, `t5[h, bucket(q - kv)]`)
  is summed per entry by the dQ kernel: a buffer [B, Hq, query tiles, entries];
- any other read that depends on the key (`rel[h, q - kv + R]`, `spatial[h, dist[b, q, kv]]`, either side of
  `dot(qr[b, h, q], kr[b, kv])`) is kept per (query, key) pair: a pair buffer [B, Hq, Lq, Lk] that
  the dQ kernel writes tile by tile.
The host then sums the grid axes the read does not index and, for a read at index expressions (a
table), scatter-sums by table entry in a fixed order; a feature vector's gradient is the pair buffer
times the other side's vectors. Reads of the same input add up.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import sympy

from .. import ir
from .names import TORCH_INDEX, ident, torch_loads
from .printers import torch_code

# the backward grid's axes: b, h, q, kv
GRID_AXIS = {ir.b: 0, ir.h: 1, ir.q: 2, ir.kv: 3}


class GradKind(enum.Enum):
    """Where the backward sums a read's gradient, and the host buffer that holds it (4-D like the grid
    [B, Hq, Lq, Lk], runtime/scatter.py)."""

    ROW = "(B, Hq, Lq, 1)"  # summed per query row by dQ
    KEY = "(B, Hq, 1, Lk)"  # summed per key by dK/dV, which owns a key tile
    TABLE = "(B, Hq, table_tiles, {entries})"  # summed per entry of a small table by dQ, per dQ program
    PAIR = "(B, Hq, Lq, Lk)"  # kept per (query, key) pair, written tile by tile by dQ


@dataclass(frozen=True)
class InputGrad:
    """One read of a learnable input, as the kernels and the host see it."""

    name: str  # the input's spec name
    stem: str  # `<name>_<i>`: the read's part of the names below
    kind: GradKind
    reduce: str  # host code: the buffer -> a tensor of the input's shape
    entries: int  # a small table: its entries (the product of its own axes' extents), else 0
    entry_index: object  # a small table: the entry a pair reads (sympy, flat over its own axes), else None
    entry: str  # ... and that entry in a query-major tile, as the family prints it ("" until then)
    scatter_indices: frozenset[str]  # a scatter-sum (a read at index expressions): the
    # grid index tensors (b_idx, ..., runtime/scatter.grid_indices) its `reduce` reads; else empty

    @property
    def entries_pow2(self) -> int:
        return 1 << max(self.entries - 1, 0).bit_length()

    @property
    def per_row(self) -> bool:
        return self.kind is GradKind.ROW

    @property
    def per_key(self) -> bool:
        return self.kind is GradKind.KEY

    @property
    def per_entry(self) -> bool:
        """A small table's read, summed per entry."""
        return self.kind is GradKind.TABLE

    @property
    def per_pair(self) -> bool:
        return self.kind is GradKind.PAIR

    @property
    def var(self) -> str:
        """The kernel's accumulator or buffer pointer, and the host's buffer."""
        return f"d_{self.stem}"

    @property
    def buffer_shape(self) -> str:
        return self.kind.value.format(entries=self.entries_pow2)

    @property
    def array(self) -> str:
        """The kernel parameter of its buffer."""
        return f"D_{self.stem}"

    @property
    def term(self) -> str:
        """Its per-tile term in the dQ kernel: dL/d(read) at each (query, key) pair."""
        return f"dt_{self.stem}"

    @property
    def entry_var(self) -> str:
        """A small table: the entry each pair of a tile reads."""
        return f"entry_{self.stem}"

    @property
    def tile_grad(self) -> str:
        """A small table: dL/d(read) of each pair of a tile."""
        return f"grad_{self.stem}"



class ReadGrads:
    """What a family's body (SoftmaxBody, GeneralBody) derives from its `grads` for the templates: which
    reads the dQ kernel keeps (and its buffers), the small tables among them, and the reads per key that
    the dK/dV kernel sums."""

    @property
    def dq_grads(self) -> list[InputGrad]:
        return [g for g in self.grads if g.kind is not GradKind.KEY]

    @property
    def dq_sums(self) -> list[InputGrad]:
        """The dQ reads kept as program state (per row, per table entry) and stored at its end."""
        return self.row_grads + self.tables

    @property
    def row_grads(self) -> list[InputGrad]:
        return [g for g in self.grads if g.kind is GradKind.ROW]

    @property
    def scatter_indices(self) -> frozenset[str]:
        """The grid index tensors that the host's scatter-sums read (runtime/scatter.grid_indices)."""
        return frozenset().union(*(g.scatter_indices for g in self.grads))

    @property
    def grad_arrays(self) -> list[str]:
        """The dQ kernel's gradient buffers."""
        return [g.array for g in self.dq_grads]

    @property
    def tables(self) -> list[InputGrad]:
        return [g for g in self.grads if g.kind is GradKind.TABLE]

    @property
    def key_grads(self) -> list[InputGrad]:
        return [g for g in self.grads if g.kind is GradKind.KEY]


# a table read per pair with at most this many entries is summed per entry inside the dQ kernel (one
# masked tile reduction per entry); a larger one is kept per pair and scatter-summed on the host
SMALL_TABLE = 64


def input_grads(reads, key_reads: bool, table_reads: bool = False) -> list[InputGrad]:
    """reads (derivatives.Read, in the family's order) -> one InputGrad each. With key_reads, a read that
    depends on the key only is summed per key by the family's dK/dV kernel (O(Lk) memory, not a pair
    buffer); with table_reads, a small table read per pair (T5's buckets) is summed per entry by dQ."""
    out = []
    for i, read in enumerate(reads):
        stem = f"{read.tensor.name}_{i}"
        var = f"d_{stem}"
        table = _small_table(read) if table_reads and read.per_pair and not read.side else None
        if table is not None:
            dims, entries, index = table
            reduce = f"scatter.table_grad({var}, {dims!r}, {ident(read.tensor.name)}.shape)"
            out.append(InputGrad(read.tensor.name, stem, GradKind.TABLE, reduce, entries, index, "", frozenset()))
            continue
        kind = GradKind.KEY if key_reads and read.per_key else GradKind.PAIR if read.per_pair else GradKind.ROW
        if read.side:
            reduce, indices = _vector_reduce(var, read), frozenset()
        else:
            reduce, indices = _host_reduce(var, read.tensor, read.load)
        out.append(InputGrad(read.tensor.name, stem, kind, reduce, 0, None, "", indices))
    return out


def _small_table(read):
    """(grid axes of its leading bare b/h subscripts, entries, flat entry index) of a read of a table
    whose own axes come last, are read at index expressions and hold at most SMALL_TABLE entries in
    all: `t5[h, bucket(q - kv)]`, `sb[h, dist[b, q, kv]]`. None for any other read."""
    extents = read.tensor.extents or (None,) * len(read.load.args)
    own = [i for i, e in enumerate(extents) if e is not None]
    if not own or own != list(range(own[0], len(extents))):
        return None
    lead = read.load.args[:own[0]]
    if any(arg not in (ir.b, ir.h) for arg in lead) or not all(extents[i].is_Integer for i in own):
        return None
    entries, index = 1, sympy.Integer(0)
    for i in own:
        entries *= int(extents[i])
        index = index * int(extents[i]) + read.load.args[i]
    if entries > SMALL_TABLE:
        return None
    return tuple(GRID_AXIS[arg] for arg in lead), entries, index


def _grid_axes(load) -> tuple[int, ...]:
    return tuple(GRID_AXIS[arg] for arg in load.args)


def _vector_reduce(var: str, read) -> str:
    """A feature vector read by dot(): the pair buffer holds dL/d(dot); the vector's gradient is it times
    the other side's vectors (a matmul over the other side's tokens), summed like a direct read."""
    other = read.expr.key if read.side == "query" else read.expr.query
    return (f"scatter.vector_grad({var}, {ident(other.func.__name__)}, {_grid_axes(read.load)!r}, "
            f"{_grid_axes(other)!r})")


def _host_reduce(var: str, tensor: ir.TensorInput, load) -> tuple[str, frozenset[str]]:
    """Host code of a direct read's gradient, and the grid index tensors that code reads."""
    axes = [GRID_AXIS.get(arg) for arg in load.args]
    if all(a is not None for a in axes):  # bare indices: a sum and a permutation
        return f"scatter.direct({var}, {tuple(axes)!r})", frozenset()
    reads = tuple(sorted(GRID_AXIS[s] for s in load.free_symbols if s in GRID_AXIS))
    names = {ir.INDICES[k]: code for k, code in TORCH_INDEX.items()}
    names.update({sym: name for name, sym in ir.SIZES.items()})
    names.update(torch_loads(*load.args))
    for arg in load.args:
        names.update({sym: ident(sym.name) for sym in sympy.sympify(arg).free_symbols if sym not in names})
    indices = [names[arg] if arg in GRID_AXIS else f"R.index({torch_code(arg, names)})" for arg in load.args]
    grid = frozenset(TORCH_INDEX[str(sym)] for sym in load.free_symbols if sym in GRID_AXIS)
    return f"scatter.scatter({var}, {ident(tensor.name)}.shape, {reads!r}, [{', '.join(indices)}])", grid
