"""GPU check: correctness of the examples on real hardware, then the benchmark tables.

    python bench/gpu_check.py [--budget 480] [--out FILE]   # on a CUDA machine
    python bench/gpu_check.py --dry-run --out /tmp/x.md     # every step on the CPU (Triton interpreter), tiny sizes

Sections, each with a share of the time budget (time a section leaves unused goes to the later ones):
1. verify (0.20): `attnc.verify` of the examples in bf16 (kernels vs the float64 reference, forward and
   backward), the benchmarked specs first. One autotune config per kernel (ATTNC_AUTOTUNE=quick).
2. speed (0.25): forward and forward+backward ms and TFLOP/s (counted on the unmasked work only) of attnc,
   `scaled_dot_product_attention` and FlexAttention (torch.compile'd, with its block mask) for full,
   causal, sliding_window, document, alibi and softcap at L = 4K and 16K, B*H chosen to fill the GPU;
   also the largest |attnc - Flex| of the forward outputs (a check that both compute the same variant),
   and the configuration the autotuner chose for each attnc kernel ("configs": BLOCK_M x BLOCK_N,
   warps, stages, e.g. `fwd 128x64 w8 s3; dq 128x64 w8 s3; dkdv 64x128 w8 s3`).
3. sparse (0.10): tier-2 masks (a 2-D neighbourhood, radial) at 16K beside FlexAttention with the same mask.
4. norm (0.10): the normalizations (tier 3) beside the softmax kernel with the same (causal) mask: time
   ratios against `causal`, with the design's targets (<= 1.3x for a normalization of one pass over the
   keys, e.g. softplus; <= 2x for one of two passes, softplus_reweight), and the chosen configs.
5. decode (0.15): `attn.decode` (split-KV, one new query, 32 query heads on 8 KV heads, bf16) for causal,
   sliding_window and streaming_sink on contiguous caches (causal also paged) at B = 1..64 and caches of
   4K-128K, beside SDPA (GQA, with the same mask): ms, and the K/V bytes the mask lets through per
   second against the H100's 3.35 TB/s (docs/decoding.md).
6. learn (0.05): trained biases (a learnable T5 bucket table, read per pair; a learnable key bias, read
   per key): forward+backward ms beside the same spec with the bias fixed (the cost of its gradient), and
   the gradient's largest relative error against the float64 reference at a small length.
7. varlen (0.05): packed ragged batches (bench/varlen_bench.py) at 64 x 512 and 1,000 x 64 tokens:
   `attn.varlen` of causal, one call of the document-mask spec on the packed sequence, and FlexAttention
   with a document block mask; launches per call, forward and forward+backward ms, and the largest
   |output - varlen's|. One autotune config per kernel (varlen autotunes each distinct longest length).
8. select (0.05): block top-k (examples/block_topk.attn, issue 20) at 16K (k_tiles 8 and 32) and 64K,
   forward and forward+backward ms beside the plain causal spec, with the time of choosing the tiles
   from q and k alone (its plan) and the tile density it keeps.
9. stats (0.05): statistics of the weights (`stat`, issue 20: received attention per key, entropy per row
   and its per-head total) on a causal spec: the call with return_stats=True (the two statistics passes
   after the forward; fwd+bwd also takes the entropy's gradient) beside the same call without, at 4K and
   16K; and decode with the per-key scores of the new queries (H2O's) beside plain decode.
10. linear (0.05): the chunked linear attention (`attn.algorithm == "chunked"`: linear_elu, lightning),
   forward and forward+backward ms at L = 4K and 16K (the speed section's B*H), beside
   flash-linear-attention's chunked kernels where `import fla` works (`chunk_linear_attn` on the features
   elu(x) + 1 applied by the caller, normalized; `chunk_simple_gla` with the constant per-head log-decay
   `g_gamma = log(decay)`), with the largest |attnc - fla| of the outputs; "n/a (fla not installed)"
   without it, and a call that fails (another fla version's signature) is a "FAILED" cell with its
   error in the note. attnc's rows of every length run first, fla's after them (its first call
   autotunes dozens of configs per kernel): each fla result fills in the attnc row it stands beside.

Robustness: each section runs in its own child process (a CUDA fault or a hung compile costs one row,
not the run); the child streams its rows to this process, which writes the Markdown table and a JSON of
the raw numbers after every row. A row that fails writes its error in the row (traceback on stderr); a
row still running when its section's time is up is killed and marked "timeout (budget)", the rows after
it "skipped (budget)". The dry run times with time.perf_counter and runs FlexAttention eagerly.
Exits 0 with a note when no CUDA device is present and --dry-run is not given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

T0 = time.monotonic()  # the budget counts from here: imports and CUDA start-up included
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
BENCH = ["causal", "full", "sliding_window", "document", "alibi", "softcap"]
# causal normalizations other than a plain softmax, timed against causal.attn (the same mask)
NORMALIZATIONS = ["sigmoid", "relu", "softplus", "softplus_reweight", "sink_softmax1", "temperature"]
# decoding: (spec, cache layout) at every decode shape
DECODE = [("causal", "contiguous"), ("causal", "paged"), ("sliding_window", "contiguous"),
          ("streaming_sink", "contiguous")]
HBM_BYTES_S = 3.35e12  # the H100's HBM bandwidth, the decode section's yardstick
SHARES = {"verify": 0.17, "speed": 0.25, "sparse": 0.08, "norm": 0.10, "decode": 0.15, "learn": 0.05,
          "varlen": 0.05, "select": 0.05, "stats": 0.05, "linear": 0.05}  # of the budget; they sum to 1
# the statistics section's spec: causal softmax returning received attention, entropy and its total
STATS_SPEC = ("attention stats_bench\nmask kv <= q\nstat received = sum_q(P)\nstat entropy = entropy(P)\n"
              "stat head_entropy = total(entropy(P))\n")
NORM_TARGETS = {1: 1.3, 2: 2.0}  # passes over the keys -> the largest time / causal's time
# chunked linear attention (attn.algorithm == "chunked") timed beside flash-linear-attention
LINEAR = ["linear_elu", "lightning"]
# the generated module's autotuned kernels: (label in the "configs" column, attribute)
KERNELS = (("fwd", "_fwd"), ("dq", "_bwd_dq"), ("dkdv", "_bwd_dkdv"), ("rows", "_bwd_rows"),
           ("rowstats", "_row_stats"), ("keystats", "_key_stats"))
# trained biases: (spec body, its bias input's name and shape from (B, H, L))
LEARNED = {
    "t5_table": (("const NB = 32, E = 8, MAXD = 128\ninput t5: float[Hq, NB] learnable\n"
                  "let mag(d) = abs(d) if abs(d) < E else min(E + floor(log2(max(abs(d), 1) / E) / log2(MAXD / E) "
                  "* (NB // 2 - E)), NB // 2 - 1)\nlet bucket(d) = mag(d) + (NB // 2 if d > 0 else 0)\n"
                  "mask kv <= q\nscore s + t5[h, bucket(q - kv)]\n"), "t5", lambda B, H, L: (H, 32)),
    "key_bias": ("input kb: float[B, Lk] learnable\nmask kv <= q\nscore s + kb[b, kv]\n", "kb",
                 lambda B, H, L: (B, L)),
}
MARK = "@@gpu_check "  # prefix of the lines a section's child sends to the parent


# ---------------------------------------------------------------- settings: the one GPU/CPU difference


@dataclass(frozen=True)
class Settings:
    """Everything the GPU run and the dry run do differently; the code of the sections is shared."""

    dry_run: bool
    device: str
    D: int
    speed_shapes: tuple  # (L, B, H) of the speed section
    norm_shapes: tuple  # (L, B, H) of the normalization section
    sparse_shape: tuple  # (L, B, H) of the sparse section
    sparse: tuple  # (name, grid arguments) of the sparse masks, sized to sparse_shape's L
    window: int  # sliding_window's window
    doc_len: int  # tokens per document
    verify: tuple  # example stems to verify, in order
    bench: tuple  # specs of the speed section
    compile_flex: bool  # torch.compile FlexAttention (GPU) or run it eagerly (CPU)
    flex_backward: bool  # FlexAttention has no backward on the CPU
    min_unit_s: float  # do not start a row with less time than this left in its section
    decode_shapes: tuple = ()  # (B, cache length) of the decode section
    learn_shapes: tuple = ()  # (L, B, H) of the learn section; its gradient check runs at L = learn_check_L
    learn_check_L: int = 512
    decode_heads: tuple = (32, 8)  # (Hq, Hk) of the decode section
    linear_shapes: tuple = ()  # (L, B, H) of the linear section
    select_shapes: tuple = ()  # (L, B, H, k_tiles) of the select section (block_topk.attn)
    stats_shapes: tuple = ()  # (L, B, H) of the stats section's calls
    stats_decode: tuple = ()  # (B, cache length) of its decode rows
    page_size: int = 256  # the paged cache's page size

    @staticmethod
    def make(dry_run: bool) -> Settings:
        if dry_run:
            # L = 96 for the sparse masks: 3 x 3 of the interpreter's 32 x 32 plan tiles, some skipped
            return Settings(True, "cpu", 32, ((16, 1, 2), (48, 1, 2)), ((32, 1, 2),), (96, 1, 1),
                            (("neighborhood_2d", (24, 4, 3)), ("radial", (3, 32))), window=12, doc_len=12,
                            verify=("causal", "softplus"), bench=tuple(BENCH), compile_flex=False, flex_backward=False,
                            min_unit_s=0.0, decode_shapes=((2, 48),), decode_heads=(4, 2), page_size=16,
                            learn_shapes=((40, 1, 2),), learn_check_L=24, linear_shapes=((40, 1, 2),),
                            select_shapes=((256, 1, 1, 1),), stats_shapes=((40, 1, 2),), stats_decode=((2, 48),))
        order = BENCH + NORMALIZATIONS + sorted(p.stem for p in EXAMPLES.glob("*.attn"))
        return Settings(False, "cuda", 128, ((4096, 8, 16), (16384, 1, 32)), ((4096, 8, 16), (16384, 1, 32)),
                        (16384, 1, 32), (("neighborhood_2d", (128, 128, 7)), ("radial", (16, 1024))),
                        window=256, doc_len=1024, verify=tuple(dict.fromkeys(order)), bench=tuple(BENCH), compile_flex=True,
                        flex_backward=True, min_unit_s=10.0,
                        decode_shapes=((1, 131072), (8, 32768), (32, 32768), (64, 4096)), decode_heads=(32, 8),
                        page_size=256, learn_shapes=((4096, 2, 16),), learn_check_L=512,
                        linear_shapes=((4096, 8, 16), (16384, 1, 32)),
                        select_shapes=((16384, 1, 32, 8), (16384, 1, 32, 32), (65536, 1, 8, 16)),
                        stats_shapes=((4096, 8, 16), (16384, 1, 32)), stats_decode=((8, 32768), (64, 4096)))

    # -- timing: the warm-up call (compile + autotune) timed apart, then the steady state
    def sync(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def warm(self, fn) -> float:
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def time_ms(self, fn, grads=()) -> float:
        if not self.dry_run:
            import triton.testing

            return triton.testing.do_bench(fn, warmup=10, rep=50, grad_to_none=list(grads) or None)
        times = []
        for _ in range(1):  # the interpreter is slow: one call after the warm-up
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def flex(self):
        import torch
        from torch.nn.attention.flex_attention import flex_attention

        if not self.compile_flex:
            return flex_attention
        for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):  # one compile per score/mask function: many
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 256))
        return torch.compile(flex_attention, dynamic=False)

    def block_mask(self, mask_mod, B, L):
        from torch.nn.attention.flex_attention import create_block_mask

        return None if mask_mod is None else create_block_mask(mask_mod, B, None, L, L, device=self.device)

    def qkv(self, B, H, L, seed=0):
        import torch

        torch.manual_seed(seed)
        return [torch.randn(B, H, L, self.D, device=self.device, dtype=torch.bfloat16, requires_grad=True)
                for _ in range(3)]


# ---------------------------------------------------------------- the variants and their baselines


def _unmasked(name, L, s: Settings) -> float:
    """Fraction of the L x L scores that a mask keeps (exact), for the FLOP count."""
    if name == "full":
        return 1.0
    if name == "sliding_window":
        w = min(s.window, L)
        return (w * (w + 1) / 2 + (L - w) * w) / (L * L)
    if name == "document":
        sizes = [min(s.doc_len, L - start) for start in range(0, L, s.doc_len)]
        return sum(n * (n + 1) / 2 for n in sizes) / (L * L)
    return (L + 1) / (2 * L)  # causal


def case_inputs(name, L, B, H, s: Settings):
    """The spec's inputs, FlexAttention's mask_mod and score_mod, SDPA's arguments (None: SDPA cannot)."""
    import torch

    kw, mask, score, sdpa = {}, None, None, None
    causal = lambda b, h, q, kv: kv <= q
    if name == "full":
        sdpa = {}
    if name in ("causal", "alibi", "softcap"):
        mask = causal
        sdpa = {"is_causal": True} if name == "causal" else None
    if name == "sliding_window":
        w = s.window
        kw = {"window": w}
        mask = lambda b, h, q, kv: (kv <= q) & (q - kv < w)
    if name == "document":
        doc = (torch.arange(L, device=s.device) // s.doc_len)[None].expand(B, L).contiguous()
        kw = {"doc_ids": doc}
        mask = lambda b, h, q, kv: (doc[b, q] == doc[b, kv]) & (kv <= q)
    if name == "alibi":
        slopes = torch.rand(H, device=s.device)
        kw = {"slopes": slopes}
        score = lambda x, b, h, q, kv: x - slopes[h] * (q - kv)
    if name == "softcap":
        kw = {"cap": 50.0}
        score = lambda x, b, h, q, kv: 50.0 * torch.tanh(x / 50.0)
    return kw, mask, score, sdpa


def sparse_spec(name, grid):
    """A tier-2 mask sized to the benchmark (the examples' consts scaled) and its FlexAttention mask_mod."""
    import torch

    if name == "neighborhood_2d":
        Y, X, K = grid
        r = K // 2
        text = (f"attention neighborhood_2d_{Y}x{X}\nconst Y = {Y}, X = {X}, K = {K}\n"
                "let (qy, qx) = unravel(q, Y, X)\nlet (ky, kx) = unravel(kv, Y, X)\n"
                "let cy = clamp(qy, K // 2, Y - 1 - K // 2)\nlet cx = clamp(qx, K // 2, X - 1 - K // 2)\n"
                "mask abs(ky - cy) <= K // 2 and abs(kx - cx) <= K // 2\n")
        mask = lambda b, h, q, kv: (((kv // X - (q // X).clamp(r, Y - 1 - r)).abs() <= r)
                                    & ((kv % X - (q % X).clamp(r, X - 1 - r)).abs() <= r))
        return text, mask
    if name == "radial":
        F, T = grid
        text = (f"attention radial_{F}x{T}\nconst F = {F}, T = {T}\n"
                "let (fi, r) = unravel(q, F, T)\nlet (fj, c) = unravel(kv, F, T)\nlet dist = abs(fi - fj)\n"
                "let w = T if dist <= 1 else T >> floor(log2(dist))\nmask fj == 0 or abs(r - c) <= w\n")

        def mask(b, h, q, kv):
            dist = (q // T - kv // T).abs()
            shift = torch.floor(torch.log2(dist.clamp(min=1).float())).int()
            width = torch.where(dist <= 1, T, torch.full_like(shift, T) >> shift)
            return (kv // T == 0) | ((q % T - kv % T).abs() <= width)

        return text, mask
    raise ValueError(name)


# ---------------------------------------------------------------- sections: columns and rows


COLUMNS = {  # key, header, format of a number
    "verify": [("spec", "spec", None), ("dtype", "dtype", None), ("result", "result", None),
               ("worst", "worst error (case tensor err/tol)", None), ("seconds", "s", "{:.1f}")],
    "speed": [("spec", "spec", None), ("L", "L", None), ("BH", "B*H", None), ("pass", "pass", None),
              ("attnc_ms", "attnc ms", "{:.3f}"), ("sdpa_ms", "SDPA ms", "{:.3f}"), ("flex_ms", "Flex ms", "{:.3f}"),
              ("attnc_tflops", "attnc TFLOP/s", "{:.1f}"), ("vs_sdpa", "SDPA/attnc", "{:.2f}x"),
              ("vs_flex", "Flex/attnc", "{:.2f}x"), ("diff_flex", "max abs(attnc - Flex)", "{:.1e}"),
              ("attnc_warm_s", "attnc warm s", "{:.1f}"), ("flex_warm_s", "Flex warm s", "{:.1f}"),
              ("configs", "configs", None)],
    "sparse": [("spec", "spec", None), ("L", "L", None), ("BH", "B*H", None), ("density", "tile density", "{:.4f}"),
               ("pass", "pass", None), ("attnc_ms", "attnc ms", "{:.3f}"), ("flex_ms", "Flex ms", "{:.3f}"),
               ("vs_flex", "Flex/attnc", "{:.2f}x"), ("diff_flex", "max abs(attnc - Flex)", "{:.1e}"),
               ("attnc_warm_s", "attnc warm s", "{:.1f}"), ("flex_warm_s", "Flex warm s", "{:.1f}"),
               ("configs", "configs", None)],
    "norm": [("spec", "spec", None), ("L", "L", None), ("BH", "B*H", None), ("passes", "passes", None),
             ("pass", "pass", None), ("attnc_ms", "ms", "{:.3f}"), ("causal_ms", "causal ms", "{:.3f}"),
             ("ratio", "ratio", "{:.2f}x"), ("target", "target", "<= {}x"), ("ok", "ok", None),
             ("configs", "configs", None)],
    "learn": [("spec", "spec", None), ("L", "L", None), ("BH", "B*H", None), ("pass", "pass", None),
              ("attnc_ms", "learnable ms", "{:.3f}"), ("fixed_ms", "fixed ms", "{:.3f}"),
              ("ratio", "learnable/fixed", "{:.2f}x"), ("grad_err", "bias grad rel. err (fp32, small L)", "{:.1e}")],
    "decode": [("spec", "spec", None), ("layout", "cache", None), ("B", "B", None), ("cache", "cache len", None),
               ("attnc_ms", "attnc ms", "{:.3f}"), ("sdpa_ms", "SDPA ms", "{:.3f}"), ("vs_sdpa", "SDPA/attnc", "{:.2f}x"),
               ("attnc_gbs", "attnc GB/s", "{:.0f}"), ("hbm_pct", "% of 3.35 TB/s", "{:.0f}"),
               ("diff_sdpa", "max abs(attnc - SDPA)", "{:.1e}")],
    "select": [("spec", "spec", None), ("L", "L", None), ("BH", "B*H", None), ("k_tiles", "k_tiles", None),
               ("density", "tile density", "{:.4f}"), ("pass", "pass", None), ("plan_ms", "plan ms", "{:.3f}"),
               ("attnc_ms", "select ms", "{:.3f}"), ("causal_ms", "causal ms", "{:.3f}"),
               ("vs_causal", "causal/select", "{:.2f}x"), ("attnc_warm_s", "select warm s", "{:.1f}"),
               ("configs", "configs", None)],
    "varlen": [("spec", "method", None), ("sequences", "sequences", None), ("tokens", "tokens", None),
               ("pass", "pass", None), ("launches", "launches per call", None), ("ms", "ms", "{:.3f}"),
               ("warm_s", "warm s", "{:.1f}"), ("diff", "max abs(out - varlen)", "{:.1e}")],
    "stats": [("spec", "call", None), ("L", "L or cache len", None), ("BH", "B*H", None), ("pass", "pass", None),
              ("attnc_ms", "with stats ms", "{:.3f}"), ("plain_ms", "plain ms", "{:.3f}"),
              ("ratio", "with stats/plain", "{:.2f}x"), ("attnc_warm_s", "with stats warm s", "{:.1f}"),
              ("configs", "configs", None)],
    "linear": [("spec", "spec", None), ("L", "L", None), ("BH", "B*H", None), ("pass", "pass", None),
               ("attnc_ms", "attnc ms", "{:.3f}"), ("fla_ms", "fla ms", "{:.3f}"), ("vs_fla", "fla/attnc", "{:.2f}x"),
               ("diff_fla", "max abs(attnc - fla)", "{:.1e}"), ("out_max", "max abs(attnc)", "{:.1e}"),
               ("attnc_warm_s", "attnc warm s", "{:.1f}"),
               ("fla_warm_s", "fla warm s", "{:.1f}"), ("configs", "configs", None)],
}
TITLES = {
    "verify": "Correctness (bf16 kernels vs float64 reference; one autotune config per kernel)",
    "speed": "Speed (bf16; ms, and TFLOP/s on the unmasked work; ratios: baseline time / attnc time)",
    "sparse": "Sparse masks (bf16; both plan once, outside the timed calls)",
    "norm": "Normalizations vs the causal softmax kernel (bf16; ratio = time / causal's time)",
    "decode": "Decoding (bf16, one new query, split-KV; GB/s = K/V bytes the mask keeps / attnc time)",
    "learn": "Trained biases (bf16; the cost of a learnable bias's gradient, and its error)",
    "varlen": ("Packed ragged batches (bench/varlen_bench.py: attn.varlen, one document-mask call, FlexAttention "
               "with a document block mask; bf16 on a GPU, one autotune config)"),
    "select": ("Block top-k (block_topk.attn, bf16; select ms includes choosing the tiles from q and k at every "
               "call, plan ms alone; beside the plain causal spec: causal time / select time)"),
    "stats": ("Statistics of the weights (bf16; a causal spec's received attention per key, entropy per row and "
              "its total with return_stats=True, beside the same call without; fwd+bwd adds the entropy's gradient; "
              "decode: the new queries' scores per cached key)"),
    "linear": ("Linear attention, chunked (bf16; beside flash-linear-attention's chunked kernels, the "
               "feature map applied by the caller; ratio: fla time / attnc time)"),
}


def units(section: str, s: Settings) -> list[tuple[str, tuple]]:
    """The rows of work of a section, in order: (label, arguments). Cheap: no kernels are loaded."""
    if section == "verify":
        return [(name, (name,)) for name in s.verify]
    if section == "speed":  # each spec at every L in turn: the second L reuses the compiled kernels
        return [(f"{name} L={L}", (name, L, B, H)) for name in s.bench for L, B, H in s.speed_shapes]
    if section == "sparse":
        return [(name, (name, grid)) for name, grid in s.sparse]
    if section == "norm":
        return [(f"{name} L={L}", (name, L, B, H)) for L, B, H in s.norm_shapes for name in NORMALIZATIONS]
    if section == "decode":
        return [(f"{name} {layout} B={B} cache={C}", (name, layout, B, C)) for B, C in s.decode_shapes
                for name, layout in DECODE]
    if section == "learn":
        return [(f"{name} L={L}", (name, L, B, H)) for L, B, H in s.learn_shapes for name in LEARNED]
    if section == "varlen":
        return [(f"{method} {n}x{mean}", (method, n, mean)) for n, mean in _varlen_bench().Settings.make(
            "dry" if s.dry_run else "gpu").cases for method in _varlen_bench().METHODS]
    if section == "select":
        return [(f"block_topk L={L} k_tiles={n}", (L, B, H, n)) for L, B, H, n in s.select_shapes]
    if section == "stats":
        return ([(f"stats L={L} {pass_}", ("call", L, B, H, pass_)) for L, B, H in s.stats_shapes
                 for pass_ in ("fwd", "fwd+bwd")]
                + [(f"stats decode B={B} cache={C}", ("decode", C, B, 0, "fwd")) for B, C in s.stats_decode])
    if section == "linear":  # attnc at every length first; fla's rows (slow first calls) fill in its cells
        return [(f"{name} L={L}" + (" (fla)" if fla else ""), (name, L, B, H, fla)) for fla in (False, True)
                for L, B, H in s.linear_shapes for name in LINEAR]
    raise ValueError(section)


def run_verify(s: Settings, emit, name):
    import torch

    from attnc import load
    from attnc.verify import verify_variant

    path = EXAMPLES / f"{name}.attn"
    start = time.perf_counter()
    attn = load(path)
    if not attn.has_kernels:
        emit({"spec": name, "dtype": "bf16", "result": "reference only", "seconds": time.perf_counter() - start})
        return
    rows = verify_variant(path, attn, dtype=torch.bfloat16, device=s.device)
    worst = max(rows, key=lambda r: r.error / r.tolerance if math.isfinite(r.error) else math.inf)
    ok = all(r.ok for r in rows)
    emit({"spec": name, "dtype": "bf16", "result": "ok" if ok else "MISMATCH",
          "worst": f"{worst.case} {worst.tensor} {worst.error:.2e}/{worst.tolerance:.0e}",
          "seconds": time.perf_counter() - start,
          "rows": [asdict(r) for r in rows]})


def _time_runs(s: Settings, runs: dict, pass_: str, do, grads, row: dict, notes: list):
    """Warm and time each of `runs` for one pass; a failing baseline is noted, a failing attnc raises."""
    for who, fn in runs.items():
        if fn is None:
            row[f"{who}_ms"] = "n/a"
            continue
        call = fn if pass_ == "fwd" else (lambda fn=fn: fn().backward(do))
        try:
            row[f"{who}_warm_s"] = s.warm(call)
            row[f"{who}_ms"] = s.time_ms(call, grads)
        except Exception as err:
            if who == "attnc":
                raise
            traceback.print_exc()
            row[f"{who}_ms"] = "FAILED"
            notes.append(f"{who} {pass_}: {_short(err)}")


def _config_text(config) -> str:
    """`128x64 w8 s3` (BLOCK_M x BLOCK_N, warps, stages) of a triton.Config."""
    kw = dict(getattr(config, "kwargs", None) or {})
    tile = f"{kw.pop('BLOCK_M')}x{kw.pop('BLOCK_N')}" if "BLOCK_M" in kw and "BLOCK_N" in kw else ""
    rest = " ".join(f"{k}={v}" for k, v in sorted(kw.items()))
    parts = [tile, rest, f"w{getattr(config, 'num_warps', '?')}", f"s{getattr(config, 'num_stages', '?')}"]
    return " ".join(x for x in parts if x)


def kernel_configs(attn, kinds=None) -> str:
    """The configuration each of the generated module's autotuned kernels ran with last, e.g.
    `fwd 128x64 w8 s3; dq 128x64 w8 s3; dkdv 64x128 w8 s3`; `-` where none can be read (a module
    without those kernels, an attribute that moved). Read after the timed calls: `best_config` is the
    config of the latest call (the one config itself where there is nothing to tune: the interpreter,
    ATTNC_AUTOTUNE=quick). `kinds`: the labels to report (default all of KERNELS)."""
    try:
        module = sys.modules[attn.__module__]
    except Exception:  # noqa: BLE001 -- no module to read: the column says "-"
        return "-"
    parts = []
    for label, name in KERNELS:
        if kinds is not None and label not in kinds:
            continue
        try:
            tuner = getattr(module, name, None)
            config = getattr(tuner, "best_config", None)
            if config is None and len(getattr(tuner, "configs", None) or ()) == 1:
                config = tuner.configs[0]
            if config is not None:
                parts.append(f"{label} {_config_text(config)}")
        except Exception:  # noqa: BLE001 -- Triton internals moved: this kernel is left out
            traceback.print_exc()
    return "; ".join(parts) or "-"


def _flex_diff(attn_fn, flex_fn, notes):
    """Largest |attnc - Flex| of the forward outputs (after the timing: the warm-up stays the first call)."""
    import torch

    try:
        with torch.no_grad():
            return (attn_fn().float() - flex_fn().float()).abs().max().item()
    except Exception as err:  # noqa: BLE001 -- noted in the row, traceback on stderr
        traceback.print_exc()
        notes.append(f"flex diff: {_short(err)}")
        return None


def run_speed(s: Settings, emit, name, L, B, H):
    import torch

    from attnc import load

    attn = load(EXAMPLES / f"{name}.attn")
    q, k, v = s.qkv(B, H, L)
    kw, mask, score, sdpa = case_inputs(name, L, B, H, s)
    if name == "document":  # both plan outside the timed calls, as a model would once per batch
        kw["plan"] = attn.plan(Lq=L, Lk=L, B=B, Hq=H, device=s.device, **kw)
    do = torch.randn_like(q)
    flex, notes = s.flex(), []
    try:
        block_mask = s.block_mask(mask, B if name == "document" else None, L)
    except Exception as err:  # noqa: BLE001 -- FlexAttention cannot build this mask: attnc still runs
        traceback.print_exc()
        notes.append(f"flex block mask: {_short(err)}")
        flex = None
    fq, fk, fv = (q, k, v) if s.flex_backward else (x.detach() for x in (q, k, v))
    attn_fn = lambda: attn(q, k, v, **kw)
    flex_fn = None if flex is None else (lambda: flex(fq, fk, fv, score_mod=score, block_mask=block_mask))
    sdpa_fn = None if sdpa is None else (lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, **sdpa))
    flops = 4 * B * H * L * L * s.D * _unmasked(name, L, s)
    for pass_, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
        row, row_notes = {"spec": name, "L": L, "BH": B * H, "pass": pass_}, list(notes)
        runs = {"attnc": attn_fn, "sdpa": sdpa_fn,
                "flex": flex_fn if pass_ == "fwd" or s.flex_backward else None}
        if flex_fn is not None and runs["flex"] is None:
            row_notes.append("Flex has no backward on the CPU")
        _time_runs(s, {w: f for w, f in runs.items() if f is not None or w != "sdpa"}, pass_, do, (q, k, v),
                   row, row_notes)
        ms = row["attnc_ms"]
        row["attnc_tflops"] = flops * mult / (ms * 1e-3) / 1e12
        for who in ("sdpa", "flex"):
            if isinstance(row.get(f"{who}_ms"), float):
                row[f"vs_{who}"] = row[f"{who}_ms"] / ms
        if pass_ == "fwd" and isinstance(row.get("flex_ms"), float):
            row["diff_flex"] = _flex_diff(attn_fn, flex_fn, row_notes)
        row["configs"] = kernel_configs(attn, ("fwd",) if pass_ == "fwd" else None)
        row["note"] = "; ".join(row_notes)
        emit(row)


def run_sparse(s: Settings, emit, name, grid):
    import torch

    from attnc import load

    L, B, H = s.sparse_shape
    text, mask = sparse_spec(name, grid)
    path = Path(tempfile.mkdtemp(prefix="gpu_check_")) / f"{name}_{L}.attn"
    path.write_text(text)
    attn = load(path)
    plan = attn.plan(Lq=L, Lk=L, B=B, Hq=H, device=s.device)
    q, k, v = s.qkv(B, H, L)
    do = torch.randn_like(q)
    notes = []
    flex = s.flex()
    try:
        block_mask = s.block_mask(mask, None, L)
    except Exception as err:  # noqa: BLE001 -- noted in the row, traceback on stderr
        traceback.print_exc()
        notes.append(f"flex block mask: {_short(err)}")
        flex = None
    fq, fk, fv = (q, k, v) if s.flex_backward else (x.detach() for x in (q, k, v))
    attn_fn = lambda: attn(q, k, v, plan=plan)
    flex_fn = None if flex is None else (lambda: flex(fq, fk, fv, block_mask=block_mask))
    for pass_ in ("fwd", "fwd+bwd"):
        row, row_notes = {"spec": name, "L": L, "BH": B * H, "density": plan.density, "pass": pass_}, list(notes)
        runs = {"attnc": attn_fn, "flex": flex_fn if pass_ == "fwd" or s.flex_backward else None}
        if flex_fn is not None and runs["flex"] is None:
            row_notes.append("Flex has no backward on the CPU")
        _time_runs(s, runs, pass_, do, (q, k, v), row, row_notes)
        if isinstance(row.get("flex_ms"), float):
            row["vs_flex"] = row["flex_ms"] / row["attnc_ms"]
        if pass_ == "fwd" and isinstance(row.get("flex_ms"), float):
            row["diff_flex"] = _flex_diff(attn_fn, flex_fn, row_notes)
        row["configs"] = kernel_configs(attn, ("fwd",) if pass_ == "fwd" else None)
        row["note"] = "; ".join(row_notes)
        emit(row)


def run_select(s: Settings, emit, L, B, H, k_tiles):
    """Block top-k against the plain causal spec at one size: the whole call (the tiles chosen from q
    and k every time, as a model runs it) and the choice alone (plan)."""
    import torch

    from attnc import load

    attn, causal = load(EXAMPLES / "block_topk.attn"), load(EXAMPLES / "causal.attn")
    q, k, v = s.qkv(B, H, L)
    do = torch.randn_like(q)
    kw = {"k_tiles": k_tiles}
    plan_fn = lambda: attn.plan(Lq=L, Lk=L, B=B, Hq=H, device=s.device, q=q, k=k, **kw)
    density = plan_fn().density
    s.warm(plan_fn)
    plan_ms = s.time_ms(plan_fn)
    for pass_ in ("fwd", "fwd+bwd"):
        row, notes = {"spec": "block_topk", "L": L, "BH": B * H, "k_tiles": k_tiles, "density": density,
                      "pass": pass_, "plan_ms": plan_ms}, []
        runs = {"attnc": lambda: attn(q, k, v, **kw), "causal": lambda: causal(q, k, v)}
        _time_runs(s, runs, pass_, do, (q, k, v), row, notes)
        if isinstance(row.get("causal_ms"), float):
            row["vs_causal"] = row["causal_ms"] / row["attnc_ms"]
        row["configs"] = kernel_configs(attn, ("fwd",) if pass_ == "fwd" else None)
        row["note"] = "; ".join(notes)
        emit(row)


def run_stats(s: Settings, emit, call, L, B, H, pass_):
    """The call with return_stats=True beside the call without (the statistics' two passes, and in
    fwd+bwd the entropy's gradient: the timed output adds the entropy to o, so do reaches both); decode
    with the new queries' statistics (received attention per cached key) beside plain decode."""
    import torch

    from attnc.build import load_text

    attn = load_text(STATS_SPEC)
    if call == "decode":
        Hq, Hk = s.decode_heads
        torch.manual_seed(0)
        q = torch.randn(B, Hq, 1, s.D, device=s.device, dtype=torch.bfloat16)
        k_cache, v_cache = (torch.randn(B, Hk, L, s.D, device=s.device, dtype=torch.bfloat16) for _ in range(2))
        lengths = torch.full((B,), L, dtype=torch.int32, device=s.device)
        row, notes, do, grads = {"spec": "decode", "L": L, "BH": B * Hq, "pass": pass_}, [], None, ()
        runs = {"attnc": lambda: attn.decode(q, k_cache, v_cache, lengths, return_stats=True)[0],
                "plain": lambda: attn.decode(q, k_cache, v_cache, lengths)}
    else:
        q, k, v = s.qkv(B, H, L)
        do, grads = torch.randn_like(q), (q, k, v)

        def with_stats():
            o, stats = attn(q, k, v, return_stats=True)
            return o + stats.entropy[..., None].to(o.dtype)

        row, notes = {"spec": "call", "L": L, "BH": B * H, "pass": pass_}, []
        runs = {"attnc": with_stats, "plain": lambda: attn(q, k, v)}
    _time_runs(s, runs, pass_, do, grads, row, notes)
    if isinstance(row.get("plain_ms"), float):
        row["ratio"] = row["attnc_ms"] / row["plain_ms"]
    if call != "decode":
        row["configs"] = kernel_configs(attn, ("fwd", "rowstats", "keystats") if pass_ == "fwd" else None)
    row["note"] = "; ".join(notes)
    emit(row)


def _passes(path):
    """Passes over the keys of a normalization (compiler internals: None if they moved)."""
    try:
        from attnc.pipeline import analyse, compile_file

        return analyse(compile_file(path)).rows.passes
    except Exception:  # noqa: BLE001 -- passes shown as "?", traceback on stderr
        traceback.print_exc()
        return None


def run_norm(s: Settings, emit, name, L, B, H):
    import torch

    from attnc import load

    path = EXAMPLES / f"{name}.attn"
    attn, causal = load(path), load(EXAMPLES / "causal.attn")
    passes = _passes(path)
    target = NORM_TARGETS.get(passes, max(NORM_TARGETS.values()))
    q, k, v = s.qkv(B, H, L)
    do = torch.randn_like(q)
    kw = {"temp": torch.rand(H, device=s.device) + 0.5} if name == "temperature" else {}
    for pass_ in ("fwd", "fwd+bwd"):
        row, notes = {"spec": name, "L": L, "BH": B * H, "passes": passes if passes else "?", "pass": pass_}, []
        runs = {"attnc": lambda: attn(q, k, v, **kw), "causal": lambda: causal(q, k, v)}
        _time_runs(s, runs, pass_, do, (q, k, v), row, notes)
        if isinstance(row.get("causal_ms"), float):
            row["ratio"] = row["attnc_ms"] / row["causal_ms"]
            row["target"] = target
            row["ok"] = "yes" if row["ratio"] <= target else "NO"
        # the normalization's kernels (the causal kernel's are in the speed table)
        row["configs"] = kernel_configs(attn, ("fwd",) if pass_ == "fwd" else None)
        row["note"] = "; ".join(notes)
        emit(row)


def run_decode(s: Settings, emit, name, layout, B, C):
    """attn.decode of one new query per sequence against a full cache of C keys, beside SDPA (GQA)."""
    import torch

    from attnc import load

    attn = load(EXAMPLES / f"{name}.attn")
    (Hq, Hk), D = s.decode_heads, s.D
    torch.manual_seed(0)
    q = torch.randn(B, Hq, 1, D, device=s.device, dtype=torch.bfloat16)
    k, v = (torch.randn(B, Hk, C, D, device=s.device, dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.full((B,), C, device=s.device, dtype=torch.int32)
    window, sinks = min(s.window, C), 4
    kw = {"window": window} if name == "sliding_window" else {"sinks": sinks, "window": window} \
        if name == "streaming_sink" else {}
    keys = torch.arange(C, device=s.device)
    keep = {"causal": None, "sliding_window": keys >= C - window,
            "streaming_sink": (keys < sinks) | (keys >= C - window)}[name]
    visible = C if keep is None else int(keep.sum())
    table = None
    k_cache, v_cache = k, v
    if layout == "paged":  # the same keys in pages stored in a random order
        P = s.page_size
        n = B * C // P
        perm = torch.randperm(n, device=s.device)
        k_cache, v_cache = (torch.empty((n, Hk, P, D), device=s.device, dtype=x.dtype) for x in (k, v))
        for store, x in ((k_cache, k), (v_cache, v)):
            store[perm] = x.view(B, Hk, C // P, P, D).permute(0, 2, 1, 3, 4).reshape(n, Hk, P, D)
        table = perm.view(B, C // P).to(torch.int32)
    attn_fn = lambda: attn.decode(q, k_cache, v_cache, lengths, block_table=table, **kw)
    sdpa_mask = None if keep is None else keep[None, None, None, :]
    sdpa_fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, enable_gqa=True)
    row, notes = {"spec": name, "layout": layout, "B": B, "cache": C}, []
    with torch.no_grad():
        _time_runs(s, {"attnc": attn_fn, "sdpa": sdpa_fn}, "fwd", None, (), row, notes)
        try:
            row["diff_sdpa"] = (attn_fn().float() - sdpa_fn().float()).abs().max().item()
        except Exception as err:  # noqa: BLE001 -- noted in the row, traceback on stderr
            traceback.print_exc()
            notes.append(f"sdpa diff: {_short(err)}")
    ms = row["attnc_ms"]
    row["attnc_gbs"] = B * Hk * visible * D * 2 * 2 / (ms * 1e-3) / 1e9  # K and V, bf16
    row["hbm_pct"] = 100 * row["attnc_gbs"] * 1e9 / HBM_BYTES_S
    if isinstance(row.get("sdpa_ms"), float):
        row["vs_sdpa"] = row["sdpa_ms"] / ms
    row["note"] = "; ".join(notes)
    emit(row)


def _load_learned(name: str, learnable: bool):
    """The spec LEARNED[name], with its bias learnable or fixed, compiled from a temporary file."""
    from attnc import load

    body = LEARNED[name][0] if learnable else LEARNED[name][0].replace(" learnable", "")
    path = Path(tempfile.mkdtemp()) / f"{name}{'' if learnable else '_fixed'}.attn"
    path.write_text(f"attention {path.stem}\n{body}")
    return load(path)


def run_learn(s: Settings, emit, name, L, B, H):
    import torch

    attn, fixed = _load_learned(name, True), _load_learned(name, False)
    bias_name, shape = LEARNED[name][1], LEARNED[name][2]
    q, k, v = s.qkv(B, H, L)
    bias = (0.1 * torch.randn(shape(B, H, L), device=s.device)).requires_grad_(True)
    do = torch.randn_like(q)
    row, notes = {"spec": name, "L": L, "BH": B * H, "pass": "fwd+bwd"}, []
    runs = {"attnc": lambda: attn(q, k, v, **{bias_name: bias}),
            "fixed": lambda: fixed(q, k, v, **{bias_name: bias.detach()})}
    _time_runs(s, runs, "fwd+bwd", do, (q, k, v, bias), row, notes)
    if isinstance(row.get("fixed_ms"), float):
        row["ratio"] = row["attnc_ms"] / row["fixed_ms"]
    # the bias's gradient against the float64 reference, in fp32 at a small length
    n = s.learn_check_L
    qs, ks, vs = (x.detach()[:, :, :n].float() for x in (q, k, v))
    small = bias.detach()[..., :n] if name == "key_bias" else bias.detach()
    dos = do[:, :, :n].float()
    leaf = small.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(attn(qs, ks, vs, **{bias_name: leaf}), (leaf,), dos)
    leaf64 = small.double().requires_grad_(True)
    (ref,) = torch.autograd.grad(attn.reference(qs.double(), ks.double(), vs.double(), **{bias_name: leaf64}),
                                 (leaf64,), dos.double())
    row["grad_err"] = ((got.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-6)).item()
    row["note"] = "; ".join(notes)
    emit(row)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def fla_baseline(name, q, k, v, kw):
    """flash-linear-attention's chunked kernel for examples/{name}.attn, on leaves of its own in fla's layout
    [B, T, H, D] holding the values of q, k, v ([B, H, L, D]). Returns (fn, leaves, None), fn() giving the
    output [B, T, H, D]; or (None, (), cell) when fla is not installed. An fla that imports but lacks the
    function raises here; version differences that the signature shows (head_first, g_gamma) are followed,
    and a call that fails anyway raises in the timing (a FAILED cell, never a crash of the section)."""
    import inspect

    import torch

    try:
        import fla  # noqa: F401
    except ModuleNotFoundError as err:
        if (err.name or "fla").split(".")[0] == "fla":
            return None, (), "n/a (fla not installed)"
        raise  # fla is there but one of its dependencies is not: a FAILED cell, with the name in the note

    def params(fn):
        try:
            return inspect.signature(fn).parameters
        except (TypeError, ValueError):
            return {}

    leaves = tuple(x.detach().transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v))
    fq, fk, fv = leaves
    if name == "linear_elu":  # elu(x) + 1 by the caller; normalized (fla's scale cancels: pass 1)
        from fla.ops.linear_attn import chunk_linear_attn as fn

        layout = {"head_first": False} if "head_first" in params(fn) else {}
        phi = lambda x: torch.nn.functional.elu(x) + 1
        return (lambda: _first(fn(phi(fq), phi(fk), fv, scale=1.0, normalize=True, **layout))), leaves, None
    if name == "lightning":  # decay[h] ** (q - kv) * s: a constant per-head log-decay
        from fla.ops.simple_gla import chunk_simple_gla as fn

        found = params(fn)
        layout = {"head_first": False} if "head_first" in found else {}
        log_decay = torch.log(kw["decay"].float())
        B, T, H = fq.shape[:3]
        gate = {"g_gamma": log_decay} if "g_gamma" in found else \
            {"g": log_decay.view(1, 1, H).expand(B, T, H).contiguous()}  # older fla: a gate per position
        scale = q.shape[-1] ** -0.5
        return (lambda: _first(fn(fq, fk, fv, scale=scale, **gate, **layout))), leaves, None
    raise ValueError(f"no fla baseline for {name}")


def _linear_chunk(device) -> str:
    """The chunk of attnc's linear kernels (not autotuned), for the configs column."""
    try:
        from attnc.runtime import linear

        return f"chunk {linear.chunk_size(device)} (not autotuned)"
    except Exception:  # noqa: BLE001 -- internals moved: the column says "-"
        traceback.print_exc()
        return "-"


def run_linear(s: Settings, emit, name, L, B, H, fla):
    """attnc's chunked kernels (fla=False), or flash-linear-attention's beside them (fla=True): its rows
    carry the attnc rows' "key", and the parent fills them into those rows."""
    import torch

    from attnc import load

    attn = load(EXAMPLES / f"{name}.attn")
    if getattr(attn, "algorithm", None) != "chunked":
        raise RuntimeError(f"{name}: attn.algorithm is {getattr(attn, 'algorithm', None)!r}, not 'chunked'")
    q, k, v = s.qkv(B, H, L)
    # lightning's decays 1 - 1/32 .. 1 - 1/512 over the heads (outputs of a few units, not growing with L)
    kw = {"decay": 1 - 2.0 ** -torch.linspace(5, 9, H, device=s.device)} if name == "lightning" else {}
    do = torch.randn_like(q)
    attn_fn = lambda: attn(q, k, v, **kw)
    base, notes = {"spec": name, "L": L, "BH": B * H}, []
    if not fla:
        for pass_ in ("fwd", "fwd+bwd"):
            row, row_notes = {"key": f"{name} {L} {pass_}", **base, "pass": pass_}, []
            _time_runs(s, {"attnc": attn_fn}, pass_, do, (q, k, v), row, row_notes)
            if pass_ == "fwd":
                with torch.no_grad():
                    row["out_max"] = attn_fn().float().abs().max().item()
            row["configs"] = _linear_chunk(s.device)
            row["note"] = "; ".join(row_notes)
            emit(row)
        return
    fn, leaves, cell = None, (), None
    try:
        fn, leaves, cell = fla_baseline(name, q, k, v, kw)
    except Exception as err:  # noqa: BLE001 -- another fla: a FAILED cell, traceback on stderr
        traceback.print_exc()
        cell = "FAILED"
        notes.append(f"fla: {_short(err)}")
    do_t = do.transpose(1, 2).contiguous()  # fla's layout
    for pass_ in ("fwd", "fwd+bwd"):
        row, row_notes = {"key": f"{name} {L} {pass_}", **base, "pass": pass_}, list(notes)
        if fn is None:
            row["fla_ms"] = cell
        else:
            _time_runs(s, {"fla": fn}, pass_, do_t, leaves, row, row_notes)
            if pass_ == "fwd" and isinstance(row.get("fla_ms"), float):
                try:
                    with torch.no_grad():
                        row["diff_fla"] = (attn_fn().float() - fn().transpose(1, 2).float()).abs().max().item()
                except Exception as err:  # noqa: BLE001 -- noted in the row, traceback on stderr
                    traceback.print_exc()
                    row_notes.append(f"fla diff: {_short(err)}")
        row["note"] = "; ".join(row_notes)
        emit(row)


def _varlen_bench():
    """bench/varlen_bench.py, beside this script."""
    import importlib.util

    if "varlen_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("varlen_bench", Path(__file__).with_name("varlen_bench.py"))
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look it up there
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules["varlen_bench"]


def run_varlen(s: Settings, emit, method, sequences, mean):
    bench = _varlen_bench()
    # one config per kernel: varlen autotunes every distinct longest length (max_seqlen) anew
    os.environ["ATTNC_AUTOTUNE"] = "quick"
    for row in bench.measure(method, sequences, mean, bench.Settings.make("dry" if s.dry_run else "gpu")):
        emit({"spec": method, **{k: v for k, v in row.items() if k != "method"}})


RUNNERS = {"verify": run_verify, "speed": run_speed, "sparse": run_sparse, "norm": run_norm, "decode": run_decode,
           "learn": run_learn, "varlen": run_varlen, "select": run_select, "linear": run_linear,
           "stats": run_stats}


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


# ---------------------------------------------------------------- the child: one section's rows


def child_main(section: str, start: int, s: Settings) -> int:
    """Run the rows of `section` from `start` on, sending each to the parent. After a failed row on a
    GPU the child exits (its CUDA context may be broken) and the parent starts a fresh one."""

    def send(obj):
        sys.stdout.write(MARK + json.dumps(obj, default=str) + "\n")
        sys.stdout.flush()

    for index, (label, args) in enumerate(units(section, s)[start:], start):
        try:
            RUNNERS[section](s, lambda row, unit=index: send({"row": row, "unit": unit}), *args)
            send({"done": index})
        except Exception as err:  # noqa: BLE001 -- noted in the row, traceback on stderr
            print(f"gpu_check: {section} {label} failed:", file=sys.stderr)
            traceback.print_exc()
            send({"row": {"spec": label, "note": f"FAILED: {_short(err)}"}, "unit": index})
            send({"done": index})
            if not s.dry_run:
                return 3
    return 0


# ---------------------------------------------------------------- the parent: budget, report, children


class Report:
    """The tables so far, written as Markdown and JSON after every row."""

    def __init__(self, path: Path, meta: dict, sections: list[str]):
        self.path, self.meta = path, meta
        self.sections = {name: {"rows": [], "status": "not started", "budget_s": None, "used_s": None}
                         for name in sections}

    def add(self, section: str, row: dict):
        """Append `row`; a row whose "key" an earlier row of the section has fills in that row instead (the
        linear section's fla results beside attnc's)."""
        rows = self.sections[section]["rows"]
        same = [r for r in rows if row.get("key") is not None and r.get("key") == row["key"]]
        if same:
            target = same[0]
            notes = [n for n in (target.get("note"), row.get("note")) if n]
            target.update({k: v for k, v in row.items() if k != "note"})
            target["note"] = "; ".join(notes)
            for who in ("sdpa", "flex", "fla"):
                if isinstance(target.get(f"{who}_ms"), float) and isinstance(target.get("attnc_ms"), float):
                    target[f"vs_{who}"] = target[f"{who}_ms"] / target["attnc_ms"]
        else:
            rows.append(row)
        self.write()

    def write(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(self.markdown())
        os.replace(tmp, self.path)
        data = {"meta": self.meta, "sections": self.sections}
        self.path.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))

    def markdown(self) -> str:
        m = self.meta
        dry = "; DRY RUN on the CPU (Triton interpreter)" if m["dry_run"] else ""
        lines = [f"# attnc GPU check — {m['card']} — {m['date']}", "",
                 (f"torch {m['torch']}, triton {m['triton']}, Python {m['python']}, fla {m.get('fla', '?')}; "
                  f"budget {m['budget_s']} s; "
                  f"autotune: {m['autotune']} (verify: quick){dry}"), "",
                 ("Ratios are baseline time / attnc time (> 1 means attnc is faster), except in the normalization "
                  "table (time / causal's time). \"warm s\": the first call (compile, autotune)."), ""]
        for name, sec in self.sections.items():
            cols = COLUMNS[name] + [("note", "note", None)]
            used = f"{sec['used_s']:.0f} s" if sec["used_s"] is not None else "-"
            budget = f"{sec['budget_s']:.0f} s" if sec["budget_s"] is not None else "-"
            lines += [f"## {TITLES[name]}", "", f"({sec['status']}; used {used} of {budget})", "",
                      "| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
            for row in sec["rows"]:
                lines.append("| " + " | ".join(_cell(row.get(key), fmt) for key, _, fmt in cols) + " |")
            lines.append("")
        if m.get("total_s") is not None:
            lines.append(f"(total {m['total_s']:.0f} s)")
        return "\n".join(lines) + "\n"


def _cell(value, fmt) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float) and fmt:
        return fmt.format(value) if math.isfinite(value) else str(value)
    if isinstance(value, (int, float)) and fmt and "x" in fmt:
        return fmt.format(value)
    return str(value).replace("|", "/").replace("\n", " ")


def _reader(stream, out: queue.Queue):
    for line in stream:
        out.put(line)
    out.put(None)


def _kill(child: subprocess.Popen):
    """End the child and whatever it started (inductor's compile workers): its own process group."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        child.kill()
    child.wait()


def run_section(section: str, s: Settings, args, report: Report, deadline: float) -> None:
    labels = [label for label, _ in units(section, s)]
    sec = report.sections[section]
    started = time.monotonic()
    sec["budget_s"] = deadline - started
    sec["status"] = "running"
    index = 0
    env = dict(os.environ)
    env["ATTNC_AUTOTUNE"] = "quick" if section == "verify" else args.autotune
    if s.dry_run:
        env["TRITON_INTERPRET"] = "1"
    barren = 0  # children in a row that died before finishing any row: the section cannot run
    while index < len(labels) and barren < 2:
        if deadline - time.monotonic() <= s.min_unit_s:
            break
        first = index
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", section, "--start", str(index)]
        if s.dry_run:
            cmd.append("--dry-run")
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_reader, args=(child.stdout, lines), daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:  # out of time in the middle of a row
                _kill(child)
                report.add(section, {"spec": labels[index], "note": "timeout (budget)"})
                print(f"gpu_check: {section} {labels[index]}: timeout (budget)", file=sys.stderr, flush=True)
                index += 1
                break
            if line is None:  # the child ended
                code = child.wait()
                if code not in (0, 3) and index < len(labels):  # it died inside a row
                    report.add(section, {"spec": labels[index], "note": f"FAILED: the process died (exit {code})"})
                    print(f"gpu_check: {section} {labels[index]}: process died (exit {code})", file=sys.stderr)
                    index += 1
                elif code == 0:
                    index = max(index, len(labels))
                barren = barren + 1 if code not in (0, 3) and index == first + 1 else 0
                break
            if not line.startswith(MARK):
                print(line, end="", flush=True)
                continue
            msg = json.loads(line[len(MARK):])
            if "row" in msg:
                report.add(section, msg["row"])
                print(f"[{section}] " + " ".join(f"{k}={_cell(v, None)}" for k, v in msg["row"].items()
                                                  if k != "rows"), flush=True)
            if "done" in msg:
                index = msg["done"] + 1
    why = "FAILED: not run, the section's process died twice before finishing a row" if barren >= 2 else \
        "skipped (budget)"
    for label in labels[index:]:
        report.add(section, {"spec": label, "note": why})
    skipped = len(labels) - index
    sec["used_s"] = time.monotonic() - started
    sec["status"] = "done" if not skipped else f"{skipped} of {len(labels)} rows {why.split(':')[0]}"
    report.write()


def _card(s: Settings) -> str:
    import torch

    if s.dry_run:
        return f"CPU {platform.machine()} ({os.cpu_count()} cores), dry run"
    return torch.cuda.get_device_name()


def _fla_version() -> str:
    """flash-linear-attention's version from its metadata (nothing is imported: fla starts CUDA)."""
    import importlib.util
    from importlib import metadata

    for dist in ("fla-core", "flash-linear-attention"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        return "(version unknown)" if importlib.util.find_spec("fla") else "not installed"
    except (ImportError, ValueError):
        return "not installed"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU, tiny sizes")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all sections (default 480)")
    parser.add_argument("--out", type=Path, help="Markdown file (a .json beside it); default $OUT/gpu_check.md")
    parser.add_argument("--sections", default=",".join(SHARES), help="comma-separated subset of " + ",".join(SHARES))
    parser.add_argument("--autotune", choices=("full", "quick"), default="full",
                        help="autotuning of the timed sections (verify always uses quick)")
    parser.add_argument("--verify-specs", help="comma-separated examples to verify (default: all, benchmarked first)")
    parser.add_argument("--speed-specs", help="comma-separated specs of the speed table (default: " + ",".join(BENCH) + ")")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the first import of triton
    s = Settings.make(args.dry_run)
    # --verify-specs / --speed-specs reach the section processes through the environment
    for option, env, field in ((args.verify_specs, "ATTNC_GPU_VERIFY", "verify"), (args.speed_specs, "ATTNC_GPU_SPEED", "bench")):
        if option:
            os.environ[env] = option
        if os.environ.get(env):
            s = replace(s, **{field: tuple(x for x in os.environ[env].split(",") if x)})
    if args.child:
        return child_main(args.child, args.start, s)

    import torch
    import triton

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to run (--dry-run runs every step on the CPU)")
        return 0
    sections = [x for x in args.sections.split(",") if x]
    unknown = [x for x in sections if x not in SHARES]
    if unknown:
        parser.error(f"unknown sections {unknown}")
    card = _card(s)
    date = datetime.date.today().isoformat()
    out = args.out or (Path(os.environ["OUT"]) / "gpu_check.md" if os.environ.get("OUT") else
                       ROOT / "bench" / "results" / f"{date}-{card.replace(' ', '-')}.md")
    meta = {"card": card, "date": date, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "fla": _fla_version(), "budget_s": args.budget,
            "autotune": args.autotune, "dry_run": args.dry_run, "settings": {k: v for k, v in asdict(s).items()}, "total_s": None}
    print(f"gpu_check: {card}; torch {torch.__version__}, triton {triton.__version__}, "
          f"Python {platform.python_version()}; {datetime.datetime.now().isoformat(timespec='seconds')}; "
          f"writing {out}", flush=True)
    report = Report(out, meta, sections)
    report.write()
    start = T0
    end = start + args.budget
    for i, section in enumerate(sections):
        weight = sum(SHARES[x] for x in sections[i:])
        deadline = time.monotonic() + max(end - time.monotonic(), 0) * SHARES[section] / weight
        run_section(section, s, args, report, deadline)
    meta["total_s"] = time.monotonic() - start
    report.write()
    print(report.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
