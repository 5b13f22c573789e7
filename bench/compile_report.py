"""Compile every example's kernels for sm_90 (and sm_80) on the CPU and write a markdown report.

    python bench/compile_report.py [-o bench/results/DATE-sm90.md] [--sm80-configs 2] [--workers 2]

For each examples/*.attn: q, k, v in bf16 at head dim 128 and L = 1024 (or the length a token layout
fixes), every autotune config of every kernel the forward and backward launch, compiled for sm_90 with
Triton's bundled ptxas (`attnc.kernel_report`); then a shorter sm_80 section (the first few configs with at
least 2 stages). Per kernel the summary asks: does every config with >= 2 stages issue cp.async (are its
loads pipelined)? Is there a config that does not spill, and how few spill stores/loads (STL/LDL in the
SASS) does the best one have? Are its sm_90 wgmma wide (the range over configs of the share with
N >= 64)? Nothing runs on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import triton

from attnc import kernel_report

ROOT = Path(__file__).resolve().parent.parent


def _inspect_spec(spec: Path, configs: int | None, min_stages: int, sm80_configs: int):
    """(sm_90 rows or error, sm_80 rows or error) for one spec, in one child process."""
    requests = [kernel_report.request_for(spec, target=90, configs=configs, min_stages=min_stages, spread=True)]
    if sm80_configs:
        requests.append(kernel_report.request_for(spec, target=80, configs=sm80_configs, min_stages=2))
    try:
        results = kernel_report.run_requests(requests)
    except kernel_report.InspectError as err:
        results = [err] * len(requests)
    return results + [None] * (2 - len(results))


def _span(values: list) -> str:
    """"lo-hi" of the values ("lo" when equal), "-" when there are none."""
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def kernel_summary(rows: list) -> list[dict]:
    """Per kernel: configs compiled, and the answers to the questions of the report."""
    out = []
    for kernel in dict.fromkeys(r.kernel for r in rows):
        mine = [r for r in rows if r.kernel == kernel]
        ok = [r for r in mine if r.ok]
        staged = [r for r in ok if (r.num_stages or 1) >= 2]
        piped = [r for r in staged if r.cp_async > 0 or r.tma > 0]
        no_spill = [r for r in ok if not kernel_report.spills(r)]
        counted = [r for r in ok if r.spill_stores is not None]
        fewest = min(counted, key=lambda r: (r.spill_stores + r.spill_loads, r.spill_bytes or 0), default=None)
        out.append({
            "kernel": kernel,
            "compiled": f"{len(ok)}/{len(mine)}",
            "pipelined": "n/a" if not staged else ("yes" if len(piped) == len(staged) else
                                                     f"no ({len(piped)}/{len(staged)})"),
            "no_spill": f"yes ({len(no_spill)}/{len(ok)})" if no_spill else "no",
            "regs": f"{min(r.registers for r in ok)}-{max(r.registers for r in ok)}"
            if ok and all(r.registers is not None for r in ok) else "-",
            "tensor_core": "yes" if ok and all(r.tensor_core > 0 for r in ok) else "no",
            # the spill traffic of the least-spilling config: 0/0 when one does not spill
            "stl_ldl": "-" if fewest is None else f"{fewest.spill_stores}/{fewest.spill_loads}",
            "wide": _span([r.wide_percent for r in ok if r.wgmma]),
        })
    return out


def _markdown_table(header: list[str], lines: list[list[str]]) -> str:
    text = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    text += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(text)


def _rows_table(rows: list) -> str:
    return _markdown_table(list(kernel_report.COLUMNS), [kernel_report.table_cells(r) for r in rows])


def _section(title: str, results: dict, detail: bool) -> list[str]:
    parts = [f"## {title}", ""]
    summary = []
    for spec, rows in results.items():
        if isinstance(rows, Exception):
            summary.append([spec, "-", "-", "-", "-", "-", "-", "-", "-", str(rows).replace("|", "/")])
            continue
        for s in kernel_summary(rows):
            summary.append([spec, s["kernel"], s["compiled"], s["pipelined"], s["no_spill"], s["stl_ldl"], s["regs"],
                            s["tensor_core"], s["wide"], ""])
    parts.append(_markdown_table(["spec", "kernel", "configs compiled", "every >=2-stage config has cp.async",
                                  "a config without spill (of compiled)", "fewest STL/LDL", "regs",
                                  "tensor cores in every config", "wgmma wide % (N >= 64)", "note"], summary))
    parts.append("")
    for spec, rows in results.items():
        if isinstance(rows, Exception) or not rows:
            continue
        if detail:
            parts += [f"### {spec}", "", _rows_table(rows), ""]
        errors = [r for r in rows if r.error]
        for r in errors:
            parts.append(f"- {spec} {r.kernel} {r.tile} w{r.num_warps} s{r.num_stages} sm_{r.target}: `{r.error}`")
        if errors:
            parts.append("")
    return parts


def render(args, specs: list[Path], sm90: dict, sm80: dict, minutes: float) -> str:
    today = datetime.date.today().isoformat()
    done = f"{len(sm90)} of {len(specs)} specs" if len(sm90) < len(specs) else f"{len(specs)} specs"
    staged = "" if args.min_stages <= 1 else f" with >= {args.min_stages} stages"
    every = (f"every autotune config{staged}" if args.configs is None else
             f"{args.configs} autotune configs{staged} spread evenly over the kernel's list (first and last included)")
    parts = [
        f"# Kernels compiled for sm_90 and sm_80 on a CPU ({today})",
        "",
        (f"What: every kernel that each `examples/*.attn` launches in its forward and backward, under {every}, "
         "compiled for sm_90 (H100) with `triton.compile` and Triton's bundled ptxas by `attnc.kernel_report` "
         "(`bench/compile_report.py`); nothing ran on a GPU. Calls: q, k, v bf16 [B=2, H=4, L=1024, D=128] "
         "(L fixed by the spec's token layout where it has one), spec inputs made up as "
         "`attnc.kernel_report.make_inputs` describes, scalar params at their defaults."),
        "",
        (f"Triton {triton.__version__}; {done}; run time {minutes:.1f} min (wall) with {args.workers} worker "
         f"processes on {os.cpu_count()} CPU cores."),
        "",
        ("Columns: regs per thread; spill B = stack frame per thread (spilled registers); STL/LDL = spill "
         "stores/loads in the SASS; smem KB = shared memory; wgmma n16/32/64/128+ = wgmma.mma_async by N width "
         "(N < 32, < 64, < 128, >= 128); wide % = the share of wgmma with N >= 64; mma.sync = sm_80-style MMA "
         "instructions; cp.async = asynchronous global-to-shared copies (0: no load is pipelined); TMA = "
         "cp.async.bulk (tensor-descriptor) copies and reductions. See docs/inspect.md."),
        "",
        *([args.note, ""] if args.note else []),
    ]
    order = [spec.stem for spec in specs]

    def in_order(results):
        return {name: results[name] for name in order if name in results}

    parts += _section(f"sm_90, {every}", in_order(sm90), detail=True)
    if args.sm80_configs:
        parts += _section(f"sm_80, the first {args.sm80_configs} configs with >= 2 stages", in_order(sm80),
                          detail=False)
    return "\n".join(parts) + "\n"


def main() -> int:
    today = datetime.date.today().isoformat()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--out", default=str(ROOT / "bench" / "results" / f"{today}-sm90.md"))
    parser.add_argument("--sm80-configs", type=int, default=2, help="configs per kernel for sm_80 (0: none)")
    parser.add_argument("--configs", type=int,
                        help="sm_90: N configs per kernel, spread evenly over its list (default: all)")
    parser.add_argument("--min-stages", type=int, default=1, help="sm_90: only configs with this many stages")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--note", help="a paragraph for the report's head")
    parser.add_argument("specs", nargs="*", help="default: examples/*.attn")
    args = parser.parse_args()
    specs = [Path(s) for s in args.specs] or sorted((ROOT / "examples").glob("*.attn"))
    kernel_report.check_supported()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    start = time.time()
    sm90, sm80 = {}, {}
    with ThreadPoolExecutor(args.workers) as pool:  # each task waits on its own child process
        tasks = {pool.submit(_inspect_spec, spec, args.configs, args.min_stages, args.sm80_configs): spec for spec in specs}
        for task in as_completed(tasks):
            spec = tasks[task]
            sm90[spec.stem], sm80[spec.stem] = task.result()
            minutes = (time.time() - start) / 60
            out.write_text(render(args, specs, sm90, sm80, minutes))  # after each spec: a long run leaves a table
            print(f"{spec.stem}: done at {minutes:.1f} min ({len(sm90)}/{len(specs)})", file=sys.stderr, flush=True)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
