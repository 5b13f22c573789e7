"""`attnc verify`: the kernels against the reference on randomized shapes, forward and backward.

For each spec: odd lengths, grouped heads, cross attention (where the variant allows Lq != Lk), every
scalar parameter at its default and at other values inside its `where` condition: an int at one other
value, a float at its default times 0.5, 1e2, 1e4 and 1e6. The kernels run in the inputs' dtype; the
reference runs in float64 on the same inputs. Errors are max|got - ref| / max|ref| per tensor, judged
with the tolerances of the design (fp32: 2e-3 forward, 5e-3 backward; fp16: 1e-2; bf16: 2e-2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import sympy
import torch

from . import ir
from .pipeline import compile_file
from .runtime.checks import Shapes

TOLERANCE = {torch.float32: (2e-3, 5e-3), torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 2e-2)}


@dataclass(frozen=True)
class Case(Shapes):
    """One problem size to verify: the shapes a call sees, a label for the table, non-default params."""

    label: str = ""
    params: dict = field(default_factory=dict)


@dataclass
class Row:
    case: str
    tensor: str
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.tolerance


def _fixed_length(variant: ir.Variant):
    """Sequence length forced by an unravel layout on q or kv, with parameters at their defaults."""
    defaults = {p.symbol: p.default for p in variant.params}
    for lay in variant.layouts:
        if lay.index in ("q", "kv"):
            return int(sympy.prod([sympy.sympify(e).subs(defaults) for e in lay.extents]))
    return None


def _heads(variant: ir.Variant, hq, hk, hv):
    fixed = {role: val for role, val in variant.heads.items() if isinstance(val, int)}
    counts = {"q": fixed.get("q", hq), "k": fixed.get("k", hk), "v": fixed.get("v", hv)}
    names = {}
    for role in ("q", "k", "v"):
        name = variant.heads[role]
        if isinstance(name, str):
            counts[role] = names.setdefault(name, counts[role])
    return counts["q"], counts["k"], counts["v"]


# [Note] A float param is drawn across magnitudes, not only next to its default: softcap's
# cap * tanh(s / cap) was exact at cap = 50 and off by 1e-2 at cap = 5e5 (a tanh that cancelled near 0).
FLOAT_FACTORS = (0.5, 1e2, 1e4, 1e6)


def _other_values(param: ir.Param, length: int) -> list:
    """Values of a param besides its default, each inside the param's `where` condition (if any)."""
    default = param.default
    if default.free_symbols or param.dtype == "bool":
        return []
    value = float(default)
    if param.dtype == "int":
        other = max(1, min(int(value), length) // 3)
        values = [other if other != int(value) else int(value) + 1]
    else:
        values = [value * f for f in FLOAT_FACTORS] if value != 0 else [1.0, 1e3]
    if param.domain is not None:
        values = [x for x in values if bool(param.domain.subs(param.symbol, x))]
    return values


DEFAULT_LENGTH = 45
LENGTH_CAP = 100  # lengths drawn to exceed a spec's constants stay under this (interpreter time)


def default_length(variant: ir.Variant) -> int:
    """A length that exercises the spec's constants: beyond every integer the mask compares with
    (`kv < 64`, a const, an int param's default) up to LENGTH_CAP, so that a `const C = 64` is not
    tested as full attention only. Params are also tested at a value below the length (cases())."""
    numbers = {int(n) for n in sympy.sympify(variant.mask).atoms(sympy.Integer)}
    numbers |= {int(v) for v in variant.consts.values() if isinstance(v, int)}
    numbers |= {int(p.default) for p in variant.params if p.dtype == "int" and p.default.is_Integer}
    fitting = [n for n in numbers if n + 3 <= LENGTH_CAP]
    return max([DEFAULT_LENGTH] + [n + 3 for n in fitting])


def cases(variant: ir.Variant, length: int | None = None) -> list[Case]:
    """The problem sizes verify runs; `length` (--L) overrides the drawn length unless a token layout
    fixes it."""
    fixed = _fixed_length(variant)
    L = fixed or length or default_length(variant)
    equal = variant.needs_equal_lengths or fixed is not None
    if not equal:  # causal linear attention (the chunked algorithm) runs queries and keys on one axis
        from .analysis.factorize import AlgorithmKind
        from .pipeline import choose_algorithm

        algorithm = choose_algorithm(variant)
        equal = algorithm.kind is AlgorithmKind.CHUNKED and algorithm.factorization.causal
    out = []
    if fixed is not None and fixed > 128:
        # Long multi-dimensional layouts cost minutes per case in Triton's interpreter: one grouped-head
        # case (Hq = 2 reading one key head) covers them on the CPU; GPUs run the full set below.
        hq, hk, hv = _heads(variant, 2, 1, 1)
        out.append(Case(1, hq, hk, hv, L, L, 16, 24, label="gqa"))
        if not _on_cpu_interpreter():
            out = []
        else:
            return out
    hq, hk, hv = _heads(variant, 2, 2, 2)
    out.append(Case(1, hq, hk, hv, L, L, 40, 40, label="base"))
    hq, hk, hv = _heads(variant, 4, 2, 1)
    out.append(Case(1 if fixed else 2, hq, hk, hv, L, L, 24, 40, label="gqa"))  # fixed layouts are long: one batch
    if not equal:
        hq, hk, hv = _heads(variant, 3, 1, 3)
        out.append(Case(1, hq, hk, hv, max(3, L // 2 - 3), L, 32, 20, label="cross"))
    for p in variant.params:
        for other in _other_values(p, L):
            hq, hk, hv = _heads(variant, 2, 1, 2)
            out.append(Case(1, hq, hk, hv, L, L, 16, 16, label=f"{p.name}={other:g}", params={p.name: other}))
    return out


def _on_cpu_interpreter() -> bool:
    from .runtime.launch import interpreting

    return interpreting() and not torch.cuda.is_available()


def random_inputs(variant: ir.Variant, case: Case, generator: torch.Generator) -> dict:
    sizes = {"B": case.B, "Hq": case.Hq, "Lq": case.Lq, "Lk": case.Lk, "L": case.Lq, "Dqk": case.Dqk}
    inputs = {}
    for t in variant.tensors:
        params = {p.name: p.default.subs({ir.SIZES[n]: v for n, v in sizes.items() if n in ir.SIZES})
                  for p in variant.params}
        shape = t.shape(sizes, {**params, **case.params})
        if t.dtype == "int":
            span = max(2, case.Lk // 4 + 2)
            x = torch.randint(0, span, shape, generator=generator)
            if t.axes and t.axes[-1] in ("L", "Lq", "Lk"):
                x = x.sort(dim=-1).values  # like document ids: contiguous runs
            if not any(a in ("L", "Lq", "Lk") for a in t.axes):
                x = torch.randint(1, case.Lk + 1, shape, generator=generator)  # per-head sizes, e.g. bands
        elif t.dtype == "bool":
            x = torch.rand(shape, generator=generator) < 0.5
        else:
            # positive values: some specs take logs of their inputs (e.g. zerotuning's gamma)
            x = 0.5 + torch.rand(shape, generator=generator, dtype=torch.float64)
        if t.domain is not None:
            x = _inside_domain(t, x, generator)
        inputs[t.name] = x
    return inputs


def _inside_domain(t: ir.TensorInput, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x moved inside the input's `where` condition (see `draw_inside`), or a ValueError naming it."""
    from .codegen.printers import torch_code
    from .runtime import ref_helpers as R

    code = torch_code(t.domain, {ir.domain_symbol(t.name, t.dtype): "x"})
    condition = eval(f"lambda x: {code}", {"torch": torch, "R": R})  # code the printer wrote
    draw = draw_inside(condition, x, generator)
    if draw is None:
        raise ValueError(f"verify: cannot draw values of input '{t.name}' that meet 'where {t.domain_text}'")
    return draw


def draw_inside(condition, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
    """x, or the first of a few other draws of its shape and dtype whose every element meets `condition`
    (lightning's decay in (0, 1] refuses the default draw's values above 1); None when none does.
    Also `attnc inspect`'s made-up inputs (attnc/kernel_report.py)."""
    draws = [x] if x.is_floating_point() else [x, x - x.max(), -x]
    if x.is_floating_point():
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype)
        draws += [0.5 + 0.5 * u, 0.5 * u + 1e-3, -0.5 - u, torch.randn(x.shape, generator=generator, dtype=x.dtype)]
    for draw in draws:
        if bool(torch.as_tensor(condition(draw)).all()):
            return draw
    return None


def _rel(got, ref) -> float:
    got, ref = got.double(), ref.double()
    if not torch.isfinite(got[torch.isfinite(ref)]).all():
        return float("nan")
    finite = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(got), finite):
        return float("nan")
    scale = ref[finite].abs().max().item() if finite.any() else 0.0
    diff = (got[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0
    return diff / scale if scale > 0 else diff


def describe(case: Case) -> str:
    """The sizes of a case, as verify prints them."""
    params = "".join(f" {k}={v}" for k, v in case.params.items())
    return (f"B={case.B} Hq={case.Hq} Hk={case.Hk} Hv={case.Hv} Lq={case.Lq} Lk={case.Lk} "
            f"Dqk={case.Dqk} Dv={case.Dv}{params}")


def verify_variant(path, attn, dtype=torch.float32, seed: int = 0, device="cpu", length: int | None = None,
                   on_case=None) -> list[Row]:
    """`on_case(case)` is called before each case runs (the CLI prints its sizes)."""
    variant = compile_file(path)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    fwd_tol, bwd_tol = TOLERANCE[dtype]
    has_lse = attn.has_lse
    stats = hasattr(attn, "Stats")  # `stat` statements: each statistic, and the entropy's gradient
    entropies = [st.name for st in variant.stats if st.kind is ir.StatKind.ENTROPY]
    for case in cases(variant, length):
        if on_case is not None:
            on_case(case)
        q = torch.randn(case.B, case.Hq, case.Lq, case.Dqk, generator=generator, dtype=torch.float64)
        k = torch.randn(case.B, case.Hk, case.Lk, case.Dqk, generator=generator, dtype=torch.float64)
        v = torch.randn(case.B, case.Hv, case.Lk, case.Dv, generator=generator, dtype=torch.float64)
        extra = random_inputs(variant, case, generator)
        learnable = [t.name for t in variant.tensors if t.learnable]
        do = torch.randn(case.B, case.Hq, case.Lq, case.Dv, generator=generator, dtype=torch.float64)
        # the gradient of a loss on each entropy: weights of its rows (or of its heads' totals)
        dents = {st.name: torch.randn(case.B, case.Hq, *(() if st.total else (case.Lq,)), generator=generator,
                                      dtype=torch.float64) for st in variant.stats if st.name in entropies}
        # [Note] The reference gets the very values the kernels get (rounded to the tested dtype), so
        # the tolerance measures the kernels' arithmetic alone. Otherwise a kink (relu, step, a mask of
        # scores) moves under the inputs' rounding, and the derivatives of the two differ there by O(1).
        q, k, v, do = (x.to(dtype).double() for x in (q, k, v, do))
        extra = {n: x.to(dtype).double() if x.is_floating_point() else x for n, x in extra.items()}

        def run(fn, cast, q=q, k=k, v=v, extra=extra, learnable=learnable, case=case, do=do, dents=dents):
            leaves = [x.to(device=device, dtype=cast).requires_grad_() for x in (q, k, v)]
            kw = {n: (x.to(device=device, dtype=cast if x.is_floating_point() else x.dtype)) for n, x in extra.items()}
            for n in learnable:
                kw[n] = kw[n].detach().requires_grad_()
            out = fn(*leaves, return_lse=has_lse, **({"return_stats": True} if stats else {}), **kw, **case.params)
            out = out if isinstance(out, tuple) else (out,)
            o, lse = out[0], (out[1] if has_lse else None)
            statistics = out[-1]._asdict() if stats else {}
            wrt = leaves + [kw[n] for n in learnable]
            outputs = [o] + [statistics[n] for n in dents]
            weights = [do] + list(dents.values())
            # a learnable input the output does not depend on (read in the mask only, or in a row
            # constant that softmax cancels) has gradient 0, which autograd reports as None
            grads = torch.autograd.grad(outputs, wrt, [w.to(device=device, dtype=cast) for w in weights],
                                        allow_unused=True)
            return o, lse, [torch.zeros_like(x) if g is None else g for x, g in zip(wrt, grads)], statistics

        o, lse, grads, statistics = run(attn, dtype)
        ro, rlse, rgrads, rstatistics = run(attn.reference, torch.float64)
        rows.append(Row(case.label, "o", _rel(o, ro), fwd_tol))
        if has_lse:
            rows.append(Row(case.label, "lse", _rel(lse, rlse), fwd_tol))
        for name, value in statistics.items():
            rows.append(Row(case.label, name, _rel(value, rstatistics[name]), fwd_tol))
        for name, g, rg in zip(["dq", "dk", "dv"] + [f"d{n}" for n in learnable], grads, rgrads):
            rows.append(Row(case.label, name, _rel(g, rg), bwd_tol))
    return rows


def format_table(name: str, rows: list[Row]) -> str:
    lines = [f"{name}", f"  {'case':<16} {'tensor':<14} {'max rel err':>12} {'tol':>8}  ok"]
    for r in rows:
        lines.append(f"  {r.case:<16} {r.tensor:<14} {r.error:>12.2e} {r.tolerance:>8.0e}  {'yes' if r.ok else 'NO'}")
    return "\n".join(lines)
