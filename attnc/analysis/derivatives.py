"""Symbolic derivatives for the backward pass.

The kernels' backward needs, for the softmax family,
- dS'/ds: the derivative of the transformed score with respect to the raw score (chain rule to dQ, dK);
- dS'/dt and d(sink)/dt for each load `t` of a learnable tensor (its gradient is the sum over the
  elements that read it of dL/dS' times these).
All come from sympy's `diff`; the custom functions of attnc.ir carry their own `fdiff`.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from .. import ir


class UnsupportedGradient(Exception):
    pass


@dataclass(frozen=True)
class LearnableGradient:
    tensor: ir.TensorInput
    load: sympy.Expr  # the tensor load, e.g. slopes(h)
    dscore: sympy.Expr  # d score / d load (elementwise)
    dsink: sympy.Expr | None  # d sink / d load (row-wise), when the sink reads it


def score_derivative(score) -> sympy.Expr:
    return sympy.diff(score, ir.s)


def learnable_gradients(variant: ir.Variant, sink) -> list[LearnableGradient]:
    out = []
    for tensor in variant.learnable:
        exprs = [variant.score] + ([sink] if sink is not None else [])
        loads = {a for e in exprs for a in sympy.sympify(e).atoms(sympy.core.function.AppliedUndef)
                 if a.func == tensor.function}
        if not loads:
            continue
        if len(loads) > 1 or any(ir.kv in a.free_symbols for a in loads):
            raise UnsupportedGradient(
                f"learnable input '{tensor.name}' is read per key (indexed by kv); gradients of key-side "
                "inputs are not supported yet: index it by b, h or q")
        load = loads.pop()
        dsink = None if sink is None else sympy.diff(sink, load)
        out.append(LearnableGradient(tensor, load, sympy.diff(variant.score, load), dsink if dsink != 0 else None))
    return out
