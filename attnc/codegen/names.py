"""How spec names appear in generated code (shared by generate.py, plan.py and general.py).

Spec identifiers reach the generated code only through `ident`, which suffixes them, so no spec name
can collide with generated names or Python keywords."""

from __future__ import annotations

import sympy
from sympy.core.function import AppliedUndef

from .. import ir
from .printers import torch_code

# the eager (torch) index tensors of the reference, of mask() and of the band bounds in plans
TORCH_INDEX = {"b": "b_idx", "h": "h_idx", "q": "q_idx", "kv": "kv_idx"}


def ident(name: str) -> str:
    return f"{name}_"


def torch_loads(*exprs, names: dict | None = None) -> dict:
    """Tensor loads in exprs -> eager indexing code, e.g. doc_ids(b, q) -> `doc_ids_[b_idx, q_idx]`.

    An index expression (an axis of the tensor's own, clamped by the checker) prints with `names`
    (default: the index tensors of TORCH_INDEX, sizes and params by their identifiers); loads nested in
    it print as their own indexing."""
    base = {ir.INDICES[k]: code for k, code in TORCH_INDEX.items()}
    base.update({sym: name for name, sym in ir.SIZES.items()})
    base.update(names or {})
    found = {a for e in exprs if e is not None for a in sympy.sympify(e).atoms(AppliedUndef)}
    out: dict = {}
    for load in sorted(found, key=lambda a: (len(a.atoms(AppliedUndef)), sympy.default_sort_key(a))):
        parts = []
        for a in load.args:
            if a.is_Symbol and str(a) in TORCH_INDEX:
                parts.append(base.get(a, TORCH_INDEX[str(a)]))
                continue
            local = {**base, **{sym: ident(sym.name) for sym in a.free_symbols if sym not in base}, **out}
            parts.append(f"R.index({torch_code(a, local)})")
        out[load] = f"{ident(load.func.__name__)}[{', '.join(parts)}]"
    # dot(qr[b, h, q], kr[b, kv]): a read of all axes but the feature axis is [B', H', Lq', 1, R] per query
    # (or [B', H', 1, Lk', R] per key); drop the other token axis and multiply over the features
    for dot in ir.vec_dots(*[sympy.sympify(e) for e in exprs if e is not None]):
        out[dot] = (f"torch.matmul({out[dot.query]}[..., 0, :], "
                    f"{out[dot.key]}[..., 0, :, :].transpose(-1, -2))")
    return out
