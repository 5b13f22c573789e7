"""The kernel skeleton shared by every kernel family: tile walks, signatures, loads and names.

A kernel of any family is the same frame: a program owns a query tile (forward, dQ, row adjoints) or a
key tile (dK/dV), walks the tiles of the other side that the mask lets through, and calls the family's
tile function on each. What differs between masks is only *how the tiles are found*; that is a
`TileWalk`, computed once per spec, one class per mode:

    AllTiles       no mask: every tile FULL (the tile cut by Lk is PARTIAL in the forward and dQ)
    BandTiles      one clause lo(q) <= kv <= hi(q), bounds non-decreasing in q (causal, windows,
                   1-D neighbourhoods): key ranges in closed form inside the kernels, no plan at all
    ListTiles      everything the interval rules cover: per-tile lists built on the host by
                   runtime/plan.py from the interval form of the mask (attnc/codegen/plan.py)
    UnplannedTiles a mask outside the interval rules: every tile PARTIAL (none in the catalog)

Each walk emits FULL tiles and PARTIAL tiles as separate loops whose bodies load unconditionally, so
Triton's software pipeliner can overlap the next tile's loads with this tile's math; the mask is
applied only in the PARTIAL loops (templates/skeleton.py.j2).

Kernel arguments are generated from one list (`Signature`): the same list prints the kernel's
parameters, the tile functions' parameters and the launch's arguments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import sympy
from sympy.core.function import AppliedUndef

from .. import ir
from ..analysis.bounds import Clause
from ..errors import BuildError
from .names import ident
from .plan import interval_function
from .printers import UnsupportedExpression, torch_code, triton_code, wrapped

# ---- names: how IR symbols read inside a kernel -----------------------------------------------------
TILE = {"b": "off_b", "h": "off_h", "q": "offs_m[:, None]", "kv": "offs_n[None, :]"}  # [BLOCK_M, BLOCK_N]
# dK/dV tiles are key-major, [BLOCK_N, BLOCK_M] (see [Note] key-major tiles in templates/skeleton.py.j2)
TILE_T = {"b": "off_b", "h": "off_h", "q": "offs_m[None, :]", "kv": "offs_n[:, None]"}
ROW = {"b": "off_b", "h": "off_h", "q": "offs_m", "kv": None}  # [BLOCK_M]: no key index
SCALAR = {"b": "off_b", "h": "off_h", "q": "q_pos", "kv": None}  # one query position
# split-KV decoding packs the query heads of a KV group and the new queries into the tile's rows: each
# row has its own head and absolute query position (templates/decode.py.j2)
DECODE_TILE = {"b": "off_b", "h": "row_h[:, None]", "q": "row_q[:, None]", "kv": "offs_n[None, :]"}
DECODE_ROW = {"b": "off_b", "h": "row_h", "q": "row_q", "kv": None}


def base_names(variant: ir.Variant, where: dict) -> dict:
    """IR symbols -> kernel code: the indices as `where` spells them, sizes, params and the score."""
    names = {ir.b: where["b"], ir.h: where["h"], ir.q: where["q"], ir.s: "s"}
    if where["kv"] is not None:
        names[ir.kv] = where["kv"]
    names.update({sym: name for name, sym in ir.SIZES.items()})
    names.update({p.symbol: ident(p.name) for p in variant.params})
    return names


@dataclass(frozen=True)
class Load:
    """`var = tl.load(ptr + offset, mask=bounds, other=0)` for one tensor input read by an expression."""

    var: str
    ptr: str
    offset: str
    bounds: str  # "" when the index is always in range

    @property
    def code(self) -> str:
        masked = f", mask={self.bounds}, other=0" if self.bounds else ""
        return f"{self.var} = tl.load({self.ptr} + {self.offset}{masked})"


def _nesting(load) -> int:
    """How deeply tensor loads nest inside `load`'s indices (a gather `offsets[doc[q]]` is 1)."""
    inner = [a for arg in load.args for a in arg.atoms(AppliedUndef)]
    return 1 + max((_nesting(a) for a in inner), default=-1)


