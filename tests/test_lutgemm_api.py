"""The PyTorch face of lutgemm: the custom op, autograd, LutLinear, state_dicts,
torch.compile and quantize_model."""

import io
import sys

import pytest
import torch
from torch import nn

import lutflash
from lutflash.nn import LutLinear
from lutflash.testing import lutgemm_reference, random_bcq_weight, relative_error

lutgemm_module = sys.modules["lutflash.lutgemm"]  # the module; lutflash.lutgemm is the function


def test_opcheck(generator):
    qweight = random_bcq_weight(24, 64, 3, 32, "general", generator=generator)
    bias = torch.randn(24, generator=generator)
    for x, b in [(torch.randn(5, 64, generator=generator), bias),
                 (torch.randn(2, 3, 64, generator=generator, requires_grad=True), None),
                 (torch.randn(4, 64, generator=generator, requires_grad=True),
                  bias.clone().requires_grad_())]:
        torch.library.opcheck(torch.ops.lutflash.lutgemm.default,
                              (x, qweight.planes, qweight.meta, b, 24, 64, 3, 32, 0))


def test_gradients_match_float64_reference(generator):
    qweight = random_bcq_weight(20, 96, 3, 32, "uniform", generator=generator)
    x = torch.randn(2, 5, 96, generator=generator, requires_grad=True)
    bias = torch.randn(20, generator=generator, requires_grad=True)
    grad_out = torch.randn(2, 5, 20, generator=generator)
    lutflash.lutgemm(x, qweight, bias).backward(grad_out)

    weight64 = qweight.dequantize(torch.float64)
    x64 = x.detach().double().requires_grad_()
    bias64 = bias.detach().double().requires_grad_()
    (x64 @ weight64.t() + bias64).backward(grad_out.double())
    assert relative_error(x.grad, x64.grad) < 1e-5
    assert relative_error(bias.grad, bias64.grad) < 1e-5


def test_lutlinear_from_linear_matches_its_quantized_weight(generator):
    torch.manual_seed(0)
    linear = nn.Linear(128, 40)
    layer = LutLinear.from_linear(linear, bits=3, group_size=64, method="greedy")
    x = torch.randn(3, 128, generator=generator)
    ref = lutgemm_reference(x, layer.qweight, linear.bias)
    assert relative_error(layer(x), ref) < 1e-5
    # and close to the original layer
    assert relative_error(layer(x), linear(x)) < 0.3
    text = repr(layer)
    assert "bits=3" in text and "group_size=64" in text and "in_features=128" in text


def test_lutlinear_state_dict_round_trip(generator):
    layer = LutLinear.from_bcq(random_bcq_weight(30, 64, 2, 32, "uniform", generator=generator),
                               torch.randn(30, generator=generator))
    state = layer.state_dict()
    assert set(state) == {"planes", "meta", "layout", "bias"}
    fresh = LutLinear(64, 30, bits=2, group_size=32, mode="uniform")
    fresh.load_state_dict(state)
    x = torch.randn(4, 64, generator=generator)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    again = LutLinear(64, 30, bits=2, group_size=32, mode="uniform")
    again.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(again(x), layer(x), rtol=0, atol=0)


def test_lutlinear_safetensors_round_trip(tmp_path, generator):
    safetensors = pytest.importorskip("safetensors.torch")
    model = nn.Sequential(LutLinear.from_bcq(random_bcq_weight(16, 64, 4, 32, "general",
                                                               generator=generator)),
                          nn.ReLU(), nn.Linear(16, 4))
    path = tmp_path / "model.safetensors"
    safetensors.save_file(model.state_dict(), str(path))
    clone = nn.Sequential(LutLinear(64, 16, bias=False, bits=4, group_size=32), nn.ReLU(),
                          nn.Linear(16, 4))
    clone.load_state_dict(safetensors.load_file(str(path)))
    x = torch.randn(3, 64, generator=generator)
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("change,match", [
    ({"bits": 3}, "bits"), ({"group_size": 64}, "group_size"), ({"mode": "uniform"}, "mode"),
    ({"in_features": 96}, "in_features"), ({"out_features": 17}, "out_features")])
def test_load_state_dict_with_wrong_layout(change, match, generator):
    layer = LutLinear.from_bcq(random_bcq_weight(16, 128, 2, 32, "general", generator=generator))
    config = dict(in_features=128, out_features=16, bits=2, group_size=32, mode="general")
    config.update(change)
    other = LutLinear(config.pop("in_features"), config.pop("out_features"), bias=False,
                      **config)
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(layer.state_dict())


