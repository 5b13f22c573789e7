"""Kernels for general normalizations: the multi-pass forward and the derived backward, as template data.

Fills templates/forward_general.py.j2, backward_general.py.j2 and autograd_general.py.j2 from the row
plan (attnc/analysis/rowstats.py: which statistic each forward pass accumulates, the output terms) and
the gradient plan (attnc/analysis/rowgrad.py: dS, the row adjoints and the backward row reductions).
Elementwise work is printed as sympy common-subexpression steps (`e0 = ...`), so a tile computes a
shared factor (sigmoid(lam * s), say) once for the weight, the statistics and the derivatives.

Names in the kernels: `vis` (visible, clamped to >= 1), `r1, r2, ...` the row statistics (as
`attnc ir` numbers them), `rbar1, ...` their adjoints, `delta` = rowsum(dO * O), `dp` = dO . v.
Row values are [BLOCK_M] vectors; tile expressions read them as `r1[:, None]`.
"""

from __future__ import annotations

import dataclasses

import sympy

from .. import ir
from ..analysis import rowgrad
from ..analysis.rowstats import is_row_constant
from .printers import guarded_triton_code

# the softmax context's keys that describe the softmax itself; every other key (the key range and
# tile classification of the mask) is shared with the general kernels
_SOFTMAX_ONLY = ("mask", "mask_lines", "mask_trivial", "score", "dscore", "tile_loads", "row_loads", "sink", "grads")


def _block(outputs, names, like="s") -> list[str]:
    """Assignments computing each (var, expr) of outputs, common subexpressions first.
    An output that is constant along the row's keys is broadcast to the tile's shape (like `like`)."""
    exprs = [sympy.sympify(e) for _, e in outputs]
    # Reciprocals of row constants (1 / r1, 1 / visible) are computed once per row, [BLOCK_M, 1], so
    # that the tile multiplies instead of dividing.
    reciprocals = {}
    for e in exprs:
        for pw in sorted(e.atoms(sympy.Pow), key=sympy.default_sort_key):
            if pw.exp.is_number and pw.exp < 0 and not pw.base.is_number and is_row_constant(pw.base):
                reciprocals.setdefault(pw, sympy.Symbol(f"inv{len(reciprocals)}"))
    exprs = [e.xreplace(reciprocals) for e in exprs]
    names = dict(names)
    lines = []
    for pw, sym in reciprocals.items():
        lines.append(f"{sym} = {guarded_triton_code(pw, names)}")
        names[sym] = str(sym)
    replacements, reduced = sympy.cse(exprs, symbols=sympy.numbered_symbols("e"), order="none")
    for sym, e in replacements:
        lines.append(f"{sym} = {guarded_triton_code(e, names)}")
        names[sym] = str(sym)
    for (var, original), e in zip(outputs, reduced):
        code = guarded_triton_code(e, names)
        if is_row_constant(original):
            code = f"{code} + tl.zeros_like({like})"
        lines.append(f"{var} = {code}")
    return lines


