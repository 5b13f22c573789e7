"""The `attnc` command line. Every error a user can cause is printed as a diagnostic, never a traceback."""

from __future__ import annotations

import math
import sys

import click

from . import __version__
from .errors import SpecError
from .kernel_report import DTYPES, TARGETS
from .pipeline import compile_file


def _fail(err: SpecError):
    click.echo(err.render(), err=True)


def _load_or_report(path):
    """The spec's attention function, or None after reporting why it does not build: a spec error as
    file:line:col with a caret, a build error (a spec that checks but cannot be compiled) in one line."""
    from . import load
    from .errors import BuildError

    try:
        return load(path)
    except SpecError as err:
        _fail(err)
    except BuildError as err:
        click.echo(f"{path}: error: {err}", err=True)
    return None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="attnc")
def main():
    """attnc: compile .attn attention specs into verified Triton kernels."""


@main.command()
@click.argument("specs", nargs=-1, required=True)
def check(specs):
    """Parse and type-check SPECS; print a one-line summary of each."""
    failed = False
    for path in specs:
        try:
            variant = compile_file(path)
        except SpecError as err:
            _fail(err)
            failed = True
            continue
        from .pipeline import Family, analyse, choose_family

        try:
            analyses = analyse(variant)  # the pipeline's one record of analyses
        except SpecError as err:  # a feature map whose weight does not factorize
            _fail(err)
            failed = True
            continue
        rows = analyses.rows
        kind = {Family.SOFTMAX: "softmax", Family.GENERAL: "general",
                Family.LINEAR: "linear attention, chunked"}[choose_family(analyses)]
        params = [p.name for p in variant.params]
        inputs = [t.name + ("*" if t.learnable else "") for t in variant.tensors]
        stats = "".join(f"; stat {st.name} = {st.text}" for st in variant.stats)  # return_stats=True
        click.echo(f"{path}: ok: attention {variant.name} ({kind}, {rows.passes} pass"
                   f"{'es' if rows.passes > 1 else ''}; params: {', '.join(params) or 'none'}; "
                   f"inputs: {', '.join(inputs) or 'none'}{stats})")
    sys.exit(1 if failed else 0)


@main.command()
@click.argument("spec")
def ir(spec):
    """Print the IR of SPEC: indices, inputs, mask, score, probabilities, row statistics and passes."""
    from .irdump import dump
    from .pipeline import analyse

    try:
        variant = compile_file(spec)
    except SpecError as err:
        _fail(err)
        sys.exit(1)
    click.echo(dump(analyse(variant)), nl=False)


def _build_one(path, out_dir):
    from pathlib import Path

    from .build import write_module
    from .errors import BuildError
    from .pipeline import generate_module

    try:
        variant = compile_file(path)
        source = generate_module(variant)
    except SpecError as err:
        _fail(err)
        return None
    except BuildError as err:
        click.echo(f"{path}: error: {err}", err=True)
        return None
    target = write_module(source, Path(out_dir) / f"{variant.name}.py")
    click.echo(f"{path}: wrote {target}")
    return target


@main.command()
@click.argument("specs", nargs=-1, required=True)
@click.option("-o", "--out", "out_dir", default="gen", show_default=True, help="directory for the modules")
@click.option("--verify", "then_verify", is_flag=True, help="run `attnc verify` on each spec afterwards")
def build(specs, out_dir, then_verify):
    """Generate one Python module (Triton kernels, autograd, reference) per spec."""
    failed = False
    for path in specs:
        failed |= _build_one(path, out_dir) is None
    if then_verify and not failed:
        failed |= not _verify_all(specs, "float32", 0)
    sys.exit(1 if failed else 0)


