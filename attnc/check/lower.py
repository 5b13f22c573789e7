"""Expressions: AST nodes -> sympy IR, each with its type (attnc/check/types.py has the operators'
rules, attnc/check/builtins.py the functions'). Tensor reads are checked against their declared
axes, calls of let functions are expanded in place."""

from __future__ import annotations

import sympy

from .. import ast, ir
from ..errors import Diagnostic, Span, did_you_mean
from .builtins import BUILTINS, FUNCTIONS
from .report import Abort
from .scope import AXIS_DOC, AXIS_INDEX, INDEX_DOC, Entry, Kind, Scope
from .types import BOOL, DTYPE_TYPE, INT, REAL, TypeRules, Value

# the size that bounds each token, batch or head axis: an index expression on it is clamped to it
_AXIS_SIZE = {"B": "B", "Hq": "Hq", "H": "Hq", "Lq": "Lq", "Lk": "Lk", "L": "Lq"}
_TOKEN_AXES = {"Lq", "Lk", "L"}


class Expressions(Scope, TypeRules):
    def __init__(self, spec: ast.Spec):
        super().__init__(spec)
        self.score_stmt = next((st for st in spec.statements if isinstance(st, ast.Score)), None)
        self.score_value = Value(ir.s, REAL)
        self.score = None  # the score statement's expression, once it is lowered
        self.lowering = None  # the statement being checked
        self.features: list = []  # (name, body of ir.FEATURE_X): `feature phi(x) = ...` (linear attention)
        self.in_feature = False  # lowering a feature map's body
        self.vec_dot_span: Span | None = None  # the first dot() of feature vectors (tensor reads)

    def lower(self, node) -> Value:
        return getattr(self, "expr_" + type(node).__name__.lower())(node)

    def lower_int(self, node, what: str) -> Value:
        value = self.lower(node)
        if value.type != INT:
            self.error(f"{what} must be an integer, not {value.type}", node.span)
        return value

    def expr_number(self, node: ast.Number) -> Value:
        text = node.text
        if text.isdigit():
            if int(text) > 2 ** 63 - 1:  # kernels, reference and plans compute in int64
                self.error(f"integer {text} is out of range", node.span,
                           "integers are int64: from -2**63 to 2**63 - 1")
            return Value(sympy.Integer(int(text)), INT)
        number = float(text)
        if number == float("inf"):
            self.error(f"number {text} is too large", node.span)
        return Value(sympy.Float(text), REAL)

    def expr_boollit(self, node: ast.BoolLit) -> Value:
        return Value(sympy.true if node.value else sympy.false, BOOL)

    def expr_neg(self, node: ast.Neg) -> Value:
        return self.negate(node, self.lower(node.operand))

    def expr_not(self, node: ast.Not) -> Value:
        return self.logical_not(node, self.lower(node.operand))

    def expr_boolop(self, node: ast.BoolOp) -> Value:
        return self.boolop(node, self.lower(node.left), self.lower(node.right))

    def expr_compare(self, node: ast.Compare) -> Value:
        return self.compare(node, [self.lower(o) for o in node.operands])

    def expr_ternary(self, node: ast.Ternary) -> Value:
        return self.ternary(node, self.lower(node.cond), self.lower(node.then), self.lower(node.orelse))

    def expr_binop(self, node: ast.BinOp) -> Value:
        return self.binop(node, self.lower(node.left), self.lower(node.right))

    # ---- names ----
    def expr_name(self, node: ast.Name) -> Value:
        name = node.id
        if name == "score":
            return self.score_read(node)
        entry = self.env.get(name)
        if entry is None and name in self.failed:
            raise Abort  # its definition's error is reported already
        if entry is None:
            self.unknown_name(node)
        if entry.kind == Kind.FUNCTION:
            self.error(f"'{name}' is a function; call it as {name}(...)", node.span)
        if entry.kind == Kind.TENSOR:
            axes = ", ".join(entry.tensor.axes)
            self.error(f"tensor '{name}' must be indexed", node.span, f"write {name}[...] with indices for [{axes}]")
        value = entry.value
        uses_score = node.span if (entry.kind == Kind.SCORE or value.uses_score) else None
        uses_rowstat = node.span if (entry.kind == Kind.VISIBLE or value.uses_rowstat) else None
        return Value(value.expr, value.type, uses_score, uses_rowstat)

    def score_read(self, node: ast.Name) -> Value:
        """`score`: the score statement's value, once that statement is checked."""
        if "score" in self.failed:
            raise Abort  # the score statement's error is reported already
        if self.score_stmt is not None and self.score is None and self.lowering is self.score_stmt:
            self.error("the score statement cannot use 'score', which it defines", node.span,
                       "write the score in terms of 's', the raw score")
        if self.score_stmt is not None and self.score is None:
            self.error(f"'score' is used before the score statement at line {self.score_stmt.span.line}",
                       node.span, "move the 'score' statement above this line")
        return Value(self.score_value.expr, REAL, node.span, None)

    def unknown_name(self, node: ast.Name):
        name = node.id
        later = self.defined_later(name)
        if later is not None:
            self.error(f"'{name}' is used before its definition at line {later.line}", node.span,
                       "move the definition above this line")
        if name in FUNCTIONS:
            self.error(f"'{name}' is a function; call it as {name}(...)", node.span)
        if name in ("inf", "nan"):
            self.error(f"'{name}' is not a number of the language", node.span,
                       "a score of -inf is a masked pair: write the condition as 'mask COND' (e.g. "
                       "'mask kv <= q' for 'score s if kv <= q else -inf'); masked pairs never reach the score")
        self.error(f"unknown name '{name}'", node.span, did_you_mean(name, self.all_names()))

    # ---- tensor reads ----
    def expr_index(self, node: ast.Index) -> Value:
        entry = self.env.get(node.tensor)
        if entry is None and node.tensor in self.failed:
            raise Abort  # its definition's error is reported already
        if entry is None or entry.kind != Kind.TENSOR:
            self.not_a_tensor(node, entry)
        tensor = entry.tensor
        if "Dqk" in tensor.axes:
            return self.weight_read(node, tensor)
        if len(node.indices) != len(tensor.axes):
            if len(node.indices) == len(tensor.axes) - 1 and tensor.extents and tensor.extents[-1] is not None:
                self.error(f"'{tensor.name}' read without its last axis (of extent {tensor.axes[-1]}) is a feature vector, "
                           "not a number", node.span,
                           f"use it inside dot(), e.g. dot({tensor.name}[...], kr[b, kv]), or subscript its last "
                           "axis too for one entry")
            self.error(f"'{tensor.name}' has {len(tensor.axes)} axes [{', '.join(tensor.axes)}] but is indexed "
                       f"with {len(node.indices)}", node.span)
        load = tensor.load(*self.lower_indices(tensor, node.indices))
        if tensor.dtype == "bool":
            # a condition: sympy's and/or/not/if take only Booleans, and every printer knows `!=`
            return Value(sympy.Ne(load, 0, evaluate=False), BOOL)
        return Value(load, DTYPE_TYPE[tensor.dtype])

    def not_a_tensor(self, node: ast.Index, entry: Entry | None):
        if entry is None and self.defined_later(node.tensor):
            self.error(f"'{node.tensor}' is used before its definition", node.span)
        if entry is None:
            tensors = [n for n, e in self.env.items() if e.kind == Kind.TENSOR]
            self.error(f"unknown tensor '{node.tensor}'", node.span,
                       did_you_mean(node.tensor, tensors) or "declare it with 'input name: float[...]'")
        self.error(f"'{node.tensor}' is not a tensor input and cannot be indexed", node.span)

    def weight_read(self, node: ast.Index, tensor: ir.TensorInput) -> Value:
        """`W[h]` of a feature map's weights `W: float[Hq, Dqk, F]`: head h's matrix."""
        if not self.in_feature:
            self.error(f"'{tensor.name}' holds a feature map's weights: use it as 'x @ {tensor.name}[h]' inside "
                       "'feature phi(x) = ...'", node.span)
        if not (len(node.indices) == 1 and isinstance(node.indices[0], ast.Name) and node.indices[0].id == "h"):
            self.error(f"a feature map reads '{tensor.name}[h]' (head h's [Dqk, F] matrix)", node.span)
        return Value(ir.feature_weight(tensor.name), REAL)

    def lower_indices(self, tensor: ir.TensorInput, subscripts) -> list:
        """The IR indices of a read of `tensor` with `subscripts` (its first len(subscripts) axes)."""
        indices = []
        extents = tensor.extents or (None,) * len(tensor.axes)
        for axis, extent, idx in zip(tensor.axes, extents, subscripts):
            if extent is not None:
                # a table axis: any integer expression, clamped to the axis (out-of-range reads the edge)
                value = self.index_value(tensor, idx, "use floor(x) or an integer expression")
                indices.append(sympy.Min(sympy.Max(value.expr, 0), extent - 1))
            elif isinstance(idx, ast.Name) and idx.id in AXIS_INDEX[axis]:
                indices.append(ir.INDICES[idx.id])
            else:
                indices.append(self.axis_expression(tensor, axis, idx))
        return indices

    def axis_expression(self, tensor: ir.TensorInput, axis: str, idx) -> sympy.Expr:
        """An index expression on a batch, head or token axis, clamped to the axis; another bare index
        there is a mix-up."""
        want = " or ".join(f"'{a}'" for a in AXIS_INDEX[axis])
        if isinstance(idx, ast.Name) and idx.id in INDEX_DOC:
            # between token axes an index expression may be meant (a query-axis table read at
            # kv - 1); a batch or head axis read at a token index (lens[q]) is a plain mix-up
            hint = ("an index expression (q - 1, kv + 1, ...) is read clamped to the axis"
                    if axis in _TOKEN_AXES and idx.id in ("q", "kv") else
                    f"'{tensor.name}' is declared [{', '.join(tensor.axes)}]: axis {axis} is "
                    f"{AXIS_DOC[axis]}, indexed by {want}, and '{idx.id}' is {INDEX_DOC[idx.id]}")
            self.error(f"axis {axis} of '{tensor.name}' must be indexed by {want}", idx.span, hint)
        value = self.index_value(tensor, idx, f"axis {axis} is usually indexed by {want}")
        size = ir.SIZES[_AXIS_SIZE[axis]]
        return sympy.Min(sympy.Max(value.expr, 0), size - 1)

    def index_value(self, tensor: ir.TensorInput, idx, hint: str) -> Value:
        value = self.lower(idx)
        if value.type != INT:
            self.error(f"an index of '{tensor.name}' must be an integer, not {value.type}", idx.span, hint)
        if value.uses_score or value.uses_rowstat:
            self.error(f"an index of '{tensor.name}' cannot depend on the score or on row statistics", idx.span)
        return value

    # ---- calls ----
    def expr_call(self, node: ast.Call) -> Value:
        func = node.func
        if func in self.functions:
            body = self.functions[func].value
            if isinstance(body, ast.Call) and body.func == "unravel":
                self.error(f"'{func}' gives several coordinates (its body is unravel)", node.span,
                           f"unpack it: let (y, x) = {func}(...)")
            return self.expand(node)
        if func in self.failed:
            raise Abort  # its definition's error is reported already
        if self.is_feature(func):
            self.error(f"feature map '{func}' is used inside dot({func}(q), {func}(k))", node.span)
        builtin = BUILTINS.get(func)
        if builtin is None:
            if self.tensor_named(func) is not None:
                self.error(f"tensor '{func}' is indexed with [...], not called", node.span, f"write {func}[...]")
            self.error(f"unknown function '{func}'", node.span,
                       did_you_mean(func, FUNCTIONS) or "functions: " + ", ".join(sorted(FUNCTIONS)))
        return builtin(self, node)

    def expand(self, call: ast.Call, lower_body=None):
        """A call of a let function: its arguments lowered here, its body lowered with the parameters
        bound to them (so the body's types and rules are checked for these arguments)."""
        fn = self.functions[call.func]
        if call.kwargs:
            self.error(f"{call.func}() takes no keyword arguments", call.span)
        if len(call.args) != len(fn.params):
            n = len(fn.params)
            self.error(f"{call.func}() takes {n} argument{'s' * (n != 1)} ({', '.join(fn.params)}), "
                       f"got {len(call.args)}", call.span, f"'{call.func}' is defined at line {fn.span.line}")
        args = [self.lower(a) for a in call.args]
        saved = {p: self.env.get(p) for p in fn.params}
        for p, v in zip(fn.params, args):
            self.env[p] = Entry(Kind.ARGUMENT, None, v)
        n_errors = len(self.errors)
        try:
            return (lower_body or self.lower)(fn.value)
        finally:
            for p, entry in saved.items():
                if entry is None:
                    self.env.pop(p, None)
                else:
                    self.env[p] = entry
            for i in range(n_errors, len(self.errors)):  # say which call the error came from
                d = self.errors[i]
                where = f"in '{call.func}' called at line {call.span.line}, column {call.span.column}"
                self.errors[i] = Diagnostic(d.message, d.span, f"{d.hint}; {where}" if d.hint else where)
