"""LoraLutLinear and add_lora: low-rank adapters beside frozen LutLinear weights, against a
float64 reference (forward and gradients), what is trainable, state_dicts, and the GPU on any
device and stream."""

import io

import pytest
import torch
from torch import nn

import lutflash
from lutflash import LoraLutLinear, add_lora
from lutflash.nn import LutLinear
from lutflash.testing import assert_close_to_reference, random_bcq_weight, relative_error


def random_lora_layer(generator, n=40, k=96, bits=3, group_size=32, mode="general", rank=4,
                      alpha=8.0, bias=True, device="cpu") -> LoraLutLinear:
    """An adapted layer with a random weight, bias and B (a fresh B is zero)."""
    qweight = random_bcq_weight(n, k, bits, group_size, mode, generator=generator)
    bias = torch.randn(n, generator=generator).requires_grad_() if bias else None
    base = LutLinear.from_bcq(qweight, bias)
    layer = LoraLutLinear.from_lut_linear(base, rank=rank, alpha=alpha)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(rank, k, generator=generator) / k**0.5)
        layer.lora_B.copy_(torch.randn(n, rank, generator=generator))
    return layer.to(device)


def reference(layer: LoraLutLinear, x: torch.Tensor) -> torch.Tensor:
    """x·Ŵᵀ + b + (alpha/r)·(x·Aᵀ)·Bᵀ in float64 on the CPU."""
    x64 = x.detach().to("cpu", torch.float64)
    out = x64 @ layer.qweight.to("cpu").dequantize(torch.float64).t()
    if layer.bias is not None:
        out = out + layer.bias.detach().to("cpu", torch.float64)
    a, b = (p.detach().to("cpu", torch.float64) for p in (layer.lora_A, layer.lora_B))
    return out + layer.alpha / layer.rank * (x64 @ a.t()) @ b.t()


@pytest.mark.parametrize("mode", ["general", "uniform"])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_float64_reference(generator, mode, bias):
    layer = random_lora_layer(generator, mode=mode, bias=bias)
    for shape in [(7, 96), (2, 3, 96), (1, 96)]:
        x = torch.randn(shape, generator=generator)
        out = layer(x)
        assert out.shape == (*shape[:-1], 40)
        assert_close_to_reference(out, reference(layer, x))


def test_fresh_adapter_leaves_the_output_unchanged(generator):
    base = LutLinear.from_bcq(random_bcq_weight(24, 64, 2, 32, generator=generator),
                              torch.randn(24, generator=generator))
    layer = LoraLutLinear.from_lut_linear(base, rank=8, alpha=16)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    x = torch.randn(5, 64, generator=generator)
    assert torch.equal(layer(x), base(x))
    # sharing, not copying, the packed weight and the bias
    assert layer.planes.data_ptr() == base.planes.data_ptr()
    assert layer.meta.data_ptr() == base.meta.data_ptr()
    assert layer.bias is base.bias


def test_gradients_match_float64_reference(generator):
    layer = random_lora_layer(generator)
    x = torch.randn(2, 5, 96, generator=generator, requires_grad=True)
    grad_out = torch.randn(2, 5, 40, generator=generator)
    layer(x).backward(grad_out)

    weight64 = layer.qweight.dequantize(torch.float64)
    x64, bias64, a64, b64 = (t.detach().double().requires_grad_()
                             for t in (x, layer.bias, layer.lora_A, layer.lora_B))
    out64 = x64 @ weight64.t() + bias64 + layer.scaling * (x64 @ a64.t()) @ b64.t()
    out64.backward(grad_out.double())
    for got, want in [(x.grad, x64.grad), (layer.bias.grad, bias64.grad),
                      (layer.lora_A.grad, a64.grad), (layer.lora_B.grad, b64.grad)]:
        assert relative_error(got, want) < 1e-5


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 64)
        self.norm = nn.LayerNorm(64)
        self.up = nn.Linear(64, 96)
        self.down = nn.Linear(96, 64, bias=False)
        self.head = nn.Linear(64, 16)

    def forward(self, ids):
        h = self.norm(self.embed(ids))
        return self.head(h + self.down(torch.relu(self.up(h))))


