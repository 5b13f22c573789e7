"""The IR: what a variant computes, as sympy expressions plus a small vocabulary of its own.

A `Variant` is the checked, lowered form of a spec (the semantic model: docs/language.md, "What a spec computes"):

- indices `b, h, q, kv` and sizes `B, Hq, Hk, Hv, Lq, Lk` are integer symbols;
- scalar parameters are symbols (runtime) or already substituted numbers (`const`);
- a tensor input `doc_ids[b, q]` is an applied sympy function `doc_ids(b, q)`;
- `s` is the raw, already scaled score `scale * dot(q, k)`;
- row statistics are `RowSum(e)`, `RowMax(e)` (reductions over the row's unmasked keys) and the symbol
  `visible` (the number of unmasked keys in the row).

Lets are inlined into `mask`, `score` and `probs`; they are kept in `lets` only for display.
The functions below that sympy lacks (`FloorDiv`, `Sigmoid`, ...) carry their derivatives (`fdiff`)
so that attnc/analysis can differentiate through them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy
from sympy import Function, Integer, S, Symbol

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


def is_tensor_load(expr) -> bool:
    return isinstance(expr, sympy.core.function.AppliedUndef)


def row_stats(expr) -> set:
    """Row statistics appearing in `expr`: RowSum/RowMax applications and `visible`."""
    found = set(expr.atoms(RowStat)) if isinstance(expr, sympy.Basic) else set()
    if isinstance(expr, sympy.Basic) and visible in expr.free_symbols:
        found.add(visible)
    return found


# ---- feature maps (linear attention, attnc/analysis/factorize.py) ----
FEATURE_X = Symbol("_fx", real=True)  # one element of the head vector a feature map acts on


def feature_dot(name: str) -> Symbol:
    """`dot(phi(q), phi(k))` of feature map `name`: a real number per (q, kv), like `s`."""
    return Symbol(f"_fdot_{name}", real=True)


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


def feature_dot_name(sym) -> str | None:
    name = getattr(sym, "name", "")
    return name[len("_fdot_"):] if name.startswith("_fdot_") else None


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
