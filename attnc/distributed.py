"""Context parallelism: ring attention over torch.distributed (gloo on CPUs, NCCL on GPUs).

    cp = attnc.distributed.context_parallel(attn, group, layout="zigzag")
    o = cp(q, k, v, **inputs)          # q, k, v: this rank's shard of the sequence, [B, H, L / P, D]

Each of the P ranks holds its shard of q, k and v along the sequence (self-attention: one sequence of
L = P * n tokens). K/V shards go round the ring (batch_isend_irecv, posted before each step's compute so
the transfer overlaps it); each step attends the local queries to one K/V shard and the partial outputs
are merged by log-sum-exp. The backward recomputes each step, and the K/V gradients travel round the
ring with their shard back to its owner. Tensor inputs (document ids, ALiBi slopes, ...) are passed
whole (global shapes, the same on every rank); gradients of learnable ones are all-reduced.

Global positions: each step runs a variant of the spec with two more inputs, `attnc_cp_q: bool[B, Lq]`
and `attnc_cp_kv: bool[B, Lk]`, ANDed into its mask in the IR (ir.Variant.and_mask), on the global
length with the local queries and the step's keys at their global positions (zeros elsewhere). Mask and score expressions therefore see global
positions, and tile plans skip the tiles outside the (query shard, key shard) block. A step whose block
is fully masked (its tile plan, aligned to the shards, visits nothing) is skipped, forward and backward:
a causal rank reads no later shard, a sliding window its neighbours only; the K/V still pass through. The global-length placement costs O(L) memory per rank
for the step's q/k/v blocks: the kernels' work is the block's, the memory is not yet the shard's.

Layouts: "contiguous" (rank r holds tokens [r n, (r + 1) n)) and "zigzag" (the sequence in 2P chunks;
rank r holds chunks r and 2P - 1 - r, which balances causal masks). Softmax-family specs only (merging
needs a log-sum-exp); others are refused.

Across machines: `torchrun --nnodes N --nproc-per-node G train.py`, `dist.init_process_group("nccl")`,
and pass the process group (or None for the world) to context_parallel.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import build
from .runtime.merge import merge_pair

__all__ = ["context_parallel", "shard", "unshard"]

Q_KEEP, KV_KEEP = "attnc_cp_q", "attnc_cp_kv"
_VARIANTS: dict = {}
_LAST_STEPS: list = []  # the owners of the K/V shards the last forward on this rank attended to (tests read it)


def _variant(attn):
    key = attn.spec
    if key not in _VARIANTS:
        _VARIANTS[key] = build.load_text(attn.spec, f"{attn.signature.spec} (context parallel)",
                                         and_mask=("cp", [(Q_KEEP, "Lq", "q"), (KV_KEEP, "Lk", "kv")]))
    return _VARIANTS[key]


def _has_sink(attn) -> bool:
    from . import pipeline

    rows = pipeline.analyse(pipeline.compile_text(attn.spec, attn.signature.spec)).rows
    return rows.softmax is not None and rows.softmax.sink is not None


def positions(rank: int, world: int, n: int, layout: str, device=None) -> torch.Tensor:
    """Global token positions of `rank`'s shard of n tokens."""
    if layout == "contiguous":
        return torch.arange(rank * n, (rank + 1) * n, device=device)
    if layout == "zigzag":
        if n % 2:
            raise ValueError(f"context_parallel: layout 'zigzag' needs an even shard length, got {n}")
        h = n // 2
        first, second = rank, 2 * world - 1 - rank
        return torch.cat([torch.arange(first * h, (first + 1) * h, device=device),
                          torch.arange(second * h, (second + 1) * h, device=device)])
    raise ValueError(f"context_parallel: layout must be 'contiguous' or 'zigzag', got {layout!r}")


