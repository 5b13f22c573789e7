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


if __name__ == "__main__":
    main()
