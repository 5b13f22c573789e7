"""`attnc inspect`'s counting, on hand-written PTX, SASS and cuobjdump output: the instruction widths,
spills and TMA copies that say why a kernel is slow, checked without a GPU or a compile."""

from __future__ import annotations

import dataclasses
import json
import stat

from attnc import kernel_report

# ---- wgmma by N width, mma.sync ------------------------------------------------------------------------

WGMMA_PTX = """\
// wgmma.mma_async.sync.aligned.m64n256k16 in a comment does not count
	wgmma.fence.sync.aligned;
	wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%f1, %f2}, %rd1, %rd2, p, 1, 1, 0, 1;
	wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%f1, %f2}, %rd1, %rd2, p, 1, 1, 0, 1;
	wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%f1, %f2}, %rd1, %rd2, p, 1, 1, 0, 1;
	wgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16 {%f1, %f2}, %rd1, %rd2, p, 1, 1, 0, 1;
	wgmma.mma_async.sync.aligned.m64n24k16.f32.bf16.bf16 {%f1, %f2}, %rd1, %rd2, p, 1, 1, 0, 1;
	wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%f1, %f2}, %rd1, %rd2, p, 1, 1, 0, 1;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1, %f2}, %rd1, %rd2, p, 1, 1, 0, 1;
	@%p1 wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1, %f2}, %rd1, %rd2, p, 1, 1, 0, 1;
	wgmma.mma_async.sp.sync.aligned.m64n96k32.f32.bf16.bf16 {%f1, %f2}, %rd1, %rd2, %r1, 0, p, 1, 1, 0, 1;
	wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1, %f2}, %rd1, %rd2, p, 1, 1, 0, 1;
	wgmma.mma_async.sync.aligned.m64n256k8.f32.tf32.tf32 {%f1, %f2}, %rd1, %rd2, p, 1, 1, 0, 1;
	wgmma.commit_group.sync.aligned;
	wgmma.wait_group.sync.aligned 0;
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f3, %f4, %f5, %f6}, {%r1, %r2}, {%r3}, {%f3, %f4, %f5, %f6};
	mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f3, %f4, %f5, %f6}, {%r1, %r2}, {%r3}, {%f3, %f4, %f5, %f6};
	ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r4, %r5, %r6, %r7}, [%r8];
"""


def test_wgmma_are_counted_by_their_n_width():
    counts = kernel_report.count_ptx(WGMMA_PTX)
    assert counts["wgmma"] == 11 and counts["mma"] == 2
    assert counts["wgmma_n"] == {8: 1, 16: 3, 24: 1, 32: 1, 64: 2, 96: 1, 128: 1, 256: 1}
    assert sum(counts["wgmma_n"].values()) == counts["wgmma"]  # every wgmma has its shape


def _row(wgmma_n: dict, **fields) -> kernel_report.KernelReport:
    total = sum(wgmma_n.values())
    base = kernel_report.KernelReport("_fwd", 90, 64, 64, 4, 3, registers=128, spill_bytes=0, shared_bytes=65536,
                                tensor_core=total, wgmma=total, wgmma_n=wgmma_n, spill_stores=0, spill_loads=0)
    return dataclasses.replace(base, **fields)


def test_buckets_and_wide_share_of_a_row():
    row = _row(kernel_report.count_ptx(WGMMA_PTX)["wgmma_n"])
    # N < 32: n8, n16 x3, n24; 32 <= N < 64: n32; 64 <= N < 128: n64 x2, n96; N >= 128: n128, n256
    assert row.wgmma_buckets == (5, 1, 3, 2)
    assert row.wide_percent == 100 * 5 // 11 == 45
    assert kernel_report.table_cells(row)[9:11] == ["5/1/3/2", "45"]


def test_a_quarter_width_tile_is_visible_at_a_glance():
    quarter, full = _row({16: 48}), _row({64: 16, 128: 8})
    assert quarter.wgmma_buckets == (48, 0, 0, 0) and quarter.wide_percent == 0
    assert full.wgmma_buckets == (0, 0, 16, 8) and full.wide_percent == 100
    assert kernel_report.table_cells(quarter)[9:11] == ["48/0/0/0", "0"]
    assert kernel_report.table_cells(full)[9:11] == ["0/0/16/8", "100"]


def test_wide_percent_is_rounded_down_and_none_without_wgmma():
    assert _row({64: 199, 32: 1}).wide_percent == 99  # 99.5%: not shown as all wide
    assert _row({128: 1, 16: 2}).wide_percent == 33
    sm80 = kernel_report.KernelReport("_fwd", 80, 64, 64, 4, 3, 128, 0, 65536, 256, 64, 0, mma_sync=256,
                                spill_stores=0, spill_loads=0)
    assert sm80.wide_percent is None and sm80.wgmma_buckets == (0, 0, 0, 0)
    assert kernel_report.table_cells(sm80)[9:12] == ["-", "-", "256"]


