"""Gradients of learnable inputs: what the backward kernels keep for each read, and how the host turns
it into the input's gradient (runtime/scatter.py).

Every read (tensor load) of a learnable input gets its own buffer, named `d_<name>_<i>`:
- a read that does not depend on the key (`slopes[h]`, `gate[b, q]`) is summed over the row's keys in
  the dQ kernel: a row buffer [B, Hq, Lq];
- a read that does (`bias[kv]`, `rel[h, q - kv + R]`, `spatial[h, dist[b, q, kv]]`, either side of
  `dot(qr[b, h, q], kr[b, kv])`) is kept per (query, key) pair: a pair buffer [B, Hq, Lq, Lk] that
  the dQ kernel writes tile by tile.
The host then sums the grid axes the read does not index and, for a read at index expressions (a
table), scatter-sums by table entry in a fixed order; a feature vector's gradient is the pair buffer
times the other side's vectors. Reads of the same input add up.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from .. import ir
from .names import TORCH_INDEX, ident, torch_loads
from .printers import torch_code

# the backward grid's axes: b, h, q, kv
GRID_AXIS = {ir.b: 0, ir.h: 1, ir.q: 2, ir.kv: 3}


@dataclass(frozen=True)
class InputGrad:
    """One read of a learnable input, as the kernels and the host see it."""

    name: str  # the input's spec name
    var: str  # the kernel's row accumulator / pair buffer pointer, and the host's buffer
    per_pair: bool  # kept per (query, key) pair, else summed per query row
    reduce: str  # host code: the buffer -> a tensor of the input's shape

    @property
    def array(self) -> str:
        """The kernel parameter of its buffer."""
        return f"D_{self.var[2:]}"

    @property
    def term(self) -> str:
        """Its per-tile term in the dQ kernel: dL/d(read) at each (query, key) pair."""
        return f"dt_{self.var[2:]}"

    @property
    def scatters(self) -> bool:
        return self.reduce.startswith("scatter.scatter(")


def input_grads(reads) -> list[InputGrad]:
    """reads (derivatives.Read, in the family's order) -> one InputGrad each."""
    out = []
    for i, read in enumerate(reads):
        var = f"d_{read.tensor.name}_{i}"
        reduce = _vector_reduce(var, read) if read.side else _host_reduce(var, read.tensor, read.load)
        out.append(InputGrad(read.tensor.name, var, read.per_pair, reduce))
    return out


def _grid_axes(load) -> tuple[int, ...]:
    return tuple(GRID_AXIS[arg] for arg in load.args)


def _vector_reduce(var: str, read) -> str:
    """A feature vector read by dot(): the pair buffer holds dL/d(dot); the vector's gradient is it times
    the other side's vectors (a matmul over the other side's tokens), summed like a direct read."""
    other = read.expr.key if read.side == "query" else read.expr.query
    return (f"scatter.vector_grad({var}, {ident(other.func.__name__)}, {_grid_axes(read.load)!r}, "
            f"{_grid_axes(other)!r})")


def _host_reduce(var: str, tensor: ir.TensorInput, load) -> str:
    axes = [GRID_AXIS.get(arg) for arg in load.args]
    if all(a is not None for a in axes):  # bare indices: a sum and a permutation
        return f"scatter.direct({var}, {tuple(axes)!r})"
    reads = tuple(sorted(GRID_AXIS[s] for s in load.free_symbols if s in GRID_AXIS))
    names = {ir.INDICES[k]: code for k, code in TORCH_INDEX.items()}
    names.update({sym: name for name, sym in ir.SIZES.items()})
    names.update(torch_loads(*load.args))
    for arg in load.args:
        names.update({sym: ident(sym.name) for sym in sympy.sympify(arg).free_symbols if sym not in names})
    indices = [names[arg] if arg in GRID_AXIS else f"R.index({torch_code(arg, names)})" for arg in load.args]
    return f"scatter.scatter({var}, {ident(tensor.name)}.shape, {reads!r}, [{', '.join(indices)}])"
