"""The kernel skeleton shared by every kernel family: index spellings, signatures, loads and the walk's
printed pieces.

A kernel of any family is the same frame: a program owns a query tile (forward, dQ, row adjoints) or a
key tile (dK/dV), walks the tiles of the other side that the mask lets through, and calls the family's
tile function on each. How the tiles are found is the spec's `TileWalk` (attnc/analysis/walks.py),
whose loops are the macros of its template (templates/walks/*.j2); this module prints what those
macros print: the band's bounds (`BandBounds`, in the signature) and, through
attnc/codegen/interval_code.py, the mask's interval form for list walks (`walk_cells`).

Each walk emits FULL tiles and PARTIAL tiles as separate loops whose bodies load unconditionally, so
Triton's software pipeliner can overlap the next tile's loads with this tile's math; the mask is
applied only in the PARTIAL loops (templates/skeleton.py.j2).

Kernel arguments are generated from one list (`Signature`): the same list prints the kernel's
parameters, the tile functions' parameters and the launch's arguments.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import sympy
from sympy.core.function import AppliedUndef

from .. import ir
from ..analysis.bounds import Clause
from ..analysis.walks import (
    BandTiles,
    ListTiles,
    SelectedTiles,
    TileWalk,
    band_reads,
    band_text,
    decode_clauses,
)
from ..errors import BuildError
from .interval_code import MaskCells, mask_cells
from .names import ident, torch_loads
from .printers import (
    UnsupportedExpression,
    host_scalar_code,
    torch_code,
    triton_code,
    wrapped,
)


# ---- names: how IR symbols read inside a kernel -----------------------------------------------------
class Shape(enum.Enum):
    """How a spelling's values are laid out: what its index codes broadcast to."""

    QUERY_MAJOR = enum.auto()  # a [BLOCK_M, BLOCK_N] tile: queries are its rows
    KEY_MAJOR = enum.auto()  # a [BLOCK_N, BLOCK_M] tile (dK/dV): keys are its rows
    ROWS = enum.auto()  # one value per query row: no key index
    POINT = enum.auto()  # one query position (the band's bounds): in range by construction


@dataclass(frozen=True)
class Indices:
    """How the indices b, h, q and kv read in one place of a kernel (None: not available there)."""

    b: str
    h: str
    q: str
    kv: str | None
    shape: Shape
    # split-KV decoding packs the query heads of a KV group and the new queries into the tile's rows
    # (templates/decode.py.j2): no dot() of feature vectors there yet
    packed_rows: bool = False

    def code(self, index: str) -> str | None:
        return {"b": self.b, "h": self.h, "q": self.q, "kv": self.kv}[index]

    def items(self) -> tuple[tuple[str, str | None], ...]:
        return tuple((index, self.code(index)) for index in ir.INDICES)


TILE = Indices("off_b", "off_h", "offs_m[:, None]", "offs_n[None, :]", Shape.QUERY_MAJOR)  # [BLOCK_M, BLOCK_N]
# dK/dV tiles are key-major, [BLOCK_N, BLOCK_M] (see [Note] key-major tiles in templates/skeleton.py.j2)
TILE_T = Indices("off_b", "off_h", "offs_m[None, :]", "offs_n[:, None]", Shape.KEY_MAJOR)
ROW = Indices("off_b", "off_h", "offs_m", None, Shape.ROWS)  # [BLOCK_M]: no key index
SCALAR = Indices("off_b", "off_h", "q_pos", None, Shape.POINT)  # one query position
# each decode row has its own head and absolute query position
DECODE_TILE = Indices("off_b", "row_h[:, None]", "row_q[:, None]", "offs_n[None, :]", Shape.QUERY_MAJOR, True)
DECODE_ROW = Indices("off_b", "row_h", "row_q", None, Shape.ROWS, True)


def base_names(variant: ir.Variant, where: Indices) -> dict:
    """IR symbols -> kernel code: the indices as `where` spells them, sizes, params and the score."""
    names = {ir.b: where.b, ir.h: where.h, ir.q: where.q, ir.s: "s"}
    if where.kv is not None:
        names[ir.kv] = where.kv
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


