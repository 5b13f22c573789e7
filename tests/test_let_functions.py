"""`let f(x, ...) = expr`: functions expanded (inlined) at each call, a coordinate map written once
and applied to q and kv. The expanded IR equals the hand-written spec's IR; a spec using them runs
through the kernels and matches a float64 formula written here; misuse is refused with file:line:col."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import re
from pathlib import Path

import pytest
import torch

from attnc.errors import SpecError
from attnc.pipeline import compile_file, compile_text

ROOT = Path(__file__).resolve().parent.parent
import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spec_helpers import _check, _formula, _load, _qkv

HAND_WRITTEN_NEIGHBORHOOD_2D = """attention neighborhood_2d
const Y = 16, X = 16, KY = 7, KX = 7
let (qy, qx) = unravel(q, Y, X)
let (ky, kx) = unravel(kv, Y, X)
let left_y = KY // 2
let right_y = KY // 2 + KY % 2 - 1
let left_x = KX // 2
let right_x = KX // 2 + KX % 2 - 1
let cy = clamp(qy, left_y, Y - 1 - right_y)
let cx = clamp(qx, left_x, X - 1 - right_x)
mask cy - left_y <= ky <= cy + right_y and cx - left_x <= kx <= cx + right_x
"""


def _same_ir(a, b):
    assert a.mask == b.mask
    assert a.score == b.score and a.probs == b.probs
    assert a.layouts == b.layouts and a.params == b.params and a.tensors == b.tensors and a.consts == b.consts


def test_the_example_written_with_functions_has_the_hand_written_ir():
    text = (ROOT / "examples" / "neighborhood_2d.attn").read_text()
    assert "let coord(i) = unravel(i, Y, X)" in text and "let centre(" in text
    _same_ir(compile_file(ROOT / "examples" / "neighborhood_2d.attn"), compile_text(HAND_WRITTEN_NEIGHBORHOOD_2D))


PAIRS = {
    "centre_1d": (
        "const K = 5\nlet centre(p) = clamp(p, K // 2, Lk - 1 - K // 2)\nmask abs(centre(q) - kv) <= K // 2",
        "const K = 5\nmask abs(clamp(q, K // 2, Lk - 1 - K // 2) - kv) <= K // 2"),
    "nested_and_score": (
        ("param slope = 0.5\nlet dist(a, c) = abs(a - c)\nlet bias(a, c) = -slope * dist(a, c)\n"
        "mask kv <= q\nscore s + bias(q, kv)"),
        "param slope = 0.5\nmask kv <= q\nscore s + -slope * abs(q - kv)"),
    "condition_valued": (
        "let block(i) = i // 8\nlet same(a, c) = block(a) == block(c)\nmask same(q, kv) or kv == 0",
        "mask q // 8 == kv // 8 or kv == 0"),
    "coordinates_3d": (
        ("const T = 2, Y = 3, X = 4\nlet at(i) = unravel(i, T, Y, X)\nlet (qt, qy, qx) = at(q)\n"
        "let (kt, ky, kx) = at(kv)\nmask kt <= qt and abs(qy - ky) <= 1 and abs(qx - kx) <= 1"),
        ("const T = 2, Y = 3, X = 4\nlet (qt, qy, qx) = unravel(q, T, Y, X)\nlet (kt, ky, kx) = unravel(kv, T, Y, X)\n"
        "mask kt <= qt and abs(qy - ky) <= 1 and abs(qx - kx) <= 1")),
    "parameter_named_like_a_later_let": (
        "let f(x) = x + 1\nlet x = q\nmask f(kv) <= x", "mask kv + 1 <= q"),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_expanded_ir_equals_the_hand_written_ir(name):
    with_fn, by_hand = PAIRS[name]
    _same_ir(compile_text(f"attention {name}\n{with_fn}"), compile_text(f"attention {name}\n{by_hand}"))


def test_a_spec_with_functions_runs_and_matches_a_formula(tmp_path):
    """2-D neighbourhood on a 4 x 5 grid (window 3 x 3, shifted at the borders) plus a distance bias,
    both written once as functions of a position and applied to q and kv."""
    Y, X, K = 4, 5, 3
    fn = _load(tmp_path, "fn_nbhd", f"""const Y = {Y}, X = {X}, K = {K}
