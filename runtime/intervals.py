"""Interval arithmetic over batches of cells, for tile plans.

A cell is a rectangle of (query, key) pairs: queries [q_lo, q_hi] x keys [kv_lo, kv_hi], for one
batch entry b and query head h. Generated `_mask_cells` functions evaluate a spec's mask over a
whole batch of cells at once with the functions below: every integer or real sub-expression becomes
an interval `(lo, hi)` (tensors [N], or plain numbers for constants) that contains every value the
expression takes inside each cell, and every boolean becomes a pair `(all, any)`:

    all  True only if the expression is true for every pair in the cell
    any  False only if the expression is false for every pair in the cell

Both are sound bounds, never guesses: a cell with `any` False holds no unmasked pair, a cell with
`all` True holds no masked pair. On a single pair (q_lo == q_hi, kv_lo == kv_hi) every operation is
exact, so refining cells down to single pairs always settles them (runtime/plan.py relies on this).
"""

from __future__ import annotations

import math

import torch

INF = math.inf


# ---- numbers or tensors, alike ----
def _is_t(x) -> bool:
    return isinstance(x, torch.Tensor)


def _min(a, b):
    if not _is_t(a) and not _is_t(b):
        return min(a, b)
    return torch.minimum(*_promote(a, b))


def _max(a, b):
    if not _is_t(a) and not _is_t(b):
        return max(a, b)
    return torch.maximum(*_promote(a, b))


def _promote(a, b):
    like = a if _is_t(a) else b
    a = a if _is_t(a) else torch.as_tensor(a, device=like.device)
    b = b if _is_t(b) else torch.as_tensor(b, device=like.device)
    if a.dtype != b.dtype:
        dtype = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dtype), b.to(dtype)
    return a, b


def _where(c, a, b):
    if not _is_t(c):
        return a if c else b
    return torch.where(c, *_promote(a, b)) if (_is_t(a) or _is_t(b)) else torch.where(c, a, b)


def _and(a, b):
    if not _is_t(a) and not _is_t(b):
        return a and b
    return a & b if _is_t(a) and _is_t(b) else (a if b is True else b if a is True else False)


def _or(a, b):
    if not _is_t(a) and not _is_t(b):
        return a or b
    return a | b if _is_t(a) and _is_t(b) else (a if b is False else b if a is False else True)


def _not(a):
    return ~a if _is_t(a) else not a


def _floordiv(a, d):
    if _is_t(a) or _is_t(d):
        a, d = _promote(a, d)
        return torch.div(a, d, rounding_mode="floor")
    return a // d


def _lt(a, b):
    return a < b


def _le(a, b):
    return a <= b


def _eq(a, b):
    return a == b


# ---- constants ----
def point(x):
    """An exact value as an interval."""
    return (x, x)


# ---- arithmetic ----
def add(*xs):
    return _endpointwise(lambda a, b: a + b, xs)


def neg(x):
    return -x[1], -x[0]


def mul(*xs):
    lo, hi = xs[0]
    for y_lo, y_hi in xs[1:]:
        corners = [lo * y_lo, lo * y_hi, hi * y_lo, hi * y_hi]
        lo, hi = corners[0], corners[0]
        for c in corners[1:]:
            lo, hi = _min(lo, c), _max(hi, c)
    return lo, hi


def power(x, n):
    """x ** n for a constant exponent n."""
    lo, hi = x
    if isinstance(n, int) or float(n).is_integer():
        n = int(n)
        if n == 0:
            return 1, 1
        if n < 0:
            return reciprocal(power(x, -n))
        if n % 2:
            return lo ** n, hi ** n
        # even powers: smallest at the value nearest 0
        big = _max(lo ** n, hi ** n)
        small = _where(_and(_le(lo, 0), _le(0, hi)), 0, _min(lo ** n, hi ** n))
        return small, big
    # a real exponent: defined for x >= 0 and monotone there (increasing for n > 0)
    lo, hi = _max(lo, 0), _max(hi, 0)
    if n > 0:
        return lo ** n, hi ** n
    return reciprocal((lo ** -n, hi ** -n))


