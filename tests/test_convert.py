"""GPTQ and AWQ checkpoints converted to BCQ (lutflash.from_gptq / from_awq), exactly.

The packers (checkpoint_packing.py) are written from the formats' documentation, independently
of lutflash's bit-stream reading of them: a converted weight must dequantize to the checkpoint's
own s · (c − zp) bit for bit, in float64 and in the 16-bit arithmetic of the formats' kernels.
"""

import random

import pytest
import torch
import torch.nn.functional as F
from checkpoint_packing import awq_pack_cols, gptq_checkpoint, gptq_pack_rows, source_weight

import lutflash
from lutflash.nn import LutLinear
from lutflash.testing import assert_close_to_reference


def random_cases(count, seed):
    rng = random.Random(seed)
    for _ in range(count):
        bits = rng.choice([2, 3, 4, 8])
        n = 32 * rng.randint(1, 6)  # GPTQ packs zeros along the outputs: n · bits % 32 == 0
        group_words = rng.choice([1, 2, 4])
        k = 32 * group_words * rng.randint(1, 4)
        group_size = rng.choice([32 * group_words, k])
        yield (bits, n, k, group_size, rng.random() < 0.3, rng.choice(["gptq", "gptq_v2"]),
               rng.choice([torch.float16, torch.bfloat16]), rng.randint(0, 2 ** 31))


@pytest.mark.parametrize("case", list(random_cases(40, seed=11)))
def test_gptq_exact(case):
    bits, n, k, group_size, sym, fmt, scale_dtype, seed = case
    gen = torch.Generator().manual_seed(seed)
    codes, zeros, scales, qweight, qzeros, g_idx = gptq_checkpoint(n, k, bits, group_size, sym,
                                                                  fmt, scale_dtype, gen)
    qw = lutflash.from_gptq(qweight, qzeros, scales, g_idx, bits=bits,
                            group_size=-1 if group_size == k else group_size,
                            checkpoint_format=fmt)
    assert qw.shape == (n, k) and qw.bits == bits and qw.mode == "uniform"
    assert torch.equal(qw.dequantize(torch.float64),
                       source_weight(codes, zeros, scales, group_size, torch.float64))
    assert torch.equal(qw.dequantize(scale_dtype),
                       source_weight(codes, zeros, scales, group_size, scale_dtype))


