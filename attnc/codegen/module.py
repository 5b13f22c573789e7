"""Analyses -> the source of one generated module: the chosen family's kernels, launchers, autograd,
tile plan, reference and public API (templates/module.py.j2 and the pieces it includes).

Expressions reach the templates already printed (attnc/codegen/printers.py) inside typed objects: the
skeleton (attnc/codegen/skeleton.py) and the family's body (attnc/codegen/families/). Spec identifiers
reach the generated code only through `ident` (attnc/codegen/names.py), so no spec name can collide
with generated names or Python keywords.
"""

from __future__ import annotations

import ast
import hashlib
from dataclasses import dataclass
from importlib import resources

import jinja2
import sympy

from .. import __version__, ir
from ..analysis.record import Analyses
from ..errors import BuildError
from . import statistics
from .layout import wrap_long_lines
from .names import TORCH_INDEX, ident, torch_loads
from .printers import host_scalar_code, torch_code, wrapped
from .skeleton import Signature, decode_bands, select_host, walk_cells

__all__ = ["BuildError", "formatted", "generate"]


@dataclass(frozen=True)
class TensorInput:
    name: str
    ident: str
    dtype: str
    axes: tuple[str, ...]
    learnable: bool


@dataclass(frozen=True)
class Param:
    name: str
    ident: str
    dtype: str
    default: str  # Python code of the default (it may read the sizes)


@dataclass(frozen=True)
class Reference:
    """The eager reference, printed in torch: mask, score and the probabilities' pieces."""

    mask: str | None
    score: str
    softmax_logits: str | None = None
    sink: str | None = None
    stats: tuple[tuple[str, str], ...] = ()  # general probabilities: (var, masked reduction), innermost first
    probs: str = ""
    lse_offset: str | None = None  # softmax: the row constant the kernels' logits leave out (SoftmaxForm.offset)
    # a select's keep condition (None: none), for the reference's own dense selection of tiles, with
    # what that selection reads (the mask's and the keep condition's names) and the tensor inputs only
    # the keep condition reads (which the reference's own loop does not load)
    select_keep: str | None = None
    select_reads: frozenset[str] = frozenset()
    keep_only: frozenset[str] = frozenset()

    sink_reads: frozenset[str] = frozenset()  # ... and those the sink alone reads (`_sink_logits`)
    reads: frozenset[str] = frozenset()  # the generated names the pieces read (index tensors, sizes,
    # params, visible), from the expressions' free symbols before printing


def _reference(v: ir.Variant, a: Analyses) -> Reference:
    names = {ir.b: TORCH_INDEX["b"], ir.h: TORCH_INDEX["h"], ir.q: TORCH_INDEX["q"], ir.kv: TORCH_INDEX["kv"],
             ir.s: "s"}
    names.update({sym: name for name, sym in ir.SIZES.items()})
    names.update({p.symbol: ident(p.name) for p in v.params})
    keep = None if v.select is None or v.select.keep is sympy.false else v.select.keep
    names.update(torch_loads(v.mask, v.score, v.probs, keep))
    mask = torch_code(v.mask, names) if v.mask is not sympy.true else None
    score = torch_code(v.score, names)
    select_keep = None if keep is None else torch_code(keep, names)
    select = {"select_keep": select_keep, "select_reads": _read_names(v, [v.mask, keep])}
    if keep is not None:
        loaded = {load.func.__name__ for e in (v.mask, v.score, v.probs) for load in ir.scalar_loads(e)}
        select["keep_only"] = frozenset(ident(load.func.__name__) for load in ir.scalar_loads(keep)
                                        if load.func.__name__ not in loaded)
    sm = a.rows.softmax
    if sm is not None:
        # the score and sink as written (the offset back in): the true log-sum-exp, and autograd
        # differentiates what the spec says
        logits, sink = sm.logits + sm.offset, None if sm.sink is None else sm.sink + sm.offset
        return Reference(mask, score, torch_code(logits, names), None if sink is None else torch_code(sink, names),
                         lse_offset=None if sm.offset == 0 else torch_code(sm.offset, names), **select,
                         reads=_read_names(v, [v.mask, v.score, logits, sink]), sink_reads=_read_names(v, [sink]))
    # general probabilities: row statistics computed innermost first, as masked torch reductions
    stats = sorted((st for st, _ in a.rows.stats_in_order if st != ir.visible), key=sympy.count_ops)
    stat_names = {**names, ir.visible: "visible"}
    lines = []
    for i, st in enumerate(stats):
        fn = "R.rowsum" if isinstance(st, ir.RowSum) else "R.rowmax"
        lines.append((f"stat_{i}", f"{fn}({torch_code(st.args[0], stat_names)}, mask)"))
        stat_names[st] = f"stat_{i}"
    return Reference(mask, score, stats=tuple(lines), probs=torch_code(v.probs, stat_names), **select,
                     reads=_read_names(v, [v.mask, v.score, v.probs, *stats]))


