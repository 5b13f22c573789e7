"""Triton device functions that generated kernels call for the language's integer and real functions.

Triton's `//` and `%` truncate towards zero (C semantics); the language, like Python, floors. The
printer emits plain `//` and `%` when both operands are provably non-negative and these helpers
otherwise.
"""

import triton
import triton.language as tl


@triton.jit
def floordiv(a, b):
    """a // b rounding down; a // 0 is 0 (the language's rule)."""
    safe = tl.where(b == 0, 1, b)
    quotient = a // safe
    inexact = (a % safe) != 0
    return tl.where(b == 0, 0, tl.where(inexact & ((a < 0) != (safe < 0)), quotient - 1, quotient))


@triton.jit
def floormod(a, b):
    """a % b with the sign of b; a % 0 is a."""
    safe = tl.where(b == 0, 1, b)
    remainder = a % safe
    wrapped = tl.where((remainder != 0) & ((remainder < 0) != (safe < 0)), remainder + safe, remainder)
    return tl.where(b == 0, a, wrapped)


@triton.jit
def ilog2(x):
    """floor(log2(x)) for integers x >= 1, exact: the float estimate is corrected by one step each way.

    x < 1 reads as 1 (giving 0): such values only occur in `where` branches that are discarded (radial's
    `T >> floor(log2(dist))` at dist = 0), where log2(0) = -inf would make an invalid integer cast."""
    x = tl.maximum(x, 1)
    e = tl.floor(tl.log2(x.to(tl.float32))).to(tl.int32)
    e = tl.where((1 << e) > x, e - 1, e)
    e = tl.where((1 << (e + 1)) <= x, e + 1, e)
    return e


@triton.jit
def sigmoid(x):
    # [Note] exp(-|x|) is in (0, 1]: no overflow (1 / (1 + exp(-x)) overflows, harmlessly but loudly,
    # for x < -88 in fp32)
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def softplus(x):
    # [Note] log(1 + exp(x)) overflows for large x; max(x, 0) + log(1 + exp(-|x|)) never does.
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def tanh(x):
    # [Note] exp(-2|x|) is in (0, 1]: no overflow for any x. But (1 - t) / (1 + t) cancels for small |x|
    # (t near 1): its error is about one ulp of 1, not of tanh(x), so cap * tanh(s / cap) lost up to 1.0
    # at cap = 1e8. Below |x| = 0.625 an odd polynomial (Cephes' tanhf, relative error ~1e-7) is used
    # instead; above it t <= 0.29 and the quotient is accurate. Plain arithmetic: no expm1 needed, so it
    # works on every Triton version and in the interpreter.
    a = tl.abs(x)
    t = tl.exp(-2.0 * a)
    big = (1.0 - t) / (1.0 + t)
    z = x * x
    p = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
         - 3.33332819422e-1)
    small = a + a * z * p
    y = tl.where(a < 0.625, small, big)
    return tl.where(x < 0, -y, y)


@triton.jit
def relu(x):
    return tl.maximum(x, 0.0)


@triton.jit
def step(x):
    return tl.where(x > 0, 1.0, 0.0)


@triton.jit
def powf(x, p):
    """x ** p for real p: exp(p log x) for x > 0, 0 ** p = 0 for p > 0 (1 for p == 0)."""
    safe = tl.where(x > 0, x, 1.0)
    y = tl.exp(p * tl.log(safe))
    return tl.where(x > 0, y, tl.where(p == 0, 1.0, tl.where(x == 0, 0.0, float("nan"))))


@triton.jit
def safe_div(a, b):
    """a / b, and 0 where b == 0 (only ever reached on masked or unselected values)."""
    return tl.where(b == 0, 0.0, a / tl.where(b == 0, 1.0, b))


@triton.jit
def safe_log(x):
    """log(x) for x > 0, and 0 elsewhere, as the reference's R.safe_log (general normalizations)."""
    return tl.log(tl.where(x > 0, x, 1.0))


@triton.jit
def tan(x):
    return tl.sin(x) / tl.cos(x)