def tensor_loads(exprs, where: Indices, prefix: str) -> tuple[dict, list[Load]]:
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


_BOUNDS = {"q": "Lq", "kv": "Lk"}  # the length a load's bounds mask compares a bare q or kv index with


def atoms_read(expr) -> set:
    """The IR atoms that expr's printed code reads, its tensor loads' lines (`tensor_loads`) included:
    its free symbols, its tensor loads (nested ones too), and the lengths their bounds masks read."""
    expr = sympy.sympify(expr)
    loads = ir.scalar_loads(expr)
    lengths = {ir.SIZES[_BOUNDS[str(index)]] for load in loads for index in load.args
               if index.is_Symbol and str(index) in _BOUNDS}
    return expr.free_symbols | loads | lengths


def _offsets(load, where: Indices, names: dict) -> tuple[list[str], list[str]]:
    """The address terms of `load`'s subscripts (`off_b * stride_doc_0`, ...) and its bounds masks."""
    tensor = load.func.__name__
    parts, bounds = [], []
    for axis, index in enumerate(load.args):
        if index.is_Symbol and str(index) in ir.INDICES:
            code = where.code(str(index))
            if code is None:
                raise BuildError(f"{tensor} is read per key where only row values are available")
            parts.append(f"{code} * stride_{tensor}_{axis}")
            if str(index) in _BOUNDS and where.shape is not Shape.POINT:
                bounds.append(f"({code} < {_BOUNDS[str(index)]})")
            continue
        if ir.kv in index.free_symbols and where.kv is None:
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


def _vector_dot(dot, j: int, where: Indices, prefix: str, names: dict) -> tuple[str, list]:
    """`dot(qr[b, h, q], kr[b, kv])` on a tile: [BLOCK_M, BLOCK_R] query vectors times [BLOCK_R, BLOCK_N]
    key vectors (query-major tiles), or key vectors times query vectors (key-major tiles, TILE_T)."""
    if where.packed_rows:
        raise BuildError("split-KV decoding does not support dot() of feature vectors yet")
    if where.kv is None:
        raise BuildError("dot() of feature vectors is a per-pair term, read where only row values are available")
    query_rows = where.shape is Shape.QUERY_MAJOR
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


def tile_mask(variant: ir.Variant, names: dict, mask_loads: list[Load], where: Indices = TILE) -> TileMask:
    if variant.mask is sympy.true:
        return TileMask((), "", (), where.kv)
    lines, code = named_steps(variant.mask, names, "mask_")
    return TileMask(tuple(lines), code, tuple(mask_loads), where.kv)


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


@dataclass(frozen=True)
class RowReads:
    """How a backward tile gets the per-row values it reads (the softmax's lse2 and delta, the general
    family's row statistics and adjoints), for templates/backward.py.j2. `lines` compute them from the
    row arrays at `rows` (with row_ok): in the dQ kernel before its walk, where a query tile's rows are
    fixed, or in the dK/dV tile, where each query tile has its own."""

    lines: tuple[str, ...]
    values: tuple[str, ...]  # what the lines compute: the dQ tile's parameters
    arrays: tuple[str, ...]  # the row arrays the lines read: with head_rows, the dK/dV tile's parameters
    sizes: tuple[str, ...] = ()  # kernel sizes the lines read (ROWS, the row arrays' stride): dK/dV tile parameters


def tile_code(variant: ir.Variant, logits, dscore, every_tile: list, where: Indices) -> tuple[TileCode, dict]:
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


# the per-tile lists of a list walk (runtime/plan.py's TilePlan.kernel_args, then the plan's shape)
PLAN_ARGS = (*(Arg(name, f"plan_args[{i}]") for i, name in enumerate(
    ("PLAN_QF_OFF", "PLAN_QF_RUNS", "PLAN_QP_OFF", "PLAN_QP_RUNS", "PLAN_KF_OFF", "PLAN_KF_RUNS", "PLAN_KP_OFF",
     "PLAN_KP_RUNS"))),
    Arg("PLAN_HEADS", "plan.heads"), Arg("PLAN_TQ", "plan.tiles_q"), Arg("PLAN_TK", "plan.tiles_k"),
    Arg("PLAN_M: tl.constexpr", "plan.block_m"), Arg("PLAN_N: tl.constexpr", "plan.block_n"))
