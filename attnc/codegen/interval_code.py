"""IR -> the interval form of a mask, `_mask_cells` of a generated module (templates/walks/lists.j2).

The host builds tile plans for list walks (attnc/analysis/walks.py, ListTiles) by evaluating the mask
over cells (a query range x a key range) with interval arithmetic (runtime/intervals.py): every value
becomes (lo, hi), every condition (all, any).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
from sympy.core.function import AppliedUndef

from .. import ir
from ..analysis.walks import plain_load
from .names import ident as _ident
from .printers import UnsupportedExpression, interval_code


@dataclass(frozen=True)
class MaskCells:
    """The body of `_mask_cells`: (variable, code) statements, then the mask's (all, any)."""

    lines: tuple[tuple[str, str], ...]
    result: str


def mask_cells(variant: ir.Variant, condition=None) -> MaskCells:
    """The interval form of the mask (or of another condition of the spec's indices and inputs)."""
    lines, result = interval_function(variant, sympy.sympify(variant.mask if condition is None else condition))
    return MaskCells(tuple(lines), result)


def interval_gap(variant: ir.Variant, condition=None) -> str | None:
    """Why the mask (or `condition`) has no interval form (a function without an interval rule), or None."""
    try:
        interval_function(variant, sympy.sympify(variant.mask if condition is None else condition))
    except UnsupportedExpression as err:
        return str(err)
    return None


def interval_function(variant: ir.Variant, mask) -> tuple[list, str]:
    """Statements and result of `_mask_cells`: common sub-expressions get names, so a 2-D
    neighbourhood reads as its coordinates, centres and window tests rather than one huge line."""
    names = {ir.q: "q", ir.kv: "kv", ir.b: "b", ir.h: "h"}
    names.update({sym: f"cells.sizes[{name!r}]" for name, sym in ir.SIZES.items()})
    for p in variant.params:
        names[p.symbol] = f"({_ident(p.name)}, {_ident(p.name)})"
    bool_loads = set()
    lines = []
    # inner loads first (a gather offsets[doc[q]] reads doc first); a load at an index expression (an
    # axis of the tensor's own) stands in the mask as a plain name, so cse cannot rewrite its indices
    gathers = {}
    loads = sorted(mask.atoms(AppliedUndef), key=lambda a: (len(a.atoms(AppliedUndef)), sympy.default_sort_key(a)))
    for i, load in enumerate(loads):
        tensor = load.func.__name__
        is_bool = variant.tensor(tensor).dtype == "bool"
        if not plain_load(variant, load):
            var = f"{tensor}_{i}"
            indices = ", ".join(interval_code(a, names, bool_loads) for a in load.args)
            lines.append((var, f"cells.load_at({_ident(tensor)}, {indices})"))
            gathers[load] = sympy.Symbol(var)
            names[load] = var
            names[gathers[load]] = f"I.truth({var})" if is_bool else var
            if is_bool:
                bool_loads.add(load)
            continue
        var = f"{tensor}_{i}"
        indices = ", ".join(f'"{a}"' for a in load.args)
        lines.append((var, f"cells.load({_ident(tensor)}, {indices})"))
        names[load] = var
        if variant.tensor(tensor).dtype == "bool":
            bool_loads.add(load)
    mask = mask.xreplace(gathers)
    replacements, (reduced,) = sympy.cse(mask, symbols=sympy.numbered_symbols("x"), optimizations=None)
    for sym, expr in replacements:
        if isinstance(expr, AppliedUndef):
            names[sym] = names[expr]
            continue
        lines.append((str(sym), interval_code(expr, names, bool_loads)))
        names[sym] = str(sym)
    return lines, interval_code(reduced, names, bool_loads)
