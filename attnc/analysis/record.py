"""The record of everything the analyses know about one spec, and the kernel family it implies.

attnc/pipeline.py builds it once per spec (`pipeline.analyse`); the code generator, `attnc ir` and the
benchmarks read it, so no consumer runs an analysis again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .. import ir
from .bounds import Clause
from .factorize import Algorithm, AlgorithmKind
from .rowstats import RowPlan
from .walks import TileWalk


class Family(enum.Enum):
    """The kernels a spec runs as: which generator the pipeline calls."""

    SOFTMAX = "softmax"  # an online softmax on the tile walks (templates/softmax.py.j2)
    GENERAL = "general"  # general probabilities: row statistics in passes (templates/general.py.j2)
    LINEAR = "linear"  # chunked linear attention: the weight factorizes (templates/linear.py.j2)


@dataclass(frozen=True)
class Analyses:
    """Everything the analyses know about one spec."""

    variant: ir.Variant
    rows: RowPlan  # softmax or general, row statistics, passes
    clauses: tuple[Clause, ...]  # the mask as key ranges lo(q) <= kv <= hi(q)
    walk: TileWalk  # how kernels find their tiles
    algorithm: Algorithm  # chunked (linear attention) or quadratic


def choose_family(analyses: Analyses) -> Family:
    """Linear where the weight factorizes; else softmax where the probabilities are one, else general."""
    if analyses.algorithm.kind is AlgorithmKind.CHUNKED:
        return Family.LINEAR
    return Family.SOFTMAX if analyses.rows.softmax is not None else Family.GENERAL
