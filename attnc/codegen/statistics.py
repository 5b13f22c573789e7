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
    update: str  # the Triton statements adding one tile (reduced over axis 1)
    op: str  # how parts combine: "sum" (starting at 0) or "max" (starting at -inf)
    reference: str  # the eager reference's value on dense weights `{p}` and mask `{mask}`, over axis {dim}
    finish: str = ""  # a statement after the last tile

    def init(self, block: str) -> str:
        """Triton: the accumulator before the first tile."""
        if self.op == "sum":
            return f"tl.zeros([{block}], dtype=tl.float32)"
        return f"tl.full([{block}], {_NEG_INF}, dtype=tl.float32)"

    def tile_over(self, axis: int) -> str:
        """The tile's weights reduced over `axis`: `p` (0 where masked) summed, or `p_max` (-inf where
        masked: weights may be negative) maximized."""
        return f"tl.sum(p, {axis})" if self.op == "sum" else f"tl.max(p_max, {axis})"

    @property
    def empty(self) -> str:
        """Torch: the value of no entry, which combine() turns into the statistic's (0)."""
        return "0.0" if self.op == "sum" else "-math.inf"

    def reference_of(self, p: str, mask: str, dim: int) -> str:
        return self.reference.format(p=p, mask=mask, dim=dim)

    def combine(self, parts: str, dim: int = 0) -> str:
        """Torch: parts (a tensor of partial values along `dim`) combined into the statistic."""
        return f"{parts}.sum({dim})" if self.op == "sum" else f"{parts}.amax({dim}).nan_to_num(neginf=0.0)"


def _maximum(var: str) -> str:
    """The largest weight of the entries the mask keeps (weights may be negative: a masked 0 is no
    candidate); 0 for a row or key without any."""
    return (f"if APPLY_MASK:\n    {var} = tl.maximum({var}, tl.max(tl.where(keep, p, {_NEG_INF}), 1))\n"
            f"else:\n    {var} = tl.maximum({var}, tl.max(p, 1))")


def _count(var: str) -> str:
    """The kept entries of the tile's rows: FULL tiles lie inside Lk and the mask keeps all of them (see
    [Note] In-bounds FULL tiles)."""
    return (f"if APPLY_MASK:\n    {var} += tl.sum(tl.where(keep, 1.0, 0.0) + tl.zeros_like(p), 1)\n"
            f"else:\n    {var} += BLOCK_N")


def _reduction(kind: ir.StatKind) -> Reduction:
    var = "st_" + kind.name.lower()
    if kind in (ir.StatKind.ROW_SUM, ir.StatKind.RECEIVED):
        return Reduction(kind, var, f"{var} += tl.sum(p, 1)", "sum", "{p}.sum({dim})")
    if kind in (ir.StatKind.ROW_MAX, ir.StatKind.RECEIVED_MAX):
        return Reduction(kind, var, _maximum(var), "max", "R.masked_max({p}, {mask}, {dim})",
                         f"{var} = tl.where({var} == {_NEG_INF}, 0.0, {var})  # nothing visible: 0, as the reference")
    if kind is ir.StatKind.ENTROPY:
        # -p log p -> 0 as p -> 0 (masked entries, and weights that underflow); weights <= 0 add nothing
        return Reduction(kind, var, f"{var} += tl.sum(tl.where(p > 0.0, -p * tl.log(tl.where(p > 0.0, p, 1.0)), 0.0), 1)",
                         "sum", "R.entropy({p}, {dim})")
    if kind is ir.StatKind.VISIBLE:
        return Reduction(kind, var, _count(var), "sum", "{mask}.sum({dim}).to({p}.dtype)")
    raise AssertionError(kind)


@dataclass(frozen=True)
class Fused:
    """One accumulator the online softmax's forward tile keeps for the row statistics (the softmax
    family computes them in its forward, not in `_row_stats`): its variable, start value and update in
    the tile's terms (inside the online softmax, before l_i's update: m_i and l_i the row's state before
    the tile, m_ref the new max or 0, alpha the rescale, score the tile's base-2 logits, -inf where
    masked, p = exp2(score - m_ref))."""

    var: str
    start: str
    update: str

    def init(self) -> str:
        return f"tl.full([BLOCK_M], {self.start}, dtype=tl.float32)"


# [Note] Row statistics in the softmax forward. With l the row's sum of exp2(score - m) (the sink's
# term included), lk its keys' part and t = sum over keys of exp2(score - m) * (score - m), rescaled
# with the running max as l is (t -> alpha * (t + lk * (m_old - m_new))): sum_kv P = lk / l, the
# entropy -sum P ln P = ln 2 * (lk * log2(l) - t) / l (two non-negative terms: no cancellation, unlike
# lse - sum P s), max_kv P = exp2(max score - m - log2 l), and the count of the tiles' kept entries.
_KEYS_MASS = Fused("st_lk", "0.0", "st_lk = st_lk * alpha + tl.sum(p, 1)")
_KEYS_MAX = Fused("st_mk", _NEG_INF, "st_mk = tl.maximum(st_mk, tl.max(score, 1))")
_COUNT = Fused("st_n", "0.0", _count("st_n"))


