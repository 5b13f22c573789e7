"""Parse `.attn` text into the AST (attnc/ast.py).

Two steps, as Lark recommends: Lark's LALR parser (grammar/attn.lark, positions kept) builds a parse
tree, then `_ToAst` turns it into frozen dataclasses. Syntax errors become `SpecError`s with a
file:line:col location and a message in the language's own terms.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

import lark
from lark import Lark, Token, Transformer, v_args

from . import ast
from .errors import Diagnostic, Span, SpecError

# Names of terminals as a user would recognise them, for "expected ..." messages.
_TERMINAL_WORDS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "INT": "an integer",
    "TYPE": "a type (int, float, bool)",
    "LEARNABLE": "'learnable'",
    "COMP_OP": "a comparison",
    "ADD_OP": "'+' or '-'",
    "MUL_OP": "'*', '/', '//' or '%'",
    "SHIFT_OP": "'>>' or '<<'",
    "BOR": "'|'",
    "BXOR": "'^'",
    "BAND": "'&'",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "COMMA": "','",
    "EQUAL": "'='",
    "COLON": "':'",
    "MINUS": "'-'",
    "PLUS": "'+'",
    "__ANON_0": "'**'",
    "$END": "the end of the file",
}

_STATEMENT_KEYWORDS = ("heads", "param", "const", "input", "let", "mask", "score", "probs", "feature", "select", "stat")

# How deeply expressions may nest (parentheses alone do not count). Real specs need a handful of levels;
# the limit keeps the recursive passes after parsing (AST builder, checker, sympy) far from Python's
# recursion limit, so absurd input gets a diagnostic instead of a RecursionError.
MAX_NESTING = 100


@functools.cache
def _parser() -> Lark:
    grammar = resources.files("attnc.grammar").joinpath("attn.lark").read_text()
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _span(meta) -> Span:
    return Span(meta.line, meta.column, meta.end_line, meta.end_column)


def _tok_span(tok: Token) -> Span:
    return Span(tok.line, tok.column, tok.end_line, tok.end_column)


@v_args(meta=True)
class _ToAst(Transformer):
    """Parse tree -> AST. One method per grammar rule or alias."""

    # ---- expressions ----
    def number(self, meta, children):
        return ast.Number(_span(meta), str(children[0]))

    def true(self, meta, children):
        return ast.BoolLit(_span(meta), True)

    def false(self, meta, children):
        return ast.BoolLit(_span(meta), False)

    def name(self, meta, children):
        return ast.Name(_span(meta), str(children[0]))

    def call(self, meta, children):
        func, *args = children
        args = [a for a in args if a is not None]
        positional = tuple(a for a in args if not isinstance(a, tuple))
        keywords = tuple(a for a in args if isinstance(a, tuple))
        return ast.Call(_span(meta), str(func), positional, keywords)

    def kwarg(self, meta, children):
        return (str(children[0]), children[1])

    def index(self, meta, children):
        tensor, *indices = children
        return ast.Index(_span(meta), str(tensor), tuple(indices))

    def binop(self, meta, children):
        left, op, right = children
        return ast.BinOp(_span(meta), str(op), left, right)

    def pow_(self, meta, children):
        return ast.BinOp(_span(meta), "**", children[0], children[1])

    def neg(self, meta, children):
        return ast.Neg(_span(meta), children[0])

    def not_(self, meta, children):
        return ast.Not(_span(meta), children[0])

    def and_(self, meta, children):
        return ast.BoolOp(_span(meta), "and", children[0], children[1])

    def or_(self, meta, children):
        return ast.BoolOp(_span(meta), "or", children[0], children[1])

    def compare(self, meta, children):
        return ast.Compare(_span(meta), tuple(children[0::2]), tuple(str(op) for op in children[1::2]))

    def ternary(self, meta, children):
        then, cond, orelse = children
        return ast.Ternary(_span(meta), then, cond, orelse)

    # ---- statements ----
    def header(self, meta, children):
        return children[0]

    def head_entry(self, meta, children):
        role, value = children
        value = int(value) if value.type == "INT" else str(value)
        return ast.HeadEntry(str(role), value, _span(meta))

    def heads(self, meta, children):
        return ast.Heads(_span(meta), tuple(children))

    def binding(self, meta, children):
        name, type_, value, domain = children
        return (name, None if type_ is None else str(type_), value, domain, _span(meta))

    def domain(self, meta, children):
        return children[0]

    def _bindings(self, kind, children):
        return [ast.Binding(span, kind, str(name), type_, value, domain)
                for name, type_, value, domain, span in children]

    def param(self, meta, children):
        return self._bindings("param", children)

    def const(self, meta, children):
        return self._bindings("const", children)

    def input(self, meta, children):
        name, dtype, *axes, learnable, domain = children
        axes = tuple(a.id if isinstance(a, ast.Name) else a for a in axes)
        return ast.Input(_span(meta), str(name), str(dtype), axes, learnable is not None, domain)

    def let_single(self, meta, children):
        return ast.Let(_span(meta), (str(children[0]),), children[1])

    def let_tuple(self, meta, children):
        *names, value = children
        return ast.Let(_span(meta), tuple(str(n) for n in names), value)

    def let_func(self, meta, children):
        name, *params, value = children
        return ast.LetFunc(_span(meta), str(name), tuple(str(p) for p in params),
                           tuple(_tok_span(p) for p in params), value)

    def mask(self, meta, children):
        return ast.Mask(_span(meta), children[0])

    def score(self, meta, children):
        return ast.Score(_span(meta), children[0])

    def probs(self, meta, children):
        return ast.Probs(_span(meta), children[0])

    def feature(self, meta, children):
        return ast.Feature(_span(meta), str(children[0]), str(children[1]), children[2])

    def select(self, meta, children):
        func, *args, by, keep = children
        args = [a for a in args if a is not None]
        return ast.Select(_span(meta), str(func), _tok_span(func), tuple(a for a in args if not isinstance(a, tuple)),
                          tuple(a for a in args if isinstance(a, tuple)), by, keep)

    def stat(self, meta, children):
        name, value = children
        return ast.Stat(_span(meta), str(name), _tok_span(name), value)

    def select_by(self, meta, children):
        return children[0]

    def select_keep(self, meta, children):
        return children[0]

    def start(self, meta, children):
        header, *statements = children
        flat = []
        for st in statements:
            flat.extend(st if isinstance(st, list) else [st])
        return header, tuple(flat)


def parse(source: str, path: str = "<spec>") -> ast.Spec:
    """Parse spec text into an `ast.Spec`, or raise `SpecError`."""
    try:
        tree = _parser().parse(source)
    except lark.exceptions.UnexpectedInput as err:
        raise SpecError([_syntax_diagnostic(err, source)], path, source) from None
    deep = _too_deep(tree)
    if deep is not None:
        span = None if deep.meta.empty else _span(deep.meta)
        raise SpecError.at(f"expression nested too deeply (more than {MAX_NESTING} levels)", span,
                           "split it into several 'let' statements", path=path, source=source)
    trap = _bitwise_in_comparison(tree, source)
    if trap is not None:
        raise SpecError([trap], path, source)
    _drop_parens(tree)
    header, statements = _ToAst().transform(tree)
    return ast.Spec(str(header), _tok_span(header), statements, path, source)


def _drop_parens(tree: lark.Tree) -> None:
    """Replace each `paren` node by the expression inside it, in place and iteratively: `(((x)))` nested
    a thousand deep must not become a thousand levels of the recursive AST builder."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for i, child in enumerate(node.children):
            while isinstance(child, lark.Tree) and child.data == "paren":
                child = child.children[0]
            node.children[i] = child
            if isinstance(child, lark.Tree):
                stack.append(child)


