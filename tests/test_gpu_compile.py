"""Compile for the GPU without one: every example's kernels for sm_90 and sm_80, through Triton's real
compiler and its bundled ptxas (`attnc.kernel_report`). The interpreter forgives what the compiler does not
(plain Python called from a kernel, say); this catches it on a CPU-only machine.

Compiles run in child processes with TRITON_INTERPRET unset (this session forces the interpreter),
two at a time. One config per kernel: its first autotune config with >= 2 stages, or its first.
"""

from __future__ import annotations

import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from attnc.runtime.checks import Signature, TensorSpec

from attnc import kernel_report

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import run_cli

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.attn"))
FIXTURE = Path(__file__).resolve().parent / "inspect_fixture.py"
# Based's Taylor features number 1 + D + D^2: at D = 128 that is 16,513 per head, and one compile of
# that kernel held 9.4 GB. It is compiled at the paper's D = 16 (273 features), the size it runs at.
HEAD_DIM = {"based": 16}
LINEAR = {"linear_elu", "linear_elu_full", "based", "hedgehog", "lightning", "mala"}  # chunked, one kernel
WORKERS = 2  # child processes at a time (each compiles serially)
BATCHES = 4  # specs are split into this many child processes: few imports of torch, balanced load


def _unsupported() -> str | None:
    try:
        kernel_report.check_supported()
    except kernel_report.UnsupportedTriton as err:
        return str(err)
    return None


needs_internals = pytest.mark.skipif(_unsupported() is not None, reason=_unsupported() or "")


# ---- counting, on hand-written PTX and cuobjdump output ----------------------------------------------------

FAKE_PTX = """\
// cp.async.cg.shared.global in a comment does not count; nor does wgmma.mma_async here
.visible .entry _fwd(
{
	cp.async.cg.shared.global [ %r1 + 0 ], [ %rd1 + 0 ], 0x10, %r2;
	cp.async.ca.shared.global [ %r3 + 0 ], [ %rd2 + 0 ], 0x4, %r4;
	@%p1 cp.async.cg.shared.global [ %r5 + 0 ], [ %rd3 + 0 ], 0x10, %r6;
	cp.async.commit_group;
	cp.async.wait_group 1;
	cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r7], [%rd4, {%r8, %r9}], [%r10];
	cp.async.bulk.commit_group;
	cp.async.bulk.wait_group.read 0;
	wgmma.fence.sync.aligned;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1, %f2}, %rd5, %rd6, p, 1, 1, 0, 1;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1, %f2}, %rd7, %rd8, p, 1, 1, 0, 1;
	wgmma.commit_group.sync.aligned;
	wgmma.wait_group.sync.aligned 0;
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f3, %f4, %f5, %f6}, {%r11, %r12}, {%r13}, {%f3, %f4, %f5, %f6};
	ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r14, %r15, %r16, %r17}, [%r18];
}
"""


def test_count_ptx_counts_instructions_not_bookkeeping_or_comments():
    assert kernel_report.count_ptx(FAKE_PTX) == {"wgmma": 2, "mma": 1, "cp_async": 3, "tma": 1, "wgmma_n": {64: 2}}


def test_count_ptx_of_plain_code_is_zero():
    assert kernel_report.count_ptx("ld.global.b32 %r1, [%rd1];\nst.global.b32 [%rd2], %r1;\nret;\n") == {
        "wgmma": 0, "mma": 0, "cp_async": 0, "tma": 0, "wgmma_n": {}}