def _read_names(v: ir.Variant, exprs) -> frozenset[str]:
    """The names of the reference's scope that code printed from `exprs` reads: index tensors, head
    counts, params and visible (a param read only by a feature axis' length is not an expression's)."""
    used = set()
    for e in (sympy.sympify(e) for e in exprs if e is not None):
        # a dot of feature vectors prints as a matmul of its two loads: the feature axis' length
        # (`param R` of dot(qr[b, h, q], kr[b, kv])) is not read
        dots = ir.vec_dots(e)
        used |= e.xreplace({d: sympy.Dummy() for d in dots}).free_symbols
        used |= set().union(*(d.query.free_symbols | d.key.free_symbols for d in dots))
    names = {ir.INDICES[k]: code for k, code in TORCH_INDEX.items()}
    names.update({ir.SIZES[n]: n for n in ("Hk", "Hv", "Lq", "Lk")})
    names.update({p.symbol: ident(p.name) for p in v.params})
    names[ir.visible] = "visible"
    return frozenset(names[sym] for sym in used if sym in names)


def _params(v: ir.Variant) -> list[Param]:
    out = []
    for p in v.params:
        sizes = {sym: name for name, sym in ir.SIZES.items()}
        if not p.default.free_symbols:
            code = torch_code(p.default, sizes)
        else:  # it reads the sizes: a Python scalar at each call
            code = host_scalar_code(p.default, sizes)
            code = f"float({code})" if p.dtype == "float" else f"int({code})"
        out.append(Param(p.name, ident(p.name), p.dtype, code))
    return out


def _docline(line: str) -> str:
    """A spec line inside the module's docstring: backslashes, triple quotes and control characters
    (a NUL in a comment cannot appear in Python source) escaped."""
    line = line.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    return "".join(c if c >= " " and c != "\x7f" or c == "\t" else f"\\x{ord(c):02x}" for c in line)


def _spec_context(v: ir.Variant) -> dict:
    """What every generated module says about its spec: name, source, heads, inputs and params."""
    tensors = [TensorInput(t.name, ident(t.name), t.dtype, tuple(t.axes), t.learnable) for t in v.tensors]
    return {
        "name": v.name,
        "camel": "".join(part.capitalize() for part in v.name.split("_")) or "Attention",
        "version": __version__,
        "source": v.source,
        "path": v.path,
        "spec_hash": hashlib.sha256(v.source.encode()).hexdigest()[:16],
        "heads": v.heads,
        "equal_lengths": v.needs_equal_lengths,
        "tensors": tensors,
        "learnable": [t for t in tensors if t.learnable],
        "params": _params(v),
        "domains": _domains(v),
    }


def _domains(v: ir.Variant) -> list[tuple[str, str, str]]:
    """(argument, torch code of its `where` condition in `x`, the condition as written), checked by
    checks.check_inputs at every call: `x` is the param's value, or the whole input tensor (elementwise)."""
    out = []
    for p in v.params:
        if p.domain is not None:
            out.append((p.name, torch_code(p.domain, {p.symbol: "x"}), p.domain_text))
    for t in v.tensors:
        if t.domain is not None:
            out.append((t.name, torch_code(t.domain, {ir.domain_symbol(t.name, t.dtype): "x"}), t.domain_text))
    return out


