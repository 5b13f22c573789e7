"""`attnc ir`: a readable dump of a variant's IR and of the row-statistics plan chosen for it.

Expressions are printed back in the language's own notation (`a // b`, `rowsum(...)`, `x if c else y`)
by `SpecPrinter`, so a dump reads like a spec with every `let` inlined.
"""

from __future__ import annotations

from typing import ClassVar

import sympy
from sympy.printing.str import StrPrinter

from . import ir
from .analysis.factorize import AlgorithmKind
from .pipeline import Analyses


class SpecPrinter(StrPrinter):
    """sympy -> .attn notation."""

    _names: ClassVar[dict[str, str]] = {
        "Sigmoid": "sigmoid", "Softplus": "softplus", "Relu": "relu", "Step": "step", "Log2": "log2",
        "RowSum": "rowsum", "RowMax": "rowmax", "Abs": "abs", "Min": "min", "Max": "max",
    }

    def _print_Function(self, expr):
        name = self._names.get(type(expr).__name__, type(expr).__name__)
        return f"{name}({', '.join(self._print(a) for a in expr.args)})"

    _print_Abs = _print_Min = _print_Max = _print_Function

    def _print_Symbol(self, expr):  # feature maps (linear attention)
        if ir.feature_dot_names(expr):
            query, key = ir.feature_dot_names(expr)
            return f"dot({query}(q), {key}(k))"
        if expr.name.startswith("_fw_"):
            return f"{expr.name[len('_fw_'):]}[h]"
        return "x" if expr.name == "_fx" else super()._print_Symbol(expr)

    def _print_FMatMul(self, expr):
        return f"{self.parenthesize(expr.args[0], 50)} @ {self._print(expr.args[1])}"

    def _print_FSoftmax(self, expr):
        return f"softmax({self._print(expr.args[0])})"

    def _print_FCat(self, expr):
        return f"cat({', '.join(self._print(a) for a in expr.args)})"

    def _print_AppliedUndef(self, expr):
        return f"{expr.func.__name__}[{', '.join(self._print(a) for a in expr.args)}]"

    def _print_VecDot(self, expr):
        return f"dot({self._print(expr.query)}, {self._print(expr.key)})"

    def _print_FloorDiv(self, expr):
        a, d = expr.args
        return f"({self.parenthesize(a, 50)} // {self.parenthesize(d, 51)})"

    def _print_RShift(self, expr):
        a, n = expr.args
        return f"({self.parenthesize(a, 40)} >> {self.parenthesize(n, 41)})"

    def _print_FloorLog2(self, expr):
        return f"floor(log2({self._print(expr.args[0])}))"

    def _print_Mod(self, expr):
        a, d = expr.args
        return f"({self.parenthesize(a, 50)} % {self.parenthesize(d, 51)})"

    def _print_And(self, expr):
        return " and ".join(self.parenthesize(a, 36) for a in sorted(expr.args, key=sympy.default_sort_key))

    def _print_Or(self, expr):
        return " or ".join(self.parenthesize(a, 35) for a in sorted(expr.args, key=sympy.default_sort_key))

    def _print_Not(self, expr):
        return f"not {self.parenthesize(expr.args[0], 37)}"

    def _print_BooleanTrue(self, expr):
        return "true"

    def _print_BooleanFalse(self, expr):
        return "false"

    def _print_Piecewise(self, expr):
        *branches, (last, last_cond) = expr.args
        out = self._print(last) if last_cond == sympy.true else f"{self._print(last)} if {self._print(last_cond)} else nan"
        for value, cond in reversed(branches):
            out = f"{self._print(value)} if {self._print(cond)} else {out}"
        return f"({out})"

    def _print_Relational(self, expr):
        op = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}[expr.rel_op]
        return f"{self._print(expr.lhs)} {op} {self._print(expr.rhs)}"

    def _print_Equality(self, expr):
        return f"{self._print(expr.lhs)} == {self._print(expr.rhs)}"

    def _print_Unequality(self, expr):
        return f"{self._print(expr.lhs)} != {self._print(expr.rhs)}"

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_Tuple(self, expr):
        return "(" + ", ".join(self._print(a) for a in expr.args) + ")"


def spec_str(expr) -> str:
    return SpecPrinter({"order": "none"}).doprint(expr)


def _stat_names(rows) -> dict:
    """r1, r2, ... for the row statistics, in pass order, so dumps stay short."""
    stats = [st for st, _ in rows.stats_in_order if st != ir.visible]
    return {st: sympy.Symbol(f"r{i + 1}") for i, st in enumerate(stats)}


def _named(expr, names: dict):
    """Replace each row statistic in expr by its name (innermost first)."""
    done = []  # (the statistic as it reads once inner ones are named, its name)
    for stat in sorted(names, key=sympy.count_ops):
        current = stat
        for form, name in done:
            current = current.xreplace({form: name})
        done.append((current, names[stat]))
    for form, name in done:
        expr = expr.xreplace({form: name})
    return expr


