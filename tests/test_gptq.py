"""Calibrated quantization (lutflash.gptq): GPTQ into BCQ, checked against float64
references on random inputs, and the sequential calibration of a decoder's layers."""

import copy

import pytest
import torch
from torch import nn

import lutflash
from lutflash.gptq import HessianAccumulator, gptq_decide, pack_codes, quantize_model_calibrated


def weight_and_inputs(n=64, k=256, rows=1024, seed=0):
    """A Gaussian weight and correlated inputs (low rank plus noise, a few large channels), so
    that error feedback through the Hessian matters."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(rows, 24, generator=g) @ torch.randn(24, k, generator=g)
    x = x + 0.2 * torch.randn(rows, k, generator=g)
    x[:, :4] *= 8.0
    return weight, x


def hessian_of(x):
    return (2.0 / x.shape[0]) * x.double().t() @ x.double()


def output_error(weight, qweight, x):
    """||x Ŵᵀ − x Wᵀ||² in float64."""
    diff = qweight.dequantize(torch.float64) - weight.double()
    return (x.double() @ diff.t()).square().sum().item()


def test_hessian_accumulator_matches_float64():
    _, x = weight_and_inputs(k=96, rows=300)
    acc = HessianAccumulator(96)
    for chunk in (x[:100], x[100:250].reshape(3, 50, 96), x[250:]):
        acc.add_batch(chunk)
    assert acc.count == 300
    ref = hessian_of(x)
    assert ((acc.hessian.double() - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("mode", ["general", "uniform"])
@pytest.mark.parametrize("bits,k,group_size", [(1, 64, 32), (2, 100, 100), (3, 256, 64), (4, 192, 96)])
def test_pack_codes_dequantizes_to_the_formula(mode, bits, k, group_size):
    g = torch.Generator().manual_seed(bits)
    n = 13
    codes = torch.randint(0, 1 << bits, (n, k), generator=g)
    params = torch.rand(n, k // group_size, bits + 1 if mode == "general" else 2, generator=g)
    qweight = pack_codes(codes, params, bits, group_size, mode)
    signs = torch.stack([((codes >> i) & 1) * 2.0 - 1.0 for i in range(bits)], -1).double()
    p = params.double().repeat_interleave(group_size, dim=1)                 # (n, k, m)
    alpha = p[..., :bits] if mode == "general" else p[..., :1] * 2.0 ** (torch.arange(bits) - 1)
    ref = (alpha * signs).sum(-1) + p[..., -1]
    assert torch.allclose(qweight.dequantize(torch.float64), ref, rtol=0, atol=1e-12)
    assert (qweight.planes[:, :, n:] == 0).all() and (qweight.meta[:, :, n:] == 0).all()


@pytest.mark.parametrize("mode", ["general", "uniform"])
@pytest.mark.parametrize("bits,group_size,meta_dtype", [(2, 32, torch.float32), (3, 64, torch.float32),
                                                        (4, 128, torch.float16), (3, 256, torch.bfloat16)])
def test_packed_result_is_exactly_what_gptq_decided(mode, bits, group_size, meta_dtype):
    weight, x = weight_and_inputs()
    hessian = hessian_of(x)
    qweight = lutflash.quantize(weight, bits, group_size, "gptq", hessian=hessian, mode=mode,
                                meta_dtype=meta_dtype)
    _, _, decided = gptq_decide(weight, hessian, bits, group_size, mode, meta_dtype=meta_dtype)
    assert qweight.mode == mode and qweight.meta.dtype == meta_dtype
    assert torch.equal(qweight.dequantize(torch.float32), decided)


def test_gptq_with_an_odd_single_group():
    weight, x = weight_and_inputs(n=10, k=100, rows=400)
    qweight = lutflash.quantize(weight, 3, None, "gptq", hessian=hessian_of(x))
    _, _, decided = gptq_decide(weight, hessian_of(x), 3, 100, "general")
    assert qweight.group_size == 100 and torch.equal(qweight.dequantize(), decided)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_identity_hessian_uniform_is_rtn(bits):
    """With H = I the error feedback vanishes: GPTQ on the rtn grid is rtn, bit for bit."""
    weight, _ = weight_and_inputs()
    gptq = lutflash.quantize(weight, bits, 64, "gptq", hessian=torch.eye(256), mode="uniform")
    rtn = lutflash.quantize(weight, bits, 64, "rtn")
    assert torch.equal(gptq.planes, rtn.planes) and torch.equal(gptq.meta, rtn.meta)


@pytest.mark.parametrize("bits", [2, 3])
def test_identity_hessian_general_is_alternating(bits):
    """With H = I, general GPTQ fits each group by alternating least squares and picks the
    nearest levels: alternating's result (up to rounding in the fit)."""
    weight, _ = weight_and_inputs()
    gptq = lutflash.quantize(weight, bits, 64, "gptq", hessian=torch.eye(256))
    alternating = lutflash.quantize(weight, bits, 64, "alternating")
    mse = [(q.dequantize(torch.float64) - weight.double()).square().mean().item()
           for q in (gptq, alternating)]
    assert abs(mse[0] - mse[1]) <= 1e-6 * mse[1]


