"""The general family: normalizations other than softmax, printed for templates/general.py.j2.

The multi-pass forward and the derived backward, from the row plan (attnc/analysis/rowstats.py: which statistic each forward pass accumulates, the output terms) and
the gradient plan (attnc/analysis/rowgrad.py: dS, the row adjoints and the backward row reductions).
Elementwise work is printed as sympy common-subexpression steps (`e0 = ...`), so a tile computes a
shared factor (sigmoid(lam * s), say) once for the weight, the statistics and the derivatives.

Names in the kernels: `vis` (visible, clamped to >= 1), `r1, r2, ...` the row statistics (as
`attnc ir` numbers them), `rbar1, ...` their adjoints, `delta` = rowsum(dO * O), `dp` = dO . v.
Row values are [BLOCK_M] vectors; tile expressions read them as `r1[:, None]`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, replace

import sympy

from ... import ir
from ...analysis import rowgrad
from ...analysis.rowstats import RowPlan, is_row_constant
from .. import statistics
from ..grads import InputGrad, ReadGrads, input_grads
from ..printers import guarded_triton_code
from ..skeleton import (
    DECODE_ROW,
    DECODE_TILE,
    ROW,
    TILE,
    TILE_T,
    BuildError,
    Load,
    RowReads,
    TileMask,
    atoms_read,
    base_names,
    split_loads,
    tensor_loads,
    tile_mask,
)
from . import TileFamily, decoding

# [Note] The entropy's gradient (a `stat ... = entropy(P)` in a loss). d entropy / dP = -(log P + 1) joins
# dL/dP = dO . v per entry: dp becomes dp - gent * (logp + 1) in every derived expression (dS, the
# learnable reads, the backward row reductions), with gent = dLoss/d entropy per row and logp = log P (0
# where P <= 0), and delta = rowsum(P * dp) becomes delta + gent * (entropy - sum_kv P), the host's.
GENT = sympy.Symbol("gent", real=True)
LOGP = sympy.Symbol("logp", real=True)
_LOGP_LINE = "logp = tl.log(tl.where(p > 0.0, p, 1.0))  # log P, 0 where P <= 0 (see [Note] The entropy's gradient)"


class StatKind(abc.ABC):
    """How one kind of row statistic is computed, as the Triton statements the templates render for a
    statistic `v` (a [BLOCK_M] row value; a reduction's argument on a tile is `g_<v>`): its value before
    the first key tile, its update on masked and on fully unmasked tiles, the merge of split-KV
    decoding's per-split values, and the value of a row that saw no key."""

    name: str
    start = "tl.zeros([BLOCK_M], dtype=tl.float32)"  # the value of no key
    pad = "0.0"  # what the backward loads for a row past Lq

    def __repr__(self) -> str:
        return f"StatKind({self.name})"

    @abc.abstractmethod
    def masked(self, v: str) -> str:
        """On a tile with masked entries, once `keep` is known."""

    def unmasked(self, v: str) -> str | None:
        """On a fully unmasked tile (APPLY_MASK False), where anything is to be done there."""
        return None

    def reduce(self, v: str) -> str | None:
        """The tile folded into the row value, after the mask, where the mask has not done it."""
        return None

    def merge(self, v: str, parts: str) -> str:
        """The row value from the splits' values at `parts` (s_ok: the splits that exist)."""
        return f"{v} = tl.sum(tl.load({parts}, mask=s_ok, other=0.0), 0)"

    def empty_row(self, v: str) -> str | None:
        """The value of a row that saw no key, once all its keys are in, where it needs one."""
        return None


class _Sum(StatKind):
    name = "sum"

    def masked(self, v):
        return f"g_{v} = tl.where(keep, g_{v}, 0.0)"

    def reduce(self, v):
        return f"{v} += tl.sum(g_{v}, 1)"


class _Max(StatKind):
    name = "max"
    start = 'tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)'

    def masked(self, v):
        return f'g_{v} = tl.where(keep, g_{v}, float("-inf"))'

    def reduce(self, v):
        return f"{v} = tl.maximum({v}, tl.max(g_{v}, 1))"

    def merge(self, v, parts):
        return f'{v} = tl.max(tl.load({parts}, mask=s_ok, other=float("-inf")), 0)'

    def empty_row(self, v):
        return f'{v} = tl.where({v} == float("-inf"), 0.0, {v})  # a row with no key: 0, as the reference'


class _Count(StatKind):
    """`visible`, counted over the tiles (the mask has no closed form of it)."""

    name = "count"
    pad = "1.0"  # a count is evaluated >= 1

    def masked(self, v):
        return f"{v} += tl.sum(tl.where(keep, 1.0, 0.0), 1)"

    def unmasked(self, v):
        return f"{v} += BLOCK_N"

    def empty_row(self, v):
        # log(visible) and 1 / visible stay finite; the row's weights are all masked anyway
        return f"{v} = tl.maximum({v}, 1.0)  # a row with no key is evaluated on visible = 1"


KINDS: dict[str, StatKind] = {"sum": _Sum(), "max": _Max(), "count": _Count()}  # by rowgrad.Stat.kind


@dataclass(frozen=True)
class Stat:
    """A row statistic the kernels accumulate, and the statements of its kind (StatKind) for it."""

    var: str  # the kernel's name for the row statistic (`vis` for visible)
    kind: StatKind
    index: int = 0  # its slot in the saved STATS array

    @property
    def init(self) -> str:
        return f"{self.var} = {self.kind.start}"

    @property
    def masked(self) -> str:
        return self.kind.masked(self.var)

    @property
    def unmasked(self) -> str | None:
        return self.kind.unmasked(self.var)

    @property
    def reduce(self) -> str | None:
        return self.kind.reduce(self.var)

    @property
    def empty_row(self) -> str | None:
        return self.kind.empty_row(self.var)

    def merge(self, parts: str) -> str:
        return self.kind.merge(self.var, parts)


@dataclass(frozen=True)
class Pass:
    """One forward pass over the keys: the statistics it accumulates and, in the output pass, the
    output terms acc_t = sum_j w_t v_j."""

    index: int
    stats: tuple[Stat, ...]
    accs: tuple[str, ...]
    known: tuple[str, ...]  # statistics of earlier passes that its tiles read
    lines: tuple[str, ...]  # per tile: g_<stat> (the statistics' arguments) and w<t> (the weights)
    text: str

    @property
    def state(self) -> tuple[str, ...]:
        return tuple(st.var for st in self.stats) + self.accs


@dataclass(frozen=True)
class Adjoint:
    var: str
    index: int
    code: str


@dataclass(frozen=True)
class Reduction:
    var: str
    text: str


@dataclass(frozen=True)
class RowNeeds:
    """What code printed for rows from some expressions reads of the row's context, computed from their
    sympy form: a kernel defines just that before it (decoding's merge, which starts from a flat row
    index; the backward's row adjoints)."""

    batch: bool  # b
    head: bool  # h
    query: bool  # q
    key_length: bool  # Lk
    query_length: bool  # Lq
    loads: tuple[Load, ...]  # the row loads, in load order (nested ones first)
    closed_visible: bool  # visible in closed form (what it reads is in the fields above)
    stats: tuple[str, ...]  # the saved row statistics it reads, in pass order

    @property
    def vars(self) -> frozenset[str]:
        """The row values it reads: loads, statistics and visible."""
        return frozenset([load.var for load in self.loads] + list(self.stats) + ["vis"] * self.closed_visible)


@dataclass(frozen=True)
class GeneralBody(ReadGrads):
    loads: tuple[Load, ...]  # tensor inputs every tile reads
    mask: TileMask
    row_loads: tuple[Load, ...]
    vis_closed: str | None  # visible in closed form, when there is one
    passes: tuple[Pass, ...]
    coefficients: tuple[str, ...]  # o = sum_t c_t * acc_t
    saved: tuple[Stat, ...]  # statistics the forward stores for the backward
    row_lines: tuple[tuple[str, str], ...]  # (var, statement): what a backward kernel reads per query row
    stat_vars: tuple[str, ...]
    adjoints: tuple[Adjoint, ...]
    adjoint_needs: RowNeeds  # what the adjoints' code reads per row
    output_needs: RowNeeds  # what the output's coefficients read per row
    visible_needs: RowNeeds  # what visible's closed form reads per row (nothing without one)
    reductions: tuple[Reduction, ...]
    reduction_lines: tuple[str, ...]
    reductions_read_dp: bool
    reductions_read_gent: bool  # the backward row reductions read the entropy's gradient (GENT)
    needs_delta: bool
    dq_lines: tuple[str, ...]
    loads_t: tuple[Load, ...]  # dK/dV's key-major tiles: loads, mask and lines
    mask_t: TileMask
    dkdv_lines: tuple[str, ...]
    grads: tuple[InputGrad, ...]
    # -- the backward (templates/backward.py.j2) --
    dq_rows: RowReads  # the statistics and adjoints dS reads
    dkdv_rows: RowReads  # ... and the weights p
    stat_rows: RowReads  # what the weights p read per row (templates/statistics.py.j2)
    stat_lines: tuple[str, ...]  # the weights p of a query-major tile
    stat_lines_t: tuple[str, ...]  # ... of a key-major tile
    entropy_grad: bool  # the spec returns an entropy: the backward takes its gradient (GENT)
    fused_rows = ()  # the row statistics are a pass of their own (_row_stats), not the forward's
    row_select = False  # its decode runs no select (decode_selects is False)

    @property
    def row_arrays(self) -> tuple[str, ...]:
        """The forward's row statistics, _bwd_rows' adjoints and, with an entropy, its gradient per row."""
        return ("STATS", "RBAR") + ("GENT",) * self.entropy_grad
    read_weight = ""  # a read's term is dL/d(read) already

    @property
    def split_dkdv(self) -> bool:
        """dK and dV in two launches, one fp32 accumulator each, where the weights read row statistics.

        [Note] Registers of the general dK/dV tile: the derivative of weights normalized by row
        statistics (softplus, softplus_reweight) keeps several fp32 [BLOCK_N, BLOCK_M] tiles live next
        to the two [BLOCK_N, D] accumulators, and the 64 x 128 tile spills (sm_90, D = 128: softplus
        280 B, softplus_reweight 560 B). One accumulator per launch fits (0 and 32 B, 0 and 0 B) for
        one more tile product (the dV launch recomputes s = k.qT and p). Elementwise weights (sigmoid,
        relu) read no statistics and keep one launch (0 B)."""
        return bool(self.saved)


def _block(outputs, names, like="s") -> list[str]:
    """Assignments computing each (var, expr) of outputs, common subexpressions first.
    An output that is constant along the row's keys is broadcast to the tile's shape (like `like`)."""
    exprs = [sympy.sympify(e) for _, e in outputs]
    # Reciprocals of row constants (1 / r1, 1 / visible) are computed once per row, [BLOCK_M, 1], so
    # that the tile multiplies instead of dividing.
    reciprocals = {}
    for e in exprs:
        for pw in sorted(e.atoms(sympy.Pow), key=sympy.default_sort_key):
            if pw.exp.is_number and pw.exp < 0 and not pw.base.is_number and is_row_constant(pw.base):
                reciprocals.setdefault(pw, sympy.Symbol(f"inv{len(reciprocals)}"))
    exprs = [e.xreplace(reciprocals) for e in exprs]
    names = dict(names)
    lines = []
    for pw, sym in reciprocals.items():
        lines.append(f"{sym} = {guarded_triton_code(pw, names)}")
        names[sym] = str(sym)
    replacements, reduced = sympy.cse(exprs, symbols=sympy.numbered_symbols("e"), order="none")
    for sym, e in replacements:
        lines.append(f"{sym} = {guarded_triton_code(e, names)}")
        names[sym] = str(sym)
    for (var, original), e in zip(outputs, reduced):
        code = guarded_triton_code(e, names)
        if is_row_constant(original):
            code = f"{code} + tl.zeros_like({like})"
        lines.append(f"{var} = {code}")
    return lines


def build(v: ir.Variant, rows: RowPlan, tile: dict = TILE, row: dict = ROW) -> GeneralBody:
    """The body printed for query-major tiles whose indices `tile` spells (and rows as `row` spells
    them): the forward's, or split-KV decoding's rows with their own heads and positions."""
    try:
        grad = rowgrad.plan_gradients(v, rows)
    except rowgrad.UnsupportedGradient as err:
        raise BuildError(str(err)) from None

    stats = grad.stats
    entropy = statistics.differentiated(v)
    if entropy:  # see [Note] The entropy's gradient
        grad = rowgrad.with_probs_gradient(grad, -GENT * (LOGP + 1))
    reducible = [st for st in stats if st.kind in ("sum", "max")]
    closed_vis = next((st for st in stats if st.kind == "closed"), None)
    late = {st.symbol for st in stats if st.pass_ >= rows.output_pass}

    # -- output terms: o = sum_t c_t * acc_t, acc_t = sum_j w_t v_j --
    # A coefficient known before the output pass (1, 1/visible, 1/r1 of an earlier pass) is folded
    # into the weight: one accumulator for all such terms.
    folded, accumulated = sympy.Integer(0), []
    for term in rows.terms:
        w, c = rowgrad.name_stats(term.weight, stats), rowgrad.name_stats(term.coefficient, stats)
        if c.free_symbols & late:
            accumulated.append((w, c))
        else:
            folded += c * w
    acc_terms = ([(folded, sympy.Integer(1))] if folded != 0 else []) + accumulated

    reads = input_grads([read for read, _ in grad.learnable], key_reads=True, table_reads=True)
    terms = [(g.term, e, g.per_key) for g, (_, e) in zip(reads, grad.learnable)]
    dscore_terms = [("ds", grad.dscore)] + [(t, e) for t, e, per_key in terms if not per_key]
    key_terms = [(t, e) for t, e, per_key in terms if per_key]  # summed per key by dK/dV
    tile_exprs = [v.mask] + [st.arg for st in reducible] + [w for w, _ in acc_terms] \
        + [grad.probs] + [e for _, e in dscore_terms + key_terms] + [r.term for r in grad.reductions]
    row_exprs = [c for _, c in acc_terms] + [a.value for a in grad.adjoints] \
        + ([rows.visible] if closed_vis is not None else [])
    row_names_, row_loads = tensor_loads(row_exprs, row, "r_")

    def tile_names(where: dict, row: str) -> tuple[dict, list, list]:
        """Names of a tile oriented as `where` says (row values broadcast by `row`), and its loads."""
        load_names, loads = tensor_loads(tile_exprs, where, "t_")
        names = {**base_names(v, where), **load_names}
        for st in stats:
            names[st.symbol] = ("vis" if st.stat == ir.visible else str(st.symbol)) + row
        for adj in grad.adjoints:
            names[adj.symbol] = f"{adj.symbol}{row}"
        names[rowgrad.DP] = "dp"
        names[GENT], names[LOGP] = f"gent{row}", "logp"
        always, mask_only = split_loads(load_names, loads, v.mask, tile_exprs[1:])
        return names, always, mask_only

    tnames, always, mask_only = tile_names(tile, "[:, None]")  # forward, dQ, row reductions
    tnames_t, always_t, mask_only_t = tile_names(TILE_T, "[None, :]")  # dK/dV: key-major tiles
    rnames = {**base_names(v, row), **row_names_}
    for st in stats:
        rnames[st.symbol] = "vis" if st.stat == ir.visible else str(st.symbol)
    for adj in grad.adjoints:
        rnames[adj.symbol] = str(adj.symbol)
    rnames[rowgrad.DELTA] = "delta"
    rnames[GENT] = "gent"
    for red in grad.reductions:
        rnames[red.symbol] = str(red.symbol)

    def var(st):
        return "vis" if st.stat == ir.visible else str(st.symbol)

    def with_logp(names: dict, outputs: list, always_p: bool = False) -> list[str]:
        """The lines of `outputs`, after the weights p and their log where the outputs read logp (the
        entropy's gradient); `always_p`: p is wanted anyway (dK/dV's dV = P^T dO)."""
        if not any(LOGP in sympy.sympify(e).free_symbols for _, e in outputs):
            return _block(([("p", grad.probs)] if always_p else []) + outputs, names)
        return _block([("p", grad.probs)], names) + [_LOGP_LINE] + _block(outputs, names)

    # -- forward passes --
    passes = []
    for p in range(1, rows.passes + 1):
        here = [st for st in stats if st.pass_ == p]
        outputs = [(f"g_{st.symbol}", st.arg) for st in here if st.kind in ("sum", "max")]
        accs = []
        if p == rows.output_pass:
            for i, (w, _) in enumerate(acc_terms):
                outputs.append((f"w{i}", w))
                accs.append(f"acc{i}")
        described = [f"{'visible' if st.kind == 'count' else st.symbol} ({st.kind})" for st in here]
        passes.append(Pass(
            index=p,
            stats=tuple(Stat(var(st), KINDS[st.kind]) for st in here),
            accs=tuple(accs),
            known=tuple(var(st) for st in stats if st.pass_ < p),
            lines=tuple(_block(outputs, tnames)),
            text=", ".join(described + (["the output" if len(accs) == 1 else f"the {len(accs)} output terms"]
                                         if accs else [])),
        ))

    saved = list(grad.saved)
    # what a backward kernel reads per query row (with offs_m, row_ok and rows in scope)
    row_lines = [(load.var, load.code) for load in row_loads]
    if saved:
        row_lines.append(("stat_stride", "stat_stride = ROWS"))  # entries of each row array (varlen: Hq * tokens)
    row_lines += [(var(st), (f"{var(st)} = tl.load(STATS + {i} * stat_stride + rows, mask=row_ok, "
                             f"other={KINDS[st.kind].pad})")) for i, st in enumerate(saved)]
    if closed_vis is not None:
        row_lines.append(("vis", (f"vis = tl.maximum(({guarded_triton_code(rows.visible, rnames)}) "
                                  "+ tl.zeros([BLOCK_M], dtype=tl.float32), 1.0)")))

    def needs(exprs) -> RowNeeds:
        """What row code printed from exprs reads, visible's closed form included where they read it."""
        atoms = set().union(*(atoms_read(e) for e in exprs))
        closed = closed_vis is not None and ir.visible in atoms
        if closed:
            atoms |= atoms_read(rows.visible)
        loads = {row_names_[a] for a in atoms if a in row_names_}
        return RowNeeds(
            batch=ir.b in atoms, head=ir.h in atoms, query=ir.q in atoms,
            key_length=ir.SIZES["Lk"] in atoms, query_length=ir.SIZES["Lq"] in atoms,
            loads=tuple(load for load in row_loads if load.var in loads),
            closed_visible=closed,
            stats=tuple(var(st) for st in saved if st.symbol in atoms),
        )

    adjoint_lines = [f"{a.symbol} = tl.load(RBAR + {i} * stat_stride + rows, mask=row_ok, other=0.0)"
                     for i, a in enumerate(grad.adjoints)]
    vis_loads = {row_names_[a] for a in ir.scalar_loads(rows.visible) if a in row_names_} if closed_vis else set()

    def row_reads(exprs) -> RowReads:
        """The statistics and adjoints that tile expressions read, and the lines computing them with
        what those lines read in turn (stat_stride; a closed-form visible's loads)."""
        read = set().union(*(sympy.sympify(e).free_symbols for e in exprs))
        stats_read = [st for st in stats if st.symbol in read]
        adjoints_read = [i for i, a in enumerate(grad.adjoints) if a.symbol in read]
        reads_gent = GENT in read
        arrays = ("STATS",) * any(st in saved for st in stats_read) + ("RBAR",) * bool(adjoints_read) \
            + ("GENT",) * reads_gent
        needed = {var(st) for st in stats_read} | (vis_loads if closed_vis in stats_read else set())
        needed |= {"stat_stride"} if arrays else set()
        return RowReads(
            lines=tuple(line for name, line in row_lines if name in needed)
            + tuple(adjoint_lines[i] for i in adjoints_read)
            + ("gent = tl.load(GENT + rows, mask=row_ok, other=0.0)",) * reads_gent,
            values=tuple(var(st) for st in stats_read) + tuple(str(grad.adjoints[i].symbol) for i in adjoints_read)
            + ("gent",) * reads_gent,
            arrays=arrays,
            sizes=("ROWS",) if arrays else (),  # stat_stride = ROWS
        )
    return GeneralBody(
        loads=tuple(always),
        mask=tile_mask(v, tnames, mask_only, tile),
        row_loads=tuple(row_loads),
        vis_closed=None if closed_vis is None else guarded_triton_code(rows.visible, rnames),
        passes=tuple(passes),
        coefficients=tuple(guarded_triton_code(c, rnames) for _, c in acc_terms),
        saved=tuple(Stat(var(st), KINDS[st.kind], i) for i, st in enumerate(saved)),
        row_lines=tuple(row_lines),
        stat_vars=tuple(var(st) for st in stats),
        adjoints=tuple(Adjoint(str(a.symbol), i, guarded_triton_code(a.value, rnames))
                       for i, a in enumerate(grad.adjoints)),
        adjoint_needs=needs([a.value for a in grad.adjoints]),
        output_needs=needs([c for _, c in acc_terms]),
        visible_needs=needs([ir.visible]),
        reductions=tuple(Reduction(str(r.symbol), r.text) for r in grad.reductions),
        reduction_lines=tuple(with_logp(tnames, [(f"term_{r.symbol}", r.term) for r in grad.reductions])),
        reductions_read_gent=any(GENT in r.term.free_symbols for r in grad.reductions),
        reductions_read_dp=any(rowgrad.DP in r.term.free_symbols for r in grad.reductions),
        needs_delta=any(rowgrad.DELTA in a.value.free_symbols for a in grad.adjoints),
        dq_lines=tuple(with_logp(tnames, dscore_terms)),
        loads_t=tuple(always_t),
        mask_t=tile_mask(v, tnames_t, mask_only_t, TILE_T),
        dkdv_lines=tuple(with_logp(tnames_t, [("ds", grad.dscore)] + key_terms, always_p=True)),
        grads=tuple(g if g.entry_index is None else replace(g, entry=guarded_triton_code(g.entry_index, tnames))
                    for g in reads),
        dq_rows=row_reads([e for _, e in dscore_terms] + [grad.probs] * entropy),
        dkdv_rows=row_reads([grad.probs, grad.dscore] + [e for _, e in key_terms]),
        stat_rows=row_reads([grad.probs]),
        stat_lines=tuple(_block([("p", grad.probs)], tnames)),
        stat_lines_t=tuple(_block([("p", grad.probs)], tnames_t)),
        entropy_grad=entropy,
    )


class GeneralFamily(TileFamily):
    """Normalizations other than softmax on the tile walks: its kernels (templates/general.py.j2), its
    part of the shared launchers (general_host.py.j2) and its passes printed for decode rows
    (general_decode.py.j2). The weights are no softmax: there is no log-sum-exp."""

    def context(self, a) -> dict:
        return {"family": self, "body": build(a.variant, a.rows),
                **decoding(lambda: build(a.variant, a.rows, DECODE_TILE, DECODE_ROW))}


FAMILY = GeneralFamily("general.py.j2", "general_host.py.j2", "general_decode.py.j2", row_array="stats",
                       returns_lse=False)
