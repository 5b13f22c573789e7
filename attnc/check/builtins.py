"""The language's library of functions: one small rule per builtin, looked up by name in `BUILTINS`.

A rule takes the checker (attnc/check/lower.py: it lowers the arguments and records errors) and the
call's AST node, and returns the call's `Value`. Most builtins are functions of numbers (`Scalar`:
positional arguments, each a number, a fixed count); softmax, dot and the feature-map functions have
rules of their own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sympy

from .. import ast, ir
from .types import INT, REAL, Value, merge

if TYPE_CHECKING:
    from .lower import Expressions

_REAL_FUNCS = {
    "exp": sympy.exp,
    "log": sympy.log,
    "sqrt": sympy.sqrt,
    "tanh": sympy.tanh,
    "sigmoid": ir.Sigmoid,
    "softplus": ir.Softplus,
    "relu": ir.Relu,
    "log2": ir.Log2,
    "sin": sympy.sin,
    "cos": sympy.cos,
    "tan": sympy.tan,
    "erf": sympy.erf,
}


def softmax_expr(logits, sink=None):
    """softmax as row statistics: exp(x - rowmax(x)) / (rowsum(exp(x - rowmax(x))) [+ exp(sink - rowmax(x))])."""
    m = ir.RowMax(logits)
    denominator = ir.RowSum(sympy.exp(logits - m))
    if sink is not None:
        denominator = denominator + sympy.exp(sink - m)
    return sympy.exp(logits - m) / denominator


# ---- functions of numbers ----
@dataclass(frozen=True)
class Scalar:
    """A builtin of numbers: positional arguments only, each a number; `arity` of them (None: 2 or
    more). `apply(checker, node, args)` gives the result from the lowered arguments."""

    arity: int | None
    apply: Callable[[Expressions, ast.Call, list[Value]], Value]

    def __call__(self, checker: Expressions, node: ast.Call) -> Value:
        func = node.func
        if node.kwargs:
            checker.error(f"{func}() takes no keyword arguments", node.span)
        args = [checker.lower(a) for a in node.args]
        for arg_node, v in zip(node.args, args):
            checker.need_number(v, arg_node, f"{func}()")
        if self.arity is None and len(args) < 2:
            checker.error(f"{func}() needs at least 2 arguments, got {len(args)}", node.span)
        if self.arity is not None and len(args) != self.arity:
            checker.error(f"{func}() takes {self.arity} argument{'s' * (self.arity > 1)}, got {len(args)}", node.span)
        return self.apply(checker, node, args)


def _real(fn) -> Scalar:
    return Scalar(1, lambda checker, node, args: merge(fn(args[0].expr), REAL, *args))


def _common_type(args: list[Value]):
    return INT if all(a.type == INT for a in args) else REAL


def _abs(checker, node, args):
    return merge(sympy.Abs(args[0].expr), args[0].type, *args)


def _extremum(fn) -> Scalar:
    return Scalar(None, lambda checker, node, args: merge(fn(*[a.expr for a in args]), _common_type(args), *args))


def _clamp(checker, node, args):
    x, lo, hi = (a.expr for a in args)
    return merge(sympy.Min(sympy.Max(x, lo), hi), _common_type(args), *args)


def _floor(checker: Expressions, node: ast.Call, args):
    inner = node.args[0]
    if isinstance(inner, ast.Call) and inner.func == "log2" and len(inner.args) == 1:
        x = checker.lower(inner.args[0])
        if x.type == INT:  # exact integer log: no float rounding near powers of two
            return merge(ir.FloorLog2(x.expr), INT, x)
    return merge(sympy.floor(args[0].expr), INT, *args)


def _ceil(checker, node, args):
    return merge(sympy.ceiling(args[0].expr), INT, *args)


def _row_stat(stat, int_of_int: bool) -> Scalar:
    """rowmax / rowsum of a per-pair value (a row-constant argument is legal: rowsum(1) counts keys);
    the row statistic is used here, at the call."""
    def apply(checker, node, args):
        value = args[0]
        type_ = INT if int_of_int and value.type == INT else REAL
        return Value(stat(value.expr), type_, value.uses_score, node.span)
    return Scalar(1, apply)


# ---- softmax, and the functions of feature maps ----
def _softmax(checker: Expressions, node: ast.Call) -> Value:
    if checker.in_feature:  # of a vector: over the feature axis
        return _feature_vectors(checker, node, ir.FSoftmax)
    if len(node.args) != 1:
        checker.error(f"softmax() takes 1 argument (the logits), got {len(node.args)}", node.span)
    sink = None
    for name, kw in node.kwargs:
        if name != "sink":
            checker.error(f"softmax() has no argument '{name}'", kw.span, "its only keyword is sink=<logit>")
        if sink is not None:
            checker.error("softmax() is given sink= twice", kw.span)
        sink = checker.lower(kw)
        checker.need_number(sink, kw, "sink=")
        if sink.uses_score or sink.uses_rowstat or ir.kv in sink.expr.free_symbols:
            checker.error("a sink logit must be constant along the row (no score, no 'kv')", kw.span)
    logits = checker.lower(node.args[0])
    checker.need_number(logits, node.args[0], "softmax()")
    if logits.uses_rowstat:
        checker.error("softmax() logits cannot use row statistics", logits.uses_rowstat)
    return Value(softmax_expr(logits.expr, None if sink is None else sink.expr), REAL,
                 logits.uses_score or node.span, node.span)


def _cat(checker: Expressions, node: ast.Call) -> Value:
    if not checker.in_feature:
        checker.error("cat() joins feature vectors: use it inside 'feature phi(x) = ...'", node.span)
    return _feature_vectors(checker, node, ir.FCat)


def _feature_vectors(checker: Expressions, node: ast.Call, fn) -> Value:
    """softmax() or cat() inside a feature map: functions of its vectors (ir.FSoftmax, ir.FCat)."""
    if node.kwargs or not node.args or (fn is ir.FSoftmax and len(node.args) != 1):
        checker.error(f"in a feature map, {node.func}() takes {'1 vector' if fn is ir.FSoftmax else 'vectors'}",
                      node.span)
    args = [checker.lower(a) for a in node.args]
    return merge(fn(*[a.expr for a in args]), REAL, *args)


def _elu(checker: Expressions, node: ast.Call) -> Value:
    if not checker.in_feature:
        checker.error("elu() is a feature-map function: use it inside 'feature phi(x) = ...'", node.span)
    if len(node.args) != 1 or node.kwargs:
        checker.error(f"elu() takes 1 argument, got {len(node.args)}", node.span)
    x = checker.lower(node.args[0])
    checker.need_number(x, node.args[0], "elu()")
    return merge(sympy.Piecewise((x.expr, x.expr > 0), (sympy.exp(x.expr) - 1, True)), REAL, x)


def _unravel(checker: Expressions, node: ast.Call) -> Value:
    checker.error("unravel(...) gives several coordinates", node.span, "unpack it: let (y, x) = unravel(q, Y, X)")


# ---- dot ----
def _dot(checker: Expressions, node: ast.Call) -> Value:
    """`dot(phi(q), phi(k))`: the dot product of the query's and the key's feature vectors."""
    if len(node.args) == 2 and any(isinstance(a, ast.Index) for a in node.args):
        return _dot_vectors(checker, node)
    hint = "write dot(phi(q), phi(k)) with a map declared by 'feature phi(x) = ...'"
    if len(node.args) != 2 or node.kwargs:
        checker.error(f"dot() takes 2 arguments, got {len(node.args)}", node.span, hint)
    names = []
    for arg, role in zip(node.args, ("q", "k")):
        if not (isinstance(arg, ast.Call) and checker.is_feature(arg.func)) or len(arg.args) != 1 or not (
                isinstance(arg.args[0], ast.Name) and arg.args[0].id == role):
            checker.error(f"argument {1 + (role == 'k')} of dot() must be a feature map of '{role}'", arg.span, hint)
        names.append(arg.func)
    # untied maps (Hedgehog's separate query and key maps) factorize alike: phi_q(q) . phi_k(k)
    return Value(ir.feature_dot(*names), REAL, node.span, None)


def _dot_vectors(checker: Expressions, node: ast.Call) -> Value:
    """`dot(qr[b, h, q], kr[b, kv])`: the inner product over the feature axis (the last) of a vector
    read once per query and a vector read once per key (DeepSeek MLA's decoupled rotary part)."""
    if node.kwargs:
        checker.error("dot() takes no keyword arguments", node.span)
    if checker.in_feature:
        checker.error("dot() of feature vectors cannot be used inside a feature map", node.span)
    if checker.features:
        checker.error("dot() of feature vectors cannot be combined with feature maps (linear attention)",
                      node.span, "use either 'feature phi(x) = ...' with dot(phi(q), phi(k)) or tensor vectors")
    reads = [_vector_read(checker, arg) for arg in node.args]
    for load, arg in reads:
        uses_q, uses_kv = ir.q in load.free_symbols, ir.kv in load.free_symbols
        if uses_q and uses_kv:
            checker.error(f"the feature vector '{arg.tensor}[...]' is read at both q and kv; dot() takes one "
                          "vector per query and one per key", arg.span,
                          "index the query-side vector by q (not kv) and the key-side vector by kv (not q)")
        if not (uses_q or uses_kv):
            checker.error(f"the feature vector '{arg.tensor}[...]' must be read at q (one vector per query) or "
                          "at kv (one per key)", arg.span)
    sides = [ir.kv in load.free_symbols for load, _ in reads]
    if sides[0] == sides[1]:
        which = "key-side vectors (both read at kv)" if sides[0] else "query-side vectors (both read at q)"
        checker.error(f"dot() of two {which}", node.span,
                      "one argument is read per query (at q), the other per key (at kv): "
                      "dot(qr[b, h, q], kr[b, kv])")
    (qload, qarg), (kload, karg) = reads if not sides[0] else reads[::-1]
    qlen = checker.tensor_named(qarg.tensor).extents[-1]
    klen = checker.tensor_named(karg.tensor).extents[-1]
    if sympy.simplify(qlen - klen) != 0:
        checker.error(f"the feature vectors of dot() have different lengths: {qlen} ('{qarg.tensor}') and "
                      f"{klen} ('{karg.tensor}')", node.span, "declare both feature axes with the same extent")
    checker.vec_dot_span = checker.vec_dot_span or node.span
    return Value(ir.VecDot(qload, kload, qlen), REAL, node.span, None)


def _vector_read(checker: Expressions, node) -> tuple:
    """One argument of dot() over a feature axis: a tensor read with every axis but its last."""
    hint = "e.g. dot(qr[b, h, q], kr[b, kv]) for inputs qr: float[B, Hq, Lq, R] and kr: float[B, Lk, R]"
    if not isinstance(node, ast.Index):
        checker.error("an argument of dot() over a feature axis must be a tensor read with every axis but its "
                      "last subscripted", node.span, hint)
    tensor = checker.tensor_named(node.tensor)
    if tensor is None or "Dqk" in tensor.axes:
        checker.expr_index(node)  # reports the unknown or misused tensor
    extents = tensor.extents or (None,) * len(tensor.axes)
    if extents[-1] is None:
        checker.error(f"'{tensor.name}' has no feature axis: its last axis {tensor.axes[-1]} is not an extent",
                      node.span, "declare the feature axis last, e.g. input kr: float[B, Lk, R] with const R = 64")
    if len(node.indices) != len(tensor.axes) - 1:
        checker.error(f"a feature vector of '{tensor.name}' subscripts every axis but the last: "
                      f"{len(tensor.axes) - 1} indices for [{', '.join(tensor.axes[:-1])}], got {len(node.indices)}",
                      node.span, hint)
    if tensor.dtype != "float":
        checker.error(f"dot() needs float feature vectors ('{tensor.name}' is {tensor.dtype})", node.span)
    load = tensor.load(*checker.lower_indices(tensor, node.indices))
    if tensor.learnable and not all(arg in (ir.b, ir.h, ir.q, ir.kv) for arg in load.args):
        checker.error(f"a learnable feature vector is read at bare indices: '{tensor.name}' has an index "
                      "expression", node.span, f"read it as {tensor.name}[b, h, q] or {tensor.name}[b, kv], or drop "
                      f"'learnable' from '{tensor.name}'")
    return load, node


BUILTINS: dict[str, Callable[[Expressions, ast.Call], Value]] = {
    **{name: _real(fn) for name, fn in _REAL_FUNCS.items()},
    "abs": Scalar(1, _abs),
    "min": _extremum(sympy.Min),
    "max": _extremum(sympy.Max),
    "clamp": Scalar(3, _clamp),
    "floor": Scalar(1, _floor),
    "ceil": Scalar(1, _ceil),
    "rowmax": _row_stat(ir.RowMax, int_of_int=False),
    "rowsum": _row_stat(ir.RowSum, int_of_int=True),
    "softmax": _softmax,
    "cat": _cat,
    "elu": _elu,
    "unravel": _unravel,
    "dot": _dot,
}
FUNCTIONS = frozenset(BUILTINS)
