"""The linear-attention family: what templates/linear.py.j2 needs from a factorization
(attnc/analysis/factorize.py), printed as torch code. `FAMILY` is its entry point: the template,
the attnc.runtime modules the module calls, and the family's context for the template."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import sympy
from sympy.core.function import AppliedUndef

from ... import ir
from ...analysis.factorize import Algorithm, Factorization, R
from ...errors import BuildError
from ..printers import torch_code


@dataclass(frozen=True)
class LinearBody:
    causal: bool
    describe: str
    feature_code: str | None  # torch code of the elementwise feature map of `x`
    key_feature_code: str | None  # the keys' map where it is another one (untied maps), else None
    untied: str | None  # `dot(phi_q(q), phi_k(k))` of untied maps (for the width check's message)
    poly: tuple | None
    log_decay: str | None  # torch code of log(decay) per head, broadcastable to [Hq]
    coef: str
    alpha: str | None  # torch code of the row factor alpha_i, None where it is 1
    beta: str | None
    needs_rowsum: bool
    reads_visible: bool
    reads_lk: bool
    stateless: bool  # alpha or beta read the key count, which a state does not carry

    @property
    def identity_features(self) -> bool:
        """The feature map is the identity: the kernels read q and k as given (no feature tensors)."""
        return self.feature_code == "x" and self.key_feature_code in (None, "x")


def _names(v: ir.Variant, expr) -> dict:
    names = {R: "rowsum_w", ir.visible: "visible", ir.FEATURE_X: "x"}
    names.update({p.symbol: f'values[{p.name!r}]' for p in v.params})
    names.update({sym: n for n, sym in ir.SIZES.items()})
    for load in sympy.sympify(expr).atoms(AppliedUndef):
        if load.args != (ir.h,):
            raise BuildError(f"{v.name}: linear attention reads per-head inputs only, not {load}")
        names[load] = f'values[{str(load.func)!r}].view(1, -1, 1)'
    return names


_VECTOR = (ir.FMatMul, ir.FSoftmax, ir.FCat)


def feature_code(v: ir.Variant, expr) -> str:
    """Torch code of a feature map's body: `x` is [B, H, L, Dqk]; elementwise functions act on every
    element, `softmax` and `cat` on the last (feature) axis, `v @ W[h]` multiplies by head h's matrix."""
    if isinstance(expr, ir.FCat):
        return "torch.cat([" + ", ".join(feature_code(v, a) for a in expr.args) + "], dim=-1)"
    if isinstance(expr, ir.FSoftmax):
        return f"torch.softmax({feature_code(v, expr.args[0])}, dim=-1)"
    if isinstance(expr, ir.FMatMul):
        weight = expr.args[1].name[len("_fw_"):]
        return f"linear.head_matmul({feature_code(v, expr.args[0])}, values[{weight!r}])"
    dummies = {}

    def strip(e):
        if isinstance(e, _VECTOR):
            d = sympy.Symbol(f"_vec{len(dummies)}", real=True)
            dummies[d] = feature_code(v, e)
            return d
        return e.func(*[strip(a) for a in e.args]) if e.args else e

    stripped = strip(sympy.sympify(expr))
    return torch_code(stripped, {**_names(v, stripped), **dummies})


def _code(v, expr) -> str:
    return torch_code(sympy.sympify(expr), _names(v, expr))


def build(v: ir.Variant, fact: Factorization) -> LinearBody:
    log_decay = None
    if fact.decay is not None:
        base = fact.decay
        names = _names(v, base)
        names.update({load: f'values[{str(load.func)!r}]' for load in base.atoms(AppliedUndef)})
        log_decay = f"torch.log(torch.as_tensor({torch_code(base, names)}))"
    row = sympy.Add(fact.alpha, fact.beta)
    used = row.free_symbols  # (factorize keeps Lq out, and inputs other than per-head ones)
    sizes = {ir.SIZES["Lk"], ir.SIZES["Lq"]}
    return LinearBody(
        causal=fact.causal,
        describe=fact.describe().replace('"', "'"),
        feature_code=None if fact.feature_body is None else feature_code(v, fact.feature_body),
        key_feature_code=None if fact.key_feature_body is None else feature_code(v, fact.key_feature_body),
        untied=None if fact.key_feature is None else f"dot({fact.feature}(q), {fact.key_feature}(k))",
        poly=fact.poly,
        log_decay=log_decay,
        coef=repr(float(fact.coef)),
        alpha=_code(v, fact.alpha) if fact.alpha != 1 else None,
        beta=None if fact.beta == 0 else _code(v, fact.beta),
        needs_rowsum=fact.needs_rowsum,
        reads_visible=ir.visible in used,
        reads_lk=ir.SIZES["Lk"] in used or (ir.visible in used and not fact.causal),
        stateless=bool(used & (sizes | {ir.visible})) or fact.beta != 0,
    )


class Analysed(Protocol):
    """What the family reads of the analyses: the spec and its factorized algorithm."""

    variant: ir.Variant
    algorithm: Algorithm


@dataclass(frozen=True)
class LinearFamily:
    """A chunked linear-attention module: templates/linear.py.j2 over the chunked primitives of
    attnc/runtime/linear.py (no Triton code of its own)."""

    template: str = "linear.py.j2"
    runtime: tuple[str, ...] = ("checks", "launch", "linear")  # the attnc.runtime modules every such module calls
    triton: bool = False  # the module defines no Triton kernels (they are in attnc/runtime/linear.py)
    tile_walks: bool = False

    def context(self, a: Analysed) -> dict:
        """The family's part of the template context (the spec's part is module.py's _spec_context)."""
        return {"lin": build(a.variant, a.algorithm.factorization)}


FAMILY = LinearFamily()
