"""Check an AST and lower it to the IR.

One walk over the statements, in order: names must be defined before they are used (so there are no
cycles), every expression gets a type (bool, int, real), tensors must be indexed with the indices their
declaration names, the mask may not depend on the score or on row statistics, and nothing is defined
twice. Problems are collected and raised together as one `SpecError`.
"""

from __future__ import annotations

import keyword
from dataclasses import dataclass, replace

import sympy
from sympy.core.function import AppliedUndef

from . import ast, ir
from .errors import Diagnostic, Span, SpecError, did_you_mean

# ---- what the language predefines ----
_INDEX_DOC = {"b": "the batch index", "h": "the query head", "q": "the query index", "kv": "the key index"}
_SIZE_DOC = {
    "B": "the batch size",
    "Hq": "the number of query heads",
    "Hk": "the number of key heads",
    "Hv": "the number of value heads",
    "Lq": "the query length",
    "Lk": "the key length",
}
# Axis names a tensor input may declare, and the index that must subscript each.
_AXIS_DOC = {"B": "the batch", "Hq": "the query heads", "H": "the query heads", "Lq": "the queries",
             "Lk": "the keys", "L": "the tokens"}
_AXIS_INDEX = {"B": ("b",), "Hq": ("h",), "H": ("h",), "Lq": ("q",), "Lk": ("kv",), "L": ("q", "kv")}

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
_OTHER_FUNCS = {"abs", "min", "max", "clamp", "floor", "ceil", "rowmax", "rowsum", "softmax", "unravel", "dot", "elu", "cat"}
FUNCTIONS = frozenset(_REAL_FUNCS) | _OTHER_FUNCS

# Names a user may not define: the language's own, Python's keywords, and the generated function's
# own arguments (params and inputs become keyword arguments of it, and of its plan() and mask()).
_GENERATED_ARGS = {"k", "v", "scale", "return_lse", "plan", "layout", "block_m", "block_n", "device",
                   "torch", "triton", "tl", "math", "attnc"}
RESERVED = (
    set(_INDEX_DOC) | set(_SIZE_DOC) | {"s", "score", "visible", "true", "false"} | FUNCTIONS | _GENERATED_ARGS
)

BOOL, INT, REAL = "bool", "int", "real"
# what to write instead of a bitwise operator on conditions
_BOOL_OP_OF = {"&": "'and'", "|": "'or'", "^": "'!=' (exclusive or)"}
_DTYPE_TYPE = {"int": INT, "float": REAL, "bool": BOOL}


@dataclass
class _Value:
    """A lowered expression: its sympy form, type, and where it first touches the score / row stats."""

    expr: object
    type: str
    uses_score: Span | None = None
    uses_rowstat: Span | None = None


@dataclass
class _Entry:
    kind: str  # index | size | score | visible | param | const | tensor | let | head | function | argument
    span: Span | None
    value: _Value | None = None
    tensor: ir.TensorInput | None = None


class _Abort(Exception):
    """Stop lowering one statement after its first error (the error is already recorded)."""


