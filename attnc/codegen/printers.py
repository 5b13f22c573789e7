"""sympy -> source code. One base printer; the Triton and torch printers differ only in spelling.

Following sympy's own printers: one `_print_<Node>` method per node type, function spellings in a
table, parentheses around every compound sub-expression (generated code favours certainty over
elegance), and strict failure on anything unsupported, so no spec can reach the generated module
except through these methods.

Symbols (indices, parameters, the score) and tensor loads print as the names the caller maps them to.
"""

from __future__ import annotations

from typing import ClassVar

import sympy
from sympy.core.function import AppliedUndef
from sympy.printing.str import StrPrinter

from .. import ir


class UnsupportedExpression(Exception):
    pass


class _NamedPrinter(StrPrinter):
    """Strict printing with bound names: symbols and tensor loads print as the code the caller maps them
    to, and a node without a `_print_<Node>` method fails instead of falling back to sympy's str."""

    def __init__(self, names: dict):
        super().__init__({"order": "none"})
        self.names = names  # sympy atom (Symbol, tensor load, row statistic) -> code

    def doprint(self, expr):
        return self._print(sympy.sympify(expr))

    def emptyPrinter(self, expr):
        raise UnsupportedExpression(f"cannot generate code for {expr!r} ({type(expr).__name__})")

    _print_Basic = emptyPrinter

    def _named(self, expr):
        if expr in self.names:
            return self.names[expr]
        raise UnsupportedExpression(f"no value bound for {expr}")

    def _print_Symbol(self, expr):
        return self._named(expr)

    def _print_AppliedUndef(self, expr):
        return self._named(expr)

    def _print_VecDot(self, expr):  # a dot of feature vectors: computed per tile by the caller
        return self._named(expr)


def wrapped(code: str) -> bool:
    """Whether code is one parenthesized group, "(a + b)" (not "(a) + (b)")."""
    if not (code.startswith("(") and code.endswith(")")):
        return False
    depth = 0
    for i, ch in enumerate(code):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and i < len(code) - 1:
            return False
    return True


