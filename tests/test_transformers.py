"""attn_implementation="lutflash" in Hugging Face transformers, and lutflash.patch_model.

Tiny random models (2 layers, hidden 64, 4 heads, vocab 128, fp32) built from configs, never
downloaded. Each check runs the same weights under attn_implementation="eager" and "lutflash":
logits with left and right padding (compared on real tokens only), greedy generation with a KV
cache, and the gradients of one training step.
"""

import inspect
import random
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lutflash  # noqa: E402
from lutflash.nn import LutLinear  # noqa: E402

VOCAB = 128
SEQ = 16
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64, initializer_range=0.1,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)

# Every config zeroes dropout so that training steps are deterministic, and uses an
# initializer_range large enough that attention patterns (and so masks, windows, softcap) matter.
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, num_key_value_heads=2),
    "mistral": lambda: transformers.MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=4),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, num_key_value_heads=2, use_sliding_window=True,
                                              sliding_window=4, max_window_layers=1),
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=16,
                                                sliding_window=4, attn_logit_softcapping=2.0,
                                                query_pre_attn_scalar=24),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                            n_positions=64, initializer_range=0.1, resid_pdrop=0.0,
                                            embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
                                            bos_token_id=1, eos_token_id=2),
    "opt": lambda: transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          word_embed_proj_dim=64, max_position_embeddings=64,
                                          init_std=0.1, dropout=0.0, attention_dropout=0.0,
                                          pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "bert": lambda: transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=128,
                                            max_position_embeddings=64, initializer_range=0.1,
                                            hidden_dropout_prob=0.0,
                                            attention_probs_dropout_prob=0.0, pad_token_id=0),
    # attention sinks (s_aux), alternating sliding-window and full layers, a mixture of experts
    "gpt_oss": lambda: transformers.GptOssConfig(**COMMON, num_key_value_heads=2, head_dim=16,
                                                 num_local_experts=4, num_experts_per_tok=2,
                                                 sliding_window=4, attention_dropout=0.0),
}
DECODERS = ["llama", "mistral", "qwen2", "gemma2", "gpt2", "opt", "gpt_oss"]


def build(family, attn_implementation="eager"):
    torch.manual_seed(0)
    config = CONFIGS[family]()
    auto = transformers.AutoModelForMaskedLM if family == "bert" else transformers.AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation=attn_implementation)
    for module in model.modules():  # sinks that weigh as much as a few keys
        if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
            with torch.no_grad():
                module.sinks.normal_(0.0, 2.0)
    return model.eval()


def padded_batch(padding, batch=3, seq=SEQ):
    """Random tokens; row r has r * (seq // 3) pads on the `padding` side ("left" or "right"),
    so row 0 is full and row 2 is two-thirds padding."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch):
        pads = row * (seq // 3)
        if padding == "left":
            mask[row, :pads] = 0
        else:
            mask[row, seq - pads:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def max_rel_diff(out, ref):
    """max |out - ref| relative to the scale of ref (at least 1)."""
    return ((out - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()


def logits_under(model, attn_implementation, **inputs):
    model.set_attn_implementation(attn_implementation)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(autouse=True)
def quiet_transformers():
    transformers.logging.set_verbosity_error()


CHECK_REGISTERED = (
    "from transformers import AttentionInterface\n"
    "from transformers.masking_utils import AttentionMaskInterface\n"
    "assert 'lutflash' in AttentionInterface._global_mapping\n"
    "assert 'lutflash' in AttentionMaskInterface._global_mapping\n"
)


@pytest.mark.parametrize("first", [
    "import sys, lutflash\nassert 'transformers' not in sys.modules\n",
    # Importing the integration module directly imports transformers while it is itself loading.
    "from lutflash.integrations.transformers import lutflash_attention_forward\n",
], ids=["lazy", "direct"])
def test_import_registers(first):
    """`import lutflash` does not import transformers; importing transformers afterwards (or
    the integration module directly) registers "lutflash" in both interfaces."""
    result = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c",
                             first + CHECK_REGISTERED], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_from_config_from_pretrained_and_set(tmp_path):
    model = build("llama", attn_implementation="lutflash")
    assert model.config._attn_implementation == "lutflash"
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="lutflash")
    assert loaded.config._attn_implementation == "lutflash"
    loaded.set_attn_implementation("eager")
    loaded.set_attn_implementation("lutflash")
    assert loaded.config._attn_implementation == "lutflash"
    assert all(layer.self_attn.config._attn_implementation == "lutflash" for layer in loaded.model.layers)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_logits_match_eager(family, padding):
    model = build(family)
    ids, mask = padded_batch(padding)
    ref = logits_under(model, "eager", input_ids=ids, attention_mask=mask)
    out = logits_under(model, "lutflash", input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert torch.isfinite(out[real]).all()
    assert max_rel_diff(out[real], ref[real]) < 1e-4
    # Without padding transformers passes no mask at all: the dense (non-varlen) path.
    ref = logits_under(model, "eager", input_ids=ids)
    out = logits_under(model, "lutflash", input_ids=ids)
    assert max_rel_diff(out, ref) < 1e-4


@pytest.mark.parametrize("family", DECODERS)
def test_greedy_generate_matches_eager(family):
    """Left-padded prompts, then 8 decode steps with a KV cache (Sq = 1 < Sk: bottom-right
    causal; sliding-window layers keep a cropped cache)."""
    model = build(family)
    ids, mask = padded_batch("left", seq=10)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    tokens = {}
    for implementation in ("eager", "lutflash"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            tokens[implementation] = model.generate(ids, attention_mask=mask, **settings)
    assert tokens["lutflash"].shape == (3, 18)
    assert torch.equal(tokens["lutflash"], tokens["eager"])


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "bert", "gpt_oss"])
def test_training_gradients_match_eager(family):
    """One training step (model.train(), padded batch) has the same loss and parameter
    gradients as eager: the attention backward pass, through the varlen path."""
    model = build(family).train()
    ids, mask = padded_batch("right")
    labels = ids.masked_fill(mask == 0, -100)
    grads, losses = {}, {}
    for implementation in ("eager", "lutflash"):
        model.set_attn_implementation(implementation)
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses[implementation] = loss.detach()
        grads[implementation] = {name: p.grad.clone() for name, p in model.named_parameters()
                                 if p.grad is not None}
    assert abs(losses["lutflash"] - losses["eager"]) < 1e-5 * max(1.0, abs(losses["eager"]))
    assert grads["lutflash"].keys() == grads["eager"].keys()
    for name, ref in grads["eager"].items():
        assert max_rel_diff(grads["lutflash"][name], ref) < 1e-4, name


def test_packed_sequences_match_separate_runs():
    """Three sequences packed in one row: position_ids restarting at 0 keep them apart (as the
    explicit cu_seq_lens_* / max_length_* keywords do), matching each sequence run alone."""
    model = build("llama")
    lengths = [5, 7, 4]
    ids = torch.randint(3, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(2))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    separate = []
    start = 0
    for n in lengths:
        separate.append(logits_under(model, "eager", input_ids=ids[:, start:start + n]))
        start += n
    ref = torch.cat(separate, dim=1)

    out = logits_under(model, "lutflash", input_ids=ids, position_ids=position_ids)
    assert max_rel_diff(out, ref) < 1e-4

    cu_seqlens = torch.tensor([0, 5, 12, 16], dtype=torch.int32)
    out = logits_under(model, "lutflash", input_ids=ids, position_ids=position_ids,
                       cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
                       max_length_q=max(lengths), max_length_k=max(lengths))
    assert max_rel_diff(out, ref) < 1e-4


def test_dropout_only_in_training():
    """attention_dropout reaches the kernel in training (seeded from torch's generator) and is
    off in eval mode."""
    torch.manual_seed(0)
    config = CONFIGS["llama"]()
    config.attention_dropout = 0.5
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="lutflash")
    ids, mask = padded_batch("left")
    inputs = dict(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        model.train()
        torch.manual_seed(5)
        first = model(**inputs).logits
        torch.manual_seed(5)
        again = model(**inputs).logits
        other = model(**inputs).logits
        model.eval()
        ref = logits_under(model, "eager", **inputs)
        out = logits_under(model, "lutflash", **inputs)
    real = mask.bool()
    assert torch.equal(first, again)
    assert max_rel_diff(other[real], first[real]) > 1e-3
    assert max_rel_diff(first[real], ref[real]) > 1e-3
    assert max_rel_diff(out[real], ref[real]) < 1e-4


def test_transformers_flash_wrapper_runs_lutflash(monkeypatch):
    """transformers' generic flash-attention wrapper (used by a few older model classes) loads
    lutflash's flash-attn-style entry points for the name "lutflash" and gets the same result."""
    import inspect

    from transformers import modeling_flash_attention_utils as flash_utils
    from transformers.integrations.flash_attention import flash_attention_forward

    # The loader keeps what it loaded in module globals: restore them afterwards.
    for name in ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn",
                 "_pad_fn", "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn"):
        if hasattr(flash_utils, name):
            monkeypatch.setattr(flash_utils, name, getattr(flash_utils, name))
    if "attn_implementation" not in inspect.signature(flash_utils._flash_attention_forward).parameters:
        # transformers 4.x: the wrapper does not pass the model's implementation to the loader
        # (it uses the flash implementation loaded last), so load "lutflash" by name first, the
        # way 4.x itself preloads flash_attention_2/3 and hub kernels.
        flash_utils.lazy_import_flash_attention("lutflash", force_import=True)

    model = build("llama", attn_implementation="lutflash")
    attention = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(3, 4, SEQ, 16, generator=generator)
    key, value = torch.randn(2, 3, 2, SEQ, 16, generator=generator)
    _, mask = padded_batch("left")
    for attention_mask in (None, mask.bool()):
        ref, _ = lutflash.integrations.transformers.lutflash_attention_forward(
            attention, query, key, value, attention_mask, scaling=0.3, sliding_window=5)
        out, _ = flash_attention_forward(attention, query, key, value, attention_mask,
                                         scaling=0.3, sliding_window=5)
        rows = slice(None) if attention_mask is None else attention_mask
        assert max_rel_diff(out[rows], ref[rows]) < 1e-5


