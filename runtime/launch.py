"""Launch-time decisions shared by generated modules: where kernels run, tile configurations."""

from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_kernels(q: torch.Tensor) -> bool:
    """CUDA tensors run the Triton kernels; CPU tensors too under the interpreter (not float64,
    which the kernels do not take: float64 goes to the reference, which is exact for it)."""
    if q.dtype == torch.float64:
        return False
    if q.is_cuda:
        return True
    return q.device.type == "cpu" and interpreting()


def head_block(d: int) -> int:
    """Head dims are padded to a power of two (>= 16, tl.dot's minimum) and masked."""
    return max(16, triton.next_power_of_2(d))


def upcast_dots(q: torch.Tensor) -> bool:
    """[Note] Triton's interpreter computes bf16 tl.dot wrongly (it reinterprets the bits); on the CPU
    the kernels upcast bf16 tiles to fp32 before each dot. Compiled GPU kernels keep bf16."""
    return q.dtype == torch.bfloat16 and not q.is_cuda


# The autotune space, per kernel kind: (BLOCK_M, BLOCK_N, num_warps, num_stages), first = the default.
# Kept from compiling the kernels for sm_90 at D = 128 in bf16 (attnc inspect; bench/results/): every
# config below pipelines its K/V loads (num_stages >= 2) and none of the forward and dQ configs spills.
# Dropped: forward 128x64 with 4 warps (176 B of spill), 128x128 with 3 stages (229 KB of shared memory,
# at the sm_90 limit). The two-pass general forward (softplus_reweight) keeps more row state: of these
# only 64x32 with 8 warps stays out of local memory there. dK/dV holds two [BLOCK_N, D] fp32 accumulators across the whole query walk: at
# D = 128 only BLOCK_N <= 64 with 8 warps (or 32x32 with 4) stays out of local memory; 64x64 and
# 16x128 spill 40-200 B and 32x128 with 4 warps 1.6 KB. Small spaces also keep autotuning quick.
CONFIGS = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2), (64, 64, 4, 3), (64, 32, 4, 4), (64, 32, 8, 3)],
    "dq": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 8, 3), (64, 32, 4, 3)],
    "dkdv": [(32, 64, 8, 3), (16, 64, 8, 2), (32, 32, 4, 2)],
}


def kernel_configs(kind: str) -> list:
    """Autotune space of one kernel kind: "fwd" (forward), "dq" (dQ and row adjoints), "dkdv".

    The interpreter gets one small config: autotuning there would only multiply the (slow) interpreted
    runs. ATTNC_AUTOTUNE=quick keeps only the default config (a correctness sweep on a GPU compiles
    each kernel once instead of once per config)."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    space = CONFIGS[kind]
    if os.environ.get("ATTNC_AUTOTUNE") == "quick":
        space = space[:1]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in space]


def query_tiles(Lq: int, kind: str = "dq") -> int:
    """The most query tiles (programs along Lq) any config of a kernel kind launches: the rows of a
    per-program buffer, whichever config autotuning picks."""
    smallest = min(config.kwargs["BLOCK_M"] for config in kernel_configs(kind))
    return triton.cdiv(Lq, smallest)


def decode_config(rows: int, page_size: int | None) -> dict:
    """Tiles and launch options of the split-KV decode kernel: BLOCK_M holds a KV group's query heads
    times the new queries (up to 64 rows a program), BLOCK_N divides the page size so that a key tile
    never straddles pages."""
    if interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}
    block_n = next(n for n in (64, 32, 16) if page_size is None or page_size % n == 0)
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 3}


def decode_splits(programs: int, capacity: int) -> int:
    """How many splits of each sequence's keys: enough programs to fill the GPU (two waves of its
    multiprocessors), but no split shorter than a few tiles. The interpreter splits tiny caches too,
    so the split-and-merge path is what the CPU tests exercise."""
    if interpreting():
        target, min_keys = 16, 16
    elif torch.cuda.is_available():
        target = 2 * torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        min_keys = 256
    else:  # compiled for a GPU on a machine without one (attnc inspect): an H100's 132 multiprocessors
        target, min_keys = 2 * 132, 256
    return max(1, min(triton.cdiv(target, programs), triton.cdiv(capacity, min_keys), 256))


def plan_blocks() -> tuple[int, int]:
    """Tile sizes of tile plans (query x key). The kernels' own tiles divide them: a plan tile is
    visited as (plan / block)^2 sub-tiles, so autotuning keeps its whole space. The interpreter's plan
    tiles are twice its kernel tiles, which keeps that sub-tiling under test on the CPU."""
    return (32, 32) if interpreting() else (128, 128)


# ---- a test hook: how many key tiles each forward program visits ----
_visit_log = None


class count_visits:
    """`with launch.count_visits() as log:` records, for every forward launch inside, a tensor
    [B * Hq, query tiles] of the key tiles each program visited (kernels built with the hook)."""

    def __enter__(self):
        global _visit_log
        self.log, self._outer = [], _visit_log
        _visit_log = self.log
        return self.log

    def __exit__(self, *exc):
        global _visit_log
        _visit_log = self._outer


def visit_buffer(q: torch.Tensor, size: int):
    return None if _visit_log is None else torch.full((size,), -1, dtype=torch.int32, device=q.device)


def record_visits(buffer, programs_per_column: int):
    if buffer is None or _visit_log is None:
        return
    written = int((buffer >= 0).sum())
    _visit_log.append(buffer[:written].view(programs_per_column, -1).cpu())
