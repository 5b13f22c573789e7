"""Context parallelism: ring attention over torch.distributed (gloo on CPUs, NCCL on GPUs).

    cp = attnc.distributed.context_parallel(attn, group_or_mesh, layout="zigzag")
    o = cp(q, k, v, **inputs)          # q, k, v: this rank's shard of the sequence, [B, H, L / P, D]

Each of the P ranks holds its shard of q, k and v along the sequence (self-attention: one sequence of
L = P * n tokens). K/V shards go round the ring (batch_isend_irecv, posted before each step's compute so
the transfer overlaps it); each step attends the local queries to one K/V shard. Tensor inputs
(document ids, ALiBi slopes, ...) are passed whole (global shapes, the same on every rank); gradients of
learnable ones are all-reduced.

Shard-sized steps. A step calls the kernels on the (query chunk, key chunk) pair itself: the spec's
block variant (`ir.Variant.shifted`, built in the IR) takes the chunks' global start positions and the
sequence's length as int params, so mask and score expressions see global positions and tile plans
and band bounds are the pair's. Memory per rank is O(L / P): no tensor with a sequence axis longer
than the shard is made. A contiguous shard is one chunk, a zigzag shard two (chunks r and 2P - 1 - r of
2P, which balances causal masks); a pair whose tile plan visits nothing is skipped, forward and
backward (a causal rank reads no later chunk, a sliding window its neighbours only), and the K/V still
pass through.

Merging partial rows. Softmax specs merge each pair's (o, lse) by log-sum-exp; a softmax sink (a
logit with no value) is left out of the steps and added once, after the merge. Specs without row
statistics (sigmoid) add their parts. Other general normalizations (softplus, re-weighted, ...) run one
ring per row statistic: its ring computes the statistic as an output (the sum's argument as the
weights, v = 1) summed over every key shard, and later rings read the merged statistics as per-row
inputs; autograd chains the rings' backwards. Backward: the K/V gradients travel round the ring with
their shard back to its owner.

Across machines: `torchrun --nnodes N --nproc-per-node G train.py`, `dist.init_process_group("nccl")`,
and pass the process group, a 1-D DeviceMesh (or None for the world) to context_parallel; see
docs/integrations.md for a training step with FSDP on the other mesh dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import build, ir
from .runtime.merge import merge_pair

__all__ = ["context_parallel", "shard", "unshard"]

Q_START, KV_START, TOTAL_LQ, TOTAL_LK = ir.POSITION_PARAMS
_BLOCKS: dict = {}
_LAST_STEPS: list = []  # the owners of the K/V shards the last forward on this rank attended to (tests read it)


@dataclass(frozen=True)
class Chunk:
    """Tokens [lo, hi) of a shard, at global positions [start, start + hi - lo)."""

    start: int
    lo: int
    hi: int

    def of(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, self.lo:self.hi]


def chunks(rank: int, world: int, n: int, layout: str) -> tuple[Chunk, ...]:
    """The chunks of `rank`'s shard of n tokens."""
    if layout == "contiguous":
        return (Chunk(rank * n, 0, n),)
    if layout == "zigzag":
        if n % 2:
            raise ValueError(f"context_parallel: layout 'zigzag' needs an even shard length, got {n}")
        h = n // 2
        return Chunk(rank * h, 0, h), Chunk((2 * world - 1 - rank) * h, h, n)
    raise ValueError(f"context_parallel: layout must be 'contiguous' or 'zigzag', got {layout!r}")


def positions(rank: int, world: int, n: int, layout: str, device=None) -> torch.Tensor:
    """Global token positions of `rank`'s shard of n tokens."""
    return torch.cat([torch.arange(c.start, c.start + c.hi - c.lo, device=device)
                      for c in chunks(rank, world, n, layout)])


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


def _block(attn, sink_free: bool = False):
    """The spec as a block of a longer sequence (global positions as params), built once per spec;
    `sink_free`: without its softmax sink."""
    key = (attn.spec, sink_free)
    if key not in _BLOCKS:
        _BLOCKS[key] = build.load_text(attn.spec, f"{attn.signature.spec} (context parallel)", shifted="cp",
                                       sink_free=sink_free)
    return _BLOCKS[key]


