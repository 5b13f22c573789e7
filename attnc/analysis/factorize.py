"""Linear attention: does the weight factorize into per-query and per-key feature vectors?

The output of a spec is `o[i] = sum_j P[i, j] v[j]` over the unmasked keys. When

    P[i, j] = alpha_i * W[i, j] + beta_i,      W[i, j] = c * decay^(i - j) * dot(f(q_i), g(k_j))

with row-constant `alpha_i`, `beta_i` (they may use `rowsum(W)`, `visible`, sizes, params, per-head
inputs), a per-head `decay` and a full or causal mask, the output needs no Lq x Lk matrix:

    o[i] = alpha_i * f(q_i) . S_i + beta_i * sum_j v[j],   S_i = sum_{j visible} decay^(i-j) g(k_j) v[j]^T
    rowsum(W)_i = f(q_i) . z_i,                          z_i = sum_{j visible} decay^(i-j) g(k_j)

and the chunked algorithm computes it in O(L * F * Dv) (attnc/runtime/linear.py). Two kinds of `W`
factorize here:

- `dot(phi(q), phi(k))` of a declared feature map (`feature phi(x) = elu(x) + 1`): f = g = phi,
  elementwise, F = Dqk; or `dot(phi_q(q), phi_k(k))` of two maps (untied, as Hedgehog's): f = phi_q,
  g = phi_k, of equal widths F;
- a polynomial of the raw score `s = scale * q.k` of degree <= 2 with numeric coefficients
  (Based's `1 + s + s*s/2`): f, g = [sqrt c0, sqrt c1 x', sqrt c2 vec(x' x'^T)] with
  x' = x * scale^(1/2) (F = 1 + D + D^2); a negative coefficient moves its sign to f.

Anything else (a sliding window, a softmax, a score transform that does not factorize) keeps the
quadratic kernels; `reason` says why.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

import sympy
from sympy.core.function import AppliedUndef

from .. import ir

R = sympy.Symbol("_rowsum_w", real=True)  # rowsum(W) in alpha and beta
_W = sympy.Symbol("_w", real=True)


@dataclass(frozen=True)
class Factorization:
    causal: bool
    feature: str | None  # name of the feature map, or None for a polynomial of s
    feature_body: sympy.Expr | None  # of ir.FEATURE_X
    poly: tuple[float, float, float] | None  # c0, c1, c2 of c0 + c1 s + c2 s^2
    coef: sympy.Expr  # constant factor of W (folded into alpha by the generator)
    decay: sympy.Expr | None  # base of decay^(q - kv): a per-head load, a param or a number
    alpha: sympy.Expr  # of R (rowsum W), visible, sizes, params, per-head loads
    beta: sympy.Expr
    key_feature: str | None = None  # the keys' feature map where it is another one (untied maps)
    key_feature_body: sympy.Expr | None = None

    @property
    def needs_rowsum(self) -> bool:
        return R in self.alpha.free_symbols or R in sympy.sympify(self.beta).free_symbols

    def describe(self) -> str:
        if self.feature is not None:
            w = f"dot({self.feature}(q), {self.key_feature or self.feature}(k))"
        else:
            w = " + ".join(f"{c:g}*s^{d}" for d, c in enumerate(self.poly) if c)
        if self.decay is not None:
            w = f"{self.decay}^(q - kv) * ({w})"
        norm = "rowsum" if self.needs_rowsum else "none"
        return f"W = {w}; mask {'causal' if self.causal else 'full'}; normalization {norm}"


class AlgorithmKind(enum.Enum):
    CHUNKED = "chunked"  # linear attention: the weight factorizes, a running state per chunk
    QUADRATIC = "quadratic"  # every query meets every key it sees (the tile walks)


@dataclass(frozen=True)
class Algorithm:
    name: str  # "chunked" | "quadratic": the kind's value, as `attnc ir` and the modules print it
    reason: str
    factorization: Factorization | None = None
    failed_at: ir.Statement | None = None  # quadratic: the statement that does not factorize, None if unknown

    @property
    def kind(self) -> AlgorithmKind:
        return AlgorithmKind.QUADRATIC if self.factorization is None else AlgorithmKind.CHUNKED


def _quadratic(failed_at: ir.Statement, reason: str) -> Algorithm:
    return Algorithm("quadratic", reason, failed_at=failed_at)


def _mask_kind(mask) -> str | None:
    if mask is sympy.true:
        return "full"
    if not (mask.free_symbols <= {ir.q, ir.kv}) or mask.atoms(AppliedUndef):
        return None
    for i, j in itertools.product(range(10), repeat=2):
        value = mask.subs({ir.q: i, ir.kv: j})
        if value not in (sympy.true, sympy.false) or (value is sympy.true) != (j <= i):
            return None
    return "causal"


def _row_constant(expr) -> bool:
    expr = sympy.sympify(expr)
    return not (expr.free_symbols & {ir.s, ir.kv}) and not any(ir.feature_dot_names(x) for x in expr.free_symbols)


def _split_weight(w):
    """W -> (coef, decay base, core) or a reason it is not `c * decay^(q - kv) * core`."""
    coef, decay, core = sympy.Integer(1), None, []
    for factor in sympy.Mul.make_args(sympy.expand_power_base(w, force=True)):
        if isinstance(factor, sympy.Pow) and sympy.expand(factor.exp - (ir.q - ir.kv)) == 0:
            if decay is not None:
                return "two decays"
            decay = factor.base
            if decay.free_symbols & {ir.q, ir.kv, ir.s} or any(
                    ir.q in a.free_symbols or ir.kv in a.free_symbols for a in decay.atoms(AppliedUndef)):
                return "the decay's base depends on the query, the key or the score"
        elif factor.is_number:
            coef *= factor
        else:
            core.append(factor)
    return coef, decay, sympy.Mul(*core)


def factorize(v: ir.Variant) -> Algorithm:
    """The algorithm for `v`: "chunked" with its factorization, or "quadratic" with the reason."""
    try:
        return _factorize(v)
    except (TypeError, ValueError, AttributeError, sympy.PolynomialError) as err:  # sympy on odd input
        return Algorithm("quadratic", f"the factorization analysis gave up ({type(err).__name__})")


def _factorize(v: ir.Variant) -> Algorithm:
    kind = _mask_kind(v.mask)
    if kind is None:
        return _quadratic(ir.Statement.MASK, "the mask is neither full nor causal (kv <= q), so no running state covers it")
    probs = sympy.sympify(v.probs)
    if probs.atoms(ir.RowMax):
        return _quadratic(ir.Statement.PROBS, "probs uses rowmax: a softmax does not factorize")
    sums = probs.atoms(ir.RowSum)
    if len(sums) > 1:
        return _quadratic(ir.Statement.PROBS, "probs uses more than one row sum")
    if sums:
        (stat,) = sums
        w = stat.args[0]
        expr = probs.xreplace({stat: R}).xreplace({w: _W})
        if not _row_constant(expr):
            expr = expr.subs(w, _W)
    else:
        w, expr = probs, _W
    if not _row_constant(expr) or sympy.diff(expr, _W, 2) != 0 or not _row_constant(sympy.diff(expr, _W)):
        return _quadratic(ir.Statement.PROBS, "probs is not alpha_i * W + beta_i with row-constant alpha, beta")
    alpha, beta = sympy.simplify(sympy.diff(expr, _W)), sympy.simplify(expr.subs(_W, 0))
    split = _split_weight(w)
    if isinstance(split, str):
        return _quadratic(ir.Statement.PROBS, split)
    coef, decay, core = split
    if decay is not None and kind != "causal":
        return _quadratic(ir.Statement.MASK, "a decay^(q - kv) needs a causal mask (it grows for kv > q)")
    dots = {x for x in core.free_symbols if ir.feature_dot_names(x)}
    feature = key_feature = body = key_body = poly = None
    if dots:
        (dot,) = dots if len(dots) == 1 else (None,)
        if dot is None or core != dot:
            return _quadratic(ir.Statement.PROBS, "the weight is not c * dot(phi(q), phi(k)) (times a decay)")
        feature, key_feature = ir.feature_dot_names(dot)
        body = dict(v.features)[feature]
        key_body = None if key_feature == feature else dict(v.features)[key_feature]
    else:
        if core.free_symbols != {ir.s} or not core.is_polynomial(ir.s):
            return _quadratic(ir.Statement.PROBS, "the weight is not a polynomial of s alone (times a decay)")
        p = sympy.Poly(sympy.expand(core), ir.s)
        if p.degree() > 2 or not all(c.is_number for c in p.all_coeffs()):
            return _quadratic(ir.Statement.PROBS, "the weight is not a polynomial of s of degree <= 2 with numeric "
                                          "coefficients")
        c = [float(p.coeff_monomial(ir.s ** d)) for d in range(3)]
        poly = (c[0], c[1], c[2])
    if v.score != ir.s:
        return _quadratic(ir.Statement.SCORE, "a score transform other than s does not factorize")
    row = sympy.Add(alpha, beta)
    if ir.SIZES["Lq"] in row.free_symbols:
        return _quadratic(ir.Statement.PROBS, "alpha_i and beta_i read Lq, which a running state does not know")
    other = [load for e in (row, decay) if e is not None for load in sympy.sympify(e).atoms(AppliedUndef)
             if load.args != (ir.h,)]
    if other:
        read = f"{other[0].func.__name__}[{', '.join(map(str, other[0].args))}]"
        return _quadratic(ir.Statement.PROBS, f"alpha_i, beta_i and the decay may read per-head inputs only (x[h]), "
                          f"not {read}")
    fact = Factorization(kind == "causal", feature, body, poly, coef, decay, alpha, beta, key_feature, key_body)
    return Algorithm("chunked", fact.describe(), fact)
