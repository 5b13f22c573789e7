"""Row statistics: how the probabilities of a variant are computed, and in how many passes over the keys.

The probabilities `P[i, j]` are an expression of the score and of row statistics (`rowsum`, `rowmax`,
`visible`), each a reduction over row i's unmasked keys. This module decides

1. whether `P` is a softmax, possibly with an extra "sink" logit that has no value:
   `exp(x - r) / (rowsum(exp(x - r)) + E)` for a row-constant `r` and `E`. Those run online in one
   pass (running max with rescaling), as FlashAttention does;
2. otherwise, how to write the output `o[i] = sum_j P[i, j] v[j]` as `sum_t c_t(i) * sum_j w_t(i, j) v[j]`
   with row-constant coefficients `c_t` and elementwise weights `w_t`, and which pass accumulates each
   row statistic: a statistic whose argument needs another statistic comes one pass after it;
3. `visible` in closed form where the mask bounds `kv` by linear constraints (`q + 1` for causal).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from .. import ir


# ---- classification of expressions ----
def is_row_constant(expr) -> bool:
    """Constant along a query row: no raw score, no key index (row statistics are row-constant)."""
    expr = sympy.sympify(expr)
    # the arguments of a statistic are reduced away; xreplace swaps outermost statistics first
    expr = expr.xreplace({stat: sympy.Dummy() for stat in expr.atoms(ir.RowStat)})
    return not (expr.free_symbols & {ir.s, ir.kv})


def _split_add(expr):
    return list(expr.args) if isinstance(expr, sympy.Add) else [expr]


# ---- softmax recognition ----
@dataclass(frozen=True)
class SoftmaxForm:
    """P = exp(logits) / (sum_j exp(logits) + exp(sink)); sink is None when there is none.

    The logits leave out the row constants of the exponent, which softmax ignores; `offset` is the part
    of them that is not a statistic (`qb[b, h, q]` in `s + qb[b, h, q]`, not the `-rowmax` kept for
    stability), so the score as written is logits + offset and its sink sink + offset. The log-sum-exp
    the kernels return, and the gradients of what the offset reads, are in those terms: with a sink,
    the softmax is not invariant to the offset, and a log-sum-exp merge needs the true one."""

    logits: sympy.Expr
    sink: sympy.Expr | None
    offset: sympy.Expr


def recognize_softmax(probs) -> SoftmaxForm | None:
    numer, denom = sympy.fraction(sympy.sympify(probs), exact=True)
    if not isinstance(numer, sympy.exp):
        return None
    exponent = numer.args[0]
    elementwise = sympy.Add(*[t for t in _split_add(exponent) if not is_row_constant(t)])
    shift = sympy.Add(*[t for t in _split_add(exponent) if is_row_constant(t)])
    if elementwise == 0:
        return None
    rowsum_terms = [t for t in _split_add(denom) if isinstance(t, ir.RowSum) and t.args[0] == numer]
    if len(rowsum_terms) != 1:
        return None
    extra = sympy.Add(*[t for t in _split_add(denom) if t is not rowsum_terms[0]])
    if not is_row_constant(extra):
        return None
    offset = sympy.Add(*[t for t in _split_add(shift) if not sympy.sympify(t).atoms(ir.RowStat)])
    if extra == 0:
        return SoftmaxForm(elementwise, None, offset)
    # exp(x + r) / (sum exp(x + r) + E)  ==  exp(x) / (sum exp(x) + E exp(-r)): the sink logit is log(E) - r
    sink = sympy.expand_log(sympy.log(extra), force=True) - shift
    sink = sympy.simplify(sink)
    if sink.atoms(ir.RowStat) or not is_row_constant(sink):
        return None
    return SoftmaxForm(elementwise, sink, offset)


def without_sink(probs):
    """A softmax with a sink, `exp(x) / (rowsum(exp(x)) + E)`, as the plain softmax `exp(x) / rowsum(exp(x))`
    (None when `probs` has no sink): what a split of the keys computes per part, the sink being added
    once to the merged rows (context parallelism)."""
    form = recognize_softmax(probs)
    if form is None or form.sink is None:
        return None
    numer, denom = sympy.fraction(sympy.sympify(probs), exact=True)
    rowsum = next(t for t in _split_add(denom) if isinstance(t, ir.RowSum) and t.args[0] == numer)
    return numer / rowsum


# ---- visible in closed form ----
def kv_bounds(mask):
    """(lo, hi) with mask == (lo <= kv <= hi) when the mask is a conjunction of linear bounds on kv
    with unit coefficient, else None. Either bound may be None (unbounded on that side)."""
    mask = sympy.sympify(mask)
    atoms = list(mask.args) if isinstance(mask, sympy.And) else [mask]
    lo, hi = [], []
    for atom in atoms:
        if atom is sympy.true:
            continue
        if not isinstance(atom, (sympy.Le, sympy.Lt, sympy.Ge, sympy.Gt)):
            return None
        diff = sympy.expand(atom.lhs - atom.rhs)  # diff (rel) 0
        coeff = diff.coeff(ir.kv)
        rest = sympy.expand(diff - coeff * ir.kv)
        if coeff not in (1, -1) or ir.kv in rest.free_symbols or rest.atoms(sympy.Function) - rest.atoms(sympy.core.function.AppliedUndef) and ir.kv in sympy.sympify(rest).free_symbols:
            return None
        if any(ir.kv in a.free_symbols for a in rest.atoms(sympy.Function)):
            return None
        strict = isinstance(atom, (sympy.Lt, sympy.Gt))
        upper = isinstance(atom, (sympy.Le, sympy.Lt)) == (coeff == 1)  # kv below something
        bound = -rest * coeff  # kv (rel) bound
        if upper:
            hi.append(bound - 1 if strict else bound)
        else:
            lo.append(bound + 1 if strict else bound)
    return (sympy.Max(*lo) if lo else None, sympy.Min(*hi) if hi else None)


def visible_closed_form(mask):
    """The number of keys row q sees, in closed form, or None when it must be counted."""
    if mask is sympy.true:
        return ir.SIZES["Lk"]
    bounds = kv_bounds(mask)
    if bounds is None:
        return None
    lo, hi = bounds
    lo = sympy.Integer(0) if lo is None else sympy.Max(lo, 0)
    hi = ir.SIZES["Lk"] - 1 if hi is None else sympy.Min(hi, ir.SIZES["Lk"] - 1)
    return sympy.Max(hi - lo + 1, 0)


# ---- the pass plan ----
@dataclass(frozen=True)
class OutputTerm:
    """o[i] += coefficient(i) * sum_j weight(i, j) * v[j]."""

    weight: sympy.Expr
    coefficient: sympy.Expr


@dataclass(frozen=True)
class RowPlan:
    softmax: SoftmaxForm | None  # set when the probabilities run as an online softmax
    stat_pass: dict  # row statistic -> the pass (1-based) that accumulates it; 0 = closed form
    visible: sympy.Expr | None  # closed form of `visible`, when there is one
    terms: tuple[OutputTerm, ...]
    output_pass: int
    passes: int

    @property
    def has_lse(self) -> bool:
        return self.softmax is not None

    @property
    def stats_in_order(self):
        return sorted(self.stat_pass.items(), key=lambda kv_: (kv_[1], sympy.srepr(kv_[0])))


def output_terms(probs) -> list[OutputTerm]:
    probs = sympy.sympify(probs)
    if isinstance(probs, sympy.Piecewise) and all(is_row_constant(c) for _, c in probs.args):
        terms = []
        taken = sympy.false
        for value, cond in probs.args:
            indicator = sympy.Piecewise((1, sympy.And(cond, sympy.Not(taken))), (0, True))
            terms += [OutputTerm(t.weight, t.coefficient * indicator) for t in output_terms(value)]
            taken = sympy.Or(taken, cond)
        return _merge_terms(terms)
    if isinstance(probs, sympy.Add):
        return _merge_terms([t for arg in probs.args for t in output_terms(arg)])
    factors = probs.args if isinstance(probs, sympy.Mul) else (probs,)
    coefficient = sympy.Mul(*[f for f in factors if is_row_constant(f)])
    weight = sympy.Mul(*[f for f in factors if not is_row_constant(f)])
    return [OutputTerm(weight, coefficient)]


def _merge_terms(terms):
    merged: dict = {}
    for t in terms:
        merged[t.weight] = merged.get(t.weight, 0) + t.coefficient
    return [OutputTerm(w, c) for w, c in merged.items() if c != 0]


def plan_rows(variant: ir.Variant) -> RowPlan:
    softmax = recognize_softmax(variant.probs)
    # a select hides key tiles chosen at run time: the keys a row sees are counted, never the mask's form
    closed = visible_closed_form(variant.mask) if variant.select is None else None
    if softmax is not None:
        return RowPlan(softmax, {}, closed, (OutputTerm(sympy.exp(softmax.logits), 1),), 1, 1)

    stat_pass: dict = {}

    def final_pass(stat) -> int:
        if stat in stat_pass:
            return stat_pass[stat]
        if stat == ir.visible:
            stat_pass[stat] = 0 if closed is not None else 1
        else:
            inner = ir.row_stats(stat.args[0])
            stat_pass[stat] = 1 + max((final_pass(x) for x in inner), default=0)
        return stat_pass[stat]

    terms = output_terms(variant.probs)
    output_pass = 1
    for term in terms:
        for stat in ir.row_stats(term.weight):
            output_pass = max(output_pass, final_pass(stat) + 1)
        for stat in ir.row_stats(term.coefficient):
            final_pass(stat)
    passes = max([output_pass, *stat_pass.values()])
    return RowPlan(None, stat_pass, closed, tuple(terms), output_pass, passes)