SIZE_NAMES = ("scale", "Lq", "Lk", "B", "Hq", "Hk", "Hv", "Dqk", "Dv")


def _tensor_args(t: ir.TensorInput) -> list[Arg]:
    """A tensor input as kernel arguments: its pointer and strides."""
    return [Arg(f"{ident(t.name)}ptr", ident(t.name)),
            *(Arg(f"stride_{t.name}_{i}", f"{ident(t.name)}.stride({i})") for i in range(len(t.axes)))]


@dataclass(frozen=True)
class Signature:
    """The arguments every kernel of a module shares beyond its own tensors: the spec's tensor inputs
    (pointer and strides), its scalar parameters, the tile plan (list walks only) and the sizes; and
    the band walk's bounds (`_key_bounds`, with the arguments they read)."""

    inputs: tuple[Arg, ...]
    plan: tuple[Arg, ...]
    sizes: tuple[Arg, ...] = tuple(Arg(n, n) for n in SIZE_NAMES)
    band: BandBounds | None = None

    @staticmethod
    def of(variant: ir.Variant, walk: TileWalk) -> Signature:
        inputs = [a for t in variant.tensors for a in _tensor_args(t)]
        inputs += [Arg(ident(p.name), ident(p.name)) for p in variant.params]
        for dot in ir.vec_dots(variant.score, variant.probs):  # BLOCK_R of a feature length not a const
            block = vector_block(dot)
            if not dot.length.is_Integer and all(a.name != f"{block}: tl.constexpr" for a in inputs):
                length = torch_code(dot.length, {**{sym: name for name, sym in ir.SIZES.items()},
                                                 **{p.symbol: ident(p.name) for p in variant.params}})
                inputs.append(Arg(f"{block}: tl.constexpr", f"max(16, triton.next_power_of_2(int({length})))"))
        band = band_bounds(variant, walk.clause, "_key_bounds") if isinstance(walk, BandTiles) else None
        return Signature(tuple(inputs), PLAN_ARGS if walk.kernel_plan else (), band=band)

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


# ---- the band's bounds, printed ----------------------------------------------------------------------
@dataclass(frozen=True)
class BandBounds:
    """lo(q) and hi(q) of a band, printed for one query position: in Triton (the jitted helper `name`,
    which takes the query position, then only what the bounds read) and in torch (the host's plan()
    for inspection)."""

    name: str  # the helper: _key_bounds (the band walk), _decode_band0/1 (split-KV decoding)
    lo: str  # a tensor shaped like q_pos
    hi: str
    loads: tuple[Load, ...]  # b- and h-indexed inputs the bounds read (scalars per program)
    torch_lo: str  # for query positions q_pos (any shape), b_idx / h_idx broadcastable to it (host plan)
    torch_hi: str
    text: str
    reads_b: bool  # the helper takes off_b
    reads_h: bool  # ... off_h (a decode passes each row's head)
    inputs: tuple[str, ...]  # the spec's inputs the bounds read, in the signature's order
    sizes: tuple[str, ...]  # ... and sizes

    def _reads(self, h: str, sizes: tuple[str, ...]) -> list[str]:
        return ["off_b"] * self.reads_b + [h] * self.reads_h + [*self.inputs, *sizes]

    @property
    def params(self) -> str:
        """The helper's parameters (the index names SCALAR spells)."""
        return ", ".join([SCALAR.q, *self._reads(SCALAR.h, self.sizes)])

    def call(self, q: str, h: str) -> str:
        """The helper called for query positions `q` of heads `h`."""
        return f"{self.name}({', '.join([q, *self._reads(h, self.sizes)])})"

    def search_args(self, h: str) -> str:
        """What `_first_query_tile` takes past its flags (and passes on to the helper): what the bounds
        read, and Lq (it bisects over the query tiles)."""
        return ", ".join(self._reads(h, tuple(n for n in SIZE_NAMES if n in (*self.sizes, "Lq"))))


