"""The IR: what a variant computes, as sympy expressions plus a small vocabulary of its own.

A `Variant` is the checked, lowered form of a spec (the semantic model: docs/language.md, "What a spec computes"):

- indices `b, h, q, kv` and sizes `B, Hq, Hk, Hv, Lq, Lk` are integer symbols;
- scalar parameters are symbols (runtime) or already substituted numbers (`const`);
- a tensor input `doc_ids[b, q]` is an applied sympy function `doc_ids(b, q)`;
- `s` is the raw, already scaled score `scale * dot(q, k)`;
- row statistics are `RowSum(e)`, `RowMax(e)` (reductions over the row's unmasked keys) and the symbol
  `visible` (the number of unmasked keys in the row).

Lets are inlined into `mask`, `score` and `probs`; they are kept in `lets` only for display.
`spans` keeps where each statement was written, so errors found after the check point at the source.
The functions below that sympy lacks (`FloorDiv`, `Sigmoid`, ...) carry their derivatives (`fdiff`)
so that attnc/analysis can differentiate through them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

import sympy
from sympy import Function, Integer, S, Symbol

from .errors import Span

# ---- symbols ----
b = Symbol("b", integer=True, nonnegative=True)
h = Symbol("h", integer=True, nonnegative=True)
q = Symbol("q", integer=True, nonnegative=True)
kv = Symbol("kv", integer=True, nonnegative=True)
INDICES = {"b": b, "h": h, "q": q, "kv": kv}

SIZES = {name: Symbol(name, integer=True, positive=True) for name in ("B", "Hq", "Hk", "Hv", "Lq", "Lk")}
DQK = Symbol("Dqk", integer=True, positive=True)  # the head dim: the extent of a feature map's input axis

s = Symbol("s", real=True)  # the raw score, scale * dot(q, k)
visible = Symbol("visible", integer=True, nonnegative=True)  # unmasked keys in the row
VISIBLE = visible  # (the name, where a parameter shadows it)

# the int params of a block of a longer problem (Variant.shifted): its first query's and first key's
# positions in the whole problem, and the whole problem's query and key counts
POSITION_PARAMS = ("attnc_q_start", "attnc_kv_start", "attnc_total_lq", "attnc_total_lk")


# ---- integer functions ----
class FloorDiv(Function):
    """Python's `a // b`: division rounding towards minus infinity."""

    is_integer = True

    @classmethod
    def eval(cls, a, d):
        if a.is_Integer and d.is_Integer and d != 0:
            return Integer(int(a) // int(d))
        if d == 1:
            return a


class RShift(Function):
    """`a >> n` = `a // 2**n` for integers."""

    is_integer = True

    @classmethod
    def eval(cls, a, n):
        if a.is_Integer and n.is_Integer and n >= 0:
            return Integer(int(a) >> int(n))


class _BitOp(Function):
    """Bitwise operations on integers (two's complement, as in Python)."""

    is_integer = True
    nargs = 2
    _python = None

    @classmethod
    def eval(cls, a, b):
        if a.is_Integer and b.is_Integer:
            return Integer(cls._python(int(a), int(b)))


class BitAnd(_BitOp):
    _python = staticmethod(lambda a, b: a & b)


class BitOr(_BitOp):
    _python = staticmethod(lambda a, b: a | b)


class BitXor(_BitOp):
    _python = staticmethod(lambda a, b: a ^ b)


class LShift(Function):
    """`a << n` = `a * 2**n` for integers; n is a build-time constant (checked)."""

    is_integer = True

    @classmethod
    def eval(cls, a, n):
        if a.is_Integer and n.is_Integer and n >= 0:
            return Integer(int(a) << int(n))


class FloorLog2(Function):
    """`floor(log2(x))` for a positive integer x, computed exactly (no float rounding)."""

    is_integer = True
    is_nonnegative = True

    @classmethod
    def eval(cls, x):
        if x.is_Integer and x > 0:
            return Integer(int(x).bit_length() - 1)


# ---- real functions sympy lacks ----
class Sigmoid(Function):
    is_real = True

    def fdiff(self, argindex=1):
        x = self.args[0]
        return Sigmoid(x) * (1 - Sigmoid(x))


class Softplus(Function):
    """log(1 + exp(x)), evaluated stably by the printers."""

    is_real = True

    def fdiff(self, argindex=1):
        return Sigmoid(self.args[0])


class Relu(Function):
    is_real = True

    def fdiff(self, argindex=1):
        return Step(self.args[0])


class Step(Function):
    """1 where x > 0, else 0: the derivative of relu (taken as 0 at 0, as torch does)."""

    is_real = True

    def fdiff(self, argindex=1):
        return S.Zero


class Log2(Function):
    is_real = True

    def _eval_evalf(self, prec):
        return (sympy.log(self.args[0]) / sympy.log(2)).evalf(prec)

    def fdiff(self, argindex=1):
        return 1 / (self.args[0] * sympy.log(2))


# ---- row statistics ----
class RowStat(Function):
    """A reduction over the unmasked keys of a query row."""

    is_real = True


class RowSum(RowStat):
    pass


class RowMax(RowStat):
    pass


def domain_symbol(name: str, dtype: str) -> Symbol:
    """An element of tensor input `name` in its `where` condition (`decay > 0` reads every decay[h])."""
    return Symbol(name, integer=True) if dtype == "int" else Symbol(name, real=True)


def tensor_function(name: str, dtype: str):
    """The sympy function standing for a tensor input: `doc_ids(b, q)` is `doc_ids[b, q]`."""
    assumptions = {"int": {"integer": True}, "float": {"real": True}, "bool": {}}[dtype]
    return Function(name, **assumptions)


def row_stats(expr) -> set:
    """Row statistics appearing in `expr`: RowSum/RowMax applications and `visible`."""
    found = set(expr.atoms(RowStat)) if isinstance(expr, sympy.Basic) else set()
    if isinstance(expr, sympy.Basic) and visible in expr.free_symbols:
        found.add(visible)
    return found


def row_input(name: str):
    """The load of a per-row input `NAME: float[B, Hq, Lq]` at [b, h, q] (Variant.rows_given)."""
    return tensor_function(name, "float")(b, h, q)


# ---- feature maps (linear attention, attnc/analysis/factorize.py) ----
FEATURE_X = Symbol("_fx", real=True)  # one element of the head vector a feature map acts on


def feature_dot(name: str, key_name: str | None = None) -> Symbol:
    """`dot(phi(q), phi(k))` of feature map `name`: a real number per (q, kv), like `s`. With `key_name`
    (`dot(phi_q(q), phi_k(k))`, untied maps) the keys' map is another one; ':' is in no identifier."""
    if key_name is None or key_name == name:
        return Symbol(f"_fdot_{name}", real=True)
    return Symbol(f"_fdot_{name}:{key_name}", real=True)


def feature_weight(name: str) -> Symbol:
    """`W[h]` of an input `W: float[Hq, Dqk, F]` inside a feature map: head h's matrix [Dqk, F]."""
    return Symbol(f"_fw_{name}", real=True)


class FMatMul(Function):
    """`v @ W[h]` in a feature map: the vector v [Dqk] times head h's matrix [Dqk, F]."""

    nargs = 2


class FSoftmax(Function):
    """`softmax(v)` in a feature map: over the feature axis."""

    nargs = 1


class FCat(Function):
    """`cat(a, b, ...)` in a feature map: the vectors one after the other."""


def feature_dot_names(sym) -> tuple[str, str] | None:
    """(query map, key map) of a feature_dot symbol, None for any other."""
    name = getattr(sym, "name", "")
    if not name.startswith("_fdot_"):
        return None
    query, _, key = name[len("_fdot_"):].partition(":")
    return query, key or query


# ---- dot products of feature vectors (`dot(qr[b, h, q], kr[b, kv])`, DeepSeek MLA's rotary part) ----
class VecDot(Function):
    """`dot(a[..., q], b[..., kv])`: the inner product over the last (feature) axis of a vector read once
    per query and a vector read once per key, a real number per (query, key) pair like `s`.

    args: the query-side read and the key-side read (tensor loads with every axis but the feature
    axis subscripted: `qr(b, h, q)`, `kr(b, kv)`), and the feature axis' extent."""

    nargs = 3
    is_real = True
    _diff_wrt = True  # the backward differentiates the score by the dot itself (learnable vectors)

    @property
    def query(self):
        return self.args[0]

    @property
    def key(self):
        return self.args[1]

    @property
    def length(self):
        return self.args[2]


def vec_dots(*exprs) -> list:
    """The VecDot terms in exprs, in a fixed order."""
    found = {d for e in exprs if isinstance(e, sympy.Basic) for d in e.atoms(VecDot)}
    return sorted(found, key=sympy.default_sort_key)


def scalar_loads(expr) -> set:
    """Tensor loads of one entry in expr: every load but the vector reads of a `VecDot`."""
    expr = sympy.sympify(expr)
    vector_reads = {a for d in expr.atoms(VecDot) for a in d.args[:2]}
    return expr.atoms(sympy.core.function.AppliedUndef) - vector_reads


# ---- the variant ----
@dataclass(frozen=True)
class Param:
    """A runtime scalar parameter: a keyword argument with a default."""

    name: str
    dtype: str  # int | float | bool (a bool is passed to kernels and plans as the integer 0 or 1)
    default: sympy.Expr  # a number, or an expression of the sizes (e.g. -log(Lk))
    symbol: Symbol
    domain: object = None  # `where COND`: a condition of `symbol` that every call's value must meet
    domain_text: str = ""  # COND as written, for the call-time error


@dataclass(frozen=True)
class TensorInput:
    name: str
    dtype: str  # int | float | bool
    axes: tuple[str, ...]  # shape symbols: B, Hq, Lq, Lk, L, or an axis of its own: its extent as Python code
    learnable: bool
    function: object  # the sympy function of its loads
    extents: tuple = ()  # per axis: None for B, Hq, Lq, Lk, L; the extent (a sympy integer expression) otherwise
    domain: object = None  # `where COND`: a condition of DOMAIN_SYMBOL(name) that every element must meet
    domain_text: str = ""  # COND as written, for the call-time error

    def load(self, *indices):
        return self.function(*indices)

    def shape(self, sizes: dict, params: dict) -> list[int]:
        """Its shape for the given sizes (B, Hq, Lq, Lk, L, ...) and param values (name -> value, or the
        params' default expressions are used where absent)."""
        subs = {SIZES[n]: v for n, v in sizes.items() if n in SIZES}
        if "Dqk" in sizes:
            subs[DQK] = sizes["Dqk"]
        subs.update({sympy.Symbol(n, integer=True): v for n, v in params.items()})
        extents = self.extents or (None,) * len(self.axes)
        return [sizes[a] if e is None else int(sympy.sympify(e).subs(subs)) for a, e in zip(self.axes, extents)]


@dataclass(frozen=True)
class Layout:
    """`let (t, y, x) = unravel(index, T, Y, X)`: the index is a row-major multi-dimensional position."""

    index: str  # q | kv | another int expression printed
    names: tuple[str, ...]
    extents: tuple[sympy.Expr, ...]
    coords: tuple[sympy.Expr, ...]


class Estimate(enum.Enum):
    """How a `select` estimates the score of a (query tile, key tile) pair, as the spec writes it."""

    MEAN_DOT = "dot(mean(q), mean(k))"  # the tile's mean query against the tile's mean key


@dataclass(frozen=True)
class Selection:
    """`select topk(count, tiles=tile) by estimate keep keep`: block top-k sparsity.

    Queries and keys are cut into tiles of `tile` positions. Each query tile (per batch entry and
    query head) visits the key tiles where `keep` holds together with the mask for some pair, and the
    `count` other key tiles the mask lets through with the largest `estimate` (ties: the lower tile).
    The element mask becomes mask(q, kv) and (q's tile visits kv's tile): docs/language.md, `select`."""

    count: sympy.Expr  # an int expression of params (consts are numbers already)
    tile: int  # a power of two, a multiple of every plan tile (attnc/check/statements.py)
    estimate: Estimate
    keep: sympy.Basic = sympy.false  # bool, of the indices, sizes, params and tensor inputs


class StatKind(enum.Enum):
    """A statistic of the attention weights P[q, kv] that a `stat` statement returns: its form as the spec
    writes it, and the axis it is indexed by (a reduction over the other one)."""

    RECEIVED = "sum_q(P)"  # per key: the attention it receives, summed over the queries that see it
    RECEIVED_MAX = "max_q(P)"  # per key: the largest weight any query gives it
    ROW_SUM = "sum_kv(P)"  # per row: the weights' mass over the keys (1 for a softmax without sink)
    ROW_MAX = "max_kv(P)"  # per row: its largest weight
    ENTROPY = "entropy(P)"  # per row: -sum over kv of P log P
    VISIBLE = "visible"  # per row: the keys it attends (the mask's and the select's)

    @property
    def per_key(self) -> bool:
        return self in (StatKind.RECEIVED, StatKind.RECEIVED_MAX)

    @property
    def has_gradient(self) -> bool:
        """Only the entropy is differentiable (a regularizer); the others are returned detached."""
        return self is StatKind.ENTROPY


@dataclass(frozen=True)
class Stat:
    """`stat NAME = FORM` or `stat NAME = total(FORM)`: a statistic the call returns with the output
    ([B, Hq, Lk] per key, [B, Hq, Lq] per row, [B, Hq] with `total`: the sum over its axis)."""

    name: str
    kind: StatKind
    total: bool = False

    @property
    def text(self) -> str:
        return f"total({self.kind.value})" if self.total else self.kind.value


class Statement(enum.Enum):
    """A kind of statement whose source span the IR keeps (`Spans`)."""

    MASK = enum.auto()
    SCORE = enum.auto()
    PROBS = enum.auto()
    FEATURE = enum.auto()  # one per feature map, by its name
    PARAM = enum.auto()  # one per param, by its name
    INPUT = enum.auto()  # one per tensor input, by its name
    SELECT = enum.auto()  # the select statement (name None) and its keep condition (name "keep")
    STAT = enum.auto()  # one per stat, by its name


@dataclass(frozen=True)
class Spans:
    """Where the spec wrote the statements the IR was lowered from, so that an error found after the
    check (an analysis, the choice of algorithm) points at file:line:col. One entry per written
    statement: (kind, name, span), the name None for mask, score and probs."""

    entries: tuple[tuple[Statement, str | None, Span], ...] = ()

    def of(self, kind: Statement, name: str | None = None) -> Span | None:
        """The span of that statement; None where the spec does not write it (no mask: every key)."""
        return next((span for k, n, span in self.entries if k is kind and n == name), None)

    def without(self, kind: Statement, name: str) -> Spans:
        return Spans(tuple(e for e in self.entries if (e[0], e[1]) != (kind, name)))


@dataclass(frozen=True)
class Variant:
    name: str
    path: str
    source: str
    heads: dict  # role (q|k|v) -> symbol name (str) or fixed count (int)
    consts: dict  # name -> int | float, substituted at build time
    params: tuple[Param, ...]
    tensors: tuple[TensorInput, ...]
    lets: tuple[tuple[tuple[str, ...], sympy.Expr], ...]
    layouts: tuple[Layout, ...]
    mask: sympy.Basic  # boolean
    score: sympy.Expr  # of s
    probs: sympy.Expr  # of score, row statistics
    probs_written: bool = field(default=False)  # False when probs defaulted to softmax(score)
    features: tuple = field(default=())  # (name, body of FEATURE_X): `feature phi(x) = ...`
    select: Selection | None = None  # block top-k sparsity: the key tiles each query tile visits
    stats: tuple[Stat, ...] = ()  # statistics of the weights the call returns with return_stats=True
    # where each statement was written; not compared, as the source already is
    spans: Spans = field(default=Spans(), compare=False)

    @property
    def defined_names(self) -> set:
        """The names the spec defines (tensors, params, consts, lets): a derived variant's new inputs and
        params must not clash with them."""
        return ({t.name for t in self.tensors} | {p.name for p in self.params} | set(self.consts)
                | {n for names, _ in self.lets for n in names})

    def and_mask(self, suffix: str, inputs) -> Variant:
        """This variant, named `<name>_<suffix>`, with one more input `NAME: bool[B, AXIS]` per
        (NAME, AXIS, INDEX) of `inputs` (AXIS Lq with INDEX q, or Lk with kv), its mask ANDed with
        `NAME[b, INDEX]`. The integrations add padding and context-parallel conditions this way: composed
        in the IR, any mask the checker accepted keeps its meaning (spec text edits could not). The
        spans stay the text's: the mask's is that of the mask as written."""
        taken = self.defined_names
        extra, loads = [], []
        for name, axis, index in inputs:
            if (axis, index) not in (("Lq", "q"), ("Lk", "kv")):
                raise ValueError(f"{self.path}: extra mask input '{name}': axis {axis!r} indexed at {index!r}; "
                                 f"expected ('Lq', 'q') or ('Lk', 'kv')")
            if name in taken:
                raise ValueError(f"{self.path}: extra mask input '{name}' clashes with a name the spec defines")
            taken.add(name)
            tensor = TensorInput(name, "bool", ("B", axis), False, tensor_function(name, "bool"), (None, None))
            extra.append(tensor)
            loads.append(sympy.Ne(tensor.load(b, INDICES[index]), 0))  # a bool load, as attnc/check/lower.py lowers it
        notes = "".join(f"# and_mask: input {t.name}: bool[B, {t.axes[1]}] ANDed into the mask at "
                        f"{i}\n" for t, (_, _, i) in zip(extra, inputs))
        source = self.source + ("" if self.source.endswith("\n") else "\n") + notes
        return replace(self, name=f"{self.name}_{suffix}", source=source, tensors=self.tensors + tuple(extra),
                       mask=sympy.And(self.mask, *loads))

    def shifted(self, suffix: str, visible=None) -> Variant:
        """This variant, named `<name>_<suffix>`, on a block of a longer problem: its queries and keys
        are rows [Q_START, Q_START + Lq) and [KV_START, KV_START + Lk) of a problem of TOTAL_LQ queries
        and TOTAL_LK keys (four more int params, named by `POSITION_PARAMS`; by default 0, 0, Lq, Lk,
        which is the spec itself). Every expression sees the global positions and lengths: `q` becomes
        `q + Q_START`, `kv` becomes `kv + KV_START`, `Lq` and `Lk` the totals, and a tensor input's
        length axes (Lq, Lk, L) have the totals' extents, so `doc_ids[b, q]` reads the global row.
        `visible` is the block's row count of the whole problem: its closed form (`visible`, computed by
        the caller from this variant's mask) shifted the same way; without one it stays a counted
        statistic (of this block's keys: a caller that splits the keys adds the counts up).

        Context parallelism runs each ring step on the shard pair itself this way: memory is the
        block's, positions are the sequence's. Param defaults that read Lq or Lk stay the block's:
        the caller passes the whole problem's (`defaults` of the spec itself)."""
        if self.select is not None:
            raise ValueError(f"{self.path}: a block of a longer problem cannot run the select: its top-k ranks "
                             "every key tile of a query tile, which the block does not hold")
        taken = self.defined_names
        clash = taken & set(POSITION_PARAMS)
        if clash:
            raise ValueError(f"{self.path}: '{min(clash)}' clashes with a name the block variant adds")
        q0, k0, lq, lk = (Symbol(n, integer=True) for n in POSITION_PARAMS)
        to_global = {q: q + q0, kv: kv + k0, SIZES["Lq"]: lq, SIZES["Lk"]: lk}
        if visible is not None:
            to_global[VISIBLE] = sympy.sympify(visible).subs(to_global, simultaneous=True)

        def shift(e):
            return e if e is None else sympy.sympify(e).subs(to_global, simultaneous=True)

        axis_extent = {"Lq": lq, "Lk": lk, "L": lq}
        tensors = []
        for t in self.tensors:
            extents = t.extents or (None,) * len(t.axes)
            axes = tuple(axis_extent[a].name if a in axis_extent and e is None else a for a, e in zip(t.axes, extents))
            extents = tuple(axis_extent[a] if a in axis_extent and e is None else shift(e) for a, e in zip(t.axes, extents))
            tensors.append(replace(t, axes=axes, extents=extents))
        layouts = tuple(replace(lay, index=f"({lay.index}) + {POSITION_PARAMS[0 if lay.index == 'q' else 1]}"
                                if lay.index in ("q", "kv") else lay.index,
                                extents=tuple(shift(e) for e in lay.extents), coords=tuple(shift(e) for e in lay.coords))
                        for lay in self.layouts)
        added = tuple(Param(name, "int", default, symbol) for name, default, symbol in
                      zip(POSITION_PARAMS, (Integer(0), Integer(0), SIZES["Lq"], SIZES["Lk"]), (q0, k0, lq, lk)))
        source = self.source + ("" if self.source.endswith("\n") else "\n") + (
            f"# shifted: a block of a longer problem, at {POSITION_PARAMS[0]}, {POSITION_PARAMS[1]} of "
            f"{POSITION_PARAMS[2]} x {POSITION_PARAMS[3]} positions\n")
        return replace(self, name=f"{self.name}_{suffix}", source=source, params=self.params + added,
                       tensors=tuple(tensors), layouts=layouts, mask=shift(self.mask), score=shift(self.score),
                       probs=shift(self.probs), lets=tuple((names, shift(e)) for names, e in self.lets))

    def rows_given(self, stats: dict, suffix: str) -> Variant:
        """This variant, named `<name>_<suffix>`, with each row statistic of `stats` (a RowSum or RowMax
        of the probabilities, or `visible`, mapped to a new input's name) read from that input instead:
        `NAME: float[B, Hq, Lq] learnable` at [b, h, q]. A caller that splits the keys computes the
        statistics over all of them first (`statistic`) and passes them in; the gradient of the loss by
        them is the input's. Outer statistics are replaced first, so one inside another goes with it."""
        taken = self.defined_names
        extra, loads = [], {}
        for stat, name in stats.items():
            if name in taken:
                raise ValueError(f"{self.path}: row input '{name}' clashes with a name the spec defines")
            tensor = TensorInput(name, "float", ("B", "Hq", "Lq"), True, tensor_function(name, "float"),
                                 (None, None, None))
            extra.append(tensor)
            loads[stat] = row_input(name)
        return replace(self, name=f"{self.name}_{suffix}", tensors=self.tensors + tuple(extra),
                       probs=sympy.sympify(self.probs).xreplace(loads),
                       source=self.source + ("" if self.source.endswith("\n") else "\n")
                       + "".join(f"# rows_given: {stat} read from input {name}\n" for stat, name in stats.items()))

    def statistic(self, stat, suffix: str) -> Variant:
        """This variant, named `<name>_<suffix>`, whose output with v = 1 (one value feature) is the row
        statistic `stat` over its keys: probs is the sum's argument (RowSum), or 1 (`visible`, counted).
        The statistics inside it must already be given (`rows_given`)."""
        if stat == visible:
            probs = Integer(1)
        elif isinstance(stat, RowSum):
            probs = stat.args[0]
        else:
            raise ValueError(f"{self.path}: {stat} is not a sum or a count over the keys")
        if row_stats(probs):
            raise ValueError(f"{self.path}: {stat} reads row statistics {sorted(map(str, row_stats(probs)))}: give them first")
        return replace(self, name=f"{self.name}_{suffix}", probs=probs, probs_written=True,
                       source=self.source + ("" if self.source.endswith("\n") else "\n") + f"# statistic: {stat}\n")

    def unbounded(self, param: str, suffix: str) -> Variant:
        """This variant, named `<name>_<suffix>`, with scalar parameter `param` taken to +infinity and
        removed: a sliding window's width, giving the spec without its window (`q - kv < window` is
        True). Exact for any value of the other inputs; refused (ValueError) where the limit is not a
        plain expression (the parameter in the score or probs, a shape, or `window - q < 0`)."""
        p = next((p for p in self.params if p.name == param), None)
        if p is None:
            raise ValueError(f"{self.path}: the spec has no scalar parameter '{param}' to take to infinity")
        if self.select is not None and p.symbol in sympy.sympify(self.select.count).free_symbols:
            raise ValueError(f"{self.path}: '{param}' is the select's count; it cannot be taken to infinity")
        mask, score, probs = (e.subs(p.symbol, sympy.oo) for e in (self.mask, self.score, self.probs))
        reads = [e for lay in self.layouts for e in (*lay.extents, *lay.coords)]
        reads += [e for t in self.tensors for e in t.extents if e is not None] + [body for _, body in self.features]
        infinite = (sympy.oo, -sympy.oo, sympy.zoo, sympy.nan)  # a limit left unevaluated, or none
        if (any(e.has(*infinite) for e in (mask, score, probs)) or not isinstance(mask, sympy.logic.boolalg.Boolean)
                or any(p.symbol in sympy.sympify(e).free_symbols for e in reads)):
            raise ValueError(f"{self.path}: the spec without its parameter '{param}' (taken to infinity) is not "
                             f"a spec: '{param}' must appear only in mask conditions that infinity makes True, "
                             f"as in `q - kv < {param}`; the mask becomes {mask}")
        lets = tuple((names, sympy.sympify(e).subs(p.symbol, sympy.oo)) for names, e in self.lets)
        select = self.select and replace(self.select, keep=sympy.sympify(self.select.keep).subs(p.symbol, sympy.oo))
        return replace(self, select=select, name=f"{self.name}_{suffix}", params=tuple(x for x in self.params if x is not p),
                       spans=self.spans.without(Statement.PARAM, param),
                       source=self.source + ("" if self.source.endswith("\n") else "\n")
                       + f"# unbounded: param {param} taken to infinity and removed\n",
                       mask=mask, score=score, probs=probs, lets=lets)

    @property
    def learnable(self) -> tuple[TensorInput, ...]:
        return tuple(t for t in self.tensors if t.learnable)

    def tensor(self, name: str) -> TensorInput:
        return next(t for t in self.tensors if t.name == name)

    @property
    def needs_equal_lengths(self) -> bool:
        """True when a tensor is indexed by one length axis `L` shared by queries and keys."""
        return any("L" in t.axes for t in self.tensors) or any(
            lay.index in ("q", "kv") for lay in self.layouts
        )