def reference_gptq_uniform(weight, hessian, bits, group_size, damp=0.01):
    """Unblocked GPTQ in float64 on the rtn grid (groups fitted on the updated weights):
    quantized weight in float64."""
    W = weight.double().clone()
    H = hessian.double().clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    n, k = W.shape
    top = 2**bits - 1
    Q = torch.zeros_like(W)
    for c in range(k):
        if c % group_size == 0:
            w = W[:, c:c + group_size]
            lo, hi = w.amin(1), w.amax(1)
            s = ((hi - lo) / top).float().double()
            zp = torch.round(-lo / s).clamp(0, top)
        q = s * ((torch.round(W[:, c] / s) + zp).clamp(0, top) - zp)
        Q[:, c] = q
        err = (W[:, c] - q) / U[c, c]
        W[:, c:] -= err.unsqueeze(1) * U[c, c:].unsqueeze(0)
    return Q


@pytest.mark.parametrize("block_size", [32, 128])
def test_blocked_gptq_matches_the_float64_reference(block_size):
    weight, x = weight_and_inputs()
    hessian = hessian_of(x)
    ref = reference_gptq_uniform(weight, hessian, 3, 64)
    qweight = lutflash.quantize(weight, 3, 64, "gptq", hessian=hessian, mode="uniform",
                                block_size=block_size)
    out = qweight.dequantize(torch.float64)
    same = ((out - ref).abs() < 1e-6).double().mean().item()
    assert same > 0.98, f"only {same:.3f} of the weights agree with the reference"
    err_ref = (x.double() @ (ref - weight.double()).t()).square().sum().item()
    assert output_error(weight, qweight, x) <= 1.05 * err_ref


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("mode", ["uniform", "general"])
def test_gptq_output_error_beats_data_free(bits, mode):
    weight, x = weight_and_inputs()
    hessian = hessian_of(x)
    gptq = lutflash.quantize(weight, bits, 64, "gptq", hessian=hessian, mode=mode)
    base = lutflash.quantize(weight, bits, 64, "rtn" if mode == "uniform" else "alternating",
                             mode=mode)
    assert output_error(weight, gptq, x) < 0.5 * output_error(weight, base, x)


def test_dead_columns_and_float16_weights():
    weight, x = weight_and_inputs()
    x[:, 10:20] = 0  # inputs that never fire: H = 0 there
    qweight = lutflash.quantize(weight.half(), 3, 64, "gptq", hessian=hessian_of(x))
    out = qweight.dequantize(torch.float64)
    assert qweight.meta.dtype == torch.float16 and torch.isfinite(out).all()
    live = torch.ones(256, dtype=torch.bool)
    live[10:20] = False
    base = lutflash.quantize(weight, 3, 64, "alternating")
    assert output_error(weight, qweight, x) < output_error(weight, base, x)