def reciprocal(x):
    lo, hi = x
    straddles = _and(_le(lo, 0), _le(0, hi))
    safe_lo = _where(straddles, 1, lo)
    safe_hi = _where(straddles, 1, hi)
    return _where(straddles, -INF, 1 / safe_hi), _where(straddles, INF, 1 / safe_lo)


def floordiv(x, d):
    """x // d, rounding down. For d > 0 (the case in masks) the result is monotone in x; otherwise
    the four corners bound it when d keeps one sign, and nothing does when d may be 0."""
    (lo, hi), (d_lo, d_hi) = x, d
    if not _is_t(d_lo) and not _is_t(d_hi) and d_lo == d_hi and d_lo > 0:
        return _floordiv(lo, d_lo), _floordiv(hi, d_lo)
    one_sign = _or(_lt(0, d_lo), _lt(d_hi, 0))
    s_lo, s_hi = _where(one_sign, d_lo, 1), _where(one_sign, d_hi, 1)
    corners = [_floordiv(a, e) for a in (lo, hi) for e in (s_lo, s_hi)]
    c_lo, c_hi = corners[0], corners[0]
    for c in corners[1:]:
        c_lo, c_hi = _min(c_lo, c), _max(c_hi, c)
    # a divisor that is exactly 0 gives 0 (the language's x // 0): exact on points
    zero = _and(_eq(d_lo, 0), _eq(d_hi, 0))
    return _where(zero, 0, _where(one_sign, c_lo, -INF)), _where(zero, 0, _where(one_sign, c_hi, INF))


def mod(x, d):
    """x % d (Python's sign convention: the sign of d). Exact while x stays in one period of a fixed
    d != 0: then x % d runs from lo % d to hi % d; otherwise only d's range bounds it."""
    (lo, hi), (d_lo, d_hi) = x, d
    fixed = _and(_eq(d_lo, d_hi), _not(_eq(d_lo, 0)))
    safe_d = _where(fixed, d_lo, 1)
    one_period = _and(fixed, _eq(_floordiv(lo, safe_d), _floordiv(hi, safe_d)))
    bound_lo = _where(_lt(0, d_lo), 0, _min(d_lo + 1, 0))
    bound_hi = _where(_lt(0, d_lo), d_hi - 1, _max(d_hi - 1, 0))
    # x % 0 is x: a divisor that is exactly 0 gives x's own interval; one that may be 0 adds it
    zero = _and(_eq(d_lo, 0), _eq(d_hi, 0))
    may_be_zero = _and(_le(d_lo, 0), _le(0, d_hi))
    bound_lo = _where(may_be_zero, _min(bound_lo, lo), bound_lo)
    bound_hi = _where(may_be_zero, _max(bound_hi, hi), bound_hi)
    out_lo = _where(one_period, _mod(lo, safe_d), bound_lo)
    out_hi = _where(one_period, _mod(hi, safe_d), bound_hi)
    return _where(zero, lo, out_lo), _where(zero, hi, out_hi)


def _mod(a, d):
    if _is_t(a) or _is_t(d):
        a, d = _promote(a, d)
        return torch.remainder(a, d)
    return a % d


def rshift(x, n):
    """x >> n = x // 2**n: monotone increasing in x; decreasing in n for x >= 0, increasing for x < 0."""
    (lo, hi), (n_lo, n_hi) = x, n
    corners = [_floordiv(a, 2 ** e) if not _is_t(e) else _floordiv(a, torch.pow(2, e)) for a in (lo, hi) for e in (n_lo, n_hi)]
    c_lo, c_hi = corners[0], corners[0]
    for c in corners[1:]:
        c_lo, c_hi = _min(c_lo, c), _max(c_hi, c)
    return c_lo, c_hi


def floor_log2(x):
    """floor(log2(x)) for integers x >= 1 (values below 1 are clamped to 1, as the kernels do)."""
    def ilog2(v):
        if _is_t(v):
            return torch.floor(torch.log2(v.double().clamp(min=1))).long()
        return int(max(v, 1)).bit_length() - 1
    return ilog2(x[0]), ilog2(x[1])


def absolute(x):
    lo, hi = x
    nonneg, nonpos = _le(0, lo), _le(hi, 0)
    new_lo = _where(nonneg, lo, _where(nonpos, -hi, 0))
    new_hi = _where(nonneg, hi, _where(nonpos, -lo, _max(-lo, hi)))
    return new_lo, new_hi