def test_rows_stay_backward_compatible_and_survive_json():
    old = kernel_report.KernelReport("_fwd", 90, 128, 64, 8, 3, 168, 0, 49152, 24, 12, 0)  # the fields before `error`
    assert (old.error, old.wgmma, old.mma_sync, old.wgmma_n, old.spill_stores, old.spill_loads) == (
        None, 0, 0, (), None, None)
    row = _row({16: 3, 64: 2}, cp_async=8)
    assert row.wgmma_n == ((16, 3), (64, 2))  # a dict becomes sorted (N, count) pairs: hashable, ordered
    back = kernel_report.KernelReport(**json.loads(json.dumps(dataclasses.asdict(row))))  # the child's answer
    assert back == row and hash(back) == hash(row)
    assert kernel_report.KernelReport(**{**dataclasses.asdict(row), "wgmma_n": {"64": 2, "16": 3}}) == row


# ---- spills: STL / LDL in the SASS --------------------------------------------------------------------------

SASS = """\
	code for sm_90a
		Function : _STL_LDL_kernel
	.headerflags	@"EF_CUDA_ACCELERATORS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                         /* 0x00000a00ff017b82 */
        /*0090*/                   STL [R1+0x60], R10 ;                           /* 0x0000600a01007387 */
        /*00a0*/                   STL.64 [R1+0x68], R12 ;                        /* 0x0000680c01007387 */
        /*00b0*/                   STL.128 [R1+0x70], R16 ;                       /* 0x0000701001007387 */
        /*00c0*/                   STL.S16 [R1+0x80], R20 ;                       /* 0x0000801401007387 */
        /*00d0*/               @P0 STL [R1+0x84], R21 ;                           /* 0x0000841501000387 */
        /*00e0*/                   STS [R3], R4 ;                                 /* 0x0000000403007388 */
        /*00f0*/                   STG.E desc[UR4][R6.64], R4 ;                   /* 0x0000000406007986 */
        /*0100*/                   LDL R22, [R1+0x60] ;                           /* 0x0000600001167983 */
        /*0110*/                   LDL.LU R23, [R1+0x84] ;                        /* 0x0000840001177983 */
        /*0120*/                   LDL.64 R24, [R1+0x68] ;                        /* 0x0000680001187983 */
        /*0130*/              @!P1 LDL.LU.64 R26, [R1+0x68] ;                     /* 0x0000680001189983 */
        /*0140*/                   LDS R5, [R3] ;                                 /* 0x0000000003057984 */
        /*0150*/                   LDSM.16.M88.4 R8, [R3] ;                       /* 0x000000000308783b */
        /*0160*/                   LDG.E R9, desc[UR4][R6.64] ;                   /* 0x0000000406097981 */
        /*0170*/                   HGMMA.64x64x16.F32.BF16 R152, gdesc[UR20], RZ, !UPT ;   /* 0x00e00000149879f0 */
        /*0180*/                   EXIT ;                                         /* 0x000000000000794d */
"""


def test_count_sass_counts_local_stores_and_loads_of_every_width():
    assert kernel_report.count_sass(SASS) == {"stl": 5, "ldl": 4}


def test_count_sass_without_spills_and_in_nvdisasm_form():
    assert kernel_report.count_sass("\tcode for sm_80\n\t\tFunction : _fwd\n        /*0000*/  MOV R1, c[0x0][0x28] ;\n"
                              "        /*0010*/  EXIT ;\n") == {"stl": 0, "ldl": 0}
    # nvdisasm prints no encodings after the instruction
    assert kernel_report.count_sass("        /*0d40*/                   STL [R1+0x780], R0 ;\n"
                              "        /*0850*/                   LDL.LU R3, [R1+0x650] ;\n") == {"stl": 1, "ldl": 1}


def test_parse_resource_usage_reads_local_too():
    text = " Function _bwd_dkdv:\n  REG:255 STACK:408 SHARED:0 LOCAL:0 CONSTANT[0]:552 TEXTURE:0\n"
    assert kernel_report.parse_resource_usage(text) == {"registers": 255, "spill_bytes": 408, "local_bytes": 0}


