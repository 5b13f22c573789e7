"""One rank of tests/test_distributed.py (imported by the spawned processes, not collected by pytest)."""

from __future__ import annotations

import os


def run(rank, world, init_file, spec, layout, kernels, out_dir, L):
    if not kernels:
        os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: the eager reference runs
    import torch
    import torch.distributed as dist

    import attnc
    from attnc import distributed
    from attnc.distributed import context_parallel, shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        attn = attnc.load(spec)
        q, k, v, g, inputs = make_inputs(attn, L)
        local = [shard(x, rank, world, layout).detach().requires_grad_() for x in (q, k, v)]
        learn = {n: x.detach().clone().requires_grad_() for n, x in inputs.items()
                 if isinstance(x, torch.Tensor) and x.dtype.is_floating_point}
        cp = context_parallel(attn, None, layout=layout)
        o = cp(*local, **{**inputs, **learn})
        steps = list(distributed._LAST_STEPS)
        (o.float() * shard(g, rank, world, layout)).sum().backward()
        result = {"o": o.detach(), "dq": local[0].grad, "dk": local[1].grad, "dv": local[2].grad,
                  "steps": steps, **{f"d_{n}": x.grad for n, x in learn.items()}}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def make_inputs(attn, L, B=2, Hq=4, Hkv=2, D=16):
    """The global problem, the same on every rank and in the single-process check."""
    import torch

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, L, D, generator=gen)
    k, v = (torch.randn(B, Hkv, L, D, generator=gen) for _ in range(2))
    g = torch.randn(B, Hq, L, D, generator=gen)
    names = {t.name for t in attn.signature.tensors} | {p for p, _ in attn.signature.params}
    inputs = {}
    if "slopes" in names:
        inputs["slopes"] = torch.rand(Hq, generator=gen) + 0.1
    if "doc_ids" in names:
        inputs["doc_ids"] = torch.tensor([[0] * (L // 3) + [1] * (L - L // 3 - 3) + [2] * 3] * B)
    if "window" in names:
        inputs["window"] = 5
    return q, k, v, g, inputs