class _Ring:
    """The ring of a process group: rank r sends to r + 1 and receives from r - 1."""

    def __init__(self, group):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def _peer(self, rank):
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def post(self, tensors):
        """Post the sends of `tensors` to the next rank and the receives from the previous one, before the
        step's compute (the transfer overlaps it); returns a function that waits and gives the received."""
        if self.world == 1:
            return lambda: tensors
        recv = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t.contiguous(), self._peer((self.rank + 1) % self.world), self.group)
               for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self._peer((self.rank - 1) % self.world), self.group) for r in recv]
        requests = dist.batch_isend_irecv(ops)

        def wait():
            for request in requests:
                request.wait()
            return recv

        return wait


@dataclass
class _Problem:
    """What every step of one call shares: the block attention, the ring, the layout, the values."""

    ring: _Ring
    layout: str
    n: int  # shard length
    scale: float
    values: dict  # every scalar and tensor input but the learnable ones, defaults resolved for the sequence
    learnable: tuple  # the names of the learnable inputs given (passed to the Function, for their gradients)

    @property
    def length(self) -> int:
        return self.n * self.ring.world

    def chunks(self, owner: int) -> tuple[Chunk, ...]:
        return chunks(owner, self.ring.world, self.n, self.layout)

    def at(self, qc: Chunk, kc: Chunk, values=None) -> dict:
        """The block call's inputs for the pair (qc, kc)."""
        return {**(self.values if values is None else values), Q_START: qc.start, KV_START: kc.start,
                TOTAL_LQ: self.length, TOTAL_LK: self.length}

    def needed(self, block, q, k, v, qc: Chunk, kc: Chunk, values: dict) -> bool:
        """Whether the pair has a visible (query, key): its tile plan visits a tile. (Plans are exact on the
        catalog; a conservative one only costs a step that adds nothing.) O(tiles)."""
        plan = block.plan(qc.hi - qc.lo, kc.hi - kc.lo, B=q.shape[0], Hq=q.shape[1], Hk=k.shape[1],
                               Hv=v.shape[1], device=q.device, **self.at(qc, kc, values))
        return plan.tiles_visited > 0


class _LogSumExp:
    """Softmax specs: a part is (o, lse), merged by log-sum-exp; lse is an output (differentiable: a
    sink, added after the ring, reads it)."""

    with_lse = True

    @staticmethod
    def call(block, problem, q, k, v, values):
        return block(q, k, v, scale=problem.scale, return_lse=True, **values)

    @staticmethod
    def combine(merged, part):
        return merge_pair(*(merged or (None, None)), *part)

    @staticmethod
    def empty(q, rows, dv):  # every key masked for every query: o = 0, lse = -inf (as attn gives)
        return (q.new_zeros((q.shape[0], q.shape[1], rows, dv), dtype=torch.float32),
                q.new_full((q.shape[0], q.shape[1], rows), float("-inf"), dtype=torch.float32))

    @staticmethod
    def upstream(part, merged, do, dlse):
        """The gradients of the loss by a part's outputs, given the merged rows (o, lse) and the
        gradients of the loss by them: o = sum_s w_s o_s, lse = log sum_s exp(lse_s), w_s = exp(lse_s -
        lse), so dL/do_s = w_s dO and dL/dlse_s = w_s (dO . (o_s - o) + dlse)."""
        (o_s, lse_s), (o, lse) = part, merged
        w = torch.where(torch.isfinite(lse_s) & torch.isfinite(lse), torch.exp(lse_s - lse), torch.zeros_like(lse))
        g_lse = w * ((do * (o_s.detach().float() - o.float())).sum(-1) + dlse)
        return (w[..., None] * do).to(o_s.dtype), g_lse


class _Sum:
    """Specs without row statistics (sigmoid, relu / visible, ...): the weights of a key do not depend
    on the other keys, so a part is the output over its keys, and parts add."""

    with_lse = False

    @staticmethod
    def call(block, problem, q, k, v, values):
        return (block(q, k, v, scale=problem.scale, **values),)

    @staticmethod
    def combine(merged, part):
        return (part[0].float(),) if merged is None else (merged[0] + part[0].float(),)

    @staticmethod
    def empty(q, rows, dv):
        return (q.new_zeros((q.shape[0], q.shape[1], rows, dv), dtype=torch.float32),)

    @staticmethod
    def upstream(part, merged, do, dlse):
        return (do.to(part[0].dtype),)