class Checker:
    def __init__(self, spec: ast.Spec):
        self.spec = spec
        self.errors: list[Diagnostic] = []
        self.env: dict[str, _Entry] = {}
        for name in _INDEX_DOC:
            self.env[name] = _Entry("index", None, _Value(ir.INDICES[name], INT))
        for name, sym in ir.SIZES.items():
            self.env[name] = _Entry("size", None, _Value(sym, INT))
        self.env["s"] = _Entry("score", None, _Value(ir.s, REAL))
        self.env["visible"] = _Entry("visible", None, _Value(ir.visible, INT))
        self.score_stmt = next((st for st in spec.statements if isinstance(st, ast.Score)), None)
        self.score_value = _Value(ir.s, REAL)
        self.heads = {"q": "Hq", "k": "Hk", "v": "Hv"}
        self.consts: dict = {}
        self.params: list[ir.Param] = []
        self.tensors: list[ir.TensorInput] = []
        self.lets: list = []
        self.layouts: list[ir.Layout] = []
        self.mask = self.score = self.probs = None
        self.seen: dict[type, Span] = {}
        self.lowering = None  # the statement being checked
        self.failed: set = set()  # names whose definition had an error
        self.functions: dict = {}  # let functions: name -> ast.LetFunc
        self.features: list = []  # (name, body of ir.FEATURE_X): `feature phi(x) = ...` (linear attention)
        self.in_feature = False  # lowering a feature map's body
        self.vec_dot_span: Span | None = None  # the first dot() of feature vectors (tensor reads)

    # ---- reporting ----
    def error(self, message: str, span: Span | None, hint: str | None = None):
        self.errors.append(Diagnostic(message, span, hint))
        raise _Abort

    # ---- driver ----
    def run(self) -> ir.Variant:
        self.check_identifier(self.spec.name, self.spec.name_span, what="variant name", soft=True)
        for stmt in self.spec.statements:
            try:
                self.statement(stmt)
            except _Abort:
                # its names stay undefined: later uses are not reported again as unknown
                if isinstance(stmt, ast.Let):
                    self.failed.update(stmt.names)
                elif isinstance(stmt, ast.Score):
                    self.failed.add("score")
                elif isinstance(stmt, (ast.Binding, ast.Input, ast.LetFunc)):
                    self.failed.add(stmt.name)
        if self.errors:
            raise SpecError(self.errors, self.spec.path, self.spec.source)
        mask = self.mask if self.mask is not None else sympy.true
        score = self.score_value.expr
        probs_written = self.probs is not None
        probs = self.probs if probs_written else softmax_expr(score)
        return ir.Variant(
            name=self.spec.name,
            path=self.spec.path,
            source=self.spec.source,
            heads=dict(self.heads),
            consts=dict(self.consts),
            params=tuple(self.params),
            tensors=tuple(self.tensors),
            lets=tuple(self.lets),
            layouts=tuple(self.layouts),
            mask=mask,
            score=sympy.sympify(score),
            probs=probs,
            probs_written=probs_written,
            features=tuple(self.features),
        )

    def statement(self, stmt):
        self.lowering = stmt
        handler = getattr(self, "stmt_" + type(stmt).__name__.lower())
        handler(stmt)

    def once(self, stmt, keyword_: str):
        if type(stmt) in self.seen:
            first = self.seen[type(stmt)]
            how = "combine the conditions with 'and'" if keyword_ == "mask" else "name intermediate values with 'let'"
            self.error(f"duplicate '{keyword_}' statement (the first is at line {first.line})", stmt.span,
                       f"a spec has at most one '{keyword_}'; {how}")
        self.seen[type(stmt)] = stmt.span

    # ---- names ----
    def check_identifier(self, name: str, span: Span, what: str = "name", soft: bool = False):
        if name.startswith("_"):
            self.errors.append(Diagnostic(f"{what} '{name}' starts with '_', which is reserved", span))
            if not soft:
                raise _Abort
        elif keyword.iskeyword(name):
            self.errors.append(Diagnostic(f"{what} '{name}' is a Python keyword and cannot be used", span))
            if not soft:
                raise _Abort

    def define(self, name: str, span: Span, entry: _Entry):
        self.check_identifier(name, span)
        if name in self.env and self.env[name].span is not None:
            first = self.env[name].span
            self.error(f"'{name}' is already defined at line {first.line}", span)
        if name in RESERVED or name in self.env:
            self.error(f"'{name}' is a built-in name ({_describe_builtin(name)}) and cannot be redefined", span,
                       f"pick another name, e.g. '{name}_'" if not name.startswith("_") else None)
        self.env[name] = entry

    # ---- statements ----
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
            if name in _SIZE_DOC:
                self.error(f"'{name}' is {_SIZE_DOC[name]}; it cannot name the {entry.role} heads", entry.span,
                           f"use '{default}' or a new name such as 'H'")
            if name in self.env and self.env[name].kind == "head":
                continue  # the same name for several roles: those head counts must be equal
            self.define(name, entry.span, _Entry("head", entry.span, _Value(ir.SIZES[default], INT)))

    def stmt_binding(self, stmt: ast.Binding):
        value = self.lower(stmt.value)
        if stmt.kind == "const":
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
            sym_value = _Value(sympy.Integer(number) if declared == "int" else sympy.Float(number), _DTYPE_TYPE[declared])
            self.define(stmt.name, stmt.span, _Entry("const", stmt.span, sym_value))
            self.consts[stmt.name] = number
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
        self.define(stmt.name, stmt.span, _Entry("param", stmt.span, _Value(symbol, _DTYPE_TYPE[declared])))
        domain, text = self.domain(stmt, symbol)
        if domain is not None and default.is_number and domain.subs(symbol, default) is sympy.false:
            self.error(f"the default {float(default) if default.is_Float else default} of param '{stmt.name}' does not meet its condition '{text}'",
                       stmt.value.span)
        self.params.append(ir.Param(stmt.name, declared, default, symbol, domain, text))

    def domain(self, stmt, symbol):
        """`where COND` of a param or an input: a condition of the declared name alone (numbers and
        consts aside), checked by the generated function at every call. (condition, text) or (None, "")."""
        if stmt.domain is None:
            return None, ""
        kind = "param" if isinstance(stmt, ast.Binding) else "input"
        saved = self.env[stmt.name]
        if kind == "input":  # the condition reads the input as one element: a scalar of its type
            self.env[stmt.name] = _Entry("param", stmt.span, _Value(symbol, INT if stmt.dtype == "int" else REAL))
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

    def bool_param(self, stmt: ast.Binding, value: _Value):
        """`param flag: bool = true`: a condition chosen per call. Kernels and plans receive it as an
        integer 0 or 1; in expressions it is the condition `flag != 0`."""
        if value.type != BOOL:
            self.error(f"param '{stmt.name}' is declared bool but its default is {value.type}", stmt.value.span,
                       "write true or false")
        if value.expr not in (sympy.true, sympy.false):
            self.error(f"the default of bool param '{stmt.name}' must be true or false", stmt.value.span)
        symbol = sympy.Symbol(stmt.name, integer=True)
        self.define(stmt.name, stmt.span, _Entry("param", stmt.span, _Value(sympy.Ne(symbol, 0, evaluate=False), BOOL)))
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

    def const_number(self, stmt: ast.Binding, value: _Value):
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
        seen = set()
        if "Dqk" in stmt.axes:  # a feature map's weights (linear attention): [Hq, Dqk, F]
            const = self.consts.get(stmt.axes[-1])
            if stmt.dtype != "float" or len(stmt.axes) != 3 or stmt.axes[:2] != ("Hq", "Dqk") or not (
                    isinstance(const, int) and const >= 1):
                self.error(f"a feature map's weights are declared '{stmt.name}: float[Hq, Dqk, F]' with F an int "
                           "const", stmt.span, "e.g. const F = 32 and input W: float[Hq, Dqk, F] learnable")
            tensor = ir.TensorInput(stmt.name, stmt.dtype, ("Hq", "Dqk", str(const)), stmt.learnable,
                                    ir.tensor_function(stmt.name, stmt.dtype),
                                    (None, ir.DQK, sympy.Integer(const if isinstance(const, int) else 1)))
            self.define(stmt.name, stmt.span, _Entry("tensor", stmt.span, tensor=tensor))
            self.tensors.append(self.input_domain(stmt, tensor))
            return
        names, extents = [], []
        for axis in stmt.axes:
            if isinstance(axis, str) and axis in _AXIS_INDEX:
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
        self.define(stmt.name, stmt.span, _Entry("tensor", stmt.span, tensor=tensor))
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

    def stmt_let(self, stmt: ast.Let):
        if len(stmt.names) == 1:
            value = self.lower(stmt.value)
            self.define(stmt.names[0], stmt.span, _Entry("let", stmt.span, value))
            self.lets.append((stmt.names, value.expr))
            return
        call = stmt.value
        if isinstance(call, ast.Call) and call.func in self.functions:
            coords, extents, index_text = self.expand(call, lambda body: self.unravel_body(body, stmt))
        else:
            coords, extents, index_text = self.unravel_body(call, stmt)
        for name, coord in zip(stmt.names, coords):
            self.define(name, stmt.span, _Entry("let", stmt.span, _Value(coord, INT)))
        self.lets.append((stmt.names, sympy.Tuple(*coords)))
        self.layouts.append(ir.Layout(index_text, stmt.names, tuple(extents), tuple(coords)))

    def unravel_body(self, call, stmt: ast.Let):
        if isinstance(call, ast.Call) and call.func in self.functions:
            return self.expand(call, lambda body: self.unravel_body(body, stmt))
        if not (isinstance(call, ast.Call) and call.func == "unravel"):
            self.error("only unravel(...) can be unpacked into several names", call.span,
                       f"write 'let ({', '.join(stmt.names)}) = unravel(index, ...)'")
        return self.unravel(call, len(stmt.names))

    def stmt_letfunc(self, stmt: ast.LetFunc):
        """`let f(x, y) = body`: the body may use its parameters and anything defined above; it is
        checked for unknown names now and expanded (inlined, with its own checks) at every call."""
        self.check_identifier(stmt.name, stmt.span)
        for i, (param, span) in enumerate(zip(stmt.params, stmt.param_spans)):
            self.check_identifier(param, span, what="parameter")
            if param in stmt.params[:i]:
                self.error(f"parameter '{param}' of '{stmt.name}' is given twice", span)
            if param == stmt.name:
                self.error(f"parameter '{param}' has the name of its function", span)
            # parameters are inlined, never arguments of the generated function: only the language's
            # own names are off limits
            if param in RESERVED - _GENERATED_ARGS or (param in self.env and self.env[param].span is None):
                self.error(f"parameter '{param}' of '{stmt.name}' is a built-in name ({_describe_builtin(param)})",
                           span, f"pick another name, e.g. '{param}_'")
            if param in self.env or param in self.functions:
                first = (self.env[param].span if param in self.env else self.functions[param].span)
                self.error(f"parameter '{param}' of '{stmt.name}' hides '{param}' defined at line {first.line}",
                           span, "give the parameter another name")
        self.names_known(stmt.value, stmt, set(stmt.params))
        self.define(stmt.name, stmt.span, _Entry("function", stmt.span))
        self.functions[stmt.name] = stmt

    def names_known(self, node, stmt: ast.LetFunc, params: set):
        """Report the first unknown name in a let function's body (its own name: recursion)."""
        if isinstance(node, ast.Name):
            name = node.id
            if name in params or name in self.env or name == "score":
                if name in self.functions:
                    self.error(f"'{name}' is a function; call it as {name}(...)", node.span)
                return
            if name == stmt.name:
                self.error(f"'{name}' refers to itself: let functions cannot be recursive", node.span)
            if name in self.failed:
                raise _Abort
            later = self.defined_later(name)
            if later is not None and later is not stmt.span:
                self.error(f"'{name}' is used before its definition at line {later.line}", node.span,
                           "move the definition above this line")
            if name in FUNCTIONS:
                self.error(f"'{name}' is a function; call it as {name}(...)", node.span)
            self.error(f"unknown name '{name}' in the body of '{stmt.name}'", node.span,
                       did_you_mean(name, list(params) + self.all_names()))
        if isinstance(node, ast.Call):
            if node.func == stmt.name:
                self.error(f"'{stmt.name}' calls itself: let functions cannot be recursive", node.span,
                           "write the expansion out, or use a function defined above")
            if node.func not in FUNCTIONS and node.func not in self.functions:
                if node.func in self.failed:
                    raise _Abort
                if node.func in params:
                    self.error(f"parameter '{node.func}' is a value, not a function", node.span)
                later = self.defined_later(node.func)
                if later is not None:
                    self.error(f"function '{node.func}' is used before its definition at line {later.line}",
                               node.span, "move the definition above this line")
                self.error(f"unknown function '{node.func}'", node.span,
                           did_you_mean(node.func, list(FUNCTIONS) + list(self.functions)))
        if isinstance(node, ast.Index) and node.tensor not in self.env:
            if node.tensor in self.failed:
                raise _Abort
            self.error(f"unknown tensor '{node.tensor}'", node.span)
        for child in _children(node):
            self.names_known(child, stmt, params)

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
            self.env[p] = _Entry("argument", None, v)
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

    def unravel(self, call: ast.Call, n_names: int):
        if call.kwargs:
            self.error("unravel takes no keyword arguments", call.span)
        if len(call.args) != n_names + 1:
            self.error(f"unravel into {n_names} names needs an index and {n_names} extents, "
                       f"got {len(call.args)} argument(s)", call.span)
        index = self.lower_int(call.args[0], "the index of unravel")
        extents = [self.lower_int(a, "an extent of unravel") for a in call.args[1:]]
        for arg, ext in zip(call.args[1:], extents):
            if ext.expr.free_symbols & {ir.q, ir.kv, ir.b, ir.h}:
                self.error("an extent of unravel cannot depend on an index", arg.span)
            if ext.expr.is_number and ext.expr < 1:
                self.error("an extent of unravel must be at least 1", arg.span)
        coords = []
        stride = sympy.Integer(1)
        for ext in reversed(extents):
            coords.append(ir.FloorDiv(index.expr, stride) if stride != 1 else index.expr)
            stride = stride * ext.expr
        # row-major: the last coordinate varies fastest; the first is not wrapped (it absorbs the rest)
        coords = [sympy.Mod(c, ext.expr) for c, ext in zip(coords, reversed(extents))][:-1] + [coords[-1]]
        coords.reverse()
        index_text = {ir.q: "q", ir.kv: "kv"}.get(index.expr, str(index.expr))
        return coords, [e.expr for e in extents], index_text

    def stmt_mask(self, stmt: ast.Mask):
        self.once(stmt, "mask")
        value = self.lower(stmt.value)
        if value.type != BOOL:
            self.error(f"the mask must be a condition (bool), not {value.type}", stmt.value.span,
                       "compare with <, <=, ==, ... and combine with and, or, not")
        if value.uses_score and sympy.sympify(value.expr).atoms(ir.VecDot):
            self.error("the mask cannot use dot() of feature vectors (a per-pair score term)", value.uses_score,
                       "put it in 'score' or 'probs'")
        if value.uses_score:
            self.error("the mask cannot depend on the score", value.uses_score,
                       "put score-dependent terms in 'score' or 'probs'")
        if value.uses_rowstat:
            self.error("the mask cannot depend on row statistics", value.uses_rowstat)
        self.mask = value.expr

    def stmt_feature(self, stmt: ast.Feature):
        """`feature phi(x) = EXPR`: a map applied to every element of a head vector (docs/linear.md)."""
        self.check_identifier(stmt.name, stmt.span)
        if stmt.arg in self.env or stmt.arg in RESERVED:
            self.error(f"the argument of feature '{stmt.name}' must be a new name, not '{stmt.arg}'", stmt.span,
                       f"write 'feature {stmt.name}(x) = ...'")
        if self.vec_dot_span is not None:
            self.error("feature maps (linear attention) cannot be combined with dot() of feature vectors "
                       f"(line {self.vec_dot_span.line})", stmt.span)
        self.env[stmt.arg] = _Entry("let", stmt.span, _Value(ir.FEATURE_X, REAL))
        self.in_feature = True
        try:
            value = self.lower(stmt.value)
        finally:
            self.in_feature = False
            del self.env[stmt.arg]
        if value.type == BOOL:
            self.error(f"feature '{stmt.name}' must be a number, not a condition", stmt.value.span)
        extra = {x for x in sympy.sympify(value.expr).free_symbols - {ir.FEATURE_X} if not x.name.startswith("_fw_")}
        if extra or value.uses_score or value.uses_rowstat or sympy.sympify(value.expr).atoms(AppliedUndef):
            self.error(f"feature '{stmt.name}' may use only its argument '{stmt.arg}', numbers and consts",
                       stmt.value.span, "a feature map acts on each element of one head vector")
        self.define(stmt.name, stmt.span, _Entry("feature", stmt.span, _Value(value.expr, REAL)))
        self.features.append((stmt.name, value.expr))

    def call_dot(self, node: ast.Call) -> _Value:
        """`dot(phi(q), phi(k))`: the dot product of the query's and the key's feature vectors."""
        if len(node.args) == 2 and any(isinstance(a, ast.Index) for a in node.args):
            return self.dot_vectors(node)
        hint = "write dot(phi(q), phi(k)) with a map declared by 'feature phi(x) = ...'"
        if len(node.args) != 2 or node.kwargs:
            self.error(f"dot() takes 2 arguments, got {len(node.args)}", node.span, hint)
        names = []
        for arg, role in zip(node.args, ("q", "k")):
            entry = self.env.get(arg.func) if isinstance(arg, ast.Call) else None
            if entry is None or entry.kind != "feature" or len(arg.args) != 1 or not (
                    isinstance(arg.args[0], ast.Name) and arg.args[0].id == role):
                self.error(f"argument {1 + (role == 'k')} of dot() must be a feature map of '{role}'", arg.span, hint)
            names.append(arg.func)
        # untied maps (Hedgehog's separate query and key maps) factorize alike: phi_q(q) . phi_k(k)
        return _Value(ir.feature_dot(*names), REAL, node.span, None)

    def dot_vectors(self, node: ast.Call) -> _Value:
        """`dot(qr[b, h, q], kr[b, kv])`: the inner product over the feature axis (the last) of a vector
        read once per query and a vector read once per key (DeepSeek MLA's decoupled rotary part)."""
        if node.kwargs:
            self.error("dot() takes no keyword arguments", node.span)
        if self.in_feature:
            self.error("dot() of feature vectors cannot be used inside a feature map", node.span)
        if self.features:
            self.error("dot() of feature vectors cannot be combined with feature maps (linear attention)",
                       node.span, "use either 'feature phi(x) = ...' with dot(phi(q), phi(k)) or tensor vectors")
        reads = [self.vector_read(arg) for arg in node.args]
        for load, arg in reads:
            uses_q, uses_kv = ir.q in load.free_symbols, ir.kv in load.free_symbols
            if uses_q and uses_kv:
                self.error(f"the feature vector '{arg.tensor}[...]' is read at both q and kv; dot() takes one "
                           "vector per query and one per key", arg.span,
                           "index the query-side vector by q (not kv) and the key-side vector by kv (not q)")
            if not (uses_q or uses_kv):
                self.error(f"the feature vector '{arg.tensor}[...]' must be read at q (one vector per query) or "
                           "at kv (one per key)", arg.span)
        sides = [ir.kv in load.free_symbols for load, _ in reads]
        if sides[0] == sides[1]:
            which = "key-side vectors (both read at kv)" if sides[0] else "query-side vectors (both read at q)"
            self.error(f"dot() of two {which}", node.span,
                       "one argument is read per query (at q), the other per key (at kv): "
                       "dot(qr[b, h, q], kr[b, kv])")
        (qload, qarg), (kload, karg) = reads if not sides[0] else reads[::-1]
        qlen = self.env[qarg.tensor].tensor.extents[-1]
        klen = self.env[karg.tensor].tensor.extents[-1]
        if sympy.simplify(qlen - klen) != 0:
            self.error(f"the feature vectors of dot() have different lengths: {qlen} ('{qarg.tensor}') and "
                       f"{klen} ('{karg.tensor}')", node.span, "declare both feature axes with the same extent")
        self.vec_dot_span = self.vec_dot_span or node.span
        return _Value(ir.VecDot(qload, kload, qlen), REAL, node.span, None)

    def vector_read(self, node) -> tuple:
        """One argument of dot() over a feature axis: a tensor read with every axis but its last."""
        hint = "e.g. dot(qr[b, h, q], kr[b, kv]) for inputs qr: float[B, Hq, Lq, R] and kr: float[B, Lk, R]"
        if not isinstance(node, ast.Index):
            self.error("an argument of dot() over a feature axis must be a tensor read with every axis but its "
                       "last subscripted", node.span, hint)
        entry = self.env.get(node.tensor)
        if entry is None or entry.kind != "tensor" or "Dqk" in entry.tensor.axes:
            self.expr_index(node)  # reports the unknown or misused tensor
        tensor = entry.tensor
        extents = tensor.extents or (None,) * len(tensor.axes)
        if extents[-1] is None:
            self.error(f"'{tensor.name}' has no feature axis: its last axis {tensor.axes[-1]} is not an extent",
                       node.span, "declare the feature axis last, e.g. input kr: float[B, Lk, R] with const R = 64")
        if len(node.indices) != len(tensor.axes) - 1:
            self.error(f"a feature vector of '{tensor.name}' subscripts every axis but the last: "
                       f"{len(tensor.axes) - 1} indices for [{', '.join(tensor.axes[:-1])}], got {len(node.indices)}",
                       node.span, hint)
        if tensor.dtype != "float":
            self.error(f"dot() needs float feature vectors ('{tensor.name}' is {tensor.dtype})", node.span)
        load = tensor.load(*self.lower_indices(tensor, node.indices))
        if tensor.learnable and not all(arg in (ir.b, ir.h, ir.q, ir.kv) for arg in load.args):
            self.error(f"a learnable feature vector is read at bare indices: '{tensor.name}' has an index "
                       "expression", node.span, f"read it as {tensor.name}[b, h, q] or {tensor.name}[b, kv], or drop "
                       f"'learnable' from '{tensor.name}'")
        return load, node

    def stmt_score(self, stmt: ast.Score):
        self.once(stmt, "score")
        value = self.lower(stmt.value)
        if value.type == BOOL:
            self.error("the score must be a number, not a condition", stmt.value.span,
                       "use 'x if cond else y' to choose between numbers")
        if value.uses_rowstat:
            self.error("the score cannot use row statistics; use them in 'probs'", value.uses_rowstat)
        self.score_value = _Value(value.expr, REAL, value.uses_score, None)
        self.score = value.expr

    def stmt_probs(self, stmt: ast.Probs):
        self.once(stmt, "probs")
        value = self.lower(stmt.value)
        if value.type == BOOL:
            self.error("probs must be a number, not a condition", stmt.value.span)
        if not value.uses_score:
            self.error("probs does not depend on the score", stmt.value.span,
                       "write the weights as a function of 'score', e.g. softmax(score)")
        self.probs = value.expr

    # ---- expressions ----
    def lower_int(self, node, what: str) -> _Value:
        value = self.lower(node)
        if value.type != INT:
            self.error(f"{what} must be an integer, not {value.type}", node.span)
        return value

    def lower(self, node) -> _Value:
        return getattr(self, "expr_" + type(node).__name__.lower())(node)

    def expr_number(self, node: ast.Number) -> _Value:
        text = node.text
        if text.isdigit():
            if int(text) > 2 ** 63 - 1:  # kernels, reference and plans compute in int64
                self.error(f"integer {text} is out of range", node.span,
                           "integers are int64: from -2**63 to 2**63 - 1")
            return _Value(sympy.Integer(int(text)), INT)
        number = float(text)
        if number == float("inf"):
            self.error(f"number {text} is too large", node.span)
        return _Value(sympy.Float(text), REAL)

    def expr_boollit(self, node: ast.BoolLit) -> _Value:
        return _Value(sympy.true if node.value else sympy.false, BOOL)

    def expr_name(self, node: ast.Name) -> _Value:
        name = node.id
        if name == "score":
            if "score" in self.failed:
                raise _Abort  # the score statement's error is reported already
            if self.score_stmt is not None and self.score is None and self.lowering is self.score_stmt:
                self.error("the score statement cannot use 'score', which it defines", node.span,
                           "write the score in terms of 's', the raw score")
            if self.score_stmt is not None and self.score is None:
                self.error(f"'score' is used before the score statement at line {self.score_stmt.span.line}",
                           node.span, "move the 'score' statement above this line")
            v = self.score_value
            return _Value(v.expr, REAL, node.span, None)
        entry = self.env.get(name)
        if entry is None and name in self.failed:
            raise _Abort  # its definition's error is reported already
        if entry is None:
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
        if entry.kind == "function":
            self.error(f"'{name}' is a function; call it as {name}(...)", node.span)
        if entry.kind == "tensor":
            axes = ", ".join(entry.tensor.axes)
            self.error(f"tensor '{name}' must be indexed", node.span, f"write {name}[...] with indices for [{axes}]")
        value = entry.value
        uses_score = node.span if (entry.kind == "score" or value.uses_score) else None
        uses_rowstat = node.span if (entry.kind == "visible" or value.uses_rowstat) else None
        return _Value(value.expr, value.type, uses_score, uses_rowstat)

    def all_names(self) -> list[str]:
        """Every name the spec could mean: defined so far, defined anywhere in the file, and built in."""
        names = list(self.env) + ["score"]
        for stmt in self.spec.statements:
            if isinstance(stmt, ast.Let):
                names.extend(stmt.names)
            elif isinstance(stmt, (ast.Binding, ast.Input, ast.LetFunc)):
                names.append(stmt.name)
        return names

    def defined_later(self, name: str) -> Span | None:
        for stmt in self.spec.statements:
            names = ()
            if isinstance(stmt, ast.Let):
                names = stmt.names
            elif isinstance(stmt, (ast.Binding, ast.Input, ast.LetFunc)):
                names = (stmt.name,)
            if name in names:
                return stmt.span
        return None

    def expr_index(self, node: ast.Index) -> _Value:
        entry = self.env.get(node.tensor)
        if entry is None and node.tensor in self.failed:
            raise _Abort  # its definition's error is reported already
        if entry is None or entry.kind != "tensor":
            if entry is None and self.defined_later(node.tensor):
                self.error(f"'{node.tensor}' is used before its definition", node.span)
            if entry is None:
                tensors = [n for n, e in self.env.items() if e.kind == "tensor"]
                self.error(f"unknown tensor '{node.tensor}'", node.span,
                           did_you_mean(node.tensor, tensors) or "declare it with 'input name: float[...]'")
            self.error(f"'{node.tensor}' is not a tensor input and cannot be indexed", node.span)
        tensor = entry.tensor
        if "Dqk" in tensor.axes:
            if not self.in_feature:
                self.error(f"'{tensor.name}' holds a feature map's weights: use it as 'x @ {tensor.name}[h]' inside "
                           "'feature phi(x) = ...'", node.span)
            if not (len(node.indices) == 1 and isinstance(node.indices[0], ast.Name) and node.indices[0].id == "h"):
                self.error(f"a feature map reads '{tensor.name}[h]' (head h's [Dqk, F] matrix)", node.span)
            return _Value(ir.feature_weight(tensor.name), REAL)
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
            return _Value(sympy.Ne(load, 0, evaluate=False), BOOL)
        return _Value(load, _DTYPE_TYPE[tensor.dtype])

    def lower_indices(self, tensor: ir.TensorInput, subscripts) -> list:
        """The IR indices of a read of `tensor` with `subscripts` (its first len(subscripts) axes)."""
        indices = []
        extents = tensor.extents or (None,) * len(tensor.axes)
        for axis, extent, idx in zip(tensor.axes, extents, subscripts):
            if extent is not None:
                # a table axis: any integer expression, clamped to the axis (out-of-range reads the edge)
                value = self.lower(idx)
                if value.type != INT:
                    self.error(f"an index of '{tensor.name}' must be an integer, not {value.type}", idx.span,
                               "use floor(x) or an integer expression")
                if value.uses_score or value.uses_rowstat:
                    self.error(f"an index of '{tensor.name}' cannot depend on the score or on row statistics",
                               idx.span)
                indices.append(sympy.Min(sympy.Max(value.expr, 0), extent - 1))
                continue
            allowed = _AXIS_INDEX[axis]
            if not (isinstance(idx, ast.Name) and idx.id in allowed):
                want = " or ".join(f"'{a}'" for a in allowed)
                if isinstance(idx, ast.Name) and idx.id in _INDEX_DOC:  # another bare index: a mix-up
                    # between token axes an index expression may be meant (a query-axis table read at
                    # kv - 1); a batch or head axis read at a token index (lens[q]) is a plain mix-up
                    token_axes = {"Lq", "Lk", "L"}
                    hint = ("an index expression (q - 1, kv + 1, ...) is read clamped to the axis"
                            if axis in token_axes and idx.id in ("q", "kv") else
                            f"'{tensor.name}' is declared [{', '.join(tensor.axes)}]: axis {axis} is "
                            f"{_AXIS_DOC[axis]}, indexed by {want}, and '{idx.id}' is {_INDEX_DOC[idx.id]}")
                    self.error(f"axis {axis} of '{tensor.name}' must be indexed by {want}", idx.span, hint)
                value = self.lower(idx)
                if value.type != INT:
                    self.error(f"an index of '{tensor.name}' must be an integer, not {value.type}", idx.span,
                               f"axis {axis} is usually indexed by {want}")
                if value.uses_score or value.uses_rowstat:
                    self.error(f"an index of '{tensor.name}' cannot depend on the score or on row statistics",
                               idx.span)
                # another index expression on a batch, head or token axis: clamped to the axis too
                size = ir.SIZES[{"B": "B", "Hq": "Hq", "H": "Hq", "Lq": "Lq", "Lk": "Lk", "L": "Lq"}[axis]]
                indices.append(sympy.Min(sympy.Max(value.expr, 0), size - 1))
                continue
            indices.append(ir.INDICES[idx.id])
        return indices

    def expr_neg(self, node: ast.Neg) -> _Value:
        v = self.lower(node.operand)
        self.need_number(v, node.operand, "'-'")
        return _Value(-v.expr, v.type, v.uses_score, v.uses_rowstat)

    def expr_not(self, node: ast.Not) -> _Value:
        v = self.lower(node.operand)
        if v.type != BOOL:
            self.error(f"'not' needs a condition, not {v.type}", node.operand.span)
        return _Value(sympy.Not(v.expr), BOOL, v.uses_score, v.uses_rowstat)

    def expr_boolop(self, node: ast.BoolOp) -> _Value:
        left, right = self.lower(node.left), self.lower(node.right)
        for side, v in ((node.left, left), (node.right, right)):
            if v.type != BOOL:
                self.error(f"'{node.op}' needs conditions on both sides, not {v.type}", side.span)
        fn = sympy.And if node.op == "and" else sympy.Or
        return _merge(fn(left.expr, right.expr), BOOL, left, right)

    def expr_compare(self, node: ast.Compare) -> _Value:
        values = [self.lower(o) for o in node.operands]
        parts = []
        for (a, av), op, (b, bv) in zip(zip(node.operands, values), node.ops, zip(node.operands[1:], values[1:])):
            if op in ("==", "!=") and av.type == BOOL and bv.type == BOOL:
                # written with and/or/not, which every printer (Triton, torch, intervals) has
                x, y = av.expr, bv.expr
                same = sympy.Or(sympy.And(x, y), sympy.And(sympy.Not(x), sympy.Not(y)))
                differ = sympy.Or(sympy.And(x, sympy.Not(y)), sympy.And(sympy.Not(x), y))
                parts.append(same if op == "==" else differ)
                continue
            if (av.type == BOOL) != (bv.type == BOOL) and op in ("==", "!="):
                self.error(f"'{op}' compares two conditions or two numbers, not a condition with a number",
                           node.span, "use 'x if cond else y' to turn a condition into a number")
            self.need_number(av, a, f"'{op}'")
            self.need_number(bv, b, f"'{op}'")
            rel = {"<": sympy.Lt, "<=": sympy.Le, ">": sympy.Gt, ">=": sympy.Ge, "==": sympy.Eq, "!=": sympy.Ne}[op]
            parts.append(rel(av.expr, bv.expr))
        return _merge(sympy.And(*parts), BOOL, *values)

    def expr_ternary(self, node: ast.Ternary) -> _Value:
        cond, then, orelse = self.lower(node.cond), self.lower(node.then), self.lower(node.orelse)
        if cond.type != BOOL:
            self.error(f"the condition of 'if' must be a condition, not {cond.type}", node.cond.span)
        if (then.type == BOOL) != (orelse.type == BOOL):
            self.error("both branches of 'if ... else' must be numbers, or both conditions", node.span)
        rtype = BOOL if then.type == BOOL else (INT if then.type == orelse.type == INT else REAL)
        if rtype == BOOL:
            expr = sympy.Or(sympy.And(cond.expr, then.expr), sympy.And(sympy.Not(cond.expr), orelse.expr))
        else:
            expr = sympy.Piecewise((then.expr, cond.expr), (orelse.expr, True))
        return _merge(expr, rtype, cond, then, orelse)

    def need_number(self, v: _Value, node, what: str):
        if v.type == BOOL:
            self.error(f"{what} needs a number, but this is a condition", node.span,
                       "use 'x if cond else y' to turn a condition into a number")

    def expr_binop(self, node: ast.BinOp) -> _Value:
        left, right = self.lower(node.left), self.lower(node.right)
        op = node.op
        weights = [x for x in sympy.sympify(left.expr).free_symbols | sympy.sympify(right.expr).free_symbols
                   if x.name.startswith("_fw_")]
        # a product already formed (`x @ W[h]`) is a vector like any other: `2 * (x @ W[h])` scales it
        # elementwise; only a bare W[h] outside '@' is misused
        bare = [w for w in weights if any(w in sympy.sympify(e).xreplace(
            {m: sympy.Dummy() for m in sympy.sympify(e).atoms(ir.FMatMul)}).free_symbols
            for e in (left.expr, right.expr))]
        if op == "@" or bare:
            if not self.in_feature:
                self.error("'@' multiplies a head vector by a feature map's weights, inside 'feature phi(x) = ...'",
                           node.span)
            if op != "@" or not (right.expr.is_Symbol and right.expr.name.startswith("_fw_")) or (
                    sympy.sympify(left.expr).free_symbols & set(weights)):
                self.error("a feature map's weights are used as 'v @ W[h]' (v a vector of length Dqk)", node.span)
            return _merge(ir.FMatMul(left.expr, right.expr), REAL, left, right)
        if op in _BOOL_OP_OF:  # `(kv <= q) & (q - kv < 8)`: FlexAttention's way of combining conditions
            for side, v in ((node.left, left), (node.right, right)):
                if v.type == BOOL:
                    self.error(f"'{op}' needs a number, but this is a condition", side.span,
                               f"to combine conditions write {_BOOL_OP_OF[op]}")
        self.need_number(left, node.left, f"'{op}'")
        self.need_number(right, node.right, f"'{op}'")
        both_int = left.type == INT and right.type == INT
        a, c = left.expr, right.expr
        if op in ("&", "|", "^", "<<"):
            for side, v in ((node.left, left), (node.right, right)):
                if v.type != INT:
                    self.error(f"'{op}' needs integers, but this is real", side.span,
                               "bitwise operators work on integers; use floor(x) to get one")
            if op == "<<":
                if not (c.is_Integer and 0 <= int(c) <= 62):
                    self.error("the shift count of '<<' must be an integer from 0 to 62 known at build time "
                               "(a number or a const)", node.right.span, "for a count known at run time write a * 2 ** n")
                return _merge(ir.LShift(a, c), INT, left, right)
            fn = {"&": ir.BitAnd, "|": ir.BitOr, "^": ir.BitXor}[op]
            return _merge(fn(a, c), INT, left, right)
        if op in ("//", "%", ">>"):
            for side, v in ((node.left, left), (node.right, right)):
                if v.type != INT:
                    alt = {"//": "floor(a / b)", "%": "a - floor(a / b) * b", ">>": "floor(a / 2 ** n)"}[op]
                    self.error(f"'{op}' needs integers, but this is real", side.span, f"for reals write {alt}")
            if c.is_number and c == 0 and op != ">>":
                self.error(f"division by zero in '{op}'", node.right.span)
            if op == ">>":
                c = self.shift_count(c, node.right)
            expr = {"//": lambda: ir.FloorDiv(a, c), "%": lambda: sympy.Mod(a, c), ">>": lambda: ir.RShift(a, c)}[op]()
            return _merge(expr, INT, left, right)
        if op == "/":
            if c.is_number and c == 0:
                self.error("division by zero", node.right.span)
            return _merge(a / c, REAL, left, right)
        if op == "**":
            int_result = both_int and c.is_nonnegative is True
            if a.is_number and a == 0 and c.is_number and c < 0:
                self.error("0 raised to a negative power", node.span)
            return _merge(sympy.Pow(a, c), INT if int_result else REAL, left, right)
        expr = {"+": a + c, "-": a - c, "*": a * c}[op]
        return _merge(expr, INT if both_int else REAL, left, right)

    def shift_count(self, c, node):
        """The count of `a >> n`, clamped to [0, 62]: a count past 62 shifts every int64 to 0 or -1,
        exactly as 62 does, and a negative count (known only at run time) is taken as 0."""
        if c.is_Integer and c < 0:
            self.error("the shift count of '>>' is negative", node.span, "for a * 2 ** n write a << n")
        if c.is_nonnegative is not True:
            c = sympy.Max(c, 0)
        if not ((c.is_Integer and c <= 62) or isinstance(c, ir.FloorLog2)):
            c = sympy.Min(c, 62)
        return c

    def expr_call(self, node: ast.Call) -> _Value:
        func = node.func
        if func in self.functions:
            body = self.functions[func].value
            if isinstance(body, ast.Call) and body.func == "unravel":
                self.error(f"'{func}' gives several coordinates (its body is unravel)", node.span,
                           f"unpack it: let (y, x) = {func}(...)")
            return self.expand(node)
        if func in self.failed:
            raise _Abort  # its definition's error is reported already
        entry = self.env.get(func)
        if entry is not None and entry.kind == "feature":
            self.error(f"feature map '{func}' is used inside dot({func}(q), {func}(k))", node.span)
        if func == "dot":
            return self.call_dot(node)
        if func == "elu":
            if not self.in_feature:
                self.error("elu() is a feature-map function: use it inside 'feature phi(x) = ...'", node.span)
            if len(node.args) != 1 or node.kwargs:
                self.error(f"elu() takes 1 argument, got {len(node.args)}", node.span)
            x = self.lower(node.args[0])
            self.need_number(x, node.args[0], "elu()")
            return _merge(sympy.Piecewise((x.expr, x.expr > 0), (sympy.exp(x.expr) - 1, True)), REAL, x)
        if func not in FUNCTIONS:
            entry = self.env.get(func)
            if entry is not None and entry.kind == "tensor":
                self.error(f"tensor '{func}' is indexed with [...], not called", node.span, f"write {func}[...]")
            self.error(f"unknown function '{func}'", node.span,
                       did_you_mean(func, FUNCTIONS) or "functions: " + ", ".join(sorted(FUNCTIONS)))
        if func == "unravel":
            self.error("unravel(...) gives several coordinates", node.span,
                       "unpack it: let (y, x) = unravel(q, Y, X)")
        if func in ("softmax", "cat") and self.in_feature:  # vectors: over the feature axis
            if node.kwargs or not node.args or (func == "softmax" and len(node.args) != 1):
                self.error(f"in a feature map, {func}() takes {'1 vector' if func == 'softmax' else 'vectors'}",
                           node.span)
            args = [self.lower(a) for a in node.args]
            fn = ir.FSoftmax if func == "softmax" else ir.FCat
            return _merge(fn(*[a.expr for a in args]), REAL, *args)
        if func == "cat":
            self.error("cat() joins feature vectors: use it inside 'feature phi(x) = ...'", node.span)
        if func == "softmax":
            return self.call_softmax(node)
        if node.kwargs:
            self.error(f"{func}() takes no keyword arguments", node.span)
        args = [self.lower(a) for a in node.args]
        for arg_node, v in zip(node.args, args):
            self.need_number(v, arg_node, f"{func}()")
        arity = {"min": None, "max": None, "clamp": 3}.get(func, 1)
        if arity is None and len(args) < 2:
            self.error(f"{func}() needs at least 2 arguments, got {len(args)}", node.span)
        if arity is not None and len(args) != arity:
            self.error(f"{func}() takes {arity} argument{'s' * (arity > 1)}, got {len(args)}", node.span)
        exprs = [a.expr for a in args]
        all_int = all(a.type == INT for a in args)
        if func in _REAL_FUNCS:
            if func == "log2":
                return _merge(ir.Log2(exprs[0]), REAL, *args)
            return _merge(_REAL_FUNCS[func](exprs[0]), REAL, *args)
        if func == "abs":
            return _merge(sympy.Abs(exprs[0]), args[0].type, *args)
        if func in ("min", "max"):
            return _merge((sympy.Min if func == "min" else sympy.Max)(*exprs), INT if all_int else REAL, *args)
        if func == "clamp":
            return _merge(sympy.Min(sympy.Max(exprs[0], exprs[1]), exprs[2]), INT if all_int else REAL, *args)
        if func in ("floor", "ceil"):
            inner = node.args[0]
            if func == "floor" and isinstance(inner, ast.Call) and inner.func == "log2" and len(inner.args) == 1:
                x = self.lower(inner.args[0])
                if x.type == INT:  # exact integer log: no float rounding near powers of two
                    return _merge(ir.FloorLog2(x.expr), INT, x)
            return _merge((sympy.floor if func == "floor" else sympy.ceiling)(exprs[0]), INT, *args)
        # rowmax / rowsum (a row-constant argument is legal: rowsum(1) counts keys)
        value = args[0]
        stat = (ir.RowMax if func == "rowmax" else ir.RowSum)(value.expr)
        return _Value(stat, REAL if func == "rowmax" or value.type == REAL else INT, value.uses_score, node.span)

    def call_softmax(self, node: ast.Call) -> _Value:
        if len(node.args) != 1:
            self.error(f"softmax() takes 1 argument (the logits), got {len(node.args)}", node.span)
        sink = None
        for name, kw in node.kwargs:
            if name != "sink":
                self.error(f"softmax() has no argument '{name}'", kw.span, "its only keyword is sink=<logit>")
            if sink is not None:
                self.error("softmax() is given sink= twice", kw.span)
            sink = self.lower(kw)
            self.need_number(sink, kw, "sink=")
            if sink.uses_score or sink.uses_rowstat or ir.kv in sink.expr.free_symbols:
                self.error("a sink logit must be constant along the row (no score, no 'kv')", kw.span)
        logits = self.lower(node.args[0])
        self.need_number(logits, node.args[0], "softmax()")
        if logits.uses_rowstat:
            self.error("softmax() logits cannot use row statistics", logits.uses_rowstat)
        return _Value(softmax_expr(logits.expr, None if sink is None else sink.expr), REAL,
                      logits.uses_score or node.span, node.span)


