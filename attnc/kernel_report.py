"""`attnc inspect`: compile a spec's Triton kernels for an NVIDIA GPU on a machine that has none.

How it works, in three steps:
1. **Record.** The generated function is called, forward and backward, on CPU tensors with every
   Triton launch intercepted (`recording()`), so each kernel is seen with the arguments a real launch
   passes. Recorded launches run nothing; they zero their float outputs so the Python after them runs.
2. **Compile.** Each recorded kernel is compiled with `triton.compile` for `GPUTarget("cuda", sm, 32)`
   under its autotune configs, its arguments specialized by Triton's own binder exactly as its
   launcher does (16-byte alignment, ints equal to 1 or divisible by 16). Triton's bundled ptxas
   assembles the PTX; nothing runs on a GPU.
3. **Count.** Registers and stack (spill) bytes from the cubin (`cuobjdump --dump-resource-usage`),
   spill stores and loads (`STL`, `LDL`) from its SASS (`cuobjdump -sass`, only for a kernel whose
   stack frame is not empty: without one there is no local memory to store to), shared memory from the
   kernel's metadata, and from the PTX: tensor-core instructions (`wgmma.mma_async` by its N width,
   `mma.sync`), `cp.async` copies (the software pipeliner's asynchronous global loads; 0 means every K/V
   load is waited for inside the loop) and TMA copies (`cp.async.bulk`, tensor-descriptor ones included,
   and `cp.reduce.async.bulk`).

[Note] The compile needs Triton's real JIT, but a module imported under TRITON_INTERPRET=1 holds
interpreter objects, and its autotune space is the interpreter's single small config
(`runtime/launch.py`). So steps 1-3 always run in a child process with TRITON_INTERPRET unset
(`python -m attnc.kernel_report REQUEST RESPONSE`); the parent only builds the request and reads the rows.
That also keeps the monkeypatching of step 1 out of the caller's process (pytest's, say).

The compile uses Triton internals (`ASTSource`, the launcher's binder, `JITFunction._pack_args`), as
they are in Triton 3.9; another version with different internals fails with `UnsupportedTriton`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

TARGETS = {"sm90": 90, "sm80": 80}  # compute capabilities: H100, A100
DTYPES = ("bf16", "fp16", "fp32")
TRITON_TESTED = "3.9"


class InspectError(Exception):
    """The module could not be loaded or called; the message is one line."""


class UnsupportedTriton(InspectError):
    """This Triton's compiler internals differ from those `attnc inspect` was written against."""


# ---- the rows ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelReport:
    """One kernel compiled under one config for one target."""

    kernel: str
    target: int  # compute capability: 90 = sm_90
    block_m: int | None = None
    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    registers: int | None = None  # per thread
    spill_bytes: int | None = None  # the stack frame per thread: spilled registers and local arrays
    shared_bytes: int | None = None
    tensor_core: int = 0  # wgmma.mma_async + mma.sync instructions in the PTX
    cp_async: int = 0  # cp.async.ca / cp.async.cg: global-to-shared copies the pipeliner issued
    tma: int = 0  # cp.async.bulk / cp.reduce.async.bulk copies (the Tensor Memory Accelerator)
    error: str | None = None  # the compiler's message, when the kernel does not compile
    # added after `error`, with defaults: rows built positionally or from older JSON still load
    wgmma: int = 0  # wgmma.mma_async instructions (sm_90 warpgroup MMA)
    mma_sync: int = 0  # mma.sync instructions (sm_80-style warp MMA)
    wgmma_n: tuple = ()  # ((N, count), ...) by ascending N: wgmma.mma_async.*.m64nNk16 counted by its N
    spill_stores: int | None = None  # STL (store to local memory) instructions in the SASS; None: no SASS
    spill_loads: int | None = None  # LDL instructions in the SASS

    def __post_init__(self):
        # {N: count} (JSON gives str keys) or [[N, count], ...] (JSON's tuples) -> sorted pairs of ints
        pairs = self.wgmma_n.items() if isinstance(self.wgmma_n, dict) else self.wgmma_n
        object.__setattr__(self, "wgmma_n", tuple(sorted((int(n), int(c)) for n, c in pairs)))

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def wgmma_buckets(self) -> tuple[int, int, int, int]:
        """wgmma counts by N: (N < 32, 32 <= N < 64, 64 <= N < 128, N >= 128), the table's n16/32/64/128+."""
        buckets = [0, 0, 0, 0]
        for n, count in self.wgmma_n:
            buckets[sum(n >= edge for edge in WGMMA_EDGES)] += count
        return tuple(buckets)

    @property
    def wide_percent(self) -> int | None:
        """The share of wgmma with N >= 64, in whole percent rounded down (100 only when all are);
        None without wgmma."""
        if not self.wgmma:
            return None
        wide = sum(count for n, count in self.wgmma_n if n >= WIDE_N)
        return 100 * wide // self.wgmma

    @property
    def tile(self) -> str:
        if self.block_m is None and self.block_n is None:
            return "-"
        return f"{self.block_m}x{self.block_n}"