def test_4d_masks():
    """A 4-D mask that is exactly key padding, causal or not (transformers 4.x models such as OPT
    build such masks themselves), boolean or additive, gives eager's result; any other 4-D mask
    is refused."""
    model = build("llama")
    ids, mask = padded_batch("left")
    real = mask.bool()
    allowed = real[:, None, None, :] & torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    minimum = torch.finfo(torch.float32).min
    causal_padded = torch.zeros(3, 1, SEQ, SEQ).masked_fill(~allowed, minimum)
    full = torch.zeros(3, 1, SEQ, SEQ)  # additive: every query sees every key
    for mask_4d, ref_mask in ((causal_padded, causal_padded), (allowed, causal_padded), (full, full)):
        ref = logits_under(model, "eager", input_ids=ids, attention_mask=ref_mask)
        out = logits_under(model, "lutflash", input_ids=ids, attention_mask=mask_4d)
        assert max_rel_diff(out[real], ref[real]) < 1e-4

    holed = allowed.clone()
    holed[0, 0, 9, 3] = False  # one query misses one key that the others see: not padding
    biased = causal_padded.clone()
    biased[0, 0, 9, 3] = -1.0  # an additive bias, not a mask
    model.set_attn_implementation("lutflash")
    for mask_4d in (holed, biased):
        with pytest.raises(ValueError, match="2-D"):
            model(input_ids=ids, attention_mask=mask_4d)


def test_sdpa_style_is_causal_with_padding_mask():
    """Models that pass is_causal=False because a mask is given (GPT-2 in transformers 4.x) with
    a 2-D padding mask still attend causally when the module declares is_causal = True; a module
    that declares nothing (BERT self-attention in 4.x) gets what it asks for."""
    forward = lutflash.integrations.transformers.lutflash_attention_forward
    generator = torch.Generator().manual_seed(4)
    query, key, value = torch.randn(3, 3, 4, SEQ, 16, generator=generator)
    _, mask = padded_batch("right")
    causal_module, plain_module = torch.nn.Module(), torch.nn.Module()
    causal_module.is_causal = True
    ref, _ = forward(causal_module, query, key, value, mask, is_causal=True)
    out, _ = forward(causal_module, query, key, value, mask, is_causal=False)
    assert torch.equal(out, ref)
    bidirectional, _ = forward(plain_module, query, key, value, mask, is_causal=False)
    assert max_rel_diff(bidirectional[mask.bool()], ref[mask.bool()]) > 1e-3
    # Inference tensors (no version counter) and the 4-D path.
    with torch.inference_mode():
        mask_4d = mask.bool()[:, None, None, :] & torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
        out, _ = forward(plain_module, query, key, value, mask_4d)
    assert max_rel_diff(out[mask.bool()], ref[mask.bool()]) < 1e-5


def test_patch_model_attention_and_linear():
    model = build("llama")
    ids, mask = padded_batch("left")
    summary = lutflash.patch_model(model, linear=dict(bits=3, group_size=32, progress=False),
                                   fuse=False)

    assert summary["attention"] == "lutflash" and summary["fused"] == []
    assert model.config._attn_implementation == "lutflash"
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    expected = [f"model.layers.{i}.{name}" for i in range(2) for name in per_layer]
    assert sorted(summary["linear"]) == sorted(expected)
    assert summary["linear_count"] == len(expected)
    assert all(isinstance(model.get_submodule(name), LutLinear) for name in expected)
    assert isinstance(model.lm_head, torch.nn.Linear)  # the output embedding is skipped by default
    assert 0 < summary["bytes_after"] < summary["bytes_before"]

    # Attention still matches eager once every projection is a LutLinear.
    ref = logits_under(model, "eager", input_ids=ids, attention_mask=mask)
    out = logits_under(model, "lutflash", input_ids=ids, attention_mask=mask)
    assert max_rel_diff(out[mask.bool()], ref[mask.bool()]) < 1e-4


def test_patch_model_options():
    model = build("gpt2")  # GPT-2 projections are Conv1D, so only lm_head is an nn.Linear
    summary = lutflash.patch_model(model, attention=False,
                                   linear=dict(bits=4, group_size=64, method="rtn", skip=(),
                                               progress=False))
    assert summary["attention"] is None
    assert model.config._attn_implementation == "eager"
    assert summary["linear"] == ["lm_head"]

    model = build("opt")
    summary = lutflash.patch_model(model)
    assert summary == {"attention": "lutflash", "linear": [], "linear_count": 0, "fused": [],
                       "mlps": [], "norms": [], "rotary": [], "bytes_before": summary["bytes_before"],
                       "bytes_after": summary["bytes_before"]}

    plain = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = lutflash.patch_model(plain, linear=dict(bits=2, group_size=64, progress=False))
    assert any("set_attn_implementation" in str(w.message) for w in caught)
    assert summary["attention"] is None and summary["linear"] == ["0", "2"]

    with pytest.raises(TypeError, match="linear"):
        lutflash.patch_model(plain, linear=3)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2"])
