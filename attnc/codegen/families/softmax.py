"""The softmax family: what its kernels compute per tile, printed for templates/softmax.py.j2.

The probabilities are `exp(logits) / (sum exp(logits) + exp(sink))` (attnc/analysis/rowstats.py). The
forward runs the online softmax; the backward recomputes p from the log-sum-exp, and each read of a
learnable input gets a gradient buffer that the host reduces in a fixed order (attnc/codegen/grads.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ... import ir
from ...analysis import derivatives
from ...analysis.rowstats import SoftmaxForm
from .. import statistics
from ..grads import InputGrad, ReadGrads, input_grads
from ..printers import triton_code
from ..skeleton import (
    ROW,
    TILE,
    TILE_T,
    Load,
    RowReads,
    TileCode,
    base_names,
    tensor_loads,
)
from ..skeleton import tile_code as skeleton_tile_code
from ..statistics import Fused
from . import TileFamily, decode, decoding


@dataclass(frozen=True)
class Grad(InputGrad):
    """One read of a learnable input: dS[i, j] * dscore/d read (+ its sink term, for a row read)."""

    dscore: str  # in a query-major tile (dQ)
    dscore_t: str  # in a key-major tile (dK/dV: reads summed per key)
    dsink: str | None


# a query tile's rows of lse2 (rows past Lq: +inf, so p = 0 there)
_LSE2_ROWS = 'lse2 = tl.load(LSE2 + rows, mask=row_ok, other=float("inf"))'


@dataclass(frozen=True)
class SoftmaxBody(ReadGrads):
    plain: bool  # the logits are the scaled dot product itself: log2(e) folds into the scale
    has_dscore: bool  # d logits / ds is not 1: the backward multiplies dS by it
    split_dkdv = False  # dK and dV share one launch (GeneralBody.split_dkdv says when they do not)
    tile: TileCode  # query-major tiles [BLOCK_M, BLOCK_N]: forward and dQ
    tile_t: TileCode  # key-major tiles [BLOCK_N, BLOCK_M]: dK/dV
    sink: str | None  # the sink logit of a row, if any
    row_loads: tuple[Load, ...]  # per-row inputs the sink reads
    grads: tuple[Grad, ...]
    entropy_grad: bool = False  # the spec returns an entropy (`stat`): dQ and dK/dV take its gradient
    # the row statistics, computed by the forward (statistics.fused_rows): its accumulators (none where
    # the online softmax's own state gives them: sum_kv and max_kv without a sink), and the value of
    # each row of ROW_STATS in the epilogue's terms (empty: the spec has no row statistic)
    fused: tuple[Fused, ...] = ()
    fused_rows: tuple[str, ...] = ()
    # -- the statistics' passes (templates/statistics.py.j2): the weights from lse2 --
    stat_rows = RowReads(lines=(_LSE2_ROWS,), values=("lse2",), arrays=("LSE2",))

    # -- the backward (templates/backward.py.j2) --
    @property
    def row_arrays(self) -> tuple[str, ...]:
        """lse2 = lse * log2(e), +inf on empty rows; delta = rowsum(dO * O) - dlse (plus the entropy's row
        terms); gent = dLoss/d entropy per row, where the spec returns an entropy."""
        return ("LSE2", "DELTA") + ("GENT",) * self.entropy_grad

    @property
    def dq_rows(self) -> RowReads:
        gent = ("gent = tl.load(GENT + rows, mask=row_ok, other=0.0)",) * self.entropy_grad
        return RowReads(
            lines=(_LSE2_ROWS, "delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)") + gent,
            values=("delta", "lse2") + ("gent",) * self.entropy_grad,
            arrays=self.row_arrays,
        )

    @property
    def dkdv_rows(self) -> RowReads:  # FULL tiles lie inside Lq (see [Note] In-bounds FULL tiles): unmasked loads
        masked = ("    gent = tl.load(GENT + rows, mask=row_ok, other=0.0)",) * self.entropy_grad
        whole = ("    gent = tl.load(GENT + rows)",) * self.entropy_grad
        return RowReads(
            lines=("if APPLY_MASK:  # rows past Lq load lse2 = +inf: p = 0 there",
                   '    lse2 = tl.load(LSE2 + rows, mask=row_ok, other=float("inf"))',
                   "    delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)") + masked
            + ("else:", "    lse2 = tl.load(LSE2 + rows)", "    delta = tl.load(DELTA + rows)") + whole,
            values=("lse2", "delta") + ("gent",) * self.entropy_grad,
            arrays=self.row_arrays,
        )

    read_weight = "ds * "  # a read's term is d score / d read: dL/d(read) = dS * term


def build(variant: ir.Variant, form: SoftmaxForm) -> SoftmaxBody:
    grads = derivatives.learnable_gradients(variant, form)
    reads = input_grads([g.read for g in grads], key_reads=True, table_reads=True)
    logits = form.logits  # the score up to a row constant, which softmax ignores
    dscore = derivatives.score_derivative(logits)
    every_tile = [logits, dscore] + [g.dscore for g in grads]

    def tile_code(where: dict) -> tuple[TileCode, dict]:
        return skeleton_tile_code(variant, logits, dscore, every_tile, where)

    tile, names = tile_code(TILE)
    tile_t, names_t = tile_code(TILE_T)
    row_exprs = [form.sink] + [g.dsink for g in grads] if form.sink is not None else []
    row_names, row_loads = tensor_loads(row_exprs, ROW, "r_")
    rnames = {**base_names(variant, ROW), **row_names}
    return SoftmaxBody(
        plain=logits == ir.s and not tile.loads,  # (loads: a learnable input in a row constant)
        has_dscore=dscore != 1,
        tile=tile,
        tile_t=tile_t,
        sink=None if form.sink is None else triton_code(form.sink, rnames),
        row_loads=tuple(row_loads),
        entropy_grad=statistics.differentiated(variant),
        **_fused(variant, form.sink is not None),
        grads=tuple(Grad(**{**vars(read), "entry": _entry(read, names)}, dscore=triton_code(g.dscore, names),
                         dscore_t=triton_code(g.dscore, names_t),
                         dsink=None if g.dsink is None else triton_code(g.dsink, rnames))
                    for read, g in zip(reads, grads)),
    )


def _fused(variant: ir.Variant, sink: bool) -> dict:
    """The forward's accumulators for the spec's row statistics (none without `stat`)."""
    plan = statistics.plan(variant)
    if plan is None or not plan.rows:
        return {}
    fused, values = statistics.fused_rows(plan.rows, sink)
    return {"fused": fused, "fused_rows": tuple(values[r.kind] for r in plan.rows)}


def _entry(read: InputGrad, names: dict) -> str:
    """A small table's entry each pair of a query-major tile reads ("" for other reads)."""
    return "" if read.entry_index is None else triton_code(read.entry_index, names)


class SoftmaxFamily(TileFamily):
    """The online softmax on the tile walks: its kernels (templates/softmax.py.j2), its part of the shared
    launchers (softmax_host.py.j2) and its decode kernel (families/decode.py, softmax_decode.py.j2)."""

    def context(self, a) -> dict:
        form = a.rows.softmax
        return {"family": self, "body": build(a.variant, form),
                **decoding(lambda: decode.build(a.variant, form))}


FAMILY = SoftmaxFamily("softmax.py.j2", "softmax_host.py.j2", "softmax_decode.py.j2", row_array="lse",
                       returns_lse=True, decode_selects=True)
