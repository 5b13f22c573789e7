"""attnc specs as Hugging Face attention backends: tiny random Llama and Mistral models (2 layers, CPU)
against the same models on attn_implementation="sdpa".

The CPU runs attnc's eager reference here (TRITON_INTERPRET unset: the interpreter would make a
generate() loop slow); one test runs the Triton kernels through the interpreter on a single forward."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
)

import attnc.integrations.transformers as attnc_hf
from attnc.runtime import launch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import formulas

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
VOCAB, L = 64, 10
TOL = {"atol": 2e-5, "rtol": 2e-5}


@pytest.fixture(scope="module", autouse=True)
def backends():
    registered = {
        "attnc_causal": attnc_hf.register("attnc_causal", EXAMPLES / "causal.attn"),
        "attnc_sliding": attnc_hf.register("attnc_sliding", EXAMPLES / "sliding_window.attn"),
    }
    for backend in registered.values():
        assert backend.padded is not None  # built at register time, under conftest's TRITON_INTERPRET=1
    return registered


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _config(kind, **extra):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, **extra)  # GQA: 4 query heads, 2 KV heads
    return LlamaConfig(**common) if kind == "llama" else MistralConfig(sliding_window=4, **common)


def _pair(kind, impl):
    """The same random weights twice: one model on attnc, one on SDPA (built with from_config)."""
    models = []
    for attn in (impl, "sdpa"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(kind), attn_implementation=attn).eval()
        assert model.config._attn_implementation == attn
        models.append(model)
    return models


def _batch(padding):
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, L))
    mask = torch.ones(3, L, dtype=torch.long)
    if padding in ("left", "mixed"):
        mask[0, :3] = 0
    if padding in ("right", "mixed"):
        mask[1, 6:] = 0
    return ids, mask


CASES = [("llama", "attnc_causal"), ("mistral", "attnc_sliding")]


@pytest.mark.parametrize("kind, impl", CASES)
@pytest.mark.parametrize("padding", ["none", "left", "right", "mixed"])
def test_logits_equal_sdpa(kind, impl, padding, backends):
    ours, ref = _pair(kind, impl)
    ids, mask = _batch(padding)
    calls = []
    backend = backends[impl]
    original = type(backend).__call__
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(backend), "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
        got = ours(ids, attention_mask=mask).logits
    assert len(calls) == 2  # one call per layer: the backend is what ran
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
    keep = mask.bool()  # padding queries' rows are garbage in both (and differ: attnc gives 0, SDPA a mean)
    torch.testing.assert_close(got[keep], want[keep], **TOL)


@pytest.mark.parametrize("kind, impl", CASES)
@pytest.mark.parametrize("padding", ["none", "left"])
def test_greedy_generation_equals_sdpa(kind, impl, padding, backends):
    ours, ref = _pair(kind, impl)
    ids, mask = _batch(padding)
    attn, decodes = backends[impl].attn, []
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        if hasattr(attn, "decode"):  # the decoding steps without padding go through attn.decode
            decode = attn.decode
            mp.setattr(attn, "decode", lambda *a, **k: decodes.append(1) or decode(*a, **k))
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    if hasattr(attn, "decode") and padding == "none":
        assert len(decodes) == 7 * 2  # 7 steps after the prefill, 2 layers
    if hasattr(attn, "decode") and kind == "llama" and padding == "left":
        assert not decodes  # padding keys stay in the cache: the padded spec runs instead
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert got.shape == (3, L + 8)
    assert torch.equal(got, want), (got[:, L:], want[:, L:])


def test_the_window_is_applied():
    """The Mistral config's window reaches the spec: without it the logits differ from SDPA's."""
    ours, ref = _pair("mistral", "attnc_sliding")
    ids, _ = _batch("none")
    with torch.no_grad():
        want = ref(ids).logits
        ref.config.sliding_window = None  # SDPA without the window: a different answer
        ref.model.config.sliding_window = None
        for layer in ref.model.layers:
            layer.self_attn.config.sliding_window = None
        assert not torch.allclose(ref(ids).logits, want, atol=1e-3)
        torch.testing.assert_close(ours(ids).logits, want, **TOL)


def test_a_window_the_spec_cannot_take_is_refused():
    model = AutoModelForCausalLM.from_config(_config("mistral"), attn_implementation="attnc_causal").eval()
    ids, _ = _batch("none")
    with pytest.raises(ValueError, match="sliding_window=4, but the spec has no parameter 'window'"):
        model(ids)


def test_gradients_equal_sdpa():
    ours, ref = _pair("llama", "attnc_causal")
    ours.train()
    ref.train()
    ids, mask = _batch("left")
    keep = mask.bool()
    for model in (ours, ref):
        model(ids, attention_mask=mask).logits[keep].square().mean().backward()
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_from_pretrained(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(_config("llama")).save_pretrained(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="attnc_causal").eval()
    ref = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert ours.config._attn_implementation == "attnc_causal"
    ids, mask = _batch("mixed")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits[mask.bool()],
                                   ref(ids, attention_mask=mask).logits[mask.bool()], **TOL)


def test_decode_goes_through_attn_decode_when_present(backends):
    """A module with `decode` gets the decoding step (issue 11's API: q at the last Lq of cache_seqlens
    positions); here a stand-in decode built from the reference checks the call and its arguments."""
    backend = backends["attnc_causal"]
    seen = []

    def decode(q, k_cache, v_cache, cache_seqlens, block_table=None, scale=None, return_lse=False, **inputs):
        seen.append((q.shape[2], k_cache.shape[2], cache_seqlens.tolist(), block_table))
        Lk = int(cache_seqlens[0])
        return attnc_hf.decode_by_forward(backend.attn.reference, q, k_cache[:, :, :Lk], v_cache[:, :, :Lk],
                                          scale=scale, **inputs)

    ours, ref = _pair("llama", "attnc_causal")
    ids, mask = _batch("none")
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(backend.attn, "decode", decode, raising=False)
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert seen and all(lq == 1 and lk == cache and lens == [cache] * 3 and bt is None
                        for lq, lk, lens, bt in seen for cache in [lk])


MULTILINE = {  # masks over two lines, which a line-by-line text edit of the spec changed (issue 22)
    "or_continuation": ("mask kv < 0\n  or kv <= q\n", lambda i, j: (j < 0) | (j <= i)),
    "and_at_line_end": ("mask kv <= q and\n  q - kv < 4\n", lambda i, j: (j <= i) & (i - j < 4)),
}


def test_padded_variant_ands_the_whole_mask():
    import sympy

    from attnc import ir
    from attnc.pipeline import compile_text

    for text, _ in MULTILINE.values():
        spec = "attention two_lines\n" + text
        padded = attnc_hf.padded_variant(spec)
        keep = padded.tensor(attnc_hf.KEEP)
        assert padded.name == "two_lines_padded" and keep.axes == ("B", "Lk") and keep.dtype == "bool"
        want = sympy.And(compile_text(spec).mask, sympy.Ne(keep.load(ir.b, ir.kv), 0))
        assert padded.mask == want, padded.mask
    with pytest.raises(ValueError, match="'attnc_hf_keep' clashes"):
        attnc_hf.padded_variant("attention x\ninput attnc_hf_keep: bool[B, Lk]\nmask attnc_hf_keep[b, kv]\n")
    with pytest.raises(ValueError, match="axis 'Lq' indexed at 'kv'"):
        compile_text("attention x\n").and_mask("bad", [("m", "Lq", "kv")])


@pytest.mark.parametrize("case", sorted(MULTILINE))
def test_multiline_mask_with_padding_equals_formula(tmp_path, case):
    """HF's padding path on a two-line mask: the padding keys are masked for every query, whatever the
    spec's mask says on its second line (float64 formula: the spec's mask and the padding mask)."""
    text, mask_of = MULTILINE[case]
    path = tmp_path / f"{case}.attn"
    path.write_text(f"attention {case}\n" + text)
    backend = attnc_hf.AttnBackend(path, {})
    torch.manual_seed(3)
    B, Lk = 2, 7
    q, k, v = torch.randn(B, 4, Lk, 8), torch.randn(B, 2, Lk, 8), torch.randn(B, 2, Lk, 8)
    pad = torch.ones(B, Lk, dtype=torch.long)
    pad[0, :3] = 0  # left padding
    pad[1, 5:] = 0  # right padding
    out, _ = backend(None, q, k, v, pad, scaling=0.5)
    i, j = torch.arange(Lk)[:, None], torch.arange(Lk)[None, :]
    mask = mask_of(i, j)[None, None] & pad.bool()[:, None, None, :]
    want, _ = formulas.attention(q.double(), k.double(), v.double(), mask=mask, scale=0.5)
    torch.testing.assert_close(out.double(), want.transpose(1, 2), atol=1e-5, rtol=1e-5)


def _window_pair(config_of, impl, backend):
    """(attnc model, eager model) of the same random weights, one config object each (from_config writes
    the backend onto the config), and the sliding_window values the attnc backend was called with."""
    models = []
    for attn in (impl, "eager"):
        torch.manual_seed(0)
        models.append(AutoModelForCausalLM.from_config(config_of(), attn_implementation=attn).eval())
    assert models[1].config._attn_implementation == "eager"
    ids = torch.randint(0, VOCAB, (1, 300), generator=torch.Generator().manual_seed(4))
    seen = []
    original = type(backend).__call__

    def spy(self, *a, **k):
        seen.append(k.get("sliding_window"))
        return original(self, *a, **k)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(backend), "__call__", spy)
        got = models[0](ids).logits
        seen, calls = [], seen  # the calls of the first forward
        mp.setattr(backend, "unwindowed", None)  # the spec's default window (256) on the full layer, as before
        old = models[0](ids).logits
    with torch.no_grad():
        want = models[1](ids).logits
    assert len(seen) == 2  # the second forward ran on attnc too
    return got, old, want, calls


def _common(**extra):
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, **extra)


def test_qwen2_full_layers_run_without_the_window(backends):
    """Qwen2 with max_window_layers=1: HF passes sliding_window=None for the full layer, which must see
    every earlier key at L=300 > the spec's default window of 256 (HF's eager attention as reference)."""
    from transformers import Qwen2Config

    config_of = lambda: Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                    **_common())
    got, old, want, seen = _window_pair(config_of, "attnc_sliding", backends["attnc_sliding"])
    assert sorted(seen, key=str) == [8, None]  # one windowed layer, one full: the attnc backend ran both
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(old[:, 256:], want[:, 256:], atol=1e-3)  # the default window would be wrong
    torch.testing.assert_close(old[:, :256], want[:, :256], **TOL)


def test_qwen2_generation_past_the_default_window_equals_eager(backends):
    """Decoding steps at cache lengths past 256 on the full layer (attn.decode of the unbounded variant)."""
    from transformers import Qwen2Config

    models = []
    for attn in ("attnc_sliding", "eager"):
        torch.manual_seed(0)
        config = Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=1, **_common())
        models.append(AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval())
    ids = torch.randint(1, VOCAB, (2, 290), generator=torch.Generator().manual_seed(5))  # no pad token (0)
    mask = torch.ones_like(ids)
    unwindowed, decodes = backends["attnc_sliding"].unwindowed, []
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        decode = unwindowed.decode
        mp.setattr(unwindowed, "decode", lambda *a, **k: decodes.append(a[1].shape[2]) or decode(*a, **k))
        got = models[0].generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        want = models[1].generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert decodes == [291, 292, 293]  # the full layer's decoding steps ran without a window
    assert torch.equal(got, want), (got[:, 290:], want[:, 290:])


def test_gemma2_global_layers_run_without_the_window(tmp_path):
    """Gemma 2 alternates sliding and global layers, with capped logits: a spec with both parameters."""
    from transformers import Gemma2Config

    spec = tmp_path / "gemma2.attn"
    spec.write_text("attention gemma2\nparam window = 256\nparam cap = 50.0\nmask kv <= q and q - kv < window\n"
                    "score cap * tanh(s / cap)\n")
    backend = attnc_hf.register("attnc_gemma2", spec)
    config_of = lambda: Gemma2Config(sliding_window=8, head_dim=8, query_pre_attn_scalar=8,
                                     attn_logit_softcapping=5.0, **_common())
    got, old, want, seen = _window_pair(config_of, "attnc_gemma2", backend)
    assert sorted(seen, key=str) == [8, None]
    torch.testing.assert_close(got, want, atol=5e-5, rtol=5e-5)
    assert not torch.allclose(old[:, 256:], want[:, 256:], atol=1e-3)


def test_a_window_passed_to_register_is_refused():
    with pytest.raises(ValueError, match="would put one window on every layer"):
        attnc_hf.register("attnc_bad", EXAMPLES / "sliding_window.attn", window=8)


def test_a_window_that_cannot_be_unbounded_is_refused(tmp_path):
    spec = tmp_path / "odd.attn"
    spec.write_text("attention odd\nparam window = 4\nmask kv <= q\nscore s - window\n")
    with pytest.raises(ValueError, match="without its parameter 'window' .* is not a spec"):
        attnc_hf.register("attnc_odd", spec)


def test_kernels_through_the_interpreter(monkeypatch):
    """The Triton kernels (interpreted) in the model: one padded forward of the tiny Llama."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ours, ref = _pair("llama", "attnc_causal")
    ids, mask = _batch("left")
    with torch.no_grad(), launch.count_visits() as launches:
        got = ours(ids, attention_mask=mask).logits
    assert len(launches) == 2  # one forward kernel launch per layer: the kernels ran
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], **TOL)