def test_patch_model_norms(family):
    """Llama-convention RMSNorms become lutflash.nn.RMSNorm sharing their weights: the same
    logits bit for bit on the CPU, the same state_dict; Gemma2's (1 + weight) norm is left."""
    model = build(family)
    for module in model.modules():  # weights away from 1, so that the weight's role shows
        if type(module).__name__ in lutflash.nn.RMS_NORM_CLASSES:
            module.weight.data.uniform_(0.5, 1.5)
    ids, mask = padded_batch("right")
    keys = sorted(model.state_dict())
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        summary = lutflash.patch_model(model, attention=False)
        out = model(input_ids=ids, attention_mask=mask).logits
    norms = [name for name, m in model.named_modules() if isinstance(m, lutflash.nn.RMSNorm)]
    if family == "gemma2":
        assert summary["norms"] == [] and norms == []
    else:
        assert sorted(summary["norms"]) == sorted(norms) and len(norms) == 2 * 2 + 1
    assert sorted(model.state_dict()) == keys
    assert torch.equal(out, ref)
    with torch.no_grad():  # another dtype than the weight's: the module's own promotion
        x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
        for name in norms[:1]:
            norm = model.get_submodule(name)
            assert norm(x).dtype == torch.float32


FUSED = {  # family -> the fused modules of layer 0
    "llama": ["self_attn.q_proj_k_proj_v_proj", "mlp.gate_proj_up_proj"],
    "mistral": ["self_attn.q_proj_k_proj_v_proj", "mlp.gate_proj_up_proj"],
    "qwen2": ["self_attn.q_proj_k_proj_v_proj", "mlp.gate_proj_up_proj"],
    "gemma2": ["self_attn.q_proj_k_proj_v_proj", "mlp.gate_proj_up_proj"],
    "opt": ["self_attn.q_proj_k_proj_v_proj"],
}


def patched_pair(family, device="cpu", dtype=torch.float32, bits=3, group_size=32):
    """The same model quantized the same way, unfused and fused."""
    models = []
    for fuse in (False, True):
        model = build(family).to(device=device, dtype=dtype)
        summary = lutflash.patch_model(model, linear=dict(bits=bits, group_size=group_size,
                                                          method="rtn", progress=False),
                                       fuse=fuse)
        models.append((model, summary))
    return models


@pytest.mark.parametrize("family", list(FUSED))
def test_patch_model_fuses_projections(family):
    (plain, _), (fused, summary) = patched_pair(family)
    prefix = "model.decoder.layers" if family == "opt" else "model.layers"
    assert sorted(summary["fused"]) == sorted(f"{prefix}.{i}.{name}" for i in range(2)
                                              for name in FUSED[family])
    for name in summary["fused"]:
        assert isinstance(fused.get_submodule(name), lutflash.nn.FusedLutLinear)
    attention = fused.get_submodule(f"{prefix}.0.self_attn")
    assert isinstance(attention.q_proj, lutflash.nn.LutLinearPart)
    assert not any(k.endswith("q_proj.planes") for k in fused.state_dict())
    # SiLU-gated MLPs run their fused gate/up output through one silu_mul (Gemma2's is GELU)
    gated = family in ("llama", "mistral", "qwen2")
    assert summary["mlps"] == ([f"{prefix}.{i}.mlp" for i in range(2)] if gated else [])
    for name in summary["mlps"]:
        assert isinstance(fused.get_submodule(name), lutflash.nn.GatedMLP)

    ids, mask = padded_batch("left")
    with torch.no_grad():
        ref = plain(input_ids=ids, attention_mask=mask).logits
        out = fused(input_ids=ids, attention_mask=mask).logits
    # each output row is the same product over k in both: the CPU kernel gives equal results
    assert torch.equal(out, ref)

    # greedy decoding with a KV cache (one-token steps)
    prompt = ids[:1, :6]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(fused.generate(prompt, **kwargs), plain.generate(prompt, **kwargs))


def test_fused_training_gradients_match_unfused():
    """Qwen2's q/k/v have biases: their gradients reach the fused bias, in the same order."""
    (plain, _), (fused, _) = patched_pair("qwen2")
    ids, mask = padded_batch("right")
    for model in (plain, fused):
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    for i in range(2):
        p_attn = plain.model.layers[i].self_attn
        f_attn = fused.model.layers[i].self_attn
        expected = torch.cat([p_attn.q_proj.bias.grad, p_attn.k_proj.bias.grad,
                              p_attn.v_proj.bias.grad])
        grad = f_attn.q_proj_k_proj_v_proj.fused.bias.grad
        assert max_rel_diff(grad, expected) < 1e-5
    assert max_rel_diff(fused.model.embed_tokens.weight.grad,
                        plain.model.embed_tokens.weight.grad) < 1e-5


def test_fused_parts_any_call_order_and_inputs():
    torch.manual_seed(3)
    layers = [LutLinear.from_linear(torch.nn.Linear(64, n, bias=b), 3, 32, "rtn")
              for n, b in ((40, True), (8, False), (24, True))]
    group = lutflash.nn.FusedLutLinear(layers)
    parts = [lutflash.nn.LutLinearPart(group, i) for i in range(3)]
    x, y = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    with torch.no_grad():
        expect = {(i, id(t)): layers[i](t) for i in range(3) for t in (x, y)}
        order = [(2, x), (0, y), (0, x), (1, x), (1, y), (2, y), (2, x)]
        for i, t in order:
            assert torch.equal(parts[i](t), expect[i, id(t)]), (i, order)
        parts[0](x)
        x.mul_(2)  # modified in place after the fused call: the others must see the new values
        assert torch.equal(parts[1](x), layers[1](x))
    assert group._pending is not None  # parts 0 and 2 of the last computation are pending
    with pytest.raises(ValueError, match="layers: expected LutLinear layers of one input size"):
        lutflash.nn.FusedLutLinear([layers[0], LutLinear.from_linear(torch.nn.Linear(32, 8), 3, 32)])


# ------------------------------------------------------------------------------------------
# The same models on the GPU in fp16 and bf16 (the CUDA kernels; fp32 attention is CPU-only).
# Yardstick as in test_attention_cuda.py: against the model run by eager attention in float32,
# lutflash's relative error is at most twice eager's own error in the same dtype, plus a floor.
# (float32, not float64: eager attention adds finfo(dtype).min to masked scores, which
# overflows to -inf in float64 and turns left-padded rows into NaN that leaks through V. The
# float32 error is ~1e-7, far below the fp16/bf16 errors measured here.)

GPU_DTYPES = [torch.float16, torch.bfloat16]


def relative_error(out, ref, scale=0.0):
    """|out - ref| / max(|ref|, scale) in the 2-norm."""
    return ((out.double() - ref.double()).norm() / max(ref.double().norm().item(), scale, 1e-30)).item()


