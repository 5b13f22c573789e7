"""The `attnc` command line. Every error a user can cause is printed as a diagnostic, never a traceback."""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import SpecError
from .pipeline import compile_file


def _fail(err: SpecError):
    click.echo(err.render(), err=True)


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
        from .analysis.rowstats import plan_rows

        rows = plan_rows(variant)
        kind = "softmax" if rows.softmax is not None else "general"
        inputs = [p.name for p in variant.params] + [t.name + ("*" if t.learnable else "") for t in variant.tensors]
        click.echo(f"{path}: ok: attention {variant.name} ({kind}, {rows.passes} pass"
                   f"{'es' if rows.passes > 1 else ''}; inputs: {', '.join(inputs) or 'none'})")
    sys.exit(1 if failed else 0)


@main.command()
@click.argument("spec")
def ir(spec):
    """Print the IR of SPEC: indices, inputs, mask, score, probabilities, row statistics and passes."""
    from .irdump import dump

    try:
        variant = compile_file(spec)
    except SpecError as err:
        _fail(err)
        sys.exit(1)
    click.echo(dump(variant), nl=False)


def _build_one(path, out_dir):
    from pathlib import Path

    from .build import write_module
    from .codegen.generate import BuildError, generate_module

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


def _verify_all(specs, dtype_name, seed) -> bool:
    import torch

    from . import load
    from .codegen.generate import BuildError
    from .verify import verify_variant, format_table

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        from .runtime.launch import interpreting

        if not interpreting():
            click.echo("note: no GPU and TRITON_INTERPRET is not set: CPU calls run the reference, so "
                       "there are no kernels to verify; set TRITON_INTERPRET=1 to run them in Triton's "
                       "interpreter", err=True)
    all_ok = True
    for path in specs:
        try:
            attn = load(path)
        except SpecError as err:
            _fail(err)
            all_ok = False
            continue
        except BuildError as err:
            click.echo(f"{path}: error: {err}", err=True)
            all_ok = False
            continue
        if not attn.has_kernels:
            click.echo(f"{path}: reference only: no kernels were generated for this spec, so there is "
                       "nothing to verify")
            continue
        rows = verify_variant(path, attn, dtype=dtype, seed=seed, device=device)
        ok = all(r.ok for r in rows)
        all_ok &= ok
        click.echo(format_table(f"{path}: {'ok' if ok else 'MISMATCH'} ({device}, {dtype_name})", rows))
    return all_ok


@main.command()
@click.argument("specs", nargs=-1, required=True)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@click.option("--seed", default=0, show_default=True)
def verify(specs, dtype, seed):
    """Check the kernels of SPECS against the reference, forward and backward, on random shapes."""
    sys.exit(0 if _verify_all(specs, dtype, seed) else 1)


if __name__ == "__main__":
    main()
