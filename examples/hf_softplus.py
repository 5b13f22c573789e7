"""Drop an attention that Hugging Face cannot otherwise run into a transformers model.

Length-scaled softplus attention (examples/softplus.attn: softplus(log(visible) * score), normalized
over the row's visible keys) and ALiBi with learnable per-head slopes (examples/alibi.attn) replace a
tiny Llama's attention through `attn_implementation=`; the model then runs, pads, generates and trains
as usual. Run from the repository root:

    python examples/hf_softplus.py                      # CPU: attnc's eager reference
    TRITON_INTERPRET=1 python examples/hf_softplus.py   # CPU: the Triton kernels, interpreted (slower)

Each step checks itself: a left-padded prompt gives the same logits and continuation as the same prompt
alone (padding keys are masked inside the spec, not approximated), and a training step reaches the slopes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import attnc.integrations.transformers as attnc_hf

HERE = Path(__file__).resolve().parent
HEADS = 4

attnc_hf.register("attnc_softplus", HERE / "softplus.attn")
slopes = torch.nn.Parameter(2.0 ** (-8.0 * torch.arange(1, HEADS + 1) / HEADS))  # the ALiBi paper's slopes
attnc_hf.register("attnc_alibi", HERE / "alibi.attn", slopes=slopes)

config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=128)

for implementation in ("attnc_softplus", "attnc_alibi"):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()
    prompt = torch.randint(0, config.vocab_size, (1, 12))
    # the same prompt twice in a batch: once alone, once behind 4 padding tokens (left padding)
    ids = torch.cat([torch.cat([prompt[:, :4], prompt], dim=1), torch.cat([torch.zeros_like(prompt[:, :4]), prompt], 1)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        alone = model(prompt).logits[0]
        padded = model(ids, attention_mask=mask).logits[1, 4:]
        out = model.generate(ids[1:], attention_mask=mask[1:], max_new_tokens=8, do_sample=False, pad_token_id=0)
        want = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    # RoPE positions follow HF's position_ids from the mask, so padded and alone agree up to rounding
    assert torch.allclose(padded, alone, atol=1e-4), (padded - alone).abs().max()
    assert torch.equal(out[:, 16:], want[:, 12:]), (out, want)
    print(f"{implementation}: padded logits match the prompt alone (max diff "
          f"{(padded - alone).abs().max().item():.1e}); greedy continuation {want[0, 12:].tolist()}")

# Training reaches the spec's learnable inputs: the slopes get gradients through attnc's backward.
model = AutoModelForCausalLM.from_config(config, attn_implementation="attnc_alibi").train()
loss = model(prompt, labels=prompt).loss
loss.backward()
assert slopes.grad is not None and slopes.grad.abs().sum() > 0
print(f"attnc_alibi: loss {loss.item():.3f}; d loss / d slopes = {slopes.grad.tolist()}")