@pytest.mark.parametrize("seed", range(12))
def test_awq_exact(seed):
    rng = random.Random(seed)
    n, group_size = 8 * rng.randint(1, 40), rng.choice([32, 64, 128])
    k = group_size * rng.randint(1, 3)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=gen)
    zeros = torch.randint(0, 16, (k // group_size, n), generator=gen)
    scale_dtype = [torch.float16, torch.bfloat16][seed % 2]
    scales = (torch.rand(k // group_size, n, generator=gen) * 0.05 + 1e-3).to(scale_dtype)
    qw = lutflash.from_awq(awq_pack_cols(codes), awq_pack_cols(zeros), scales,
                           group_size=group_size)
    assert torch.equal(qw.dequantize(torch.float64),
                       source_weight(codes, zeros, scales, group_size, torch.float64))
    assert torch.equal(qw.dequantize(scale_dtype),
                       source_weight(codes, zeros, scales, group_size, scale_dtype))


def test_awq_packing_order_is_documented():
    # one word: column c holds code c + 1; nibble p must hold column AWQ_ORDER[p]
    codes = torch.arange(1, 9).reshape(1, 8)
    word = int(awq_pack_cols(codes)[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * p)) & 0xF for p in range(8)] == [1, 3, 5, 7, 2, 4, 6, 8]
    zeros = torch.zeros(1, 8, dtype=torch.int64)
    qw = lutflash.from_awq(awq_pack_cols(codes.repeat(32, 1)), awq_pack_cols(zeros),
                           torch.ones(1, 8, dtype=torch.float16), group_size=32)
    assert torch.equal(qw.dequantize(torch.float64)[:, 0], torch.arange(1.0, 9.0, dtype=torch.float64))


def test_gptq_3bit_words_cross_as_documented():
    # 32 rows of 3 bits fill 3 words; row 10 straddles words 0/1 and row 21 words 1/2
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[10, 0], codes[21, 0] = 0b101, 0b110
    words = [int(w) & 0xFFFFFFFF for w in gptq_pack_rows(codes, 3)[:, 0]]
    assert words == [0b01 << 30, 0b1, (0b0 << 31) | 0b11]
    zeros = gptq_pack_rows(torch.zeros(1, 32, dtype=torch.int64).t(), 3).t().contiguous()
    qw = lutflash.from_gptq(gptq_pack_rows(codes.repeat(1, 32), 3), zeros,
                            torch.ones(1, 32, dtype=torch.float16), bits=3,
                            checkpoint_format="gptq_v2")
    row = qw.dequantize(torch.float64)[0]
    assert row[10] == 5 and row[21] == 6 and row.abs().sum() == 11


def test_converted_layer_computes_the_checkpoint_product():
    gen = torch.Generator().manual_seed(3)
    codes, zeros, scales, qweight, qzeros, g_idx = gptq_checkpoint(96, 256, 4, 128, False,
                                                                  "gptq", torch.float16, gen)
    bias = torch.randn(96, generator=gen)
    layer = LutLinear.from_bcq(lutflash.from_gptq(qweight, qzeros, scales, g_idx, bits=4,
                                                  group_size=128), bias)
    x = torch.randn(5, 256, generator=gen)
    w64 = source_weight(codes, zeros, scales, 128, torch.float64)
    ref = x.double() @ w64.t() + bias.double()
    assert_close_to_reference(layer(x), ref, F.linear(x, w64.float(), bias))


def test_gptq_act_order_refused():
    gen = torch.Generator().manual_seed(0)
    _, _, scales, qweight, qzeros, g_idx = gptq_checkpoint(32, 256, 4, 128, False, "gptq",
                                                           torch.float16, gen)
    shuffled = g_idx[torch.randperm(256, generator=gen)]
    with pytest.raises(ValueError, match="g_idx: .*act-order"):
        lutflash.from_gptq(qweight, qzeros, scales, shuffled, bits=4, group_size=128)


def bad_gptq_calls():
    gen = torch.Generator().manual_seed(1)
    _, _, scales, qweight, qzeros, g_idx = gptq_checkpoint(32, 256, 4, 128, False, "gptq",
                                                           torch.float16, gen)
    nan_scales = scales.clone()
    nan_scales[0, 3] = float("nan")
    ok = dict(bits=4, group_size=128)
    return [
        ("bits", ValueError, (qweight, qzeros, scales), dict(ok, bits=5)),
        ("checkpoint_format", ValueError, (qweight, qzeros, scales),
         dict(ok, checkpoint_format="marlin")),
        ("qweight", TypeError, (qweight.float(), qzeros, scales), ok),
        ("qweight", TypeError, (qweight[0], qzeros, scales), ok),
        ("qzeros", TypeError, (qweight, qzeros.to(torch.int64), scales), ok),
        ("qzeros", ValueError, (qweight, qzeros[:, :2], scales), ok),
        ("scales", TypeError, (qweight, qzeros, scales.to(torch.int32)), ok),
        ("scales", ValueError, (qweight, qzeros, scales[:, :16]), ok),
        ("scales", ValueError, (qweight, qzeros, nan_scales), ok),
        ("group_size", ValueError, (qweight, qzeros, scales), dict(ok, group_size=64)),
        ("g_idx", TypeError, (qweight, qzeros, scales, g_idx.float()), ok),
        ("g_idx", TypeError, (qweight, qzeros, scales, g_idx[:100]), ok),
        ("meta_dtype", TypeError, (qweight, qzeros, scales), dict(ok, meta_dtype=torch.int8)),
    ]


@pytest.mark.parametrize("name,error,args,kwargs", bad_gptq_calls(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_gptq_bad_input(name, error, args, kwargs):
    with pytest.raises(error, match=f"^{name}: "):
        lutflash.from_gptq(*args, **kwargs)


def test_gptq_group_of_16_refused():
    # GPTQ allows groups of 16 columns; lutflash's are multiples of 32
    scales = torch.ones(4, 32, dtype=torch.float16)
    qweight = torch.zeros(8, 32, dtype=torch.int32)           # k = 64 at 4 bits
    qzeros = torch.zeros(4, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="^group_size: .*multiples of 32"):
        lutflash.from_gptq(qweight, qzeros, scales, bits=4, group_size=16)


def test_awq_bad_input():
    qweight = torch.zeros(64, 4, dtype=torch.int32)
    scales = torch.ones(2, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="^bits: "):
        lutflash.from_awq(qweight, torch.zeros(2, 4, dtype=torch.int32), scales, group_size=32,
                          bits=3)
    with pytest.raises(ValueError, match="^qzeros: "):
        lutflash.from_awq(qweight, torch.zeros(2, 3, dtype=torch.int32), scales, group_size=32)
    with pytest.raises(ValueError, match="^scales: "):
        lutflash.from_awq(qweight, torch.zeros(2, 4, dtype=torch.int32), scales[:, :8],
                          group_size=32)


def rtn_codes(weight: torch.Tensor, bits: int, group_size: int):
    """Asymmetric round-to-nearest of an (out, in) weight: codes (in, out), zeros and fp16
    scales (groups, out), as GPTQ/AWQ checkpoints store them."""
    n, k = weight.shape
    w = weight.t().reshape(k // group_size, group_size, n).double()
    lo, hi = w.amin(1), w.amax(1)
    scales = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-6).half()
    zeros = (-lo / scales.double()).round().clamp(0, 2 ** bits - 1).long()
    codes = (w / scales.double()[:, None] + zeros[:, None]).round().clamp(0, 2 ** bits - 1)
    return codes.reshape(k, n).long(), zeros, scales


@pytest.mark.parametrize("method,bits", [("gptq", 4), ("gptq", 3), ("awq", 4)])
def test_load_quantized_state_dict(method, bits):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    source = transformers.LlamaForCausalLM(config).eval()
    group = 32
    reference = transformers.LlamaForCausalLM(config).eval()  # the checkpoint's own weights
    reference.load_state_dict(source.state_dict())
    state = dict(source.state_dict())
    for name, module in source.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        del state[f"{name}.weight"]
        codes, zeros, scales = rtn_codes(module.weight.detach(), bits, group)
        if method == "gptq":  # v1: stores zero − 1 (zeros of 0 moved to 1: no wrap-around)
            zeros = zeros.clamp(min=1)
            state[f"{name}.qweight"] = gptq_pack_rows(codes, bits)
            state[f"{name}.qzeros"] = gptq_pack_rows((zeros - 1).t(), bits).t().contiguous()
            state[f"{name}.g_idx"] = torch.arange(module.in_features, dtype=torch.int32) // group
        else:
            state[f"{name}.qweight"] = awq_pack_cols(codes)
            state[f"{name}.qzeros"] = awq_pack_cols(zeros)
        state[f"{name}.scales"] = scales
        with torch.no_grad():
            reference.get_submodule(name).weight.copy_(
                source_weight(codes, zeros, scales, group, torch.float64).float())
    model = transformers.LlamaForCausalLM(config).eval()
    converted = lutflash.load_quantized_state_dict(
        model, state, {"quant_method": method, "bits": bits, "group_size": group,
                       "desc_act": False, "version": "gemm"})
    assert len(converted) == 14 and all(isinstance(model.get_submodule(n), LutLinear)
                                        for n in converted)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="^quantization_config: "):
        lutflash.load_quantized_state_dict(model, state, {"quant_method": "bnb"})