@dataclass
class Request:
    """What to inspect; built by the parent, carried to the child with torch.save (inputs may be tensors)."""

    module: str  # a .attn spec or a generated .py module
    targets: tuple = (90,)
    dtype: str = "bf16"
    head_dim: int = 128
    L: int = 1024
    configs: int | None = None  # N configs (after the min_stages filter); None: all
    min_stages: int = 1  # configs with fewer stages are left out (all of them if none has enough)
    spread: bool = False  # the N configs spaced evenly over the list (first and last included), not the first N
    inputs: dict = field(default_factory=dict)


# ---- step 3: counting ------------------------------------------------------------------------------

WGMMA_EDGES = (32, 64, 128)  # the wgmma N buckets: n16 (N < 32: n8, n16, n24), n32, n64, n128+ (N >= 128)
WIDE_N = 64  # wgmma with N >= 64 are "wide": a 64-key tile or a 64-wide head dim per instruction

_PTX_COUNTS = {
    # wgmma.fence / commit_group / wait_group are bookkeeping, not matrix instructions
    "wgmma": re.compile(r"(?<![\w.])wgmma\.mma_async\b"),
    "mma": re.compile(r"(?<![\w.])mma\.sync\b"),
    # cp.async.commit_group / wait_group only wait; cp.async.bulk is TMA
    "cp_async": re.compile(r"(?<![\w.])cp\.async\.c[ag]\b"),
    # TMA: cp.async.bulk[.tensor] copies (loads, stores, prefetches) and cp.reduce.async.bulk[.tensor]
    # (a descriptor's atomic_add); their commit_group / wait_group only wait
    "tma": re.compile(r"(?<![\w.])cp\.(?:reduce\.)?async\.bulk\.(?!commit_group|wait_group)"),
}
# the N of wgmma.mma_async[.sp].sync.aligned.m64nNk16.f32.bf16.bf16
_WGMMA_SHAPE = re.compile(r"(?<![\w.])wgmma\.mma_async(?:\.\w+)*?\.m\d+n(\d+)k\d+\b")
# a SASS instruction line: "/*0d40*/  STL [R1+0x780], R0 ;", "/*0850*/  @!P0 LDL.LU.64 R2, [R1+0x8] ;"
_SASS_LOCAL = re.compile(r"^\s*/\*[0-9a-fA-F]+\*/\s+(?:@!?\w+\s+)?(STL|LDL)(?:\.\w+)*\s", re.MULTILINE)


def count_ptx(ptx: str) -> dict:
    """Instruction counts of a PTX listing (comments ignored): wgmma, mma, cp_async, tma, and wgmma_n,
    {N: count} of the wgmma by their N width."""
    code = "\n".join(line.split("//", 1)[0] for line in ptx.splitlines())
    counts = {name: len(pattern.findall(code)) for name, pattern in _PTX_COUNTS.items()}
    widths = {}
    for n in _WGMMA_SHAPE.findall(code):
        widths[int(n)] = widths.get(int(n), 0) + 1
    counts["wgmma_n"] = dict(sorted(widths.items()))
    return counts