@pytest.mark.cuda
def test_gptq_runs_on_the_weights_device(cuda_device):
    weight, x = weight_and_inputs()
    hessian = hessian_of(x)
    cpu = lutflash.quantize(weight, 3, 64, "gptq", hessian=hessian)
    gpu = lutflash.quantize(weight.to(cuda_device), 3, 64, "gptq", hessian=hessian.to(cuda_device))
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.dequantize(), gptq_decide(weight.to(cuda_device), hessian, 3, 64,
                                                     "general")[2])
    err_cpu, err_gpu = output_error(weight, cpu, x), output_error(weight, gpu.to("cpu"), x)
    assert abs(err_gpu - err_cpu) <= 0.05 * err_cpu


# Bad input: every new argument refused with an exception naming it.

@pytest.mark.parametrize("kwargs,error,name", [
    (dict(), ValueError, "hessian"),
    (dict(hessian=torch.eye(128)), ValueError, "hessian"),
    (dict(hessian=torch.eye(256, dtype=torch.int64)), TypeError, "hessian"),
    (dict(hessian=[[1.0]]), TypeError, "hessian"),
    (dict(hessian=torch.full((256, 256), float("nan"))), ValueError, "hessian"),
    (dict(hessian=-torch.eye(256)), ValueError, "hessian"),
    (dict(hessian=torch.eye(256), damp=-1.0), ValueError, "damp"),
    (dict(hessian=torch.eye(256), damp="x"), ValueError, "damp"),
    (dict(hessian=torch.eye(256), block_size=0), ValueError, "block_size"),
    (dict(hessian=torch.eye(256), block_size=1.5), TypeError, "block_size"),
    (dict(hessian=torch.eye(256), rounds=-1), ValueError, "rounds"),
    (dict(hessian=torch.eye(256), meta_dtype=torch.int8), TypeError, "meta_dtype"),
])
def test_gptq_bad_arguments(kwargs, error, name):
    weight, _ = weight_and_inputs()
    with pytest.raises(error, match=name):
        lutflash.quantize(weight, 3, 64, "gptq", **kwargs)


def test_gptq_bad_weight_and_indefinite_hessian():
    weight, _ = weight_and_inputs()
    with pytest.raises(ValueError, match="weight"):
        lutflash.quantize(torch.full_like(weight, float("inf")), 3, 64, "gptq",
                          hessian=torch.eye(256))
    indefinite = torch.eye(256)
    indefinite[0, 1] = indefinite[1, 0] = 5.0
    with pytest.raises(ValueError, match="hessian"):
        lutflash.quantize(weight, 3, 64, "gptq", hessian=indefinite, damp=0.0)
    with pytest.raises(ValueError, match="hessian"):
        lutflash.quantize(weight, 3, 64, "rtn", hessian=torch.eye(256))
    with pytest.raises(ValueError, match="in_features"):
        HessianAccumulator(0)
    with pytest.raises(ValueError, match="x"):
        HessianAccumulator(8).add_batch(torch.ones(3, 9))
    with pytest.raises(TypeError, match="x"):
        HessianAccumulator(8).add_batch(torch.ones(3, 8, dtype=torch.int64))


# Model level.

def tiny_llama(seed=0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def calibration_batches(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (4, 32), generator=g)
    return [ids[:2], ids[2, :20], {"input_ids": ids[3:], "attention_mask": torch.ones(1, 32)}]


def layer_input_hessians(model, names, calibration):
    """Hessians of the named Linear layers' inputs over the calibration batches, in one pass."""
    accs = {name: HessianAccumulator(model.get_submodule(name).in_features) for name in names}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda m, args, out, acc=accs[name]: acc.add_batch(args[0])) for name in names]
    with torch.no_grad():
        for batch in calibration:
            kwargs = dict(batch) if isinstance(batch, dict) else {"input_ids": batch}
            kwargs = {k: v if v.ndim == 2 else v.unsqueeze(0) for k, v in kwargs.items()}
            model(**kwargs)
    for handle in handles:
        handle.remove()
    return {name: acc.hessian for name, acc in accs.items()}