def quantized_tiny_model(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyModel()
    lutflash.quantize_model(model, bits=3, group_size=32, method="rtn", skip=("head",),
                            progress=False)
    return model


def test_add_lora_trains_only_adapters_and_biases():
    model = quantized_tiny_model()
    replaced = add_lora(model, rank=4, alpha=8)
    assert replaced == ["up", "down"]
    assert isinstance(model.up, LoraLutLinear) and isinstance(model.up, LutLinear)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["down.lora_A", "down.lora_B", "up.bias", "up.lora_A", "up.lora_B"]
    assert {name for name, _ in model.named_buffers()} >= {"up.planes", "up.meta", "down.planes"}

    ids = torch.randint(0, 16, (3, 10))
    model(ids).square().mean().backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    # B is zero, so A's gradient is exactly zero on the first step; B's is not.
    assert torch.count_nonzero(model.up.lora_A.grad) == 0
    assert torch.count_nonzero(model.up.lora_B.grad) > 0


def test_add_lora_targets_and_options():
    model = quantized_tiny_model()
    assert add_lora(model, rank=2, targets=("down",), train_bias=False) == ["down"]
    assert type(model.up) is LutLinear and model.down.rank == 2 and model.down.scaling == 1.0
    assert not any(p.requires_grad for name, p in model.named_parameters() if "lora_" not in name)
    model = quantized_tiny_model()
    assert add_lora(model, targets=lambda name, module: name == "up") == ["up"]
    with pytest.raises(ValueError, match="targets"):
        add_lora(TinyModel())  # nothing quantized
    with pytest.raises(ValueError, match="rank"):
        LoraLutLinear.from_lut_linear(quantized_tiny_model().up, rank=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraLutLinear.from_lut_linear(quantized_tiny_model().up, dropout=1.0)
    with pytest.raises(TypeError, match="base"):
        LoraLutLinear.from_lut_linear(nn.Linear(64, 64))


def test_state_dict_round_trip():
    model = quantized_tiny_model()
    add_lora(model, rank=4, alpha=8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 16, (3, 10))
    for _ in range(2):  # move A and B away from their initial values
        optimizer.zero_grad()
        model(ids).square().mean().backward()
        optimizer.step()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    assert {"up.lora_A", "up.lora_B", "up.planes", "up.meta", "up.layout"} <= set(state)

    restored = quantized_tiny_model(seed=1)
    add_lora(restored, rank=4, alpha=8)
    restored.load_state_dict(state)
    assert torch.equal(restored(ids), model(ids))

    # a quantized model's state_dict (no adapters) loads into an adapted one
    plain = quantized_tiny_model(seed=2)
    adapted = quantized_tiny_model(seed=3)
    add_lora(adapted, rank=4)
    result = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["down.lora_A", "down.lora_B", "up.lora_A", "up.lora_B"]
    assert torch.equal(adapted(ids), plain(ids))  # B = 0
    with pytest.raises(RuntimeError, match="lora_A"):
        other_rank = quantized_tiny_model()
        add_lora(other_rank, rank=2)
        other_rank.load_state_dict(state)


def test_dropout_only_in_training(generator):
    layer = random_lora_layer(generator)
    dropped = LoraLutLinear.from_lut_linear(LutLinear.from_bcq(layer.qweight, layer.bias),
                                            rank=layer.rank, alpha=layer.alpha, dropout=0.5)
    dropped.load_state_dict(layer.state_dict())
    x = torch.randn(8, 96, generator=generator)
    assert torch.equal(dropped.eval()(x), layer(x))
    torch.manual_seed(0)
    assert not torch.allclose(dropped.train()(x), layer(x))


def test_to_dtype_converts_adapters(generator):
    layer = random_lora_layer(generator).to(torch.bfloat16)
    assert layer.lora_A.dtype == layer.lora_B.dtype == layer.bias.dtype == torch.bfloat16
    x = torch.randn(6, 96, generator=generator).to(torch.bfloat16)
    ref = reference(layer, x)
    naive = (x.float() @ layer.qweight.dequantize(torch.float32).t()).bfloat16() + layer.bias
    naive = naive + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    assert_close_to_reference(layer(x), ref, naive)


def test_float32_adapters_in_a_bfloat16_layer(generator):
    """QLoRA's mixed precision: the update in the adapters' dtype, added in the input's, and
    float32 gradients for the adapters."""
    layer = random_lora_layer(generator).to(torch.bfloat16)
    layer.lora_A.data, layer.lora_B.data = layer.lora_A.data.float(), layer.lora_B.data.float()
    x = torch.randn(6, 96, generator=generator).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    base = LutLinear.from_bcq(layer.qweight, layer.bias)(x)
    update = layer.scaling * (x.float() @ layer.lora_A.t()) @ layer.lora_B.t()
    assert torch.equal(out, base + update.bfloat16())
    out.float().square().sum().backward()
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32


@pytest.mark.cuda
@pytest.mark.skipif(not lutflash.built_with_cuda, reason="lutflash built without CUDA")
def test_cuda_uses_the_tensors_device_and_its_current_stream(generator, cuda_device):
    """The layer on cuda_device (cuda:1 under scripts/multi_gpu_check.sh, with cuda:0 current)
    whose current stream is a side stream held back by a sleep kernel: the new input is written
    behind the sleep, so the output is right only if the kernels went to that stream (a kernel
    on another stream or device would read the old input, or fail). The tolerance is loose: a
    stale input is off by 100%, and cuBLAS may use TF32 for the adapters' products."""
    layer = random_lora_layer(generator, n=64, k=256, group_size=128).to(cuda_device)
    x = torch.randn(4, 256, generator=generator).to(cuda_device)
    assert relative_error(layer(x), reference(layer, x)) < 1e-4

    new_x = torch.randn(4, 256, generator=generator).to(cuda_device)
    caller_device = torch.cuda.current_device()
    stream = torch.cuda.Stream(cuda_device)
    with torch.cuda.device(cuda_device):
        previous = torch.cuda.current_stream()
        torch.cuda.set_stream(stream)  # the current stream of cuda_device only
    try:
        assert torch.cuda.current_device() == caller_device
        stream.wait_stream(previous)
        with torch.cuda.device(cuda_device):
            torch.cuda._sleep(100_000_000)  # ~50 ms on `stream`
        with torch.no_grad():
            x.copy_(new_x)  # behind the sleep
            out = layer(x)
        assert torch.cuda.current_device() == caller_device
        stream.synchronize()
    finally:
        with torch.cuda.device(cuda_device):
            torch.cuda.set_stream(previous)
    assert relative_error(out, reference(layer, new_x)) < 1e-4


@pytest.mark.cuda
@pytest.mark.skipif(not lutflash.built_with_cuda, reason="lutflash built without CUDA")
def test_cuda_graph_capture_on_any_device(generator, cuda_device):
    """Capture records only the work enqueued on the capturing stream, so a replay with a new
    input gives the new output only if every kernel went to the current stream."""
    layer = random_lora_layer(generator, n=64, k=256, group_size=128).to(cuda_device)
    x = torch.randn(4, 256, generator=generator).to(cuda_device)
    stream = torch.cuda.Stream(cuda_device)
    stream.wait_stream(torch.cuda.current_stream(cuda_device))
    with torch.no_grad(), torch.cuda.stream(stream):
        layer(x)  # warm-up outside the graph, as torch asks
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = layer(x)
    new_x = torch.randn(4, 256, generator=generator).to(cuda_device)
    x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize(cuda_device)
    assert relative_error(out, reference(layer, new_x)) < 1e-4