def count_sass(sass: str) -> dict:
    """Local-memory instructions of a SASS listing (`cuobjdump -sass` or `nvdisasm`): stl, the STL
    stores (STL, STL.64, STL.128, ...) and ldl, the LDL loads (LDL, LDL.LU, LDL.64, ...). In a Triton
    kernel they are register spills and their reloads."""
    found = _SASS_LOCAL.findall(sass)
    return {"stl": found.count("STL"), "ldl": found.count("LDL")}


def parse_resource_usage(text: str) -> dict:
    """registers, spill_bytes (STACK) and local_bytes (LOCAL) from `cuobjdump --dump-resource-usage`
    output (the first function's line: "Function _fwd:\\n REG:168 STACK:0 SHARED:0 LOCAL:0 ...")."""
    found = {}
    for key, name in (("REG", "registers"), ("STACK", "spill_bytes"), ("LOCAL", "local_bytes")):
        match = re.search(rf"\b{key}:(\d+)", text)
        found[name] = int(match.group(1)) if match else None
    return found


# ---- step 1: recording launches ----------------------------------------------------------------------


@dataclass
class Launch:
    kernel: object  # the launched object: a JITFunction, or an Autotuner / Heuristics around one
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return _jit_function(self.kernel).__name__


def _jit_function(kernel):
    while not hasattr(kernel, "params"):  # Autotuner and Heuristics wrap their kernel as .fn
        kernel = kernel.fn
    return kernel


def _kernel_classes():
    """Every Triton class with its own `run`: JITFunction, Autotuner, Heuristics and any added later."""
    from triton.runtime.jit import KernelInterface

    found, todo = [], [KernelInterface]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if "run" in vars(cls) and cls is not KernelInterface:
            found.append(cls)
    return found


@contextlib.contextmanager
def _patched(obj, name, value):
    if not hasattr(obj, name):
        yield
        return
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def recording(keep: set):
    """Inside, CPU tensors take the kernel path and every Triton launch is appended to the yielded list
    instead of running. Float tensors a launch receives are zeroed (its outputs, so later code sees
    finite numbers), except those whose storage is in `keep` (the caller's inputs)."""
    from attnc.runtime import launch as runtime_launch

    launches = []

    def record(self, *args, grid=None, warmup=False, **kwargs):
        launches.append(Launch(self, args, dict(kwargs)))
        for value in list(args) + list(kwargs.values()):
            if _is_tensor(value) and value.is_floating_point() and value.data_ptr() not in keep:
                value.zero_()

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(runtime_launch, "use_kernels", lambda q: True))
        stack.enter_context(_patched(runtime_launch, "upcast_dots", lambda q: False))  # GPU kernels keep bf16
        for cls in _kernel_classes():
            stack.enter_context(_patched(cls, "run", record))
        yield launches


def _is_tensor(value) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


# ---- inputs --------------------------------------------------------------------------------------


def _entry(module):
    """The module's attention function: the one named by its SIGNATURE, or any carrying `.signature`."""
    signature = getattr(module, "SIGNATURE", None)
    if signature is not None and callable(getattr(module, signature.spec, None)):
        return getattr(module, signature.spec)
    for value in vars(module).values():
        if callable(value) and hasattr(value, "signature") and hasattr(value, "reference"):
            return value
    raise InspectError(f"{module.__name__}: no attention function (one with a .signature) in this module")


def fixed_length(module):
    """The sequence length a token layout (unravel) fixes, from the spec text the module carries."""
    text = "".join(getattr(module, "SPEC", ()))
    if not text:
        return None
    from .pipeline import compile_text
    from .verify import _fixed_length as layout_length

    return layout_length(compile_text(text, module.SIGNATURE.spec))


