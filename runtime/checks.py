"""Argument checking for generated functions: every mistake becomes a ValueError naming the spec,
the argument, and what was expected."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # int | float | bool
    axes: tuple  # B, Hq, Lq, Lk, L, or an axis of its own: its extent as Python code of sizes and int params
    learnable: bool


@dataclass(frozen=True)
class Signature:
    """What a generated function accepts besides q, k, v."""

    spec: str
    params: tuple  # (name, "int" | "float" | "bool")
    tensors: tuple  # TensorSpec
    heads: dict  # role -> symbol name or fixed count
    equal_lengths: bool  # Lq must equal Lk
    # `where` conditions: (argument, condition of its value x: a number, or the tensor elementwise, as
    # torch code of x, the condition as the spec writes it)
    domains: tuple = ()


@dataclass(frozen=True)
class Shapes:
    B: int
    Hq: int
    Hk: int
    Hv: int
    Lq: int
    Lk: int
    Dqk: int
    Dv: int


def _fail(sig: Signature, arg: str, message: str):
    raise ValueError(f"{sig.spec}: argument '{arg}': {message}")


def _shape(t) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def check_head_tensors(sig: Signature, q, named: dict, layouts: dict, shared: str) -> None:
    """q and the tensors beside it (k and v, or the caches): 4-D float tensors of q's dtype, on q's
    device, none empty. `layouts` names each one's dims for the message, `shared` the sharing rule."""
    for name, t in {"q": q, **named}.items():
        if not isinstance(t, torch.Tensor):
            _fail(sig, name, f"expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            _fail(sig, name, f"expected a 4-D tensor {layouts[name]}, got shape {_shape(t)}")
        if t.dtype not in FLOAT_DTYPES:
            _fail(sig, name, f"expected float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dtype != q.dtype:
            _fail(sig, name, f"dtype {t.dtype} differs from q's {q.dtype}; {shared} must share a dtype")
        if not same_device(t.device, q.device):
            _fail(sig, name, f"is on {t.device} but q is on {q.device}")
        if 0 in t.shape:
            _fail(sig, name, f"has an empty dimension: shape {_shape(t)}")


def check_qkv(sig: Signature, q, k, v) -> Shapes:
    check_head_tensors(sig, q, {"k": k, "v": v},
                       {"q": "[B, Hq, Lq, Dqk]", "k": "[B, Hk, Lk, Dqk]", "v": "[B, Hv, Lk, Dv]"}, "q, k and v")
    B, Hq, Lq, Dqk = q.shape
    _, Hk, Lk, Dk = k.shape
    _, Hv, Lv, Dv = v.shape
    if k.shape[0] != B or v.shape[0] != B:
        _fail(sig, "k" if k.shape[0] != B else "v", f"batch size {k.shape[0] if k.shape[0] != B else v.shape[0]} differs from q's {B}")
    if Dk != Dqk:
        _fail(sig, "k", f"head dim {Dk} differs from q's {Dqk} (k: [B, Hk, Lk, Dqk])")
    if Lv != Lk:
        _fail(sig, "v", f"length {Lv} differs from k's {Lk} (v: [B, Hv, Lk, Dv])")
    shapes = Shapes(B, Hq, Hk, Hv, Lq, Lk, Dqk, Dv)
    check_head_counts(sig, {"q": Hq, "k": Hk, "v": Hv}, {"q": "q", "k": "k", "v": "v"})
    if sig.equal_lengths and Lq != Lk:
        _fail(sig, "k", f"this variant needs Lq == Lk, got Lq = {Lq}, Lk = {Lk}")
    return shapes


def check_head_counts(sig: Signature, counts: dict, arg: dict) -> None:
    """Head counts (role -> count) against the spec's `heads` line; `arg` names each role's argument.
    Query head h reads key head h*Hk//Hq and value head h*Hv//Hq, so with more key or value heads than
    query heads some would be read by no query head: refused, as FlashAttention does. That is also what
    [B, L, H, D] tensors look like read as [B, H, L, D] when Lk > Lq."""
    named: dict = {}
    for role, want in sig.heads.items():
        got = counts[role]
        if isinstance(want, int) and got != want:
            _fail(sig, arg[role], f"the spec fixes {want} {role} heads, got {got}")
        if isinstance(want, str):
            if want in named and named[want][1] != got:
                other = named[want][0]
                _fail(sig, arg[role], f"the spec names both {other} and {role} heads '{want}', so they must be "
                      f"equal; got {named[want][1]} and {got}")
            named.setdefault(want, (role, got))
    for role in ("k", "v"):
        if counts[role] > counts["q"]:
            _fail(sig, arg[role], f"has {counts[role]} heads but q has {counts['q']}: more {role} heads than query "
                  f"heads would leave some unread (grouped-query attention needs H{role} <= Hq)")


def check_plan_qk(sig: Signature, q, k, Lq: int, Lk: int, B: int, Hq: int, Hk, device) -> tuple:
    """The q and k of plan() for a spec whose select chooses the tiles from them: given, 4-D float
    tensors [B, Hq, Lq, Dqk] and [B, Hk, Lk, Dqk] of the sizes plan() was called with, on its device."""
    for name, t in (("q", q), ("k", k)):
        if t is None:
            _fail(sig, name, "the select chooses the plan's tiles from q and k: pass q= and k= to plan()")
    check_head_tensors(sig, q, {"k": k}, {"q": "[B, Hq, Lq, Dqk]", "k": "[B, Hk, Lk, Dqk]"}, "q and k")
    want = {"q": (B, Hq, Lq, q.shape[3]), "k": (B, k.shape[1] if Hk is None else Hk, Lk, q.shape[3])}
    for name, t in (("q", q), ("k", k)):
        if tuple(t.shape) != want[name]:
            _fail(sig, name, f"expected shape [{', '.join(map(str, want[name]))}] (the sizes given to plan()), "
                  f"got {_shape(t)}")
    check_head_counts(sig, {"q": Hq, "k": k.shape[1], "v": k.shape[1]}, {"q": "q", "k": "k", "v": "k"})
    if not same_device(q.device, check_device(sig, device)):
        _fail(sig, "q", f"is on {q.device} but the plan is for device {device!r}")
    return q, k


LAYOUTS = {"bhsd": "[B, H, L, D]", "bshd": "[B, L, H, D]"}


def to_bhsd(sig: Signature, layout, q, k, v) -> tuple:
    """The `layout=` of the generated call: q, k, v as [B, H, L, D]. 'bshd' is FlashAttention's (and the
    Hugging Face flash backends') [B, L, H, D]: transposed views, which the kernels read through their
    strides."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        _fail(sig, "layout", f"expected 'bhsd' (q, k, v as [B, H, L, D], the default) or 'bshd' ([B, L, H, D], "
              f"FlashAttention's), got {layout!r}")
    if layout == "bhsd":
        return q, k, v
    check_head_tensors(sig, q, {"k": k, "v": v},
                       {"q": "[B, Lq, Hq, Dqk]", "k": "[B, Lk, Hk, Dqk]", "v": "[B, Lk, Hv, Dv]"}, "q, k and v")
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def prepare_in_layout(sig: Signature, layout, q, k, v, prepare) -> tuple:
    """(q, k, v as [B, H, L, D], prepare(q, k, v)). `prepare` checks the call (it raises ValueError); where
    a default-layout call fails but would pass with dims 1 and 2 swapped, the error says so: [B, L, H, D]
    tensors passed without layout='bshd' are the likely mistake."""
    q, k, v = to_bhsd(sig, layout, q, k, v)
    try:
        return q, k, v, prepare(q, k, v)
    except ValueError as err:
        if layout != "bhsd" or not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
            raise
        try:
            prepare(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        except ValueError:
            raise err from None
        raise ValueError(f"{err} (these shapes fit q, k and v as [B, L, H, D], FlashAttention's layout: "
                         "if that is what they are, pass layout='bshd')") from None


def batch_entries(sig: Signature, inputs: dict, index: torch.Tensor) -> dict:
    """`inputs` for the sub-batch `index`: tensors with a B axis at those entries, the rest as given."""
    out = {}
    for name, x in inputs.items():
        spec = next((t for t in sig.tensors if t.name == name), None)
        if spec is not None and "B" in spec.axes and isinstance(x, torch.Tensor):
            x = x.index_select(spec.axes.index("B"), index.to(x.device))
        out[name] = x
    return out


def same_device(a: torch.device, b: torch.device) -> bool:
    """Devices equal as tensors see them: 'cuda' without an index is the current CUDA device."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or (a.index is not None and b.index is not None):
        return a.index == b.index or a.type != "cuda"
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def check_device(sig: Signature, device) -> torch.device:
    """The `device=` of plan() and mask(): a device this torch can allocate on."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        _fail(sig, "device", f"expected a torch device such as 'cpu' or 'cuda', got {device!r} ({err})")
    if dev.type == "cuda" and not torch.cuda.is_available():
        _fail(sig, "device", f"{str(dev)!r} requested, but this torch has no usable CUDA device "
              f"(torch {torch.__version__}); use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        _fail(sig, "device", f"expected 'cpu' or 'cuda', got {str(dev)!r}")
    if dev.type == "cuda" and dev.index is None:  # 'cuda' means the current device, as tensors say it
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def check_inputs(sig: Signature, shapes: Shapes, device: torch.device, inputs: dict, defaults: dict) -> dict:
    known = {name for name, _ in sig.params} | {t.name for t in sig.tensors}
    unknown = sorted(set(inputs) - known)
    if "return_stats" in unknown:  # the argument exists where the spec declares statistics
        _fail(sig, "return_stats", "this call returns no statistics: the spec's call and its decode do, where "
              "the spec declares them (`stat NAME = ...`, docs/statistics.md); varlen, context parallelism, "
              "plan() and mask() do not")
    if unknown:
        hint = f"; it accepts: {', '.join(sorted(known))}" if known else "; it takes no extra inputs"
        _fail(sig, unknown[0], f"unknown keyword argument{hint}")
    values = {}
    for name, dtype in sig.params:
        value = inputs.get(name, defaults[name])
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                _fail(sig, name, f"is a scalar parameter; got a tensor of shape {_shape(value)}")
            if value.device.type == "meta":
                _fail(sig, name, "is a meta tensor, which has no value; pass a number")
            value = value.item()
        if dtype == "bool":
            if value not in (True, False) or isinstance(value, float):  # True, False, 1 or 0
                _fail(sig, name, f"expected True or False, got {value!r}")
            values[name] = int(bool(value))  # kernels and plans take 0 or 1
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            article = "an" if dtype == "int" else "a"
            _fail(sig, name, f"expected {article} {dtype} number, got {type(value).__name__}")
        if dtype == "int":
            if isinstance(value, float) and not value.is_integer():  # 2.5, inf, nan
                _fail(sig, name, f"expected an integer, got {value!r}")
            value = int(value)
            if not INT64_MIN <= value <= INT64_MAX:  # the kernels, the custom op and the plans take int64
                _fail(sig, name, f"expected an integer from -2**63 to 2**63 - 1 (int64), got {value}")
        else:
            value = float(value)
            if math.isnan(value):
                _fail(sig, name, "is NaN")
            if math.isinf(value):  # cap = inf makes cap * tanh(s / cap) inf * 0 = NaN, silently
                _fail(sig, name, f"is {value}; float parameters must be finite")
            if abs(value) > FLOAT32_MAX:  # the kernels take float params as float32: it would become inf
                _fail(sig, name, f"is {value!r}, beyond float32's range (+-{FLOAT32_MAX:.4g}) in which the kernels "
                      "compute")
        values[name] = value
    sizes = {"B": shapes.B, "Hq": shapes.Hq, "Hk": shapes.Hk, "Hv": shapes.Hv, "Lq": shapes.Lq, "Lk": shapes.Lk,
             "L": shapes.Lq, "Dqk": shapes.Dqk}
    sizes.update({a: int(a) for t in sig.tensors for a in t.axes if a.isdigit()})  # a feature map's width
    for t in sig.tensors:
        if t.name not in inputs:
            _fail(sig, t.name, f"missing required tensor input {t.name}: {t.dtype}[{', '.join(t.axes)}]")
        x = inputs[t.name]
        if not isinstance(x, torch.Tensor):
            _fail(sig, t.name, f"expected a torch.Tensor, got {type(x).__name__}")
        want = tuple(axis_size(a, sizes, values) for a in t.axes)
        for a, n in zip(t.axes, want):
            if n < 1:
                _fail(sig, t.name, f"axis [{a}] of {t.name} has extent {n} with these sizes and parameters; "
                      "it must be at least 1")
        if tuple(x.shape) != want:
            named = ", ".join(f"{a}={n}" for a, n in zip(t.axes, want))
            _fail(sig, t.name, f"expected shape [{', '.join(t.axes)}] = {list(want)} ({named}), got {_shape(x)}")
        if not same_device(x.device, torch.device(device)):
            _fail(sig, t.name, f"is on {x.device} but q is on {device}")
        if t.dtype == "float" and not x.dtype.is_floating_point:
            _fail(sig, t.name, f"expected a floating-point tensor, got {x.dtype}")
        if t.dtype == "int" and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
            _fail(sig, t.name, f"expected an integer tensor, got {x.dtype}")
        # (a data-dependent check: torch.compile would break the graph on it, so compiled code skips it)
        # (a meta tensor has no values to check)
        if (t.dtype == "float" and x.device.type != "meta" and not torch.compiler.is_compiling()
                and not torch.isfinite(x).all()):
            _fail(sig, t.name, "contains NaN or infinite values")
        values[t.name] = x
    check_domains(sig, values)
    return values


def check_domains(sig: Signature, values: dict) -> None:
    """The spec's `where` conditions. A tensor's is checked elementwise: data-dependent, so (like the
    finiteness check) skipped under torch.compile, and one device sync per call on CUDA."""
    for name, condition, text in sig.domains:
        value = values[name]
        if isinstance(value, torch.Tensor):
            if torch.compiler.is_compiling():
                continue
            ok = torch.as_tensor(condition(value))
            if not ok.all():
                bad = value[~ok.expand(value.shape)] if ok.dim() else value.flatten()
                _fail(sig, name, f"violates 'where {text}': {bad.numel()} element{'s' * (bad.numel() != 1)} "
                      f"do{'es' * (bad.numel() == 1)} not, e.g. {bad.flatten()[0].item()!r}")
        elif not bool(condition(torch.tensor(value, dtype=torch.float64))):
            _fail(sig, name, f"violates 'where {text}': got {value!r}")


def axis_size(axis: str, sizes: dict, params: dict) -> int:
    """The extent of a tensor input's axis: a size (B, Hq, Lq, Lk, L) or, for an axis of its own, its
    extent: an integer polynomial of numbers, sizes and int params (written by the checker)."""
    if axis in sizes:
        return sizes[axis]
    return int(eval(axis, {"__builtins__": {}}, {**sizes, **params}))  # a polynomial the checker wrote


def resolve_scale(sig: Signature, scale, dqk: int) -> float:
    if scale is None:
        return dqk ** -0.5
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            _fail(sig, "scale", f"expected a float, got a tensor of shape {_shape(scale)}")
        if scale.device.type == "meta":
            _fail(sig, "scale", "is a meta tensor, which has no value; pass a number")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or math.isnan(scale):
        _fail(sig, "scale", f"expected a float, got {scale!r}")
    return float(scale)

