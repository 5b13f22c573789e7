"""The statements that compute: `let` (one name, several by unravel, or a let function), `mask`,
`score`, `probs` and `feature`, each lowered to the IR with the rules of its place (the mask may not
depend on the score, probs must, ...)."""

from __future__ import annotations

import sympy
from sympy.core.function import AppliedUndef

from .. import ast, ir
from .declarations import Declarations
from .scope import GENERATED_ARGS, RESERVED, Entry, Kind, describe_builtin
from .types import BOOL, INT, REAL, Value

# The smallest selection tile: the plan tile of the GPU kernels (runtime/launch.plan_blocks), which a
# selection tile must be a multiple of, so that a plan tile lies in one selected tile or outside it.
SELECT_TILE_MIN = 128
_SELECT_USAGE = "write 'select topk(COUNT, tiles=T)': COUNT key tiles per query tile of T queries"


class Statements(Declarations):
    def __init__(self, spec: ast.Spec):
        super().__init__(spec)
        self.lets: list = []
        self.layouts: list[ir.Layout] = []
        self.mask = self.probs = None
        self.select: ir.Selection | None = None
        self.stats: list[ir.Stat] = []
        self.stat_spans: dict[str, object] = {}

    # ---- let ----
    def stmt_let(self, stmt: ast.Let):
        if len(stmt.names) == 1:
            value = self.lower(stmt.value)
            self.define(stmt.names[0], stmt.span, Entry(Kind.LET, stmt.span, value))
            self.lets.append((stmt.names, value.expr))
            return
        call = stmt.value
        if isinstance(call, ast.Call) and call.func in self.functions:
            coords, extents, index_text = self.expand(call, lambda body: self.unravel_body(body, stmt))
        else:
            coords, extents, index_text = self.unravel_body(call, stmt)
        for name, coord in zip(stmt.names, coords):
            self.define(name, stmt.span, Entry(Kind.LET, stmt.span, Value(coord, INT)))
        self.lets.append((stmt.names, sympy.Tuple(*coords)))
        self.layouts.append(ir.Layout(index_text, stmt.names, tuple(extents), tuple(coords)))

    def unravel_body(self, call, stmt: ast.Let):
        if isinstance(call, ast.Call) and call.func in self.functions:
            return self.expand(call, lambda body: self.unravel_body(body, stmt))
        if not (isinstance(call, ast.Call) and call.func == "unravel"):
            self.error("only unravel(...) can be unpacked into several names", call.span,
                       f"write 'let ({', '.join(stmt.names)}) = unravel(index, ...)'")
        return self.unravel(call, len(stmt.names))

    def unravel(self, call: ast.Call, n_names: int):
        if call.kwargs:
            self.error("unravel takes no keyword arguments", call.span)
        if len(call.args) != n_names + 1:
            self.error(f"unravel into {n_names} names needs an index and {n_names} extents, "
                       f"got {len(call.args)} argument(s)", call.span)
        index = self.lower_int(call.args[0], "the index of unravel")
        extents = [self.lower_int(a, "an extent of unravel") for a in call.args[1:]]
        for arg, ext in zip(call.args[1:], extents):
            if ext.expr.free_symbols & {ir.q, ir.kv, ir.b, ir.h}:
                self.error("an extent of unravel cannot depend on an index", arg.span)
            if ext.expr.is_number and ext.expr < 1:
                self.error("an extent of unravel must be at least 1", arg.span)
        coords = []
        stride = sympy.Integer(1)
        for ext in reversed(extents):
            coords.append(ir.FloorDiv(index.expr, stride) if stride != 1 else index.expr)
            stride = stride * ext.expr
        # row-major: the last coordinate varies fastest; the first is not wrapped (it absorbs the rest)
        coords = [sympy.Mod(c, ext.expr) for c, ext in zip(coords, reversed(extents))][:-1] + [coords[-1]]
        coords.reverse()
        index_text = {ir.q: "q", ir.kv: "kv"}.get(index.expr, str(index.expr))
        return coords, [e.expr for e in extents], index_text

    def stmt_letfunc(self, stmt: ast.LetFunc):
        """`let f(x, y) = body`: the body may use its parameters and anything defined above; it is
        checked for unknown names now and expanded (inlined, with its own checks) at every call."""
        self.check_identifier(stmt.name, stmt.span)
        for i, (param, span) in enumerate(zip(stmt.params, stmt.param_spans)):
            self.check_identifier(param, span, what="parameter")
            if param in stmt.params[:i]:
                self.error(f"parameter '{param}' of '{stmt.name}' is given twice", span)
            if param == stmt.name:
                self.error(f"parameter '{param}' has the name of its function", span)
            # parameters are inlined, never arguments of the generated function: only the language's
            # own names are off limits
            if param in RESERVED - GENERATED_ARGS or (param in self.env and self.env[param].span is None):
                self.error(f"parameter '{param}' of '{stmt.name}' is a built-in name ({describe_builtin(param)})",
                           span, f"pick another name, e.g. '{param}_'")
            if param in self.env or param in self.functions:
                first = (self.env[param].span if param in self.env else self.functions[param].span)
                self.error(f"parameter '{param}' of '{stmt.name}' hides '{param}' defined at line {first.line}",
                           span, "give the parameter another name")
        self.names_known(stmt.value, stmt, set(stmt.params))
        self.define(stmt.name, stmt.span, Entry(Kind.FUNCTION, stmt.span))
        self.functions[stmt.name] = stmt

    # ---- mask, score, probs ----
    def stmt_mask(self, stmt: ast.Mask):
        self.once(stmt, "mask")
        value = self.lower(stmt.value)
        if value.type != BOOL:
            self.error(f"the mask must be a condition (bool), not {value.type}", stmt.value.span,
                       "compare with <, <=, ==, ... and combine with and, or, not")
        if value.uses_score and sympy.sympify(value.expr).atoms(ir.VecDot):
            self.error("the mask cannot use dot() of feature vectors (a per-pair score term)", value.uses_score,
                       "put it in 'score' or 'probs'")
        if value.uses_score:
            self.error("the mask cannot depend on the score", value.uses_score,
                       "put score-dependent terms in 'score' or 'probs'")
        if value.uses_rowstat:
            self.error("the mask cannot depend on row statistics", value.uses_rowstat)
        self.mask = value.expr

    def stmt_score(self, stmt: ast.Score):
        self.once(stmt, "score")
        value = self.lower(stmt.value)
        if value.type == BOOL:
            self.error("the score must be a number, not a condition", stmt.value.span,
                       "use 'x if cond else y' to choose between numbers")
        if value.uses_rowstat:
            self.error("the score cannot use row statistics; use them in 'probs'", value.uses_rowstat)
        self.score_value = Value(value.expr, REAL, value.uses_score, None)
        self.score = value.expr

    def stmt_probs(self, stmt: ast.Probs):
        self.once(stmt, "probs")
        value = self.lower(stmt.value)
        if value.type == BOOL:
            self.error("probs must be a number, not a condition", stmt.value.span)
        if not value.uses_score:
            self.error("probs does not depend on the score", stmt.value.span,
                       "write the weights as a function of 'score', e.g. softmax(score)")
        self.probs = value.expr

    # ---- feature maps ----
    def stmt_feature(self, stmt: ast.Feature):
        """`feature phi(x) = EXPR`: a map applied to every element of a head vector (docs/linear.md)."""
        self.check_identifier(stmt.name, stmt.span)
        if stmt.arg in self.env or stmt.arg in RESERVED:
            self.error(f"the argument of feature '{stmt.name}' must be a new name, not '{stmt.arg}'", stmt.span,
                       f"write 'feature {stmt.name}(x) = ...'")
        if self.vec_dot_span is not None:
            self.error("feature maps (linear attention) cannot be combined with dot() of feature vectors "
                       f"(line {self.vec_dot_span.line})", stmt.span)
        self.env[stmt.arg] = Entry(Kind.LET, stmt.span, Value(ir.FEATURE_X, REAL))
        self.in_feature = True
        try:
            value = self.lower(stmt.value)
        finally:
            self.in_feature = False
            del self.env[stmt.arg]
        if value.type == BOOL:
            self.error(f"feature '{stmt.name}' must be a number, not a condition", stmt.value.span)
        extra = {x for x in sympy.sympify(value.expr).free_symbols - {ir.FEATURE_X} if not x.name.startswith("_fw_")}
        if extra or value.uses_score or value.uses_rowstat or sympy.sympify(value.expr).atoms(AppliedUndef):
            self.error(f"feature '{stmt.name}' may use only its argument '{stmt.arg}', numbers and consts",
                       stmt.value.span, "a feature map acts on each element of one head vector")
        self.define(stmt.name, stmt.span, Entry(Kind.FEATURE, stmt.span, Value(value.expr, REAL)))
        self.features.append((stmt.name, value.expr))

    # ---- stat ----
    def stmt_stat(self, stmt: ast.Stat):
        """`stat NAME = FORM`, FORM one of ir.StatKind's forms of the weights P, or total(FORM): the
        statistics the call returns with return_stats=True (docs/language.md, `stat`)."""
        self.check_identifier(stmt.name, stmt.name_span, what="statistic name")
        if stmt.name in self.stat_spans:
            self.error(f"statistic '{stmt.name}' is already defined at line {self.stat_spans[stmt.name].line}",
                       stmt.name_span)
        if "P" in self.env:
            self.error("'P' names the attention weights in a stat, but the spec defines 'P'",
                       self.env["P"].span, "rename the spec's 'P'")
        node, total = stmt.value, False
        if isinstance(node, ast.Call) and node.func == "total":
            if node.kwargs or len(node.args) != 1:
                self.error("total() takes one statistic: total(entropy(P)), total(sum_q(P)), ...", node.span)
            node, total = node.args[0], True
        kind = self.stat_kind(node)
        self.stat_spans[stmt.name] = stmt.name_span
        self.stats.append(ir.Stat(stmt.name, kind, total))

    def stat_kind(self, node) -> ir.StatKind:
        if isinstance(node, ast.Name) and node.id == "visible":
            return ir.StatKind.VISIBLE
        if (isinstance(node, ast.Call) and not node.kwargs and len(node.args) == 1
                and isinstance(node.args[0], ast.Name) and node.args[0].id == "P"):
            kind = next((k for k in ir.StatKind if k.value == f"{node.func}(P)"), None)
            if kind is not None:
                return kind
        offered = ", ".join(k.value for k in ir.StatKind)
        self.error("unknown statistic", node.span,
                   f"the statistics offered: {offered} (P: the attention weights), each also as total(...)")

    # ---- select ----
    def stmt_select(self, stmt: ast.Select):
        """`select topk(COUNT, tiles=T) [by dot(mean(q), mean(k))] [keep COND]` (docs/language.md)."""
        self.once(stmt, "select")
        if stmt.func != "topk":
            self.error(f"unknown selection '{stmt.func}'", stmt.func_span, _SELECT_USAGE)
        kwargs = dict(stmt.kwargs)
        for name, value in stmt.kwargs:
            if name != "tiles":
                self.error(f"topk() has no argument '{name}'", value.span, _SELECT_USAGE)
        if len(stmt.args) != 1 or "tiles" not in kwargs:
            self.error(f"topk() takes the count of key tiles and tiles=T, got {len(stmt.args)} "
                       f"positional argument(s){'' if 'tiles' in kwargs else ' and no tiles='}", stmt.span,
                       _SELECT_USAGE)
        count = self.select_count(stmt.args[0])
        tile = self.select_tile(kwargs["tiles"])
        estimate = self.select_estimate(stmt.by)
        keep = sympy.false if stmt.keep is None else self.select_keep(stmt.keep)
        self.select = ir.Selection(count, tile, estimate, keep)

    def select_count(self, node) -> sympy.Expr:
        value = self.lower_int(node, "the count of topk()")
        expr = sympy.sympify(value.expr)
        params = {p.symbol for p in self.params}
        if value.uses_score or value.uses_rowstat or expr.free_symbols - params or expr.atoms(AppliedUndef):
            self.error("the count of topk() may use numbers, params and consts only", node.span,
                       "one count for every query tile, e.g. 'param k_tiles = 8' (a param's default may "
                       "read the sizes: 'param k_tiles = Lk // 1024')")
        if expr.is_number and expr < 0:
            self.error(f"the count of topk() must be at least 0, got {expr}", node.span)
        return expr

    def select_tile(self, node) -> int:
        value = self.lower_int(node, "tiles=")
        expr = sympy.sympify(value.expr)
        if not expr.is_Integer:
            self.error("tiles= must be a number known at build time", node.span,
                       "a number or a const: the kernels' plans are cut at it")
        tile = int(expr)
        if tile < SELECT_TILE_MIN or tile & (tile - 1):
            self.error(f"tiles= must be a power of two, at least {SELECT_TILE_MIN}, got {tile}", node.span,
                       f"a selection tile holds whole plan tiles ({SELECT_TILE_MIN} x {SELECT_TILE_MIN} on a GPU)")
        return tile

    def select_estimate(self, node) -> ir.Estimate:
        """The estimate `by` names: only the forms of ir.Estimate, where `q` and `k` are the head
        vectors (elsewhere `q` is the query's position)."""
        if node is None:
            return ir.Estimate.MEAN_DOT

        def pooled(arg, vector):
            return (isinstance(arg, ast.Call) and arg.func == "mean" and not arg.kwargs and len(arg.args) == 1
                    and isinstance(arg.args[0], ast.Name) and arg.args[0].id == vector)

        if (isinstance(node, ast.Call) and node.func == "dot" and not node.kwargs and len(node.args) == 2
                and pooled(node.args[0], "q") and pooled(node.args[1], "k")):
            return ir.Estimate.MEAN_DOT
        offered = ", ".join(e.value for e in ir.Estimate)
        self.error("unknown estimate of a tile pair's score", node.span,
                   f"the estimates offered: {offered} (q and k: the query and key vectors of the tiles)")

    def select_keep(self, node) -> sympy.Basic:
        value = self.lower(node)
        if value.type != BOOL:
            self.error(f"the keep condition must be a condition (bool), not {value.type}", node.span,
                       "e.g. keep kv < sinks or q - kv < window")
        if value.uses_score:
            self.error("the keep condition cannot depend on the score", value.uses_score)
        if value.uses_rowstat:
            self.error("the keep condition cannot depend on row statistics", value.uses_rowstat)
        return value.expr