def _endpointwise(fn, xs):
    """Monotone in every argument: apply fn to the lower ends and to the upper ends."""
    lo, hi = xs[0]
    for x_lo, x_hi in xs[1:]:
        lo, hi = fn(lo, x_lo), fn(hi, x_hi)
    return lo, hi


def minimum(*xs):
    return _endpointwise(_min, xs)


def maximum(*xs):
    return _endpointwise(_max, xs)


def _sigmoid(v):
    return 1 / (1 + math.exp(-v)) if v > -700 else 0.0


def _softplus(v):
    return max(v, 0) + math.log1p(math.exp(-abs(v)))


_MONOTONE = {  # non-decreasing functions: (on tensors, on numbers)
    "exp": (torch.exp, math.exp),
    "exp2": (lambda v: torch.pow(2, v), lambda v: 2 ** v),
    "log": (lambda v: torch.log(v.double()), lambda v: math.log(v) if v > 0 else -INF),
    "log2": (lambda v: torch.log2(v.double()), lambda v: math.log2(v) if v > 0 else -INF),
    "sqrt": (lambda v: torch.sqrt(v.double()), lambda v: math.sqrt(v) if v >= 0 else math.nan),
    "floor": (torch.floor, math.floor),
    "ceil": (torch.ceil, math.ceil),
    "tanh": (torch.tanh, math.tanh),
    "sigmoid": (torch.sigmoid, _sigmoid),
    "softplus": (torch.nn.functional.softplus, _softplus),
    "relu": (torch.relu, lambda v: max(v, 0)),
    "step": (lambda v: (v > 0).to(v.dtype), lambda v: 1 if v > 0 else 0),
    "erf": (lambda v: torch.special.erf(v.double()), math.erf),
}


def monotone(name: str, x):
    """A non-decreasing function (exp, log, sqrt, floor, sigmoid, ...) maps bounds to bounds."""
    on_tensor, on_number = _MONOTONE[name]
    apply = lambda v: on_tensor(v if v.is_floating_point() or name in ("exp2",) else v.double()) if _is_t(v) else on_number(v)
    return apply(x[0]), apply(x[1])


_BOUNDED = {  # (on tensors, on numbers, the bound of the function over any interval)
    "sin": (torch.sin, math.sin, (-1.0, 1.0)),
    "cos": (torch.cos, math.cos, (-1.0, 1.0)),
    "tan": (torch.tan, lambda v: math.tan(v), (-INF, INF)),
}


def bounded(name: str, x):
    """sin, cos, tan: exact on points (so refinement down to single pairs settles every cell), and
    otherwise the function's bound over all reals ([-1, 1]; tan: everything), which is sound."""
    on_tensor, on_number, (b_lo, b_hi) = _BOUNDED[name]
    lo, hi = x
    apply = lambda v: on_tensor(v.double()) if _is_t(v) else on_number(v)
    value = apply(lo)
    point = _eq(lo, hi)
    return _where(point, value, b_lo), _where(point, value, b_hi)


# ---- bitwise operators on integers (two's complement, as Python) ----
def _bit_length(m):
    """The number of bits of m >= 0 (as a float tensor or an int): 0 for 0."""
    if _is_t(m):
        m = m.double()
        # float rounding can only raise the count (powers of two are exact): a wider bound, still sound
        return torch.where(m > 0, torch.floor(torch.log2(torch.clamp(m, min=1))) + 1, torch.zeros_like(m))
    return int(m).bit_length() if not math.isnan(m) and abs(m) != INF else INF


def _span_bits(x):
    """k such that every value of interval x lies in [-2**k, 2**k - 1]."""
    lo, hi = x
    return _bit_length(_max(_max(hi, 0), _max(-lo - 1, 0)))


def _pow2(k):
    return torch.pow(2.0, k) if _is_t(k) else (2.0 ** k if k != INF else INF)


