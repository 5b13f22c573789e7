"""A hand-written stand-in for a generated module, for tests/test_gpu_compile.py: two kernels whose
compiled form is known without attnc's templates.

- `_stream`: a row block of q against every key tile, `tl.dot` in a loop with unconditional loads, the
  shape Triton's software pipeliner handles: with 3 stages its loads become cp.async (sm_80) and its
  dot runs on tensor cores; with 1 stage the loads stay synchronous.
- `_forgiven`: calls a plain Python function (not @triton.jit). Triton's interpreter runs it as Python;
  the compiler rejects it. Only built when FIXTURE_BROKEN=1.
"""

import os

import torch
import triton
import triton.language as tl
from attnc.runtime import checks

SIGNATURE = checks.Signature(spec="fixture", params=(), tensors=(), heads={"q": "Hq", "k": "Hq", "v": "Hq"},
                             equal_lengths=True)


@triton.autotune(configs=[triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1),
                          triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=3)], key=["L"])
@triton.jit
def _stream(Q, K, O, L, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + offs_m[:, None] * D + offs_d[None, :])
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, L, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = tl.load(K + offs_n[:, None] * D + offs_d[None, :])
        acc += tl.dot(q, tl.trans(k))
    tl.store(O + offs_m[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], acc)


def twice(x):  # deliberately not @triton.jit
    return x * 2


@triton.jit
def _forgiven(X, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, twice(tl.load(X + offs)))


def fixture(q, k, v):
    L, D = q.shape[2], q.shape[3]
    out = torch.empty(L, 32, dtype=torch.float32)
    _stream[(L // 64,)](q, k, out, L, D, BLOCK_M=64)
    if os.environ.get("FIXTURE_BROKEN") == "1":
        _forgiven[(1,)](out, BLOCK=32)
    return q * 1.0 + v.sum() * 0.0 + k.sum() * 0.0
