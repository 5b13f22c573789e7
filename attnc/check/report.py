"""The checker's diagnostics: every problem is recorded, and the statement being checked stops at its
first one, so one run reports each statement's first error and `check` raises them together."""

from __future__ import annotations

from ..errors import Diagnostic, Span


class Abort(Exception):
    """Stop lowering one statement after its first error (the error is already recorded)."""


class Reporter:
    def __init__(self):
        self.errors: list[Diagnostic] = []

    def error(self, message: str, span: Span | None, hint: str | None = None):
        self.errors.append(Diagnostic(message, span, hint))
        raise Abort