def assert_within_naive(out, naive, ref, what, floor=1e-3, scale=0.0):
    err, naive_err = relative_error(out, ref, scale), relative_error(naive, ref, scale)
    assert err <= 2 * naive_err + floor, f"{what}: error {err:.3g}, eager in the same dtype {naive_err:.3g}"


def gpu_pair(family, device, dtype):
    """The same weights in float32 (the reference) and in `dtype`, both on `device`."""
    return (build(family).to(device=device, dtype=torch.float32),
            build(family).to(device=device, dtype=dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_gpu_logits_match_eager(family, padding, dtype, cuda_device):
    model32, model = gpu_pair(family, cuda_device, dtype)
    ids, mask = (t.to(cuda_device) for t in padded_batch(padding))
    for inputs in (dict(input_ids=ids, attention_mask=mask), dict(input_ids=ids)):
        real = mask.bool() if "attention_mask" in inputs else torch.ones_like(mask, dtype=torch.bool)
        ref = logits_under(model32, "eager", **inputs)[real]
        naive = logits_under(model, "eager", **inputs)[real]
        out = logits_under(model, "lutflash", **inputs)[real]
        assert torch.isfinite(out).all()
        assert_within_naive(out, naive, ref, f"logits, mask={'attention_mask' in inputs}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("family", DECODERS)
def test_gpu_greedy_generate_logits(family, dtype, cuda_device):
    """8 greedy steps with a KV cache (prefill, then Sq = 1 decode calls, sliding windows with
    a cropped cache): each step's logits against a float32 eager run over the generated tokens."""
    model32, model = gpu_pair(family, cuda_device, dtype)
    ids = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1)).to(cuda_device)
    model.set_attn_implementation("lutflash")
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                   output_logits=True, return_dict_in_generate=True)
    tokens = generated.sequences
    assert tokens.shape == (3, 18)
    steps = torch.stack(generated.logits, dim=1)  # the logits that chose tokens 10..17
    ref = logits_under(model32, "eager", input_ids=tokens)[:, 9:17]
    naive = logits_under(model, "eager", input_ids=tokens)[:, 9:17]
    assert torch.isfinite(steps).all()
    assert_within_naive(steps, naive, ref, "generation logits")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "bert"])
def test_gpu_training_gradients_match_eager(family, dtype, cuda_device):
    """One training step on a right-padded batch (the varlen backward)."""
    ids, mask = (t.to(cuda_device) for t in padded_batch("right"))
    labels = ids.masked_fill(mask == 0, -100)
    models = dict(zip(("ref", "naive"), gpu_pair(family, cuda_device, dtype), strict=True))
    results = {}
    for run, (key, implementation) in {"ref": ("ref", "eager"), "naive": ("naive", "eager"),
                                       "out": ("naive", "lutflash")}.items():
        model = models[key].train()
        model.set_attn_implementation(implementation)
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        results[run] = (loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()
                                        if p.grad is not None})
    (ref_loss, ref), (naive_loss, naive), (loss, out) = results["ref"], results["naive"], results["out"]
    assert_within_naive(loss.reshape(1), naive_loss.reshape(1), ref_loss.reshape(1), "loss")
    assert out.keys() == ref.keys()
    # A gradient that is zero in exact arithmetic (a key bias: softmax ignores it) is judged
    # against 1% of the whole gradient's norm rather than its own.
    scale = 0.01 * torch.stack([g.double().norm() for g in ref.values()]).norm().item()
    for name in ref:
        assert torch.isfinite(out[name]).all(), name
        assert_within_naive(out[name], naive[name], ref[name], name, scale=scale)


# ------------------------------------------------------------------------------------------
# A value head dim smaller than the query's (MLA), and the dropout rate that reaches the kernel.

def test_value_head_dim_smaller_than_query_head_dim():
    """v is zero-padded on the right up to the query head dim and the output cropped back:
    the result equals eager attention with the narrow v, on the dense, padded and packed paths."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    forward = lutflash.integrations.transformers.lutflash_attention_forward
    generator = torch.Generator().manual_seed(7)
    query = torch.randn(3, 4, SEQ, 24, generator=generator)
    key = torch.randn(3, 2, SEQ, 24, generator=generator)
    value = torch.randn(3, 2, SEQ, 8, generator=generator)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, 2, False
    _, mask = padded_batch("left")
    real = mask.bool()
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    for attention_mask in (None, mask):
        allowed = causal if attention_mask is None else real[:, None, None, :] & causal
        additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        ref, _ = eager_attention_forward(module, query, key, value, additive, scaling=0.3)
        out, _ = forward(module, query, key, value, attention_mask, scaling=0.3)
        assert out.shape == (3, SEQ, 4, 8)
        rows = slice(None) if attention_mask is None else real
        assert max_rel_diff(out[rows], ref[rows]) < 1e-5
    # packed: two sequences side by side in one row, kept apart by restarting position_ids
    position_ids = torch.cat([torch.arange(6), torch.arange(SEQ - 6)])[None]
    out, _ = forward(module, query[:1], key[:1], value[:1], None, scaling=0.3,
                     position_ids=position_ids)
    for span in (slice(0, 6), slice(6, SEQ)):
        n = span.stop - span.start
        alone = torch.zeros(n, n).masked_fill(~causal[:n, :n], torch.finfo(torch.float32).min)
        ref, _ = eager_attention_forward(module, query[:1, :, span], key[:1, :, span],
                                         value[:1, :, span], alone, scaling=0.3)
        assert max_rel_diff(out[:, span], ref) < 1e-5


def test_mla_model_matches_eager():
    """DeepSeek-V3's attention (MLA: query/key head dim 24, value head dim 8) under "lutflash"
    gives eager's logits, padded and not."""
    config = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=8,
        first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, max_position_embeddings=64, initializer_range=0.1, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ids, mask = padded_batch("left")
    for inputs, real in ((dict(input_ids=ids, attention_mask=mask), mask.bool()),
                         (dict(input_ids=ids), torch.ones_like(mask, dtype=torch.bool))):
        ref = logits_under(model, "eager", **inputs)
        out = logits_under(model, "lutflash", **inputs)
        assert max_rel_diff(out[real], ref[real]) < 1e-4