def _sizes(signature, L: int) -> dict:
    heads = {role: value if isinstance(value, int) else 4 for role, value in signature.heads.items()}
    # B = 2 and 4 heads: no size equals 1, which Triton would specialize as a constant
    return {"B": 2, "Hq": heads.get("q", 4), "Hk": heads.get("k", 4), "Hv": heads.get("v", 4), "Lq": L, "Lk": L,
            "L": L}


def make_inputs(signature, sizes: dict, given: dict, seed: int = 0) -> dict:
    """The spec's inputs for a call at `sizes`: `given` values first (a tensor input given as a number is
    filled with it, as a list reshaped to its axes), then for the others:
      int over a length axis (doc_ids[B, L]): sorted random ids, i.e. contiguous documents;
      int over other axes (band[Hq]): random sizes in 1..L/4;
      float: positive (0.5..1.5; some specs take logs); bool: random."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    torch_dtypes = {"int": torch.int32, "float": torch.float32, "bool": torch.bool}
    known = {name for name, _ in signature.params} | {t.name for t in signature.tensors}
    unknown = sorted(set(given) - known)
    if unknown:
        raise InspectError(f"the spec has no input {unknown[0]!r} (its inputs: {', '.join(sorted(known)) or 'none'})")
    inputs = {name: given[name] for name, _ in signature.params if name in given}
    for t in signature.tensors:
        shape = [sizes[axis] if axis in sizes else int(axis) for axis in t.axes]  # a feature map's width
        value = given.get(t.name)
        if isinstance(value, torch.Tensor):
            x = value
        elif value is not None:
            x = torch.tensor(value, dtype=torch_dtypes[t.dtype])
            try:
                x = x.expand(shape).clone() if x.dim() == 0 else x.reshape(shape)
            except RuntimeError:
                raise InspectError(f"{t.name}: expected one value or {torch.Size(shape).numel()} for its shape "
                                   f"[{', '.join(t.axes)}] = {shape}, got {x.numel()}") from None
        elif t.dtype == "int" and t.axes and t.axes[-1] in ("L", "Lq", "Lk"):
            documents = max(2, sizes["Lk"] // 256)
            x = torch.randint(0, documents, shape, generator=generator).sort(dim=-1).values.to(torch.int32)
        elif t.dtype == "int":
            x = torch.randint(1, max(2, sizes["Lk"] // 4) + 1, shape, generator=generator, dtype=torch.int32)
        elif t.dtype == "bool":
            x = torch.rand(shape, generator=generator) < 0.5
        else:
            x = 0.5 + torch.rand(shape, generator=generator)
        if value is None:
            x = _inside_domain(signature, t.name, x, generator)
        if t.learnable and x.is_floating_point():
            x = x.float().requires_grad_(True)
        inputs[t.name] = x
    return inputs


def _inside_domain(signature, name: str, x, generator):
    """A made-up tensor input moved inside its spec's `where` conditions (verify's `draw_inside`); where no
    draw meets them, it is left for the call's check to name."""
    import torch

    from .verify import draw_inside

    conditions = [condition for n, condition, _ in getattr(signature, "domains", ()) if n == name]
    if not conditions:
        return x
    draw = draw_inside(lambda value: all(bool(torch.as_tensor(c(value)).all()) for c in conditions), x, generator)
    return x if draw is None else draw


# ---- step 2: compiling ---------------------------------------------------------------------------


