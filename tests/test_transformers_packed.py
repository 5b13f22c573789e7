"""Padding-free training through the Hugging Face backend: a tiny Llama (2 layers, 4 query heads on 2 KV
heads) on a packed batch (DataCollatorWithFlattening: the sequences concatenated into a batch of 1,
position_ids restarting, optionally FlashAttention's cu_seq_lens kwargs) against the same weights on the
padded batch, with attnc and with transformers' eager attention. The kernels run through the interpreter
(conftest's TRITON_INTERPRET=1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening, LlamaConfig

import attnc.integrations.transformers as attnc_hf

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
VOCAB = 64
NAME = "attnc_causal_packed"


@pytest.fixture(scope="module")
def backend():
    return attnc_hf.register(NAME, EXAMPLES / "causal.attn")


class Spy:
    """Stands in for a generated module in the backend: records its plain calls and its varlen calls
    (with their cu_seqlens and max lengths) and forwards both."""

    def __init__(self, attn):
        self.attn, self.plain, self.packed = attn, [], []

    def __call__(self, *args, **kwargs):
        self.plain.append(args[0].shape)
        return self.attn(*args, **kwargs)

    def varlen(self, q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        self.packed.append((cu_q.tolist(), cu_k.tolist(), max_q, max_k))
        return self.attn.varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


def _model(impl, state=None):
    """A tiny Llama on `impl`; one config object per model (from_config writes the backend onto it)."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl)
    assert model.config._attn_implementation == impl
    if state is not None:
        model.load_state_dict(state)
    return model


def _sequences(lengths):
    torch.manual_seed(1)
    return [torch.randint(0, VOCAB, (n,)).tolist() for n in lengths]


def _padded(sequences):
    """Right-padded batch and its 2-D padding mask."""
    width = max(map(len, sequences))
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, :len(seq)], mask[i, :len(seq)] = torch.tensor(seq), 1
    return ids, mask


def _logits_and_grads(model, weights, **batch):
    """Logits of the real tokens (in packed order) and the parameter gradients of a fixed linear loss
    over them."""
    mask = batch.pop("real")
    logits = model(**batch).logits[mask]
    model.zero_grad()
    (logits * weights).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("lengths", [[5, 1, 9, 3], [1, 1, 6, 1]])
@pytest.mark.parametrize("source", ["position_ids", "varlen_kwargs"])
def test_packed_training_equals_the_padded_batch(backend, monkeypatch, lengths, source):
    sequences = _sequences(lengths)
    packed = DataCollatorWithFlattening(return_flash_attn_kwargs=source == "varlen_kwargs")(
        [{"input_ids": seq} for seq in sequences])
    packed.pop("labels")
    assert packed["position_ids"].shape == (1, sum(lengths))
    ids, mask = _padded(sequences)
    weights = torch.randn(sum(lengths), VOCAB, generator=torch.Generator().manual_seed(2))

    ours = _model(NAME)
    state = ours.state_dict()
    spy, spy_padded = Spy(backend.attn), Spy(backend.padded)
    monkeypatch.setattr(backend, "attn", spy)
    monkeypatch.setattr(backend, "padded", spy_padded)
    masks, packed_call = [], attnc_hf.AttnBackend._packed
    monkeypatch.setattr(attnc_hf.AttnBackend, "_packed",
                        lambda self, q, k, mask, kw: masks.append(mask) or packed_call(self, q, k, mask, kw))
    got = _logits_and_grads(ours, weights, real=torch.ones(1, sum(lengths), dtype=torch.bool), **packed)
    cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert spy.packed == [(cu, cu, max(lengths), max(lengths))] * 2  # attn.varlen, once per layer
    assert not spy.plain and not spy_padded.plain and not spy_padded.packed
    assert masks == [None, None]  # HF built no [total, total] packed-sequence mask for the backend

    padded = _logits_and_grads(_model(NAME, state), weights, real=mask.bool(), input_ids=ids, attention_mask=mask)
    assert len(spy_padded.plain) == 2 and not spy_padded.packed  # the padded variant ran, once per layer
    assert len(spy.packed) == 2 and not spy.plain

    eager = _logits_and_grads(_model("eager", state), weights, real=mask.bool(), input_ids=ids, attention_mask=mask)
    for want in (padded, eager):
        _assert_close("logits", got[0], want[0])
        assert got[1].keys() == want[1].keys()
        for name in got[1]:
            _assert_close(name, got[1][name], want[1][name])


def _assert_close(name, got, want, rtol=1e-5):
    """Equal to fp32 rounding: the largest difference within rtol of the tensor's largest entry (sums of
    different orders differ by more than rtol on the entries that nearly cancel)."""
    error, size = (got - want).abs().max().item(), want.abs().max().item()
    assert error <= rtol * size, f"{name}: largest difference {error:.3g}, largest entry {size:.3g}"


def _call(backend, total=6, **kwargs):
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 4, total, 8), torch.randn(1, 2, total, 8), torch.randn(1, 2, total, 8)
    return backend(None, q, k, v, kwargs.pop("attention_mask", None), scaling=0.5, **kwargs)


def _varlen_kwargs(cu_q, cu_k=None):
    cu_q = torch.tensor(cu_q, dtype=torch.int32)
    cu_k = cu_q if cu_k is None else torch.tensor(cu_k, dtype=torch.int32)
    return {"cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k, "max_length_q": 6, "max_length_k": 6}


def test_a_direct_packed_call_equals_per_sequence_calls(backend):
    """The backend on [1, H, total, D] with varlen kwargs: each sequence attends within itself only."""
    out, weights = _call(backend, **_varlen_kwargs([0, 2, 3, 6]))
    assert weights is None and out.shape == (1, 6, 4, 8)
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    for a, b in ((0, 2), (2, 3), (3, 6)):
        want = backend.attn.reference(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale=0.5).transpose(1, 2)
        torch.testing.assert_close(out[:, a:b], want)


@pytest.mark.parametrize("kwargs, message", [
    (_varlen_kwargs([0, 2, 5]), r"cu_seq_lens_q=\[0, 2, 5\] does not cover the 6 packed tokens"),
    (_varlen_kwargs([0, 2, 6], [0, 2, 7]), r"cu_seq_lens_k=\[0, 2, 7\] does not cover the 6 packed tokens"),
    (_varlen_kwargs([1, 2, 6]), r"cu_seq_lens_q=\[1, 2, 6\] does not cover"),
    (_varlen_kwargs([0, 2, 6], [0, 3, 6]), r"differs from cu_seq_lens_k=\[0, 3, 6\].*packed decoding"),
    ({"cu_seq_lens_q": torch.tensor([0, 6], dtype=torch.int32)}, r"max_length_q, max_length_k missing"),
    ({**_varlen_kwargs([0, 2, 6]), "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]])}, r"padding"),
    ({"position_ids": torch.tensor([[2, 3, 0, 1, 2, 0]])}, r"first token does not start a sequence"),
])
def test_a_malformed_packed_call_is_refused(backend, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _call(backend, **kwargs)