def _too_deep(tree: lark.Tree) -> lark.Tree | None:
    """The first node nested more than MAX_NESTING levels below a statement, or None. Iterative."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING + 2:  # start -> statement -> expression levels
            return node
        step = 0 if node.data == "paren" else 1  # parentheses alone do not count
        stack.extend((child, depth + step) for child in reversed(node.children) if isinstance(child, lark.Tree))
    return None


_BITWISE = {"BAND": "and", "BOR": "or", "BXOR": None}  # the boolean operator a user likely meant


def _bitwise_in_comparison(tree: lark.Tree, source: str) -> Diagnostic | None:
    """Python's precedence trap, refused as linters do: `kv <= q & q - kv < 8` parses as
    `kv <= (q & (q - kv)) < 8` (bitwise operators bind tighter than comparisons), a different mask that
    would pass every type check. A comparison operand that is an unparenthesized `&`, `|` or `^` is an
    error; written in parentheses, `(x & 1) == 0`, it is the bitwise operation it reads as. Iterative."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if node.data == "compare":
            operands = node.children[0::2]
            for i, operand in enumerate(operands):
                if not (isinstance(operand, lark.Tree) and operand.data == "binop"
                        and operand.children[1].type in _BITWISE):
                    continue
                op = operand.children[1]
                text = source[node.meta.start_pos:node.meta.end_pos]
                start = node.meta.start_pos
                # the grouping the parser chose, in parentheses: the bitwise operation and its compound operands
                groups = [operand] + [c for c in operand.children[0::2]
                                      if isinstance(c, lark.Tree) and c.data in ("binop", "pow_", "neg")]
                marks = sorted([(g.meta.start_pos - start, 1, "(") for g in groups]
                               + [(g.meta.end_pos - start, 0, ")") for g in groups], reverse=True)
                reads = text
                for at, _, mark in marks:
                    reads = reads[:at] + mark + reads[at:]
                meant = _BITWISE[op.type]
                between = 0 < i < len(operands) - 1  # comparisons on both sides: the trap itself
                if meant and between:
                    o = op.start_pos - start
                    fixed = f"{text[:o].rstrip()} {meant} {text[o + 1:].lstrip()}"
                    hint = f"to combine the conditions write '{meant}': {fixed}"
                else:
                    hint = ("to combine conditions write 'and' or 'or'" if meant else
                            "to combine conditions write 'and', 'or' or '!='")
                hint += f"; for the bitwise '{op}' put it in parentheses"
                return Diagnostic(f"'{op}' inside a comparison: this reads as {reads}, because '{op}' binds "
                                  "tighter than comparisons", _tok_span(op), hint)
        stack.extend(child for child in reversed(node.children) if isinstance(child, lark.Tree))
    return None