def _triton_internals():
    """Triton's compiler entry points used here, checked by name so a changed version fails clearly."""
    from inspect import signature as signature_of

    import triton

    def missing(what):
        return UnsupportedTriton(f"attnc inspect uses Triton {TRITON_TESTED}'s compiler internals; Triton "
                                 f"{triton.__version__} has no {what}")

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError as err:
        raise missing(getattr(err, "name", None) or str(err)) from None
    expected = [("create_function_from_signature", create_function_from_signature, ["sig", "kparams", "backend"]),
                ("JITFunction._pack_args", getattr(JITFunction, "_pack_args", None),
                 ["self", "backend", "kwargs", "bound_args", "specialization", "options"])]
    for name, function, parameters in expected:
        if function is None or list(signature_of(function).parameters) != parameters:
            raise missing(f"{name}({', '.join(parameters)})")
    return triton, GPUTarget, ASTSource, make_backend, create_function_from_signature


def check_supported():
    """Raise UnsupportedTriton if this process's Triton lacks the internals the compile uses."""
    _triton_internals()


def _configs(kernel, request: Request) -> list:
    """The autotune configs to compile (None: the launch's own arguments, for kernels not autotuned)."""
    configs = getattr(kernel, "configs", None)
    if not configs:
        return [None]
    chosen = [c for c in configs if (c.num_stages or 1) >= request.min_stages] or configs[:1]
    n = request.configs
    if n is None or n >= len(chosen):
        return chosen
    if request.spread and n > 1:
        return [chosen[round(i * (len(chosen) - 1) / (n - 1))] for i in range(n)]
    return chosen[:n]


def _heuristic_kwargs(kernel, args, kwargs) -> dict:
    """Values that @triton.heuristics wrappers between the launch and the JITFunction would add."""
    added = {}
    while not hasattr(kernel, "params"):
        if hasattr(kernel, "values") and hasattr(kernel, "arg_names"):
            named = {**dict(zip(kernel.arg_names, args)), **kwargs, **added}
            added.update({name: rule(named) for name, rule in kernel.values.items()})
        kernel = kernel.fn
    return added


def _cuobjdump():
    import shutil

    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def _resource_usage(cubin: bytes) -> dict:
    """registers, spill_bytes, spill_stores, spill_loads of a cubin. The SASS is disassembled only when
    the kernel has local memory (about 0.7 s per kernel, most of it the disassembler's start): with
    STACK and LOCAL 0 there is nothing for an STL or LDL to address, so both counts are 0."""
    tool = _cuobjdump()
    if tool is None:
        return {"registers": None, "spill_bytes": None, "spill_stores": None, "spill_loads": None}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)

        def dump(option):
            return subprocess.run([tool, option, str(path)], check=False, capture_output=True, text=True)

        usage = parse_resource_usage(dump("--dump-resource-usage").stdout)
        local = usage.pop("local_bytes")
        if usage["spill_bytes"] == 0 and local == 0:
            return {**usage, "spill_stores": 0, "spill_loads": 0}
        sass = dump("-sass")
    if sass.returncode != 0 or "Function" not in sass.stdout:
        return {**usage, "spill_stores": None, "spill_loads": None}
    counts = count_sass(sass.stdout)
    return {**usage, "spill_stores": counts["stl"], "spill_loads": counts["ldl"]}


def _compiler_message(err: Exception) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = " | ".join(lines[-3:]) or type(err).__name__
    return f"{type(err).__name__}: {text}"[:500]


def compile_launch(launch: Launch, config, target: int) -> KernelReport:
    """Compile one recorded launch under one autotune config for compute capability `target`."""
    triton, GPUTarget, ASTSource, make_backend, create_function_from_signature = _triton_internals()
    jit = _jit_function(launch.kernel)
    kwargs = dict(launch.kwargs)
    if config is not None:
        kwargs.update(config.kwargs)
        kwargs.update(num_warps=config.num_warps, num_stages=config.num_stages)
    kwargs.update(_heuristic_kwargs(launch.kernel, launch.args, kwargs))
    row = KernelReport(jit.__name__, target, kwargs.get("BLOCK_M"), kwargs.get("BLOCK_N"),
                       kwargs.get("num_warps", 4), kwargs.get("num_stages", 3))
    gpu = GPUTarget("cuda", target, 32)
    try:
        backend = make_backend(gpu)
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        bound, specialization, options = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
        compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=gpu,
                                  options=options.__dict__)
    except Exception as err:  # noqa: BLE001 -- any compiler failure is a row (the message says which), not a crash
        return dataclasses.replace(row, error=_compiler_message(err))
    counts = count_ptx(compiled.asm.get("ptx", ""))
    return dataclasses.replace(row, shared_bytes=compiled.metadata.shared, tensor_core=counts["wgmma"] + counts["mma"],
                               wgmma=counts["wgmma"], mma_sync=counts["mma"], wgmma_n=tuple(counts["wgmma_n"].items()),
                               cp_async=counts["cp_async"], tma=counts["tma"], **_resource_usage(compiled.asm["cubin"]))


