"""Host side of decoding against a KV cache, shared by generated modules: argument checks (every mistake
a ValueError naming the argument), head grouping, and cache gathering for the eager path. Ragged
(varlen) calls: runtime/varlen.py. docs/decoding.md."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import checks
from .checks import Signature, _fail, _shape, check_head_tensors, same_device


@dataclass(frozen=True)
class DecodeShapes:
    B: int
    Hq: int
    Hk: int
    Hv: int
    Lnew: int
    Dqk: int
    Dv: int
    capacity: int  # keys a sequence can hold: Lmax, or max_pages * page_size
    page_size: int  # the page size (Lmax for a contiguous cache)
    paged: bool


def check_decode(sig: Signature, q, k_cache, v_cache, cache_seqlens, block_table) -> DecodeShapes:
    check_head_tensors(sig, q, {"k_cache": k_cache, "v_cache": v_cache},
                       {"q": "[B, Hq, Lnew, Dqk]", "k_cache": "[B or num_pages, Hk, Lmax or page_size, Dqk]",
                        "v_cache": "[B or num_pages, Hv, Lmax or page_size, Dv]"}, "q and the caches")
    B, Hq, Lnew, Dqk = q.shape
    n0, Hk, P, Dk = k_cache.shape
    v0, Hv, Pv, Dv = v_cache.shape
    paged = block_table is not None
    what = "num_pages" if paged else "B"
    if v0 != n0:
        _fail(sig, "v_cache", f"first dimension ({what}) {v0} differs from k_cache's {n0}")
    if Dk != Dqk:
        _fail(sig, "k_cache", f"head dim {Dk} differs from q's {Dqk}")
    if Pv != P:
        _fail(sig, "v_cache", f"{'page size' if paged else 'length'} {Pv} differs from k_cache's {P}")
    checks.check_head_counts(sig, {"q": Hq, "k": Hk, "v": Hv}, {"q": "q", "k": "k_cache", "v": "v_cache"})
    if not isinstance(cache_seqlens, torch.Tensor):
        _fail(sig, "cache_seqlens", f"expected a torch.Tensor, got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype != torch.int32:
        _fail(sig, "cache_seqlens", f"expected dtype int32, got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (B,):
        _fail(sig, "cache_seqlens", f"expected shape [B] = [{B}], got {_shape(cache_seqlens)}")
    if not same_device(cache_seqlens.device, q.device):
        _fail(sig, "cache_seqlens", f"is on {cache_seqlens.device} but q is on {q.device}")
    if paged:
        if not isinstance(block_table, torch.Tensor):
            _fail(sig, "block_table", f"expected a torch.Tensor or None, got {type(block_table).__name__}")
        if block_table.dtype != torch.int32:
            _fail(sig, "block_table", f"expected dtype int32, got {block_table.dtype}")
        if block_table.dim() != 2 or block_table.shape[0] != B or block_table.shape[1] == 0:
            _fail(sig, "block_table", f"expected shape [B, max_pages] with B = {B}, got {_shape(block_table)}")
        if not same_device(block_table.device, q.device):
            _fail(sig, "block_table", f"is on {block_table.device} but q is on {q.device}")
        if P % 16:
            _fail(sig, "k_cache", f"page size {P} (k_cache.shape[2]) is not a multiple of 16")
        capacity = block_table.shape[1] * P
    else:
        if n0 != B:
            _fail(sig, "k_cache", f"batch size {n0} differs from q's {B} (a contiguous cache is [B, Hk, Lmax, Dqk]; "
                  "pass block_table for a paged one)")
        capacity = P
    lengths = cache_seqlens.cpu().long()
    for b, length in enumerate(lengths.tolist()):
        if length > capacity:
            _fail(sig, "cache_seqlens", f"cache_seqlens[{b}] = {length} exceeds the cache's capacity {capacity}")
        if length < Lnew:
            _fail(sig, "cache_seqlens", f"cache_seqlens[{b}] = {length} is less than Lnew = {Lnew} (q.shape[2]): "
                  "the cache must already hold the new queries' keys")
    if paged:
        table = block_table.cpu().long()
        used = torch.arange(table.shape[1])[None, :] < (lengths[:, None] + P - 1) // P  # pages a sequence reads
        bad = used & ((table < 0) | (table >= n0))
        if bad.any():
            b, j = (int(x) for x in bad.nonzero()[0])
            _fail(sig, "block_table", f"block_table[{b}, {j}] = {int(table[b, j])} is out of range: k_cache has "
                  f"{n0} pages")
    return DecodeShapes(B, Hq, Hk, Hv, Lnew, Dqk, Dv, capacity, P, paged)


def length_groups(sig: Signature, shapes: DecodeShapes, cache_seqlens, inputs: dict, defaults) -> list:
    """Scalar defaults may depend on the length (Lq = Lk = cache_seqlens[b] in decoding): the
    sequences grouped by the defaults they get, [(batch indices, defaults)], one group when none differ."""
    s = shapes
    groups: dict = {}
    for b, n in enumerate(cache_seqlens.cpu().tolist()):
        values = defaults(n, n, s.B, s.Hq, s.Hk, s.Hv)
        key = tuple((name, value) for name, value in values.items() if name not in inputs)
        groups.setdefault(key, ([], values))[0].append(b)
    return list(groups.values())


def decode_by_groups(sig: Signature, fn, groups, q, k_cache, v_cache, cache_seqlens, block_table, scale, return_lse,
                     inputs):
    """One `fn` (decode) call per group of sequences with the same length-dependent defaults, given
    explicitly; the results land in their batch rows."""
    o = lse = None
    for batch, values in groups:
        idx = torch.tensor(batch, device=q.device)
        sub = {name: value for name, value in values.items() if name not in inputs}
        sub.update(checks.batch_entries(sig, inputs, idx))
        paged = block_table is not None
        out = fn(q[idx], k_cache if paged else k_cache[idx], v_cache if paged else v_cache[idx], cache_seqlens[idx],
                 block_table=block_table[idx] if paged else None, scale=scale, return_lse=return_lse, **sub)
        part, part_lse = out if return_lse else (out, None)
        if o is None:
            o = part.new_empty((q.shape[0], *part.shape[1:]))
            lse = None if part_lse is None else part_lse.new_empty((q.shape[0], *part_lse.shape[1:]))
        o[idx] = part
        if lse is not None:
            lse[idx] = part_lse
    return (o, lse) if return_lse else o


def check_decode_inputs(sig: Signature, shapes: DecodeShapes, q, k_cache, v_cache, inputs: dict, defaults: dict) -> dict:
    """The spec's inputs for decoding: inputs indexed by query or key position span the capacity.
    Decode is forward only: no argument may require grad."""
    s = shapes
    base = checks.Shapes(s.B, s.Hq, s.Hk, s.Hv, s.capacity, s.capacity, s.Dqk, s.Dv)
    values = checks.check_inputs(sig, base, q.device, inputs, defaults)
    if torch.is_grad_enabled():
        tensors = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)] + [(t.name, values[t.name]) for t in sig.tensors]
        for name, t in tensors:
            if t.requires_grad:
                _fail(sig, name, "requires grad, but decode is forward only: call it under torch.no_grad() or "
                      "pass detached tensors")
    return values


def group_size(Hq: int, Hk: int, Hv: int) -> int:
    """Query heads per decode program: the largest run of consecutive query heads that read one key
    head and one value head (h reads key head h*Hk//Hq and value head h*Hv//Hq); 1 if runs are uneven."""
    for g in range(Hq // max(Hk, Hv, 1), 0, -1):
        if Hq % g:
            continue
        if all((h * Hk // Hq, h * Hv // Hq) == ((h // g * g) * Hk // Hq, (h // g * g) * Hv // Hq) for h in range(Hq)):
            return g
    return 1


def gather_cache(cache, b: int, length: int, block_table):
    """The first `length` keys (or values) of sequence b as [1, H, length, D]."""
    if block_table is None:
        return cache[b:b + 1, :, :length]
    page = cache.shape[2]
    pages = block_table[b, :(length + page - 1) // page].long()
    seq = cache[pages].permute(1, 0, 2, 3).reshape(cache.shape[1], -1, cache.shape[3])
    return seq[None, :, :length]


def cache_tile_means(k_cache, cache_seqlens, block_table, tile: int, capacity: int) -> torch.Tensor:
    """The mean key of every tile of `tile` positions of each sequence's valid keys, float64
    [B, Hk, ceil(capacity / tile), D] (0 for tiles past the sequence): a select's decode estimates
    each new query against them. One sequence at a time, through gather_cache: O(cache) reads."""
    from . import plan

    B = cache_seqlens.shape[0]
    n = -(-capacity // tile)
    out = torch.zeros(B, k_cache.shape[1], n, k_cache.shape[3], dtype=torch.float64, device=k_cache.device)
    for b, length in enumerate(cache_seqlens.tolist()):
        if length:
            means = plan.tile_means(gather_cache(k_cache, b, length, block_table), tile)
            out[b, :, :means.shape[2]] = means[0]
    return out


def chosen_key_tiles(selected, group: int, cache_seqlens, tile: int, block_n: int) -> tuple:
    """A select's decode walk: per (sequence, group of `group` query heads), the first keys of the
    kernel's key tiles (`block_n` keys) inside the selection tiles (`tile` keys) that some new query of
    some head of the group chose, in order, below the sequence's length: (starts int32 [B * groups,
    n], counts int32 [B * groups]); `selected` [B, Hq, Lnew, tiles] is the rows' choice."""
    B, Hq, Lnew, tiles = selected.shape
    union = (selected != 0).view(B, Hq // group, group * Lnew, tiles).any(2)
    starts = torch.arange(tiles * tile // block_n, device=selected.device) * block_n
    inside = union.repeat_interleave(tile // block_n, dim=-1) & (starts < cache_seqlens.to(starts.device)[:, None, None])
    inside = inside.reshape(B * (Hq // group), -1)
    order = torch.argsort((~inside).to(torch.int8), dim=-1, stable=True)  # the chosen tiles first, in order
    return starts[order].to(torch.int32).contiguous(), inside.sum(-1).to(torch.int32)


def sequence_inputs(sig: Signature, values: dict, b: int, length: int) -> dict:
    """The spec's inputs of one sequence: batch entry b, positions [0, length)."""
    out = dict(values)
    for t in sig.tensors:
        x = values[t.name]
        index = tuple(slice(b, b + 1) if a == "B" else slice(0, length) if a in ("Lq", "Lk", "L") else slice(None)
                      for a in t.axes)
        out[t.name] = x[index]
    return out