@dataclass(frozen=True)
class _Pass:
    """One ring: the block attention function it calls per pair, how its parts merge, and the per-row
    inputs it reads (row statistics of earlier rings, this rank's rows: sliced per query chunk, their
    gradients not all-reduced)."""

    block: object
    merge: type
    rows: tuple = ()


class _RingAttention(torch.autograd.Function):
    """The ring: every (query chunk, key chunk) pair with work computes a part, merged by `merge`;
    the backward recomputes each pair's part and back-propagates the merge's upstream gradients."""

    @staticmethod
    def forward(ctx, problem, ring_pass, q, k, v, *float_inputs):
        ring, rank, merge = problem.ring, problem.ring.rank, ring_pass.merge
        q_chunks = problem.chunks(rank)
        merged = [None for _ in q_chunks]
        k_cur, v_cur = k, v
        pairs = []  # (step, q chunk index, kv chunk index) of the pairs with work
        for step in range(ring.world):
            owner = (rank - step) % ring.world
            received = ring.post([k_cur, v_cur]) if step < ring.world - 1 else None
            for i, qc in enumerate(q_chunks):
                values = _inputs(problem, ring_pass, qc, float_inputs)
                for j, kc in enumerate(problem.chunks(owner)):
                    if not problem.needed(ring_pass.block, q, k_cur, v_cur, qc, kc, values):
                        continue
                    pairs.append((step, i, j))
                    part = merge.call(ring_pass.block, problem, qc.of(q), kc.of(k_cur), kc.of(v_cur),
                                      problem.at(qc, kc, values))
                    merged[i] = merge.combine(merged[i], part)
            if received is not None:
                k_cur, v_cur = received()
        rows = [m or merge.empty(q, qc.hi - qc.lo, v.shape[3]) for qc, m in zip(q_chunks, merged)]
        out = [torch.cat(parts, 2) for parts in zip(*rows)]  # o (and lse), this rank's rows
        out[0] = out[0].to(q.dtype)
        ctx.problem, ctx.ring_pass, ctx.pairs = problem, ring_pass, pairs
        _LAST_STEPS[:] = sorted({(rank - step) % ring.world for step, _, _ in pairs})
        ctx.save_for_backward(q, k, v, *out, *float_inputs)
        ctx.n_out = len(out)
        return tuple(out)

    @staticmethod
    def backward(ctx, do, dlse=None):
        problem, ring_pass = ctx.problem, ctx.ring_pass
        merge = ring_pass.merge
        ring, rank = problem.ring, problem.ring.rank
        q, k, v, *rest = ctx.saved_tensors
        merged, float_inputs = rest[:ctx.n_out], rest[ctx.n_out:]
        do = do.float()
        if merge.with_lse and dlse is None:
            dlse = torch.zeros_like(merged[1])
        dq = torch.zeros_like(q, dtype=torch.float32)
        d_inputs = [torch.zeros_like(t, dtype=torch.float32) for t in float_inputs]
        k_cur, v_cur = k, v
        dk_cur, dv_cur = torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
        q_chunks = problem.chunks(rank)
        for step in range(ring.world):
            owner = (rank - step) % ring.world
            received = ring.post([k_cur, v_cur]) if step < ring.world - 1 else None
            for i, j in ((i, j) for s, i, j in ctx.pairs if s == step):
                qc, kc = q_chunks[i], problem.chunks(owner)[j]
                with torch.enable_grad():
                    qs = qc.of(q).detach().requires_grad_()
                    ks, vs = kc.of(k_cur).detach().requires_grad_(), kc.of(v_cur).detach().requires_grad_()
                    ins = [t.detach().requires_grad_() for t in float_inputs]
                    part = merge.call(ring_pass.block, problem, qs, ks, vs,
                                      problem.at(qc, kc, _inputs(problem, ring_pass, qc, ins)))
                    upstream = merge.upstream(part, [qc.of(m) for m in merged], qc.of(do),
                                              None if dlse is None else qc.of(dlse))
                    grads = torch.autograd.grad(part, [qs, ks, vs, *ins], upstream, allow_unused=True)
                for acc, chunk, g in ((dq, qc, grads[0]), (dk_cur, kc, grads[1]), (dv_cur, kc, grads[2])):
                    if g is not None:  # (a count of visible keys reads neither q nor k)
                        acc[:, :, chunk.lo:chunk.hi] += g.float()
                for acc, g in zip(d_inputs, grads[3:]):
                    if g is not None:
                        acc += g.float()
            if received is not None:
                k_cur, v_cur = received()
            dk_cur, dv_cur = _pass_on(ring, dk_cur, dv_cur)
        shared = len(problem.learnable)  # whole inputs, read by every rank: their gradients are summed
        return (None, None, dq.to(q.dtype), dk_cur.to(k.dtype), dv_cur.to(v.dtype),
                *_all_reduced(ring, d_inputs[:shared], float_inputs[:shared]),
                *(acc.to(t.dtype) for acc, t in zip(d_inputs[shared:], float_inputs[shared:])))


