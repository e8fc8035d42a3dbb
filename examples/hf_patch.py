"""Patch a Hugging Face model with lutflash in one call: FlashAttention + 3-bit LUT-GEMM linears.

Builds a tiny random Llama from a config (no download), keeps an unpatched copy for reference,
converts it with lutflash.patch_model, and compares logits with attn_implementation="eager".

    python examples/hf_patch.py
"""

import copy

import torch
import transformers

import lutflash


def main() -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    original = copy.deepcopy(model)

    summary = lutflash.patch_model(model, attention=True,
                                   linear=dict(bits=3, group_size=64, method="alternating"))
    print(f"attention implementation: {summary['attention']}")
    print(f"nn.Linear -> LutLinear:   {summary['linear_count']} layers, e.g. {summary['linear'][0]}")
    print(f"model bytes:              {summary['bytes_before']:,} -> {summary['bytes_after']:,}")

    input_ids = torch.randint(0, config.vocab_size, (2, 32))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :8] = 0  # left padding in the second sequence
    real = attention_mask.bool()
    with torch.no_grad():
        patched = model(input_ids, attention_mask=attention_mask).logits
        model.set_attn_implementation("eager")
        eager_same_weights = model(input_ids, attention_mask=attention_mask).logits
        unquantized = original(input_ids, attention_mask=attention_mask).logits
    model.set_attn_implementation("lutflash")

    attention_diff = (patched - eager_same_weights)[real].abs().max().item()
    quantization_diff = (patched - unquantized)[real].abs().max().item()
    print(f"max |logit diff| vs eager attention, same 3-bit weights: {attention_diff:.2e}")
    print(f"max |logit diff| vs the unquantized fp32 eager model:    {quantization_diff:.2e} "
          f"(logit scale {unquantized[real].abs().max().item():.2f})")


if __name__ == "__main__":
    main()
