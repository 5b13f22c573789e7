"""bench/varlen_bench.py's dry run, in-process: every method and pass at tiny sizes on the CPU (the
kernels through conftest's TRITON_INTERPRET=1), so a GPU run cannot fail on a path that never ran; and
its launch counter counts what the kernels really launch."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "varlen_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("varlen_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def test_dry_run_prints_every_row(bench, capsys):
    assert bench.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    settings = bench.Settings.make("dry")
    assert len(rows) == len(settings.cases) * len(bench.METHODS) * len(bench.PASSES)
    cells = {(int(r[0][2:]), r[2], r[3]): r for r in rows}
    for sequences, mean in settings.cases:
        tokens = sum(bench.lengths(sequences, mean))
        # varlen: a plain call's launches (forward; forward, dQ and dK/dV), however many sequences
        assert cells[(sequences, "varlen", "fwd")][4] == "1"
        assert cells[(sequences, "varlen", "fwd+bwd")][4] == "3"
        assert cells[(sequences, "document", "fwd")][4] == "1"  # one call on the packed sequence
        assert int(cells[(sequences, "document", "fwd")][1]) == tokens
        for method in ("document", "flex"):  # both compute varlen's result
            assert float(cells[(sequences, method, "fwd")][8]) < 1e-5
        assert "no backward on the CPU" in cells[(sequences, "flex", "fwd+bwd")][9]
        assert cells[(sequences, "flex", "fwd")][4] == "-"  # its own kernels: not counted


def test_launch_counter_counts_kernel_launches(bench):
    """One forward launch per layer call, as the generated module's own visit log sees it."""
    import torch

    from attnc import load
    from attnc.runtime import launch

    attn = load(bench.EXAMPLES / "causal.attn")
    q = k = v = torch.randn(1, 2, 20, 16)
    with bench.count_launches() as counted, launch.count_visits() as visits:
        attn(q, k, v)
        attn(q, k, v)
    assert counted.launches == len(visits) == 2
