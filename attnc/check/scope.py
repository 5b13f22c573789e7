"""Names: what the language predefines, what a spec defines (params, consts, inputs, lets, let
functions, head names), the rules for new names, and the hints for a name used before its
definition or misspelt."""

from __future__ import annotations

import enum
import keyword
from dataclasses import dataclass

from .. import ast, ir
from ..errors import Diagnostic, Span, did_you_mean
from .builtins import FUNCTIONS
from .report import Abort, Reporter
from .types import INT, REAL, Value

# ---- what the language predefines ----
INDEX_DOC = {"b": "the batch index", "h": "the query head", "q": "the query index", "kv": "the key index"}
SIZE_DOC = {
    "B": "the batch size",
    "Hq": "the number of query heads",
    "Hk": "the number of key heads",
    "Hv": "the number of value heads",
    "Lq": "the query length",
    "Lk": "the key length",
}
# Axis names a tensor input may declare, and the index that must subscript each.
AXIS_DOC = {"B": "the batch", "Hq": "the query heads", "H": "the query heads", "Lq": "the queries",
            "Lk": "the keys", "L": "the tokens"}
AXIS_INDEX = {"B": ("b",), "Hq": ("h",), "H": ("h",), "Lq": ("q",), "Lk": ("kv",), "L": ("q", "kv")}

# Names a user may not define: the language's own, Python's keywords, and the generated function's
# own arguments (params and inputs become keyword arguments of it, and of its plan() and mask()).
GENERATED_ARGS = {"k", "v", "scale", "return_lse", "return_stats", "plan", "layout", "block_m", "block_n", "device",
                  "torch", "triton", "tl", "math", "attnc"}
RESERVED = (
    set(INDEX_DOC) | set(SIZE_DOC) | {"s", "score", "visible", "true", "false"} | FUNCTIONS | GENERATED_ARGS
)


def describe_builtin(name: str) -> str:
    if name in INDEX_DOC:
        return INDEX_DOC[name]
    if name in SIZE_DOC:
        return SIZE_DOC[name]
    if name in FUNCTIONS:
        return "a function"
    if name in GENERATED_ARGS:
        return "an argument of the generated function or of its plan()"
    return {"s": "the raw score", "score": "the transformed score", "visible": "the number of visible keys"}.get(
        name, "reserved")


class Kind(enum.Enum):
    """What a name stands for."""

    INDEX = enum.auto()
    SIZE = enum.auto()
    SCORE = enum.auto()  # `s`, the raw score
    VISIBLE = enum.auto()
    PARAM = enum.auto()
    CONST = enum.auto()
    TENSOR = enum.auto()
    LET = enum.auto()
    HEAD = enum.auto()
    FUNCTION = enum.auto()  # a let function
    ARGUMENT = enum.auto()  # a let function's parameter, bound at one call
    FEATURE = enum.auto()  # a feature map


@dataclass
class Entry:
    kind: Kind
    span: Span | None  # its definition; None for the language's own names
    value: Value | None = None
    tensor: ir.TensorInput | None = None


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


def _defined_names(stmt) -> tuple[str, ...]:
    if isinstance(stmt, ast.Let):
        return stmt.names
    if isinstance(stmt, (ast.Binding, ast.Input, ast.LetFunc)):
        return (stmt.name,)
    return ()