def _exact_bits(fn, a, b):
    """fn on the lower ends, as integers (used where both intervals are points)."""
    x, y = a[0], b[0]
    if _is_t(x) or _is_t(y):
        x = x.long() if _is_t(x) else torch.as_tensor(int(x) if abs(x) != INF else 0)
        y = y.long() if _is_t(y) else torch.as_tensor(int(y) if abs(y) != INF else 0)
        return fn(x, y)
    return fn(int(x), int(y))


def _bitwise(a, b, fn, nonneg_bound):
    """Exact where both are points; where both are non-negative the op's own bound; otherwise the
    two's complement range both operands fit in, which holds every bitwise result of them."""
    k = _max(_span_bits(a), _span_bits(b))
    general = (-_pow2(k), _pow2(k) - 1)
    both_nonneg = _and(_le(0, a[0]), _le(0, b[0]))
    lo_nn, hi_nn = nonneg_bound(a, b, k)
    point = _and(_eq(a[0], a[1]), _eq(b[0], b[1]))
    exact = _exact_bits(fn, a, b)
    lo = _where(point, exact, _where(both_nonneg, lo_nn, general[0]))
    hi = _where(point, exact, _where(both_nonneg, hi_nn, general[1]))
    return lo, hi


def bitand(a, b):
    # x & y with y >= 0 lies in [0, y]; with both >= 0 in [0, min(x, y)]
    lo, hi = _bitwise(a, b, lambda x, y: x & y, lambda a, b, k: (0, _min(a[1], b[1])))
    a_nn, b_nn = _le(0, a[0]), _le(0, b[0])
    only_one = _and(_or(a_nn, b_nn), _not(_and(a_nn, b_nn)))  # one operand >= 0, the other maybe not
    only_one = _and(only_one, _not(_and(_eq(a[0], a[1]), _eq(b[0], b[1]))))
    return _where(only_one, 0, lo), _where(only_one, _where(a_nn, a[1], b[1]), hi)


def bitor(a, b):
    # both >= 0: at least the larger operand, below the next power of two of the larger bound
    return _bitwise(a, b, lambda x, y: x | y, lambda a, b, k: (_max(a[0], b[0]), _pow2(k) - 1))


def bitxor(a, b):
    return _bitwise(a, b, lambda x, y: x ^ y, lambda a, b, k: (0, _pow2(k) - 1))


def lshift(x, n):
    """x << n = x * 2**n for a constant n >= 0: monotone increasing in x."""
    factor = 2 ** int(n[0])
    return x[0] * factor, x[1] * factor


def select(cond, a, b):
    """`a if cond else b` over cells: one branch where cond is settled, both where it is not."""
    all_, any_ = cond
    lo = _where(all_, a[0], _where(_not(any_), b[0], _min(a[0], b[0])))
    hi = _where(all_, a[1], _where(_not(any_), b[1], _max(a[1], b[1])))
    return lo, hi


def select_bool(cond, a, b):
    """`a if cond else b` for conditions."""
    c_all, c_any = cond
    all_ = _where(c_all, a[0], _where(_not(c_any), b[0], _and(a[0], b[0])))
    any_ = _where(c_all, a[1], _where(_not(c_any), b[1], _or(a[1], b[1])))
    return all_, any_


# ---- comparisons and logic: (all, any) ----
def lt(a, b):
    return _lt(a[1], b[0]), _lt(a[0], b[1])


def le(a, b):
    return _le(a[1], b[0]), _le(a[0], b[1])


def eq(a, b):
    exact = _and(_and(_eq(a[0], a[1]), _eq(b[0], b[1])), _eq(a[0], b[0]))
    return exact, _and(_le(a[0], b[1]), _le(b[0], a[1]))


def ne(a, b):
    return logical_not(eq(a, b))


def logical_and(*xs):
    return _endpointwise(_and, xs)


def logical_or(*xs):
    return _endpointwise(_or, xs)


def logical_not(x):
    return _not(x[1]), _not(x[0])


TRUE = (True, True)
FALSE = (False, False)


def truth(x):
    """A number used as a condition (a bool tensor input, 0 or 1): true where it is non-zero."""
    lo, hi = x
    nonzero_lo, nonzero_hi = _or(_lt(0, lo), _lt(hi, 0)), _or(_lt(0, hi), _lt(lo, 0))
    return nonzero_lo, nonzero_hi