def _verify_all(specs, dtype_name, seed, length=None) -> bool:
    import time

    import torch

    from .verify import _fixed_length, describe, format_table, verify_variant

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        from .runtime.launch import interpreting

        if not interpreting():
            click.echo("note: no GPU and TRITON_INTERPRET is not set: CPU calls run the reference, so "
                       "there are no kernels to verify; set TRITON_INTERPRET=1 to run them in Triton's "
                       "interpreter", err=True)
    counts = {"ok": 0, "MISMATCH": 0, "not built": 0, "reference only": 0}
    start = time.monotonic()
    for i, path in enumerate(specs, 1):
        click.echo(f"[{i}/{len(specs)}] {path}")
        attn = _load_or_report(path)
        if attn is None:
            counts["not built"] += 1
            continue
        if not attn.has_kernels:
            click.echo(f"{path}: reference only: no kernels were generated for this spec, so there is "
                       "nothing to verify")
            counts["reference only"] += 1
            continue
        if length is not None:
            fixed = _fixed_length(compile_file(path))
            if fixed is not None and fixed != length:
                click.echo(f"  note: the spec's token layout fixes L = {fixed}; --L {length} does not apply")
        rows = verify_variant(path, attn, dtype=dtype, seed=seed, device=device, length=length,
                              on_case=lambda case: click.echo(f"  case {case.label}: {describe(case)}"))
        verdict = "ok" if all(r.ok for r in rows) else "MISMATCH"
        counts[verdict] += 1
        click.echo(format_table(f"{path}: {verdict} ({device}, {dtype_name})", rows))
    summary = ", ".join(f"{n} {what}" for what, n in counts.items() if n or what == "ok")
    all_ok = counts["MISMATCH"] == 0 and counts["not built"] == 0
    click.echo(f"verify: {len(specs)} spec{'s' * (len(specs) != 1)}: {summary} "
               f"({time.monotonic() - start:.0f} s, {device}, {dtype_name}): {'PASS' if all_ok else 'FAIL'}")
    return all_ok


@main.command()
@click.argument("specs", nargs=-1, required=True)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--L", "length", type=click.IntRange(min=1), default=None,
              help="sequence length (default: beyond the spec's constants, at least 45; a grid layout fixes it)")
def verify(specs, dtype, seed, length):
    """Check the kernels of SPECS against the reference, forward and backward, on random shapes."""
    sys.exit(0 if _verify_all(specs, dtype, seed, length) else 1)


# -- attnc mask ---------------------------------------------------------------------------------------

DEFAULT_LENGTH = 64  # short enough to print every element
DISPLAY_TILE_MIN, DISPLAY_TILE_MAX = 4, 128  # default tiles of `attnc mask`
ELEMENT_LIMIT = 1 << 24  # elements of the largest mask evaluated densely (16 MiB of bools)
TILE_LIMIT = 1 << 26  # the drawn plan is a dense [tiles_q, tiles_k] grid: 64 MiB at most


def _ints(text: str, option: str, counts: tuple[int, ...]) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in counts or min(values, default=0) < 1:
        raise click.BadParameter(f"expected {' or '.join(str(c) for c in counts)} positive integers separated "
                                 f"by commas, got {text!r}", param_hint=f"'{option}'")
    return values


def _sizes(variant, length, shape):
    """(B, Hq, Lq, Lk) from --L or --shape; by default the length a grid layout fixes, or DEFAULT_LENGTH."""
    from .verify import _fixed_length

    if length is not None and shape is not None:
        raise click.UsageError("give --L or --shape, not both")
    fixed_heads = variant.heads.get("q")
    B, Hq = 1, fixed_heads if isinstance(fixed_heads, int) else 1
    if shape is not None:
        values = _ints(shape, "--shape", (2, 4))
        if len(values) == 4:
            B, Hq = values[:2]
        Lq, Lk = values[-2:]
    else:
        Lq = Lk = length or _fixed_length(variant) or DEFAULT_LENGTH
    return B, Hq, Lq, Lk


def _parse_value(text: str, dtype: str, name: str):
    kinds = {"int": int, "float": float, "bool": lambda t: {"true": True, "1": True, "false": False,
                                                             "0": False}[t.strip().lower()]}
    try:
        return kinds[dtype](text)
    except (ValueError, KeyError):
        raise click.BadParameter(f"{name}: expected {'an' if dtype == 'int' else 'a'} {dtype}, got {text!r}",
                                 param_hint="'--param'") from None


