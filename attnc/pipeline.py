"""The compiler's passes, in order. Each line is one module with one job; data flows one way.

    text     --parse-->    ast.Spec       attnc/parse.py             (grammar/attn.lark, positions kept)
    AST      --check-->    ir.Variant     attnc/check.py             (names, types, indices; SpecError)
    IR       --analyse-->  Analyses       attnc/analysis/rowstats.py (row statistics and passes)
                                          attnc/analysis/bounds.py   (the mask's key ranges)
                                          attnc/codegen/skeleton.py  (the tile walk: band, lists, all)
    Analyses --generate--> Python source  attnc/codegen/module.py    (a family's body on the skeleton,
                                                                     templates/*.j2, sympy printers)

`analyse` returns one record that the code generator, `attnc ir` and the benchmarks all read, so no
consumer runs an analysis again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import check as _check
from . import ir
from . import parse as _parse
from .errors import SpecError

MAX_SPEC_BYTES = 1 << 20  # a spec is a few lines; refuse megabytes of junk before parsing it


def read_spec(path: str | Path) -> tuple[str, str]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SpecError.at(f"cannot read spec: {err.strerror}", None, path=str(path)) from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError.at(f"spec is {len(data)} bytes; the limit is {MAX_SPEC_BYTES}", None, path=str(path))
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark, as some editors write, is not part of the text
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        col = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        from .errors import Span

        raise SpecError.at("spec is not valid UTF-8", Span(line, col), path=str(path)) from None
    return str(path), text


def compile_text(source: str, path: str = "<spec>") -> ir.Variant:
    """Spec text -> checked IR."""
    try:
        spec = _parse.parse(source, path)  # 1. text -> AST
        return _check.check(spec)  # 2. AST -> IR
    except RecursionError:  # a backstop: parse.MAX_NESTING should stop deep input before this
        raise SpecError.at("expression nested too deeply", None, "split it into several 'let' statements",
                           path=path, source=source) from None


def compile_file(path: str | Path) -> ir.Variant:
    return compile_text(*reversed(read_spec(path)))


@dataclass(frozen=True)
class Analyses:
    """Everything the analyses know about one spec."""

    variant: ir.Variant
    rows: object  # analysis.rowstats.RowPlan: softmax or general, row statistics, passes
    clauses: tuple  # analysis.bounds.Clause: the mask as key ranges lo(q) <= kv <= hi(q)
    walk: object  # codegen.skeleton.TileWalk: how kernels find their tiles
    algorithm: object = None  # analysis.factorize.Algorithm: "chunked" (linear attention) or "quadratic"


def analyse(variant: ir.Variant) -> Analyses:
    """IR -> the analyses, in order: row statistics, key ranges, then the tile walk they imply."""
    from .analysis import bounds, rowstats
    from .codegen.skeleton import choose_walk

    rows = rowstats.plan_rows(variant)  # 3. row statistics, passes, softmax recognition
    clauses = bounds.key_clauses(variant.mask)  # 4. key ranges of the mask
    walk = choose_walk(variant, clauses)  # 5. tile walk: closed-form band, plan lists, all, or unplanned
    algorithm = choose_algorithm(variant)  # 6. linear attention: chunked when the weight factorizes
    return Analyses(variant, rows, clauses, walk, algorithm)


def choose_algorithm(variant: ir.Variant):
    """"chunked" where the weight factorizes (attnc/analysis/factorize.py), else "quadratic"; a spec with
    a feature map must factorize (the quadratic kernels cannot evaluate one)."""
    from .analysis import factorize

    algorithm = factorize.factorize(variant)
    if variant.features and algorithm.name != "chunked":
        # at the statement that does not factorize; where that is unknown or not written (probs left
        # to the default softmax), at the feature map that asks for linear attention
        failed = algorithm.failed_at and variant.spans.of(algorithm.failed_at)
        span = failed or variant.spans.of(ir.Statement.FEATURE, variant.features[0][0])
        raise SpecError.at(f"this spec uses a feature map but cannot run as linear attention: {algorithm.reason}",
                           span, "feature maps need a full or causal mask and probs = alpha * W + beta "
                           "(see docs/linear.md)", path=variant.path, source=variant.source)
    return algorithm
