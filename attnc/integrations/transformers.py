"""attnc specs as Hugging Face transformers attention backends (transformers v5's AttentionInterface).

    import attnc.integrations.transformers as attnc_hf
    attnc_hf.register("attnc_causal", "examples/causal.attn")
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="attnc_causal")

What HF hands an attention function, and what attnc does with it:

- Layouts: query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D], as attnc takes them; GQA needs no
  `repeat_kv` (query head h reads key head h * Hkv // Hq, as HF's repeat_kv pairs them). The output
  goes back as HF's [B, Lq, Hq, Dv].
- Masks: the spec's own mask is the attention pattern (causal, sliding window, ...), in the cache's
  index space, as HF's SDPA masks are. The registered mask function hands the attention function only
  HF's 2-D padding mask (left or right padding); when it holds a padding key, a variant of the spec
  with one more input, `keep: bool[B, Lk]`, ANDed into its mask in the IR (`ir.Variant.and_mask`),
  runs instead (built and cached once).
  Mask patterns HF composes on top (packed-sequence masks from position_ids, custom or/and masks) are
  not read: the spec says what the pattern is.
- Sliding windows: HF's `sliding_window` (Mistral, Qwen2, Gemma configs) goes to the spec's scalar
  parameter `window_param` ("window" by default); a config with a sliding window and a spec without
  that parameter is refused, as the window would be silently ignored. A layer HF runs without a window
  (sliding_window=None: Qwen2's layers past max_window_layers, Gemma 2's global layers) runs the spec
  with that parameter at infinity (`ir.Variant.unbounded`: `q - kv < window` becomes True), built at
  registration; a spec where that limit is not a spec is refused there. A model's `softcap` (Gemma 2)
  goes to the spec's parameter `softcap` or `cap` (examples/softcap.attn), or is refused.
- Decoding (Lq < Lk, queries at the last Lq positions of the cache: HF's dynamic caches, full or
  sliding): through `attn.decode` (forward only) when the generated module has it, there is no padding
  and no gradient is wanted; otherwise
  the queries are placed at the end of a zero-filled length-Lk query block, the full forward runs, and
  the last Lq rows are kept (exact, O(Lk^2) per step). Static (pre-allocated) caches are not handled.
- Training: gradients flow through attnc's backward; attention dropout is refused.

CPU tensors run the Triton kernels under TRITON_INTERPRET=1 and attnc's eager reference otherwise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import build
from ..pipeline import compile_text, read_spec

KEEP = "attnc_hf_keep"  # the padding input of a spec's padded variant

__all__ = ["AttnBackend", "padded_variant", "register"]


PADDED = ("padded", [(KEEP, "Lk", "kv")])  # build.load_text's and_mask: the padded variant's extra input


def padded_variant(text: str, where: str = "<spec>"):
    """The spec's IR with one more input, `attnc_hf_keep: bool[B, Lk]` (False for padding keys), ANDed
    into its mask, under the name `<name>_padded`."""
    return compile_text(text, where).and_mask(*PADDED)


class AttnBackend:
    """The attention function registered with HF: `backend(module, query, key, value, attention_mask,
    dropout=0.0, scaling=None, sliding_window=None, **kwargs) -> (output [B, Lq, Hq, Dv], None)`."""

    def __init__(self, spec_path, inputs: dict, window_param: str = "window"):
        self.where, self.text = read_spec(spec_path)
        self.attn = build.load(spec_path)
        self.inputs = dict(inputs)
        self.window_param = window_param
        self.params = {name for name, _ in self.attn.signature.params}
        # the spec's variant with a key-padding input, built now: torch.compile cannot trace a build
        self.padded = build.load_text(self.text, self.where, and_mask=PADDED)
        # Layers HF runs with no window (sliding_window=None: Qwen2's full layers past max_window_layers,
        # Gemma 2's global layers, models without a window) run the spec with its window at infinity
        # (ir.Variant.unbounded), not its default width.
        self.unwindowed = self.unwindowed_padded = None
        if window_param in self.params:
            if window_param in self.inputs:
                raise ValueError(f"{self.where}: register(..., {window_param}=...) would put one window on every "
                                 f"layer; the window comes from the model's config (sliding_window) per layer")
            unbounded = (window_param, "nowindow")
            self.unwindowed = build.load_text(self.text, self.where, unbounded=unbounded)
            self.unwindowed_padded = build.load_text(self.text, self.where, unbounded=unbounded, and_mask=PADDED)

    def _values(self, sliding_window):
        values = dict(self.inputs)
        if sliding_window is not None:
            if self.window_param not in self.params:
                raise ValueError(
                    f"{self.where}: the model's config has sliding_window={sliding_window}, but the spec has no "
                    f"parameter '{self.window_param}' to take it (its parameters: {sorted(self.params) or 'none'}); "
                    f"use a sliding-window spec (examples/sliding_window.attn) or register(..., window_param=...)")
            values[self.window_param] = int(sliding_window)
        return values

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                 sliding_window=None, **kwargs):
        if dropout and getattr(module, "training", False):
            raise NotImplementedError(f"{self.where}: attnc kernels have no attention dropout; set the config's "
                                      f"attention_dropout to 0 (got {dropout})")
        values = self._values(sliding_window)
        if kwargs.get("softcap") is not None:  # Gemma 2's attn_logit_softcapping
            names = [p for p in ("softcap", "cap") if p in self.params]
            if not names:
                raise ValueError(f"{self.where}: the model caps attention logits (softcap={kwargs['softcap']}) but "
                                 f"the spec has no 'softcap' or 'cap' parameter (examples/softcap.attn has one)")
            values[names[0]] = float(kwargs["softcap"])
        Lq, Lk = query.shape[2], key.shape[2]
        keep = self._keep(attention_mask, query.shape[0], Lk)
        attn, padded = self.attn, self.padded
        if sliding_window is None and self.unwindowed is not None:
            attn, padded = self.unwindowed, self.unwindowed_padded
        if keep is not None:
            attn, values = padded, {**values, KEEP: keep}
        if Lq == Lk:
            out = attn(query, key, value, scale=scaling, **values)
        elif Lq > Lk:
            raise ValueError(f"{self.where}: {Lq} queries but only {Lk} keys: attnc expects the queries to be the "
                             f"last positions of the key sequence (a static cache is not supported)")
        elif keep is None and hasattr(attn, "decode") and not (torch.is_grad_enabled() and query.requires_grad):
            seqlens = torch.full((query.shape[0],), Lk, dtype=torch.int32, device=query.device)
            out = attn.decode(query, key, value, seqlens, scale=scaling, **values)
        else:
            out = decode_by_forward(attn, query, key, value, scale=scaling, **values)
        return out.transpose(1, 2).contiguous(), None

    def _keep(self, attention_mask, batch, Lk):
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            shape = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"{self.where}: attnc takes HF's 2-D padding mask [B, Lk]; got {shape} (a prepared "
                             f"4-D mask cannot be mapped onto the spec's mask: express it in the spec instead)")
        keep = attention_mask[:, -Lk:].to(torch.bool)
        if keep.shape != (batch, Lk):
            raise ValueError(f"{self.where}: padding mask of shape {list(attention_mask.shape)} does not cover the "
                             f"{Lk} keys of a batch of {batch}")
        if torch.compiler.is_compiling():
            return keep  # no data-dependent shortcut while tracing
        return None if bool(keep.all()) else keep


def decode_by_forward(attn, query, key, value, scale=None, **inputs):
    """Queries at the last Lq positions of Lk keys, through the full-length forward: the queries go at
    the end of a zero-filled [B, Hq, Lk, D] block and the last Lq output rows are kept. Exact for any
    spec (the other rows are computed and dropped)."""
    B, Hq, Lq, D = query.shape
    Lk = key.shape[2]
    full = torch.cat([query.new_zeros((B, Hq, Lk - Lq, D)), query], dim=2)
    return attn(full, key, value, scale=scale, **inputs)[:, :, Lk - Lq:]


def register(name: str, spec_path, window_param: str = "window", **inputs) -> AttnBackend:
    """Make `attn_implementation=name` select the spec at `spec_path` in `from_pretrained` and
    `from_config`. `inputs` are the spec's extra inputs (scalar parameters, tensors such as ALiBi slopes),
    passed on every call; `window_param` is the spec parameter that takes a config's sliding_window."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as err:
        raise ImportError("attnc.integrations.transformers needs transformers v5 (pip install 'attnc[transformers]'); "
                          f"import failed: {err}") from None
    if not Path(spec_path).is_file():
        raise FileNotFoundError(f"attnc.integrations.transformers.register: no spec file at {spec_path}")
    backend = AttnBackend(spec_path, inputs, window_param)
    AttentionInterface.register(name, backend)
    AttentionMaskInterface.register(name, padding_mask)
    return backend


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                 **kwargs):
    """The mask function registered with HF: the 2-D boolean padding mask over the layer's keys, or None
    without padding (the spec supplies the pattern)."""
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:].to(torch.bool)
