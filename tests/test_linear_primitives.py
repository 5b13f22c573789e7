"""The primitives of attnc/runtime/linear.py, each against its torch reference and against the formula
written here in float64 (quadratic attention with the decay: W[i, j] = lam^(i - j) fq_i . fk_j over the
visible keys, the state's keys before every query), in fp32, fp16 and bf16 and through strided views.
The Triton primitives run in the interpreter on the CPU (TRITON_INTERPRET=1, tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from attnc.runtime import linear

B, H, L, F, DV = 2, 3, 37, 8, 12  # 37: two full chunks of 16 and a partial one
CHUNK = 16
# fla's tests compare an output with its reference by the ratio of RMS error to RMS value
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 5e-3}


def _err_ratio(got, want):
    got, want = got.double(), want.double()
    return ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt().clamp(min=1e-12)).item()


def _inputs(seed, Lq=L, Lk=L, with_state=False):
    g = torch.Generator().manual_seed(seed)
    fq = torch.rand(B, H, Lq, F, generator=g, dtype=torch.float64)  # positive features (elu + 1 style)
    fk = torch.rand(B, H, Lk, F, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, Lk, DV, generator=g, dtype=torch.float64)
    log_decay = torch.log(torch.tensor([1.0, 0.9, 0.5], dtype=torch.float64))
    state = None
    if with_state:
        state = (torch.randn(B, H, F, DV, generator=g, dtype=torch.float64),
                 torch.rand(B, H, F, generator=g, dtype=torch.float64))
    return fq, fk, v, log_decay, state


def formula(fq, fk, v, log_decay=None, state=None, causal=True):
    """num, den, (S, z) in float64 from the definition, position by position of the weights."""
    Lq, Lk = fq.shape[2], fk.shape[2]
    lam = torch.ones(H, dtype=torch.float64) if log_decay is None else log_decay.double().exp()
    i = torch.arange(Lq, dtype=torch.float64)[:, None]
    j = torch.arange(Lk, dtype=torch.float64)[None, :]
    power = lam.view(1, H, 1, 1) ** (i - j).clamp(min=0)  # [1, H, Lq, Lk]
    w = torch.einsum("bhif,bhjf->bhij", fq.double(), fk.double()) * power
    if causal:
        w = w * (j <= i)
    num, den = torch.einsum("bhij,bhjd->bhid", w, v.double()), w.sum(-1)
    last = lam.view(1, H, 1, 1) ** (Lk - 1 - torch.arange(Lk, dtype=torch.float64)).view(1, 1, Lk, 1)
    S = torch.einsum("bhjf,bhjd->bhfd", fk.double() * last, v.double())
    z = (fk.double() * last).sum(2)
    if state is not None:
        S0, z0 = state[0].double(), state[1].double()
        before = lam.view(1, H, 1, 1) ** (i + 1)  # the state's keys precede every query
        num = num + torch.einsum("bhif,bhfd->bhid", fq.double() * before, S0)
        den = den + torch.einsum("bhif,bhf->bhi", fq.double() * before, z0)
        S = S + lam.view(1, H, 1, 1) ** Lk * S0
        z = z + lam.view(1, H, 1) ** Lk * z0
    return num, den, (S, z)


def _close(got, want, tol):
    for a, b in zip(got, want):
        assert a.dtype in (torch.float32, torch.float64) and a.shape == b.shape
        assert _err_ratio(a, b) <= tol, _err_ratio(a, b)


def _flat(result):
    num, den, (S, z) = result
    return num, den, S, z


def _strided(x, dtype):
    """x [B, H, L, D] in `dtype`, as the [B, H, L, D] view of a [B, L, H, D] tensor (not contiguous)."""
    view = x.transpose(1, 2).contiguous().to(dtype).transpose(1, 2)
    assert not view.is_contiguous()
    return view


# ---- the torch references against the formula (float64: to rounding) ------------------------------------

@pytest.mark.parametrize("decay", [False, True], ids=["no_decay", "decay"])
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "state"])
def test_references_equal_the_formula(decay, with_state):
    fq, fk, v, log_decay, state = _inputs(1, with_state=with_state)
    log_decay = log_decay if decay else None
    want = _flat(formula(fq, fk, v, log_decay, state))
    for got in (linear.causal_chunked_reference(fq, fk, v, log_decay, state, chunk=CHUNK),
                linear.parallel_reference(fq, fk, v, log_decay, state),
                linear.recurrent_reference(fq, fk, v, log_decay, state)):
        _close(_flat(got), want, 1e-12)
    _close(linear.chunk_state_reference(fk, v, log_decay, state), want[2:], 1e-12)
    full = _flat(formula(fq, fk, v, None, state, causal=False))
    _close(_flat(linear.full_reference(fq, fk, v, state)), full, 1e-12)
    _close(_flat(linear.parallel_reference(fq, fk, v, None, state, causal=False)), full, 1e-12)


def test_recurrent_step_is_one_position():
    """A decoding step after a prefill's state equals the formula's last row and final state."""
    fq, fk, v, log_decay, _ = _inputs(2)
    prefix = linear.chunk_state_reference(fk[:, :, :-1], v[:, :, :-1], log_decay)
    num, den, (S, z) = linear.recurrent_step(fq[:, :, -1], fk[:, :, -1], v[:, :, -1], log_decay, prefix)
    want_num, want_den, (want_S, want_z) = formula(fq, fk, v, log_decay)
    _close((num, den, S, z), (want_num[:, :, -1], want_den[:, :, -1], want_S, want_z), 1e-12)


def test_references_compute_in_fp32_whatever_the_inputs():
    fq, fk, v, log_decay, _ = _inputs(3)
    got = linear.causal_chunked_reference(fq.half(), fk.bfloat16(), _strided(v, torch.bfloat16), log_decay,
                                          chunk=CHUNK)
    assert all(x.dtype == torch.float32 for x in _flat(got))
    rounded = formula(fq.half().double(), fk.bfloat16().double(), v.bfloat16().double(), log_decay)
    _close(_flat(got), _flat(rounded), 1e-5)


# ---- the Triton primitives: strides and native dtypes, fp32 accumulation -----------------------------------

@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=lambda d: str(d).split(".")[-1])
def test_causal_chunked_reads_strided_native_inputs(dtype):
    fq, fk, v, log_decay, state = _inputs(4, with_state=True)
    views = [_strided(x, dtype) for x in (fq, fk, v)]
    got = _flat(linear.causal_chunked(*views, log_decay, state, chunk=CHUNK))
    assert all(x.dtype == torch.float32 for x in got)
    rounded = [x.double() for x in views]  # the formula of the values the kernel read
    _close(got, _flat(formula(*rounded, log_decay, state)), TOLERANCE[dtype])
    _close(got, _flat(linear.causal_chunked_reference(*views, log_decay, state, chunk=CHUNK)), TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=lambda d: str(d).split(".")[-1])
def test_full_reads_strided_native_inputs(dtype):
    fq, fk, v, _, state = _inputs(5, Lq=21, with_state=True)
    views = [_strided(x, dtype) for x in (fq, fk, v)]
    got = _flat(linear.full(*views, state, chunk=CHUNK))
    rounded = [x.double() for x in views]
    _close(got, _flat(formula(*rounded, None, state, causal=False)), TOLERANCE[dtype])
    _close(got, _flat(linear.full_reference(*views, state)), TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("decay", [False, True], ids=["no_decay", "decay"])
def test_chunk_state_reads_strided_native_inputs(dtype, decay):
    fq, fk, v, log_decay, state = _inputs(6, with_state=True)
    log_decay = log_decay if decay else None
    fk_view, v_view = _strided(fk, dtype), _strided(v, dtype)
    got = linear.chunk_state(fk_view, v_view, log_decay, state, chunk=CHUNK)
    assert all(x.dtype == torch.float32 for x in got)
    _close(got, formula(fq, fk_view.double(), v_view.double(), log_decay, state)[2], TOLERANCE[dtype])
    _close(got, linear.chunk_state_reference(fk_view, v_view, log_decay, state), TOLERANCE[dtype])


def test_chunk_state_is_forward_only():
    _, fk, v, _, _ = _inputs(7)
    with pytest.raises(ValueError, match="forward only"):
        linear.chunk_state(fk.float().requires_grad_(True), v.float(), chunk=CHUNK)


def test_a_prefill_state_then_recurrent_steps_equal_one_chunked_call():
    """chunk_state (Triton) hands recurrent_step the cache of a prefix; decoding the rest step by step
    gives the chunked call's rows."""
    fq, fk, v, log_decay, _ = _inputs(8)
    fq, fk, v = fq.float(), fk.float(), v.float()
    state = linear.chunk_state(fk[:, :, :30], v[:, :, :30], log_decay, chunk=CHUNK)
    whole = linear.causal_chunked(fq, fk, v, log_decay, chunk=CHUNK)
    for t in range(30, L):
        num, den, state = linear.recurrent_step(fq[:, :, t], fk[:, :, t], v[:, :, t], log_decay, state)
        _close((num, den), (whole[0][:, :, t], whole[1][:, :, t]), 1e-5)
    _close(state, whole[2], 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("primitive", ["causal_chunked", "full"])
def test_gradients_equal_the_formula(primitive, dtype):
    """The Triton backward (scans for the causal form, products for the full one) of num, den and the
    state, through strided native inputs and an initial state: the float64 formula's gradients."""
    fq, fk, v, log_decay, state = _inputs(9, with_state=True)
    causal = primitive == "causal_chunked"
    log_decay = log_decay if causal else None
    bases = [x.transpose(1, 2).contiguous().to(dtype).requires_grad_(True) for x in (fq, fk, v)]
    state32 = [x.float().requires_grad_(True) for x in state]
    views = [b.transpose(1, 2) for b in bases]
    if causal:
        got = linear.causal_chunked(*views, log_decay, tuple(state32), chunk=CHUNK)
    else:
        got = linear.full(*views, tuple(state32), chunk=CHUNK)
    leaves64 = [x.detach().double().requires_grad_(True) for x in views + state32]
    want = formula(*leaves64[:3], log_decay, tuple(leaves64[3:]), causal=causal)
    g = torch.Generator().manual_seed(10)
    cotangents = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in _flat(want)]
    d_got = torch.autograd.grad(sum((x.double() * c).sum() for x, c in zip(_flat(got), cotangents)),
                                bases + state32)
    d_want = torch.autograd.grad(sum((x * c).sum() for x, c in zip(_flat(want), cotangents)), leaves64)
    assert [d.dtype for d in d_got[:3]] == [dtype] * 3
    d_got = [d.transpose(1, 2) for d in d_got[:3]] + list(d_got[3:])
    for a, b in zip(d_got, d_want):
        assert _err_ratio(a, b) <= TOLERANCE[dtype] * 2, _err_ratio(a, b)