class _BasePrinter(_NamedPrinter):
    # spellings, overridden per target
    functions: ClassVar[dict] = {}
    where = minimum = maximum = floordiv = floormod = powf = ""
    safe_div = None

    def _print_RowSum(self, expr):
        return self._named(expr)

    _print_RowMax = _print_RowSum

    # ---- numbers and logic ----
    def _print_Integer(self, expr):
        return str(int(expr))

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_Rational(self, expr):
        return repr(float(expr))

    _print_Half = _print_Rational

    def _print_NegativeOne(self, expr):
        return "-1"

    def _print_Zero(self, expr):
        return "0"

    def _print_One(self, expr):
        return "1"

    def _print_Pi(self, expr):
        return repr(float(sympy.pi))

    def _print_Exp1(self, expr):
        return repr(float(sympy.E))

    def _print_Infinity(self, expr):
        return 'float("inf")'

    def _print_NegativeInfinity(self, expr):
        return 'float("-inf")'

    def _print_BooleanTrue(self, expr):
        return "True"

    def _print_BooleanFalse(self, expr):
        return "False"

    def _print_And(self, expr):
        return "(" + " & ".join(self._print(a) for a in expr.args) + ")"

    def _print_Or(self, expr):
        return "(" + " | ".join(self._print(a) for a in expr.args) + ")"

    def _print_Relational(self, expr):
        return f"({self._print(expr.lhs)} {expr.rel_op} {self._print(expr.rhs)})"

    def _print_Piecewise(self, expr):
        *branches, (last, _cond) = expr.args
        out = self._print(last)
        for value, c in reversed(branches):
            out = f"{self.where}({self._print(c)}, {self._print(value)}, {out})"
        return out

    # ---- arithmetic ----
    def _print_Add(self, expr):
        terms = [self._print(a) for a in sympy.Add.make_args(expr)]
        out = terms[0]
        for t in terms[1:]:
            out += f" - {t[1:]}" if t.startswith("-") and not t.startswith("-(") else f" + {t}"
        return f"({out})"

    def _print_Mul(self, expr):
        numer, denom = [], []
        for factor in sympy.Mul.make_args(expr):
            if factor.is_Pow and factor.exp.is_number and factor.exp < 0:
                denom.append(sympy.Pow(factor.base, -factor.exp))
            elif factor.is_Rational and factor.q != 1 and not factor.is_Integer:
                numer.append(sympy.Float(factor))
            else:
                numer.append(factor)
        if numer and numer[0] == -1:
            numer = numer[1:]
            sign = "-"
        else:
            sign = ""
        top = " * ".join(self._print(f) for f in numer) or "1.0"
        if not denom:
            if len(numer) == 1 and (numer[0].is_Atom or top.startswith("(")):
                return f"{sign}{top}"
            return f"{sign}({top})" if sign else f"({top})"
        bottom = " * ".join(self._print(f) for f in denom)
        if self.safe_div and self._guard_division(denom):
            # a row statistic may be 0 in a branch that is not taken; see R.safe_div
            return f"{sign}{self.safe_div}({top}, {bottom})"
        return f"{sign}({top} / ({bottom}))"

    def _guard_division(self, denom) -> bool:
        """Whether a division by these factors goes through `safe_div`."""
        return any(ir.row_stats(f) for f in denom)

    def _print_Pow(self, expr):
        folded = self._folded(expr)  # sqrt(3) of a const or param default: a number, not torch.sqrt(3)
        if folded is not None:
            return folded
        base, exp = expr.args
        if exp == sympy.Rational(1, 2):
            return self._call(self.functions["sqrt"], [base])
        if exp.is_Integer and 0 < exp <= 4:
            return "(" + " * ".join([self._print(base)] * int(exp)) + ")"
        if exp.is_Integer and -4 <= exp < 0:
            return "(1.0 / (" + " * ".join([self._print(base)] * int(-exp)) + "))"
        if base == 2 and exp.is_integer:
            return f"(1 << {self._print(exp)})"
        return f"{self.powf}({self._print(base)}, {self._print(exp)})"

    def _print_FloorDiv(self, expr):
        a, d = expr.args
        if a.is_nonnegative and d.is_positive:
            return f"({self._print(a)} // {self._print(d)})"
        return f"{self.floordiv}({self._print(a)}, {self._print(d)})"

    def _print_Mod(self, expr):
        a, d = expr.args
        if a.is_nonnegative and d.is_positive:
            return f"({self._print(a)} % {self._print(d)})"
        return f"{self.floormod}({self._print(a)}, {self._print(d)})"

    def _print_RShift(self, expr):
        return f"({self._print(expr.args[0])} >> {self._print(expr.args[1])})"

    bit_ops: ClassVar[dict] = {"BitAnd": "&", "BitOr": "|", "BitXor": "^", "LShift": "<<"}

    def _int_operand(self, expr) -> str:
        """An operand of a bitwise operator: floor() and ceil() print as floats holding integers."""
        code = self._print(expr)
        if expr.has(sympy.floor, sympy.ceiling):
            return f"({code}).to(tl.int64)"
        return code

    def _print_BitAnd(self, expr):
        a, b = expr.args
        return f"({self._int_operand(a)} {self.bit_ops[type(expr).__name__]} {self._int_operand(b)})"

    _print_BitOr = _print_BitXor = _print_LShift = _print_BitAnd

    def _print_Min(self, expr):
        return self._fold(self.minimum, expr.args)

    def _print_Max(self, expr):
        return self._fold(self.maximum, expr.args)

    def _fold(self, fn, args):
        out = self._print(args[0])
        for a in args[1:]:
            out = f"{fn}({out}, {self._print(a)})"
        return out

    # ---- functions ----
    def _call(self, fn: str, args) -> str:
        """fn(args); a sole argument loses its own outer parentheses: f(a * b), not f((a * b))."""
        printed = [self._print(a) for a in args]
        if len(printed) == 1 and wrapped(printed[0]):
            printed = [printed[0][1:-1]]
        return f"{fn}({', '.join(printed)})"

    def _folded(self, expr) -> str | None:
        """A function or power of numbers only (`log2(MAXD / E)`, `sqrt(3)` with consts) prints as its
        value: torch's and Triton's functions take tensors, not Python numbers."""
        if not expr.is_number or expr.atoms(AppliedUndef):
            return None
        try:
            value = complex(sympy.N(expr))
        except (TypeError, ValueError, OverflowError):
            return None
        if value.imag != 0 or value.real != value.real or abs(value.real) == float("inf"):
            return None
        return repr(value.real)

    def _print_Function(self, expr):
        folded = self._folded(expr)
        if folded is not None:
            return folded
        name = type(expr).__name__
        if name not in self.functions:
            raise UnsupportedExpression(f"function {name} has no {type(self).__name__} spelling")
        return self._call(self.functions[name], expr.args)

    _print_exp = _print_log = _print_tanh = _print_Abs = _print_floor = _print_ceiling = _print_Function

    def _print_Heaviside(self, expr):
        return self._call(self.functions["Step"], expr.args[:1])


