"""Integer operations at their edges, each found by the build fuzzer (a mutated spec passed check
and then crashed the reference and plans):

- `a // 0` is 0 and `a % 0` is a (so a == (a // b) * b + a % b always holds), for divisors known
  only at run time (`q // (kv - 3)`), in the kernels, the reference and the plans;
- a constant score (`score s - s`) has row statistics in the general family's reference;
- `a >> n` with a count known only at run time: the count is clamped to [0, 62] (a negative count
reads as 0; past 62 every int64 shifts to 0 or -1, as at 62). Found by the build fuzzer: a mutated
spec `cx >> -kx` passed check and crashed the reference and plans (negative powers of two)."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import math

import pytest
import torch
from attnc.runtime import launch

import attnc
from attnc.errors import SpecError
from attnc.pipeline import compile_text


def _shift(a, n):
    n = n.clamp(0, 62)
    return torch.div(a, 2 ** n, rounding_mode="floor")


def test_run_time_shift_counts_through_the_kernels_reference_and_plan(tmp_path):
    path = tmp_path / "shifts.attn"
    path.write_text("attention shifts\nmask (q >> (2 - kv)) < 3 or (q >> (kv * 8)) == 0\n")
    fn = attnc.load(path)
    L, D = 13, 16
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    mask = (_shift(i, 2 - j) < 3) | (_shift(i, j * 8) == 0)
    assert not mask.all() and mask.any()
    assert torch.equal(torch.broadcast_to(fn.mask(Lq=L, Lk=L), (1, 1, L, L))[0, 0], mask)
    for blocks in [(1, 1), (4, 4)]:
        dense = fn.plan(Lq=L, Lk=L, block_m=blocks[0], block_n=blocks[1]).to_dense()[0, 0]
        tiles = torch.nn.functional.pad(mask, (0, -L % blocks[1], 0, -L % blocks[0]))
        visible = tiles.reshape(dense.shape[0], blocks[0], dense.shape[1], blocks[1]).any(-1).any(-2)
        assert torch.equal(dense > 0, visible)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, L, D, generator=g) for _ in range(3))
    with launch.count_visits() as log:
        o = fn(q, k, v)
    assert log
    s = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, float("-inf"))
    want = torch.softmax(s, -1).nan_to_num(0.0) @ v.double()
    assert (o.double() - want).abs().max().item() < 2e-3 * want.abs().max().item()


def test_a_negative_constant_count_is_refused():
    with pytest.raises(SpecError, match=r"e.attn:2:11: error: the shift count of '>>' is negative"):
        compile_text("attention e\nmask q >> -1 <= kv\n", "e.attn")


def _fdiv(a, d):
    safe = torch.where(d == 0, 1, d)
    return torch.where(d == 0, 0, torch.div(a, safe, rounding_mode="floor"))


def _fmod(a, d):
    safe = torch.where(d == 0, 1, d)
    return torch.where(d == 0, a, torch.remainder(a, safe))


def test_division_by_a_run_time_zero(tmp_path):
    path = tmp_path / "zero_div.attn"
    path.write_text("attention zero_div\nmask q // (kv - 3) == 0 and q % (5 - kv) < 3 or kv == 0\n")
    fn = attnc.load(path)
    L, D = 14, 16
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    mask = ((_fdiv(i, j - 3) == 0) & (_fmod(i, 5 - j) < 3)) | (j == 0)
    assert not mask.all() and mask[:, 3].all() and mask[:, 5].any()  # the columns with a zero divisor
    assert torch.equal(torch.broadcast_to(fn.mask(Lq=L, Lk=L), (1, 1, L, L))[0, 0], mask)
    for blocks in [(1, 1), (2, 2), (4, 4)]:
        dense = fn.plan(Lq=L, Lk=L, block_m=blocks[0], block_n=blocks[1]).to_dense()[0, 0]
        tiles = torch.nn.functional.pad(mask, (0, -L % blocks[1], 0, -L % blocks[0]))
        visible = tiles.reshape(dense.shape[0], blocks[0], dense.shape[1], blocks[1]).any(-1).any(-2)
        assert torch.equal(dense > 0, visible), blocks
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, L, D, generator=g) for _ in range(3))
    with launch.count_visits() as log:
        o = fn(q, k, v)
    assert log
    s = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, float("-inf"))
    want = torch.softmax(s, -1).nan_to_num(0.0) @ v.double()
    assert (o.double() - want).abs().max().item() < 2e-3 * want.abs().max().item()


def test_a_constant_score_has_a_reference(tmp_path):
    path = tmp_path / "flat.attn"
    path.write_text("attention flat\nmask kv <= q\nscore s - s\n")
    fn = attnc.load(path)
    L = 9
    q, k, v = (torch.randn(2, 2, L, 8, dtype=torch.float64) for _ in range(3))
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    want = (j <= i).double() / (j <= i).sum(-1, keepdim=True) @ v  # uniform over the visible keys
    assert (fn.reference(q, k, v).double() - want).abs().max().item() < 1e-6
    with launch.count_visits() as log:
        o = fn(q.float(), k.float(), v.float())
    assert log
    assert (o.double() - want).abs().max().item() < 1e-5
