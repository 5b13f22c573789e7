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
# Speed decides, measured on a GPU (bench/gpu_check.py); without one, the sm_90 compile at D = 128 in
# bf16 (attnc inspect: tensor-core widths, spill) narrows the space. A wide tile with a little spill beats
# a narrow one with none: wgmma's N is the tile's key (or query) width, so a 16- or 32-wide tile runs
# most tensor-core instructions at a quarter or half of their width.
# - fwd: 128 x 64 with 8 warps, as FlexAttention and the Triton tutorial at D = 128. Dropped: 128 x 64
#   with 4 warps (176 B of spill), 128 x 128 with 3 stages (229 KB of shared memory, the sm_90 limit).
# - dq: 128 queries x 64 keys, 8 warps, 3 stages (FlexAttention's dQ at D = 128): no spill.
# - dkdv: 64 queries x 128 keys, 8 warps, 3 stages (FlexAttention's dK/dV; BLOCK_M is the query tile,
#   BLOCK_N the key tile a program owns): its two fp32 [128, D] accumulators fit in registers because the
#   head loop is a constexpr (GROUP) and FULL tiles load without length masks. Then narrower fallbacks.
CONFIGS = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2), (64, 64, 4, 3), (64, 32, 4, 4), (64, 32, 8, 3)],
    "dq": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (64, 64, 8, 3), (64, 32, 4, 3)],
    "dkdv": [(64, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3), (32, 128, 8, 3), (32, 64, 8, 3)],
}
# The largest tile side of any config: lengths that are its multiples are multiples of every tile.
LARGEST_TILE = max(max(bm, bn) for space in CONFIGS.values() for bm, bn, _, _ in space)


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


def lengths_divide_tiles(Lq: int, Lk: int) -> bool:
    """DIVISIBLE: Lq and Lk are multiples of every tile size of every config (the interpreter's one
    16 x 16 config included), so no tile is cut by a length and the kernels drop those tiles' loops."""
    largest = 16 if interpreting() else LARGEST_TILE
    return Lq % largest == 0 and Lk % largest == 0


def lse_base2(lse: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp as the backward kernels read it: in base 2 (p = exp2(score2 - lse2)) and +inf on
    rows with no key, so that their p = exp2(-inf) = 0 without a test per tile."""
    return torch.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634).contiguous()  # log2(e)


def sum_head_groups(per_head: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hq, L, D] -> [B, groups, L, D]: the sum over the query heads h with floor(h * groups / Hq)
    == g, for groups that do not divide Hq (or outnumber it: groups no head reads are 0). Deterministic:
    the heads of a group are added in order, one gather per position in the group."""
    B, Hq = per_head.shape[:2]
    first = (torch.arange(groups, device=per_head.device) * Hq + groups - 1) // groups  # h_first of each g
    size = (torch.arange(1, groups + 1, device=per_head.device) * Hq + groups - 1) // groups - first
    out = per_head.new_zeros((B, groups) + per_head.shape[2:])
    for j in range(int(size.max()) if groups else 0):
        valid = size > j
        picked = per_head[:, torch.where(valid, first + j, 0).clamp(max=Hq - 1)]
        out += torch.where(valid.view(1, -1, *([1] * (per_head.dim() - 2))), picked, 0.0)
    return out


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