def shard(x: torch.Tensor, rank: int, world: int, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """This rank's shard of a full-sequence tensor (sequence along `dim`)."""
    n = x.shape[dim] // world
    return x.index_select(dim, positions(rank, world, n, layout, x.device))


def unshard(shards: list, layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """The full-sequence tensor from every rank's shard (the inverse of `shard`)."""
    world, n = len(shards), shards[0].shape[dim]
    order = torch.cat([positions(r, world, n, layout) for r in range(world)])
    full = torch.cat(shards, dim=dim)
    return full.index_select(dim, torch.argsort(order).to(full.device))


def _place(x, pos, length):
    """x [B, H, n, D] at sequence positions pos of a zero [B, H, length, D] block (differentiable)."""
    full = x.new_zeros((*x.shape[:2], length, x.shape[3]))
    return full.index_copy(2, pos, x)


def _keep(pos, B, length, device):
    keep = torch.zeros((B, length), dtype=torch.bool, device=device)
    keep[:, pos] = True
    return keep


def _needed(variant, q, k, v, length, block, values) -> bool:
    """Whether the step's (query shard, key shard) block has a visible pair: its tile plan, with tiles
    aligned to the shards' chunks, visits a tile. (Plans are exact on the catalog; a conservative one
    only costs a step that adds nothing.) O(tiles visited)."""
    plan = variant.plan(length, length, B=q.shape[0], Hq=q.shape[1], Hk=k.shape[1], Hv=v.shape[1],
                        block_m=block, block_n=block, device=q.device, **values)
    return plan.tiles_visited > 0


def _ring(tensors, group, rank, world):
    """Post the sends of `tensors` to the next rank and the receives from the previous one; returns
    (requests, received buffers)."""
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    recv = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), dist.get_global_rank(group, nxt) if group else nxt, group)
           for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, dist.get_global_rank(group, prv) if group else prv, group) for r in recv]
    return dist.batch_isend_irecv(ops), recv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, q, k, v, *float_inputs):
        variant, group, rank, world, layout, scale, fixed, float_names = cfg
        B, n = q.shape[0], q.shape[2]
        length = n * world
        pos_q = positions(rank, world, n, layout, q.device)
        q_full = _place(q, pos_q, length)
        chunk = n // 2 if layout == "zigzag" else n
        block = min(128, chunk & -chunk)  # the largest power of two dividing the chunks (tiles never straddle)
        values = {**fixed, **dict(zip(float_names, float_inputs)), Q_KEEP: _keep(pos_q, B, length, q.device)}
        o = lse = None
        k_cur, v_cur = k, v
        steps = []  # the owners of the K/V shards this rank attended to (the others are fully masked)
        for step in range(world):
            owner = (rank - step) % world
            reqs, recv = _ring([k_cur, v_cur], group, rank, world) if step < world - 1 else ([], None)
            pos_kv = positions(owner, world, n, layout, q.device)
            step_values = {**values, KV_KEEP: _keep(pos_kv, B, length, q.device)}
            if _needed(variant, q, k, v, length, block, step_values):
                steps.append(owner)
                o_s, lse_s = variant(q_full, _place(k_cur, pos_kv, length), _place(v_cur, pos_kv, length),
                                     scale=scale, return_lse=True, **step_values)
                o, lse = merge_pair(o, lse, o_s[:, :, pos_q], lse_s[:, :, pos_q])
            for req in reqs:
                req.wait()
            if recv is not None:
                k_cur, v_cur = recv
        if o is None:  # every key masked for every local query: o = 0, lse = -inf (as attn gives)
            o = q.new_zeros((*q.shape[:3], v.shape[3]), dtype=torch.float32)
            lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
        o = o.to(q.dtype)
        ctx.cfg, ctx.steps = cfg, steps
        _LAST_STEPS[:] = steps
        ctx.save_for_backward(q, k, v, o, lse, *float_inputs)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        variant, group, rank, world, layout, scale, fixed, float_names = ctx.cfg
        q, k, v, o, lse, *float_inputs = ctx.saved_tensors
        B, n = q.shape[0], q.shape[2]
        length = n * world
        pos_q = positions(rank, world, n, layout, q.device)
        do = do.float()
        delta = (do * o.float()).sum(-1)  # rowsum(dO * O), shared by every step's lse gradient
        dq = torch.zeros_like(q, dtype=torch.float32)
        d_inputs = [torch.zeros_like(t, dtype=torch.float32) for t in float_inputs]
        k_cur, v_cur = k, v
        dk_cur, dv_cur = torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
        for step in range(world):
            owner = (rank - step) % world
            if owner in ctx.steps:  # the steps the forward skipped (fully masked) add no gradient
                with torch.enable_grad():
                    qs = q.detach().requires_grad_()
                    ks, vs = k_cur.detach().requires_grad_(), v_cur.detach().requires_grad_()
                    ins = [t.detach().requires_grad_() for t in float_inputs]
                    pos_kv = positions(owner, world, n, layout, q.device)
                    values = {**fixed, **dict(zip(float_names, ins)), Q_KEEP: _keep(pos_q, B, length, q.device),
                              KV_KEEP: _keep(pos_kv, B, length, q.device)}
                    o_s, lse_s = variant(_place(qs, pos_q, length), _place(ks, pos_kv, length),
                                         _place(vs, pos_kv, length), scale=scale, return_lse=True, **values)
                    o_s, lse_s = o_s[:, :, pos_q], lse_s[:, :, pos_q]
                    # o = sum_s w_s o_s, w_s = exp(lse_s - lse): dL/do_s = w_s dO, dL/dlse_s = w_s dO.(o_s - o)
                    w = torch.where(torch.isfinite(lse_s) & torch.isfinite(lse), torch.exp(lse_s - lse),
                                    torch.zeros_like(lse))
                    g_o = (w[..., None] * do).to(o_s.dtype)
                    g_lse = w * ((do * o_s.detach().float()).sum(-1) - delta)
                    grads = torch.autograd.grad([o_s, lse_s], [qs, ks, vs, *ins], [g_o, g_lse], allow_unused=True)
                dq += grads[0].float()
                dk_cur = dk_cur + (grads[1].float() if grads[1] is not None else 0)
                dv_cur = dv_cur + (grads[2].float() if grads[2] is not None else 0)
                for acc, g in zip(d_inputs, grads[3:]):
                    if g is not None:
                        acc += g.float()
            if world > 1:  # the shard and its gradients move on; after `world` moves they are home
                sending = [dk_cur, dv_cur] if step == world - 1 else [k_cur, v_cur, dk_cur, dv_cur]
                reqs, recv = _ring(sending, group, rank, world)
                for req in reqs:
                    req.wait()
                if step < world - 1:
                    k_cur, v_cur, dk_cur, dv_cur = recv
                else:
                    dk_cur, dv_cur = recv
        for acc in d_inputs:
            if world > 1:
                dist.all_reduce(acc, group=group)
        d_inputs = [acc.to(t.dtype) for acc, t in zip(d_inputs, float_inputs)]
        return (None, dq.to(q.dtype), dk_cur.to(k.dtype), dv_cur.to(v.dtype), *d_inputs)