def _no_such_input(name: str, params: list, tensors: list) -> str:
    """`--param windw=3`: a parameter or a tensor input the spec does not have, named as what it likely
    meant (the closest name's kind), else with the list of both."""
    from .errors import closest

    best = closest(name, params + tensors)
    if best is not None:
        kind = "parameter" if best in params else "tensor input"
        return f"the spec has no {kind} {name!r}; did you mean {best!r}?"
    lists = [f"{what}: {', '.join(names)}" for what, names in (("parameters", params), ("tensor inputs", tensors))
             if names]
    return f"the spec has no parameter or tensor input {name!r} ({'; '.join(lists) or 'it has none'})"


def _inputs(variant, pairs, B, Hq, Lq, Lk, seed):
    """Keyword inputs for the spec: --param NAME=VALUE (a tensor as comma-separated values in its shape's
    order), and seeded random tensors, as `attnc verify` makes them, for the tensors not given."""
    import torch

    from .verify import Case, random_inputs

    params = {p.name: p for p in variant.params}
    tensors = {t.name: t for t in variant.tensors}
    given = {}
    for pair in pairs:
        name, eq, text = pair.partition("=")
        name = name.strip()
        if not eq:
            raise click.BadParameter(f"expected NAME=VALUE, got {pair!r}", param_hint="'--param'")
        if name in params:
            given[name] = _parse_value(text, params[name].dtype, name)
        elif name in tensors:
            t = tensors[name]
            sizes = {"B": B, "Hq": Hq, "Lq": Lq, "Lk": Lk, "L": Lq}
            from . import ir

            defaults = {p.name: p.default.subs({ir.SIZES[n]: v for n, v in sizes.items() if n in ir.SIZES})
                        for p in variant.params}
            shape = t.shape(sizes, {**defaults, **{n: v for n, v in given.items() if n in params}})
            values = [_parse_value(v, t.dtype, name) for v in text.split(",")]
            if len(values) != math.prod(shape):
                n = math.prod(shape)
                raise click.BadParameter(f"{name}: expected {n} value{'' if n == 1 else 's'} for its shape "
                                         f"[{', '.join(t.axes)}] = {shape}, got {len(values)}", param_hint="'--param'")
            given[name] = torch.tensor(values).reshape(shape)
        else:
            raise click.BadParameter(_no_such_input(name, list(params), list(tensors)), param_hint="'--param'")
    missing = [t for t in variant.tensors if t.name not in given]
    if missing:
        case = Case(B, Hq, Hq, Hq, Lq, Lk, 1, 1, label="mask")
        made = random_inputs(variant, case, torch.Generator().manual_seed(seed))
        for t in missing:
            given[t.name] = made[t.name]
            click.echo(f"note: {t.name}: random (seed {seed}); give it with --param {t.name}=v1,v2,...", err=True)
    return given


def _slice(t, batch: int, head: int):
    """[batch, head] of a [B', H', ...] plan or mask; a mask that ignores b or h has that axis at 1, and
    its one slice stands for every batch entry or head."""
    return t[min(batch, t.shape[0] - 1), min(head, t.shape[1] - 1)]


@main.command("mask")
@click.argument("spec")
@click.option("--L", "length", type=click.IntRange(min=1), help="Lq = Lk = N (default: the grid's length, or 64)")
@click.option("--shape", help="Lq,Lk or B,H,Lq,Lk (H: query heads)")
@click.option("--param", "pairs", multiple=True, metavar="NAME=VALUE",
              help="a param, or a tensor input as comma-separated values; repeatable")
@click.option("--block", help="tile size M,N (or M for both), powers of two; default: about 16 tiles along the "
              "longer axis, from 4 to 128 (the same on every machine)")
@click.option("--batch", default=0, type=click.IntRange(min=0), show_default=True, help="batch to draw")
@click.option("--head", default=0, type=click.IntRange(min=0), show_default=True, help="query head to draw")
@click.option("--png", type=click.Path(dir_okay=False), help="also draw the plan (and mask) into this PNG")
@click.option("--elements/--no-elements", default=None,
              help="draw the element mask [default: when Lq, Lk <= 128]")
