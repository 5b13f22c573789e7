"""The backward pass of a general normalization, derived with sympy.

Notation. Row i has statistics r_1 .. r_K (pass order, so r_k reads only r_<k), each a reduction over
the row's unmasked keys l of an elementwise argument: r_k = sum_l g_k(s_il, r_<k) or max_l g_k(...).
`visible` is a row constant with no gradient. The weights are P_ij = F(s_ij, r) and o_i = sum_j P_ij v_j.
With dP_ij = dO_i . v_j, the chain rule through the statistics gives

    dS_ij  = dP_ij * dF/ds(s_ij) + sum_k Rbar_k * sel_k(s_ij) * dg_k/ds(s_ij)
    Rbar_k = sum_l dP_il * dF/dr_k(s_il) + sum_{m > k} Rbar_m * sum_l sel_m(s_il) * dg_m/dr_k(s_il)

where Rbar_k = dLoss/dr_k (the row adjoints, computed in reverse pass order) and sel_k is 1 for a sum
and the indicator of the maximizing key for a max. Each read t of a learnable input gets
dt_ij = dP_ij dF/dt + sum_k Rbar_k sel_k dg_k/dt: the same form with t in place of s, summed over the
row when t does not depend on the key, kept per (query, key) pair otherwise.

Each `sum_l` above is a row reduction over the keys: one backward "row-adjoint" pass. Two forms need no
pass, because sympy proves them proportional to what the forward already has:
- dF/dr_k = c(r) * F (L1 normalization, e.g. w / rowsum(w)): sum_l dP_il dF/dr_k = c * rowsum(dO * O),
  FlashAttention's D (`delta`);
- dg_m/dr_k = c(r) * g_m: sum_l sel_m dg_m/dr_k = c * r_m.
Piecewise weights (`x if rowsum(R) > 0 else y`) have row-constant conditions and differentiate
branchwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from .. import ir
from .derivatives import diff, learnable_reads
from .rowstats import RowPlan, is_row_constant

DP = sympy.Symbol("dp", real=True)  # dO_i . v_j
DELTA = sympy.Symbol("delta", real=True)  # rowsum(dO * O)


class UnsupportedGradient(Exception):
    pass


@dataclass(frozen=True)
class Stat:
    """A row statistic kept by the forward for the backward."""

    stat: sympy.Expr  # RowSum(...), RowMax(...) or ir.visible
    symbol: sympy.Symbol  # stands for it in elementwise expressions
    kind: str  # "sum" | "max" | "count" (visible, counted) | "closed" (visible in closed form)
    arg: sympy.Expr | None  # the reduced elementwise expression, statistics as symbols
    pass_: int  # the forward pass accumulating it; 0 = closed form

    @property
    def selector(self):
        """Which keys the statistic's gradient flows to: all of them for a sum, the argmax for a max.
        (`>=` rather than `==`: the backward recomputes the argument and must still find the maximum if
        rounding lifts it above the stored one. Ties each get the full gradient; torch splits it.)"""
        if self.kind == "max":
            return sympy.Piecewise((1, self.arg >= self.symbol), (0, True))
        return sympy.Integer(1)


@dataclass(frozen=True)
class RowReduction:
    """A backward row sum over the keys, accumulated by the row-adjoint pass."""

    symbol: sympy.Symbol
    term: sympy.Expr  # elementwise, of s, dp and the statistics
    text: str  # what it sums, for `attnc ir`


@dataclass(frozen=True)
class Adjoint:
    stat: Stat
    symbol: sympy.Symbol  # Rbar
    value: sympy.Expr  # of delta, the statistics, row reductions and later adjoints


@dataclass(frozen=True)
class GradPlan:
    stats: tuple[Stat, ...]  # every statistic, visible included, in pass order
    probs: sympy.Expr  # F(s, r)
    dscore: sympy.Expr  # dS, of s, dp, the statistics and the adjoints
    learnable: tuple  # (derivatives.Read, its elementwise gradient term)
    adjoints: tuple[Adjoint, ...]  # in the order they are computed (reverse pass order)
    reductions: tuple[RowReduction, ...]  # the row-adjoint pass; empty: no pass needed

    @property
    def saved(self) -> tuple[Stat, ...]:
        """The statistics the forward stores: all but a closed-form visible."""
        return tuple(st for st in self.stats if st.kind != "closed")


def name_stats(expr, stats) -> sympy.Expr:
    """Replace each row statistic in expr by its symbol (innermost first)."""
    for st in stats:  # inner statistics first: an outer one reads as type(stat)(its named argument)
        if st.kind in ("sum", "max"):
            expr = expr.xreplace({type(st.stat)(st.arg): st.symbol})
    return expr


def _stats(rows: RowPlan) -> list[Stat]:
    """`visible` first (when the probabilities read it), then the reductions in pass order."""
    ordered = sorted(rows.stat_pass.items(), key=lambda kv: (kv[1], sympy.count_ops(kv[0]), sympy.srepr(kv[0])))
    out: list[Stat] = []
    if ir.visible in rows.stat_pass:
        pass_ = rows.stat_pass[ir.visible]
        out.append(Stat(ir.visible, ir.visible, "closed" if pass_ == 0 else "count", None, pass_))
    for stat, pass_ in ordered:
        if stat == ir.visible:
            continue
        kind = "sum" if isinstance(stat, ir.RowSum) else "max"
        n = sum(st.kind in ("sum", "max") for st in out) + 1
        # its argument with the statistics inside it (earlier passes, already in `out`) named
        out.append(Stat(stat, sympy.Symbol(f"r{n}", real=True), kind, name_stats(stat.args[0], out), pass_))
    return out


def _diff(expr, x):
    # powsimp turns sympy's p*x**p/x into p*x**(p - 1): finite at x = 0
    return sympy.powsimp(diff(expr, x), deep=True)


def proportional(expr, base):
    """c(r) with expr == c * base and c row-constant, or None."""
    if expr == 0:
        return sympy.Integer(0)
    if base == 0:
        return None
    ratio = sympy.simplify(sympy.piecewise_fold(expr / base))
    if ratio.has(sympy.nan, sympy.zoo) or not is_row_constant(ratio):
        return None
    return ratio


def plan_gradients(variant: ir.Variant, rows: RowPlan) -> GradPlan:
    if rows.softmax is not None:
        raise ValueError("softmax variants use the online-softmax backward")
    stats = _stats(rows)
    reducible = [st for st in stats if st.kind in ("sum", "max")]
    F = name_stats(variant.probs, stats)

    def grad_term(x):
        """dp * dF/dx + sum_k Rbar_k sel_k dg_k/dx, with the adjoints as symbols. factor_terms pulls
        out shared factors: softplus's dS reads sigmoid(lam s) lam (dp / r1 + rbar1), as a softmax's
        reads p (dp - delta)."""
        out = DP * _diff(F, x)
        for st, rbar in zip(reducible, _adjoint_symbols(reducible)):
            out += rbar * st.selector * _diff(st.arg, x)
        return sympy.factor_terms(out)

    dscore = grad_term(ir.s)
    learnable = [(read, grad_term(read.expr)) for read in learnable_reads(variant, [F] + [st.arg for st in reducible])]

    # row adjoints, latest statistic first: Rbar_m is known before any Rbar_k (k < m) reads it
    adjoints: list[Adjoint] = []
    reductions: list[RowReduction] = []
    symbols = dict(zip([st.symbol for st in reducible], _adjoint_symbols(reducible)))
    for k, st in reversed(list(enumerate(reducible))):
        dF = _diff(F, st.symbol)
        c = proportional(dF, F)
        if c is not None:
            value = c * DELTA
        else:
            a = sympy.Symbol(f"a{k + 1}", real=True)
            reductions.append(RowReduction(a, DP * dF, f"sum_kv dp * dP/d{st.symbol}"))
            value = a
        for later in reducible[k + 1:]:
            dg = _diff(later.arg, st.symbol)
            if dg == 0:
                continue
            c = proportional(dg, later.arg)
            if c is not None:
                via = c * later.symbol  # sum_l sel dg = c * sum_l sel g = c * r_m (sum or max alike)
            else:
                via = sympy.Symbol(f"b{reducible.index(later) + 1}_{k + 1}", real=True)
                reductions.append(RowReduction(via, later.selector * dg,
                                               f"sum_kv dg{str(later.symbol)[1:]}/d{st.symbol}"))
            value += symbols[later.symbol] * via
        adjoints.append(Adjoint(st, symbols[st.symbol], value))
    return GradPlan(tuple(stats), F, dscore, tuple(learnable), tuple(adjoints), tuple(reversed(reductions)))


def with_probs_gradient(plan: GradPlan, extra) -> GradPlan:
    """The plan for a loss with one more term per entry of dLoss/dP (`extra`, of the statistics, the
    weights' own log and row values): dp becomes dp + extra wherever the chain rule reads it (dS, the
    learnable reads' terms, the backward row reductions). The adjoints read dp only through delta =
    rowsum(dp * P) and those reductions; the caller adds rowsum(extra * P) to delta."""
    shifted = {DP: DP + extra}
    return GradPlan(
        plan.stats, plan.probs, sympy.factor_terms(plan.dscore.xreplace(shifted)),
        tuple((read, sympy.factor_terms(term.xreplace(shifted))) for read, term in plan.learnable),
        plan.adjoints,
        tuple(RowReduction(r.symbol, r.term.xreplace(shifted), r.text) for r in plan.reductions),
    )


def _adjoint_symbols(reducible):
    return [sympy.Symbol(f"rbar{str(st.symbol)[1:]}", real=True) for st in reducible]