def test_dropout_rate_reaches_the_kernel_unchanged():
    """The kernel runs with exactly the dropout rate the module passes: through the integration
    with a fixed seed the output equals, bitwise, flash_attention called directly with that rate
    (dense path) and flash_attention_varlen (padded path)."""
    forward = lutflash.integrations.transformers.lutflash_attention_forward
    generator = torch.Generator().manual_seed(8)
    query = torch.randn(2, 4, SEQ, 16, generator=generator)
    key, value = torch.randn(2, 2, 2, SEQ, 16, generator=generator)
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    torch.manual_seed(21)
    out, _ = forward(module, query, key, value, None, dropout=0.3, scaling=0.25)
    torch.manual_seed(21)
    direct = lutflash.flash_attention(q, k, v, causal=True, softmax_scale=0.25, dropout_p=0.3)
    assert torch.equal(out, direct)
    torch.manual_seed(21)
    other_rate = lutflash.flash_attention(q, k, v, causal=True, softmax_scale=0.25, dropout_p=0.15)
    assert not torch.equal(out, other_rate)

    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, :5] = 0  # left padding: the varlen path
    torch.manual_seed(22)
    out, _ = forward(module, query, key, value, mask, dropout=0.3, scaling=0.25)
    cu = torch.tensor([0, SEQ, 2 * SEQ - 5], dtype=torch.int32)
    keep = mask.bool().flatten()
    packed = [t.reshape(-1, *t.shape[2:])[keep] for t in (q, k, v)]
    torch.manual_seed(22)
    direct = lutflash.flash_attention_varlen(*packed, cu, cu, SEQ, SEQ, causal=True,
                                             softmax_scale=0.25, dropout_p=0.3)
    assert torch.equal(out.reshape(-1, 4, 16)[keep], direct)


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "varlen"])
def test_dropout_mask_statistics_through_the_integration(padded):
    """With v the identity (Sk = head dim) the output is P · keep / (1 - p): the fraction of
    dropped probabilities is the configured p, and the kept ones are scaled by 1 / (1 - p)."""
    forward = lutflash.integrations.transformers.lutflash_attention_forward
    p, heads, seq = 0.25, 4, 64
    generator = torch.Generator().manual_seed(9)
    query = torch.randn(2, heads, seq, seq, generator=generator) * 0.1
    key = torch.randn(2, heads, seq, seq, generator=generator) * 0.1
    value = torch.eye(seq).expand(2, heads, seq, seq)
    module = torch.nn.Module()
    module.is_causal = False
    mask = torch.ones(2, seq, dtype=torch.long) if padded else None
    if padded:
        mask[1, :3] = 0  # one padded key: the varlen path
    plain, _ = forward(module, query, key, value, mask, is_causal=False)
    torch.manual_seed(3)
    dropped, _ = forward(module, query, key, value, mask, dropout=p, is_causal=False)
    visible = plain > 0  # the probabilities the kernel computed (padded keys are exactly 0)
    kept = dropped[visible] != 0
    assert abs(1 - kept.double().mean().item() - p) < 0.015
    torch.testing.assert_close(dropped[visible][kept], plain[visible][kept] / (1 - p),
                               rtol=1e-5, atol=0)