def context_parallel(attn, group=None, layout: str = "zigzag"):
    """A function with `attn`'s call signature, `cp(q, k, v, scale=None, return_lse=False, **inputs)`,
    taking this rank's shard of q, k, v (along the sequence, in `layout`) and returning this rank's
    shard of the output (and of the log-sum-exp)."""
    if not getattr(attn, "has_lse", False):
        raise ValueError(f"context_parallel: {attn.signature.spec}'s weights are not a softmax, so its partial "
                         f"outputs cannot be merged by log-sum-exp; multi-pass normalizations are not supported")
    if _has_sink(attn):
        raise ValueError(f"context_parallel: {attn.signature.spec} has a softmax sink; every ring step would add "
                         f"the sink's logit to its log-sum-exp, so the merged rows would count it once per rank. "
                         f"Sinks are not supported under context parallelism yet")
    positions(0, 1, 2, layout)  # checks the layout's name
    if not dist.is_initialized():
        raise RuntimeError("context_parallel: torch.distributed is not initialized (dist.init_process_group)")
    variant = _variant(attn)
    learnable = {t.name for t in attn.signature.tensors if t.dtype == "float"}

    def cp(q, k, v, scale=None, return_lse=False, **inputs):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if not (q.shape[2] == k.shape[2] == v.shape[2]):
            raise ValueError(f"context_parallel: q, k and v shards must have one length (self-attention); got "
                             f"{q.shape[2]}, {k.shape[2]}, {v.shape[2]}")
        scale = q.shape[3] ** -0.5 if scale is None else float(scale)
        floats = sorted(name for name in inputs if name in learnable and isinstance(inputs[name], torch.Tensor))
        fixed = {name: value for name, value in inputs.items() if name not in floats}
        cfg = (variant, group, rank, world, layout, scale, fixed, floats)
        o, lse = _RingAttention.apply(cfg, q, k, v, *(inputs[name] for name in floats))
        return (o, lse) if return_lse else o

    return cp