def _spread(keys_mass: str) -> Fused:
    """t, rescaled from the keys' mass before the tile (`keys_mass`: st_lk, or l_i without a sink). The
    tl.where's select before multiplying: 0 * -inf would be NaN where a row or an entry has no key yet."""
    return Fused("st_t", "0.0", f"st_t = alpha * (st_t + {keys_mass} * tl.where({keys_mass} > 0.0, m_i - m_ref, 0.0))\n"
                                "st_t += tl.sum(p * tl.where(p > 0.0, score - m_ref[:, None], 0.0), 1)")


def fused_rows(rows: tuple[Reduction, ...], sink: bool) -> tuple[tuple[Fused, ...], dict]:
    """The softmax forward's accumulators for the row statistics `rows`, and each statistic's value in
    the epilogue's terms (l_safe: the row sum, 1 where empty; m_i the row max)."""
    kinds = {r.kind for r in rows}
    # the sum over the keys alone is l itself where no sink adds to l (the t update reads it as st_lk)
    keys_mass = "st_lk" if sink else "l_i"
    state = []  # in update order: t reads the keys' mass before the tile (the updates precede l_i's)
    if ir.StatKind.ENTROPY in kinds:
        state.append(_spread(keys_mass))
    if sink and kinds & {ir.StatKind.ROW_SUM, ir.StatKind.ENTROPY}:
        state.append(_KEYS_MASS)
    if ir.StatKind.ROW_MAX in kinds and sink:
        state.append(_KEYS_MAX)
    if ir.StatKind.VISIBLE in kinds:
        state.append(_COUNT)
    values = {
        ir.StatKind.ROW_SUM: f"{keys_mass} / l_safe",
        ir.StatKind.ENTROPY: f"LN2 * ({keys_mass} * tl.log2(l_safe) - st_t) / l_safe",
        # (without a sink the largest weight is exp2(m - m) / l)
        ir.StatKind.ROW_MAX: ('tl.where(st_mk == float("-inf"), 0.0, tl.exp2(st_mk - m_i - tl.log2(l_safe)))'
                              if sink else "1.0 / l_safe"),
        ir.StatKind.VISIBLE: "st_n",
    }
    return tuple(state), {r.kind: values[r.kind] for r in rows}


@dataclass(frozen=True)
class StatisticsPlan:
    """What the statistics kernels compute: the row reductions and the key reductions, each in the
    order of its kernel's output array, and each spec statistic's place in them."""

    stats: tuple[ir.Stat, ...]
    rows: tuple[Reduction, ...]
    keys: tuple[Reduction, ...]

    def index(self, stat: ir.Stat) -> int:
        """The statistic's row in its kernel's output ([len(rows), B, Hq, Lq] or [len(keys), B, Hq, Lk])."""
        where = self.keys if stat.kind.per_key else self.rows
        return next(i for i, r in enumerate(where) if r.kind is stat.kind)

    def row_index(self, kind: ir.StatKind) -> int:
        return next(i for i, r in enumerate(self.rows) if r.kind is kind)

    @property
    def keys_maximize(self) -> bool:
        """A key statistic is a maximum (decoding's tiles need their candidates, p_max)."""
        return any(r.op == "max" for r in self.keys)

    @property
    def entropy_rows(self) -> tuple[int, int]:
        """The rows of the row statistics that the entropy's gradient reads: the entropy, sum_kv P."""
        return self.row_index(ir.StatKind.ENTROPY), self.row_index(ir.StatKind.ROW_SUM)


def differentiated(variant: ir.Variant) -> bool:
    """The spec returns a statistic with a gradient (an entropy): the backward takes its gradient."""
    return any(st.kind.has_gradient for st in variant.stats)


def plan(variant: ir.Variant) -> StatisticsPlan | None:
    """The statistics of a spec, or None where it declares none."""
    if not variant.stats:
        return None
    kinds = {st.kind for st in variant.stats}
    if differentiated(variant):
        kinds.add(ir.StatKind.ROW_SUM)  # the entropy's gradient reads the row's mass
    order = list(ir.StatKind)
    rows = tuple(_reduction(k) for k in order if k in kinds and not k.per_key)
    keys = tuple(_reduction(k) for k in order if k in kinds and k.per_key)
    return StatisticsPlan(variant.stats, rows, keys)
