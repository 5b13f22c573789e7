"""Kernel families on the shared skeleton (attnc/codegen/skeleton.py). Each module supplies its tile
bodies, row state and epilogues as one typed object for its templates, and a `FAMILY` object that the
pipeline picks (attnc/pipeline.py): its templates, the attnc.runtime modules its module calls, and its
part of the template context.

    softmax.py   the online softmax (FlashAttention-2 forward and backward): softmax, sinks, scores
    general.py   normalizations other than softmax: multi-pass forward, sympy-derived backward
    decode.py    split-KV decoding of the softmax family: the rows of a KV group (query heads x new
                 queries); the general family decodes with its own passes
    linear.py    chunked linear attention: feature maps, chunk state, decay (docs/linear.md)

No family imports another (softmax.py reads decode.py's body for its decode kernel), and none imports
attnc/codegen/module.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ...errors import BuildError
from ..printers import UnsupportedExpression

# the generated module of a family on the tile walks calls these attnc.runtime modules
TILE_RUNTIME = ("checks", "decoding", "launch", "ops", "varlen")


@dataclass(frozen=True)
class TileFamily:
    """A family on the tile walks (softmax, general): templates/module.py.j2 with the family's kernels
    (`kernels`), its part of the shared launchers (`host`) and its split-KV decode kernels
    (`decode_kernels`). `row_array` is what the forward keeps per row for the backward (what dQ and
    dK/dV read per row is the body's `row_arrays`); `returns_lse` whether there is a log-sum-exp;
    `decode_selects` whether its decode kernels apply a select's tiles per new query."""

    kernels: str
    host: str
    decode_kernels: str
    row_array: str
    returns_lse: bool
    template: str = "module.py.j2"
    runtime: tuple[str, ...] = TILE_RUNTIME
    triton: bool = True
    tile_walks: bool = True  # the module runs on the tile walks (module.py adds the walk's context)
    decode_selects: bool = False


def decoding(build: Callable[[], object]) -> dict:
    """The split-KV decode body of a family on the tile walks, for its decode kernels
    (family.decode_kernels, rendered by templates/decode.py.j2). A spec whose decode kernel cannot be
    printed keeps its forward: its `decode` raises a ValueError with the reason (`decode_error`)."""
    try:
        return {"decode_body": build(), "decode_error": ""}
    except (BuildError, UnsupportedExpression) as err:
        return {"decode_body": None, "decode_error": str(err)}