def test_parse_resource_usage():
    text = ("\nResource usage:\n Common:\n  GLOBAL:0\n Function _bwd_dkdv:\n  REG:255 STACK:1784 SHARED:0 "
            "LOCAL:0 CONSTANT[0]:552 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    assert kernel_report.parse_resource_usage(text) == {"registers": 255, "spill_bytes": 1784, "local_bytes": 0}
    assert kernel_report.parse_resource_usage("no resource lines") == {"registers": None, "spill_bytes": None,
                                                                 "local_bytes": None}


def test_format_table_aligns_and_spells_out_errors():
    rows = [kernel_report.KernelReport("_fwd", 90, 128, 64, 8, 3, 168, 0, 49152, 24, 12, 0, wgmma=24,
                                 wgmma_n={64: 16, 128: 8}, spill_stores=0, spill_loads=0),
            kernel_report.KernelReport("_bwd", 80, 64, 32, 4, 2, error="CompilationError: at 3:4 | boom")]
    lines = kernel_report.format_table(rows).splitlines()
    assert lines[0].split() == ["kernel", "target", "tile", "warps", "stages", "regs", "spill", "B", "STL/LDL", "smem",
                                "KB", "wgmma", "n16/32/64/128+", "wide", "%", "mma.sync", "cp.async", "TMA"]
    assert lines[1].split() == ["_fwd", "sm_90", "128x64", "8", "3", "168", "0", "0/0", "48", "0/0/16/8", "100", "0",
                                "12", "0"]
    assert lines[2].split() == ["_bwd", "sm_80", "64x32", "4", "2", "COMPILE", "ERROR"]
    assert lines[3] == "_bwd 64x32 w4 s2 sm_80: CompilationError: at 3:4 | boom"
    assert len(lines[0]) == len(lines[1])  # right-aligned numbers end in the same column
    assert kernel_report.summary(rows) == ("1/2 kernel configs compile; asynchronous (pipelined) loads in 1/2 kernels "
                                     "(none in: _bwd); a config without spills in 1/1 kernels; wgmma all N >= 64 in "
                                     "1/1 kernels with wgmma")


# ---- inputs made from a signature --------------------------------------------------------------------------

SIG = Signature(spec="s", params=(("window", "int"),),
                tensors=(TensorSpec("doc_ids", "int", ("B", "L"), False), TensorSpec("band", "int", ("Hq",), False),
                         TensorSpec("slopes", "float", ("Hq",), True)),
                heads={"q": "Hq", "k": "Hq", "v": "Hq"}, equal_lengths=True)
SIZES = {"B": 2, "Hq": 4, "Hk": 4, "Hv": 4, "Lq": 1024, "Lk": 1024, "L": 1024}


def test_made_up_inputs_have_the_shapes_and_ranges_a_spec_expects():
    made = kernel_report.make_inputs(SIG, SIZES, {})
    assert set(made) == {"doc_ids", "band", "slopes"}  # the param keeps its default
    doc = made["doc_ids"]
    assert doc.shape == (2, 1024) and not doc.is_floating_point()
    assert bool((doc[:, 1:] >= doc[:, :-1]).all())  # sorted: contiguous documents
    assert doc.unique().numel() > 1
    band = made["band"]
    assert band.shape == (4,) and not band.is_floating_point() and 1 <= int(band.min()) and int(band.max()) <= 256
    assert made["slopes"].shape == (4,) and float(made["slopes"].detach().min()) > 0 and made["slopes"].requires_grad


def test_made_up_inputs_meet_the_specs_where_conditions():
    """lightning's decay is declared 'where decay > 0 and decay <= 1'; the default draw (0.5..1.5) is not."""
    import dataclasses

    decay = TensorSpec("decay", "float", ("Hq",), False)
    sig = dataclasses.replace(SIG, tensors=(decay,), domains=(("decay", lambda x: (x > 0) & (x <= 1), "..."),))
    for seed in range(5):
        made = kernel_report.make_inputs(sig, SIZES, {}, seed=seed)["decay"]
        assert float(made.min()) > 0 and float(made.max()) <= 1, made


def test_given_inputs_override_fill_and_reshape():
    made = kernel_report.make_inputs(SIG, SIZES, {"window": 7, "band": 64, "slopes": [1.0, 2.0, 3.0, 4.0]})
    assert made["window"] == 7
    assert made["band"].tolist() == [64, 64, 64, 64]
    assert made["slopes"].tolist() == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(kernel_report.InspectError, match="no input 'windw'"):
        kernel_report.make_inputs(SIG, SIZES, {"windw": 3})
    with pytest.raises(kernel_report.InspectError, match="band: expected one value or 4"):
        kernel_report.make_inputs(SIG, SIZES, {"band": [1, 2, 3]})


def test_request_for_maps_every_option():
    request = kernel_report.request_for("x.attn", target=["sm90", 80], dtype="fp16", head_dim=64, L=256, configs=3,
                                  min_stages=2, inputs={"band": 3}, spread=True)
    assert request == kernel_report.Request(module="x.attn", targets=(90, 80), dtype="fp16", head_dim=64, L=256,
                                      configs=3, min_stages=2, spread=True, inputs={"band": 3})
    with pytest.raises(kernel_report.InspectError, match="dtype 'fp8'"):
        kernel_report.request_for("x.attn", dtype="fp8")


def test_changed_triton_internals_are_named_with_the_version(monkeypatch):
    import triton
    from triton.runtime import jit

    monkeypatch.setattr(jit, "create_function_from_signature", lambda sig, kparams: None)  # an older binder
    with pytest.raises(kernel_report.UnsupportedTriton) as err:
        kernel_report.check_supported()
    assert f"Triton {triton.__version__} has no create_function_from_signature(sig, kparams, backend)" in str(err.value)


# ---- a hand-written module: the compiled facts are known without attnc's templates ---------------------------


@needs_internals
def test_a_pipelined_loop_shows_cp_async_and_tensor_cores(monkeypatch):
    monkeypatch.delenv("FIXTURE_BROKEN", raising=False)
    rows = kernel_report.inspect_module(FIXTURE, target=[80, 90], L=256, head_dim=64)
    by = {(r.target, r.num_stages): r for r in rows}
    assert sorted(by) == [(80, 1), (80, 3), (90, 1), (90, 3)] and {r.kernel for r in rows} == {"_stream"}
    for target in (80, 90):
        assert by[target, 3].cp_async > 0, "3 stages: the loop's loads are asynchronous copies"
        assert by[target, 1].cp_async == 0, "1 stage: nothing to overlap"
        assert by[target, 3].tensor_core > 0 and by[target, 3].registers > 0
        assert by[target, 3].shared_bytes > by[target, 1].shared_bytes  # the extra stages' buffers
        assert by[target, 3].spill_stores == by[target, 3].spill_loads == 0 == by[target, 3].spill_bytes
    # 64x32 tiles of q.k: on sm_90 one warpgroup's wgmma is 32 keys wide (N = BLOCK_N), none at N >= 64
    hopper, ampere = by[90, 3], by[80, 3]
    assert hopper.wgmma > 0 and hopper.wgmma_n == ((32, hopper.wgmma),) and hopper.wide_percent == 0, hopper
    assert hopper.wgmma_buckets == (0, hopper.wgmma, 0, 0) and hopper.tensor_core == hopper.wgmma + hopper.mma_sync
    assert ampere.wgmma == 0 and ampere.mma_sync == ampere.tensor_core > 0, ampere


@needs_internals
def test_what_the_interpreter_forgives_is_a_compile_error(monkeypatch):
    monkeypatch.setenv("FIXTURE_BROKEN", "1")
    rows = kernel_report.inspect_module(FIXTURE, target=90, L=256, head_dim=64, configs=1)
    broken = [r for r in rows if not r.ok]
    assert [r.kernel for r in broken] == ["_forgiven"]
    assert "twice" in broken[0].error


# ---- every example, sm_90 and sm_80 ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled():
    """{spec stem: rows or InspectError}, compiled in BATCHES child processes, WORKERS at a time."""
    requests = [kernel_report.request_for(path, target=[90, 80], configs=1, min_stages=2,
                                   head_dim=HEAD_DIM.get(path.stem, 128)) for path in EXAMPLES]
    batches = [list(range(i, len(requests), BATCHES)) for i in range(BATCHES)]
    start = time.time()
    with ThreadPoolExecutor(WORKERS) as pool:
        answers = list(pool.map(lambda batch: kernel_report.run_requests([requests[i] for i in batch]), batches))
    results = {}
    for batch, answer in zip(batches, answers):
        for i, result in zip(batch, answer):
            results[EXAMPLES[i].stem] = result
    stacked = sum(r.ok and bool(r.spill_bytes) for rows in results.values() if isinstance(rows, list) for r in rows)
    print(f"compiled {len(EXAMPLES)} examples for sm_90 and sm_80 in {time.time() - start:.0f} s "
          f"({stacked} kernel configs with a stack frame disassembled for their STL/LDL)")
    return results


@needs_internals
@pytest.mark.parametrize("spec", [p.stem for p in EXAMPLES])
def test_example_compiles_for_sm90_and_sm80(compiled, spec):
    result = compiled[spec]
    if isinstance(result, kernel_report.InspectError):
        pytest.fail(f"{spec}: {result}")
    errors = [f"{spec}: {r.kernel} ({r.tile} w{r.num_warps} s{r.num_stages}) on sm_{r.target}: {r.error}"
              for r in result if not r.ok]
    assert not errors, "\n".join(errors)
    kernels = {r.kernel for r in result}
    # linear attention (tier 4) runs its backward as scans of its one forward kernel (docs/linear.md)
    assert len(kernels) >= (1 if spec in LINEAR else 2), f"{spec}: expected forward and backward kernels, got {sorted(kernels)}"
    for r in result:
        assert {(r.kernel, 90), (r.kernel, 80)} <= {(x.kernel, x.target) for x in result}
        assert r.registers and r.registers > 0, f"{spec}: {r}"
        # the instruction widths and spill counts are filled in: every wgmma has its N, every stack its STL/LDL
        assert r.tensor_core == r.wgmma + r.mma_sync and sum(c for _, c in r.wgmma_n) == r.wgmma, f"{spec}: {r}"
        assert r.spill_stores is not None and r.spill_loads is not None, f"{spec}: {r}"
        assert (r.spill_bytes > 0) == (r.spill_stores > 0) and r.spill_loads >= (r.spill_stores > 0), f"{spec}: {r}"
        assert r.target == 90 or r.wgmma == 0, f"{spec}: wgmma on sm_{r.target}: {r}"
    for target in (90, 80):  # the dots of q.k and p.v run on tensor cores (a row-reduction kernel may have none)
        assert any(r.tensor_core > 0 for r in result if r.target == target), f"{spec}: no tensor cores on sm_{target}"
    assert any(r.wgmma > 0 for r in result if r.target == 90), f"{spec}: no wgmma on sm_90"


# ---- the command line ----------------------------------------------------------------------------------


@needs_internals
def test_cli_inspect_prints_a_plausible_table():
    code, out = run_cli("inspect", ROOT / "examples" / "causal.attn", "--configs", "1", "--min-stages", "2")
    assert code == 0, out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("kernel"))
    rows = [line.split() for line in lines[header + 1:] if line.split() and line.split()[1] == "sm_90"]
    assert len(rows) >= 2, out  # a forward and a backward kernel at least
    assert any(cells[0] == "_decode" for cells in rows), out  # the decode step is compiled too
    rows = [cells for cells in rows if cells[2] != "-"]  # kernels without tiles (the decode merge) aside
    for cells in rows:
        assert re.fullmatch(r"\d+x\d+", cells[2]) and int(cells[4]) >= 2, cells  # the first >= 2-stage config
        regs, spill, local, smem, widths, wide, mma_sync, cp_async, tma = cells[5:14]
        assert 0 < int(regs) <= 255 and int(spill) >= 0 and 0 < float(smem) <= 228, cells
        stores, loads = map(int, local.split("/"))
        assert (stores > 0) == (int(spill) > 0) and loads >= 0, cells
        wgmma = 0 if widths == "-" else sum(map(int, widths.split("/")))  # n16/32/64/128+
        assert (wide == "-") == (wgmma == 0) and (wide == "-" or 0 <= int(wide) <= 100), cells
        assert wgmma + int(mma_sync) > 0 and int(cp_async) >= 0 and int(tma) >= 0, cells
    assert re.search(r"^\d+/\d+ kernel configs compile", lines[-1], re.MULTILINE), out