def tensor_loads(exprs, where: dict, prefix: str) -> tuple[dict, list[Load]]:
    """Names and loads for every tensor input read in exprs, indexed as `where` spells the indices.

    An index is a bare b, h, q or kv, or (an axis of the tensor's own) an integer expression, already
    clamped to the axis by the checker; loads nested in it (gathers) are loaded first. A dot of feature
    vectors (`ir.VecDot`) is a `tl.dot` of its two vector tiles, after every other load."""
    names, loads = {}, []
    found = sorted({a for e in exprs if e is not None for a in ir.scalar_loads(e)},
                   key=lambda a: (_nesting(a), sympy.default_sort_key(a)))
    index_names = {ir.INDICES[k]: code for k, code in where.items() if code is not None}
    index_names.update({sym: name for name, sym in ir.SIZES.items()})
    for i, load in enumerate(found):
        tensor = load.func.__name__
        parts, bounds = _offsets(load, where, {**index_names, **names})
        var = f"{prefix}{tensor}_{i}"
        names[load] = var
        loads.append(Load(var, f"{ident(tensor)}ptr", " + ".join(parts), " & ".join(bounds)))
    for j, dot in enumerate(ir.vec_dots(*[e for e in exprs if e is not None])):
        var, lines = _vector_dot(dot, j, where, prefix, {**index_names, **names})
        names[dot] = var
        loads += lines
    return names, loads


def _offsets(load, where: dict, names: dict) -> tuple[list[str], list[str]]:
    """The address terms of `load`'s subscripts (`off_b * stride_doc_0`, ...) and its bounds masks."""
    tensor = load.func.__name__
    parts, bounds = [], []
    for axis, index in enumerate(load.args):
        if index.is_Symbol and str(index) in where:
            code = where[str(index)]
            if code is None:
                raise BuildError(f"{tensor} is read per key where only row values are available")
            parts.append(f"{code} * stride_{tensor}_{axis}")
            if str(index) in ("q", "kv") and where is not SCALAR:
                bounds.append(f"({code} < {'Lq' if str(index) == 'q' else 'Lk'})")
            continue
        if ir.kv in index.free_symbols and where["kv"] is None:
            raise BuildError(f"{tensor} is read per key where only row values are available")
        local = {**names, **{sym: ident(sym.name) for sym in index.free_symbols if sym not in names}}
        code = triton_code(index, local)
        if index.atoms(sympy.floor, sympy.ceiling):  # Triton's floor and ceil return floats
            code = f"{code}.to(tl.int32)" if wrapped(code) else f"({code}).to(tl.int32)"
        parts.append(f"({code}) * stride_{tensor}_{axis}")
    return parts, bounds


def vector_block(dot) -> str:
    """BLOCK_R of a dot of feature vectors: the next power of two >= the length and >= 16 (tl.dot's
    minimum), a number for a const length, else a constexpr the launch computes (`Signature.of`)."""
    if dot.length.is_Integer:
        return str(max(16, 1 << (int(dot.length) - 1).bit_length()))
    return f"BLOCK_R_{ident(dot.query.func.__name__)}"


