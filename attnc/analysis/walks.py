"""The tile walk of a spec: how a kernel program finds the tiles of the other side.

A program owns a query tile (forward, dQ, row adjoints) or a key tile (dK/dV) and walks the tiles of the
other side that the mask lets through. What differs between masks is only *how the tiles are found*;
that is a `TileWalk`, chosen once per spec (`choose_walk`), one class per walk:

    AllTiles       no mask: every tile FULL (the tile cut by Lk is PARTIAL in the forward and dQ)
    BandTiles      one clause lo(q) <= kv <= hi(q), bounds non-decreasing in q (causal, windows,
                   1-D neighbourhoods): key ranges in closed form inside the kernels, no plan at all
    ListTiles      everything the interval rules cover: per-tile lists built on the host by
                   runtime/plan.py from the interval form of the mask (attnc/codegen/interval_code.py)
    SelectedTiles  a spec with `select` (block top-k): the list walk's kernels on lists chosen at every
                   call from q and k, among the tiles of the mask's lists
    UnplannedTiles a mask outside the interval rules: every tile PARTIAL (none in the catalog)

The walks hold sympy (bounds, the mask) and what it reads; attnc/codegen/skeleton.py and
attnc/codegen/interval_code.py print them, and each walk's kernel loops and host plan are the macros of
its own template (`template`, in templates/walks/).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import sympy
from sympy.core.function import AppliedUndef

from .. import ir
from ..errors import SpecError
from .bounds import Clause

_INDEX_NAMES = ("q", "kv", "b", "h")  # the order `_mask_cells` binds the indices it reads


@dataclass(frozen=True)
class TileWalk:
    """How a program finds the tiles of the other side (see the module docstring)."""

    plan_mode: ClassVar[str]  # PLAN_MODE of the generated module: the runtime reads it (runtime/plan.py)
    template: ClassVar[str]  # the walk's macros: kernel loops, host plan (templates/walks/*.j2)
    kernel_plan: ClassVar[bool] = False  # the kernels read per-tile lists the host builds (plan arguments)
    # split-KV decoding of a mask that is the union of two exact bands reads only their tiles
    # (`decode_clauses`); the band and all walks bound their keys themselves
    decodes_by_bands: ClassVar[bool] = False
    bounds_tile_ends: ClassVar[bool] = False  # the key walk bounds a query tile by its first and last query
    reads_qk: ClassVar[bool] = False  # the plan is chosen from q and k at every call (a select)
    uses_b: bool = False  # the mask reads the batch index: plans are per batch entry
    uses_h: bool = False  # ... per head
    tensors: tuple[str, ...] = ()  # tensor inputs the mask reads (plans are rebuilt when they change)
    params: tuple[str, ...] = ()  # scalar parameters it reads (part of the plan cache's key)
    sizes: tuple[str, ...] = ("Lq", "Lk")  # the sizes a plan depends on (part of its key)

    @property
    def mask_params(self) -> tuple[str, ...]:
        """The params the element mask itself reads (a select's plan reads more)."""
        return self.params

    @property
    def mask_tensors(self) -> tuple[str, ...]:
        return self.tensors

    @property
    def per(self) -> str:
        axes = [axis for axis, used in (("batch", self.uses_b), ("head", self.uses_h)) if used]
        return f", per {' and '.join(axes)}" if axes else ""

    def ir_line(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class AllTiles(TileWalk):
    plan_mode = "all"
    template = "walks/all.j2"

    def ir_line(self) -> str:
        return "every tile FULL (no mask)"


@dataclass(frozen=True)
class UnplannedTiles(TileWalk):
    plan_mode = "dense"
    template = "walks/dense.j2"
    decodes_by_bands = True
    reason: str = ""

    def ir_line(self) -> str:
        return f"every tile PARTIAL ({self.reason})"


@dataclass(frozen=True, kw_only=True)
class BandTiles(TileWalk):
    plan_mode = "band"
    template = "walks/band.j2"
    bounds_tile_ends = True
    clause: Clause  # the mask's one clause, exact: lo(q) <= kv <= hi(q)

    @property
    def lo_open(self) -> bool:
        """lo(q) <= 0 for every q (causal): the walks drop the loops below the band."""
        lo = self.clause.lo
        return lo is None or bool(lo.is_number and lo <= 0)

    @property
    def hi_open(self) -> bool:
        """hi(q) = Lk - 1: only a tile cut by Lk is PARTIAL above the band."""
        return self.clause.hi is None

    @property
    def reads_b(self) -> bool:
        return ir.b in band_reads(self.clause)

    @property
    def reads_h(self) -> bool:
        return ir.h in band_reads(self.clause)

    def ir_line(self) -> str:
        return f"closed-form key range per query tile: {band_text(self.clause)} (in the kernels{self.per})"


@dataclass(frozen=True)
class ListTiles(TileWalk):
    plan_mode = "lists"
    template = "walks/lists.j2"
    kernel_plan = True
    decodes_by_bands = True
    cell_indices: tuple[str, ...] = ()  # the indices `_mask_cells` reads outside its plain loads

    def ir_line(self) -> str:
        return f"lists of FULL and PARTIAL key tiles from interval analysis of the mask{self.per}"


@dataclass(frozen=True, kw_only=True)
class SelectedTiles(ListTiles):
    """Block top-k (`select`): the list walk's kernels, on lists that the host chooses at every call from
    q and k among the tiles of the mask's own lists. The lists are per batch entry and head (uses_b,
    uses_h), whatever the mask reads; `mask_uses_b`, `mask_uses_h` say what the mask's own plan is per."""

    plan_mode = "selected"
    template = "walks/selected.j2"
    decodes_by_bands = False
    reads_qk = True
    select: ir.Selection
    mask_uses_b: bool = False
    mask_uses_h: bool = False
    keep_uses_b: bool = False  # the keep condition (with the mask) reads b: its kept tiles are per batch entry
    keep_uses_h: bool = False
    keep_cell_indices: tuple[str, ...] = ()  # the indices `_kept_cells` reads outside its plain loads
    mask_reads: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # the mask's own (params, tensors)
    base_params: tuple[str, ...] = ()  # the params the mask and the keep condition read (not the count)

    @property
    def mask_params(self) -> tuple[str, ...]:
        return self.mask_reads[0]

    @property
    def mask_tensors(self) -> tuple[str, ...]:
        return self.mask_reads[1]

    def ir_line(self) -> str:
        return ("the select's key tiles, chosen from q and k at every call per batch and head, among the "
                "lists of FULL and PARTIAL key tiles from interval analysis of the mask")


def band_reads(clause: Clause) -> frozenset:
    """The symbols a band's bounds read (indices, sizes, params; a load's subscripts included)."""
    return frozenset().union(*(e.free_symbols for e in (clause.lo, clause.hi) if e is not None))


def band_text(clause: Clause) -> str:
    return f"{clause.lo if clause.lo is not None else 0} <= kv <= {clause.hi if clause.hi is not None else 'Lk - 1'}"


def plain_load(variant: ir.Variant, load) -> bool:
    """A load subscripted by bare indices, sizes or params only (`doc[b, q]`): `_mask_cells` reads it
    by its subscripts' names, as a whole, not through the index values."""
    names = {*ir.INDICES.values(), *ir.SIZES.values(), *(p.symbol for p in variant.params)}
    return all(a.is_Symbol and a in names for a in load.args)


def _cell_indices(variant: ir.Variant, mask) -> tuple[str, ...]:
    """The indices `_mask_cells` binds: those the mask reads outside its plain loads."""
    plain = {load: sympy.Dummy() for load in mask.atoms(AppliedUndef) if plain_load(variant, load)}
    symbols = mask.xreplace(plain).free_symbols
    return tuple(name for name in _INDEX_NAMES if ir.INDICES[name] in symbols)


def _reads(variant: ir.Variant, *exprs) -> dict:
    """What a plan of exprs (the mask; a select's keep condition and count) depends on: the walk's
    uses_b, uses_h, sizes, tensors and params."""
    exprs = [sympy.sympify(e) for e in exprs]
    loads = set().union(*(e.atoms(AppliedUndef) for e in exprs))
    symbols = set().union(*(e.free_symbols for e in exprs)) | {a for load in loads for a in load.args}
    # the sizes a plan depends on: the lengths, and any other size the mask reads (as an index's
    # extent, b and h make the plan per batch entry and per head)
    sizes = ("Lq", "Lk") + tuple(name for name, sym in ir.SIZES.items() if name not in ("Lq", "Lk") and (
        sym in symbols or (name == "B" and ir.b in symbols) or (name == "Hq" and ir.h in symbols)))
    return {"uses_b": ir.b in symbols, "uses_h": ir.h in symbols, "sizes": sizes,
            "tensors": tuple(sorted({load.func.__name__ for load in loads})),
            "params": tuple(p.name for p in variant.params if p.symbol in symbols)}


def choose_walk(variant: ir.Variant, clauses: tuple[Clause, ...],
                interval_gap: Callable[[ir.Variant, object], str | None]) -> TileWalk:
    """The tile walk of a spec's mask. `interval_gap(variant, condition)` says why a condition has no
    interval form (no interval rule for one of its functions: attnc/codegen/interval_code.py), None
    when it has one; it is asked only of masks that are not one band, and of a select's conditions."""
    mask = sympy.sympify(variant.mask)
    if variant.select is not None:
        return _selected_walk(variant, mask, interval_gap)
    if mask is sympy.true:
        return AllTiles()
    per = _reads(variant, mask)
    if len(clauses) == 1 and clauses[0].exact:
        return BandTiles(**per, clause=clauses[0])
    gap = interval_gap(variant, mask)
    if gap is not None:
        return UnplannedTiles(**per, reason=gap)
    return ListTiles(**per, cell_indices=_cell_indices(variant, mask))


def _selected_walk(variant: ir.Variant, mask, interval_gap) -> SelectedTiles:
    """A select's walk: the candidates are the tiles of the mask's plan and the kept ones those of
    mask-and-keep's, so both need an interval form (a SpecError at the statement otherwise)."""
    sel = variant.select
    kept = sympy.And(mask, sel.keep)
    for condition, span, what in ((mask, variant.spans.of(ir.Statement.MASK), "the mask"),
                                  (kept, variant.spans.of(ir.Statement.SELECT, "keep"), "the keep condition")):
        gap = interval_gap(variant, condition)
        if gap is not None:
            raise SpecError.at(f"select needs tile plans of {what}, which has no interval form: {gap}",
                               span or variant.spans.of(ir.Statement.SELECT),
                               "block top-k chooses among the tiles of the mask's plan",
                               path=variant.path, source=variant.source)
    reads, kept_reads = _reads(variant, mask), _reads(variant, kept)
    every = _reads(variant, mask, kept, sel.count)
    return SelectedTiles(**{**every, "uses_b": True, "uses_h": True}, cell_indices=_cell_indices(variant, mask),
                         select=sel, mask_uses_b=reads["uses_b"], mask_uses_h=reads["uses_h"],
                         keep_uses_b=kept_reads["uses_b"], keep_uses_h=kept_reads["uses_h"],
                         keep_cell_indices=_cell_indices(variant, kept),
                         mask_reads=(reads["params"], reads["tensors"]), base_params=kept_reads["params"])


def decode_clauses(walk: TileWalk, clauses: tuple[Clause, ...]) -> tuple[Clause, ...]:
    """Split-KV decoding of a plan-list mask that is the union of two exact bands (sinks with a
    window: kv <= min(q, sinks - 1), or q - window < kv <= q): the two key ranges, so a decode reads
    only their tiles. () otherwise (decoding then visits every tile, masked)."""
    if walk.decodes_by_bands and len(clauses) == 2 and all(c.exact for c in clauses):
        return clauses
    return ()