@needs_internals
def test_cli_inspect_a_spec_without_decode_kernels(tmp_path):
    """dot() of feature vectors has no split-KV decode (attn.decode raises): inspect compiles the rest,
    including the backward's learnable-gradient kernels (a table of 81 entries: pair buffer and the
    host's scatter-sum; a key bias: per-key sums)."""
    spec = tmp_path / "mla_tables.attn"
    spec.write_text("attention mla_tables\nconst R = 40, F = 16\ninput rel: float[Hq, 2 * R + 1] learnable\n"
                    "input kb: float[B, Lk] learnable\ninput qr: float[B, Hq, Lq, F]\ninput kr: float[B, Lk, F]\n"
                    "mask kv <= q\nscore s + rel[h, q - kv + R] + kb[b, kv] + dot(qr[b, h, q], kr[b, kv])\n")
    code, out = run_cli("inspect", spec, "--configs", "1", "--head-dim", "64", "--L", "256")
    assert code == 0, out
    kernels = {line.split()[0] for line in out.splitlines() if len(line.split()) > 1 and line.split()[1] == "sm_90"}
    assert {"_fwd", "_bwd_dq", "_bwd_dkdv", "_segment_sums"} <= kernels and "_decode" not in kernels, out


def test_cli_inspect_errors_are_one_line(tmp_path):
    code, out = run_cli("inspect", tmp_path / "missing.attn")
    assert code == 1 and "missing.attn: error:" in out
    assert len(set(out.strip().splitlines())) == 1  # one line (run_cli may repeat stderr after the output)
    bad = tmp_path / "bad.attn"
    bad.write_text("attention bad\nmask kv <= q and q - kv < windw\n")
    code, out = run_cli("inspect", bad)
    assert code == 1 and f"{bad}:2:" in out and "unknown name 'windw'" in out
    code, out = run_cli("inspect", ROOT / "examples" / "moa.attn", "--input", "bnd=3")
    assert code == 1 and "no tensor input 'bnd'" in out and "did you mean 'band'" in out
    code, out = run_cli("inspect", ROOT / "examples" / "moa.attn", "--input", "band=x")
    assert code == 2 and "'--input'" in out


def test_recording_restores_what_it_patches():
    """Recording patches Triton's launch methods and attnc's launch decisions; even when the call inside
    fails, they are restored (the compile itself runs in a child process, away from this one)."""
    from attnc.runtime import launch
    from triton.runtime import jit

    def state():
        return jit.JITFunction.run, launch.use_kernels, launch.upcast_dots

    before = state()
    with pytest.raises(ZeroDivisionError), kernel_report.recording(set()) as launches:
        assert launch.use_kernels(torch.zeros(1)) is True  # inside, CPU tensors take the kernel path
        assert jit.JITFunction.run is not before[0]
        1 / 0  # noqa: B018
    assert launches == [] and state() == before