param w = 0.25
let coord(i) = unravel(i, Y, X)
let (qy, qx) = coord(q)
let (ky, kx) = coord(kv)
let centre(p, n) = clamp(p, K // 2, n - 1 - K // 2)
let near(p, n, key) = abs(centre(p, n) - key) <= K // 2
let dist2(ay, ax, by, bx) = (ay - by) ** 2 + (ax - bx) ** 2
mask near(qy, Y, ky) and near(qx, X, kx)
score s - w * dist2(qy, qx, ky, kx)
""")
    L = Y * X
    q, k, v = _qkv(B=2, H=2, Lq=L, Lk=L, seed=3)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    qy, qx, ky, kx = i // X, i % X, j // X, j % X
    cy, cx = qy.clamp(K // 2, Y - 1 - K // 2), qx.clamp(K // 2, X - 1 - K // 2)
    mask = ((cy - ky).abs() <= K // 2) & ((cx - kx).abs() <= K // 2)
    d2 = ((qy - ky) ** 2 + (qx - kx) ** 2).double()
    for w in (0.25, 1.5):
        _check(fn, q, k, v, lambda a, b_, c, w=w: _formula(a, b_, c, mask, lambda s: s - w * d2), w=w)


ERRORS = {
    "arity": ("let f(x, y) = x + y\nmask f(q) <= kv", 3, 6, "f() takes 2 arguments (x, y), got 1"),
    "recursion": ("let f(x) = f(x - 1)\nmask f(q) <= kv", 2, 12, "'f' calls itself: let functions cannot be recursive"),
    "self_reference": ("let f(x) = x + f\nmask f(q) <= kv", 2, 16, "'f' refers to itself"),
    "unknown_name_in_body": ("let f(x) = x + y\nmask f(q) <= kv", 2, 16, "unknown name 'y' in the body of 'f'"),
    "unknown_function_in_body": ("let f(x) = gg(x)\nmask f(q) <= kv", 2, 12, "unknown function 'gg'"),
    "later_function": ("let f(x) = g(x)\nlet g(x) = x\nmask f(q) <= kv", 2, 12,
                       "function 'g' is used before its definition at line 3"),
    "unknown_function_called": ("mask ff(q) <= kv", 2, 6, "unknown function 'ff'"),
    "function_as_value": ("let f(x) = x\nmask f <= kv", 3, 6, "'f' is a function; call it as f(...)"),
    "builtin_parameter": ("let f(q) = q\nmask f(kv) <= kv", 2, 7, "parameter 'q' of 'f' is a built-in name"),
    "parameter_hides_a_name": ("const c = 2\nlet f(c) = c\nmask f(q) <= kv", 3, 7, "parameter 'c' of 'f' hides 'c'"),
    "duplicate_parameter": ("let f(x, x) = x\nmask f(q, q) <= kv", 2, 10, "parameter 'x' of 'f' is given twice"),
    "type_error_at_a_call": ("let f(x) = x and kv < 3\nmask f(q)", 2, 12, "'and' needs conditions on both sides"),
    "unravel_not_unpacked": ("let f(i) = unravel(i, 2, 2)\nmask f(q) <= kv", 3, 6, "'f' gives several coordinates"),
    "not_unravel_unpacked": ("let f(i) = i + 1\nlet (a, c) = f(q)\nmask a <= kv", 2, 12,
                             "only unravel(...) can be unpacked"),
    "redefined": ("let f(x) = x\nlet f(y) = y\nmask f(q) <= kv", 3, 1, "'f' is already defined at line 2"),
    "keyword_argument": ("let f(x) = x\nmask f(x=q) <= kv", 3, 6, "f() takes no keyword arguments"),
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_errors_name_the_problem_and_where(name):
    body, line, col, message = ERRORS[name]
    with pytest.raises(SpecError) as err:
        compile_text(f"attention e\n{body}\n", "e.attn")
    text = str(err.value)
    assert f"e.attn:{line}:{col}: error: " in text, text
    assert message in text, text
    assert "Traceback" not in text


def test_an_error_inside_a_body_names_the_call():
    with pytest.raises(SpecError) as err:
        compile_text("attention e\nlet f(x) = x and kv < 3\nmask f(q)\n", "e.attn")
    assert re.search(r"in 'f' called at line 3, column 6", str(err.value)), str(err.value)