def kernel_context(gen) -> dict:
    """The template context of the general kernels of `gen` (a codegen.generate.ModuleGenerator)."""
    from .generate import BuildError, ModuleGenerator, _INDEX_ROW, _INDEX_TILE, _base_names, \
        _common_subexpressions, _loads

    v, rows = gen.v, gen.rows
    try:
        grad = rowgrad.plan_gradients(v, rows)
    except rowgrad.UnsupportedGradient as err:
        raise BuildError(str(err)) from None

    # The key range and tile classification depend on the mask only: take them from the softmax
    # kernels' context for the same mask, so both families iterate key tiles the same way.
    twin = dataclasses.replace(v, probs=sympy.exp(v.score) / ir.RowSum(sympy.exp(v.score)))
    ctx = {key: value for key, value in ModuleGenerator(twin).kernel_context().items() if key not in _SOFTMAX_ONLY}

    stats = grad.stats
    reducible = [st for st in stats if st.kind in ("sum", "max")]
    closed_vis = next((st for st in stats if st.kind == "closed"), None)
    late = {st.symbol for st in stats if st.pass_ >= rows.output_pass}

    # -- output terms: o = sum_t c_t * acc_t, acc_t = sum_j w_t v_j --
    # A coefficient known before the output pass (1, 1/visible, 1/r1 of an earlier pass) is folded
    # into the weight: one accumulator for all such terms.
    folded, accumulated = sympy.Integer(0), []
    for term in rows.terms:
        w, c = rowgrad.name_stats(term.weight, stats), rowgrad.name_stats(term.coefficient, stats)
        if c.free_symbols & late:
            accumulated.append((w, c))
        else:
            folded += c * w
    acc_terms = ([(folded, sympy.Integer(1))] if folded != 0 else []) + accumulated

    dscore_terms = [("ds", grad.dscore)] + [(f"dt_{t.name}", e) for t, _, e in grad.learnable]
    tile_exprs = [v.mask] + [st.arg for st in reducible] + [w for w, _ in acc_terms] \
        + [grad.probs] + [e for _, e in dscore_terms] + [r.term for r in grad.reductions]
    tile_names, tile_loads = _loads(tile_exprs, _INDEX_TILE, "t_")
    row_exprs = [c for _, c in acc_terms] + [a.value for a in grad.adjoints] \
        + ([rows.visible] if closed_vis is not None else [])
    row_names_, row_loads = _loads(row_exprs, _INDEX_ROW, "r_")

    tnames = {**_base_names(v, "offs_m[:, None]", "offs_n[None, :]"), **tile_names}
    rnames = {**_base_names(v, "offs_m", None), **row_names_}
    for st in stats:
        var = "vis" if st.stat == ir.visible else str(st.symbol)
        tnames[st.symbol] = f"{var}[:, None]"
        rnames[st.symbol] = var
    for adj in grad.adjoints:
        tnames[adj.symbol] = f"{adj.symbol}[:, None]"
        rnames[adj.symbol] = str(adj.symbol)
    tnames[rowgrad.DP] = "dp"
    rnames[rowgrad.DELTA] = "delta"
    for red in grad.reductions:
        rnames[red.symbol] = str(red.symbol)
    mask_lines, mask_code = _common_subexpressions(v.mask, tnames, "mask_")

    def var(st):
        return "vis" if st.stat == ir.visible else str(st.symbol)

    # -- forward passes --
    passes = []
    for p in range(1, rows.passes + 1):
        here = [st for st in stats if st.pass_ == p]
        outputs = [(f"g_{st.symbol}", st.arg) for st in here if st.kind in ("sum", "max")]
        accs = []
        if p == rows.output_pass:
            for i, (w, _) in enumerate(acc_terms):
                outputs.append((f"w{i}", w))
                accs.append(f"acc{i}")
        described = [f"{'visible' if st.kind == 'count' else st.symbol} ({st.kind})" for st in here]
        passes.append(dict(
            index=p,
            stats=[dict(var=var(st), kind=st.kind) for st in here],
            accs=accs,
            state=[var(st) for st in here] + accs,
            known=[var(st) for st in stats if st.pass_ < p],
            lines=_block(outputs, tnames),
            text=", ".join(described + (["the output" if len(accs) == 1 else f"the {len(accs)} output terms"]
                                         if accs else [])),
        ))

    saved = list(grad.saved)
    # what a backward kernel reads per query row (with offs_m, row_ok and pid_bh in scope)
    row_lines = [f"{load.var} = tl.load({load.ptr} + {load.offset}"
                 + (f", mask={load.mask}, other=0)" if load.mask else ")") for load in row_loads]
    if saved:
        row_lines.append("stat_stride = B * Hq * Lq")
    row_lines += [f"{var(st)} = tl.load(STATS + {i} * stat_stride + pid_bh * Lq + offs_m, mask=row_ok, "
                  f"other={'1.0' if st.kind == 'count' else '0.0'})" for i, st in enumerate(saved)]
    if closed_vis is not None:
        row_lines.append(f"vis = tl.maximum(({guarded_triton_code(rows.visible, rnames)}) "
                         "+ tl.zeros([BLOCK_M], dtype=tl.float32), 1.0)")
    adjoint_lines = [f"{a.symbol} = tl.load(RBAR + {i} * stat_stride + pid_bh * Lq + offs_m, mask=row_ok, other=0.0)"
                     for i, a in enumerate(grad.adjoints)]
    return dict(
        ctx,
        general=True,
        mask=mask_code,
        mask_lines=mask_lines,
        mask_trivial=v.mask is sympy.true,
        tile_loads=tile_loads,
        row_loads=row_loads,
        vis_closed=None if closed_vis is None else guarded_triton_code(rows.visible, rnames),
        passes=passes,
        coefficients=[guarded_triton_code(c, rnames) for _, c in acc_terms],
        saved=[dict(var=var(st), index=i, kind=st.kind) for i, st in enumerate(saved)],
        row_lines=row_lines,
        adjoint_lines=adjoint_lines,
        stat_vars=[var(st) for st in stats],
        adjoints=[dict(var=str(a.symbol), index=i, code=guarded_triton_code(a.value, rnames))
                  for i, a in enumerate(grad.adjoints)],
        adjoint_vars=[str(a.symbol) for a in grad.adjoints],
        reductions=[dict(var=str(r.symbol), text=r.text) for r in grad.reductions],
        reduction_lines=_block([(f"term_{r.symbol}", r.term) for r in grad.reductions], tnames),
        reductions_read_dp=any(rowgrad.DP in r.term.free_symbols for r in grad.reductions),
        needs_delta=any(rowgrad.DELTA in a.value.free_symbols for a in grad.adjoints),
        dq_lines=_block(dscore_terms, tnames),
        dkdv_lines=_block([("p", grad.probs), ("ds", grad.dscore)], tnames),
        grads=[dict(name=t.name, var=f"d_{t.name}", term=f"dt_{t.name}") for t, _, _ in grad.learnable],
    )