class TritonPrinter(_BasePrinter):
    """Expressions inside a @triton.jit kernel; helpers come from attnc.runtime.tl_helpers as `rt`."""

    functions: ClassVar[dict] = {
        "exp": "tl.exp", "log": "tl.log", "sqrt": "tl.sqrt", "Abs": "tl.abs", "floor": "tl.floor",
        "ceiling": "tl.ceil", "tanh": "rt.tanh", "Sigmoid": "rt.sigmoid", "Softplus": "rt.softplus",
        "Relu": "rt.relu", "Step": "rt.step", "Log2": "tl.log2", "FloorLog2": "rt.ilog2",
        "sin": "tl.sin", "cos": "tl.cos", "tan": "rt.tan", "erf": "tl.erf",
    }
    where, minimum, maximum = "tl.where", "tl.minimum", "tl.maximum"
    floordiv, floormod, powf = "rt.floordiv", "rt.floormod", "rt.powf"

    def _print_Not(self, expr):
        return f"({self._print(expr.args[0])} == 0)"

    # functions of reals: Triton's take float tensors only, so an integer argument (`sin(q - kv)`) is
    # promoted by adding 0.0 (which works on Python ints and integer tensors alike)
    _real_args: ClassVar[set] = {"exp", "log", "sqrt", "tanh", "Sigmoid", "Softplus", "Log2", "sin", "cos", "tan", "erf"}

    def _print_Function(self, expr):
        name = type(expr).__name__
        if self._folded(expr) is None and name in self._real_args and len(expr.args) == 1 and expr.args[0].is_integer:
            if name not in self.functions:
                raise UnsupportedExpression(f"function {name} has no {type(self).__name__} spelling")
            return f"{self.functions[name]}({self._print(expr.args[0])} + 0.0)"
        return super()._print_Function(expr)

    _print_exp = _print_log = _print_tanh = _print_Abs = _print_floor = _print_ceiling = _print_Function


class TorchPrinter(_BasePrinter):
    """Expressions in eager PyTorch; helpers come from attnc.runtime.ref_helpers as `R`."""

    functions: ClassVar[dict] = {
        "exp": "torch.exp", "log": "R.safe_log", "sqrt": "torch.sqrt", "Abs": "abs", "floor": "torch.floor",
        "ceiling": "torch.ceil", "tanh": "torch.tanh", "Sigmoid": "torch.sigmoid",
        "Softplus": "torch.nn.functional.softplus", "Relu": "torch.relu", "Step": "R.step", "Log2": "torch.log2",
        "FloorLog2": "R.ilog2", "sin": "torch.sin", "cos": "torch.cos", "tan": "torch.tan", "erf": "torch.erf",
    }
    where, minimum, maximum = "R.where", "R.minimum", "R.maximum"
    floordiv, floormod, powf = "R.floordiv", "R.floormod", "R.powf"
    safe_div = "R.safe_div"

    def _print_Not(self, expr):
        return f"(~{self._print(expr.args[0])})"

    def _print_RShift(self, expr):
        return f"R.rshift({self._print(expr.args[0])}, {self._print(expr.args[1])})"

    def _print_BitAnd(self, expr):
        fn = {"BitAnd": "bitand", "BitOr": "bitor", "BitXor": "bitxor", "LShift": "lshift"}[type(expr).__name__]
        return f"R.{fn}({self._print(expr.args[0])}, {self._print(expr.args[1])})"

    _print_BitOr = _print_BitXor = _print_LShift = _print_BitAnd


