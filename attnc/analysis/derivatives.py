"""Symbolic derivatives for the backward pass.

The kernels' backward needs, for the softmax family,
- dS'/ds: the derivative of the transformed score with respect to the raw score (chain rule to dQ, dK);
- dS'/dt and d(sink)/dt for each load `t` of a learnable tensor (its gradient is the sum over the
  elements that read it of dL/dS' times these). A tensor read at several places (`pos[q] - pos[kv]`)
  has one gradient per load, summed by the host.
All come from sympy's `diff`; the custom functions of attnc.ir carry their own `fdiff`.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from .. import ir


@dataclass(frozen=True)
class LearnableGradient:
    tensor: ir.TensorInput
    load: sympy.Expr  # the tensor load, e.g. slopes(h)
    dscore: sympy.Expr  # d score / d load (elementwise)
    dsink: sympy.Expr | None  # d sink / d load (row-wise), when the sink reads it

    @property
    def per_pair(self) -> bool:
        """Whether the read depends on the key: its gradient is then kept per (query, key) pair."""
        return ir.kv in self.load.free_symbols


def diff(expr, x) -> sympy.Expr:
    """d expr / d x, where an integer index (`t[floor(w[h])]`, a table read at an index computed from
    x) contributes 0: indices are piecewise constant, so sympy's Derivative(floor(..)) and
    Subs(Derivative(t(..))) terms of the chain rule vanish almost everywhere."""
    out = sympy.diff(expr, x)
    return out.replace(lambda e: isinstance(e, (sympy.Derivative, sympy.Subs)), lambda e: sympy.Integer(0))


def score_derivative(score) -> sympy.Expr:
    return diff(score, ir.s)


def learnable_gradients(variant: ir.Variant, sink) -> list[LearnableGradient]:
    out = []
    exprs = [variant.score] + ([sink] if sink is not None else [])
    for tensor in variant.learnable:
        for load in tensor_reads(tensor, exprs):
            dsink = None if sink is None else diff(sink, load)
            out.append(LearnableGradient(tensor, load, diff(variant.score, load),
                                         dsink if dsink != 0 else None))
    return out


def tensor_reads(tensor: ir.TensorInput, exprs) -> list:
    """The distinct loads of `tensor` in exprs, in a fixed order."""
    loads = {a for e in exprs if e is not None for a in sympy.sympify(e).atoms(sympy.core.function.AppliedUndef)
             if a.func == tensor.function}
    return sorted(loads, key=sympy.default_sort_key)