def softmax_expr(logits, sink=None):
    """softmax as row statistics: exp(x - rowmax(x)) / (rowsum(exp(x - rowmax(x))) [+ exp(sink - rowmax(x))])."""
    m = ir.RowMax(logits)
    denominator = ir.RowSum(sympy.exp(logits - m))
    if sink is not None:
        denominator = denominator + sympy.exp(sink - m)
    return sympy.exp(logits - m) / denominator


def _children(node) -> tuple:
    """The sub-expressions of an AST expression."""
    if isinstance(node, ast.Call):
        return tuple(node.args) + tuple(v for _, v in node.kwargs)
    if isinstance(node, ast.Index):
        return tuple(node.indices)
    if isinstance(node, (ast.BinOp, ast.BoolOp)):
        return (node.left, node.right)
    if isinstance(node, (ast.Neg, ast.Not)):
        return (node.operand,)
    if isinstance(node, ast.Compare):
        return tuple(node.operands)
    if isinstance(node, ast.Ternary):
        return (node.then, node.cond, node.orelse)
    return ()


def _merge(expr, type_, *values: _Value) -> _Value:
    uses_score = next((v.uses_score for v in values if v.uses_score), None)
    uses_rowstat = next((v.uses_rowstat for v in values if v.uses_rowstat), None)
    return _Value(expr, type_, uses_score, uses_rowstat)


def _describe_builtin(name: str) -> str:
    if name in _INDEX_DOC:
        return _INDEX_DOC[name]
    if name in _SIZE_DOC:
        return _SIZE_DOC[name]
    if name in FUNCTIONS:
        return "a function"
    if name in _GENERATED_ARGS:
        return "an argument of the generated function or of its plan()"
    return {"s": "the raw score", "score": "the transformed score", "visible": "the number of visible keys"}.get(
        name, "reserved")


def check(spec: ast.Spec) -> ir.Variant:
    """Check a parsed spec and lower it to the IR; raise `SpecError` listing every problem found."""
    return Checker(spec).run()
