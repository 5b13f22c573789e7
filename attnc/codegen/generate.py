"""IR -> the source of one Python module: Triton kernels, autograd Function, public API, reference.

This module prepares everything the templates need as plain strings and lists (expressions printed by
attnc/codegen/printers.py, argument lists, load statements); templates/*.j2 only arrange them. Spec
identifiers reach the generated code only through `ident` (attnc/codegen/names.py), so no spec name
can collide with generated names or Python keywords.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from dataclasses import dataclass

import jinja2
import sympy
from sympy.core.function import AppliedUndef

from .. import __version__, ir
from ..analysis import bounds, derivatives, rowstats
from .layout import wrap_long_lines
from .names import ident as _ident, torch_loads
from .plan import plan_context
from .printers import torch_code, triton_code


class BuildError(Exception):
    """A spec that checks but cannot be compiled (yet); the message says why."""


@dataclass(frozen=True)
class _Load:
    var: str  # the variable the kernel binds the loaded value to
    ptr: str
    offset: str  # pointer offset expression
    mask: str  # bounds mask or "" when always in range
    dtype: str


_INDEX_TILE = {"b": "off_b", "h": "off_h", "q": "offs_m[:, None]", "kv": "offs_n[None, :]"}
_INDEX_ROW = {"b": "off_b", "h": "off_h", "q": "offs_m", "kv": None}
_INDEX_BOUND = {"q": ("Lq",), "kv": ("Lk",)}


def _loads(exprs, index_code: dict, prefix: str) -> tuple[dict, list[_Load]]:
    """Names and load statements for every tensor load in exprs."""
    names, loads = {}, []
    found = sorted({a for e in exprs for a in sympy.sympify(e).atoms(AppliedUndef)}, key=sympy.default_sort_key)
    for i, load in enumerate(found):
        tensor = load.func.__name__
        parts, masks = [], []
        for axis, index in enumerate(load.args):
            code = index_code[str(index)]
            if code is None:
                raise BuildError(f"{tensor} is read per key where only row values are available")
            parts.append(f"{code} * stride_{tensor}_{axis}")
            if str(index) in ("q", "kv"):
                masks.append(f"({code} < {'Lq' if str(index) == 'q' else 'Lk'})")
        var = f"{prefix}{tensor}_{i}"
        names[load] = var
        loads.append(_Load(var, f"{_ident(tensor)}ptr", " + ".join(parts), " & ".join(masks), ""))
    return names, loads


def _common_subexpressions(expr, names: dict, prefix: str, width: int = 72) -> tuple[list[str], str]:
    """Long expressions (multi-dimensional masks) as a few named steps instead of one huge line:
    bottom-up, every sub-expression whose code is longer than `width` gets its own variable."""
    names = dict(names)
    lines: list[str] = []
    counter = iter(range(10**6))

    def bind(e):
        if not isinstance(e, sympy.Basic) or e.is_Atom or e in names or isinstance(e, AppliedUndef):
            return e
        if isinstance(e, (sympy.Piecewise, sympy.functions.elementary.piecewise.ExprCondPair)):
            return e  # kept whole: its conditions must stay boolean expressions
        e = e.func(*[bind(a) for a in e.args])
        code = triton_code(e, names)
        if len(code) > width or (e.is_Pow and not e.base.is_Atom):
            if e.is_Pow and not e.base.is_Atom and len(code) <= width:
                base = sympy.Symbol(f"{prefix}{next(counter)}")
                lines.append(f"{base} = {triton_code(e.base, names)}")
                names[base] = str(base)
                return sympy.Pow(base, e.exp, evaluate=False)
            sym = sympy.Symbol(f"{prefix}{next(counter)}")
            lines.append(f"{sym} = {code}")
            names[sym] = str(sym)
            return sym
        return e

    if len(triton_code(expr, names)) <= width:
        return [], triton_code(expr, names)
    reduced = expr.func(*[bind(a) for a in expr.args])
    return lines, triton_code(reduced, names)


def _base_names(variant: ir.Variant, q_code: str, kv_code: str | None) -> dict:
    names = {ir.q: q_code, ir.b: "off_b", ir.h: "off_h", ir.s: "s"}
    if kv_code is not None:
        names[ir.kv] = kv_code
    names.update({sym: name for name, sym in ir.SIZES.items()})
    for p in variant.params:
        names[p.symbol] = _ident(p.name)
    return names


class ModuleGenerator:
    def __init__(self, variant: ir.Variant):
        self.v = variant
        self.rows = rowstats.plan_rows(variant)
        self.clauses = bounds.key_clauses(variant.mask)  # the mask's key bounds, for kernels and plan
        self.plan = plan_context(variant, self.clauses)

    # ---- kernels (softmax family) ----
    def kernel_context(self) -> dict | None:
        sm = self.rows.softmax
        if sm is None:
            return None
        v = self.v
        try:
            grads = derivatives.learnable_gradients(v, sm.sink)
        except derivatives.UnsupportedGradient as err:
            raise BuildError(str(err)) from None
        # logits = score up to a row constant, which softmax ignores; the kernels use the score itself
        logits = sm.logits
        tile_exprs = [v.mask, logits, derivatives.score_derivative(logits)] + [g.dscore for g in grads]
        tile_names, tile_loads = _loads(tile_exprs, _INDEX_TILE, "t_")
        names = {**_base_names(v, "offs_m[:, None]", "offs_n[None, :]"), **tile_names}
        row_exprs = [sm.sink] + [g.dsink for g in grads] if sm.sink is not None else []
        row_names, row_loads = _loads([e for e in row_exprs if e is not None], _INDEX_ROW, "r_")
        rnames = {**_base_names(v, "offs_m", None), **row_names}

        clauses = []
        for c in self.clauses:
            def at(expr, q_code, default):
                if expr is None:
                    return default
                return triton_code(expr, {**_base_names(v, q_code, None), **self._scalar_loads(expr, q_code)})
            clauses.append(dict(
                any_lo=at(c.lo, "m_first", "0"), any_hi=at(c.hi, "m_last", "Lk - 1"),
                all_lo=at(c.lo, "m_last", "0"), all_hi=at(c.hi, "m_first", "Lk - 1"), exact=c.exact,
                text=f"{'?' if c.lo is None else c.lo} <= kv <= {'?' if c.hi is None else c.hi}"
                     + ("" if c.exact else " (+ residual)"),
            ))
        def fold(fn, items):
            out = items[0]
            for item in items[1:]:
                out = f"{fn}({out}, {item})"
            return out

        n = range(len(clauses))
        ranges = dict(
            n_lo=f"tl.maximum({fold('tl.minimum', [f'c{i}_any_lo' for i in n])}, 0)" if clauses else "0",
            n_hi=f"tl.minimum({fold('tl.maximum', [f'c{i}_any_hi' for i in n])}, Lk - 1)" if clauses else "-1",
            touched=" | ".join(f"((start_n <= c{i}_any_hi) & (end_n >= c{i}_any_lo))" for i in n) or "False",
            full=" | ".join(f"((c{i}_all_lo <= start_n) & (end_n <= c{i}_all_hi))" for i in n if clauses[i]["exact"]),
        )
        scalar_loads = {}
        for c in self.clauses:
            for e in (c.lo, c.hi):
                if e is not None:
                    scalar_loads.update(self._scalar_loads(e, "m_first", collect=True))
        mask_lines, mask_code = _common_subexpressions(v.mask, names, "mask_")
        return dict(
            mask=mask_code,
            mask_lines=mask_lines,
            score=triton_code(logits, names),
            dscore=triton_code(derivatives.score_derivative(logits), names),
            tile_loads=tile_loads,
            row_loads=row_loads,
            sink=None if sm.sink is None else triton_code(sm.sink, rnames),
            grads=[dict(
                name=g.tensor.name, var=f"d_{g.tensor.name}",
                dscore=triton_code(g.dscore, names),
                dsink=None if g.dsink is None else triton_code(g.dsink, rnames),
            ) for g in grads],
            clauses=clauses,
            scalar_loads=list(scalar_loads.values()),
            mask_trivial=v.mask is sympy.true,
            plan_mode=self.plan["mode"],
            plan_uses_b=self.plan["uses_b"],
            plan_uses_h=self.plan["uses_h"],
            **ranges,
        )

    def _scalar_loads(self, expr, q_code, collect=False):
        """Loads in a key-range bound: only b- and h-indexed tensors are allowed there (scalars)."""
        out = {}
        for load in sympy.sympify(expr).atoms(AppliedUndef):
            tensor = load.func.__name__
            offset = " + ".join(f"{_INDEX_ROW[str(i)]} * stride_{tensor}_{a}" for a, i in enumerate(load.args))
            var = f"s_{tensor}"
            out[load] = (var, f"{var} = tl.load({_ident(tensor)}ptr + {offset})") if collect else var
        return out

    # ---- reference ----
    def reference_context(self) -> dict:
        v = self.v
        names = _base_names(v, "q_idx", "kv_idx")
        names[ir.s] = "s"
        names.update(torch_loads(v.mask, v.score, v.probs))
        ctx = dict(mask=torch_code(v.mask, names) if v.mask is not sympy.true else None,
                   score=torch_code(v.score, names))
        sm = self.rows.softmax
        if sm is not None:
            ctx["softmax_logits"] = torch_code(sm.logits, names)
            ctx["sink"] = None if sm.sink is None else torch_code(sm.sink, names)
            return ctx
        # general probabilities: row statistics computed innermost first, as masked torch reductions
        stats = [st for st, _ in self.rows.stats_in_order if st != ir.visible]
        stats.sort(key=sympy.count_ops)
        stat_lines = []
        stat_names = dict(names)
        stat_names[ir.visible] = "visible"
        for i, st in enumerate(stats):
            var = f"stat_{i}"
            fn = "R.rowsum" if isinstance(st, ir.RowSum) else "R.rowmax"
            stat_lines.append((var, f"{fn}({torch_code(st.args[0], stat_names)}, mask)"))
            stat_names[st] = var
        ctx["stats"] = stat_lines
        ctx["probs"] = torch_code(v.probs, stat_names)
        return ctx

    # ---- the module ----
    def context(self) -> dict:
        v = self.v
        kernel, general = self.kernel_context(), False
        if kernel is None:  # not a softmax: the general multi-pass kernels (attnc/codegen/general.py)
            from .general import kernel_context as general_kernel_context

            kernel, general = general_kernel_context(self), True
        tensors = []
        for t in v.tensors:
            tensors.append(dict(name=t.name, ident=_ident(t.name), dtype=t.dtype, axes=list(t.axes),
                                learnable=t.learnable, ndim=len(t.axes)))
        params = []
        for p in v.params:
            default = p.default
            code = torch_code(default, {sym: f"{name}" for name, sym in ir.SIZES.items()})
            if default.free_symbols:
                code = f"float({code.replace('R.safe_log', 'math.log')})" if p.dtype == "float" else f"int({code})"
            params.append(dict(name=p.name, ident=_ident(p.name), dtype=p.dtype, default=code,
                               constant=not default.free_symbols))
        spec_hash = hashlib.sha256(v.source.encode()).hexdigest()[:16]
        return dict(
            name=v.name,
            camel="".join(part.capitalize() for part in v.name.split("_")) or "Attention",
            version=__version__,
            source=v.source,
            path=v.path,
            spec_hash=spec_hash,
            heads=v.heads,
            equal_lengths=v.needs_equal_lengths,
            tensors=tensors,
            learnable=[t for t in tensors if t["learnable"]],
            params=params,
            kernel=kernel,
            general=general,
            plan=self.plan,
            ref=self.reference_context(),
            passes=self.rows.passes,
            has_lse=self.rows.has_lse,
            layouts=[dict(index=lay.index, extents=[torch_code(e, {**{sym: n for n, sym in ir.SIZES.items()},
                                                                   **{p.symbol: f'values["{p.name}"]' for p in v.params}})
                                                    for e in lay.extents])
                     for lay in v.layouts if lay.index in ("q", "kv")],
        )


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources.files("attnc.templates"))),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def generate_module(variant: ir.Variant) -> str:
    """The full source of the generated module for `variant`."""
    ctx = ModuleGenerator(variant).context()
    source = wrap_long_lines(_environment().get_template("module.py.j2").render(**ctx))
    compile(source, f"<attnc:{variant.name}>", "exec")  # a generator bug must fail here, not at import
    return source