class HostScalarPrinter(TorchPrinter):
    """Python scalars on the host (a param's default that reads the sizes): elementary functions from
    `math`, the rest as the reference prints them."""

    functions: ClassVar[dict] = {
        **TorchPrinter.functions,
        "exp": "math.exp", "log": "math.log", "sqrt": "math.sqrt", "floor": "math.floor", "ceiling": "math.ceil",
        "tanh": "math.tanh", "Log2": "math.log2", "sin": "math.sin", "cos": "math.cos", "tan": "math.tan",
        "erf": "math.erf",
    }


def host_scalar_code(expr, names: dict) -> str:
    return HostScalarPrinter(names).doprint(expr)


def triton_code(expr, names: dict) -> str:
    return TritonPrinter(names).doprint(expr)


def torch_code(expr, names: dict) -> str:
    return TorchPrinter(names).doprint(expr)


class IntervalPrinter(_NamedPrinter):
    """A mask as interval code over batches of tiles (attnc.runtime.intervals, imported as `I`).

    Every sub-expression prints as a call whose result bounds the sub-expression over each cell: an
    interval `(lo, hi)` for numbers, `(all, any)` for conditions. Like the other printers, anything
    without an interval rule fails the build of the plan (the kernels then treat the mask's tiles as
    PARTIAL), never yields a bound that might be wrong."""

    monotone: ClassVar[dict] = {
        "exp": "exp", "log": "log", "sqrt": "sqrt", "floor": "floor", "ceiling": "ceil", "tanh": "tanh",
        "Sigmoid": "sigmoid", "Softplus": "softplus", "Relu": "relu", "Step": "step", "Log2": "log2",
        "erf": "erf",
    }
    bounded: ClassVar[dict] = {"sin": "sin", "cos": "cos", "tan": "tan"}  # exact on points, a wide sound bound otherwise

    def __init__(self, names: dict, bool_loads: frozenset = frozenset()):
        super().__init__(names)
        self.bool_loads = bool_loads  # tensor loads that are conditions (bool tensors)

    def _print_AppliedUndef(self, expr):
        code = self._named(expr)
        return f"I.truth({code})" if expr in self.bool_loads else code

    def _constant(self, value: str) -> str:
        return f"({value}, {value})"

    def _print_Integer(self, expr):
        return self._constant(str(int(expr)))

    def _print_Float(self, expr):
        return self._constant(repr(float(expr)))

    _print_Rational = _print_Half = _print_Pi = _print_Exp1 = _print_Float

    def _print_Zero(self, expr):
        return self._constant("0")

    _print_One = _print_NegativeOne = _print_Integer

    def _print_BooleanTrue(self, expr):
        return "I.TRUE"

    def _print_BooleanFalse(self, expr):
        return "I.FALSE"

    def _call(self, fn, args):
        return f"I.{fn}({', '.join(self._print(a) for a in args)})"

    def _print_And(self, expr):
        return self._call("logical_and", expr.args)

    def _print_Or(self, expr):
        return self._call("logical_or", expr.args)

    def _print_Not(self, expr):
        return self._call("logical_not", expr.args)

    def _print_Relational(self, expr):
        lhs, rhs = expr.lhs, expr.rhs
        op = expr.rel_op
        if op in (">", ">="):
            lhs, rhs, op = rhs, lhs, "<" if op == ">" else "<="
        fn = {"<": "lt", "<=": "le", "==": "eq", "!=": "ne"}[op]
        return self._call(fn, (lhs, rhs))

    def _print_Add(self, expr):
        return self._call("add", sympy.Add.make_args(expr))

    def _print_Mul(self, expr):
        factors = list(sympy.Mul.make_args(expr))
        if factors[0] == -1:
            rest = sympy.Mul(*factors[1:], evaluate=False) if len(factors) > 2 else factors[1]
            return f"I.neg({self._print(rest)})"
        return self._call("mul", factors)

    def _print_Pow(self, expr):
        base, exp = expr.args
        if exp.is_number:
            return f"I.power({self._print(base)}, {repr(int(exp)) if exp.is_Integer else repr(float(exp))})"
        if base == 2:
            return f"I.monotone('exp2', {self._print(exp)})"
        raise UnsupportedExpression(f"no interval rule for a power with a varying exponent: {expr}")

    def _print_FloorDiv(self, expr):
        return self._call("floordiv", expr.args)

    def _print_Mod(self, expr):
        return self._call("mod", expr.args)

    def _print_RShift(self, expr):
        return self._call("rshift", expr.args)

    def _print_FloorLog2(self, expr):
        return self._call("floor_log2", expr.args)

    def _print_BitAnd(self, expr):
        fn = {"BitAnd": "bitand", "BitOr": "bitor", "BitXor": "bitxor", "LShift": "lshift"}[type(expr).__name__]
        return self._call(fn, expr.args)

    _print_BitOr = _print_BitXor = _print_LShift = _print_BitAnd

    def _print_Abs(self, expr):
        return self._call("absolute", expr.args)

    def _print_Min(self, expr):
        return self._call("minimum", expr.args)

    def _print_Max(self, expr):
        return self._call("maximum", expr.args)

    def _print_Function(self, expr):
        name = type(expr).__name__
        if name in self.bounded:
            return f"I.bounded({self.bounded[name]!r}, {self._print(expr.args[0])})"
        if name not in self.monotone:
            raise UnsupportedExpression(f"no interval rule for {name}")
        return f"I.monotone({self.monotone[name]!r}, {self._print(expr.args[0])})"

    _print_exp = _print_log = _print_tanh = _print_floor = _print_ceiling = _print_Function

    def _print_Heaviside(self, expr):
        return f"I.monotone('step', {self._print(expr.args[0])})"

    def _print_Piecewise(self, expr):
        *branches, (last, _) = expr.args
        select = "select_bool" if isinstance(last, sympy.logic.boolalg.Boolean) else "select"
        out = self._print(last)
        for value, cond in reversed(branches):
            out = f"I.{select}({self._print(cond)}, {self._print(value)}, {out})"
        return out


