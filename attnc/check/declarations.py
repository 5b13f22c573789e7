"""Declarations: `heads`, `param`, `const` and `input` statements, with their types, defaults, shapes
and `where` conditions, lowered to the IR's records (ir.Param, ir.TensorInput)."""

from __future__ import annotations

from dataclasses import replace

import sympy

from .. import ast, ir
from ..errors import Span
from .lower import Expressions
from .scope import AXIS_INDEX, SIZE_DOC, Entry, Kind
from .types import BOOL, DTYPE_TYPE, INT, REAL, Value


class Declarations(Expressions):
    def __init__(self, spec: ast.Spec):
        super().__init__(spec)
        self.heads = {"q": "Hq", "k": "Hk", "v": "Hv"}
        self.consts: dict = {}
        self.params: list[ir.Param] = []
        self.tensors: list[ir.TensorInput] = []
        self.seen: dict[type, Span] = {}  # statement kinds a spec has at most one of: the first one

    def once(self, stmt, keyword_: str):
        if type(stmt) in self.seen:
            first = self.seen[type(stmt)]
            how = {"mask": "combine the conditions with 'and'", "select": "combine keep conditions with 'or'"}.get(
                keyword_, "name intermediate values with 'let'")
            self.error(f"duplicate '{keyword_}' statement (the first is at line {first.line})", stmt.span,
                       f"a spec has at most one '{keyword_}'; {how}")
        self.seen[type(stmt)] = stmt.span

    def stmt_heads(self, stmt: ast.Heads):
        self.once(stmt, "heads")
        seen = set()
        for entry in stmt.entries:
            if entry.role not in ("q", "k", "v"):
                self.error(f"unknown head role '{entry.role}'", entry.span, "roles are q, k and v")
            if entry.role in seen:
                self.error(f"head role '{entry.role}' is given twice", entry.span)
            seen.add(entry.role)
            if isinstance(entry.value, int):
                if entry.value < 1:
                    self.error("a head count must be at least 1", entry.span)
                self.heads[entry.role] = entry.value
                continue
            default = {"q": "Hq", "k": "Hk", "v": "Hv"}[entry.role]
            name = entry.value
            self.heads[entry.role] = name
            if name == default:
                continue
            if name in SIZE_DOC:
                self.error(f"'{name}' is {SIZE_DOC[name]}; it cannot name the {entry.role} heads", entry.span,
                           f"use '{default}' or a new name such as 'H'")
            if name in self.env and self.env[name].kind == Kind.HEAD:
                continue  # the same name for several roles: those head counts must be equal
            self.define(name, entry.span, Entry(Kind.HEAD, entry.span, Value(ir.SIZES[default], INT)))

    def stmt_binding(self, stmt: ast.Binding):
        value = self.lower(stmt.value)
        if stmt.kind == "const":
            self.const(stmt, value)
            return
        if value.uses_score or value.uses_rowstat:
            self.error("a parameter's default cannot depend on the score or on row statistics", stmt.value.span)
        if stmt.type == "bool" or (stmt.type is None and value.type == BOOL):
            if stmt.domain is not None:
                self.error(f"bool param '{stmt.name}' cannot have a 'where' condition", stmt.domain.span,
                           "a bool is true or false; conditions constrain numbers")
            self.bool_param(stmt, value)
            return
        bad = value.expr.free_symbols - set(ir.SIZES.values())
        if bad:
            self.error("a parameter's default may use numbers, constants and sizes (Lq, Lk, B, Hq, ...) only",
                       stmt.value.span)
        declared = stmt.type or ("int" if value.type == INT else "float")
        self.check_declared_type(stmt, declared, value.type)
        assumptions = {"integer": True} if declared == "int" else {"real": True}
        symbol = sympy.Symbol(stmt.name, **assumptions)
        default = sympy.Float(value.expr) if declared == "float" and value.expr.is_Integer else value.expr
        self.define(stmt.name, stmt.span, Entry(Kind.PARAM, stmt.span, Value(symbol, DTYPE_TYPE[declared])))
        domain, text = self.domain(stmt, symbol)
        if domain is not None and default.is_number and domain.subs(symbol, default) is sympy.false:
            self.error(f"the default {float(default) if default.is_Float else default} of param '{stmt.name}' does not meet its condition '{text}'",
                       stmt.value.span)
        self.params.append(ir.Param(stmt.name, declared, default, symbol, domain, text))

    def const(self, stmt: ast.Binding, value: Value):
        if stmt.domain is not None:
            self.error(f"const '{stmt.name}' cannot have a 'where' condition: its value is fixed at build time",
                       stmt.domain.span, "a 'where' condition constrains a param or an input")
        if stmt.type == "bool" or value.type == BOOL:
            self.error(f"const '{stmt.name}' cannot be bool: consts are numbers", stmt.span,
                       f"for a switch write 'param {stmt.name}: bool = true' (a per-call keyword argument)")
        number = self.const_number(stmt, value)
        declared = stmt.type or ("int" if isinstance(number, int) else "float")
        self.check_declared_type(stmt, declared, INT if isinstance(number, int) else REAL)
        number = float(number) if declared == "float" else number
        sym_value = Value(sympy.Integer(number) if declared == "int" else sympy.Float(number), DTYPE_TYPE[declared])
        self.define(stmt.name, stmt.span, Entry(Kind.CONST, stmt.span, sym_value))
        self.consts[stmt.name] = number

    def domain(self, stmt, symbol):
        """`where COND` of a param or an input: a condition of the declared name alone (numbers and
        consts aside), checked by the generated function at every call. (condition, text) or (None, "")."""
        if stmt.domain is None:
            return None, ""
        kind = "param" if isinstance(stmt, ast.Binding) else "input"
        saved = self.env[stmt.name]
        if kind == "input":  # the condition reads the input as one element: a scalar of its type
            self.env[stmt.name] = Entry(Kind.PARAM, stmt.span, Value(symbol, INT if stmt.dtype == "int" else REAL))
        try:
            value = self.lower(stmt.domain)
        finally:
            self.env[stmt.name] = saved
        if value.type != BOOL:
            self.error(f"the 'where' condition of {kind} '{stmt.name}' must be a condition, not a {value.type} value",
                       stmt.domain.span, f"e.g. 'where {stmt.name} > 0'")
        if value.uses_score or value.uses_rowstat or sympy.sympify(value.expr).free_symbols - {symbol}:
            self.error(f"the 'where' condition of {kind} '{stmt.name}' may use only '{stmt.name}', numbers and "
                       "consts", stmt.domain.span)
        if value.expr is sympy.false:
            self.error(f"the 'where' condition of {kind} '{stmt.name}' is never true", stmt.domain.span)
        return value.expr, self._source_text(stmt.domain.span)

    def _source_text(self, span: Span) -> str:
        lines = self.spec.source.split("\n")
        if span.end_line is None or span.end_line != span.line:
            return " ".join(lines[span.line - 1:(span.end_line or span.line)]).strip()
        return lines[span.line - 1][span.column - 1:span.end_column - 1]

    def bool_param(self, stmt: ast.Binding, value: Value):
        """`param flag: bool = true`: a condition chosen per call. Kernels and plans receive it as an
        integer 0 or 1; in expressions it is the condition `flag != 0`."""
        if value.type != BOOL:
            self.error(f"param '{stmt.name}' is declared bool but its default is {value.type}", stmt.value.span,
                       "write true or false")
        if value.expr not in (sympy.true, sympy.false):
            self.error(f"the default of bool param '{stmt.name}' must be true or false", stmt.value.span)
        symbol = sympy.Symbol(stmt.name, integer=True)
        self.define(stmt.name, stmt.span, Entry(Kind.PARAM, stmt.span, Value(sympy.Ne(symbol, 0, evaluate=False), BOOL)))
        self.params.append(ir.Param(stmt.name, "bool", sympy.Integer(1 if value.expr is sympy.true else 0), symbol))

    def check_declared_type(self, stmt: ast.Binding, declared: str, actual: str):
        if declared == "bool":
            self.error(f"{stmt.kind} '{stmt.name}' cannot be bool", stmt.span,
                       "use a bool param (param flag: bool = true), an int (0 or 1), or a mask expression")
        if actual == BOOL:
            self.error(f"{stmt.kind} '{stmt.name}' must be a number, not a condition", stmt.value.span)
        if declared == "int" and actual != INT:
            self.error(f"{stmt.kind} '{stmt.name}' is declared int but its value is real", stmt.value.span,
                       "write an integer, or declare it ': float'")

    def const_number(self, stmt: ast.Binding, value: Value):
        expr = value.expr
        if not (isinstance(expr, sympy.Basic) and expr.is_number) or value.type == BOOL:
            self.error(f"const '{stmt.name}' must be a number known at build time", stmt.value.span,
                       "use numbers and earlier consts only; use 'param' for values given at run time")
        if expr.is_Integer:
            return int(expr)
        try:
            result = complex(sympy.N(expr))
        except (OverflowError, ValueError, TypeError):  # e.g. exp(exp(exp(10))): too large for a float
            result = complex(float("inf"))
        if result.imag != 0 or result.real != result.real or abs(result.real) == float("inf"):
            self.error(f"const '{stmt.name}' is not a finite real number", stmt.value.span)
        return result.real

    def stmt_input(self, stmt: ast.Input):
        if stmt.learnable and stmt.dtype != "float":
            self.error(f"only float inputs can be learnable ('{stmt.name}' is {stmt.dtype})", stmt.span)
        if "Dqk" in stmt.axes:
            self.weights_input(stmt)
            return
        seen = set()
        names, extents = [], []
        for axis in stmt.axes:
            if isinstance(axis, str) and axis in AXIS_INDEX:
                if axis in seen or (axis in ("L", "Lq", "Lk") and seen & {"L"}) or (axis == "L" and seen & {"Lq", "Lk"}):
                    self.error(f"axis '{axis}' appears twice in the shape of '{stmt.name}'", stmt.span)
                seen.add(axis)
                names.append(axis)
                extents.append(None)
                continue
            extent = self.axis_extent(stmt, axis)
            names.append(str(extent))
            extents.append(extent)
        tensor = ir.TensorInput(stmt.name, stmt.dtype, tuple(names), stmt.learnable,
                                ir.tensor_function(stmt.name, stmt.dtype), tuple(extents))
        self.define(stmt.name, stmt.span, Entry(Kind.TENSOR, stmt.span, tensor=tensor))
        self.tensors.append(self.input_domain(stmt, tensor))

    def weights_input(self, stmt: ast.Input):
        """A feature map's weights (linear attention): [Hq, Dqk, F]."""
        const = self.consts.get(stmt.axes[-1])
        if stmt.dtype != "float" or len(stmt.axes) != 3 or stmt.axes[:2] != ("Hq", "Dqk") or not (
                isinstance(const, int) and const >= 1):
            self.error(f"a feature map's weights are declared '{stmt.name}: float[Hq, Dqk, F]' with F an int "
                       "const", stmt.span, "e.g. const F = 32 and input W: float[Hq, Dqk, F] learnable")
        tensor = ir.TensorInput(stmt.name, stmt.dtype, ("Hq", "Dqk", str(const)), stmt.learnable,
                                ir.tensor_function(stmt.name, stmt.dtype),
                                (None, ir.DQK, sympy.Integer(const if isinstance(const, int) else 1)))
        self.define(stmt.name, stmt.span, Entry(Kind.TENSOR, stmt.span, tensor=tensor))
        self.tensors.append(self.input_domain(stmt, tensor))

    def input_domain(self, stmt: ast.Input, tensor: ir.TensorInput) -> ir.TensorInput:
        """The input with its `where` condition, if it has one."""
        if stmt.domain is None:
            return tensor
        if stmt.dtype == "bool":
            self.error(f"bool input '{stmt.name}' cannot have a 'where' condition", stmt.domain.span,
                       "a bool is true or false; conditions constrain numbers")
        domain, text = self.domain(stmt, ir.domain_symbol(stmt.name, stmt.dtype))
        tensor = replace(tensor, domain=domain, domain_text=text)
        self.env[stmt.name].tensor = tensor
        return tensor

    def axis_extent(self, stmt: ast.Input, axis):
        """An axis of a tensor's own (a table or feature axis): its extent, an integer expression of
        numbers, consts, int params and sizes, at least 1."""
        node = ast.Name(stmt.span, axis) if isinstance(axis, str) else axis
        if isinstance(axis, str) and axis not in self.env and axis not in self.failed and not self.defined_later(axis):
            self.error(f"unknown axis '{axis}' in the shape of '{stmt.name}'", stmt.span,
                       "axes are B (batch), Hq (query heads), Lq (queries), Lk (keys), L (queries = keys), "
                       "or the extent of a table axis: an integer expression of consts, int params and sizes")
        value = self.lower(node)
        sizes_params = set(ir.SIZES.values()) | {p.symbol for p in self.params if p.dtype == "int"}
        if value.type != INT or value.uses_score or value.uses_rowstat:
            self.error(f"an axis extent of '{stmt.name}' must be an integer, not {value.type}", node.span)
        expr = sympy.sympify(value.expr)
        if (expr.free_symbols - sizes_params or expr.atoms(sympy.Function)
                or not expr.is_polynomial(*expr.free_symbols)):
            self.error(f"an axis extent of '{stmt.name}' may use + - * of integers, consts, int params and "
                       "sizes (B, Hq, Lq, Lk, ...) only", node.span)
        if expr.is_number and expr < 1:
            self.error(f"an axis extent of '{stmt.name}' must be at least 1, got {expr}", node.span)
        return expr