def _vector_dot(dot, j: int, where: dict, prefix: str, names: dict) -> tuple[str, list]:
    """`dot(qr[b, h, q], kr[b, kv])` on a tile: [BLOCK_M, BLOCK_R] query vectors times [BLOCK_R, BLOCK_N]
    key vectors (query-major tiles), or key vectors times query vectors (key-major tiles, TILE_T)."""
    if where is DECODE_TILE:
        raise BuildError("split-KV decoding does not support dot() of feature vectors yet")
    if where["kv"] is None or where["q"] is None:
        raise BuildError("dot() of feature vectors is a per-pair term, read where only row values are available")
    query_rows = where["q"].endswith("[:, None]")  # query-major: queries are the tile's rows
    offs = f"{prefix}offs_r{j}"
    lines = [Line(offs, f"{offs} = tl.arange(0, {vector_block(dot)})")]
    length = triton_code(dot.length, {**names, **{sym: ident(sym.name) for sym in dot.length.free_symbols
                                                   if sym not in names}})
    tiles = []
    for read, rows, side in ((dot.query, query_rows, "q"), (dot.key, not query_rows, "k")):
        tensor = read.func.__name__
        feature = f"{offs}[None, :]" if rows else f"{offs}[:, None]"
        parts, bounds = _offsets(read, where, names)
        parts.append(f"{feature} * stride_{tensor}_{len(read.args)}")
        bounds.append(f"({feature} < {length})")
        var = f"{prefix}{tensor}_{side}vec{j}"  # one tensor may be read on both sides: dot(x[q], x[kv])
        tiles.append(var)
        lines.append(Load(var, f"{ident(tensor)}ptr", " + ".join(parts), " & ".join(bounds)))
    var = f"{prefix}dot{j}"
    first, second = tiles if query_rows else tiles[::-1]
    lines.append(Line(var, f"{var} = tl.dot({first}, {second})"))
    return var, lines


@dataclass(frozen=True)
class Line:
    """One statement of a tile's loads that is not a load (a feature offset, a dot of vectors)."""

    var: str
    code: str


def named_steps(expr, names: dict, prefix: str, width: int = 72) -> tuple[list[str], str]:
    """A long expression (a multi-dimensional mask) as a few named steps instead of one huge line:
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
        if e.is_Pow and not e.base.is_Atom and len(code) <= width:
            base = sympy.Symbol(f"{prefix}{next(counter)}")
            lines.append(f"{base} = {triton_code(e.base, names)}")
            names[base] = str(base)
            return sympy.Pow(base, e.exp, evaluate=False)
        if len(code) > width:
            sym = sympy.Symbol(f"{prefix}{next(counter)}")
            lines.append(f"{sym} = {code}")
            names[sym] = str(sym)
            return sym
        return e

    if len(triton_code(expr, names)) <= width:
        return [], triton_code(expr, names)
    reduced = expr.func(*[bind(a) for a in expr.args])
    return lines, triton_code(reduced, names)


@dataclass(frozen=True)
class TileMask:
    """The element mask of a PARTIAL tile: `keep = <code> & (offs_n < Lk)` after `lines`."""

    lines: tuple[str, ...]
    code: str  # "" for a spec without a mask (only the bounds of the cut tile remain)
    loads: tuple[Load, ...]
    keys: str = "offs_n[None, :]"  # the key positions as the tile broadcasts them

    @property
    def keep(self) -> str:
        bounds = f"({self.keys} < Lk)"
        return f"{self.code} & {bounds}" if self.code else bounds[1:-1]


def tile_mask(variant: ir.Variant, names: dict, mask_loads: list[Load], where: dict = TILE) -> TileMask:
    if variant.mask is sympy.true:
        return TileMask((), "", (), where["kv"])
    lines, code = named_steps(variant.mask, names, "mask_")
    return TileMask(tuple(lines), code, tuple(mask_loads), where["kv"])


@dataclass(frozen=True)
class TileCode:
    """A tile's logits, their derivative, loads and mask, printed for one tile orientation."""

    score: str  # the logits (natural units)
    dscore: str  # d logits / d s
    loads: tuple[Load, ...]  # tensor inputs the logits and their derivatives read (every tile)
    mask: TileMask  # the mask, with the loads only PARTIAL tiles need
    # the backward's logits and derivative together: the subexpressions they share (softcap's tanh)
    # computed once, so the derivative is ready before the tile's dots and s is not kept alive
    shared: tuple[str, ...] = ()
    bwd_score: str = ""
    bwd_dscore: str = ""