def _walk_context(a: Analyses) -> dict:
    """What a module on the tile walks says of its walk, its reference and its layouts (the family adds
    its bodies)."""
    v = a.variant
    sizes = {sym: n for n, sym in ir.SIZES.items()}
    return {
        "walk": a.walk,
        "sig": Signature.of(v, a.walk),
        "cells": walk_cells(v, a.walk),
        "select": select_host(v, a.walk),
        "decode_bands": decode_bands(v, a.walk, a.clauses),
        "ref": _reference(v, a),
        "stats": statistics.plan(v),
        "has_lse": a.rows.has_lse,
        "layouts": [(lay.index, [torch_code(e, {**sizes, **{p.symbol: f'values["{p.name}"]' for p in v.params}})
                                 for e in lay.extents])
                    for lay in v.layouts if lay.index in ("q", "kv")],
    }


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources.files("attnc.templates"))),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["py"] = repr  # Python literals (strings, tuples, booleans) in generated code
    env.filters["ident"] = ident  # a spec name as generated code spells it
    env.filters["stride_splat"] = lambda tensor: f"*{tensor}.stride()"
    # a spec line inside the module's docstring: backslashes and triple quotes cannot end or bend it
    env.filters["docline"] = _docline
    env.filters["cast32"] = lambda name: f"{name} = {name}.to(tl.float32)"
    env.filters["wrap"] = lambda code: code if wrapped(code) else f"({code})"  # one pair of parentheses
    return env


# The generated module's imports: torch, triton and attnc.runtime only. The family names the runtime
# modules its module always calls; helper modules are imported where the module's code uses them (an
# attribute of the name, found in the parsed module), so the module stays lint-clean.
_OPTIONAL_IMPORTS = {
    "collections": ("import collections\n", ""),
    "math": ("import math\n", ""),
    "I": ("", "from attnc.runtime import intervals as I\n"),
    "R": ("", "from attnc.runtime import ref_helpers as R\n"),
    "rt": ("", "from attnc.runtime import tl_helpers as rt\n"),
}
_OPTIONAL_RUNTIME = ("merge", "scatter")  # attnc.runtime modules imported by their own names where used


def _used_modules(source: str) -> set[str]:
    """The names whose attributes the module's code reads (`R` of `R.index(...)`), from its syntax tree:
    comments and strings do not count."""
    return {node.value.id for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)}


def _imports(body: str, runtime: tuple[str, ...], triton: bool) -> str:
    """The import lines of a module whose code is `body`, which calls the attnc.runtime modules `runtime`
    and, when `triton`, defines Triton kernels."""
    names = _used_modules(body)
    used = [lines for alias, lines in _OPTIONAL_IMPORTS.items() if alias in names]
    modules = list(runtime) + [m for m in _OPTIONAL_RUNTIME if m in names]
    ours = sorted([f"from attnc.runtime import {', '.join(sorted(modules))}\n",
                   "from attnc.runtime import plan as tile_plan\n"] + [o for _, o in used if o])
    third_party = "import torch\n" + ("import triton\nimport triton.language as tl\n" if triton else "")
    kernel_configs = "from attnc.runtime.launch import kernel_configs\n" if triton else ""
    standard = "".join(s for s, _ in used)
    return standard + ("\n" if standard else "") + third_party + "".join(ours) + kernel_configs


def _render(template: str, ctx: dict, runtime: tuple[str, ...], triton: bool) -> str:
    source = _environment().get_template(template).render(**ctx)
    return source.replace("#@IMPORTS@#\n", _imports(source, runtime, triton))


def generate(a: Analyses, family) -> str:
    """The source of the module of `family` (a `FAMILY` of attnc/codegen/families/) for the analysed spec."""
    ctx = {**_spec_context(a.variant), **(_walk_context(a) if family.tile_walks else {}), **family.context(a)}
    if a.variant.select is not None and ctx.get("decode_body") is not None and not family.decode_selects:
        # its decode kernels would visit tiles no new query chose: `decode` raises instead
        ctx.update(decode_body=None, decode_error="this family's split-KV decoding does not run a select yet")
    return _render(family.template, ctx, family.runtime, family.triton)


def formatted(source: str, name: str) -> str:
    """A generated module's source with its long lines wrapped, compiled once: a generator bug must fail
    here, not at import."""
    source = wrap_long_lines(source)
    compile(source, f"<attnc:{name}>", "exec")
    return source
