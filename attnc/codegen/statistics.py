"""Statistics of the weights (`stat` statements), printed for templates/statistics.py.j2.

A spec's statistics are reductions of the weights P[q, kv] over one axis: over the keys (per row:
sum_kv, max_kv, entropy, visible), computed by `_row_stats`, a query-major pass on the forward's walk;
or over the queries (per key: sum_q, max_q), computed by `_key_stats`, a key-major pass on the dK/dV
walk. Each is one `Reduction` with its own Triton statements; a `total` is the host's sum of one over
its axis. The entropy's gradient needs the row's mass sum_kv P, so a spec with an entropy computes that
too (`StatisticsPlan.rows` may hold more than the spec names).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import ir

_NEG_INF = 'float("-inf")'


@dataclass(frozen=True)
class Reduction:
    """One statistic's accumulator over the tiles of a pass, in tile variables `p` (the weights, 0
    where masked) and, on PARTIAL tiles (APPLY_MASK), `keep`."""

    kind: ir.StatKind
    var: str
    start: str  # its value before the first tile: "0.0" or -inf
    update: str  # the Triton statements adding one tile (reduced over axis 1)
    finish: str = ""  # a statement after the last tile

    def init(self, block: str) -> str:
        if self.start == "0.0":
            return f"tl.zeros([{block}], dtype=tl.float32)"
        return f"tl.full([{block}], {self.start}, dtype=tl.float32)"


def _maximum(var: str) -> str:
    """The largest weight of the entries the mask keeps (weights may be negative: a masked 0 is no
    candidate); 0 for a row or key without any."""
    return (f"if APPLY_MASK:\n    {var} = tl.maximum({var}, tl.max(tl.where(keep, p, {_NEG_INF}), 1))\n"
            f"else:\n    {var} = tl.maximum({var}, tl.max(p, 1))")


def _reduction(kind: ir.StatKind) -> Reduction:
    var = "st_" + kind.name.lower()
    if kind in (ir.StatKind.ROW_SUM, ir.StatKind.RECEIVED):
        return Reduction(kind, var, "0.0", f"{var} += tl.sum(p, 1)")
    if kind in (ir.StatKind.ROW_MAX, ir.StatKind.RECEIVED_MAX):
        return Reduction(kind, var, _NEG_INF, _maximum(var),
                         f"{var} = tl.where({var} == {_NEG_INF}, 0.0, {var})  # nothing visible: 0, as the reference")
    if kind is ir.StatKind.ENTROPY:
        # -p log p -> 0 as p -> 0 (masked entries, and weights that underflow); weights <= 0 add nothing
        return Reduction(kind, var, "0.0",
                         f"{var} += tl.sum(tl.where(p > 0.0, -p * tl.log(tl.where(p > 0.0, p, 1.0)), 0.0), 1)")
    if kind is ir.StatKind.VISIBLE:
        # FULL tiles lie inside Lk and the mask keeps all of them (see [Note] In-bounds FULL tiles)
        return Reduction(kind, var, "0.0", f"if APPLY_MASK:\n    {var} += tl.sum(tl.where(keep, 1.0, 0.0) + tl.zeros_like(p), 1)\n"
                                           f"else:\n    {var} += BLOCK_N")
    raise AssertionError(kind)


@dataclass(frozen=True)
class StatisticsPlan:
    """What the statistics kernels compute: the row reductions and the key reductions, each in the
    order of its kernel's output array, and each spec statistic's place in them."""

    stats: tuple[ir.Stat, ...]
    rows: tuple[Reduction, ...]
    keys: tuple[Reduction, ...]
    entropy_grad: bool  # the spec returns an entropy: the backward takes its gradient

    def index(self, stat: ir.Stat) -> int:
        """The statistic's row in its kernel's output ([len(rows), B, Hq, Lq] or [len(keys), B, Hq, Lk])."""
        where = self.keys if stat.kind.per_key else self.rows
        return next(i for i, r in enumerate(where) if r.kind is stat.kind)

    def row_index(self, kind: ir.StatKind) -> int:
        return next(i for i, r in enumerate(self.rows) if r.kind is kind)


def plan(variant: ir.Variant) -> StatisticsPlan | None:
    """The statistics of a spec, or None where it declares none."""
    if not variant.stats:
        return None
    kinds = {st.kind for st in variant.stats}
    entropy = ir.StatKind.ENTROPY in kinds
    if entropy:
        kinds.add(ir.StatKind.ROW_SUM)  # the entropy's gradient reads the row's mass
    order = list(ir.StatKind)
    rows = tuple(_reduction(k) for k in order if k in kinds and not k.per_key)
    keys = tuple(_reduction(k) for k in order if k in kinds and k.per_key)
    return StatisticsPlan(variant.stats, rows, keys, entropy)
