"""Syntax errors and smuggled input: every bad spec gives a SpecError at the right line and column.

Each case is (spec text, line, column, a substring of the first diagnostic's message).
"""

from __future__ import annotations

import pytest

from attnc.errors import SpecError
from attnc.parse import MAX_NESTING
from attnc.pipeline import compile_text

H = "attention t\n"

SYNTAX = {
    "missing_header": ("mask kv <= q\n", 1, 1, "expected 'attention <name>' at the start"),
    "empty": ("", 1, 1, "empty spec"),
    "comment_only": ("# nothing here\n\n", 1, 1, "empty spec"),
    "header_without_name": ("attention\nmask kv <= q\n", 1, 1, "the spec has no name"),
    "header_name_is_number": ("attention 3d\n", 1, 11, "unexpected '3'"),
    "header_two_names": ("attention t u\n", 1, 13, "unexpected 'u'"),
    "truncated_comparison": (H + "mask kv <=\n", 2, 11, "unexpected end of file"),
    "truncated_before_statement": (H + "mask kv <=\nscore s\n", 3, 1, "the expression before 'score' is incomplete"),
    "truncated_and": (H + "mask kv <= q and\n", 2, 17, "unexpected end of file"),
    "truncated_power": (H + "score s **\n", 2, 11, "unexpected end of file"),
    "truncated_ternary": (H + "mask kv <= q if\n", 2, 16, "unexpected end of file"),
    "unclosed_paren": (H + "mask (kv <= q\n", 2, 14, "unexpected end of file"),
    "unclosed_call": (H + "probs softmax(score\n", 2, 20, "unexpected end of file"),
    "extra_close_paren": (H + "mask kv <= q)\n", 2, 13, "unexpected ')'"),
    "extra_close_paren_probs": (H + "probs (score))\n", 2, 14, "unexpected ')'"),
    "dollar": (H + "mask kv $ q\n", 2, 9, "unexpected character '$'"),
    "backtick": (H + "mask kv ` q\n", 2, 9, "unexpected character '`'"),
    "semicolon": (H + "mask kv <= q;\n", 2, 13, "unexpected character ';'"),
    "single_quotes": (H + "mask kv <= 'q'\n", 2, 12, "strings are not part of the language"),
    "double_quotes": (H + 'mask kv <= "q"\n', 2, 12, "strings are not part of the language"),
    "keyword_as_operand": (H + "mask kv <=\nlet x = 1\n", 3, 1, "the expression before 'let' is incomplete"),
    "param_missing_equals": (H + "param window 256\n", 2, 14, "unexpected '256'"),
    "param_missing_value": (H + "param window = \n", 2, 15, "unexpected end of file"),
    "bad_type": (H + "param w: str = 1\n", 2, 10, "unexpected 'str'"),
    "input_missing_colon": (H + "input x float[Hq]\n", 2, 9, "unexpected 'float'"),
    "input_no_axes": (H + "input x: float[]\n", 2, 16, "unexpected ']'"),
    "let_tuple_of_one": (H + "let (a) = q\n", 2, 7, "unexpected ')'"),
    "assignment_in_mask": (H + "mask kv <= q = 1\n", 2, 14, "unexpected '='"),
    "double_dot_number": (H + "score s + 1..2\n", 2, 13, "unexpected '.2'"),
    "second_header": (H + "mask kv <= q\nattention u\n", 3, 1, "unexpected 'attention'"),
    "statement_keyword_alone": (H + "mask kv <= q\n# c\nprobs\n", 4, 6, "unexpected end of file"),
}

SMUGGLING = {
    "dunder_import": (H + "mask kv <= q\nlet z = __import__('os')\n", 3, 20, "strings are not part of the language"),
    "dunder_import_no_quotes": (H + "let z = __import__(os)\n", 2, 9, "unknown function '__import__'"),
    "dunder_class": (H + "let z = q.__class__\n", 2, 10, "unexpected character '.'"),
    "backslash_continuation": (H + "let z = q \\\n + 1\n", 2, 11, "unexpected character '\\\\'"),
    "unicode_name": (H + "let é = 1\n", 2, 5, "unexpected character 'é'"),
    "unicode_line_separator": (H + "mask kv <= q\u2028\n", 2, 13, "unexpected character '\\u2028'"),
    "nul_byte": (H + "mask kv <= q\x00\n", 2, 13, "unexpected character '\\x00'"),
    "newline_inside_name_is_two_names": (H + "let wi\nndow = 1\n", 3, 1, "unexpected 'ndow'"),
    "exec_call": (H + "score exec(s)\n", 2, 7, "unknown function 'exec'"),
    "eval_name": (H + "score s + eval\n", 2, 11, "unknown name 'eval'"),
    "private_attr_like_name": (H + "param __class__ = 1\n", 2, 7, "starts with '_'"),
    "generated_code_name": (H + "param torch = 1\n", 2, 7, "built-in name"),
    "python_keyword": (H + "let import = 1\n", 2, 1, "Python keyword"),
    "fstring_brace": (H + "let z = {q}\n", 2, 9, "unexpected character '{'"),
    "semicolon_statement": (H + "mask kv <= q; import os\n", 2, 13, "unexpected character ';'"),
}