def _fake_cuobjdump(tmp_path, usage: str):
    """A stand-in for cuobjdump: --dump-resource-usage prints `usage`, -sass prints SASS and leaves a mark."""
    (tmp_path / "sass.txt").write_text(SASS)
    tool = tmp_path / "cuobjdump"
    tool.write_text(f"#!/bin/sh\nif [ \"$1\" = -sass ]; then touch {tmp_path}/disassembled; cat {tmp_path}/sass.txt; "
                    f"else printf '%s\\n' ' Function _k:' '  {usage}'; fi\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return str(tool)


def test_spill_counts_come_from_the_sass_only_when_there_is_a_stack(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel_report, "_cuobjdump", lambda: _fake_cuobjdump(tmp_path, "REG:255 STACK:408 LOCAL:0"))
    assert kernel_report._resource_usage(b"cubin") == {"registers": 255, "spill_bytes": 408, "spill_stores": 5,
                                                 "spill_loads": 4}
    assert (tmp_path / "disassembled").exists()
    (tmp_path / "disassembled").unlink()
    monkeypatch.setattr(kernel_report, "_cuobjdump", lambda: _fake_cuobjdump(tmp_path, "REG:168 STACK:0 LOCAL:0"))
    assert kernel_report._resource_usage(b"cubin") == {"registers": 168, "spill_bytes": 0, "spill_stores": 0,
                                                 "spill_loads": 0}
    assert not (tmp_path / "disassembled").exists()  # no local memory: nothing to disassemble for
    monkeypatch.setattr(kernel_report, "_cuobjdump", lambda: None)
    assert kernel_report._resource_usage(b"cubin") == {"registers": None, "spill_bytes": None, "spill_stores": None,
                                                 "spill_loads": None}


# ---- TMA -----------------------------------------------------------------------------------------------------

TMA_PTX = """\
	// as Triton 3.9 spells a tensor descriptor's load, store and atomic_add for sm_90
	cp.async.bulk.tensor.2d.shared::cta.global.mbarrier::complete_tx::bytes [%r1], [%rd1, {%r2, %r3}], [%r4];
	cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%rd2, {%r5, %r6}], [%r7];
	cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.bulk_group [%rd2, {%r5, %r6}], [%r7];
	cp.async.bulk.prefetch.tensor.2d.L2.global [%rd1, {%r2, %r3}];
	cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%r8], [%rd3], 1024, [%r4];
	cp.async.bulk.commit_group;
	cp.async.bulk.wait_group 0;
	cp.async.bulk.wait_group.read 0;
	cp_fenceproxy.global.shared::cta.tensormap::generic.release.gpu.sync.aligned [%rd4], 128;
	cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%r4];
	cp.async.cg.shared.global [%r9], [%rd5], 16;
"""


def test_tma_counts_descriptor_loads_stores_reductions_and_prefetches():
    counts = kernel_report.count_ptx(TMA_PTX)
    assert counts["tma"] == 5  # 3 tensor-descriptor copies, 1 prefetch, 1 plain bulk copy
    assert counts["cp_async"] == 1 and counts["wgmma"] == 0 and counts["wgmma_n"] == {}


# ---- the table and its summary --------------------------------------------------------------------------------


def test_table_columns_and_a_spilling_row():
    spilling = kernel_report.KernelReport("_bwd_dkdv", 90, 64, 128, 8, 3, 255, 408, 164864, 72, 90, 0, wgmma=72,
                                    wgmma_n={64: 48, 128: 24}, spill_stores=121, spill_loads=168)
    lines = kernel_report.format_table([spilling]).splitlines()
    assert lines[0].split() == ["kernel", "target", "tile", "warps", "stages", "regs", "spill", "B", "STL/LDL", "smem",
                                "KB", "wgmma", "n16/32/64/128+", "wide", "%", "mma.sync", "cp.async", "TMA"]
    assert lines[1].split() == ["_bwd_dkdv", "sm_90", "64x128", "8", "3", "255", "408", "121/168", "161", "0/0/48/24",
                                "100", "0", "90", "0"]
    unknown = dataclasses.replace(spilling, spill_stores=None, spill_loads=None)  # no cuobjdump
    assert kernel_report.table_cells(unknown)[7] == "-"


def test_summary_names_kernels_that_always_spill_or_run_narrow_wgmma():
    rows = [_row({64: 16, 128: 8}, kernel="_fwd"),
            _row({16: 48}, kernel="_bwd_dq", cp_async=4),
            _row({16: 24, 64: 8}, kernel="_bwd_dq", cp_async=4),
            _row({64: 72}, kernel="_bwd_dkdv", cp_async=4, spill_bytes=408, spill_stores=121, spill_loads=168),
            kernel_report.KernelReport("_bwd_dkdv", 90, 64, 64, 4, 2, error="boom")]
    assert kernel_report.summary(rows) == (
        "4/5 kernel configs compile; asynchronous (pipelined) loads in 2/3 kernels (none in: _fwd); "
        "a config without spills in 2/3 kernels (spills in every config: _bwd_dkdv); "
        "wgmma all N >= 64 in 2/3 kernels with wgmma (narrower in: _bwd_dq (25% wide at best))")
