"""The split-KV decoding family (flash-decoding): what its kernel computes per tile, printed for
templates/decode.py.j2.

A decode program owns one split of one sequence's key range for one group of query heads that share
a key head and a value head; its tile rows are those heads times the new queries, each row with its
own head (`row_h`) and absolute query position (`row_q`), so a K/V tile is read once for all of them.
The tile body is the online softmax; every split writes its (o, lse) and a second, spec-independent
kernel merges the splits by log-sum-exp (runtime/merge.py). A softmax sink enters once, in split 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from ... import ir
from ...analysis.rowstats import SoftmaxForm
from ..printers import triton_code
from ..skeleton import (
    DECODE_ROW,
    DECODE_TILE,
    Load,
    TileCode,
    base_names,
    tensor_loads,
    tile_code,
)


@dataclass(frozen=True)
class DecodeBody:
    plain: bool  # the logits are the scaled dot product itself: log2(e) folds into the scale
    tile: TileCode  # [BLOCK_M, BLOCK_N] tiles whose rows carry their own head and query position
    sink: str | None  # the sink logit of a row, if any
    row_loads: tuple[Load, ...]  # per-row inputs the sink and the offset read
    offset: str | None  # the score's row constant the logits leave out (SoftmaxForm.offset), if any
    # a select: each row (one new query) keeps the key tiles the host chose for it (`row_sel`, per tile)
    row_select: bool = False


def build(variant: ir.Variant, form: SoftmaxForm) -> DecodeBody:
    logits = form.logits
    row_select = variant.select is not None
    tile, _ = tile_code(variant, logits, logits, [logits], DECODE_TILE)
    offset = None if form.offset == 0 else form.offset
    row_names, row_loads = tensor_loads([e for e in (form.sink, offset) if e is not None], DECODE_ROW, "r_")
    rnames = {**base_names(variant, DECODE_ROW), **row_names}
    return DecodeBody(
        plain=logits == ir.s,
        tile=tile,
        sink=None if form.sink is None else triton_code(form.sink, rnames),
        row_loads=tuple(row_loads),
        offset=None if offset is None else triton_code(offset, rnames),
        row_select=row_select,
    )
