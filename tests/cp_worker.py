"""One rank of tests/test_distributed.py (imported by the spawned processes, not collected by pytest)."""

from __future__ import annotations

import os
import weakref


def run(rank, world, init_file, specs, layout, kernels, out_dir, L):
    """Every spec of `specs` under context parallelism on this rank: its output and gradients to
    out_dir/<spec stem>.rank<r>.pt."""
    if not kernels:
        os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: the eager reference runs
    import torch
    import torch.distributed as dist

    import attnc
    from attnc import distributed
    from attnc.distributed import context_parallel, shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for spec in specs:
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
            torch.save(result, os.path.join(out_dir, f"{os.path.basename(spec)}.rank{rank}.pt"))
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
    if "sink" in names:
        inputs["sink"] = torch.randn(Hq, generator=gen)
    if "key_bias" in names:  # a learnable table along the keys: [Lk], read at global positions
        inputs["key_bias"] = torch.randn(L, generator=gen)
    return q, k, v, g, inputs


class PeakMemory:
    """A dispatch mode's record of the memory torch allocates while it is active: the peak of the bytes
    of storages created under it that are still alive, and the largest extent of any allocated tensor's
    axes."""

    def __init__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        record = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        record.allocated(t)
                return out

        self.mode = Mode()
        self.live = self.peak = self.longest = 0
        self.sizes: dict = {}

    def allocated(self, t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.sizes or storage.nbytes() == 0:
            return  # a view, or an in-place result
        self.sizes[key] = storage.nbytes()
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        self.longest = max([self.longest, *t.shape])
        weakref.finalize(storage, self.freed, key)

    def freed(self, key):
        self.live -= self.sizes.pop(key)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def memory(rank, world, init_file, spec, out_dir, L, B, H, D):
    """The peak memory this rank allocates for one forward and backward of `spec` under context
    parallelism (zigzag), through the eager path."""
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import torch.distributed as dist

    import attnc
    from attnc.distributed import context_parallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        attn = attnc.load(spec)
        n = L // world
        gen = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(B, H, n, D, generator=gen).requires_grad_() for _ in range(3))
        g = torch.randn(B, H, n, D, generator=gen)
        cp = context_parallel(attn, None, layout="zigzag")
        with PeakMemory() as record:
            (cp(q, k, v) * g).sum().backward()
        torch.save({"peak": record.peak, "longest": record.longest, "shard": n},
                   os.path.join(out_dir, f"memory.rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def mesh(rank, init_file, spec, out_dir, L):
    """context_parallel given a 1-D DeviceMesh (and refusing a 2-D one), on 2 ranks."""
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import attnc
    from attnc.distributed import context_parallel, shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        attn = attnc.load(spec)
        q, k, v, _, _ = make_inputs(attn, L)
        cp_mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("cp",))
        o = context_parallel(attn, cp_mesh, layout="zigzag")(*(shard(x, rank, 2, "zigzag") for x in (q, k, v)))
        try:
            context_parallel(attn, init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "cp")))
            refusal = ""
        except ValueError as err:
            refusal = str(err)
        torch.save({"o": o, "refusal": refusal}, os.path.join(out_dir, f"mesh.rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
