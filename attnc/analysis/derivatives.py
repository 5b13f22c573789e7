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
class Read:
    """One read of a learnable input: a tensor load (`slopes(h)`), or one side of a dot of feature
    vectors (`VecDot(qr(b, h, q), kr(b, kv), R)` with side "query" or "key")."""

    tensor: ir.TensorInput
    expr: sympy.Expr  # what the score is differentiated by: the load, or the VecDot
    side: str = ""  # "query" / "key" for a feature vector, "" for a load

    @property
    def load(self) -> sympy.Expr:
        """The tensor's own load: the vector read of its side of a dot."""
        if not self.side:
            return self.expr
        return self.expr.query if self.side == "query" else self.expr.key

    @property
    def per_pair(self) -> bool:
        """Whether the read's gradient is kept per (query, key) pair (it depends on the key)."""
        return ir.kv in self.expr.free_symbols

    @property
    def per_key(self) -> bool:
        """Whether the read depends on the key but not on the query (`bias[b, kv]`)."""
        return self.per_pair and ir.q not in self.expr.free_symbols


@dataclass(frozen=True)
class LearnableGradient:
    read: Read
    dscore: sympy.Expr  # d score / d read (elementwise)
    dsink: sympy.Expr | None  # d sink / d read (row-wise), when the sink reads it

    @property
    def tensor(self) -> ir.TensorInput:
        return self.read.tensor


def diff(expr, x) -> sympy.Expr:
    """d expr / d x, where an integer index (`t[floor(w[h])]`, a table read at an index computed from
    x) contributes 0: indices are piecewise constant, so sympy's Derivative(floor(..)) and
    Subs(Derivative(t(..))) terms of the chain rule vanish almost everywhere."""
    out = sympy.diff(expr, x)
    return out.replace(lambda e: isinstance(e, (sympy.Derivative, sympy.Subs)), lambda e: sympy.Integer(0))


def score_derivative(score) -> sympy.Expr:
    return diff(score, ir.s)


def learnable_gradients(variant: ir.Variant, form) -> list[LearnableGradient]:
    """One gradient per read, for a softmax form (analysis.rowstats.SoftmaxForm). The kernels compute
    p from the logits and the stored log-sum-exp; dS and the sink's gradient are with respect to the
    score and sink as written (logits + offset, sink + offset), whose log-sum-exp is the one returned,
    so a read's gradient differentiates those. (The score's row constant moves into the form's sink:
    differentiating the written score and the form's sink counted it twice.)"""
    score = form.logits + form.offset
    sink = None if form.sink is None else form.sink + form.offset
    out = []
    exprs = [score] + ([sink] if sink is not None else [])
    for read in learnable_reads(variant, exprs):
        dsink = None if sink is None else diff(sink, read.expr)
        out.append(LearnableGradient(read, diff(score, read.expr), dsink if dsink != 0 else None))
    return out


def learnable_reads(variant: ir.Variant, exprs) -> list[Read]:
    """Every read of a learnable input in exprs, in a fixed order: its loads of one entry, then the
    dots that read it as a feature vector (one Read per side it is on)."""
    exprs = [e for e in exprs if e is not None]
    out = []
    for tensor in variant.learnable:
        out += [Read(tensor, load) for load in tensor_reads(tensor, exprs)]
        for dot in ir.vec_dots(*exprs):
            out += [Read(tensor, dot, side) for side, load in (("query", dot.query), ("key", dot.key))
                    if load.func == tensor.function]
    return out


def tensor_reads(tensor: ir.TensorInput, exprs) -> list:
    """The distinct loads of one entry of `tensor` in exprs, in a fixed order."""
    loads = {a for e in exprs if e is not None for a in ir.scalar_loads(e) if a.func == tensor.function}
    return sorted(loads, key=sympy.default_sort_key)
