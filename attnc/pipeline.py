"""The compiler's driver: the only module that calls the stages, in order, one line each; data flows one way.

    text       --parse-->    ast.Spec       attnc/parse.py               (grammar/attn.lark, positions kept)
    AST        --check-->    ir.Variant     attnc/check/                 (names, types, indices; SpecError)
    IR         --analyse-->  Analyses       attnc/analysis/rowstats.py   (row statistics and passes)
                                            attnc/analysis/bounds.py     (the mask's key ranges)
                                            attnc/analysis/walks.py      (the tile walk: band, lists, all)
                                            attnc/analysis/factorize.py  (linear attention: chunked or not)
    Analyses   --family-->   Family         attnc/analysis/record.py     (softmax, general or linear)
    Analyses   --generate--> Python source  attnc/codegen/module.py      (the family's kernels on the walk,
                                                                         templates/*.j2, sympy printers)
    source     --format-->   Python source  attnc/codegen/layout.py      (long lines wrapped; compiled once)

`analyse` returns one record (attnc/analysis/record.py) that the code generator, `attnc ir` and the
benchmarks all read, so no consumer runs an analysis again. `generate_module` runs the stages after the checker.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from . import check as _check
from . import ir
from . import parse as _parse
from .analysis import bounds, factorize, rowstats, walks
from .analysis.record import Analyses, Family, choose_family
from .codegen import interval_code, module
from .codegen.families import general, linear, softmax
from .errors import SpecError

__all__ = ["Analyses", "Family", "analyse", "block_variant", "choose_family", "compile_file", "compile_text",
           "generate_module", "sink_free_variant"]

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


def block_variant(variant: ir.Variant, suffix: str) -> ir.Variant:
    """The spec on a block of a longer problem (`ir.Variant.shifted`): `visible` keeps the whole
    problem's count where the mask gives it in closed form (the row statistics' analysis finds it)."""
    return variant.shifted(suffix, rowstats.visible_closed_form(variant.mask))


def sink_free_variant(variant: ir.Variant, suffix: str) -> ir.Variant:
    """The spec with its softmax sink left out (`rowstats.without_sink`); the spec itself where it has none."""
    probs = rowstats.without_sink(variant.probs)
    if probs is None:
        return variant
    return replace(variant, name=f"{variant.name}_{suffix}", probs=probs,
                   source=variant.source + ("" if variant.source.endswith("\n") else "\n") + "# sink-free: the softmax sink left out\n")


def analyse(variant: ir.Variant) -> Analyses:
    """IR -> the analyses, in order: row statistics, key ranges, the tile walk they imply, the algorithm."""
    rows = rowstats.plan_rows(variant)  # 3. row statistics, passes, softmax recognition
    clauses = bounds.key_clauses(variant.mask)  # 4. key ranges of the mask
    walk = walks.choose_walk(variant, clauses, interval_code.interval_gap)  # 5. band, plan lists, all, unplanned
    algorithm = choose_algorithm(variant)  # 6. linear attention: chunked when the weight factorizes
    return Analyses(variant, rows, clauses, walk, algorithm)


# the code of each family: its templates, runtime modules and template context (attnc/codegen/families/)
_FAMILIES = {Family.SOFTMAX: softmax.FAMILY, Family.GENERAL: general.FAMILY, Family.LINEAR: linear.FAMILY}


def generate_module(variant: ir.Variant) -> str:
    """Checked IR -> the generated module's source."""
    analyses = analyse(variant)  # 3.-6.
    family = _FAMILIES[choose_family(analyses)]  # 7. softmax, general or linear
    source = module.generate(analyses, family)  # 8. the family's module
    return module.formatted(source, variant.name)  # 9. long lines wrapped; compiled once


def choose_algorithm(variant: ir.Variant):
    """Chunked where the weight factorizes (attnc/analysis/factorize.py), else quadratic; a spec with
    a feature map must factorize (the quadratic kernels cannot evaluate one)."""
    algorithm = factorize.factorize(variant)
    if variant.select is not None and algorithm.kind is factorize.AlgorithmKind.CHUNKED:
        # a running state sums every key the mask lets through: it cannot skip the tiles a select hides
        algorithm = factorize.Algorithm("quadratic", "a select hides key tiles chosen from q and k at run time",
                                        failed_at=ir.Statement.SELECT)
    if variant.stats and algorithm.kind is factorize.AlgorithmKind.CHUNKED:
        if variant.features:
            raise SpecError.at("statistics of the weights need the quadratic kernels, and a feature map runs as "
                               "linear attention only", variant.spans.of(ir.Statement.STAT, variant.stats[0].name),
                               "drop the feature map, or the stat statements (docs/statistics.md)",
                               path=variant.path, source=variant.source)
        # a running state never holds a weight per (query, key) pair: the quadratic kernels do
        algorithm = factorize.Algorithm("quadratic", "the stat statements reduce the weights per pair",
                                        failed_at=ir.Statement.STAT)
    if variant.features and algorithm.kind is not factorize.AlgorithmKind.CHUNKED:
        # at the statement that does not factorize; where that is unknown or not written (probs left
        # to the default softmax), at the feature map that asks for linear attention
        failed = algorithm.failed_at and variant.spans.of(algorithm.failed_at)
        span = failed or variant.spans.of(ir.Statement.FEATURE, variant.features[0][0])
        raise SpecError.at(f"this spec uses a feature map but cannot run as linear attention: {algorithm.reason}",
                           span, "feature maps need a full or causal mask and probs = alpha * W + beta "
                           "(see docs/linear.md)", path=variant.path, source=variant.source)
    return algorithm
