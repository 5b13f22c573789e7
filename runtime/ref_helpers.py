"""Eager (torch) helpers for generated reference implementations.

The reference evaluates a variant on full score matrices, chunked over query blocks. Masked entries
are evaluated on safe values (score 0, `visible` >= 1, division by 0 giving 0) and zeroed at the end,
so no NaN ever reaches a value or a gradient.
"""

from __future__ import annotations

import math

import torch


def floordiv(a, b):
    """a // b, rounding down; a // 0 is 0 (the language's rule, as in the kernels)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        b = torch.as_tensor(b, device=a.device if isinstance(a, torch.Tensor) else None)
        safe = torch.where(b == 0, torch.ones_like(b), b)
        return torch.where(b == 0, torch.zeros_like(safe), torch.div(a, safe, rounding_mode="floor"))
    return a // b if b != 0 else 0


def floormod(a, b):
    """a % b with the sign of b; a % 0 is a (so that a == (a // b) * b + a % b always holds)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        b = torch.as_tensor(b, device=a.device if isinstance(a, torch.Tensor) else None)
        safe = torch.where(b == 0, torch.ones_like(b), b)
        return torch.where(b == 0, a, torch.remainder(a, safe))
    return a % b if b != 0 else a


def _t(x, like):
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x, device=like.device)


def _first_tensor(*xs):
    return next((x for x in xs if isinstance(x, torch.Tensor)), None)


def _fold(torch_fn, python_fn, xs):
    like = _first_tensor(*xs)
    if like is None:
        return python_fn(xs)
    out = _t(xs[0], like)
    for x in xs[1:]:
        out = torch_fn(out, _t(x, like))
    return out


def minimum(*xs):
    return _fold(torch.minimum, min, xs)


def maximum(*xs):
    return _fold(torch.maximum, max, xs)


def where(cond, a, b):
    like = _first_tensor(cond, a, b)
    if like is None:
        return a if cond else b
    return torch.where(_t(cond, like), _t(a, like), _t(b, like))


def ilog2(x):
    x = torch.as_tensor(x)
    return torch.floor(torch.log2(x.double().clamp(min=1))).long()


def rshift(a, n):
    return floordiv(a, 2 ** n) if not isinstance(n, torch.Tensor) else torch.div(a, torch.pow(2, n), rounding_mode="floor")


def safe_div(a, b):
    b = _t(b, _first_tensor(a, b) if _first_tensor(a, b) is not None else torch.zeros(()))
    zero = b == 0
    return torch.where(zero, torch.zeros_like(b), a / torch.where(zero, torch.ones_like(b), b))


def safe_log(x):
    x = torch.as_tensor(x)
    return torch.log(torch.where(x > 0, x, torch.ones_like(x)))


def powf(x, p):
    """x ** p for real p, with 0 ** p = 0 (p > 0) and finite gradients everywhere."""
    x = torch.as_tensor(x)
    positive = x > 0
    y = torch.exp(p * torch.log(torch.where(positive, x, torch.ones_like(x))))
    at_zero = torch.ones_like(y) if (isinstance(p, (int, float)) and p == 0) else torch.zeros_like(y)
    nan = torch.full_like(y, float("nan")).detach()  # negative base, real power: no gradient path
    return torch.where(positive, y, torch.where(x == 0, at_zero, nan))


def step(x):
    return (torch.as_tensor(x) > 0).to(torch.get_default_dtype() if not isinstance(x, torch.Tensor) else x.dtype)


def rowsum(x, mask):
    x = torch.as_tensor(x)
    return torch.where(mask, x, torch.zeros_like(x)).sum(-1, keepdim=True)


def rowmax(x, mask):
    x = torch.as_tensor(x)
    if not x.is_floating_point():  # a constant or integer row value (score s - s): -inf needs a float
        x = x.to(torch.get_default_dtype())
    m = torch.where(mask, x, torch.full_like(x, float("-inf"))).amax(-1, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # safe on empty rows


def visible(mask):
    return mask.sum(-1, keepdim=True)


def softmax_rows(logits, mask, sink=None):
    """P = exp(x) / (sum_j exp(x) [+ exp(sink)]) over unmasked keys, and the row's log-sum-exp.

    [Note] Fully masked rows (and no sink): P = 0, lse = -inf, gradients 0 (not NaN): the max is
    taken as 0 there, so nothing below divides by zero.
    """
    neg_inf = torch.full_like(logits, float("-inf"))
    x = torch.where(mask, logits, neg_inf)
    m = x.amax(-1, keepdim=True)
    if sink is not None:
        m = torch.maximum(m, sink)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.where(mask, torch.exp(torch.where(mask, logits, torch.zeros_like(logits)) - m), torch.zeros_like(logits))
    denom = e.sum(-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sink - m)
    empty = denom == 0
    p = e / torch.where(empty, torch.ones_like(denom), denom)
    lse = torch.where(empty, torch.full_like(denom, float("-inf")), m + torch.log(torch.where(empty, torch.ones_like(denom), denom)))
    return p, lse.squeeze(-1)


def masked_max(p, mask, dim):
    """The largest of p where mask holds, along dim; -inf where it holds nowhere (a `stat`'s parts
    are combined first, then the empty ones become 0)."""
    return torch.where(mask, p, -math.inf).amax(dim)


def entropy(p, dim):
    """-sum p log p along dim, the terms with p <= 0 left out; the log of 1 there keeps the gradient
    finite (a log of 0 would give 0 * inf = NaN through torch.where)."""
    positive = p > 0
    return -(p * torch.where(positive, p, torch.ones_like(p)).log()).where(positive, 0.0).sum(dim)


def expand_heads(x: torch.Tensor, hq: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, Hq, L, D] with query head h reading head floor(h * H / Hq)."""
    h = x.shape[1]
    if h == hq:
        return x
    index = torch.div(torch.arange(hq, device=x.device) * h, hq, rounding_mode="floor")
    return x.index_select(1, index)


def _as_int(x):
    """Integer operands of bitwise operators: floor() and ceil() give float tensors holding integers."""
    return x.long() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def bitand(a, b):
    return _as_int(a) & _as_int(b)


def bitor(a, b):
    return _as_int(a) | _as_int(b)


def bitxor(a, b):
    return _as_int(a) ^ _as_int(b)


def lshift(a, n):
    return _as_int(a) * (1 << n)


def index(x):
    """A computed index (an axis of a tensor input's own, already clamped) as torch indexing takes it."""
    return x.long() if isinstance(x, torch.Tensor) else int(x)


# ---- a select's tiles (block top-k), densely: the reference's own reading of the selection ----
def tiles_any(mask: torch.Tensor, tile: int) -> torch.Tensor:
    """bool [..., R, L] -> [..., ceil(R / tile), ceil(L / tile)]: whether each tile x tile block holds a True."""
    *lead, R, L = mask.shape
    padded = torch.nn.functional.pad(mask, (0, -L % tile, 0, -R % tile))
    return padded.view(*lead, padded.shape[-2] // tile, tile, padded.shape[-1] // tile, tile).any(-1).any(-2)


def key_tiles_any(mask: torch.Tensor, tile: int) -> torch.Tensor:
    """bool [..., L] -> [..., ceil(L / tile)]: whether each tile of `tile` keys holds a True."""
    padded = torch.nn.functional.pad(mask, (0, -mask.shape[-1] % tile))
    return padded.view(*mask.shape[:-1], padded.shape[-1] // tile, tile).any(-1)


def tile_visible(visible: torch.Tensor, first_row: int, rows: int, Lk: int, tile: int, row_tile: int = 0) -> torch.Tensor:
    """The selection of tiles `visible` [B, H, row tiles, key tiles] as an element mask of rows
    [first_row, first_row + rows) and keys [0, Lk): [B, H, rows, Lk]. Key tiles have `tile` keys, row
    tiles `row_tile` rows (default `tile`; 1 where each row chose its own tiles, as decode does)."""
    device = visible.device
    row_tiles = torch.div(torch.arange(first_row, first_row + rows, device=device), row_tile or tile,
                          rounding_mode="floor")
    key_tiles = torch.div(torch.arange(Lk, device=device), tile, rounding_mode="floor")
    return visible[:, :, row_tiles][..., key_tiles]
