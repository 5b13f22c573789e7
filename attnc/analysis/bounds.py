"""Closed-form key ranges: the mask as a union of clauses `lo(q) <= kv <= hi(q) [and residual]`.

The mask is put in disjunctive normal form; in each clause the constraints linear in `kv` with unit
coefficient become bounds and everything else is the clause's residual. When a clause's bounds are
non-decreasing in `q`, a query tile [m0, m1) and a key tile [n0, n1) can be classified from scalars
alone, inside the kernel:

    EMPTY   no clause's range over the tile's rows  [lo(m0), hi(m1 - 1)]  meets the key tile
    FULL    some clause without residual has        [lo(m1 - 1), hi(m0)]  covering the key tile
    PARTIAL otherwise: the tile is visited and the element mask is applied

Masks the analysis cannot bound (neighbourhoods, documents) get one clause over [0, Lk) with a residual:
every tile is PARTIAL. The tile planner replaces that with exact per-tile lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from .. import ir
from .rowstats import kv_bounds

MAX_CLAUSES = 4


@dataclass(frozen=True)
class Clause:
    lo: sympy.Expr | None  # kv >= lo(q); None: no lower bound
    hi: sympy.Expr | None  # kv <= hi(q); None: no upper bound
    exact: bool  # True when the bounds are the whole clause (no residual constraints)


def _nondecreasing_in_q(expr) -> bool:
    if expr is None or ir.q not in expr.free_symbols:
        return True
    if expr == ir.q:
        return True
    if isinstance(expr, (sympy.Add, sympy.Min, sympy.Max)):
        return all(_nondecreasing_in_q(a) for a in expr.args)
    if isinstance(expr, sympy.Mul):
        consts = [a for a in expr.args if ir.q not in a.free_symbols]
        rest = [a for a in expr.args if ir.q in a.free_symbols]
        c = sympy.Mul(*consts)
        return len(rest) == 1 and c.is_nonnegative is True and _nondecreasing_in_q(rest[0])
    return False


def _split_abs(atom) -> list:
    """|e| <= c  ->  e <= c and -e <= c (likewise <), so windows written with abs get bounds too."""
    if isinstance(atom, (sympy.Le, sympy.Lt)) and isinstance(atom.lhs, sympy.Abs) and ir.kv not in atom.rhs.free_symbols:
        e, rel = atom.lhs.args[0], type(atom)
        return [rel(e, atom.rhs), rel(-e, atom.rhs)]
    return [atom]


def _clause(conjunction) -> Clause:
    atoms = list(conjunction.args) if isinstance(conjunction, sympy.And) else [conjunction]
    atoms = [a for atom in atoms for a in _split_abs(atom)]
    linear, residual = [], []
    for atom in atoms:
        bounds = kv_bounds(atom)
        usable = bounds is not None and all(_nondecreasing_in_q(x) for x in bounds)
        (linear if usable else residual).append(atom)
    lo, hi = kv_bounds(sympy.And(*linear)) if linear else (None, None)
    return Clause(lo, hi, exact=not residual)


def key_clauses(mask) -> tuple[Clause, ...]:
    mask = sympy.sympify(mask)
    if mask is sympy.true:
        return (Clause(None, None, True),)
    if mask is sympy.false:
        return ()
    dnf = sympy.to_dnf(mask) if sympy.count_ops(mask) < 60 else mask
    clauses = list(dnf.args) if isinstance(dnf, sympy.Or) else [dnf]
    if len(clauses) > MAX_CLAUSES:
        return (Clause(None, None, False),)
    return tuple(_clause(c) for c in clauses)