def tile_code(variant: ir.Variant, logits, dscore, every_tile: list, where: dict) -> tuple[TileCode, dict]:
    """The logits (and their derivative) of a tile whose indices `where` spells, with the mask of its
    PARTIAL tiles; every family prints its score this way."""
    load_names, loads = tensor_loads([variant.mask] + every_tile, where, "t_")
    names = {**base_names(variant, where), **load_names}
    always, mask_only = split_loads(load_names, loads, variant.mask, every_tile)
    shared, bwd_score, bwd_dscore = _shared_steps([logits, dscore], names)
    code = TileCode(triton_code(logits, names), triton_code(dscore, names), tuple(always),
                    tile_mask(variant, names, mask_only, where), shared, bwd_score, bwd_dscore)
    return code, names


def _shared_steps(exprs, names: dict) -> tuple[tuple[str, ...], ...]:
    """exprs printed with their common subexpressions named first (`sc_0 = rt.tanh(s / cap_)`):
    (the assignments, then each expression's code)."""
    names = dict(names)
    # what is already named (loads, dots of feature vectors) enters the elimination as a symbol, so it
    # never looks inside a load's subscripts, whose names the loads fixed
    exprs = [sympy.sympify(e) for e in exprs]
    named = sorted((a for a in names if isinstance(a, sympy.Basic) and not a.is_Symbol
                    and any(e.has(a) for e in exprs)), key=sympy.default_sort_key)
    loaded = {a: sympy.Symbol(f"load__{i}") for i, a in enumerate(named)}
    names.update({symbol: names[a] for a, symbol in loaded.items()})
    found, reduced = sympy.cse([e.xreplace(loaded) for e in exprs],
                               symbols=sympy.numbered_symbols("sc_"), order="none")
    lines = []
    for sym, e in found:
        lines.append(f"{sym} = {triton_code(e, names)}")
        names[sym] = str(sym)
    return (tuple(lines), *(triton_code(e, names) for e in reduced))


def split_loads(names: dict, loads: list[Load], mask, every_tile_exprs) -> tuple[list[Load], list[Load]]:
    """(loads every tile needs, loads only the mask needs): FULL tiles skip the mask's own loads."""
    used = {a for e in every_tile_exprs if e is not None for a in ir.scalar_loads(e)}
    by_var = {names[a]: a for a in names if isinstance(a, AppliedUndef)}
    # a dot of feature vectors (never in the mask) is computed on every tile
    always = [ld for ld in loads if ld.var not in by_var or by_var[ld.var] in used]
    return always, [ld for ld in loads if ld.var in by_var and by_var[ld.var] not in used]



# ---- signatures ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arg:
    name: str  # the kernel parameter
    launch: str  # what the host passes for it


@dataclass(frozen=True)
class Signature:
    """The arguments every kernel of a module shares beyond its own tensors: the spec's tensor inputs
    (pointer and strides), its scalar parameters, the tile plan (list walks only) and the sizes."""

    inputs: tuple[Arg, ...]
    plan: tuple[Arg, ...]
    sizes: tuple[Arg, ...] = tuple(Arg(n, n) for n in ("scale", "Lq", "Lk", "B", "Hq", "Hk", "Hv", "Dqk", "Dv"))

    @staticmethod
    def of(variant: ir.Variant, walk: TileWalk) -> Signature:
        inputs = []
        for t in variant.tensors:
            inputs.append(Arg(f"{ident(t.name)}ptr", ident(t.name)))
            inputs += [Arg(f"stride_{t.name}_{i}", f"{ident(t.name)}.stride({i})") for i in range(len(t.axes))]
        inputs += [Arg(ident(p.name), ident(p.name)) for p in variant.params]
        for dot in ir.vec_dots(variant.score, variant.probs):  # BLOCK_R of a feature length not a const
            block = vector_block(dot)
            if not dot.length.is_Integer and all(a.name != f"{block}: tl.constexpr" for a in inputs):
                length = torch_code(dot.length, {**{sym: name for name, sym in ir.SIZES.items()},
                                                 **{p.symbol: ident(p.name) for p in variant.params}})
                inputs.append(Arg(f"{block}: tl.constexpr", f"max(16, triton.next_power_of_2(int({length})))"))
        return Signature(tuple(inputs), walk.plan_args())

    # the same names in a kernel and in the tile functions it calls: pass them through by name
    @property
    def input_names(self) -> str:
        return "".join(f"{a.name.split(':')[0]}, " for a in self.inputs)

    @property
    def size_names(self) -> str:
        return ", ".join(a.name for a in self.sizes)

    @property
    def kernel_params(self) -> str:
        """Parameters of a kernel after its own tensors: inputs, plan, sizes."""
        return "".join(f"{a.name}, " for a in self.inputs + self.plan) + self.size_names

    @property
    def launch_args(self) -> str:
        return "".join(f"{a.launch}, " for a in self.inputs + self.plan) + self.size_names


