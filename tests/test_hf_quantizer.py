"""quant_method "lutflash" in transformers: quantize while loading, save_pretrained, reload.

A tiny random Llama (2 layers, hidden 128, GQA) saved in full precision, loaded with
quantization_config=LutflashConfig(...), saved again and loaded back without re-quantizing.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lutflash  # noqa: E402
from lutflash.integrations import hf_quantizer  # noqa: E402
from lutflash.integrations.hf_quantizer import LutflashConfig  # noqa: E402
from lutflash.bcq import bits_per_weight  # noqa: E402
from lutflash.nn import LutLinear  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def fp_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    folder = tmp_path_factory.mktemp("fp")
    model.save_pretrained(folder)
    return folder, model


def load(folder, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


def logits(model, seed=1):
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("bits,group_size,method,meta_dtype", [
    (3, 32, "alternating", None), (4, 128, "rtn", "float16"), (2, None, "greedy", "bfloat16")])
def test_quantize_on_load_equals_quantize(fp_folder, bits, group_size, method, meta_dtype):
    folder, source = fp_folder
    config = LutflashConfig(bits=bits, group_size=group_size, method=method,
                            meta_dtype=meta_dtype, modules_to_not_convert=["lm_head"])
    model = load(folder, quantization_config=config)
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, LutLinear)
    converted = {name: m for name, m in model.named_modules() if isinstance(m, LutLinear)}
    assert len(converted) == 2 * 7
    want_dtype = {None: torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[meta_dtype]
    for name, layer in converted.items():
        assert "weight" not in layer._parameters
        expected = lutflash.quantize(source.get_submodule(name).weight, bits, group_size, method,
                                     meta_dtype=want_dtype)
        assert torch.equal(layer.planes, expected.planes), name
        assert torch.equal(layer.meta, expected.meta), name
        assert layer.meta.dtype == want_dtype
    # the product the model computes is the quantized layers' own
    x = torch.randn(3, CONFIG["hidden_size"])
    q_proj = converted["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(q_proj(x), lutflash.lutgemm(x, q_proj.qweight))


def test_round_trip(fp_folder, tmp_path, monkeypatch):
    folder, _ = fp_folder
    model = load(folder, quantization_config=LutflashConfig(bits=3, group_size=32,
                                                            modules_to_not_convert=["lm_head"]))
    before = logits(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "lutflash" and saved["bits"] == 3 and saved["meta_dtype"] == "float32"

    def no_quantize(*args, **kwargs):
        raise AssertionError("a saved lutflash model must load without re-quantizing")

    monkeypatch.setattr(hf_quantizer, "quantize", no_quantize)
    reloaded = load(tmp_path)
    assert isinstance(reloaded.model.layers[1].mlp.down_proj, LutLinear)
    assert torch.equal(logits(reloaded), before)


@pytest.mark.parametrize("data_offset", [0, 8])
def test_round_trip_whatever_the_file_alignment(fp_folder, tmp_path, data_offset):
    # transformers hands the loaded tensors over as mapped from the file, whose data starts
    # after a JSON header padded to 8 bytes only; the kernels read planes and meta 16-byte
    # aligned. The header is padded here so that the data starts at 0 or 8 (mod 16).
    model = load(fp_folder[0], quantization_config=LutflashConfig(bits=3, group_size=32))
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    for pad in range(16):
        save_file(tensors, path, metadata={"format": "pt", "pad": "x" * pad})
        if (8 + int.from_bytes(path.read_bytes()[:8], "little")) % 16 == data_offset:
            break
    else:
        raise AssertionError(f"no padding put the data at {data_offset} (mod 16)")
    reloaded = load(tmp_path)
    for name, layer in reloaded.named_modules():
        if isinstance(layer, LutLinear):
            assert layer.planes.data_ptr() % 16 == 0 and layer.meta.data_ptr() % 16 == 0, name
    assert torch.equal(logits(reloaded), logits(model))


def test_saved_size(fp_folder, tmp_path):
    # the packed layers take bits_per_weight / 32 of their float32 weights' bytes (general
    # mode, float32 metadata: 3 + 32 · 4 / 128 = 4 bits per weight), plus a 6-entry layout each
    folder, source = fp_folder
    model = load(folder, quantization_config=LutflashConfig(bits=3, group_size=128,
                                                            modules_to_not_convert=["lm_head"]))
    model.save_pretrained(tmp_path)
    linear_bytes = sum(m.weight.numel() * 4 for n, m in source.named_modules()
                       if isinstance(m, torch.nn.Linear) and n != "lm_head")
    other_bytes = sum(p.numel() * 4 for p in source.parameters()) - linear_bytes
    packed = sum(m.planes.numel() * 4 + m.meta.numel() * 4 + m.layout.numel() * 8
                 for m in model.modules() if isinstance(m, LutLinear))
    layers = 2 * 7
    expected = linear_bytes / 32 * bits_per_weight(3, 128, "general", meta_bytes=4) + layers * 48
    assert packed == pytest.approx(expected, rel=0.01)
    size = os.path.getsize(tmp_path / "model.safetensors")
    assert other_bytes + packed <= size <= other_bytes + packed + 16384  # + the JSON header


def tampered(folder, tmp_path, edit):
    """A copy of the saved model whose tensors went through `edit(tensors)`."""
    model = load(folder, quantization_config=LutflashConfig(bits=3, group_size=32))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path


def test_tampered_layout_refused(fp_folder, tmp_path):
    def edit(tensors):
        tensors["model.layers.1.mlp.up_proj.layout"][3] = 4  # claims 4 bits over 3-bit planes
    folder = tampered(fp_folder[0], tmp_path, edit)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.layout: .*bits is 4"):
        load(folder)


def test_tampered_planes_refused(fp_folder, tmp_path):
    def edit(tensors):
        key = "model.layers.0.self_attn.k_proj.planes"
        tensors[key] = tensors[key][:, :2].contiguous()  # two planes of three
    folder = tampered(fp_folder[0], tmp_path, edit)
    # transformers refuses a size mismatch (its load report names the key and both shapes)
    with pytest.raises(RuntimeError, match=r"ignore_mismatched_sizes"):
        load(folder)


def test_truncated_file_refused(fp_folder, tmp_path):
    model = load(fp_folder[0], quantization_config=LutflashConfig(bits=3, group_size=32))
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match=r"(?i)safetensors|incomplete|truncat|invalid|header|size"):
        load(tmp_path)


@pytest.mark.parametrize("kwargs,name", [(dict(bits=9), "bits"), (dict(method="awq"), "method"),
                                         (dict(method="rtn", calibration=[torch.zeros(1, 4, dtype=torch.long)]),
                                          "calibration"),
                                         (dict(method="gptq", calibration=[torch.zeros(1, 2, 4, dtype=torch.long)]),
                                          r"calibration\[0\]"),
                                         (dict(method="gptq", damp=-1), "damp"),
                                         (dict(awq=1), "awq"),
                                         (dict(mode="ternary"), "mode"),
                                         (dict(meta_dtype="float64"), "meta_dtype"),
                                         (dict(group_size=0), "group_size")])
def test_config_refuses(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        LutflashConfig(**kwargs)


def test_group_size_must_fit_the_layers(fp_folder):
    with pytest.raises(ValueError, match="^group_size: "):
        load(fp_folder[0], quantization_config=LutflashConfig(bits=3, group_size=96))


def test_register_is_idempotent():
    hf_quantizer.register()
    hf_quantizer.register()
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    assert AUTO_QUANTIZER_MAPPING["lutflash"] is hf_quantizer.LutflashHfQuantizer


def test_reload_with_lutflash_imported_after_transformers(fp_folder, tmp_path):
    model = load(fp_folder[0], quantization_config=LutflashConfig(bits=4, group_size=64))
    model.save_pretrained(tmp_path)
    code = ("import transformers.modeling_utils, transformers\n"
            "import lutflash\n"
            f"m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
            "assert type(m.model.layers[0].self_attn.q_proj).__name__ == 'LutLinear'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_gptq_on_load_with_calibration(fp_folder, tmp_path):
    """method="gptq": the full-precision model loads, is calibrated and quantized layer by
    layer (the same as lutflash.quantize_model on it), saves, and reloads without the batches."""
    folder, source = fp_folder
    ids = torch.randint(0, CONFIG["vocab_size"], (4, 24), generator=torch.Generator().manual_seed(3))
    calibration = [ids[:2], {"input_ids": ids[2:]}]
    config = LutflashConfig(bits=3, group_size=64, method="gptq", calibration=calibration,
                            modules_to_not_convert=["lm_head"])
    assert "calibration" not in config.to_dict()
    model = load(folder, quantization_config=config)
    reference = load(folder)
    names = lutflash.quantize_model(reference, 3, 64, "gptq", skip=("lm_head",), progress=False,
                                    calibration=calibration)
    assert len(names) == 14 and isinstance(model.lm_head, torch.nn.Linear)
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, LutLinear) and layer.mode == "general"
        assert torch.equal(layer.planes, reference.get_submodule(name).planes), name
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["method"] == "gptq" and "calibration" not in saved
    reloaded = load(tmp_path)
    assert torch.equal(logits(reloaded), logits(model))


def test_gptq_on_load_needs_calibration(fp_folder):
    with pytest.raises(ValueError, match="^calibration: "):
        load(fp_folder[0], quantization_config=LutflashConfig(bits=3, group_size=64, method="gptq"))


def test_awq_on_load_equals_quantize_model(fp_folder):
    folder, _ = fp_folder
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(4))
    config = LutflashConfig(bits=3, group_size=64, method="rtn", awq=True, calibration=[ids],
                            modules_to_not_convert=["lm_head"])
    model = load(folder, quantization_config=config)
    reference = load(folder)
    names = lutflash.quantize_model(reference, 3, 64, "rtn", skip=("lm_head",), progress=False,
                                    calibration=[ids], awq=True)
    for name in names:
        assert torch.equal(model.get_submodule(name).planes, reference.get_submodule(name).planes)
    assert torch.equal(logits(model), logits(reference))
