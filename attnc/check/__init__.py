"""Check an AST and lower it to the IR.

One walk over the statements, in order: names must be defined before they are used (so there are no
cycles), every expression gets a type (bool, int, real), tensors must be indexed with the indices their
declaration names, the mask may not depend on the score or on row statistics, and nothing is defined
twice. Problems are collected and raised together as one `SpecError`.

The modules, from the bottom up: report (collecting diagnostics), types (bool/int/real and the
operators' rules), builtins (the library of functions), scope (names and their hints), lower
(expressions), declarations (heads, params, consts, inputs), statements (let, mask, score, probs,
feature); this module runs them over a spec.
"""

from __future__ import annotations

import sympy

from .. import ast, ir
from ..errors import SpecError
from .builtins import softmax_expr
from .report import Abort
from .statements import Statements

__all__ = ["check"]


class Checker(Statements):
    def run(self) -> ir.Variant:
        self.check_identifier(self.spec.name, self.spec.name_span, what="variant name", soft=True)
        for stmt in self.spec.statements:
            try:
                self.statement(stmt)
            except Abort:
                # its names stay undefined: later uses are not reported again as unknown
                if isinstance(stmt, ast.Let):
                    self.failed.update(stmt.names)
                elif isinstance(stmt, ast.Score):
                    self.failed.add("score")
                elif isinstance(stmt, (ast.Binding, ast.Input, ast.LetFunc)):
                    self.failed.add(stmt.name)
        if self.errors:
            raise SpecError(self.errors, self.spec.path, self.spec.source)
        mask = self.mask if self.mask is not None else sympy.true
        score = self.score_value.expr
        probs_written = self.probs is not None
        probs = self.probs if probs_written else softmax_expr(score)
        return ir.Variant(
            name=self.spec.name,
            path=self.spec.path,
            source=self.spec.source,
            heads=dict(self.heads),
            consts=dict(self.consts),
            params=tuple(self.params),
            tensors=tuple(self.tensors),
            lets=tuple(self.lets),
            layouts=tuple(self.layouts),
            mask=mask,
            score=sympy.sympify(score),
            probs=probs,
            probs_written=probs_written,
            features=tuple(self.features),
            select=self.select,
            stats=tuple(self.stats),
            spans=statement_spans(self.spec),
        )

    def statement(self, stmt):
        self.lowering = stmt
        handler = getattr(self, "stmt_" + type(stmt).__name__.lower())
        handler(stmt)


def statement_spans(spec: ast.Spec) -> ir.Spans:
    """The spans of the statements the IR keeps (ir.Spans), for errors found after the check."""
    entries = []
    for stmt in spec.statements:
        if isinstance(stmt, ast.Mask):
            entries.append((ir.Statement.MASK, None, stmt.span))
        elif isinstance(stmt, ast.Score):
            entries.append((ir.Statement.SCORE, None, stmt.span))
        elif isinstance(stmt, ast.Probs):
            entries.append((ir.Statement.PROBS, None, stmt.span))
        elif isinstance(stmt, ast.Feature):
            entries.append((ir.Statement.FEATURE, stmt.name, stmt.span))
        elif isinstance(stmt, ast.Binding) and stmt.kind == "param":
            entries.append((ir.Statement.PARAM, stmt.name, stmt.span))
        elif isinstance(stmt, ast.Input):
            entries.append((ir.Statement.INPUT, stmt.name, stmt.span))
        elif isinstance(stmt, ast.Stat):
            entries.append((ir.Statement.STAT, stmt.name, stmt.span))
        elif isinstance(stmt, ast.Select):
            entries.append((ir.Statement.SELECT, None, stmt.span))
            if stmt.keep is not None:
                entries.append((ir.Statement.SELECT, "keep", stmt.keep.span))
    return ir.Spans(tuple(entries))


def check(spec: ast.Spec) -> ir.Variant:
    """Check a parsed spec and lower it to the IR; raise `SpecError` listing every problem found."""
    return Checker(spec).run()