# ---- tile walks ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileWalk:
    """How a program finds the tiles of the other side (see the module docstring)."""

    mode = ""  # the walk's name: PLAN_MODE, and the branch of the walk macros in templates/skeleton.py.j2
    uses_b: bool = False  # the mask reads the batch index: plans are per batch entry
    uses_h: bool = False  # ... per head
    tensors: tuple[str, ...] = ()  # tensor inputs the mask reads (plans are rebuilt when they change)
    params: tuple[str, ...] = ()  # scalar parameters it reads (part of the plan cache's key)
    sizes: tuple[str, ...] = ("Lq", "Lk")  # the sizes a plan depends on (part of its key)

    def plan_args(self) -> tuple[Arg, ...]:
        return ()

    @property
    def per(self) -> str:
        axes = [axis for axis, used in (("batch", self.uses_b), ("head", self.uses_h)) if used]
        return f", per {' and '.join(axes)}" if axes else ""

    def ir_line(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class AllTiles(TileWalk):
    mode = "all"

    def ir_line(self) -> str:
        return "every tile FULL (no mask)"


@dataclass(frozen=True)
class UnplannedTiles(TileWalk):
    mode = "dense"
    reason: str = ""

    def ir_line(self) -> str:
        return f"every tile PARTIAL ({self.reason})"


@dataclass(frozen=True)
class BandBounds:
    """lo(q) and hi(q) of the band, printed for one query position: in Triton (`_key_bounds`) and in
    torch (the host's plan() for inspection)."""

    lo: str
    hi: str
    loads: tuple[Load, ...]  # b- and h-indexed inputs the bounds read (scalars per program)
    torch_lo: str  # for query positions q_pos (any shape), b_idx / h_idx broadcastable to it (host plan)
    torch_hi: str
    text: str
    lo_open: bool = False  # lo(q) <= 0 for every q (causal): the walks drop the loops below the band
    hi_open: bool = False  # hi(q) = Lk - 1 (no upper bound): only a tile cut by Lk is PARTIAL above it


@dataclass(frozen=True)
class BandTiles(TileWalk):
    mode = "band"
    bounds: BandBounds | None = None

    def ir_line(self) -> str:
        return f"closed-form key range per query tile: {self.bounds.text} (in the kernels{self.per})"


@dataclass(frozen=True)
class ListTiles(TileWalk):
    mode = "lists"
    cell_lines: tuple[tuple[str, str], ...] = ()  # `_mask_cells`: the mask in interval form
    cell_result: str = ""

    def cell_reads(self, name: str) -> bool:
        """Whether `_mask_cells` reads the index `name` (q, kv, b or h)."""
        code = " ".join([c for _, c in self.cell_lines] + [self.cell_result])
        return re.search(rf"(?<![\w.\"]){name}(?![\w\"])", code) is not None

    def plan_args(self) -> tuple[Arg, ...]:
        names = ["PLAN_QF_OFF", "PLAN_QF_RUNS", "PLAN_QP_OFF", "PLAN_QP_RUNS",
                 "PLAN_KF_OFF", "PLAN_KF_RUNS", "PLAN_KP_OFF", "PLAN_KP_RUNS"]
        args = [Arg(name, f"plan_args[{i}]") for i, name in enumerate(names)]
        args += [Arg("PLAN_HEADS", "plan.heads"), Arg("PLAN_TQ", "plan.tiles_q"), Arg("PLAN_TK", "plan.tiles_k"),
                 Arg("PLAN_M: tl.constexpr", "plan.block_m"), Arg("PLAN_N: tl.constexpr", "plan.block_n")]
        return tuple(args)

    def ir_line(self) -> str:
        return f"lists of FULL and PARTIAL key tiles from interval analysis of the mask{self.per}"


def _band_bounds(variant: ir.Variant, clause: Clause) -> BandBounds:
    names = base_names(variant, SCALAR)
    load_names, loads = tensor_loads([clause.lo, clause.hi], SCALAR, "bound_")
    names.update(load_names)
    # host plan: one expression for tile corners ([tiles]) and rows ([tiles, BLOCK_M], b_idx [tiles, 1])
    host = {ir.b: "b_idx", ir.h: "h_idx", ir.q: "q_pos"}
    host.update({sym: name for name, sym in ir.SIZES.items()})
    host.update({p.symbol: ident(p.name) for p in variant.params})
    from .names import torch_loads

    host.update(torch_loads(clause.lo, clause.hi, names=host))

    def at(expr, default):
        return default if expr is None else torch_code(expr, host)

    return BandBounds(
        lo="0" if clause.lo is None else triton_code(clause.lo, names),
        hi="Lk - 1" if clause.hi is None else triton_code(clause.hi, names),
        loads=tuple(loads),
        torch_lo=at(clause.lo, "0"), torch_hi=at(clause.hi, "Lk - 1"),
        text=f"{clause.lo if clause.lo is not None else 0} <= kv <= {clause.hi if clause.hi is not None else 'Lk - 1'}",
        lo_open=clause.lo is None or bool(clause.lo.is_number and clause.lo <= 0),
        hi_open=clause.hi is None,
    )


def choose_walk(variant: ir.Variant, clauses: tuple[Clause, ...]) -> TileWalk:
    """The tile walk of a spec's mask (computed once per spec, by attnc/pipeline.py)."""
    mask = sympy.sympify(variant.mask)
    if mask is sympy.true:
        return AllTiles()
    loads = mask.atoms(AppliedUndef)
    symbols = mask.free_symbols | {a for load in loads for a in load.args}
    # the sizes a plan depends on: the lengths, and any other size the mask reads (as an index's
    # extent, b and h make the plan per batch entry and per head)
    sizes = ("Lq", "Lk") + tuple(name for name, sym in ir.SIZES.items() if name not in ("Lq", "Lk") and (
        sym in symbols or (name == "B" and ir.b in symbols) or (name == "Hq" and ir.h in symbols)))
    per = {"uses_b": ir.b in symbols, "uses_h": ir.h in symbols, "sizes": sizes,
           "tensors": tuple(sorted({load.func.__name__ for load in loads})),
           "params": tuple(p.name for p in variant.params if p.symbol in mask.free_symbols)}
    if len(clauses) == 1 and clauses[0].exact:
        return BandTiles(**per, bounds=_band_bounds(variant, clauses[0]))
    try:
        lines, result = interval_function(variant, mask)
    except UnsupportedExpression as err:
        return UnplannedTiles(**per, reason=str(err))
    return ListTiles(**per, cell_lines=tuple(lines), cell_result=result)


def decode_bands(variant: ir.Variant, walk: TileWalk, clauses: tuple[Clause, ...]) -> tuple[BandBounds, ...]:
    """Split-KV decoding of a plan-list mask that is the union of two exact bands (sinks with a
    window: kv <= min(q, sinks - 1), or q - window < kv <= q): the two key ranges in closed form, so a
    decode reads only their tiles. () otherwise (decoding then visits every tile, masked)."""
    if walk.mode not in ("lists", "dense") or len(clauses) != 2 or not all(c.exact for c in clauses):
        return ()
    try:
        return tuple(_band_bounds(variant, c) for c in clauses)
    except (UnsupportedExpression, BuildError):
        return ()