def test_model_dropout_rate_reaches_the_kernel(monkeypatch):
    """A model configured with attention_dropout = 0.3 makes every kernel call with exactly 0.3
    in training and 0 in eval mode."""
    integration = lutflash.integrations.transformers
    rates = []
    for name in ("flash_attention", "flash_attention_varlen"):
        original = getattr(integration, name)

        def recording(*args, _original=original, **kwargs):
            rates.append(kwargs.get("dropout_p"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(integration, name, recording)
    torch.manual_seed(0)
    config = CONFIGS["llama"]()
    config.attention_dropout = 0.3
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="lutflash")
    ids, mask = padded_batch("left")
    with torch.no_grad():
        for train, expected in ((True, 0.3), (False, 0.0)):
            model.train(train)
            for inputs in (dict(input_ids=ids, attention_mask=mask), dict(input_ids=ids)):
                rates.clear()
                model(**inputs)
                assert rates == [expected] * config.num_hidden_layers, (train, rates)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_gpu_fused_projections_match_unfused(family, dtype, cuda_device):
    """On the GPU the fused call may split k differently (its n is larger), so the sums are
    rounded in another order: equal within a few rounding steps of the dtype, and greedy
    generation picks the same tokens on this model."""
    (plain, _), (fused, _) = patched_pair(family, cuda_device, dtype)
    ids, mask = padded_batch("left")
    ids, mask = ids.to(cuda_device), mask.to(cuda_device)
    with torch.no_grad():
        ref = plain(input_ids=ids, attention_mask=mask).logits
        out = fused(input_ids=ids, attention_mask=mask).logits
    assert relative_error(out[mask.bool()], ref[mask.bool()]) < 8 * torch.finfo(dtype).eps


def test_fused_parts_under_inference_mode():
    torch.manual_seed(4)
    layers = [LutLinear.from_linear(torch.nn.Linear(32, n), 2, 32, "rtn") for n in (16, 8)]
    group = lutflash.nn.FusedLutLinear(layers)
    parts = [lutflash.nn.LutLinearPart(group, i) for i in range(2)]
    with torch.inference_mode():
        x = torch.randn(3, 32)
        assert torch.equal(parts[0](x), layers[0](x))
        assert torch.equal(parts[1](x), layers[1](x))
        assert group._pending is None


ROTARY_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2"]


def rotary_function(family):
    import importlib

    return importlib.import_module(f"transformers.models.{family}.modeling_{family}").apply_rotary_pos_emb


def rotary_inputs(rng, device, dtype, generator, decode=True):
    """q, k as transformers makes them ((batch, heads, seq, head_dim) views of a projection's
    output, here sometimes of one fused q/k/v output) and cos, sin (batch or 1, seq, head_dim)."""
    batch, heads, kv_heads, seq = rng.randint(1, 4), rng.randint(1, 6), rng.randint(1, 3), 1
    head_dim = 2 * rng.randint(1, 72)
    if not decode:
        seq = rng.randint(2, 5)
    width = (heads + 2 * kv_heads) * head_dim
    out = torch.randn(batch, seq, width, generator=generator).to(device, dtype)
    q = out[..., :heads * head_dim].view(batch, seq, heads, head_dim).transpose(1, 2)
    k = out[..., heads * head_dim:(heads + kv_heads) * head_dim]
    k = k.view(batch, seq, kv_heads, head_dim).transpose(1, 2)
    if rng.random() < 0.3:
        q, k = q.contiguous(), k.contiguous()
    angles = torch.rand(rng.choice((1, batch)), seq, head_dim // 2, generator=generator) * 40
    angles = torch.cat((angles, angles), dim=-1)
    return q, k, angles.cos().to(device, dtype), angles.sin().to(device, dtype)


def test_use_lutflash_rotary_wraps_once_and_stays_exact():
    from lutflash.integrations.transformers import ROTARY_MODULES, use_lutflash_rotary

    model = build("llama")
    names = use_lutflash_rotary(model)
    assert names == ["transformers.models.llama.modeling_llama"] and names[0] in ROTARY_MODULES
    function = rotary_function("llama")
    assert use_lutflash_rotary(model) == names and rotary_function("llama") is function
    assert function._lutflash and not getattr(function.__wrapped__, "_lutflash", False)
    rng, generator = random.Random(5), torch.Generator().manual_seed(5)
    for decode in (True, False):  # on the CPU every call is transformers' own
        q, k, cos, sin = rotary_inputs(rng, "cpu", torch.float32, generator, decode)
        for got, want in zip(function(q, k, cos, sin), function.__wrapped__(q, k, cos, sin)):
            assert torch.equal(got, want)
    assert lutflash.patch_model(build("opt"), attention=False)["rotary"] == []


@pytest.mark.cuda
@pytest.mark.parametrize("family", ROTARY_FAMILIES)
def test_gpu_lutflash_rotary_equals_transformers_bits(family, cuda_device):
    """The patched apply_rotary_pos_emb gives transformers' bits: the decode kernel for one
    position per sequence, transformers' own function otherwise."""
    from lutflash.integrations.transformers import use_lutflash_rotary

    if family == "qwen3":  # (not in CONFIGS: the attention tests cover its Qwen2 base)
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.Qwen3Config(**COMMON, num_key_value_heads=2))
    else:
        model = build(family)

    assert use_lutflash_rotary(model) == [f"transformers.models.{family}.modeling_{family}"]
    function = rotary_function(family)
    rng, generator = random.Random(7), torch.Generator().manual_seed(7)
    for case in range(40):
        dtype = rng.choice(GPU_DTYPES + [torch.float32])
        q, k, cos, sin = rotary_inputs(rng, cuda_device, dtype, generator, decode=case % 4 != 3)
        got, want = function(q, k, cos, sin), function.__wrapped__(q, k, cos, sin)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and torch.equal(g, w), (family, case, dtype)


# ------------------------------------------------------------------------------------------
# KV caches: transformers' StaticCache, continuous batching (generate_batch over a paged cache)
# and beam search, each against eager. lutflash attends a static cache's valid keys only: the
# rows a cache has not written yet are NaN in these tests (eager, whose additive mask would turn
# NaN keys into NaN rows, runs on the plain cache).


@pytest.fixture
def poison_unwritten_static_rows(monkeypatch):
    """While set: before each StaticCache layer update, every row the layer has not written yet
    (the unused tail of its max_cache_len or window) is NaN, so that attending one shows."""
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    def poisoning(original):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            seen = int(self.get_seq_length())
            self.keys[:, :, seen:] = float("nan")
            self.values[:, :, seen:] = float("nan")
            return original(self, key_states, value_states, *args, **kwargs)
        return update

    for cls in (StaticLayer, StaticSlidingWindowLayer):
        monkeypatch.setattr(cls, "update", poisoning(cls.__dict__["update"]))


def recording(monkeypatch, name):
    """Replaces lutflash.integrations.transformers.<name> by a wrapper that appends the
    arguments of each call to the returned list."""
    integration = lutflash.integrations.transformers
    calls, original = [], getattr(integration, name)

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(integration, name, record)
    return calls


def generate_both(model, ids, poison, **settings):
    """model.generate under eager and then lutflash (with the unwritten static-cache rows NaN,
    through the `poison` fixture's patch, set up only for that run)."""
    results = {}
    for implementation in ("eager", "lutflash"):
        model.set_attn_implementation(implementation)
        if implementation == "lutflash":
            poison()
        with torch.no_grad():
            results[implementation] = model.generate(ids, **settings, return_dict_in_generate=True)
    return results["eager"], results["lutflash"]


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_static_cache_generate_matches_eager(family, request):
    """generate(cache_implementation="static") on left-padded prompts: the k/v of each layer are
    max_cache_len long (or the window), the 2-D mask covers the keys written so far, and lutflash
    gives eager's tokens and logits without reading the rest (NaN here)."""
    model = build(family)
    ids, mask = padded_batch("left", seq=10)
    ref, out = generate_both(model, ids, lambda: request.getfixturevalue("poison_unwritten_static_rows"),
                             attention_mask=mask, max_new_tokens=8, do_sample=False,
                             pad_token_id=0, cache_implementation="static", output_logits=True)
    assert out.sequences.shape == (3, 18)
    assert torch.equal(out.sequences, ref.sequences)
    logits, ref_logits = torch.stack(out.logits, 1), torch.stack(ref.logits, 1)
    assert torch.isfinite(logits).all()
    assert max_rel_diff(logits, ref_logits) < 1e-4


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_static_cache_without_mask_is_one_kvcache_call_on_the_valid_keys(family, monkeypatch,
                                                                        request):
    """A decode loop over a StaticCache with no attention_mask (what lutflash.generation's
    static loop runs): each layer makes one flash_attention_with_kvcache call on the cache as
    it lies, stopping at the keys written so far (a device tensor for full layers, an int for
    sliding ones, whose window is longer than the 2-token prompt here), and the logits are
    eager's."""
    from transformers import StaticCache

    model = build(family)
    layers = model.config.num_hidden_layers
    prompt = torch.randint(3, VOCAB, (3, 2), generator=torch.Generator().manual_seed(6))
    logits = {}
    for implementation in ("eager", "lutflash"):
        model.set_attn_implementation(implementation)
        if implementation == "lutflash":
            request.getfixturevalue("poison_unwritten_static_rows")
            calls = recording(monkeypatch, "flash_attention_with_kvcache")
        cache = StaticCache(config=model.config, max_cache_len=20)
        with torch.no_grad():
            steps = [model(input_ids=prompt, past_key_values=cache, use_cache=True).logits]
            for i in range(6):
                token = steps[-1][:, -1:].argmax(-1)
                steps.append(model(input_ids=token, position_ids=torch.full((3, 1), 2 + i),
                                   past_key_values=cache, use_cache=True).logits)
        logits[implementation] = torch.cat(steps, dim=1)
    assert torch.isfinite(logits["lutflash"]).all()
    assert max_rel_diff(logits["lutflash"], logits["eager"]) < 1e-4

    # What each layer's call covers: full layers, the 2 + step keys written so far of their 20;
    # sliding ones (Mistral's every layer, Gemma2's even ones; window 4), the same while the
    # window holds more than that (steps 0 and 1), and later no KV-cache call (the whole window
    # is valid: dense attention).
    window = getattr(model.config, "sliding_window", None)
    layer_types = (getattr(model.config, "layer_types", None)
                   or ["sliding_attention" if window else "full_attention"] * layers)
    expected = [(4 if kind == "sliding_attention" else 20, 2 + step)
                for step in range(7) for kind in layer_types
                if kind == "full_attention" or 2 + step < 4]
    seen = []
    for args, kwargs in calls:
        q, k_cache = args[:2]
        assert len(args) == 3 and "k" not in kwargs  # nothing appended: transformers wrote it
        lengths = kwargs["cache_seqlens"]
        if isinstance(lengths, torch.Tensor):  # (B,) int32 on the device
            assert lengths.dtype == torch.int32 and lengths.tolist() == [lengths[0].item()] * 3
            lengths = lengths[0].item()
        seen.append((k_cache.shape[1], lengths))
    assert seen == expected


def test_static_prefix_mask_in_training_takes_the_varlen_path():
    """The KV-cache kernel has no backward and no dropout: with gradients to compute, the prefix
    mask of a static cache is unpadded into a varlen call instead, with the same output and
    eager's gradients."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    integration = lutflash.integrations.transformers
    generator = torch.Generator().manual_seed(10)
    query = torch.randn(2, 4, 3, 16, generator=generator)
    key, value = torch.randn(2, 2, 2, 12, 16, generator=generator)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, 2, False
    mask = integration.lutflash_attention_mask(2, 3, 12, q_offset=torch.tensor(4))
    assert mask[:, :7].all() and not mask[:, 7:].any()
    with torch.no_grad():
        plain, _ = integration.lutflash_attention_forward(module, query, key, value, mask,
                                                          scaling=0.3)
    leaves = [t.clone().requires_grad_() for t in (query, key, value)]
    out, _ = integration.lutflash_attention_forward(module, *leaves, mask, scaling=0.3)
    assert max_rel_diff(out, plain) < 1e-5

    allowed = torch.ones(3, 12, dtype=torch.bool).tril(4) & mask[:, None, None, :]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    ref_leaves = [t.clone().requires_grad_() for t in (query, key, value)]
    ref, _ = eager_attention_forward(module, *ref_leaves, additive, scaling=0.3)
    assert max_rel_diff(out, ref) < 1e-5
    weights = torch.randn(ref.shape, generator=generator)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    for got, want in zip(leaves, ref_leaves, strict=True):
        assert max_rel_diff(got.grad, want.grad) < 1e-5


CB_PROMPT_LENGTHS = [3, 7, 12, 21]


def continuous_batching_config(**overrides):
    """A small paged cache: 8-token pages (the longest request spans 4), 16 tokens per batch
    (prompts are prefilled in chunks, beside other requests' decoding), log-probabilities of
    the chosen tokens returned."""
    settings = dict(page_size=8, num_blocks=32, max_batch_tokens=16, return_logprobs=True)
    config_class = getattr(transformers, "ContinuousBatchingConfig", None)
    if config_class is None or "page_size" not in inspect.signature(config_class).parameters:
        pytest.skip(f"transformers {transformers.__version__} has no "
                    "ContinuousBatchingConfig(page_size=...) (the continuous-batching API these "
                    "tests are written against, 5.25)")
    return config_class(**(settings | overrides))


def per_request_eager(model, prompts, config, device="cpu"):
    """Each prompt generated alone by eager attention: its tokens and the log-probabilities of
    the chosen tokens (from the raw logits)."""
    model.set_attn_implementation("eager")
    results = []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt], device=device), generation_config=config,
                                 output_logits=True, return_dict_in_generate=True)
            tokens = out.sequences[0, len(prompt):].tolist()
            logprobs = [torch.log_softmax(step[0].float(), -1)[t].item()
                        for step, t in zip(out.logits, tokens, strict=True)]
            results.append((tokens, logprobs))
    return results


@pytest.mark.parametrize("fast_path", [True, False], ids=["decode_fast_path", "varlen_only"])
def test_generate_batch_runs_the_paged_kvcache_path_and_matches_eager(fast_path, monkeypatch):
    """generate_batch (transformers' continuous batching) with attn_implementation="lutflash" on
    requests of different lengths: chunked prefills beside decoding requests run the varlen path
    (keys gathered out of the pages), steps where every request decodes one token run the decode
    fast path (one flash_attention_with_kvcache call per layer on the paged cache, appending the
    new keys), or the varlen path too with max_blocks_per_request=0; each request's tokens and
    log-probabilities are those of eager generating it alone."""
    model = build("llama")
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=generator).tolist()
               for n in CB_PROMPT_LENGTHS]
    config = transformers.GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=None,
                                           pad_token_id=0)
    ref = per_request_eager(model, prompts, config)

    kvcache_calls = recording(monkeypatch, "flash_attention_with_kvcache")
    varlen_calls = recording(monkeypatch, "flash_attention_varlen")
    model.set_attn_implementation("lutflash")
    with torch.no_grad():
        outputs = model.generate_batch(prompts, generation_config=config,
                                       continuous_batching_config=continuous_batching_config(
                                           **({} if fast_path else {"max_blocks_per_request": 0})))
    assert model.config._attn_implementation == "lutflash"
    assert len(outputs) == len(prompts)
    for i, (tokens, logprobs) in enumerate(ref):
        result = outputs[f"req_{i}"]
        assert result.error is None and len(tokens) == 8
        assert result.generated_tokens == tokens, i
        assert max(abs(a - b) for a, b in zip(result.logprobs, logprobs, strict=True)) < 1e-4

    paged = [kwargs for _, kwargs in kvcache_calls if kwargs.get("block_table") is not None]
    assert len(paged) == len(kvcache_calls) and bool(paged) == fast_path
    if fast_path:
        lengths = torch.cat([kwargs["cache_seqlens"] for kwargs in paged])
        assert lengths.dtype == torch.int32 and int(lengths.max()) >= 8 * 3  # beyond 3 pages
    reading = [args for args, _ in varlen_calls if int(args[4][-1]) > int(args[3][-1])]
    assert reading  # a varlen step that read keys from the cache besides the new ones


def test_continuous_batching_decode_fast_path_resolution():
    """transformers keeps its block-table decode path for flash implementations named like
    flash*2/3 on CUDA or XPU; lutflash's kernel reads pages on every device, so for "lutflash"
    the path stays on wherever every attention type has a block-table cache (not for a model
    of sliding-window layers; never for the other implementations on the CPU)."""
    from transformers.generation.continuous_batching.initialization import resolve_continuous_batching_config
    from transformers.modeling_flash_attention_utils import lazy_import_flash_attention

    assert lazy_import_flash_attention("lutflash")[0][2] is not None  # its flash_attn_with_kvcache
    for family, implementation, available in (("llama", "lutflash", True),
                                              ("mistral", "lutflash", False),
                                              ("llama", "sdpa", False)):
        config = CONFIGS[family]()
        config._attn_implementation = implementation
        for requested in (None, 6, 0):
            resolved = resolve_continuous_batching_config(
                config, transformers.ContinuousBatchingConfig(max_blocks_per_request=requested),
                None, False, torch.device("cpu"))
            assert (resolved.max_blocks_per_request > 0) == (available and requested != 0), (
                family, implementation, requested)
            if available and requested is not None:
                assert resolved.max_blocks_per_request == requested


def test_transformers_flash_wrapper_paged_path_runs_lutflash():
    """transformers' generic flash wrapper with a block table calls the flash_attn_with_kvcache
    that "lutflash"'s loader gives (flash-attn's signature: block_table, cache_seqlens) and gets
    what lutflash_attention_forward computes, which is attention over each sequence's cached keys
    and its new one, appended to the pages."""
    from transformers.integrations.flash_attention import flash_attention_forward

    model = build("llama", attn_implementation="lutflash")
    attention = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(11)
    page_size, pages, heads, kv_heads, dim = 4, 12, 4, 2, 16
    cached = [5, 0, 9]  # keys each sequence holds before this step
    block_table = torch.tensor([[7, 2, -1], [4, -1, -1], [0, 10, 5]], dtype=torch.int32)
    # one buffer, K and V pages interleaved, as transformers' paged cache lays them out
    buffer = torch.randn(2 * pages + 1, page_size, kv_heads, dim, generator=generator)
    query = torch.randn(1, heads, 3, dim, generator=generator)
    key, value = torch.randn(2, 1, kv_heads, 3, dim, generator=generator)
    cu_k = torch.tensor([0, 6, 7, 17], dtype=torch.int32)
    outputs = []
    for forward in (flash_attention_forward,
                    lutflash.integrations.transformers.lutflash_attention_forward):
        pages_now = buffer.clone()
        k_cache, v_cache = pages_now[0:2 * pages:2], pages_now[1:2 * pages + 1:2]
        out, _ = forward(attention, query, key, value, None, scaling=0.3, block_table=block_table,
                         k_cache=k_cache, v_cache=v_cache, cu_seq_lens_k=cu_k,
                         cu_seq_lens_q=torch.arange(4, dtype=torch.int32), max_length_q=1,
                         max_length_k=1)
        outputs.append(out)
        for b, n in enumerate(cached):  # the new key and value were appended in place
            page, row = block_table[b, n // page_size], n % page_size
            assert torch.equal(k_cache[page, row], key[0, :, b])
            assert torch.equal(v_cache[page, row], value[0, :, b])
    assert outputs[0].shape == outputs[1].shape == (1, 3, heads, dim)
    assert max_rel_diff(outputs[0], outputs[1]) < 1e-6

    for b, n in enumerate(cached):  # against attention over the gathered keys
        rows = [(int(block_table[b, j // page_size]), j % page_size) for j in range(n)]
        keys = torch.stack([buffer[2 * p, r] for p, r in rows] + [key[0, :, b]])
        values = torch.stack([buffer[2 * p + 1, r] for p, r in rows] + [value[0, :, b]])
        keys, values = (t.repeat_interleave(2, dim=1) for t in (keys, values))
        scores = torch.einsum("hd,khd->hk", query[0, :, b], keys) * 0.3
        ref = torch.einsum("hk,khd->hd", scores.softmax(-1), values)
        assert max_rel_diff(outputs[1][0, b], ref) < 1e-5


@pytest.mark.parametrize("cache_implementation", [None, "static"], ids=["dynamic", "static"])
def test_beam_search_matches_eager(cache_implementation, request):
    """Beam search (3 beams, 2 returned) on left-padded prompts, the cache reordered between
    steps: eager's sequences, scores and per-step log-probabilities."""
    model = build("llama")
    ids, mask = padded_batch("left", seq=10)
    ref, out = generate_both(model, ids, lambda: request.getfixturevalue("poison_unwritten_static_rows"),
                             attention_mask=mask, max_new_tokens=6, num_beams=3,
                             num_return_sequences=2, do_sample=False, pad_token_id=0,
                             cache_implementation=cache_implementation, output_scores=True)
    assert out.sequences.shape == (6, 16)
    assert torch.equal(out.sequences, ref.sequences)
    assert torch.equal(out.beam_indices, ref.beam_indices)
    assert max_rel_diff(out.sequences_scores, ref.sequences_scores) < 1e-5
    scores, ref_scores = torch.stack(out.scores), torch.stack(ref.scores)
    finite = torch.isfinite(ref_scores)
    assert torch.equal(torch.isfinite(scores), finite)
    assert max_rel_diff(scores[finite], ref_scores[finite]) < 1e-4


# The same three on the GPU (fp16 and bf16; the yardstick of the GPU tests above: against eager in
# float32 over the same tokens, at most twice eager's own error in the dtype, plus a floor).


def teacher_forced_logprobs(model, implementation, sequences, prompt_length, tokens=None):
    """log_softmax of the logits that predicted sequences[:, prompt_length:] (or `tokens`, the
    same positions' tokens), one forward pass over the whole sequences."""
    logits = logits_under(model, implementation, input_ids=sequences).float()
    logprobs = torch.log_softmax(logits[:, prompt_length - 1:-1], dim=-1)
    chosen = sequences[:, prompt_length:] if tokens is None else tokens
    return logprobs.gather(-1, chosen[..., None])[..., 0]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_gpu_static_cache_logits(family, dtype, cuda_device, request):
    """A StaticCache decode loop without a mask (the KV-cache kernel on the cache as it lies,
    unwritten rows NaN) and generate(cache_implementation="static") (the 2-D mask path; not
    compiled here): each step's logits against float32 eager over the same tokens."""
    from transformers import StaticCache

    model32, model = gpu_pair(family, cuda_device, dtype)
    request.getfixturevalue("poison_unwritten_static_rows")
    tokens = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(12))
    tokens = tokens.to(cuda_device)
    model.set_attn_implementation("lutflash")
    cache = StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        steps = [model(input_ids=tokens[:, :2], past_key_values=cache, use_cache=True).logits]
        for i in range(2, 10):
            steps.append(model(input_ids=tokens[:, i:i + 1], past_key_values=cache, use_cache=True,
                               position_ids=torch.full((3, 1), i, device=cuda_device)).logits)
    out = torch.cat(steps, dim=1)
    ref = logits_under(model32, "eager", input_ids=tokens)
    naive = logits_under(model, "eager", input_ids=tokens)
    assert torch.isfinite(out).all()
    assert_within_naive(out, naive, ref, "static cache loop logits")

    ids, mask = (t.to(cuda_device) for t in padded_batch("left", seq=10))
    model.set_attn_implementation("lutflash")
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                   pad_token_id=0, cache_implementation="static",
                                   disable_compile=True, output_logits=True,
                                   return_dict_in_generate=True)
    sequences = generated.sequences
    assert sequences.shape == (3, 18)
    full_mask = torch.cat([mask, torch.ones_like(mask[:, :8])], dim=1)
    steps = torch.stack(generated.logits, dim=1)
    ref = logits_under(model32, "eager", input_ids=sequences, attention_mask=full_mask)[:, 9:17]
    naive = logits_under(model, "eager", input_ids=sequences, attention_mask=full_mask)[:, 9:17]
    assert torch.isfinite(steps).all()
    assert_within_naive(steps, naive, ref, "static generate logits")


