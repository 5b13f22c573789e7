"""IR -> the tile-plan code of a generated module (templates/plan.py.j2).

Three kinds of masks, three kinds of plan:
- "all"   no mask: every tile is FULL, the kernels loop over every key tile.
- "band"  one clause `lo(q) <= kv <= hi(q)` with bounds non-decreasing in q (causal, sliding windows):
          the kernels compute each query tile's key range in closed form; no plan is built for them,
          and `plan()` evaluates the same bounds on the host for inspection.
- "lists" anything else the interval rules cover (documents, neighbourhoods, sinks with windows, ...):
          the module builds per-query-tile lists of FULL and PARTIAL key tiles from the interval form
          of the mask (runtime/plan.py) and the kernels iterate over them.
A mask outside the interval rules ("dense", none in the catalog) visits every tile as PARTIAL.
"""

from __future__ import annotations

import sympy
from sympy.core.function import AppliedUndef

from .. import ir
from ..analysis import bounds
from .names import ident as _ident
from .names import torch_loads
from .printers import UnsupportedExpression, interval_code, torch_code


def _mode(mask, clauses) -> str:
    if mask is sympy.true:
        return "all"
    return "band" if len(clauses) == 1 and clauses[0].exact else "lists"


def _interval_function(variant: ir.Variant, mask) -> tuple[list, str]:
    """Statements and result of `_mask_cells`: common sub-expressions get names, so a 2-D
    neighbourhood reads as its coordinates, centres and window tests rather than one huge line."""
    names = {ir.q: "q", ir.kv: "kv", ir.b: "b", ir.h: "h"}
    names.update({sym: f"cells.sizes[{name!r}]" for name, sym in ir.SIZES.items()})
    for p in variant.params:
        names[p.symbol] = f"({_ident(p.name)}, {_ident(p.name)})"
    bool_loads = set()
    lines = []
    loads = sorted(mask.atoms(AppliedUndef), key=sympy.default_sort_key)
    for i, load in enumerate(loads):
        tensor = load.func.__name__
        var = f"{tensor}_{i}"
        indices = ", ".join(f'"{a}"' for a in load.args)
        lines.append((var, f"cells.load({_ident(tensor)}, {indices})"))
        names[load] = var
        if variant.tensor(tensor).dtype == "bool":
            bool_loads.add(load)
    replacements, (reduced,) = sympy.cse(mask, symbols=sympy.numbered_symbols("x"), optimizations=None)
    for sym, expr in replacements:
        if isinstance(expr, AppliedUndef):
            names[sym] = names[expr]
            continue
        lines.append((str(sym), interval_code(expr, names, bool_loads)))
        names[sym] = str(sym)
    return lines, interval_code(reduced, names, bool_loads)


def plan_context(variant: ir.Variant, clauses=None) -> dict:
    """`clauses`: bounds.key_clauses of the mask, when the caller has them already."""
    mask = sympy.sympify(variant.mask)
    clauses = bounds.key_clauses(mask) if clauses is None else clauses
    mode = _mode(mask, clauses)
    loads = mask.atoms(AppliedUndef)
    symbols = mask.free_symbols | {a for load in loads for a in load.args}
    tensors = sorted({load.func.__name__ for load in loads})
    params = [p.name for p in variant.params if p.symbol in mask.free_symbols]
    # the sizes a plan depends on: the lengths, and any other size the mask reads (as an index's
    # extent, b and h make the plan per batch entry and per head)
    sizes = ["Lq", "Lk"] + [name for name, sym in ir.SIZES.items() if name not in ("Lq", "Lk") and (
        sym in symbols or (name == "B" and ir.b in symbols) or (name == "Hq" and ir.h in symbols))]
    ctx = {
        "mode": mode,
        "uses_b": ir.b in symbols,
        "uses_h": ir.h in symbols,
        "sizes": sizes,
        "tensors": [{"name": t, "ident": _ident(t)} for t in tensors],
        "params": [{"name": p, "ident": _ident(p)} for p in params],
        "lines": [], "result": "",
        "band": None,
        "reason": "",
    }
    if mode == "lists":
        try:
            ctx["lines"], ctx["result"] = _interval_function(variant, mask)
        except UnsupportedExpression as err:
            ctx["mode"], ctx["reason"] = "dense", str(err)
    if mode == "band":
        (clause,) = clauses
        names = {ir.b: "b_idx", ir.h: "h_idx"}
        names.update({sym: name for name, sym in ir.SIZES.items()})
        names.update({p.symbol: _ident(p.name) for p in variant.params})
        names.update(torch_loads(clause.lo, clause.hi))  # only b- and h-indexed: bounds are per query tile

        def at(expr, q_code, default):
            return default if expr is None else torch_code(expr, {**names, ir.q: q_code})

        ctx["band"] = {
            "n_lo": at(clause.lo, "q_first", "0"), "n_hi": at(clause.hi, "q_last", "Lk - 1"),
            "full_lo": at(clause.lo, "q_last", "0"), "full_hi": at(clause.hi, "q_first", "Lk - 1"),
            "text": f"{clause.lo if clause.lo is not None else 0} <= kv <= {clause.hi if clause.hi is not None else 'Lk - 1'}",
        }
    return ctx