def interval_code(expr, names: dict, bool_loads=frozenset()) -> str:
    return IntervalPrinter(names, frozenset(bool_loads)).doprint(expr)


class GuardedTritonPrinter(TritonPrinter):
    """Triton for the general normalizations' kernels, whose expressions (derivatives included) may
    divide by a row statistic or by any other value that is 0 on a row or key that does not count.

    [Note] Every division by a non-constant goes through rt.safe_div (x / 0 = 0) and log through
    rt.safe_log (log x = 0 for x <= 0), as the reference's R.safe_div / R.safe_log do: a masked entry
    or an empty row then yields 0 where it would yield inf or NaN, which a later `where` could not undo
    once multiplied into a sum."""

    functions: ClassVar[dict] = {**TritonPrinter.functions, "log": "rt.safe_log"}
    safe_div = "rt.safe_div"

    def _guard_division(self, denom) -> bool:
        return any(not f.is_number for f in denom)

    def _print_Pow(self, expr):
        base, exp = expr.args
        if exp.is_number and exp < 0 and not base.is_number:
            return f"{self.safe_div}(1.0, {self._print(sympy.Pow(base, -exp))})"
        return super()._print_Pow(expr)


def guarded_triton_code(expr, names: dict) -> str:
    return GuardedTritonPrinter(names).doprint(expr)