def first_error(source: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        compile_text(source, "bad.attn")
    return info.value


@pytest.mark.parametrize("source,line,column,message", list(SYNTAX.values()), ids=list(SYNTAX))
def test_syntax_error(source, line, column, message):
    err = first_error(source)
    d = err.first
    assert message in d.message, (d.message, err.render())
    assert d.span is not None
    assert (d.span.line, d.span.column) == (line, column), err.render()


@pytest.mark.parametrize("source,line,column,message", list(SMUGGLING.values()), ids=list(SMUGGLING))
def test_smuggled_input_is_a_spec_error(source, line, column, message):
    err = first_error(source)
    d = err.first
    assert message in d.message, (d.message, err.render())
    assert (d.span.line, d.span.column) == (line, column), err.render()
    err.render()


def test_rendered_diagnostic_has_location_source_line_and_caret():
    source = H + "param window = 3\nmask kv <= q and q - kv < windw\n"
    err = first_error(source)
    text = err.render()
    lines = text.splitlines()
    assert lines[0] == "bad.attn:3:27: error: unknown name 'windw'"
    assert lines[1] == "    mask kv <= q and q - kv < windw"
    assert lines[2] == "    " + " " * 26 + "^^^^^"
    assert lines[3] == "hint: did you mean 'window'?"
    assert str(err) == text


def test_rendered_caret_for_syntax_error_and_unexpected_character():
    err = first_error(H + "mask kv $ q\n")
    assert err.render().splitlines()[:3] == [
        "bad.attn:2:9: error: unexpected character '$'",
        "    mask kv $ q",
        "            ^",
    ]


def test_rendered_source_line_is_the_one_the_parser_counted():
    # '\f' is whitespace to the parser but a line break to str.splitlines: the shown line must be line 2
    err = first_error("attention t\x0c\nmask kv <= windw\n")
    lines = err.render().splitlines()
    assert lines[0].startswith("bad.attn:2:12:")
    assert "mask kv <= windw" in err.render()
    caret = next(line for line in err.render().split("\n") if line.strip().startswith("^"))
    assert caret.index("^") == 4 + 11


def test_crlf_and_cr_line_endings_are_accepted():
    compile_text("attention t\r\nmask kv <= q\r\n")
    err = first_error("attention t\r\nmask kv <= windw\r\n")
    assert (err.first.span.line, err.first.span.column) == (2, 12)
    assert "\r" not in err.render()


def test_byte_order_mark_in_text_is_a_diagnostic_not_a_crash():
    with pytest.raises(SpecError) as info:
        compile_text("\ufeffattention t\nmask kv <= q\n")
    err = info.value
    assert (err.first.span.line, err.first.span.column) == (1, 1)
    assert "unexpected character '\\ufeff'" in err.first.message


def test_very_long_names():
    long = "w" * 5000
    variant = compile_text(H + f"param {long} = 3\nmask kv <= q - {long}\n")
    assert variant.params[0].name == long
    err = first_error(H + f"param {long} = 3\nmask kv <= q - {long}x\n")
    assert "unknown name" in err.first.message
    assert err.first.span.column == len("mask kv <= q - ") + 1
    err.render()


@pytest.mark.parametrize("depth", [10, 1000, 20000])
def test_deep_parentheses_succeed(depth):
    compile_text(H + "mask kv <= " + "(" * depth + "q" + ")" * depth + "\n")


def _nest(n, wrap, x):
    for _ in range(n):
        x = wrap(x)
    return x


DEEP = {
    "neg": lambda n: H + "mask kv <= " + "-" * n + "q\n",
    "not": lambda n: H + "mask " + "not " * n + "kv <= q\n",
    "add_chain": lambda n: H + "mask kv <= q" + " + 1" * n + "\n",
    "pow_chain": lambda n: H + "score s" + " ** 1" * n + "\n",
    "calls": lambda n: H + "mask kv <= " + _nest(n, lambda x: f"abs({x})", "q") + "\n",
    "exp_calls": lambda n: H + "score " + _nest(n, lambda x: f"exp({x})", "s") + "\n",
    "ternaries": lambda n: H + "probs " + _nest(n, lambda x: f"(1 if q > kv else {x})", "score") + "\n",
}


@pytest.mark.parametrize("kind", list(DEEP))
@pytest.mark.parametrize("depth", [MAX_NESTING + 5, 3000])
def test_deep_nesting_is_a_spec_error_not_a_recursion_error(kind, depth):
    err = first_error(DEEP[kind](depth))
    assert "nested too deeply" in err.first.message
    assert err.first.span is None or err.first.span.line == 2
    err.render()


@pytest.mark.parametrize("kind", list(DEEP))
def test_nesting_just_under_the_limit_is_accepted_or_a_spec_error(kind):
    try:
        compile_text(DEEP[kind](MAX_NESTING - 5))
    except SpecError as err:
        err.render()