def test_load_state_dict_with_wrong_version_or_shape(generator):
    layer = LutLinear.from_bcq(random_bcq_weight(16, 64, 2, 32, "general", generator=generator))
    state = layer.state_dict()
    state["layout"] = state["layout"].clone()
    state["layout"][0] = 99
    with pytest.raises(ValueError, match="format version"):
        LutLinear(64, 16, bias=False, bits=2, group_size=32).load_state_dict(state)
    state = layer.state_dict()
    del state["layout"]
    state["planes"] = state["planes"][:, :, :8].clone()
    with pytest.raises(ValueError, match="planes: expected shape"):
        LutLinear(64, 16, bias=False, bits=2, group_size=32).load_state_dict(state, strict=False)
    state = layer.state_dict()
    state["planes"] = state["planes"].float()
    with pytest.raises(TypeError, match="planes: expected dtype"):
        LutLinear(64, 16, bias=False, bits=2, group_size=32).load_state_dict(state)


def test_to_converts_metadata_and_bias(generator):
    layer = LutLinear.from_bcq(random_bcq_weight(16, 64, 3, 32, "general", generator=generator),
                               torch.randn(16, generator=generator))
    half = layer.to(torch.bfloat16)
    assert half.meta.dtype == torch.bfloat16 and half.bias.dtype == torch.bfloat16
    assert half.planes.dtype == torch.int32 and half.layout.dtype == torch.int64
    x = torch.randn(2, 64, generator=generator).bfloat16()
    assert half(x).dtype == torch.bfloat16
    assert relative_error(half(x), lutgemm_reference(x, half.qweight, half.bias)) < 2e-2


def test_torch_compile_fullgraph(generator):
    model = nn.Sequential(
        LutLinear.from_bcq(random_bcq_weight(32, 64, 3, 32, "general", generator=generator),
                           torch.randn(32, generator=generator)),
        nn.GELU(),
        LutLinear.from_bcq(random_bcq_weight(8, 32, 2, 32, "uniform", generator=generator)))
    x = torch.randn(5, 64, generator=generator)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected)
    y = torch.randn(7, 64, generator=generator, requires_grad=True)
    compiled(y).sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()


def test_quantize_model_replaces_linears(generator):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(),
                          nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 32)), nn.Linear(32, 8))
    x = torch.randn(4, 64, generator=generator)
    before = model(x)
    replaced = lutflash.quantize_model(model, bits=4, group_size=32, method="rtn",
                                       skip=("3",), progress=False)
    assert replaced == ["0", "2.0", "2.1"]
    assert isinstance(model[0], LutLinear) and isinstance(model[2][1], LutLinear)
    assert isinstance(model[3], nn.Linear) and not isinstance(model[3], LutLinear)
    assert relative_error(model(x), before) < 0.2
    only_first = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 32))
    names = lutflash.quantize_model(only_first, bits=2, group_size=32, method="greedy",
                                    skip=lambda name, module: module.in_features == 32,
                                    progress=False)
    assert names == ["0"]


def test_quantize_model_names_the_failing_layer():
    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"^1: group_size"):
        lutflash.quantize_model(model, bits=3, group_size=32, progress=False)


@pytest.mark.parametrize("group_size", [32, None])
def test_gradient_of_a_layer_wider_than_one_dequantization_chunk(monkeypatch, generator,
                                                                  group_size):
    # blocks of 32 input columns: 3 blocks of the 80 (the last partial)
    monkeypatch.setattr(lutgemm_module, "_GRAD_CHUNK_ELEMENTS", 40 * 32)
    qweight = random_bcq_weight(40, 96 if group_size else 80, 2, group_size, "general",
                                generator=generator)
    k = qweight.shape[1]
    x = torch.randn(3, k, generator=generator, requires_grad=True)
    grad_out = torch.randn(3, 40, generator=generator)
    lutflash.lutgemm(x, qweight).backward(grad_out)
    expected = grad_out.double() @ qweight.dequantize(torch.float64)
    assert relative_error(x.grad, expected) < 1e-5
    # in float16, every element of the gradient is rounded once, as grad_out @ W would be
    xh = x.detach().half().requires_grad_()
    lutflash.lutgemm(xh, qweight).backward(grad_out.half())
    assert torch.equal(xh.grad, grad_out.half() @ qweight.dequantize(torch.float16))
