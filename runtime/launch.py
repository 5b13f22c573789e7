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


def _quick_knob(space_of):
    """`ATTNC_AUTOTUNE=quick` keeps only the first config of the autotune space: one compile per
    kernel, for correctness runs (bench/gpu_check.py's verify step) where autotuning would only cost
    time. Read when a generated module is imported (its kernels' decorators call kernel_configs)."""

    def configs(kind: str) -> list:
        space = space_of(kind)
        return space[:1] if os.environ.get("ATTNC_AUTOTUNE", "") == "quick" else space

    configs.__doc__ = space_of.__doc__
    return configs


@_quick_knob
def kernel_configs(kind: str) -> list:
    """Autotune space: tile sizes and warps for the forward ("fwd") and backward ("bwd") kernels.

    Tiles of 64-128 queries by 32-128 keys cover FlashAttention's sweet spots on Ampere/Hopper for head
    dims up to 128; more stages help the forward's K/V stream. The interpreter gets one small config:
    autotuning there would only multiply the (slow) interpreted runs.
    """
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    if kind == "fwd":
        space = [(bm, bn, w, st) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4)]
        keep = lambda bm, bn, w, st: not (bm == 128 and bn == 128 and st == 4) and not (bm == 64 and w == 8)
    else:
        space = [(bm, bn, w, st) for bm in (32, 64) for bn in (32, 64, 128) for w in (4, 8) for st in (1, 2)]
        keep = lambda bm, bn, w, st: bm * bn <= 64 * 64 * 2
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in space if keep(bm, bn, w, st)]


def reduce_row_grad(buffer: torch.Tensor, axes: tuple) -> torch.Tensor:
    """Per-row gradient partials [B, Hq, Lq] -> the gradient of an input with shape `axes`.

    A fixed-order sum: deterministic, unlike atomics."""
    position = {"B": 0, "Hq": 1, "Lq": 2, "L": 2}
    kept = [position[a] for a in axes]
    summed = tuple(d for d in range(3) if d not in kept)
    out = buffer.sum(dim=summed) if summed else buffer
    order = sorted(range(len(kept)), key=lambda i: kept[i])  # out's dims are in increasing position
    return out.permute(*[order.index(i) for i in range(len(kept))]) if len(kept) > 1 else out


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