class Scope(Reporter):
    def __init__(self, spec: ast.Spec):
        super().__init__()
        self.spec = spec
        self.env: dict[str, Entry] = {}
        for name in INDEX_DOC:
            self.env[name] = Entry(Kind.INDEX, None, Value(ir.INDICES[name], INT))
        for name, sym in ir.SIZES.items():
            self.env[name] = Entry(Kind.SIZE, None, Value(sym, INT))
        self.env["s"] = Entry(Kind.SCORE, None, Value(ir.s, REAL))
        self.env["visible"] = Entry(Kind.VISIBLE, None, Value(ir.visible, INT))
        self.failed: set = set()  # names whose definition had an error
        self.functions: dict = {}  # let functions: name -> ast.LetFunc

    def check_identifier(self, name: str, span: Span, what: str = "name", soft: bool = False):
        if name.startswith("_"):
            self.errors.append(Diagnostic(f"{what} '{name}' starts with '_', which is reserved", span))
            if not soft:
                raise Abort
        elif keyword.iskeyword(name):
            self.errors.append(Diagnostic(f"{what} '{name}' is a Python keyword and cannot be used", span))
            if not soft:
                raise Abort

    def define(self, name: str, span: Span, entry: Entry):
        self.check_identifier(name, span)
        if name in self.env and self.env[name].span is not None:
            first = self.env[name].span
            self.error(f"'{name}' is already defined at line {first.line}", span)
        if name in RESERVED or name in self.env:
            self.error(f"'{name}' is a built-in name ({describe_builtin(name)}) and cannot be redefined", span,
                       f"pick another name, e.g. '{name}_'" if not name.startswith("_") else None)
        self.env[name] = entry

    def is_feature(self, name: str) -> bool:
        entry = self.env.get(name)
        return entry is not None and entry.kind == Kind.FEATURE

    def tensor_named(self, name: str) -> ir.TensorInput | None:
        entry = self.env.get(name)
        return entry.tensor if entry is not None and entry.kind == Kind.TENSOR else None

    def all_names(self) -> list[str]:
        """Every name the spec could mean: defined so far, defined anywhere in the file, and built in."""
        names = list(self.env) + ["score"]
        for stmt in self.spec.statements:
            names.extend(_defined_names(stmt))
        return names

    def defined_later(self, name: str) -> Span | None:
        return next((stmt.span for stmt in self.spec.statements if name in _defined_names(stmt)), None)

    # ---- the body of a let function ----
    def names_known(self, node, stmt: ast.LetFunc, params: set):
        """Report the first unknown name in a let function's body (its own name: recursion)."""
        if isinstance(node, ast.Name):
            self.name_known(node, stmt, params)
        if isinstance(node, ast.Call):
            self.function_known(node, stmt, params)
        if isinstance(node, ast.Index) and node.tensor not in self.env:
            if node.tensor in self.failed:
                raise Abort
            self.error(f"unknown tensor '{node.tensor}'", node.span)
        for child in _children(node):
            self.names_known(child, stmt, params)

    def name_known(self, node: ast.Name, stmt: ast.LetFunc, params: set):
        name = node.id
        if name in params or name in self.env or name == "score":
            if name in self.functions:
                self.error(f"'{name}' is a function; call it as {name}(...)", node.span)
            return
        if name == stmt.name:
            self.error(f"'{name}' refers to itself: let functions cannot be recursive", node.span)
        if name in self.failed:
            raise Abort
        later = self.defined_later(name)
        if later is not None and later is not stmt.span:
            self.error(f"'{name}' is used before its definition at line {later.line}", node.span,
                       "move the definition above this line")
        if name in FUNCTIONS:
            self.error(f"'{name}' is a function; call it as {name}(...)", node.span)
        self.error(f"unknown name '{name}' in the body of '{stmt.name}'", node.span,
                   did_you_mean(name, list(params) + self.all_names()))

    def function_known(self, node: ast.Call, stmt: ast.LetFunc, params: set):
        if node.func == stmt.name:
            self.error(f"'{stmt.name}' calls itself: let functions cannot be recursive", node.span,
                       "write the expansion out, or use a function defined above")
        if node.func in FUNCTIONS or node.func in self.functions:
            return
        if node.func in self.failed:
            raise Abort
        if node.func in params:
            self.error(f"parameter '{node.func}' is a value, not a function", node.span)
        later = self.defined_later(node.func)
        if later is not None:
            self.error(f"function '{node.func}' is used before its definition at line {later.line}",
                       node.span, "move the definition above this line")
        self.error(f"unknown function '{node.func}'", node.span,
                   did_you_mean(node.func, list(FUNCTIONS) + list(self.functions)))