def test_example_script_runs():
    """examples/hf_softplus.py checks itself (padding invariance, generation, gradients to the slopes)."""
    import runpy

    runpy.run_path(str(EXAMPLES / "hf_softplus.py"), run_name="__main__")


def test_softcap_reaches_the_spec_and_is_refused_without_it(backends):
    """Gemma 2's `softcap` kwarg: the softcap spec's `cap` parameter takes it; a spec without one refuses."""
    capped = attnc_hf.register("attnc_softcap", EXAMPLES / "softcap.attn")
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 4, 6, 8) * 3, torch.randn(2, 2, 6, 8) * 3, torch.randn(2, 2, 6, 8)
    out, weights = capped(None, q, k, v, None, scaling=0.5, softcap=2.0)
    assert weights is None
    want = capped.attn.reference(q, k, v, scale=0.5, cap=2.0).transpose(1, 2)
    torch.testing.assert_close(out, want)
    assert not torch.allclose(out, capped.attn.reference(q, k, v, scale=0.5).transpose(1, 2), atol=1e-3)
    with pytest.raises(ValueError, match="no 'softcap' or 'cap' parameter"):
        backends["attnc_causal"](None, q, k, v, None, scaling=0.5, softcap=2.0)


def test_compiled_model_fullgraph(monkeypatch):
    """torch.compile(fullgraph=True) of the model's forward with a padding mask: no graph break (the
    attnc custom op is one node; the padded variant is built at register time), logits equal SDPA's."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ours, ref = _pair("llama", "attnc_causal")
    ids, mask = _batch("left")
    torch._dynamo.reset()
    compiled = torch.compile(lambda ids, mask: ours(ids, attention_mask=mask).logits, fullgraph=True,
                             backend="aot_eager")
    with torch.no_grad(), launch.count_visits() as launches:
        got = compiled(ids, mask)
    assert len(launches) == 2
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], **TOL)