# ---- the child process: steps 1-3 for one request ----------------------------------------------------


def _load_module(path: str):
    """The generated module of a .attn spec (built and cached by attnc.load) or a module file."""
    from . import load
    from .build import import_module_from
    from .errors import BuildError, SpecError

    if not Path(path).is_file():
        raise InspectError(f"{path}: no such file")
    try:
        if path.endswith(".attn"):
            return sys.modules[load(path).__module__]
        resolved = Path(path).resolve()
        return import_module_from(resolved, f"attnc_inspected.{resolved.stem}")
    except (SpecError, BuildError, SyntaxError, ImportError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InspectError(f"{path}: cannot load: {type(err).__name__}: {first}") from None


def record_launches(request: Request) -> list[Launch]:
    """Call the module's function forward and backward once, and its decode step where it has one,
    returning the distinct launches seen."""
    import torch

    module = _load_module(request.module)
    fn = _entry(module)
    signature = getattr(fn, "signature", None) or module.SIGNATURE
    L = fixed_length(module) or request.L
    sizes = {**_sizes(signature, L), "Dqk": request.head_dim}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[request.dtype]
    generator = torch.Generator().manual_seed(0)

    def qkv(heads):
        x = torch.randn(sizes["B"], heads, L, request.head_dim, generator=generator).to(dtype)
        return x.requires_grad_(True)

    q, k, v = qkv(sizes["Hq"]), qkv(sizes["Hk"]), qkv(sizes["Hv"])
    inputs = make_inputs(signature, sizes, request.inputs)
    keep = {x.data_ptr() for x in (q, k, v, *inputs.values()) if _is_tensor(x)}
    with recording(keep) as launches:
        try:
            # a spec with `stat` statements: its statistics' kernels too, and the entropy's gradient
            with_stats = {"return_stats": True} if hasattr(fn, "Stats") else {}
            out = fn(q, k, v, **inputs, **with_stats)
            loss = (out[0] if isinstance(out, tuple) else out).float().sum()
            if with_stats:
                loss = loss + sum(x.sum() for x in out[-1] if x.requires_grad)
            loss.backward()
            if getattr(fn, "has_decode_kernels", False) and fixed_length(module) is None:
                # one new query per sequence against the whole cache (decode is for 1-D sequences)
                with torch.no_grad():
                    seqlens = torch.full((sizes["B"],), L, dtype=torch.int32)
                    decode_stats = with_stats if fn.has_lse else {}
                    fn.decode(q[:, :, -1:].detach(), k.detach(), v.detach(), seqlens, **inputs, **decode_stats)
        except (ValueError, TypeError, RuntimeError) as err:
            done = ", ".join(launch.name for launch in launches) or "none"
            raise InspectError(f"{signature.spec}: the call failed (kernels launched before: {done}): "
                               f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if not launches:
        raise InspectError(f"{signature.spec}: the call launched no Triton kernels (a reference-only spec?)")
    distinct, seen = [], set()
    for launch in launches:
        key = (launch.name, repr([a for a in launch.args if not _is_tensor(a)]), repr(sorted(launch.kwargs.items())))
        if key not in seen:
            seen.add(key)
            distinct.append(launch)
    return distinct


def run_request(request: Request) -> list[KernelReport]:
    """Steps 1-3 in this process. Only correct with TRITON_INTERPRET unset before Triton is imported."""
    check_supported()
    rows = []
    for launch in record_launches(request):
        for target in request.targets:
            for config in _configs(launch.kernel, request):
                rows.append(compile_launch(launch, config, target))
    return rows


def _child_main(request_path: str, response_path: str) -> int:
    import torch

    requests = torch.load(request_path, weights_only=False)
    answers = []
    for request in requests:
        try:
            answers.append({"rows": [dataclasses.asdict(r) for r in run_request(request)]})
        except InspectError as err:
            answers.append({"error": str(err), "unsupported": isinstance(err, UnsupportedTriton)})
    Path(response_path).write_text(json.dumps(answers))
    return 0


# ---- the parent: the public API ----------------------------------------------------------------------


def _module_path(module) -> str:
    if isinstance(module, (str, Path)):
        return str(module)
    path = getattr(module, "__file__", None)
    if path is None:  # an attention function: its module's file
        path = getattr(sys.modules.get(getattr(module, "__module__", ""), None), "__file__", None)
    if path is None:
        raise InspectError(f"cannot find the source file of {module!r}")
    return path


def request_for(module, target=90, dtype: str = "bf16", head_dim: int = 128, L: int = 1024, configs: int | None = None,
                min_stages: int = 1, inputs: dict | None = None, spread: bool = False) -> Request:
    targets = tuple(target) if isinstance(target, (list, tuple)) else (target,)
    targets = tuple(TARGETS.get(t, t) for t in targets)
    if dtype not in DTYPES:
        raise InspectError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return Request(module=_module_path(module), targets=targets, dtype=dtype, head_dim=head_dim, L=L, configs=configs,
                   min_stages=min_stages, spread=spread, inputs=dict(inputs or {}))


def run_requests(requests: list[Request], timeout: float | None = None) -> list:
    """Run requests in one child process (TRITON_INTERPRET unset); per request, its rows or an
    InspectError (not raised: one bad spec does not hide the others' rows)."""
    import torch

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="attnc-inspect-") as folder:
        request_path, response_path = Path(folder) / "request.pt", Path(folder) / "response.json"
        torch.save(list(requests), request_path)
        child = subprocess.run([sys.executable, "-m", "attnc.kernel_report", str(request_path), str(response_path)],
                               env=env, check=False, capture_output=True, text=True, timeout=timeout)
        if child.returncode != 0 or not response_path.exists():
            lines = child.stderr.strip().splitlines() or ["no output"]
            raise InspectError(f"the compile process failed (exit {child.returncode}): {lines[-1]}")
        answers = json.loads(response_path.read_text())
    results = []
    for answer in answers:
        if "error" in answer:
            results.append((UnsupportedTriton if answer["unsupported"] else InspectError)(answer["error"]))
        else:
            results.append([KernelReport(**row) for row in answer["rows"]])
    return results


def inspect_module(module, target=90, dtype: str = "bf16", head_dim: int = 128, L: int = 1024,
                   configs: int | None = None, min_stages: int = 1, inputs: dict | None = None,
                   spread: bool = False) -> list[KernelReport]:
    """Compile the Triton kernels that `module` launches for an NVIDIA GPU and report on each.

    module: a .attn spec path, a generated module's path, the module, or its attention function.
    target: a compute capability (90, 80), "sm90" / "sm80", or a list of them.
    dtype, head_dim, L: the call's q/k/v (B = 2, 4 heads unless the spec fixes them; a token layout's
    fixed length overrides L). configs: N autotune configs (all by default) among those with at least
    `min_stages` stages: the first N, or N spaced evenly from the first to the last with `spread`. inputs: values for spec inputs (others are made up, see make_inputs).
    Raises InspectError (or UnsupportedTriton) when the module cannot be called or compiled at all;
    a kernel that fails to compile is a row with `.error` set.
    """
    request = request_for(module, target=target, dtype=dtype, head_dim=head_dim, L=L, configs=configs,
                          min_stages=min_stages, inputs=inputs, spread=spread)
    (result,) = run_requests([request])
    if isinstance(result, Exception):
        raise result
    return result


# ---- printing ------------------------------------------------------------------------------------

COLUMNS = ("kernel", "target", "tile", "warps", "stages", "regs", "spill B", "STL/LDL", "smem KB",
           "wgmma n16/32/64/128+", "wide %", "mma.sync", "cp.async", "TMA")


def table_cells(row: KernelReport) -> list[str]:
    def show(value):
        return "-" if value is None else str(value)

    smem = "-" if row.shared_bytes is None else f"{row.shared_bytes / 1024:g}"
    cells = [row.kernel, f"sm_{row.target}", row.tile, show(row.num_warps), show(row.num_stages)]
    if row.error is not None:
        return cells + ["COMPILE ERROR"] + [""] * (len(COLUMNS) - len(cells) - 1)
    local = "-" if row.spill_stores is None else f"{row.spill_stores}/{show(row.spill_loads)}"
    widths = "/".join(map(str, row.wgmma_buckets)) if row.wgmma else "-"
    return cells + [show(row.registers), show(row.spill_bytes), local, smem, widths, show(row.wide_percent),
                    str(row.mma_sync), str(row.cp_async), str(row.tma)]


def format_table(rows: list[KernelReport]) -> str:
    """An aligned text table, one line per kernel and config, then each compile error in full."""
    body = [list(COLUMNS)] + [table_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in body) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             .rstrip() for line in body]
    lines += [f"{r.kernel} {r.tile} w{r.num_warps} s{r.num_stages} sm_{r.target}: {r.error}" for r in rows if r.error]
    return "\n".join(lines)


