"""Tile-plan build time and memory on the CPU: attnc's planner beside FlexAttention's create_block_mask.

    python bench/plan_bench.py                       # markdown table on stdout
    python bench/plan_bench.py --out bench/results/$(date +%F)-plan-cpu.md

For sliding_window, document, neighborhood_2d, radial and moa at L = 16K, 64K, 256K and 1M (2**20)
tokens, one batch entry, 8 query heads, 128 x 128 tiles (FlexAttention's default block). Each case runs
in a fresh subprocess, so one case's memory cannot hide another's:
- time: the median of --runs builds after one warm-up build, or one build when the warm-up took over
  a second (scalar-only plans are cached by the generated module; the bench empties that cache before
  every build, so it times builds, not lookups);
- memory: the peak resident set during the first build minus the resident set just before it, read
  from /proc/self/status after resetting the peak (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0).

FlexAttention (torch.nn.attention.flex_attention.create_block_mask, eager, device="cpu") evaluates the
mask on every (query, key) pair, so its time and memory grow as L**2. It first runs at L = 4K; a
larger L up to --flex-max (16K by default: 64K needs tens of GB) runs only where that probe, scaled by
L**2, predicts it fits in half the machine's memory and in the time limit. Sizes not run get that
estimate. Both build the same tile classification, so the table also checks that they visit the same
tiles.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HEADS = 8
BLOCK = 128
SIZES = [1 << 14, 1 << 16, 1 << 18, 1 << 20]
FLEX_PROBE = 1 << 12  # FlexAttention's first size: its cost there, times (L / 4K)**2, predicts the rest
SPECS = ["sliding_window", "document", "neighborhood_2d", "radial", "moa"]

# -- the specs, their consts scaled to the length (texts from examples/*.attn) -----------------------

SLIDING_WINDOW = """\
attention sliding_window
param window = 256
mask kv <= q and q - kv < window
"""
DOCUMENT = """\
attention document
input doc_ids: int[B, L]
mask doc_ids[b, q] == doc_ids[b, kv] and kv <= q
"""
NEIGHBORHOOD_2D = """\
attention neighborhood_2d
const Y = {side}, X = {side}, KY = 7, KX = 7
let (qy, qx) = unravel(q, Y, X)
let (ky, kx) = unravel(kv, Y, X)
let left_y = KY // 2
let right_y = KY // 2 + KY % 2 - 1
let left_x = KX // 2
let right_x = KX // 2 + KX % 2 - 1
let cy = clamp(qy, left_y, Y - 1 - right_y)
let cx = clamp(qx, left_x, X - 1 - right_x)
mask cy - left_y <= ky <= cy + right_y and cx - left_x <= kx <= cx + right_x
"""
RADIAL = """\
attention radial
const F = {frames}, T = {tokens}
let (fi, r) = unravel(q, F, T)
let (fj, c) = unravel(kv, F, T)
let dist = abs(fi - fj)
let w = T if dist <= 1 else T >> floor(log2(dist))
mask fj == 0 or abs(r - c) <= w
"""
MOA = """\
attention moa
input band: int[Hq]
mask kv <= q and (kv < 64 or q - kv < band[h])
"""
FRAME_TOKENS = 1024  # radial: frames of 32 x 32 latent tokens, L / 1024 frames
DOCUMENTS = 16  # document: this many documents of random lengths per sequence


def spec_text(name: str, L: int) -> str:
    if name == "neighborhood_2d":
        return NEIGHBORHOOD_2D.format(side=math.isqrt(L))  # a square image of L tokens
    if name == "radial":
        return RADIAL.format(frames=L // FRAME_TOKENS, tokens=FRAME_TOKENS)
    return {"sliding_window": SLIDING_WINDOW, "document": DOCUMENT, "moa": MOA}[name]


def inputs(name: str, L: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    if name == "document":  # DOCUMENTS documents: cut points drawn at random, ids in runs
        cuts = torch.randperm(L - 1, generator=g)[:DOCUMENTS - 1] + 1
        starts = torch.zeros(L, dtype=torch.long)
        starts[cuts] = 1
        return {"doc_ids": starts.cumsum(0)[None, :]}
    if name == "moa":  # MoA's bands are fractions of the length, different per head
        return {"band": torch.randint(L // 64, L // 4, (HEADS,), generator=g)}
    return {}


def mask_mod(name: str, L: int, values: dict):
    """The same mask as the spec, as FlexAttention's mask_mod(b, h, q_idx, kv_idx)."""
    import torch

    if name == "sliding_window":
        return lambda b, h, q, kv: (kv <= q) & (q - kv < 256)
    if name == "document":
        doc_ids = values["doc_ids"]
        return lambda b, h, q, kv: (doc_ids[b, q] == doc_ids[b, kv]) & (kv <= q)
    if name == "moa":
        band = values["band"]
        return lambda b, h, q, kv: (kv <= q) & ((kv < 64) | (q - kv < band[h]))
    if name == "neighborhood_2d":
        side = math.isqrt(L)

        def nbhd(b, h, q, kv):
            cy, cx = torch.clamp(q // side, 3, side - 4), torch.clamp(q % side, 3, side - 4)
            return ((kv // side - cy).abs() <= 3) & ((kv % side - cx).abs() <= 3)

        return nbhd
    T = FRAME_TOKENS

    def radial(b, h, q, kv):
        dist = (q // T - kv // T).abs()
        halvings = torch.floor(torch.log2(dist.clamp(min=1).float())).long()
        w = torch.where(dist <= 1, T, torch.bitwise_right_shift(torch.full_like(dist, T), halvings))
        return (kv // T == 0) | ((q % T - kv % T).abs() <= w)

    return radial


# -- one case, in a fresh process ---------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure(build, runs: int) -> dict:
    """Peak memory of the first build (MB above the resident set before it), then the median time."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    before = _status_kb("VmRSS")
    start = time.perf_counter()
    result = build()
    peak_mb = (_status_kb("VmHWM") - before) / 1024
    if time.perf_counter() - start > 1.0:
        runs = 1  # slow builds vary little against their length: keep the bench within minutes
    times = []
    for _ in range(runs):
        del result
        gc.collect()
        start = time.perf_counter()
        result = build()
        times.append((time.perf_counter() - start) * 1e3)
    return {"ms": statistics.median(times), "peak_mb": peak_mb, "result": result}


def run_attnc(name: str, L: int, runs: int) -> dict:
    import torch

    import attnc

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.attn")
        with open(path, "w") as f:
            f.write(spec_text(name, L))
        fn = attnc.load(path)
    module = sys.modules[fn.__module__]
    values = inputs(name, L)

    def build():
        getattr(module, "_PLAN_CACHE", {}).clear()  # time the build, not a cached plan
        return fn.plan(Lq=L, Lk=L, B=1, Hq=HEADS, block_m=BLOCK, block_n=BLOCK, **values)

    out = measure(build, runs)
    plan = out.pop("result")
    out.update(visited=plan.tiles_visited, total=plan.tiles_total, full=plan.tiles_full,
               density=plan.density)
    return out


def run_flex(name: str, L: int, runs: int) -> dict:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    torch.set_num_threads(os.cpu_count() or 1)
    values = inputs(name, L)
    # a mask that reads no head index is planned once, as attnc plans it once for every head
    heads = HEADS if name == "moa" else 1
    mod = mask_mod(name, L, values)
    out = measure(lambda: create_block_mask(mod, 1, heads, L, L, device="cpu", BLOCK_SIZE=BLOCK), runs)
    mask = out.pop("result")
    full = int(mask.full_kv_num_blocks.sum()) if mask.full_kv_num_blocks is not None else 0
    out.update(visited=int(mask.kv_num_blocks.sum()) + full, full=full)
    return out


def run_case(impl: str, name: str, L: int, runs: int, timeout: float) -> dict:
    """One case in a fresh interpreter; a failure or timeout is a row, never the end of the bench."""
    cmd = [sys.executable, __file__, "--case", impl, name, str(L), "--runs", str(runs)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return {"error": last[:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the table ---------------------------------------------------------------------------------------


def memory_gb() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 2**20  # MemTotal, in kB


def machine() -> str:
    model, cores = platform.processor() or "unknown CPU", os.cpu_count()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        cores = sum(line.startswith("processor") for line in lines)
    except (OSError, StopIteration):
        pass
    import torch

    load = os.getloadavg()[0]  # other work on the machine slows every number in the table
    return (f"{model}, {cores} cores, {memory_gb():.0f} GB RAM, load average {load:.1f} at the start; "
            f"Linux {platform.release()}; torch {torch.__version__}")


def size_label(L: int) -> str:
    return f"{L >> 20}M" if L >= 1 << 20 else f"{L >> 10}K"


def flex_cell(name: str, L: int, flex: dict) -> str:
    got = flex.get((name, L))
    if got is not None and "error" not in got:
        return f"{got['ms']:.0f} | {got['peak_mb']:.0f}"
    ran = [size for (n, size), r in flex.items() if n == name and "error" not in r]
    if not ran:
        return (f"failed: {got['error']}" if got else "not run") + " | —"
    size = max(ran)
    need_gb = flex[(name, size)]["peak_mb"] * (L / size) ** 2 / 1024  # every (q, kv) pair: memory ~ L**2
    need_s = flex[(name, size)]["ms"] * (L / size) ** 2 / 1e3
    why = f"failed ({got['error']})" if got else "not run"
    return f"{why}: needs ~{need_gb:,.0f} GB, ~{need_s:,.0f} s | —"


def flex_fits(probe: dict, L: int, runs: int, timeout: float) -> bool:
    """Whether the L = 4K probe, scaled by L**2, predicts a run in half the memory and in time."""
    if "error" in probe:
        return False
    growth = (L / FLEX_PROBE) ** 2
    return probe["peak_mb"] * growth / 1024 < memory_gb() / 2 and probe["ms"] * growth * (runs + 1) / 1e3 < timeout


def table(rows: dict, flex: dict, sizes, specs) -> str:
    out = [("| spec | L | attnc ms | attnc peak MB | tiles visited / total | density | FlexAttention ms | "
            "FlexAttention peak MB | same tiles |"),
           "|---|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for name in specs:
        for L in sizes:
            a = rows[(name, L)]
            f = flex.get((name, L))
            if "error" in a:
                cells = f"failed: {a['error']} | — | — | —"
                same = "—"
            else:
                cells = f"{a['ms']:.1f} | {a['peak_mb']:.1f} | {a['visited']:,} / {a['total']:,} | {a['density']:.4f}"
                same = "—" if f is None or "error" in f else ("yes" if f["visited"] == a["visited"] else
                                                              f"no ({f['visited']:,})")
            out.append(f"| {name} | {size_label(L)} | {cells} | {flex_cell(name, L, flex)} | {same} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", default=",".join(SPECS))
    ap.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    ap.add_argument("--runs", type=int, default=3, help="timed builds per case, after one warm-up")
    ap.add_argument("--flex-max", type=int, default=1 << 14, help="largest L given to create_block_mask")
    ap.add_argument("--flex-runs", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=60, help="seconds per case")
    ap.add_argument("--out", help="also write the table (with the machine and date) to this file")
    ap.add_argument("--case", nargs=3, metavar=("IMPL", "SPEC", "L"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:  # inside the per-case subprocess
        impl, name, L = args.case
        result = (run_attnc if impl == "attnc" else run_flex)(name, int(L), args.runs)
        print(json.dumps(result))
        return
    specs, sizes = args.specs.split(","), [int(s) for s in args.sizes.split(",")]
    rows, flex = {}, {}
    for name in specs:
        if args.flex_max >= FLEX_PROBE:
            flex[(name, FLEX_PROBE)] = probe = run_case("flex", name, FLEX_PROBE, args.flex_runs, args.timeout)
            print(f"{name} {size_label(FLEX_PROBE)}: flex {probe}", file=sys.stderr, flush=True)
        for L in sizes:
            rows[(name, L)] = run_case("attnc", name, L, args.runs, args.timeout)
            if FLEX_PROBE < L <= args.flex_max and flex_fits(probe, L, args.flex_runs, args.timeout):
                flex[(name, L)] = run_case("flex", name, L, args.flex_runs, args.timeout)
            print(f"{name} {size_label(L)}: attnc {rows[(name, L)]}  flex {flex.get((name, L), '-')}",
                  file=sys.stderr, flush=True)
    text = table(rows, flex, sizes, specs)
    header = (f"# Tile-plan build on the CPU: attnc vs FlexAttention create_block_mask\n\n"
              f"{datetime.date.today().isoformat()}; {machine()}.\n\n"
              f"One batch entry, {HEADS} query heads, {BLOCK} x {BLOCK} tiles. Time: median of {args.runs} "
              f"builds after a warm-up, 1 when the warm-up took over a second (FlexAttention: "
              f"{args.flex_runs}); memory: peak resident set above the "
              f"one before the first build. FlexAttention runs eagerly (device=\"cpu\") up to "
              f"L = {size_label(args.flex_max)} where its L = 4K run predicts it fits; elsewhere its cost is "
              f"that run's scaled by L**2. Each case may take {args.timeout:.0f} s. "
              f"Produced by `python bench/plan_bench.py`.\n\n")
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header + text + "\n")


if __name__ == "__main__":
    main()
