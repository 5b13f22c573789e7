"""Line layout of generated code (attnc/codegen/layout.py): long lines are broken inside brackets
only, so the code means the same; checked against Python's own parser and by evaluating."""
import ast

from attnc.codegen.layout import wrap_line, wrap_long_lines


def _same_program(a: str, b: str) -> bool:
    return ast.dump(ast.parse(a)) == ast.dump(ast.parse(b))


def test_long_conjunction_is_one_term_per_line():
    line = "    keep = (" + " & ".join(f"(x{i} < {i})" for i in range(12)) + ") & (n < L)"
    out = wrap_line(line, width=60)
    assert all(len(x) <= 60 for x in out)
    assert out[0] == "    keep = (" and out[-1] == "    ) & (n < L)"
    assert out[2].startswith("        & (x1 < 1)")
    assert _same_program(line.strip(), "\n".join(out).strip())


def test_nested_calls_and_argument_lines_keep_their_meaning():
    env = {"f": lambda *a: sum(a), "g": lambda *a: max(a)}
    expr = "f(" + ", ".join(f"g({i}, {i * 3}, {i * i}, 17 * {i} + 4 * {i})" for i in range(9)) + ")"
    source = f"value = {expr}\nrow = [\n    " + ", ".join(str(i) for i in range(60)) + ",\n]\n"
    wrapped = wrap_long_lines(source, width=50)
    assert max(len(x) for x in wrapped.splitlines()) <= 50
    assert _same_program(source, wrapped)
    a, b = {}, {}
    exec(source, dict(env), a)
    exec(wrapped, dict(env), b)
    assert a == b


def test_strings_comments_and_docstrings_are_left_alone():
    source = ('x = f("a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p, q, r, s, t")\n'
              '"""\n' + ", ".join(["word"] * 40) + "\n\"\"\"\n"
              "y = (a, b)  # " + ", ".join(["c"] * 40) + "\n")
    assert wrap_long_lines(source, width=40) == source


def test_a_trailing_comma_without_a_space_is_kept_once():
    # `(x, g(...),)`: the last part ends with the tuple's own comma, which must not be doubled
    env = {"g": lambda *a: sum(a)}
    source = "t = (1, g(" + ", ".join(f"{i} * 3 + {i}" for i in range(12)) + "),)\n"
    wrapped = wrap_long_lines(source, width=40)
    assert _same_program(source, wrapped)
    a, b = {}, {}
    exec(source, dict(env), a)
    exec(wrapped, dict(env), b)
    assert a == b
