"""The types of the language's values (bool, int, real) and the typing rules of its operators.

Each rule takes the operands already lowered (`Value`s: a sympy form and a type) with the AST node for
the error spans, and returns the operator's `Value`, or records an error (attnc/check/report.py)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import sympy

from .. import ast, ir
from ..errors import Span
from .report import Reporter


class Type(enum.StrEnum):
    BOOL = "bool"
    INT = "int"
    REAL = "real"


BOOL, INT, REAL = Type.BOOL, Type.INT, Type.REAL
DTYPE_TYPE = {"int": INT, "float": REAL, "bool": BOOL}  # a declared dtype's type

# what to write instead of a bitwise operator on conditions
_BOOL_OP_OF = {"&": "'and'", "|": "'or'", "^": "'!=' (exclusive or)"}
_RELATIONS = {"<": sympy.Lt, "<=": sympy.Le, ">": sympy.Gt, ">=": sympy.Ge, "==": sympy.Eq, "!=": sympy.Ne}
_BITWISE = {"&": ir.BitAnd, "|": ir.BitOr, "^": ir.BitXor}
_REAL_SPELLING = {"//": "floor(a / b)", "%": "a - floor(a / b) * b", ">>": "floor(a / 2 ** n)"}


@dataclass
class Value:
    """A lowered expression: its sympy form, type, and where it first touches the score / row stats."""

    expr: object
    type: Type
    uses_score: Span | None = None
    uses_rowstat: Span | None = None


def merge(expr, type_: Type, *values: Value) -> Value:
    """`expr` of type `type_`, computed from `values`: it touches the score and the row statistics
    where the first of them does."""
    uses_score = next((v.uses_score for v in values if v.uses_score), None)
    uses_rowstat = next((v.uses_rowstat for v in values if v.uses_rowstat), None)
    return Value(expr, type_, uses_score, uses_rowstat)


def _weights(*values: Value) -> list:
    """The feature-map weights (`W[h]`) that `values` read."""
    return [x for v in values for x in sympy.sympify(v.expr).free_symbols if x.name.startswith("_fw_")]


class TypeRules(Reporter):
    in_feature: bool  # lowering a feature map's body (attnc/check/lower.py)

    def need_number(self, v: Value, node, what: str):
        if v.type == BOOL:
            self.error(f"{what} needs a number, but this is a condition", node.span,
                       "use 'x if cond else y' to turn a condition into a number")

    def negate(self, node: ast.Neg, v: Value) -> Value:
        self.need_number(v, node.operand, "'-'")
        return Value(-v.expr, v.type, v.uses_score, v.uses_rowstat)

    def logical_not(self, node: ast.Not, v: Value) -> Value:
        if v.type != BOOL:
            self.error(f"'not' needs a condition, not {v.type}", node.operand.span)
        return Value(sympy.Not(v.expr), BOOL, v.uses_score, v.uses_rowstat)

    def boolop(self, node: ast.BoolOp, left: Value, right: Value) -> Value:
        for side, v in ((node.left, left), (node.right, right)):
            if v.type != BOOL:
                self.error(f"'{node.op}' needs conditions on both sides, not {v.type}", side.span)
        fn = sympy.And if node.op == "and" else sympy.Or
        return merge(fn(left.expr, right.expr), BOOL, left, right)

    def compare(self, node: ast.Compare, values: list[Value]) -> Value:
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
            parts.append(_RELATIONS[op](av.expr, bv.expr))
        return merge(sympy.And(*parts), BOOL, *values)

    def ternary(self, node: ast.Ternary, cond: Value, then: Value, orelse: Value) -> Value:
        if cond.type != BOOL:
            self.error(f"the condition of 'if' must be a condition, not {cond.type}", node.cond.span)
        if (then.type == BOOL) != (orelse.type == BOOL):
            self.error("both branches of 'if ... else' must be numbers, or both conditions", node.span)
        rtype = BOOL if then.type == BOOL else (INT if then.type == orelse.type == INT else REAL)
        if rtype == BOOL:
            expr = sympy.Or(sympy.And(cond.expr, then.expr), sympy.And(sympy.Not(cond.expr), orelse.expr))
        else:
            expr = sympy.Piecewise((then.expr, cond.expr), (orelse.expr, True))
        return merge(expr, rtype, cond, then, orelse)

    def binop(self, node: ast.BinOp, left: Value, right: Value) -> Value:
        op = node.op
        # a product already formed (`x @ W[h]`) is a vector like any other: `2 * (x @ W[h])` scales it
        # elementwise; only a bare W[h] outside '@' is misused
        bare = [w for w in _weights(left, right) if any(w in sympy.sympify(e).xreplace(
            {m: sympy.Dummy() for m in sympy.sympify(e).atoms(ir.FMatMul)}).free_symbols
            for e in (left.expr, right.expr))]
        if op == "@" or bare:
            return self.feature_product(node, left, right)
        if op in _BOOL_OP_OF:  # `(kv <= q) & (q - kv < 8)`: FlexAttention's way of combining conditions
            for side, v in ((node.left, left), (node.right, right)):
                if v.type == BOOL:
                    self.error(f"'{op}' needs a number, but this is a condition", side.span,
                               f"to combine conditions write {_BOOL_OP_OF[op]}")
        self.need_number(left, node.left, f"'{op}'")
        self.need_number(right, node.right, f"'{op}'")
        if op in ("&", "|", "^", "<<"):
            return self.bitwise(node, left, right)
        if op in ("//", "%", ">>"):
            return self.integer_division(node, left, right)
        return self.arithmetic(node, left, right)

    def feature_product(self, node: ast.BinOp, left: Value, right: Value) -> Value:
        """`x @ W[h]` in a feature map: a head vector times head h's weight matrix."""
        if not self.in_feature:
            self.error("'@' multiplies a head vector by a feature map's weights, inside 'feature phi(x) = ...'",
                       node.span)
        if node.op != "@" or not (right.expr.is_Symbol and right.expr.name.startswith("_fw_")) or (
                sympy.sympify(left.expr).free_symbols & set(_weights(left, right))):
            self.error("a feature map's weights are used as 'v @ W[h]' (v a vector of length Dqk)", node.span)
        return merge(ir.FMatMul(left.expr, right.expr), REAL, left, right)

    def bitwise(self, node: ast.BinOp, left: Value, right: Value) -> Value:
        op, a, c = node.op, left.expr, right.expr
        for side, v in ((node.left, left), (node.right, right)):
            if v.type != INT:
                self.error(f"'{op}' needs integers, but this is real", side.span,
                           "bitwise operators work on integers; use floor(x) to get one")
        if op == "<<":
            if not (c.is_Integer and 0 <= int(c) <= 62):
                self.error("the shift count of '<<' must be an integer from 0 to 62 known at build time "
                           "(a number or a const)", node.right.span, "for a count known at run time write a * 2 ** n")
            return merge(ir.LShift(a, c), INT, left, right)
        return merge(_BITWISE[op](a, c), INT, left, right)

    def integer_division(self, node: ast.BinOp, left: Value, right: Value) -> Value:
        """`//`, `%` and `>>`: integers only, rounding towards minus infinity as Python does."""
        op, a, c = node.op, left.expr, right.expr
        for side, v in ((node.left, left), (node.right, right)):
            if v.type != INT:
                self.error(f"'{op}' needs integers, but this is real", side.span, f"for reals write {_REAL_SPELLING[op]}")
        if c.is_number and c == 0 and op != ">>":
            self.error(f"division by zero in '{op}'", node.right.span)
        if op == ">>":
            return merge(ir.RShift(a, self.shift_count(c, node.right)), INT, left, right)
        return merge(ir.FloorDiv(a, c) if op == "//" else sympy.Mod(a, c), INT, left, right)

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

    def arithmetic(self, node: ast.BinOp, left: Value, right: Value) -> Value:
        """`+ - * / **`: int where both sides are (and, for `**`, the exponent is not negative)."""
        op, a, c = node.op, left.expr, right.expr
        both_int = left.type == INT and right.type == INT
        if op == "/":
            if c.is_number and c == 0:
                self.error("division by zero", node.right.span)
            return merge(a / c, REAL, left, right)
        if op == "**":
            int_result = both_int and c.is_nonnegative is True
            if a.is_number and a == 0 and c.is_number and c < 0:
                self.error("0 raised to a negative power", node.span)
            return merge(sympy.Pow(a, c), INT if int_result else REAL, left, right)
        expr = {"+": a + c, "-": a - c, "*": a * c}[op]
        return merge(expr, INT if both_int else REAL, left, right)