def _inputs(problem: _Problem, ring_pass: _Pass, qc: Chunk, float_inputs) -> dict:
    """A pair's inputs for query chunk qc: the fixed ones, the learnable whole ones, and the chunk's rows of
    the per-row ones."""
    shared = len(problem.learnable)
    return {**problem.values, **dict(zip(problem.learnable, float_inputs[:shared])),
            **{name: qc.of(t) for name, t in zip(ring_pass.rows, float_inputs[shared:])}}


class _SumGradients(torch.autograd.Function):
    """The identity, whose gradient is summed over the ranks: for a whole input every rank reads."""

    @staticmethod
    def forward(ctx, ring, x):
        ctx.ring = ring
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        if ctx.ring.world > 1:
            dist.all_reduce(grad, group=ctx.ring.group)
        return None, grad


def _pass_on(ring: _Ring, *grads):
    """The K/V gradients move on with their shard (after `world` moves they are home)."""
    return tuple(ring.post(list(grads))()) if ring.world > 1 else grads


def _all_reduced(ring: _Ring, d_inputs, float_inputs):
    for acc in d_inputs:
        if ring.world > 1:
            dist.all_reduce(acc, group=ring.group)
    return [acc.to(t.dtype) for acc, t in zip(d_inputs, float_inputs)]


def _process_group(group_or_mesh):
    """A process group from a group, a 1-D DeviceMesh (as torch's own context_parallel takes) or None."""
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # a torch without device meshes
        DeviceMesh = ()
    if isinstance(group_or_mesh, DeviceMesh):
        if group_or_mesh.ndim != 1:
            raise ValueError(f"context_parallel: a DeviceMesh must be 1-D (the context-parallel dimension); got "
                             f"{group_or_mesh.ndim} dimensions {group_or_mesh.mesh_dim_names}: pass mesh['cp']")
        return group_or_mesh.get_group()
    return group_or_mesh


def _statistic_rings(attn, block_variant, stats) -> tuple[tuple[str, _Pass], ...]:
    """One ring per row statistic of the block variant, in pass order: (its input name, the ring that sums
    it over every key shard, reading the statistics before it). A statistic's ring runs the spec whose
    probabilities are the sum's argument (1 for a count of `visible`) with v = 1: its output is the sum."""
    names = {stat: f"attnc_row_{i}" for i, stat in enumerate(stats)}
    rings = []
    for i, stat in enumerate(stats):
        if not (stat == ir.visible or isinstance(stat, ir.RowSum)):
            raise ValueError(f"context_parallel: {attn.signature.spec}'s weights need {stat}, a maximum over the "
                             f"keys; only sums and counts are merged across ranks (a rowmax is not supported)")
        given = {earlier: names[earlier] for earlier in stats[:i]}
        loads = {earlier: ir.row_input(name) for earlier, name in given.items()}
        variant = block_variant.rows_given(given, f"given{i}").statistic(stat.xreplace(loads), f"stat{i}")
        block = _cached(attn, variant, ("statistic", str(i)))
        rings.append((names[stat], _Pass(block, _Sum, tuple(given.values()))))
    return tuple(rings)


def _cached(attn, variant, derivation):
    key = (attn.spec, *derivation)
    if key not in _BLOCKS:
        _BLOCKS[key] = build.load_variant(variant, [attn.spec, "context parallel", *derivation])
    return _BLOCKS[key]