def test_layers_are_calibrated_on_the_quantized_layers_before_them():
    model = tiny_llama()
    source = copy.deepcopy(model)
    calibration = calibration_batches()
    seen = {}

    def make_layer(name, linear, hessian):
        seen[name] = hessian.clone()
        qweight = lutflash.quantize(linear.weight, 3, 32, "gptq", hessian=hessian)
        return lutflash.LutLinear.from_bcq(qweight, linear.bias)

    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    replaced = quantize_model_calibrated(model, targets, calibration, make_layer, progress=False)
    assert replaced == [n for n, _ in targets] and "lm_head" in replaced
    assert all(isinstance(model.get_submodule(n), lutflash.LutLinear) for n in replaced)
    # every layer saw the inputs it gets in the final model: everything before it quantized
    final = layer_input_hessians(model, replaced, calibration)
    for name in replaced:
        assert torch.allclose(seen[name], final[name], rtol=1e-4, atol=1e-7), name
    # which differ from the full-precision model's, except for the first stage
    first = layer_input_hessians(source, replaced, calibration)
    assert torch.allclose(seen["model.layers.0.self_attn.k_proj"],
                          first["model.layers.0.self_attn.k_proj"], rtol=1e-5, atol=1e-8)
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj", "lm_head"):
        assert not torch.allclose(seen[name], first[name], rtol=1e-4, atol=1e-7), name


def test_quantize_model_and_patch_model_with_calibration():
    model = tiny_llama()
    calibration = calibration_batches()
    gptq = copy.deepcopy(model)
    names = lutflash.quantize_model(gptq, 3, 32, "gptq", calibration=calibration,
                                    skip=("lm_head",), progress=False)
    assert len(names) == 14 and isinstance(gptq.lm_head, nn.Linear)
    patched = copy.deepcopy(model)
    summary = lutflash.patch_model(patched, attention=False, fuse=False, calibration=calibration,
                                   linear=dict(bits=3, group_size=32, method="gptq", progress=False))
    assert summary["linear"] == names
    for name in names:
        assert torch.equal(patched.get_submodule(name).planes, gptq.get_submodule(name).planes)
    rtn = copy.deepcopy(model)
    lutflash.quantize_model(rtn, 3, 32, "rtn", skip=("lm_head",), progress=False)
    ids = torch.cat([b if isinstance(b, torch.Tensor) and b.ndim == 2 else
                     (b["input_ids"] if isinstance(b, dict) else b.unsqueeze(0))[:, :20]
                     for b in calibration[:1]])
    with torch.no_grad():
        ref = model(ids).logits
        err = [(m(ids).logits - ref).square().mean().item() for m in (gptq, rtn)]
    assert err[0] < err[1]


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(method="gptq"), ValueError, "calibration"),
    (dict(method="rtn", calibration=[torch.zeros(1, 4, dtype=torch.long)]), ValueError, "calibration"),
    (dict(method="gptq", calibration=torch.zeros(2, 4, dtype=torch.long)), TypeError, "calibration"),
    (dict(method="gptq", calibration=[]), ValueError, "calibration"),
    (dict(method="gptq", calibration=[torch.zeros(2, 4)]), TypeError, r"calibration\[0\]"),
    (dict(method="gptq", calibration=[torch.zeros(1, 2, 4, dtype=torch.long)]), ValueError,
     r"calibration\[0\]"),
    (dict(method="gptq", calibration=[{"attention_mask": torch.ones(1, 4)}]), ValueError,
     r"calibration\[0\]"),
    (dict(method="gptq", calibration=["text"]), TypeError, r"calibration\[0\]"),
    (dict(method="gptq", calibration=[torch.zeros(1, 4, dtype=torch.long)], group_size=48),
     ValueError, "group_size"),
    (dict(method="nope"), ValueError, "method"),
])
def test_quantize_model_bad_calibration(kwargs, error, name):
    model = tiny_llama()
    with pytest.raises(error, match=name):
        lutflash.quantize_model(model, **{"bits": 3, "group_size": 32, **kwargs})
    assert not any(isinstance(m, lutflash.LutLinear) for m in model.modules())


def test_calibration_refuses_models_without_decoder_layers():
    model = nn.Sequential(nn.Embedding(10, 32), nn.Linear(32, 32))
    with pytest.raises(ValueError, match="decoder layers"):
        lutflash.quantize_model(model, 3, 32, "gptq", calibration=[torch.zeros(1, 4, dtype=torch.long)])
    with pytest.raises(ValueError, match="calibration"):
        lutflash.patch_model(tiny_llama(), attention=False, calibration=[torch.zeros(1, 4)])


