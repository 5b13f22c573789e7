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
  Mask patterns HF composes on top (custom or/and masks) are not read: the spec says what the pattern
  is; packed sequences are read from the call's kwargs instead (below).
- Sliding windows: HF's `sliding_window` (Mistral, Qwen2, Gemma configs) goes to the spec's scalar
  parameter `window_param` ("window" by default); a config with a sliding window and a spec without
  that parameter is refused, as the window would be silently ignored. A layer HF runs without a window
  (sliding_window=None: Qwen2's layers past max_window_layers, Gemma 2's global layers) runs the spec
  with that parameter at infinity (`ir.Variant.unbounded`: `q - kv < window` becomes True), built at
  registration; a spec where that limit is not a spec is refused there. A model's `softcap` (Gemma 2)
  goes to the spec's parameter `softcap` or `cap` (examples/softcap.attn), or is refused.
- Padding-free training (several sequences concatenated into a batch of 1, as transformers'
  `DataCollatorWithFlattening` builds it): the call carries FlashAttention's varlen kwargs
  (`cu_seq_lens_q`, `cu_seq_lens_k`, `max_length_q`, `max_length_k`; with
  `return_flash_attn_kwargs=True`) or only `position_ids` that restart at each sequence (read on the
  host, as transformers' flash-attention path reads them, when there is no 2-D attention_mask). Either
  way `attn.varlen` runs, with each sequence's positions from 0, so the spec's mask applies within
  each sequence and never across two. No mask is built for it: without an attention_mask the
  registered mask function hands over None (transformers' packed-sequence mask is not materialized).
  A packed call whose cu_seq_lens do not run from 0 to the number of tokens, or whose query and key
  sequences differ (packed decoding), is refused with a ValueError naming them.
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
from typing import NamedTuple

import torch

from .. import build
from ..pipeline import compile_text, read_spec
from ..runtime import varlen

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
        packed = self._packed(query, key, attention_mask, kwargs)
        if packed is not None:
            if keep is not None:
                raise ValueError(f"{self.where}: a packed call (cu_seq_lens_q/k or restarting position_ids) with "
                                 f"padding in attention_mask: pack without padding (DataCollatorWithFlattening)")
            return varlen_call(attn, query, key, value, packed, scaling, values), None
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

    def _packed(self, query, key, attention_mask, kwargs) -> Packed | None:
        """The sequences of a padding-free batch (several sequences concatenated into a batch of 1), or
        None for a plain call. HF passes them as FlashAttention's varlen kwargs (DataCollatorWithFlattening
        with return_flash_attn_kwargs=True), or only as position_ids that restart at every sequence; those
        are read as transformers' flash-attention path reads them (prepare_fa_kwargs_from_position_ids):
        only without a 2-D attention_mask, and on the host (not while torch.compile traces: there the
        varlen kwargs must be passed)."""
        given = {name: kwargs.get(name) for name in VARLEN_KWARGS}
        if any(x is not None for x in given.values()):
            missing = [name for name, x in given.items() if x is None]
            if missing:
                raise ValueError(f"{self.where}: a packed call needs all of {', '.join(VARLEN_KWARGS)}; "
                                 f"{', '.join(missing)} missing")
            packed = Packed(*given.values())
        else:
            position_ids = kwargs.get("position_ids")
            if (position_ids is None or attention_mask is not None or query.shape[0] != 1
                    or query.shape[2] != key.shape[2] or position_ids.numel() != query.shape[2]
                    or torch.compiler.is_compiling()):
                return None
            cu = cu_seqlens_from_position_ids(position_ids)
            if cu is None:
                return None
            if int(cu[0]) != 0:
                raise ValueError(f"{self.where}: position_ids restart at tokens {cu[:-1].tolist()}, but the first "
                                 f"token does not start a sequence (its position is not the smallest)")
            longest = int(cu.diff().max())
            packed = Packed(cu, cu, longest, longest)
        if query.shape[0] != 1:
            raise ValueError(f"{self.where}: a packed call holds its sequences in a batch of 1; got a batch of "
                             f"{query.shape[0]}")
        device = query.device
        cu_q, cu_k = (cu.to(device=device, dtype=torch.int32) if isinstance(cu, torch.Tensor) else cu
                      for cu in (packed.cu_q, packed.cu_k))
        for name, cu, tokens in (("cu_seq_lens_q", cu_q, query.shape[2]), ("cu_seq_lens_k", cu_k, key.shape[2])):
            varlen.check_cu_seqlens(self.where, name, cu, tokens, device)  # attn.varlen's own checks
        if not torch.equal(cu_q.cpu(), cu_k.cpu()):
            raise ValueError(f"{self.where}: cu_seq_lens_q={cu_q.tolist()} differs from cu_seq_lens_k="
                             f"{cu_k.tolist()}: packed sequences with fewer queries than keys (packed "
                             f"decoding) are not supported; the spec reads q and kv from 0 in each sequence")
        return Packed(cu_q, cu_k, int(packed.max_q), int(packed.max_k))

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


class Packed(NamedTuple):
    """A padding-free batch, in FlashAttention's varlen terms: sequence i is tokens [cu_q[i], cu_q[i+1])."""
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int


VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # HF's names of Packed


def cu_seqlens_from_position_ids(position_ids) -> torch.Tensor | None:
    """cu_seqlens (int32) of a packed batch of 1 from its position_ids: a sequence starts wherever the
    position is the smallest one (0, or RoBERTa's padding_idx + 1), as in transformers'
    prepare_fa_kwargs_from_position_ids. None when there is only one sequence."""
    positions = position_ids.reshape(-1)
    starts = (positions == positions.min()).nonzero().view(-1)
    if starts.numel() < 2:
        return None
    total = torch.tensor([positions.numel()], device=starts.device)
    return torch.cat([starts, total]).to(torch.int32)


def varlen_call(attn, query, key, value, packed: Packed, scale, inputs):
    """HF's packed [1, H, total, D] tensors through `attn.varlen` (packed [total, H, D]); the output as
    HF's [1, total, Hq, Dv]. GQA as in a plain call: varlen runs the spec on each sequence's heads."""
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    out = attn.varlen(q, k, v, packed.cu_q, packed.cu_k, packed.max_q, packed.max_k, scale=scale, **inputs)
    return out[None]


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