def context_parallel(attn, group=None, layout: str = "zigzag"):
    """A function with `attn`'s call signature, `cp(q, k, v, scale=None, return_lse=False, **inputs)`,
    taking this rank's shard of q, k, v (along the sequence, in `layout`) and returning this rank's
    shard of the output (and of the log-sum-exp). `group`: a process group, a 1-D DeviceMesh, or None
    (the world)."""
    from . import pipeline

    analyses = pipeline.analyse(pipeline.compile_text(attn.spec, attn.signature.spec))
    if pipeline.choose_family(analyses) is pipeline.Family.LINEAR:
        raise ValueError(f"context_parallel: {attn.signature.spec} runs as linear attention, whose state is a "
                         f"running sum over the sequence, not a ring of key shards; it is not supported")
    chunks(0, 1, 2, layout)  # checks the layout's name
    sink = analyses.rows.softmax is not None and analyses.rows.softmax.sink is not None
    statistics: tuple = ()
    if analyses.rows.has_lse:
        output = _Pass(_block(attn, sink_free=sink), _LogSumExp)
    else:
        # general normalizations: a ring per row statistic, then the output's ring reading them all
        block_variant = pipeline.block_variant(analyses.variant, "cp")
        stats = tuple(stat for stat, _ in pipeline.analyse(block_variant).rows.stats_in_order)
        statistics = _statistic_rings(attn, block_variant, stats)
        names = {stat: name for stat, (name, _) in zip(stats, statistics)}
        output = _Pass(_cached(attn, block_variant.rows_given(names, "given"), ("output",)), _Sum,
                       tuple(names.values()))
    sink_block = _block(attn) if sink else None  # its sink_logits: the sink, added once after the ring
    if not dist.is_initialized():
        raise RuntimeError("context_parallel: torch.distributed is not initialized (dist.init_process_group)")
    group = _process_group(group)
    learnable = {t.name for t in attn.signature.tensors if t.learnable}
    param_names = {name for name, _ in attn.signature.params}

    def cp(q, k, v, scale=None, return_lse=False, **inputs):
        ring = _Ring(group)
        if not (q.shape[2] == k.shape[2] == v.shape[2]):
            raise ValueError(f"context_parallel: q, k and v shards must have one length (self-attention); got "
                             f"{q.shape[2]}, {k.shape[2]}, {v.shape[2]}")
        if return_lse and not output.merge.with_lse:
            raise ValueError(f"context_parallel: argument 'return_lse': {attn.signature.spec}'s weights are not a "
                             f"softmax, so it has no log-sum-exp")
        n = q.shape[2]
        L = n * ring.world
        defaults = attn.defaults(L, L, q.shape[0], q.shape[1], k.shape[1], v.shape[1])  # the sequence's, not a shard's
        values = {**{p: d for p, d in defaults.items() if p in param_names}, **inputs}
        scale = q.shape[3] ** -0.5 if scale is None else float(scale)
        floats = sorted(name for name in values if name in learnable and isinstance(values[name], torch.Tensor))
        fixed = {name: x for name, x in values.items() if name not in floats}
        problem = _Problem(ring, layout, n, scale, fixed, tuple(floats))
        shared = [values[name] for name in floats]
        rows: dict = {}  # the row statistics merged so far: this rank's rows, [B, Hq, n]
        ones = v.new_ones((*v.shape[:3], 1))  # a statistic's ring sums its weights: v = 1
        for name, ring_pass in statistics:
            (total,) = _RingAttention.apply(problem, ring_pass, q, k, ones, *shared,
                                            *(rows[r] for r in ring_pass.rows))
            rows[name] = total[..., 0].float()
        o, *lse = _RingAttention.apply(problem, output, q, k, v, *shared, *(rows[r] for r in output.rows))
        lse = lse[0] if lse else None
        if sink_block is not None:  # o = sum_j e^s_j v_j / (sum_j e^s_j + e^sink): the merged rows rescaled
            whole = {name: _SumGradients.apply(ring, values[name]) for name in floats}  # read by every rank
            logits = torch.cat([sink_block.sink_logits(qc.of(q), problem.at(qc, qc, {**values, **whole}))
                                for qc in problem.chunks(ring.rank)], 2).float()
            with_sink = torch.logaddexp(lse, logits)
            o, lse = (o.float() * torch.exp(lse - with_sink)[..., None]).to(q.dtype), with_sink
        return (o, lse) if return_lse else o

    return cp