def spills(row: KernelReport) -> bool:
    """Whether a compiled row has a stack frame or local-memory instructions."""
    return bool(row.spill_bytes) or bool(row.spill_stores) or bool(row.spill_loads)


def summary(rows: list[KernelReport]) -> str:
    """One line: how many configs compile, which kernels never pipeline their loads, which spill in
    every config, and which never run their wgmma at full width (N >= 64 throughout)."""
    kernels = list(dict.fromkeys(r.kernel for r in rows))

    def compiled_rows(kernel):
        return [r for r in rows if r.kernel == kernel and r.ok]

    unpipelined = [k for k in kernels if not any(r.cp_async or r.tma for r in compiled_rows(k))]
    built = [k for k in kernels if compiled_rows(k)]
    spilling = [k for k in built if all(spills(r) for r in compiled_rows(k))]
    with_wgmma = [k for k in built if any(r.wgmma for r in compiled_rows(k))]
    best_wide = {k: max(r.wide_percent for r in compiled_rows(k) if r.wgmma) for k in with_wgmma}
    narrow = [k for k in with_wgmma if best_wide[k] < 100]
    compiled = sum(r.ok for r in rows)
    text = (f"{compiled}/{len(rows)} kernel configs compile; asynchronous (pipelined) loads in "
            f"{len(kernels) - len(unpipelined)}/{len(kernels)} kernels"
            + (f" (none in: {', '.join(unpipelined)})" if unpipelined else ""))
    if built:
        text += (f"; a config without spills in {len(built) - len(spilling)}/{len(built)} kernels"
                 + (f" (spills in every config: {', '.join(spilling)})" if spilling else ""))
    if with_wgmma:
        text += (f"; wgmma all N >= {WIDE_N} in {len(with_wgmma) - len(narrow)}/{len(with_wgmma)} kernels with wgmma"
                 + (" (narrower in: " + ", ".join(f"{k} ({best_wide[k]}% wide at best)" for k in narrow) + ")"
                    if narrow else ""))
    return text


if __name__ == "__main__":
    sys.exit(_child_main(*sys.argv[1:3]))
