"""Spec text edits used by the integrations: a spec with extra boolean inputs ANDed into its mask."""

from __future__ import annotations

import re

__all__ = ["and_mask_inputs"]


def and_mask_inputs(text: str, suffix: str, inputs: list[tuple[str, str, str]], where: str = "<spec>") -> str:
    """The spec renamed `<name>_<suffix>`, with one `input NAME: bool[B, AXIS]` per (NAME, AXIS, INDEX) of
    `inputs` and its mask ANDed with `NAME[b, INDEX]` (INDEX: q or kv)."""
    lines = text.splitlines()
    heads = [i for i, line in enumerate(lines) if re.match(r"\s*attention\s+\w+", line)]
    masks = [i for i, line in enumerate(lines) if re.match(r"\s*mask\s", line)]
    if len(heads) != 1 or len(masks) > 1:
        raise ValueError(f"{where}: extending the spec's mask needs one 'attention' line and at most one 'mask' "
                         f"line")
    extra = " and ".join(f"{name}[b, {index}]" for name, _, index in inputs)
    for i in masks:
        code = lines[i].split("#", 1)[0].strip()[len("mask"):].strip()
        lines[i] = f"mask ({code}) and {extra}"
    if not masks:
        lines.append(f"mask {extra}")
    (i,) = heads
    lines[i] = re.sub(r"(attention\s+)(\w+)", rf"\1\2_{suffix}", lines[i].split("#", 1)[0])
    for name, axis, _ in reversed(inputs):
        lines.insert(i + 1, f"input {name}: bool[B, {axis}]")
    return "\n".join(lines) + "\n"
