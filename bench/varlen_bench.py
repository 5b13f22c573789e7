"""Packed ragged batches: `attn.varlen` beside one call of the document-mask spec and FlexAttention.

    python bench/varlen_bench.py            # on a CUDA machine: 64 x 512 and 1,000 x 64 tokens, bf16
    python bench/varlen_bench.py --quick    # on the CPU (Triton interpreter): 1 x 16, 37 x 8, 1,000 x 4
    python bench/varlen_bench.py --dry-run  # every step at tiny sizes (CI: tests/test_varlen_bench.py)

A case is N sequences of random lengths around a mean (uniform in [1, 2 * mean - 1], seed fixed),
packed back to back into [total_tokens, H, D] (FlashAttention's varlen layout). The same tokens run
three ways, each causal within its sequence:
- varlen: examples/causal.attn's `attn.varlen(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len)`;
- document: examples/document.attn, one call on the whole packed sequence ([1, H, total, D]) with the
  tokens' sequence index as `doc_ids`, its tile plan built outside the timed calls (once per batch);
- flex: FlexAttention (torch.nn.attention.flex_attention) with a document block mask, built outside the
  timed calls; torch.compile'd on a GPU, eager on the CPU, where it has no backward.

Reported per call, forward and forward+backward: kernel launches (Triton launches counted at
JITFunction.run, or InterpretedFunction.run under TRITON_INTERPRET=1; on the CPU with the interpreter
off the eager reference runs and launches nothing; FlexAttention's inductor kernels are not counted),
milliseconds (the median of --reps calls after a warm-up; on the CPU the host time of the call, which
for attnc is the interpreter's), and the largest |output - varlen's| of the forward. One autotune config
per kernel (ATTNC_AUTOTUNE=quick unless set): varlen autotunes each distinct longest length anew.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
METHODS = ("varlen", "document", "flex")
PASSES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Settings:
    """Sizes and timing of one kind of run: (sequences, mean length) cases, heads, head dim, dtype."""

    cases: tuple
    heads: int
    head_dim: int
    dtype: str
    device: str
    reps: int  # timed calls per row (the median is reported) ...
    max_s: float  # ... or fewer, once a row's timed calls have taken this long (at least one)

    @staticmethod
    def make(kind: str) -> Settings:
        if kind == "gpu":
            return Settings(((64, 512), (1000, 64)), 16, 64, "bfloat16", "cuda", 10, 3.0)
        if kind == "quick":
            return Settings(((1, 16), (37, 8), (1000, 4)), 2, 16, "float32", "cpu", 3, 5.0)
        return Settings(((1, 4), (3, 3)), 2, 16, "float32", "cpu", 1, 0.0)  # dry run


@dataclass
class Batch:
    lengths: list
    q: object  # packed [total, H, D] leaves
    k: object
    v: object
    cu_seqlens: object  # int32 [N + 1]
    doc_ids: object  # int32 [1, total]: the sequence of every token


def lengths(sequences: int, mean: int, seed: int = 0) -> list[int]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 2 * mean, (sequences,), generator=generator).tolist()


def make_batch(sequences: int, mean: int, s: Settings) -> Batch:
    import torch

    sizes = lengths(sequences, mean)
    total = sum(sizes)
    torch.manual_seed(1)
    dtype = getattr(torch, s.dtype)
    q, k, v = (torch.randn(total, s.heads, s.head_dim, device=s.device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    counts = torch.tensor(sizes, device=s.device)
    cu = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    doc = torch.repeat_interleave(torch.arange(sequences, device=s.device), counts).to(torch.int32)[None]
    return Batch(sizes, q, k, v, cu, doc)


class count_launches:
    """`with count_launches() as n:` counts the Triton kernel launches inside (n.launches)."""

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        self.launches, self._saved = 0, []
        for cls in (JITFunction, InterpretedFunction):
            run = cls.run

            def counted(fn, *args, _run=run, **kwargs):
                if not kwargs.get("warmup", False):
                    self.launches += 1
                return _run(fn, *args, **kwargs)

            self._saved.append((cls, run))
            cls.run = counted
        return self

    def __exit__(self, *exc):
        for cls, run in self._saved:
            cls.run = run


def forward_of(method: str, batch: Batch, s: Settings):
    """`method`'s forward on the packed leaves (returning packed [total, H, D]) and whether it has a
    backward; what it prepares once per batch (the document plan, Flex's block mask) is built here."""
    import torch

    from attnc import load

    longest, total = max(batch.lengths), batch.q.shape[0]

    def heads_first(*xs):
        return [x.transpose(0, 1)[None] for x in xs]

    if method == "varlen":
        causal = load(EXAMPLES / "causal.attn")
        return (lambda: causal.varlen(batch.q, batch.k, batch.v, batch.cu_seqlens, batch.cu_seqlens, longest,
                                      longest)), True
    if method == "document":
        document = load(EXAMPLES / "document.attn")
        plan = document.plan(Lq=total, Lk=total, B=1, Hq=s.heads, device=s.device, doc_ids=batch.doc_ids)
        return (lambda: document(*heads_first(batch.q, batch.k, batch.v), doc_ids=batch.doc_ids,
                                 plan=plan)[0].transpose(0, 1)), True
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    docs = batch.doc_ids[0]

    def same_document(b, h, q_idx, kv_idx):
        return (docs[q_idx] == docs[kv_idx]) & (kv_idx <= q_idx)

    block_mask = create_block_mask(same_document, 1, None, total, total, device=s.device)
    on_gpu = s.device == "cuda"
    flex = torch.compile(flex_attention, dynamic=False) if on_gpu else flex_attention

    def run_flex():
        q, k, v = heads_first(*(x if on_gpu else x.detach() for x in (batch.q, batch.k, batch.v)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager FlexAttention on the CPU warns on every call
            return flex(q, k, v, block_mask=block_mask)[0].transpose(0, 1)

    return run_flex, on_gpu


def _timed(fn, s: Settings) -> tuple[float, int]:
    """Median milliseconds of up to s.reps calls, and how many ran."""
    import torch

    times = []
    while not times or (len(times) < s.reps and sum(times) < s.max_s * 1e3):
        if s.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if s.device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), len(times)


def measure(method: str, sequences: int, mean: int, s: Settings) -> list[dict]:
    """The rows of one method on one case: forward, then forward+backward."""
    import torch

    batch = make_batch(sequences, mean, s)
    forward, has_backward = forward_of(method, batch, s)
    base = {"sequences": sequences, "tokens": sum(batch.lengths), "method": method}
    grad = torch.randn_like(batch.q)
    rows = []
    for pass_ in PASSES:
        row = {**base, "pass": pass_}
        if pass_ == "fwd+bwd" and not has_backward:
            rows.append({**row, "note": "Flex has no backward on the CPU"})
            continue

        def call(pass_=pass_):
            if pass_ == "fwd":
                with torch.no_grad():
                    return forward()
            forward().backward(grad)
            for x in (batch.q, batch.k, batch.v):
                x.grad = None
            return None

        start = time.perf_counter()
        call()  # warm-up: compiles, autotunes, builds
        row["warm_s"] = time.perf_counter() - start
        with count_launches() as counted:
            call()
        if method != "flex":  # FlexAttention's inductor kernels are not Triton JITFunctions: not counted
            row["launches"] = counted.launches
        row["ms"], row["reps"] = _timed(call, s)
        if pass_ == "fwd" and method != "varlen":
            with torch.no_grad():
                want = forward_of("varlen", batch, s)[0]()
                row["diff"] = (forward().float() - want.float()).abs().max().item()
        rows.append(row)
    return rows


COLUMNS = (("sequences", "sequences", "{}"), ("tokens", "tokens", "{}"), ("method", "method", "{}"),
           ("pass", "pass", "{}"), ("launches", "launches per call", "{}"), ("ms", "ms per call", "{:.2f}"),
           ("reps", "calls timed", "{}"), ("warm_s", "warm-up s", "{:.1f}"),
           ("diff", "max abs(out - varlen)", "{:.1e}"), ("note", "note", "{}"))


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join("-" if row.get(key) is None else fmt.format(row[key])
                                       for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--quick", action="store_true", help="small sizes on the CPU (the Triton interpreter)")
    kind.add_argument("--dry-run", action="store_true", help="every step at tiny sizes on the CPU")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    args = parser.parse_args(argv)
    on_cpu = args.quick or args.dry_run
    if on_cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of triton: kernels run
    os.environ.setdefault("ATTNC_AUTOTUNE", "quick")
    import torch

    if not on_cpu and not torch.cuda.is_available():
        print("varlen_bench: no CUDA device; --quick runs small sizes on the CPU (Triton interpreter)")
        return 0
    s = Settings.make("dry" if args.dry_run else "quick" if args.quick else "gpu")
    chosen = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}")
    where = (torch.cuda.get_device_name() if s.device == "cuda" else
             f"CPU, TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}")
    print(f"varlen bench: {where}; torch {torch.__version__}; H={s.heads}, D={s.head_dim}, {s.dtype}; ms: the "
          f"median of up to {s.reps} calls" + (" (host time)" if s.device == "cpu" else ""), flush=True)
    rows = []
    for sequences, mean in s.cases:
        for method in chosen:
            rows += measure(method, sequences, mean, s)
    print(table(rows))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