@pytest.mark.cuda
@pytest.mark.parametrize("fast_path", [True, False], ids=["decode_fast_path", "varlen_only"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_generate_batch_logprobs(dtype, fast_path, cuda_device, monkeypatch):
    """generate_batch on the GPU with transformers' defaults for a flash implementation (CUDA
    graphs on both paths, batches padded to graph sizes, the paged decode fast path, or the
    varlen path alone): the log-probability of each generated token against float32 eager over
    the same tokens."""
    model32, model = gpu_pair("llama", cuda_device, dtype)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=generator).tolist()
               for n in CB_PROMPT_LENGTHS]
    config = transformers.GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=None,
                                           pad_token_id=0)
    kvcache_calls = recording(monkeypatch, "flash_attention_with_kvcache")
    model.set_attn_implementation("lutflash")
    with torch.no_grad():
        outputs = model.generate_batch(prompts, generation_config=config,
                                       continuous_batching_config=continuous_batching_config(
                                           **({} if fast_path else {"max_blocks_per_request": 0})))
    assert any(kwargs.get("block_table") is not None for _, kwargs in kvcache_calls) == fast_path
    for i, prompt in enumerate(prompts):
        result = outputs[f"req_{i}"]
        assert result.error is None and len(result.generated_tokens) == 8
        sequence = torch.tensor([prompt + result.generated_tokens], device=cuda_device)
        out = torch.tensor(result.logprobs, device=cuda_device)[None]
        ref = teacher_forced_logprobs(model32, "eager", sequence, len(prompt))
        naive = teacher_forced_logprobs(model, "eager", sequence, len(prompt))
        assert torch.isfinite(out).all()
        assert_within_naive(out, naive, ref, f"request {i} log-probabilities", floor=2e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_beam_search_transition_scores(dtype, cuda_device):
    """Beam search on the GPU (3 beams, 2 returned, left padding): the log-probability of each
    token of the returned beams, as beam search scored it, against float32 eager over the same
    sequences."""
    model32, model = gpu_pair("llama", cuda_device, dtype)
    ids, mask = (t.to(cuda_device) for t in padded_batch("left", seq=10))
    model.set_attn_implementation("lutflash")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3,
                             num_return_sequences=2, do_sample=False, pad_token_id=0,
                             output_scores=True, return_dict_in_generate=True)
        scores = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices)
    sequences = out.sequences
    assert sequences.shape == (6, 16)
    full_mask = torch.cat([mask, torch.ones_like(mask[:, :6])], dim=1).repeat_interleave(2, 0)
    results = {}
    for name, reference in (("ref", model32), ("naive", model)):
        reference.set_attn_implementation("eager")
        with torch.no_grad():
            logits = reference(input_ids=sequences, attention_mask=full_mask).logits.float()
        logprobs = torch.log_softmax(logits[:, 9:15], dim=-1)
        results[name] = logprobs.gather(-1, sequences[:, 10:, None])[..., 0]
    assert torch.isfinite(scores).all()
    assert_within_naive(scores.float(), results["naive"], results["ref"], "beam transition scores")