@click.option("--seed", default=0, show_default=True, help="seed of random tensor inputs")
def mask_command(spec, length, shape, pairs, block, batch, head, png, elements, seed):
    """Draw the element mask and the tile plan of SPEC: which tiles the kernels skip (EMPTY), visit
    without masking (FULL), or visit with the mask (PARTIAL)."""
    import torch

    from . import maskview

    try:
        variant = compile_file(spec)
    except SpecError as err:
        _fail(err)
        sys.exit(1)
    B, Hq, Lq, Lk = _sizes(variant, length, shape)
    # default tiles for display: the same on every machine (not the interpreter's or a GPU's plan
    # tiles), and fine enough for a useful grid: about 16 tiles along the longer axis, 4 to 128 wide
    side = 1 << max(0, (max(Lq, Lk) // 16).bit_length() - 1)
    side = min(DISPLAY_TILE_MAX, max(DISPLAY_TILE_MIN, side))
    tiles = {"block_m": side, "block_n": side}
    if block is not None:
        bm, bn = (_ints(block, "--block", (1, 2)) * 2)[:2]
        if bm & (bm - 1) or bn & (bn - 1):
            raise click.BadParameter(f"tile sizes must be powers of two, got {bm},{bn}", param_hint="'--block'")
        tiles = {"block_m": bm, "block_n": bn}
    if batch >= B or head >= Hq:
        raise click.BadParameter(f"batch {batch}, head {head} is outside B={B}, Hq={Hq} (set them with "
                                 "--shape B,H,Lq,Lk)", param_hint="'--batch' / '--head'")
    inputs = _inputs(variant, pairs, B, Hq, Lq, Lk, seed)
    attn = _load_or_report(spec)
    if attn is None:
        sys.exit(1)
    sizes = {"Lq": Lq, "Lk": Lk, "B": B, "Hq": Hq}
    try:
        plan = attn.plan(**sizes, **tiles, **inputs)
        show = elements if elements is not None else max(Lq, Lk) <= maskview.ELEMENTS_SHOWN
        element_mask = None
        if show and Lq * Lk * B * Hq <= ELEMENT_LIMIT:
            element_mask = attn.mask(**sizes, **inputs)
    except ValueError as err:  # the generated function's argument checks: wrong shapes, lengths, values
        raise click.UsageError(str(err)) from None
    if plan.batch * plan.heads * plan.tiles_q * plan.tiles_k > TILE_LIMIT:
        raise click.UsageError(f"{plan.tiles_q} x {plan.tiles_k} tiles per head are too many to draw; "
                               f"pick larger tiles with --block")
    classes = _slice(plan.to_dense(), batch, head)
    click.echo(f"{variant.name}: Lq={Lq} Lk={Lk} B={B} Hq={Hq}; batch {batch}, head {head}")
    if element_mask is not None:
        grid = _slice(element_mask, batch, head)
        lines, factor = maskview.text_grid(grid.to(torch.int8) * maskview.FULL, maskview.ELEMENT_CHARS)
        if factor == 1:
            key = maskview.legend(maskview.ELEMENT_NAMES, (maskview.FULL, maskview.EMPTY))
        else:
            key = maskview.legend(maskview.ELEMENT_NAMES) + f"; each character: {factor}x{factor} elements"
        click.echo(f"element mask ({key}):")
        click.echo("\n".join(lines))
    elif show:
        click.echo(f"element mask not drawn: {B * Hq * Lq * Lk} elements (the limit is {ELEMENT_LIMIT})")
    lines, factor = maskview.text_grid(classes, maskview.TILE_CHARS)
    each = "" if factor == 1 else f"; each character: {factor}x{factor} tiles"
    click.echo(f"tile plan, query tiles down, key tiles across ({maskview.legend(maskview.CLASS_NAMES)}{each}):")
    click.echo("\n".join(lines))
    click.echo(maskview.summary(plan, classes))  # of the batch and head drawn, as the grid above
    if png:
        title = [f"{variant.name}  Lq={Lq} Lk={Lk}  batch {batch} head {head}", maskview.summary(plan, classes)]
        pixels, _ = maskview.figure(title, classes, (plan.block_m, plan.block_n),
                                    None if element_mask is None else grid)
        try:
            with open(png, "wb") as f:
                f.write(maskview.encode_png(pixels, " / ".join(title)))
        except OSError as err:
            click.echo(f"{png}: error: cannot write: {err.strerror}", err=True)
            sys.exit(1)
        click.echo(f"wrote {png}")


# -- attnc inspect ------------------------------------------------------------------------------------


def _input_value(pair: str):
    """NAME=VALUE of --input: a number, or comma-separated numbers for a tensor input."""
    name, eq, text = pair.partition("=")
    numbers = []
    for part in text.split(","):
        try:
            numbers.append(int(part))
        except ValueError:
            try:
                numbers.append(float(part))
            except ValueError:
                numbers = None
                break
    if not eq or not name.strip() or numbers is None:
        raise click.BadParameter(f"expected NAME=NUMBER or NAME=N1,N2,..., got {pair!r}", param_hint="'--input'")
    return name.strip(), numbers[0] if len(numbers) == 1 else numbers


@main.command("inspect")
@click.argument("spec")
@click.option("--target", type=click.Choice(sorted(TARGETS)), default="sm90", show_default=True,
              help="the GPU to compile for: sm90 (H100) or sm80 (A100)")
@click.option("--dtype", type=click.Choice(DTYPES), default="bf16", show_default=True, help="dtype of q, k, v")
@click.option("--head-dim", default=128, type=click.IntRange(min=1), show_default=True)
@click.option("--L", "length", default=1024, type=click.IntRange(min=1), show_default=True,
              help="sequence length (a spec's token layout fixes its own)")
@click.option("--configs", type=click.IntRange(min=1), help="the first N autotune configs per kernel [default: all]")
@click.option("--spread", is_flag=True, help="with --configs N: N configs spaced evenly over the list, not the first N")
@click.option("--min-stages", default=1, type=click.IntRange(min=1), show_default=True,
              help="only configs with at least this many pipeline stages")
@click.option("--input", "pairs", multiple=True, metavar="NAME=VALUE",
              help="a param, or a tensor input as one value or comma-separated values; repeatable")
def inspect_command(spec, target, dtype, head_dim, length, configs, spread, min_stages, pairs):
    """Compile SPEC's Triton kernels for an NVIDIA GPU on this machine (no GPU needed): registers, spills,
    shared memory, tensor-core instructions and pipelined loads of every kernel and autotune config.
    SPEC is a .attn file or a module written by `attnc build`."""
    from . import kernel_report

    inputs = dict(_input_value(pair) for pair in pairs)
    if spec.endswith(".attn"):
        attn = _load_or_report(spec)
        if attn is None:
            sys.exit(1)
        params = [name for name, _ in attn.signature.params]
        tensors = [t.name for t in attn.signature.tensors]
        for name in inputs:
            if name not in params + tensors:
                click.echo(f"{spec}: error: --input {name}: {_no_such_input(name, params, tensors)}", err=True)
                sys.exit(1)
        length = kernel_report.fixed_length(sys.modules[attn.__module__]) or length
    click.echo(f"{spec}: compiling for {target} ({dtype}, head dim {head_dim}, L {length}; no GPU used)")
    try:
        rows = kernel_report.inspect_module(spec, target=target, dtype=dtype, head_dim=head_dim, L=length,
                                      configs=configs, min_stages=min_stages, inputs=inputs, spread=spread)
    except kernel_report.InspectError as err:
        click.echo(f"{spec}: error: {err}", err=True)
        sys.exit(1)
    click.echo(kernel_report.format_table(rows))
    click.echo(kernel_report.summary(rows))
    sys.exit(0 if all(r.ok for r in rows) else 1)


if __name__ == "__main__":
    main()
