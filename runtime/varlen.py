"""Ragged batches packed by token (FlashAttention's varlen convention), shared by generated modules:
argument checks, and what a launch needs of a packed batch. docs/decoding.md.

N sequences lie end to end in [total_tokens, H, D] tensors: sequence i holds the query tokens
cu_seqlens_q[i]:cu_seqlens_q[i + 1] and the key tokens cu_seqlens_k[i]:cu_seqlens_k[i + 1], its positions
counted from 0. The kernels run such a batch in the plain call's launches ([Note] varlen in
templates/skeleton.py.j2): they take the packed tensors as [1, H, total, D] views whose batch stride is 0,
their grid is (tiles of the longest sequence, N x heads), and each program reads its own sequence's first
tokens and lengths from the cu_seqlens on the device. So a call makes the same launches for 1 sequence
as for 1,000, and the host does O(N) work: the checks here, and for a plan-list mask one batched plan
(runtime/plan.py's classify with per-sequence lengths).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
from torch._subclasses.fake_tensor import is_fake

from .checks import Signature, _fail, _shape, batch_entries, same_device


# ---- checks: every mistake a ValueError naming the argument ----
def _listed(offsets: list[int]) -> str:
    """offsets for a message, elided past a dozen entries."""
    if len(offsets) <= 12:
        return str(offsets)
    return f"[{', '.join(map(str, offsets[:6]))}, ..., {', '.join(map(str, offsets[-3:]))}] ({len(offsets)} entries)"


def check_cu_seqlens(owner: str, name: str, cu, tokens: int, device) -> list[int] | None:
    """The offsets of `cu` (cu_seqlens_q or _k, or transformers' cu_seq_lens_q or _k): an int32 tensor
    [num_sequences + 1] on `device` that runs from 0 to `tokens` without decreasing. Raises
    "<owner>: argument '<name>': ...". Returns None where there are no values to read: while
    torch.compile traces (a device sync would break the graph), and for meta or fake tensors."""
    def fail(message):
        raise ValueError(f"{owner}: argument '{name}': {message}")

    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.shape[0] < 2:
        got = f"shape {_shape(cu)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
        fail(f"must be a 1-D tensor [num_sequences + 1]; got {got}")
    if cu.dtype != torch.int32:
        fail(f"expected dtype int32, got {cu.dtype}")
    if not same_device(cu.device, device):
        fail(f"is on {cu.device} but q is on {device}")
    if torch.compiler.is_compiling() or cu.device.type == "meta" or is_fake(cu):  # no values to read
        return None
    offsets = cu.cpu().tolist()
    if offsets[0] != 0 or offsets[-1] != tokens or any(a > b for a, b in pairwise(offsets)):
        fail(f"{name}={_listed(offsets)} does not cover the {tokens} packed tokens: it must start at 0, never "
             f"decrease and end at {tokens}")
    return offsets


def check_max_seqlen(owner: str, name: str, value, offsets: list[int] | None) -> int:
    """max_seqlen_q or _k: an int at least the longest sequence's length (at least 1)."""
    longest = 1 if offsets is None else max(1, max(b - a for a, b in pairwise(offsets)))
    if isinstance(value, bool) or not isinstance(value, int) or value < longest:
        raise ValueError(f"{owner}: argument '{name}': expected an int >= the longest sequence ({longest}), "
                         f"got {value!r}")
    return value


@dataclass(frozen=True)
class Packed:
    """A packed batch as the launches take it: the cu_seqlens (int32, on the kernels' device) and the
    longest lengths, which size the grid (the longest query sequence's tiles x N x heads) and the
    gradient buffers of learnable inputs ([N, Hq, max_q, max_k], as a padded batch's)."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int

    @property
    def count(self) -> int:
        return self.cu_q.shape[0] - 1

    def lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence's query and key lengths (int64, on the cu_seqlens' device): the plan of a
        plan-list mask bounds each sequence's tiles by them."""
        return self.cu_q.diff().long(), self.cu_k.diff().long()


def check_packed(sig: Signature, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> tuple:
    """(Packed, query offsets, key offsets) of an attn.varlen call: q [total_q, Hq, Dqk], k [total_k, Hk,
    Dqk] and v [total_k, Hv, Dv] (their dtypes, heads and dims are checked as a plain call's), and the
    cu_seqlens and max_seqlen. The offsets are None while torch.compile traces (see check_cu_seqlens)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            _fail(sig, name, f"expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            _fail(sig, name, f"expected a packed 3-D tensor [total_tokens, H, D], got shape {_shape(t)}")
    if k.shape[0] != v.shape[0]:
        _fail(sig, "v", f"holds {v.shape[0]} tokens but k holds {k.shape[0]}")
    cq = check_cu_seqlens(sig.spec, "cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    ck = check_cu_seqlens(sig.spec, "cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        _fail(sig, "cu_seqlens_k", f"describes {cu_seqlens_k.shape[0] - 1} sequences but cu_seqlens_q "
              f"{cu_seqlens_q.shape[0] - 1}")
    max_q = check_max_seqlen(sig.spec, "max_seqlen_q", max_seqlen_q, cq)
    max_k = check_max_seqlen(sig.spec, "max_seqlen_k", max_seqlen_k, ck)
    if sig.equal_lengths:
        if cq is not None and cq != ck:
            _fail(sig, "cu_seqlens_k", "the spec indexes queries and keys on one axis L, so every sequence needs "
                  f"as many keys as queries: cu_seqlens_k={_listed(ck)} differs from cu_seqlens_q={_listed(cq)}")
        if max_q != max_k:
            _fail(sig, "max_seqlen_k", f"the spec indexes queries and keys on one axis L: max_seqlen_k = {max_k} "
                  f"must equal max_seqlen_q = {max_q}")
    return Packed(cu_seqlens_q, cu_seqlens_k, max_q, max_k), cq, ck


# ---- the launches' view of a packed batch ----
def heads_major(*packed_tensors: torch.Tensor):
    """[total, H, D] -> [1, H, total, D] views with batch stride 0 ([Note] varlen: a program's off_b is its
    sequence, which must address nothing in the packed tensors)."""
    views = tuple(x.as_strided((1, x.shape[1], x.shape[0], x.shape[2]), (0, x.stride(1), x.stride(0), x.stride(2)),
                               x.storage_offset()) for x in packed_tensors)
    return views if len(views) > 1 else views[0]


def tokens_major(x: torch.Tensor) -> torch.Tensor:
    """[1, H, total, D] -> [total, H, D] (a view)."""
    return x[0].transpose(0, 1)


def new_heads(like: torch.Tensor, heads: int, width: int, packed: Packed | None, dtype=None) -> torch.Tensor:
    """A new [B, heads, L, width] tensor over the tokens of `like` ([B, H, L, D]): contiguous for a plain
    call (B, L of like); for a packed batch a token-major [total, heads, width] tensor (the layout the
    varlen op returns, so no copy follows) seen as [1, heads, total, width] with batch stride 0."""
    dtype = like.dtype if dtype is None else dtype
    if packed is None:
        return torch.empty((like.shape[0], heads, like.shape[2], width), device=like.device, dtype=dtype)
    return heads_major(torch.empty((like.shape[2], heads, width), device=like.device, dtype=dtype))


def kernel_args(packed: Packed | None, row_shape, Lq: int, Lk: int) -> dict:
    """The kernels' varlen arguments (keywords of every launch): VARLEN, the cu_seqlens (None in a plain
    call), ROWS (the entries of each row array: B * Hq * Lq, or Hq * total tokens) and MAX_LQ, MAX_LK
    (the rows and keys of the grid-shaped gradient buffers: Lq and Lk, or the longest sequence's)."""
    rows = row_shape[0] * row_shape[1] * row_shape[2]
    return {"VARLEN": packed is not None, "CU_Q": None if packed is None else packed.cu_q,
            "CU_K": None if packed is None else packed.cu_k, "ROWS": rows, "MAX_LQ": Lq, "MAX_LK": Lk}


# ---- a spec's inputs and scalar defaults per sequence ----
def length_groups(sig: Signature, offsets_q, offsets_k, count: int, heads: tuple, inputs: dict, defaults) -> list:
    """Scalar defaults may depend on the lengths (sigmoid's bias = -log(Lk)): the sequences grouped by the
    defaults they get, [(sequence indices, defaults)]; one group [(None, defaults)] when none differ.
    While torch.compile traces (no offsets), a default that depends on the lengths must be passed."""
    Hq, Hk, Hv = heads
    if offsets_q is None:
        depends = [name for name, value in defaults(1, 1, count, Hq, Hk, Hv).items()
                   if name not in inputs and value != defaults(2, 3, count, Hq, Hk, Hv)[name]]
        if depends:
            _fail(sig, depends[0], "its default depends on the sequence lengths, which a traced (torch.compile) "
                  "varlen call cannot read: pass it explicitly")
        return [(None, None)]
    groups: dict = {}
    by_lengths: dict = {}  # the defaults of each distinct (Lq, Lk): O(N) work, not N calls of `defaults`
    empty = []  # sequences without queries or keys output zeros (or nothing), whatever the defaults
    for i, (a, b, c, d) in enumerate(zip(offsets_q, offsets_q[1:], offsets_k, offsets_k[1:])):
        if a == b or c == d:
            empty.append(i)
            continue
        if (b - a, d - c) not in by_lengths:
            by_lengths[b - a, d - c] = defaults(b - a, d - c, count, Hq, Hk, Hv)
        values = by_lengths[b - a, d - c]
        key = tuple((name, value) for name, value in values.items() if name not in inputs)
        groups.setdefault(key, ([], values))[0].append(i)
    if len(groups) <= 1:
        return [(None, next(iter(groups.values()))[1] if groups else None)]
    first = next(iter(groups.values()))[0]
    first[:] = sorted(first + empty)
    return list(groups.values())


def sequence_lengths(offsets_q, offsets_k) -> list[tuple[int, int]]:
    """The distinct (Lq, Lk) of the sequences that have queries and keys (none while tracing)."""
    if offsets_q is None:
        return []
    pairs = {(b - a, d - c) for a, b, c, d in zip(offsets_q, offsets_q[1:], offsets_k, offsets_k[1:])}
    return sorted((lq, lk) for lq, lk in pairs if lq and lk)


def select_sequences(sig: Signature, sequences: list[int], q, k, v, offsets_q, offsets_k, inputs: dict) -> tuple:
    """The sub-batch of `sequences`: their tokens of q, k, v (gathered, differentiable), its cu_seqlens and
    longest lengths, its inputs (batch axes indexed by the sequences), and the token indices of its queries
    (where its outputs go)."""
    device = q.device
    pieces_q = [torch.arange(offsets_q[i], offsets_q[i + 1]) for i in sequences]
    pieces_k = [torch.arange(offsets_k[i], offsets_k[i + 1]) for i in sequences]
    tokens_q, tokens_k = torch.cat(pieces_q).to(device), torch.cat(pieces_k).to(device)
    lens_q = [len(p) for p in pieces_q]
    lens_k = [len(p) for p in pieces_k]
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    sub = batch_entries(sig, inputs, torch.tensor(sequences, device=device))
    return (q[tokens_q], k[tokens_k], v[tokens_k], cu(lens_q), cu(lens_k), max(max(lens_q), 1),
            max(max(lens_k), 1), sub, tokens_q)


def by_groups(sig: Signature, fn, groups, q, k, v, offsets_q, offsets_k, scale, inputs: dict):
    """One `fn` (varlen) call per group of sequences with the same length-dependent defaults; each output
    lands at its group's query tokens. The launches are fixed per group, not per sequence."""
    o = None
    for sequences, _ in groups:
        sq, sk, sv, cu_q, cu_k, max_q, max_k, sub, tokens = select_sequences(
            sig, sequences, q, k, v, offsets_q, offsets_k, inputs)
        part = fn(sq, sk, sv, cu_q, cu_k, max_q, max_k, scale=scale, **sub)
        o = part.new_zeros((q.shape[0], *part.shape[1:])) if o is None else o
        o = o.index_copy(0, tokens, part)
    return o


def per_sequence(sig: Signature, fn, q, k, v, cu_q, cu_k, scale, inputs: dict):
    """The eager path (the reference: float64, or the CPU without the interpreter): `fn` on each
    sequence's [1, H, L, D] views, inputs with a batch axis at the sequence's entry and token axes cut to
    its lengths. A sequence without keys outputs 0 on every row."""
    offsets_q, offsets_k = cu_q.tolist(), cu_k.tolist()
    outs = []
    for i in range(len(offsets_q) - 1):
        lq, lk = offsets_q[i + 1] - offsets_q[i], offsets_k[i + 1] - offsets_k[i]
        if lq == 0:
            continue
        if lk == 0:
            outs.append(q.new_zeros((lq, q.shape[1], v.shape[2])))
            continue
        seq_inputs = {}
        for name, x in inputs.items():
            spec = next((t for t in sig.tensors if t.name == name), None)
            if spec is not None and isinstance(x, torch.Tensor):
                index = tuple(slice(i, i + 1) if a == "B" else slice(0, lq) if a in ("Lq", "L") else
                              slice(0, lk) if a == "Lk" else slice(None) for a in spec.axes)
                x = x[index]
            seq_inputs[name] = x
        rows_q, rows_k = slice(offsets_q[i], offsets_q[i + 1]), slice(offsets_k[i], offsets_k[i + 1])
        o = fn(q[rows_q].transpose(0, 1)[None], k[rows_k].transpose(0, 1)[None], v[rows_k].transpose(0, 1)[None],
               scale=scale, **seq_inputs)
        outs.append(o[0].transpose(0, 1))
    if not outs:
        return q.new_zeros((0, q.shape[1], v.shape[2]))
    return torch.cat(outs)
