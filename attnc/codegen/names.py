"""How spec names appear in generated code (shared by generate.py, plan.py and general.py).

Spec identifiers reach the generated code only through `ident`, which suffixes them, so no spec name
can collide with generated names or Python keywords."""

from __future__ import annotations

import sympy
from sympy.core.function import AppliedUndef

# the eager (torch) index tensors of the reference, of mask() and of the band bounds in plans
TORCH_INDEX = {"b": "b_idx", "h": "h_idx", "q": "q_idx", "kv": "kv_idx"}


def ident(name: str) -> str:
    return f"{name}_"


def torch_loads(*exprs) -> dict:
    """Tensor loads in exprs -> eager indexing code, e.g. doc_ids(b, q) -> `doc_ids_[b_idx, q_idx]`."""
    out = {}
    for e in exprs:
        if e is None:
            continue
        for load in sympy.sympify(e).atoms(AppliedUndef):
            out[load] = f"{ident(load.func.__name__)}[{', '.join(TORCH_INDEX[str(a)] for a in load.args)}]"
    return out