def test_calibrated_bfloat16_model_and_other_layouts():
    import transformers

    model = tiny_llama().to(torch.bfloat16)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    names = lutflash.quantize_model(model, 3, 32, "gptq", calibration=[ids], progress=False)
    assert len(names) == 15 and model.model.layers[1].mlp.down_proj.meta.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits.float()).all()
    torch.manual_seed(0)
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, vocab_size=96,
        word_embed_proj_dim=64, max_position_embeddings=64)).eval()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    names = lutflash.quantize_model(opt, 3, 32, "gptq", calibration=[batch], progress=False)
    assert len(names) == 2 * 6 + 1 and names[0].startswith("model.decoder.layers.0.")


# AWQ-style scale search.

def outlier_llama():
    """A tiny Llama whose norms give a few channels large activations (as trained LLMs have)."""
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] = 20.0
            layer.post_attention_layernorm.weight[5:7] = 15.0
    return model


def test_awq_folding_keeps_the_full_precision_function():
    from lutflash.gptq import _hidden_of, awq_layer

    model = outlier_llama()
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids).logits
    captured = []
    layer = model.model.layers[0]
    handle = layer.register_forward_pre_hook(lambda m, a, k: captured.append((a, k)),
                                             with_kwargs=True)
    with torch.no_grad():
        model(ids)
    handle.remove()
    before = layer.input_layernorm.weight.clone()
    folded = awq_layer(layer, captured, 3, 32)
    assert "input_layernorm" in folded  # the outlier channels get scaled
    assert not torch.equal(before, layer.input_layernorm.weight)
    with torch.no_grad():
        out = model(ids).logits
        assert ((out - ref).norm() / ref.norm()).item() < 1e-5
        assert _hidden_of((out,)) is out


def test_awq_search_never_loses_on_its_inputs():
    from lutflash.gptq import _awq_search

    weight, x = weight_and_inputs(k=128)
    linear = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight[:, :128])
    for method in ("rtn", "alternating"):
        scale = _awq_search(x, [linear], 3, 32, method)

        def err(s, method=method):
            q = lutflash.quantize(linear.weight * s, 3, 32, method).dequantize() / s
            return (x @ (q - linear.weight).t()).square().sum().item()

        assert err(scale) <= err(torch.ones(128)) and not torch.equal(scale, torch.ones(128))


def test_awq_leaves_a_norm_that_is_not_a_channel_product():
    from lutflash.gptq import _scale_output

    class OnePlusNorm(nn.Module):  # Gemma's RMSNorm: x̂ · (1 + weight)
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(32))

        def forward(self, x):
            return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * (1 + self.weight)

    norm = OnePlusNorm()
    before = norm.weight.detach().clone()
    with torch.no_grad():
        assert not _scale_output(norm, torch.rand(32) + 0.5, 32)
        assert _scale_output(nn.LayerNorm(32), torch.rand(32) + 0.5, 32)
    assert torch.equal(norm.weight, before)


def test_quantize_model_with_awq():
    model = outlier_llama()
    calibration = calibration_batches()
    ids = calibration[0]
    with torch.no_grad():
        ref = model(ids).logits
    errors = {}
    for awq in (False, True):
        copied = copy.deepcopy(model)
        names = lutflash.quantize_model(copied, 3, 32, "rtn", skip=("lm_head",), progress=False,
                                        calibration=calibration if awq else None, awq=awq)
        assert len(names) == 14
        with torch.no_grad():
            errors[awq] = (copied(ids).logits - ref).square().mean().item()
    assert errors[True] < errors[False]
    with pytest.raises(TypeError, match="awq"):
        lutflash.quantize_model(copy.deepcopy(model), 3, 32, "rtn", awq="yes")
    with pytest.raises(ValueError, match="calibration"):
        lutflash.quantize_model(copy.deepcopy(model), 3, 32, "rtn", awq=True)