def dump(analyses: Analyses) -> str:
    """The text `attnc ir` prints, from the pipeline's analyses (attnc/pipeline.py)."""
    variant, rows = analyses.variant, analyses.rows
    out = [f"attention {variant.name}    # {variant.path}"]
    heads = variant.heads
    out.append(f"heads      q = {heads['q']}, k = {heads['k']}, v = {heads['v']}   "
               "(query head h reads key head h*Hk//Hq, value head h*Hv//Hq)")
    out.append("indices    b in [0, B), h in [0, Hq), q in [0, Lq), kv in [0, Lk)"
               + ("   (Lq == Lk required)" if variant.needs_equal_lengths else ""))
    for name, value in variant.consts.items():
        out.append(f"const      {name} = {value}")
    for p in variant.params:
        out.append(f"param      {p.name}: {p.dtype} = {spec_str(p.default)}")
    for t in variant.tensors:
        out.append(f"input      {t.name}: {t.dtype}[{', '.join(t.axes)}]" + ("  learnable" if t.learnable else ""))
    for lay in variant.layouts:
        coords = ", ".join(f"{n} = {spec_str(c)}" for n, c in zip(lay.names, lay.coords))
        out.append(f"layout     {lay.index} -> ({', '.join(lay.names)}) over "
                   f"{' x '.join(spec_str(e) for e in lay.extents)}: {coords}")
    for name, body in variant.features:
        out.append(f"feature    {name}(x) = {spec_str(body)}")
    out.append(f"mask       {spec_str(variant.mask)}")
    if variant.select is not None:
        sel = variant.select
        keep = "" if sel.keep is sympy.false else f" keep {spec_str(sel.keep)}"
        out.append(f"select     topk({spec_str(sel.count)}, tiles={sel.tile}) by {sel.estimate.value}{keep}")
    out.append(f"tiles      {analyses.walk.ir_line()}")
    out.append(f"score      {spec_str(variant.score)}")
    if rows.softmax is not None:
        sm = rows.softmax
        sink = "" if sm.sink is None else f", sink = {spec_str(sm.sink)}"
        out.append(f"probs      softmax(logits = {spec_str(sm.logits)}{sink})")
        out.append("row stats  rowmax, rowsum of exp(logits - rowmax) (online, running max with rescaling)")
        offset = "" if sm.offset == 0 else f" + {spec_str(sm.offset)} (the score's row constant, left out of the logits)"
        out.append("lse        log-sum-exp per row" + (" (denominator includes the sink)" if sm.sink is not None else "")
                   + offset)
    else:
        names = _stat_names(rows)
        out.append(f"probs      {spec_str(_named(variant.probs, names))}")
        out.append("row stats" + ("  none" if not rows.stat_pass else ""))
        for stat, p in rows.stats_in_order:
            where = "closed form" if p == 0 else f"pass {p}"
            if stat == ir.visible:
                text = "visible" + (f" = {spec_str(rows.visible)}" if rows.visible is not None else " (counted)")
            else:
                text = f"{names[stat]} = {type(stat).__name__.lower()}({spec_str(_named(stat.args[0], names))})"
            out.append(f"  {where:<11} {text}")
        out.append(f"output     pass {rows.output_pass}: o = " + " + ".join(
            f"[{spec_str(_named(t.coefficient, names))}] * sum_kv [{spec_str(_named(t.weight, names))}] * v"
            for t in rows.terms))
        out.append("lse        none (not a softmax)")
    if rows.visible is not None and rows.softmax is not None:
        out.append(f"visible    {spec_str(rows.visible)}")
    out.append(f"passes     {rows.passes} over the keys")
    chunked = analyses.algorithm.kind is AlgorithmKind.CHUNKED
    if rows.softmax is None and not chunked:
        out += _backward_lines(variant, rows)
    if chunked:
        out.append("backward   autograd through the chunked form (deterministic; docs/linear.md)")
    for st in variant.stats:  # returned with return_stats=True (docs/statistics.md)
        axis = "[B, Hq]" if st.total else ("[B, Hq, Lk] per key" if st.kind.per_key else "[B, Hq, Lq] per row")
        grad = ", with a gradient" if st.kind is ir.StatKind.ENTROPY else ""
        out.append(f"stat       {st.name} = {st.text}: {axis}{grad}")
    alg = analyses.algorithm
    out.append(f"algorithm  {alg.name}: {alg.reason}" if chunked else
               f"algorithm  quadratic (not linear attention: {alg.reason})")
    return "\n".join(out) + "\n"


def _backward_lines(variant, rows) -> list[str]:
    """The derived backward: the row adjoints (rbar_k = dLoss/d r_k, latest first) and the backward row
    reductions that need a pass over the keys."""
    from .analysis.rowgrad import plan_gradients

    grad = plan_gradients(variant, rows)
    out = ["backward   dS = dp * dP/ds" + "".join(f" + {a.symbol} * dg{str(a.stat.symbol)[1:]}/ds" for a in reversed(grad.adjoints))
           + "   (dp = dO . v" + ("; r_k = rowsum(g_k) or rowmax(g_k), rbar_k = dLoss/dr_k)" if grad.adjoints else ")")]
    for adj in grad.adjoints:
        out.append(f"  adjoint     {adj.symbol} = {spec_str(adj.value)}")
    for red in grad.reductions:
        out.append(f"  row pass    {red.symbol} = {red.text}")
    if grad.reductions:
        kernels = "row adjoints (1 pass over the keys), dQ, dK/dV"
    elif grad.adjoints:
        kernels = "row adjoints (from delta = rowsum(dO * O), no pass), dQ, dK/dV"
    else:
        kernels = "dQ, dK/dV"
    return out + [f"kernels    {kernels}"]
