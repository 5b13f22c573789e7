"""The abstract syntax tree of a `.attn` spec: frozen dataclasses, each with its source span.

The parser (attnc/parse.py) builds these from Lark's parse tree; the checker (attnc/check/)
reads them and produces the IR. Nothing here knows about types or meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Span


# ---- expressions ----
@dataclass(frozen=True)
class Expr:
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Number(Expr):
    text: str  # kept as written: "3" is an int, "3.0" a float


@dataclass(frozen=True)
class BoolLit(Expr):
    value: bool


@dataclass(frozen=True)
class Name(Expr):
    id: str


@dataclass(frozen=True)
class Call(Expr):
    func: str
    args: tuple[Expr, ...]
    kwargs: tuple[tuple[str, Expr], ...] = ()


@dataclass(frozen=True)
class Index(Expr):
    tensor: str
    indices: tuple[Expr, ...]


@dataclass(frozen=True)
class BinOp(Expr):
    op: str  # + - * / // % ** >> << & | ^
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Neg(Expr):
    operand: Expr


@dataclass(frozen=True)
class Not(Expr):
    operand: Expr


@dataclass(frozen=True)
class BoolOp(Expr):
    op: str  # and | or
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Compare(Expr):
    operands: tuple[Expr, ...]  # a < b <= c is (a, b, c) with ops ("<", "<=")
    ops: tuple[str, ...]


@dataclass(frozen=True)
class Ternary(Expr):
    then: Expr
    cond: Expr
    orelse: Expr


# ---- statements ----
@dataclass(frozen=True)
class Stmt:
    span: Span = field(compare=False)


@dataclass(frozen=True)
class HeadEntry:
    role: str  # q | k | v
    value: str | int  # a symbol name or a fixed head count
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Heads(Stmt):
    entries: tuple[HeadEntry, ...]


@dataclass(frozen=True)
class Binding(Stmt):
    """`name [: type] = expr` inside a `param` or `const` statement."""

    kind: str  # param | const
    name: str
    type: str | None
    value: Expr
    domain: Expr | None = None  # `where COND`: the values a param accepts (checked at call time)


@dataclass(frozen=True)
class Input(Stmt):
    name: str
    dtype: str  # int | float | bool
    axes: tuple  # a name (str: B, Hq, Lq, ... or a const / param) or an extent expression (Expr)
    learnable: bool
    domain: Expr | None = None  # `where COND`: a condition every element must meet (checked at call time)


@dataclass(frozen=True)
class Let(Stmt):
    names: tuple[str, ...]  # one name, or several for `let (y, x) = unravel(...)`
    value: Expr


@dataclass(frozen=True)
class LetFunc(Stmt):
    """`let name(a, b) = expr`: a function of its parameters, expanded (inlined) at every call."""

    name: str
    params: tuple[str, ...]
    param_spans: tuple[Span, ...] = field(compare=False)
    value: Expr = None


@dataclass(frozen=True)
class Mask(Stmt):
    value: Expr


@dataclass(frozen=True)
class Score(Stmt):
    value: Expr


@dataclass(frozen=True)
class Probs(Stmt):
    value: Expr


@dataclass(frozen=True)
class Feature(Stmt):
    """`feature phi(x) = EXPR`: a feature map applied to each element of a head vector."""

    name: str
    arg: str
    value: Expr


@dataclass(frozen=True)
class Select(Stmt):
    """`select topk(COUNT, tiles=T) [by ESTIMATE] [keep COND]`: per query tile, the key tiles to visit."""

    func: str  # the selection rule as written (`topk`)
    func_span: Span = field(compare=False)
    args: tuple[Expr, ...] = ()
    kwargs: tuple[tuple[str, Expr], ...] = ()
    by: Expr | None = None  # the estimate of a tile pair's score; None: the default
    keep: Expr | None = None  # the tiles always kept: those where the mask and COND hold for some pair


@dataclass(frozen=True)
class Stat(Stmt):
    """`stat NAME = FORM`: a statistic of the attention weights that the call returns."""

    name: str
    name_span: Span = field(compare=False)
    value: Expr = None


@dataclass(frozen=True)
class Spec:
    name: str
    name_span: Span
    statements: tuple[Stmt, ...]
    path: str
    source: str