_ZEROS = "tl.zeros_like(q_pos)"  # a tensor shaped like the query positions


def _bound_code(expr, names: dict, unbounded: str) -> str:
    """A bound in Triton as a tensor shaped like q_pos (a decode's rows, a tile's corner): a bound that
    reads no query position (a constant, a per-head value, `unbounded` where there is no bound) is
    broadcast to it."""
    if expr is not None and ir.q in expr.free_symbols:
        return triton_code(expr, names)
    if expr is not None and expr.is_zero:
        return _ZEROS
    return f"{unbounded if expr is None else triton_code(expr, names)} + {_ZEROS}"


def band_bounds(variant: ir.Variant, clause: Clause, name: str) -> BandBounds:
    names = base_names(variant, SCALAR)
    load_names, loads = tensor_loads([clause.lo, clause.hi], SCALAR, "bound_")
    names.update(load_names)
    # host plan: one expression for tile corners ([tiles]) and rows ([tiles, BLOCK_M], b_idx [tiles, 1])
    host = {ir.b: "b_idx", ir.h: "h_idx", ir.q: "q_pos"}
    host.update({sym: name for name, sym in ir.SIZES.items()})
    host.update({p.symbol: ident(p.name) for p in variant.params})
    host.update(torch_loads(clause.lo, clause.hi, names=host))

    def at(expr, default):
        return default if expr is None else torch_code(expr, host)

    reads = band_reads(clause) | ({ir.SIZES["Lk"]} if clause.hi is None else set())
    tensors = {load.func.__name__ for e in (clause.lo, clause.hi) if e is not None for load in e.atoms(AppliedUndef)}
    inputs = [a.name for t in variant.tensors if t.name in tensors for a in _tensor_args(t)]
    inputs += [ident(p.name) for p in variant.params if p.symbol in reads]
    return BandBounds(
        name=name,
        lo=_bound_code(sympy.Integer(0) if clause.lo is None else clause.lo, names, "0"),
        hi=_bound_code(clause.hi, names, "Lk - 1"),
        loads=tuple(loads),
        torch_lo=at(clause.lo, "0"), torch_hi=at(clause.hi, "Lk - 1"),
        text=band_text(clause),
        reads_b=ir.b in reads, reads_h=ir.h in reads, inputs=tuple(inputs),
        sizes=tuple(n for n in SIZE_NAMES if n in ir.SIZES and ir.SIZES[n] in reads),
    )


def decode_bands(variant: ir.Variant, walk: TileWalk, clauses: tuple[Clause, ...]) -> tuple[BandBounds, ...]:
    """The two bands of a two-band mask's split-KV decode (`walks.decode_clauses`) printed, so a decode
    reads only their tiles; () where there are none or they cannot be printed (decoding then visits
    every tile, masked)."""
    try:
        return tuple(band_bounds(variant, c, f"_decode_band{i}") for i, c in enumerate(decode_clauses(walk, clauses)))
    except (UnsupportedExpression, BuildError):
        return ()


def walk_cells(variant: ir.Variant, walk: TileWalk) -> MaskCells | None:
    """The interval form of the mask, for the host plans of a list walk (templates/walks/lists.j2)."""
    return mask_cells(variant) if isinstance(walk, ListTiles) else None



@dataclass(frozen=True)
class SelectHost:
    """A select's host pieces (templates/walks/selected.j2; the reference's dense selection also reads
    the tile and the count)."""

    tile: int  # the selection tiles' side
    count: str  # the count of key tiles, in Python: params read from `values`, as the host and reference have them
    kept_cells: MaskCells  # the interval form of the mask and the keep condition: the tiles always kept


def select_host(variant: ir.Variant, walk: TileWalk) -> SelectHost | None:
    if not isinstance(walk, SelectedTiles):
        return None
    sel = walk.select
    count = host_scalar_code(sel.count, {p.symbol: f"values[{p.name!r}]" for p in variant.params})
    return SelectHost(sel.tile, count, mask_cells(variant, sympy.And(sympy.sympify(variant.mask), sel.keep)))
