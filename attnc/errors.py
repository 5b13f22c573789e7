"""Errors in spec files: one exception family, carrying source spans.

Every problem a user can make in a `.attn` file becomes a `SpecError`, rendered like a compiler
diagnostic::

    examples/bad.attn:4:6: error: unknown name 'windw'
        mask q - kv < windw
                      ^^^^^
    hint: did you mean 'window'?
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A region of a spec's source: 1-based line and column, end exclusive."""

    line: int
    column: int
    end_line: int | None = None
    end_column: int | None = None


@dataclass(frozen=True)
class Diagnostic:
    message: str
    span: Span | None
    hint: str | None = None


class SpecError(Exception):
    """One or more problems in a spec, each with a location in the source."""

    def __init__(self, diagnostics: list[Diagnostic], path: str = "<spec>", source: str = ""):
        self.diagnostics = list(diagnostics)
        self.path = path
        self.source = source
        super().__init__(self.render())

    @classmethod
    def at(cls, message: str, span: Span | None, hint: str | None = None, *, path="<spec>", source=""):
        return cls([Diagnostic(message, span, hint)], path, source)

    @property
    def first(self) -> Diagnostic:
        return self.diagnostics[0]

    def render(self) -> str:
        return "\n".join(render_diagnostic(d, self.path, self.source) for d in self.diagnostics)


def render_diagnostic(diag: Diagnostic, path: str, source: str) -> str:
    if diag.span is None:
        out = [f"{path}: error: {diag.message}"]
    else:
        span = diag.span
        out = [f"{path}:{span.line}:{span.column}: error: {diag.message}"]
        lines = source.split("\n")  # as the parser counts lines: '\f' or '\u2028' do not end one
        if 1 <= span.line <= len(lines):
            text = lines[span.line - 1].rstrip("\r").expandtabs(1)
            width = 1
            if span.end_line == span.line and span.end_column and span.end_column > span.column:
                width = span.end_column - span.column
            width = max(1, min(width, len(text) - span.column + 1))
            out.append("    " + text)
            out.append("    " + " " * (span.column - 1) + "^" * width)
    if diag.hint:
        out.append(f"hint: {diag.hint}")
    return "\n".join(out)


def closest(name: str, candidates) -> str | None:
    """The known name a typo most likely meant, or None."""
    match = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return match[0] if match else None


def did_you_mean(name: str, candidates) -> str | None:
    best = closest(name, candidates)
    return f"did you mean '{best}'?" if best else None


class BuildError(Exception):
    """A spec that checks but cannot be compiled (yet); the message says why."""