def _expected_words(expected) -> str:
    words = sorted({_TERMINAL_WORDS.get(t, _keyword_word(t)) for t in expected})
    if len(words) > 6:
        words = words[:6] + ["..."]
    return ", ".join(words)


def _keyword_word(terminal: str) -> str:
    return f"'{terminal.lower()}'" if terminal.isalpha() else terminal


def _syntax_diagnostic(err: lark.exceptions.UnexpectedInput, source: str) -> Diagnostic:
    if isinstance(err, lark.exceptions.UnexpectedCharacters):
        char = source[err.pos_in_stream] if err.pos_in_stream < len(source) else ""
        if char in "'\"":
            msg = "strings are not part of the language"
            hint = "names are written bare: letters, digits and '_'"
        elif char == "\t":
            msg, hint = "unexpected tab character", None
        else:
            msg = f"unexpected character {char!r}"
            hint = None
        return Diagnostic(msg, Span(err.line, err.column, err.line, err.column + 1), hint)

    if isinstance(err, lark.exceptions.UnexpectedEOF) or getattr(err.token, "type", None) == "$END":
        line, col = _end_position(source)
        expected = _expected_words(err.expected)
        if not source.strip() or "ATTENTION" in err.expected:
            return Diagnostic("empty spec", Span(1, 1), "a spec starts with 'attention <name>'")
        return Diagnostic("unexpected end of file", Span(line, col), f"expected {expected}")

    token = err.token
    span = _tok_span(token)
    expected = set(err.expected)
    text = str(token)
    keyword = _keyword_read_as_name(source, token)
    header = keyword and re.fullmatch(r"((?:\s|#[^\n]*)*)attention(?:\s|#[^\n]*)*", source[: _offset(source, keyword[1])])
    if header:  # `attention` without a name: the parser took the first statement's keyword for the name
        start = len(header.group(1))
        line, column = source.count("\n", 0, start) + 1, start - (source.rfind("\n", 0, start) + 1) + 1
        return Diagnostic("the spec has no name", Span(line, column, line, column + len("attention")),
                          "write 'attention <name>' on the first line")
    if keyword is not None:
        word, kw_span = keyword
        return Diagnostic(f"the expression before '{word}' is incomplete", kw_span,
                          f"'{word}' starts a new statement; finish the expression above it")
    if token.line == 1 and "ATTENTION" in expected:
        return Diagnostic(f"expected 'attention <name>' at the start, found '{text}'", span)
    if text in _STATEMENT_KEYWORDS and expected & {"NAME", "NUMBER", "LPAR"}:
        return Diagnostic(f"'{text}' starts a new statement, but the previous expression is incomplete", span)
    if token.type == "NAME" and text not in _STATEMENT_KEYWORDS and expected & {"LET", "MASK", "PROBS"}:
        return Diagnostic(
            f"unexpected '{text}': expected an operator or a new statement",
            span,
            "statements start with one of: " + ", ".join(_STATEMENT_KEYWORDS),
        )
    return Diagnostic(f"unexpected '{text}'", span, f"expected {_expected_words(expected)}")


def _keyword_read_as_name(source: str, token: Token):
    """A statement keyword just before `token` that the parser had to read as a name.

    `mask q <=` followed by `score s` on the next line parses `score` as the comparison's right operand;
    the real mistake is the incomplete expression before it.
    """
    before = source[: token.start_pos]
    match = re.search(r"(^|\n)([ \t]*)([A-Za-z_]\w*)\s*$", before)
    if not match or match.group(3) not in _STATEMENT_KEYWORDS:
        return None
    start = match.start(3)
    line = before.count("\n", 0, start) + 1
    column = start - (before.rfind("\n", 0, start) + 1) + 1
    word = match.group(3)
    return word, Span(line, column, line, column + len(word))


def _offset(source: str, span: Span) -> int:
    """The index in `source` of a span's start."""
    lines = source.split("\n")
    return sum(len(line) + 1 for line in lines[: span.line - 1]) + span.column - 1


def _end_position(source: str) -> tuple[int, int]:
    lines = source.rstrip().split("\n")  # as the parser counts lines (splitlines also breaks at '\f')
    return len(lines), len(lines[-1]) + 1
