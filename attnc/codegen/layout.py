"""Line layout of generated code: long expression lines broken at their outermost separators.

Masks of multi-dimensional layouts print as long conjunctions (`a & b & c ...`) and long calls
(`I.logical_and(x, y, ...)`). Rather than a formatter dependency, one rule, applied recursively: a line
longer than the width whose outermost bracket group holds top-level `, `, ` & ` or ` | ` separators
is laid out one part per line inside that group, like black does:

    keep = (                               I.logical_and(
        mask_0                                 I.eq(I.mod(kv, (2, 2)), x0),
        & ((offs_n[None, :] % 2) == ...)       I.le(x5, I.add((1, 1), x4)),
    )                                      )

Lines with string literals or comments are left alone (a bracket inside a string would mislead the
scan), and so is anything the rule cannot shorten.
"""

from __future__ import annotations

_SEPARATORS = (", ", " | ", " & ", " + ", " * ")  # preferred first: the loosest binding
_OPEN, _CLOSE = "([{", ")]}"


def _groups(line: str):
    """(open index, close index) of every bracket group, outermost first (by opening position)."""
    stack, groups = [], []
    for i, ch in enumerate(line):
        if ch in _OPEN:
            stack.append(i)
        elif ch in _CLOSE and stack:
            groups.append((stack.pop(), i))
    return sorted(groups)


def _split_top_level(text: str):
    """text -> (parts, separator) at the most preferred separator found at depth 0, or None.
    (A line break inside brackets never changes the meaning, whichever separator it follows.)"""
    depth, found = 0, {sep: [] for sep in _SEPARATORS}
    for i, ch in enumerate(text):
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
        elif depth == 0:
            for sep in _SEPARATORS:
                if text.startswith(sep, i):
                    found[sep].append(i)
    for sep in _SEPARATORS:
        if found[sep]:
            cuts = [0] + [i + len(sep) for i in found[sep]]
            ends = found[sep] + [len(text)]
            return [text[a:b] for a, b in zip(cuts, ends)], sep
    return None


def wrap_line(line: str, width: int = 120) -> list[str]:
    if len(line) <= width or '"' in line or "'" in line or "#" in line:
        return [line]
    indent = line[: len(line) - len(line.lstrip())]
    if line.rstrip().endswith(",") and not _groups_span(line):
        # a line of arguments inside an enclosing call: one line per width's worth of them
        split = _split_top_level(line.strip()[:-1])
        if split is not None and split[1] == ", ":
            return _pack(indent, [p.strip() + "," for p in split[0]], width)
    for open_at, close_at in _groups(line):
        inner = line[open_at + 1:close_at]
        split = _split_top_level(inner)
        if split is None or close_at - open_at < 40:
            continue
        parts, sep = split
        head, tail = line[: open_at + 1], line[close_at:]
        inner_indent = indent + "    "
        body = []
        for n, part in enumerate(parts):
            part = part.strip()
            if sep == ", " and n == len(parts) - 1:
                part = part.removesuffix(",")  # a trailing comma, as in `(a, b,)`: added below like any other
            if not part:  # after a trailing separator, as in `f(a, b, )`: every part gets its comma already
                continue
            if sep == ", ":
                text = f"{inner_indent}{part},"
            else:
                text = f"{inner_indent}{'' if n == 0 else sep.strip() + ' '}{part}"
            body += wrap_line(text, width)
        return [head.rstrip()] + body + [indent + tail.lstrip()]
    return [line]


def _groups_span(line: str) -> bool:
    """Whether one bracket group holds most of the line (then it is split from the inside)."""
    return any(b - a > len(line) // 2 for a, b in _groups(line))


def _pack(indent: str, items: list[str], width: int) -> list[str]:
    lines, current = [], indent
    for item in items:
        if current.strip() and len(current) + 1 + len(item) > width:
            lines.append(current)
            current = indent
        current += (" " if current.strip() else "") + item
    return lines + [current]


def wrap_long_lines(source: str, width: int = 120) -> str:
    out, in_docstring = [], False
    for line in source.split("\n"):
        if in_docstring or '"""' in line:
            out.append(line)  # docstrings (the spec's text among them) stay as written
            in_docstring ^= line.count('"""') % 2 == 1
            continue
        out += wrap_line(line, width)
    return "\n".join(out)
