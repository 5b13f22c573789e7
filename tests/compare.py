"""Comparison helpers shared by the test modules: relative errors as design.md defines them, and the
CLI run through click's runner with the no-traceback rule."""
import torch
from click.testing import CliRunner


def relerr(got, ref) -> float:
    """max |got - ref| / max |ref| (design.md's tolerance measure); NaN never passes."""
    got, ref = got.detach().double(), ref.detach().double()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert not torch.isnan(got).any(), "NaN in kernel output"
    denom = ref.abs().max().item()
    return (got - ref).abs().max().item() / (denom if denom > 0 else 1.0)


def check_close(what, got, ref, tol, finite=False):
    if finite:
        assert torch.isfinite(got).all(), f"{what}: NaN or inf in the kernel's result"
    err = relerr(got, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def run_cli(*args):
    """`attnc ARGS...` in-process: (exit code, stdout + stderr); never a traceback."""
    from attnc.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "Traceback" not in output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, output


def brute_force(mask, block_m, block_n):
    """The exact tile plan of an element mask, by brute force: [B, H, Lq, Lk] bool -> per-tile classes (0 EMPTY, 1 PARTIAL, 2 FULL), tiles cut at the edges."""
    Bm, Hm, Lq, Lk = mask.shape
    tq, tk = -(-Lq // block_m), -(-Lk // block_n)
    out = torch.zeros(Bm, Hm, tq, tk, dtype=torch.int8)
    for i in range(tq):
        for j in range(tk):
            tile = mask[:, :, i * block_m:(i + 1) * block_m, j * block_n:(j + 1) * block_n].reshape(Bm, Hm, -1)
            out[:, :, i, j] = torch.where(tile.all(-1), 2, torch.where(tile.any(-1), 1, 0))
    return out
