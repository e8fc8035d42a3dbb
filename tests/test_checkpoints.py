"""lutflash.from_quantized_pretrained: GPTQ and AWQ checkpoint folders as transformers models.

Each test writes a checkpoint the way AutoGPTQ/GPTQModel and AutoAWQ lay it out (config.json
with its quantization_config, safetensors files, sharded with an index or not) from random
integer codes, zero points and fp16 scales of a tiny random model (Llama, Qwen2 with q/k/v
biases, OPT with biases everywhere), packed by the documented packers of checkpoint_packing.py.
The loaded model must hold, bit for bit, s · (c − zp) in every LutLinear, the checkpoint's own
values in every other tensor, and compute the logits of the same model with those weights in
plain nn.Linear layers (float64 reference, DESIGN.md's tolerance rule).
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from checkpoint_packing import awq_pack_cols, gptq_pack_rows, source_weight  # noqa: E402

import lutflash  # noqa: E402
from lutflash.nn import LutLinear  # noqa: E402
from lutflash.testing import assert_close_to_reference, relative_error  # noqa: E402

LAYERS = 2


def model_config(family: str, vocab: int, hidden: int, inter: int, tie: bool):
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=LAYERS,
                  num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=tie)
    if family == "llama":
        return transformers.LlamaConfig(intermediate_size=inter, num_key_value_heads=2, **common)
    if family == "qwen2":
        return transformers.Qwen2Config(intermediate_size=inter, num_key_value_heads=2, **common)
    if family == "opt":
        return transformers.OPTConfig(ffn_dim=inter, word_embed_proj_dim=hidden, **common)
    raise ValueError(family)


@dataclass
class Case:
    family: str = "llama"
    method: str = "gptq"
    bits: int = 4
    group_size: int = 32
    fmt: str = "gptq"            # GPTQ zero convention: "gptq" (zero − 1 stored) or "gptq_v2"
    format_key: str = "checkpoint_format"  # AutoGPTQ's key, or GPTQModel's "format"
    sym: bool = False
    vocab: int = 128
    hidden: int = 64
    inter: int = 128
    tie: bool = True
    keep: tuple[str, ...] = ()   # Linear layers left in full precision
    quantize_lm_head: bool = False
    shards: int = 1
    zero_bias: bool = False      # AutoGPTQ's zero bias for layers that have none
    seed: int = 0


@dataclass
class Checkpoint:
    folder: Path
    case: Case
    quantized: dict        # layer name -> float64 weight s · (c − zp), (out, in)
    state: dict            # every tensor written, by key
    reference: torch.nn.Module  # float64, plain nn.Linear layers holding those weights


def write_checkpoint(folder: Path, case: Case, *, edit=None, quantization_config=None) -> Checkpoint:
    """Writes `case` as a checkpoint folder. edit(state) may change the tensors before they are
    written; quantization_config, if given, replaces the one written to config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(case.seed)
    gen = torch.Generator().manual_seed(case.seed)
    config = model_config(case.family, case.vocab, case.hidden, case.inter, case.tie)
    source = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random values everywhere (norms around 1), as fp16 holds them
        for name, p in source.named_parameters():
            value = torch.randn(p.shape, generator=gen) * 0.1
            if "norm" in name and name.endswith("weight"):
                value += 1
            p.copy_(value.half().float())
    state = {key: value.half().contiguous() for key, value in source.state_dict().items()}
    if case.tie:
        del state["lm_head.weight"]  # saved once, as transformers does for tied embeddings
    reference = copy.deepcopy(source).double()
    quantized = {}
    for name, module in source.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.split(".")[-1] in case.keep or \
                name in case.keep or (name == "lm_head" and not case.quantize_lm_head):
            continue
        n, k = module.out_features, module.in_features
        group = k if case.group_size == -1 or case.group_size >= k else case.group_size
        groups = k // group
        codes = torch.randint(0, 2 ** case.bits, (k, n), generator=gen)
        if case.sym:
            zeros = torch.full((groups, n), 2 ** (case.bits - 1))
        else:
            zeros = torch.randint(0, 2 ** case.bits, (groups, n), generator=gen)
        scales = (torch.rand(groups, n, generator=gen) * 0.05 + 1e-3).half()
        del state[f"{name}.weight"]
        if case.method == "gptq":
            if case.fmt == "gptq":  # v1 stores zero − 1: a zero of 0 would wrap around
                zeros = zeros.clamp(min=1)
            stored = zeros - 1 if case.fmt == "gptq" else zeros
            state[f"{name}.qweight"] = gptq_pack_rows(codes, case.bits)
            state[f"{name}.qzeros"] = gptq_pack_rows(stored.t(), case.bits).t().contiguous()
            state[f"{name}.g_idx"] = (torch.arange(k) // group).to(torch.int32)
        else:
            state[f"{name}.qweight"] = awq_pack_cols(codes)
            state[f"{name}.qzeros"] = awq_pack_cols(zeros)
        state[f"{name}.scales"] = scales
        if module.bias is None and case.zero_bias:
            state[f"{name}.bias"] = torch.zeros(n, dtype=torch.float16)
        weight = source_weight(codes, zeros, scales, group, torch.float64)
        quantized[name] = weight
        with torch.no_grad():
            reference.get_submodule(name).weight.copy_(weight)
    if edit is not None:
        edit(state)
    if quantization_config is None:
        if case.method == "gptq":
            quantization_config = {"quant_method": "gptq", "bits": case.bits,
                                   "group_size": case.group_size, "desc_act": False,
                                   "sym": case.sym, case.format_key: case.fmt}
        else:
            quantization_config = {"quant_method": "awq", "bits": case.bits,
                                   "group_size": case.group_size, "zero_point": True,
                                   "version": "gemm",
                                   "modules_to_not_convert": list(case.keep) or None}
    config.save_pretrained(folder)
    data = json.loads((folder / "config.json").read_text())
    data["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(data, indent=2))
    save_tensors(folder, state, case.shards)
    return Checkpoint(folder, case, quantized, state, reference.eval())


def save_tensors(folder: Path, state: dict, shards: int) -> None:
    if shards == 1:
        safetensors_torch.save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    # round robin over the sorted keys: one layer's qweight, qzeros and scales in different files
    parts = [{} for _ in names]
    for i, key in enumerate(sorted(state)):
        parts[i % shards][key] = state[key]
    weight_map = {}
    for name, part in zip(names, parts, strict=True):
        safetensors_torch.save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def token_ids(case: Case, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, case.vocab, (2, 9), generator=torch.Generator().manual_seed(seed))


def check_loaded(model, ckpt: Checkpoint, dtype: torch.dtype) -> None:
    """The weights bit for bit, the other tensors exactly, the ties and the layer types."""
    case = ckpt.case
    assert not model.training
    lut = {name: m for name, m in model.named_modules() if isinstance(m, LutLinear)}
    assert set(lut) == set(ckpt.quantized)
    for name, layer in lut.items():
        assert layer.bits == case.bits and layer.mode == "uniform", name
        assert layer.meta.dtype == torch.float32
        assert torch.equal(layer.qweight.dequantize(torch.float64), ckpt.quantized[name]), name
        bias = ckpt.state.get(f"{name}.bias")
        if bias is None or (not bias.any() and ckpt.reference.get_submodule(name).bias is None):
            assert layer.bias is None, name
        else:
            assert layer.bias.dtype == dtype and torch.equal(layer.bias, bias.to(dtype)), name
    loaded = model.state_dict()
    for key, value in ckpt.state.items():
        if key.rpartition(".")[0] in lut:
            continue
        assert loaded[key].dtype == dtype and torch.equal(loaded[key], value.to(dtype)), key
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert name not in ckpt.quantized and f"{name}.qweight" not in ckpt.state
    if case.tie:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    else:
        assert not case.quantize_lm_head or isinstance(model.lm_head, LutLinear)
        if not case.quantize_lm_head:
            assert model.lm_head.weight is not model.get_input_embeddings().weight
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert not tensor.is_meta, name


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def random_cases(count: int, seed: int):
    rng = random.Random(seed)
    linear_names = {"llama": ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"],
                    "qwen2": ["v_proj", "o_proj", "gate_proj", "down_proj"],
                    "opt": ["k_proj", "out_proj", "fc1", "fc2"]}
    for _ in range(count):
        family = rng.choice(["llama", "llama", "qwen2", "opt"])
        method = rng.choice(["gptq", "gptq", "awq"])
        tie = rng.random() < 0.5
        yield Case(
            family=family, method=method,
            bits=rng.choice([2, 3, 4, 8]) if method == "gptq" else 4,
            group_size=rng.choice([32, 64, 128, -1]),
            fmt=rng.choice(["gptq", "gptq_v2"]),
            format_key=rng.choice(["checkpoint_format", "format"]),
            sym=rng.random() < 0.3,
            vocab=rng.choice([96, 128, 160]), hidden=rng.choice([64, 128]),
            inter=rng.choice([128, 256]), tie=tie,
            keep=tuple(rng.sample(linear_names[family], rng.choice([0, 0, 1]))),
            quantize_lm_head=not tie and rng.random() < 0.4,
            shards=rng.choice([1, 1, 2, 3]), zero_bias=rng.random() < 0.3,
            seed=rng.randint(0, 2 ** 31))


def case_id(case: Case) -> str:
    return (f"{case.family}-{case.method}{case.bits}-g{case.group_size}"
            f"{'-' + case.fmt if case.method == 'gptq' else ''}{'-sym' if case.sym else ''}"
            f"-h{case.hidden}{'-tied' if case.tie else ''}{'-qhead' if case.quantize_lm_head else ''}"
            f"{'-keep' if case.keep else ''}-s{case.shards}")


@pytest.mark.parametrize("case", list(random_cases(16, seed=1101)), ids=case_id)
def test_random_checkpoint_loads_exactly(case, tmp_path):
    ckpt = write_checkpoint(tmp_path, case)
    model = lutflash.from_quantized_pretrained(tmp_path, dtype=torch.float32)
    check_loaded(model, ckpt, torch.float32)
    ids = token_ids(case)
    out = logits(model, ids)
    reference = logits(ckpt.reference, ids)
    assert_close_to_reference(out, reference)
    # the same model with the dequantized weights in plain float32 nn.Linear layers
    # (each is within 1e-5 of the float64 logits in relative norm, so within 2e-5 of the other)
    plain = logits(copy.deepcopy(ckpt.reference).float(), ids)
    assert relative_error(out, plain.double()) < 2e-5


def test_every_gptq_bit_width_and_both_zero_conventions(tmp_path):
    for i, (bits, fmt) in enumerate([(2, "gptq"), (3, "gptq_v2"), (4, "gptq_v2"), (8, "gptq")]):
        case = Case(bits=bits, fmt=fmt, group_size=[32, 64, -1, 32][i], sym=i % 2 == 0, seed=i)
        ckpt = write_checkpoint(tmp_path / str(i), case)
        model = lutflash.from_quantized_pretrained(tmp_path / str(i), dtype=torch.float32)
        check_loaded(model, ckpt, torch.float32)
        assert_close_to_reference(logits(model, token_ids(case)),
                                  logits(ckpt.reference, token_ids(case)))


def test_float16_model(tmp_path):
    # the default dtype: fp16 activations, norms and embeddings; float32 metadata (exact)
    case = Case(family="qwen2", bits=4, group_size=64, tie=False, seed=5)
    ckpt = write_checkpoint(tmp_path, case)
    model = lutflash.from_quantized_pretrained(tmp_path)
    check_loaded(model, ckpt, torch.float16)
    ids = token_ids(case)
    naive = logits(copy.deepcopy(ckpt.reference).half(), ids)
    assert_close_to_reference(logits(model, ids).double(), logits(ckpt.reference, ids),
                              naive.double())
    assert logits(model, ids).dtype == torch.float16


def test_meta_dtype_float16_rounds_only_the_offsets(tmp_path):
    case = Case(bits=3, fmt="gptq_v2", seed=6)
    ckpt = write_checkpoint(tmp_path, case)
    model = lutflash.from_quantized_pretrained(tmp_path, dtype=torch.float32,
                                               meta_dtype=torch.float16)
    exact = lutflash.from_quantized_pretrained(tmp_path, dtype=torch.float32)
    for name in ckpt.quantized:
        meta16, meta32 = model.get_submodule(name).meta, exact.get_submodule(name).meta
        assert meta16.dtype == torch.float16
        assert torch.equal(meta16[:, 0].float(), meta32[:, 0]), name  # the fp16 scales, unchanged
        assert torch.equal(meta16[:, 1], meta32[:, 1].half()), name  # the offsets z, rounded once
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.qweight.dequantize(torch.float64),
                               ckpt.quantized["model.layers.0.mlp.up_proj"], rtol=0, atol=1e-3)


def test_quantized_layers_are_never_materialized(tmp_path, monkeypatch):
    # the model is built with its parameters on the meta device: no Linear is initialized in memory
    write_checkpoint(tmp_path, Case(seed=7))
    devices = []
    reset = torch.nn.Linear.reset_parameters

    def spy(self):
        devices.append(self.weight.device.type)
        reset(self)

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", spy)
    register = torch.nn.Module.register_parameter
    model = lutflash.from_quantized_pretrained(tmp_path, dtype=torch.float32)
    assert len(devices) == 2 * 7 + 1 and set(devices) == {"meta"}
    assert torch.nn.Module.register_parameter is register  # only while the model was built
    assert torch.nn.Linear(4, 4).weight.device.type == "cpu"
    assert not model.lm_head.weight.is_meta


def test_tied_embeddings_saved_twice_are_tied(tmp_path):
    def edit(state):  # some exporters write both keys of a tied pair, with the same values
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    write_checkpoint(tmp_path, Case(tie=True, seed=8), edit=edit)
    model = lutflash.from_quantized_pretrained(tmp_path, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tied_embeddings_from_the_output_side(tmp_path):
    def edit(state):  # only lm_head.weight saved: the input embedding takes it
        state["lm_head.weight"] = state.pop("model.embed_tokens.weight")
    ckpt = write_checkpoint(tmp_path, Case(tie=True, seed=9), edit=edit)
    model = lutflash.from_quantized_pretrained(tmp_path, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, ckpt.state["lm_head.weight"].float())


def test_autogptq_zero_bias_dropped_and_real_bias_kept(tmp_path):
    def edit(state):
        state["model.layers.0.mlp.up_proj.bias"] = torch.randn(128).half()
    ckpt = write_checkpoint(tmp_path, Case(zero_bias=True, seed=10), edit=edit)
    model = lutflash.from_quantized_pretrained(tmp_path, dtype=torch.float32)
    assert model.model.layers[0].mlp.gate_proj.bias is None
    assert torch.equal(model.model.layers[0].mlp.up_proj.bias,
                       ckpt.state["model.layers.0.mlp.up_proj.bias"].float())
    ckpt.reference.model.layers[0].mlp.up_proj.bias = torch.nn.Parameter(
        ckpt.state["model.layers.0.mlp.up_proj.bias"].double())
    ids = token_ids(ckpt.case)
    assert_close_to_reference(logits(model, ids), logits(ckpt.reference, ids))


def test_autogptq_quantize_config_json(tmp_path):
    # AutoGPTQ's own quantize_config.json, with a config.json that has no quantization_config
    case = Case(bits=3, group_size=64, seed=11)
    ckpt = write_checkpoint(tmp_path, case)
    data = json.loads((tmp_path / "config.json").read_text())
    quant = data.pop("quantization_config")
    del quant["quant_method"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    (tmp_path / "quantize_config.json").write_text(json.dumps(quant))
    model = lutflash.from_quantized_pretrained(tmp_path, dtype=torch.float32)
    check_loaded(model, ckpt, torch.float32)


def test_quantization_config_argument_overrides_config_json(tmp_path):
    case = Case(bits=4, group_size=32, seed=12)
    write_checkpoint(tmp_path, case, quantization_config={"quant_method": "gptq", "bits": 3,
                                                          "group_size": 32})
    with pytest.raises(ValueError, match=r"qweight: expected shape .* 3-bit GPTQ"):
        lutflash.from_quantized_pretrained(tmp_path, dtype=torch.float32)
    model = lutflash.from_quantized_pretrained(
        tmp_path, dtype=torch.float32,
        quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 32})
    assert model.model.layers[0].self_attn.q_proj.bits == 4


def test_save_pretrained_round_trip(tmp_path):
    # the converted model saves as a lutflash checkpoint that from_pretrained reads back
    case = Case(family="qwen2", bits=3, group_size=32, tie=False, keep=("o_proj",), seed=13)
    write_checkpoint(tmp_path / "gptq", case)
    model = lutflash.from_quantized_pretrained(tmp_path / "gptq", dtype=torch.float32)
    assert model.config.quantization_config.quant_method == "lutflash"
    model.save_pretrained(tmp_path / "lutflash")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lutflash",
                                                                 dtype=torch.float32).eval()
    assert isinstance(reloaded.model.layers[1].mlp.down_proj, LutLinear)
    assert type(reloaded.model.layers[1].self_attn.o_proj) is torch.nn.Linear
    ids = token_ids(case)
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


def test_attn_implementation_and_device(tmp_path):
    case = Case(seed=14)
    ckpt = write_checkpoint(tmp_path, case)
    model = lutflash.from_quantized_pretrained(tmp_path, dtype=torch.float32, device="cpu",
                                               attn_implementation="lutflash")
    assert model.config._attn_implementation == "lutflash"
    ids = token_ids(case)
    assert_close_to_reference(logits(model, ids), logits(ckpt.reference, ids))


def test_patch_model_and_fusion_apply(tmp_path):
    case = Case(family="qwen2", seed=17)
    ckpt = write_checkpoint(tmp_path, case)
    model = lutflash.from_quantized_pretrained(tmp_path, dtype=torch.float32)
    assert len(lutflash.nn.fuse_lut_linears(model)) == 2 * LAYERS  # q/k/v and gate/up per layer
    summary = lutflash.patch_model(model)
    assert summary["attention"] == "lutflash" and len(summary["norms"]) == 2 * LAYERS + 1
    ids = token_ids(case)
    assert_close_to_reference(logits(model, ids), logits(ckpt.reference, ids))


def test_generation_config_is_read_and_generate_runs(tmp_path):
    case = Case(seed=16)
    write_checkpoint(tmp_path, case)
    transformers.GenerationConfig(eos_token_id=[5, 7], max_new_tokens=4,
                                  do_sample=False).save_pretrained(tmp_path)
    model = lutflash.from_quantized_pretrained(tmp_path, dtype=torch.float32)
    assert model.generation_config.eos_token_id == [5, 7]
    ids = token_ids(case)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0)
    assert out.shape[0] == 2 and 9 < out.shape[1] <= 9 + 4 and torch.equal(out[:, :9], ids)
    # greedy: the first new token is the argmax of the last position's logits
    assert torch.equal(out[:, 9], logits(model, ids)[:, -1].argmax(-1))


def test_transformers_from_pretrained_does_not_route_here(tmp_path):
    # documented: transformers refuses a lutflash config over a GPTQ checkpoint's own
    from lutflash.integrations.hf_quantizer import LutflashConfig

    write_checkpoint(tmp_path, Case(seed=15))
    with pytest.raises(ValueError, match="GPTQConfig but you are passing a LutflashConfig"):
        transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=LutflashConfig(bits=4, group_size=32))


# Refusals: every one names the file, tensor or layer and what is wrong.


def rewrite_config(folder: Path, change) -> None:
    data = json.loads((folder / "config.json").read_text())
    change(data)
    (folder / "config.json").write_text(json.dumps(data))


@pytest.fixture
def good(tmp_path):
    return write_checkpoint(tmp_path / "ckpt", Case(seed=20, shards=2)).folder


def test_refuses_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        lutflash.from_quantized_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"config\.json: not found"):
        lutflash.from_quantized_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        lutflash.from_quantized_pretrained(tmp_path)


@pytest.mark.parametrize("change,error", [
    (lambda d: d.pop("quantization_config"), "has no quantization_config"),
    (lambda d: d["quantization_config"].update(quant_method="bitsandbytes"),
     "quant_method must be 'gptq' or 'awq'.*'bitsandbytes'"),
    (lambda d: d["quantization_config"].update(bits=5), r"GPTQ checkpoints pack 2, 3, 4, 8 bits.*5"),
    (lambda d: d["quantization_config"].update(quant_method="awq", bits=3),
     r"AWQ checkpoints pack 4 bits.*3"),
    (lambda d: d["quantization_config"].update(checkpoint_format="marlin"),
     "checkpoint_format 'marlin' is not read"),
    (lambda d: d["quantization_config"].update(quant_method="awq", version="gemv"),
     "AWQ version 'gemv' is not the GEMM packing"),
    (lambda d: d["quantization_config"].update(group_size=0), "group_size must be -1 or a positive"),
    (lambda d: d["quantization_config"].update(pack_dtype="int16"), "pack_dtype 'int16'"),
])
def test_refuses_quantization_config(good, change, error):
    rewrite_config(good, change)
    with pytest.raises(ValueError, match=error):
        lutflash.from_quantized_pretrained(good)


def test_refuses_act_order(tmp_path):
    def edit(state):
        key = "model.layers.1.self_attn.q_proj.g_idx"
        state[key] = state[key][torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    write_checkpoint(tmp_path, Case(seed=21, group_size=32), edit=edit)
    rewrite_config(tmp_path, lambda d: d["quantization_config"].update(desc_act=True))
    with pytest.raises(ValueError, match=r"^model\.layers\.1\.self_attn\.q_proj\.g_idx: .*act-order"):
        lutflash.from_quantized_pretrained(tmp_path)


def test_act_order_flag_with_plain_groups_loads(tmp_path):
    # desc_act=True whose g_idx is still i // group_size (e.g. static groups) is convertible
    ckpt = write_checkpoint(tmp_path, Case(seed=22))
    rewrite_config(tmp_path, lambda d: d["quantization_config"].update(desc_act=True))
    check_loaded(lutflash.from_quantized_pretrained(tmp_path, dtype=torch.float32), ckpt,
                 torch.float32)


@pytest.mark.parametrize("edit,error,match", [
    (lambda s: s.pop("model.layers.1.mlp.up_proj.scales"), ValueError,
     r"^model\.layers\.1\.mlp\.up_proj: the checkpoint has no model\.layers\.1\.mlp\.up_proj\.scales"),
    (lambda s: s.pop("model.layers.0.self_attn.k_proj.qweight"), ValueError,
     r"k_proj: the checkpoint has no model\.layers\.0\.self_attn\.k_proj\.qweight"),
    (lambda s: s.pop("model.norm.weight"), ValueError,
     r"no tensor for 1 of the model's parameters: model\.norm\.weight"),
    (lambda s: s.update({"model.layers.0.extra.weight": torch.zeros(3)}), ValueError,
     r"has no place for: model\.layers\.0\.extra\.weight"),
    (lambda s: s.update({"model.layers.0.mlp.gate_proj.qweight":
                         s["model.layers.0.mlp.gate_proj.qweight"].float()}), TypeError,
     r"^model\.layers\.0\.mlp\.gate_proj\.qweight: expected a 2-D int32 tensor"),
    (lambda s: s.update({"model.layers.0.mlp.down_proj.scales":
                         s["model.layers.0.mlp.down_proj.scales"][:2]}), ValueError,
     r"^model\.layers\.0\.mlp\.down_proj\.scales: expected shape \(4, 64\) for a 4-bit GPTQ "
     r"Linear\(in_features=128, out_features=64\) with group_size 32"),
    (lambda s: s.update({"model.embed_tokens.weight": s["model.embed_tokens.weight"][:100]}),
     ValueError, r"^model\.embed_tokens\.weight: the checkpoint's tensor has shape \(100, 64\), "
                 r"the model built from config\.json has \(128, 64\)"),
    (lambda s: s.update({"model.layers.9.mlp.up_proj.qweight": torch.zeros(16, 128,
                                                                          dtype=torch.int32)}),
     ValueError, r"quantizes model\.layers\.9\.mlp\.up_proj, which LlamaForCausalLM .* does not have"),
    (lambda s: s.update({"model.norm.qweight": torch.zeros(8, 64, dtype=torch.int32)}),
     ValueError, r"^model\.norm: quantized in the checkpoint, but the model's model\.norm is a "
                 r"LlamaRMSNorm, not an nn\.Linear"),
])
def test_refuses_tensors(tmp_path, edit, error, match):
    write_checkpoint(tmp_path, Case(seed=23, shards=2), edit=edit)
    with pytest.raises(error, match=match):
        lutflash.from_quantized_pretrained(tmp_path)


@pytest.mark.parametrize("group_size,change,match", [
    # packed at 4 bits for intermediate_size 128; the first layer read is layer 0's down_proj
    (32, lambda d: d.update(intermediate_size=256),
     r"^model\.layers\.0\.mlp\.down_proj\.qweight: expected shape \(32, 64\) for a 4-bit GPTQ "
     r"Linear\(in_features=256, out_features=64\) with group_size 32 \(config\.json\), got \(16, 64\)"),
    (32, lambda d: d["quantization_config"].update(bits=2),
     r"down_proj\.qweight: expected shape \(8, 64\) for a 2-bit GPTQ"),
    (32, lambda d: d["quantization_config"].update(group_size=64),
     r"down_proj\.qzeros: expected shape \(2, 8\) .*group_size 64 \(config\.json\), got \(4, 8\)"),
    (32, lambda d: d["quantization_config"].update(group_size=48),
     r"^model\.layers\.0\.mlp\.down_proj: in_features = 128 is not a multiple of group_size = 48"),
    (16, None,  # a checkpoint really packed with groups of 16 columns, which GPTQ allows
     r"^model\.layers\.0\.mlp\.down_proj\.group_size: lutflash's groups are multiples of 32"),
])
def test_refuses_shapes_that_do_not_match_config(tmp_path, group_size, change, match):
    write_checkpoint(tmp_path, Case(seed=24, group_size=group_size))
    if change is not None:
        rewrite_config(tmp_path, change)
    with pytest.raises(ValueError, match=match):
        lutflash.from_quantized_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_refuses_corrupt_safetensors(good, damage):
    path = good / "model-00002-of-00002.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x08" * 64)
    with pytest.raises(ValueError, match=r"model-00002-of-00002\.safetensors: not a readable "
                                         r"safetensors file"):
        lutflash.from_quantized_pretrained(good)


def test_refuses_missing_files(good):
    (good / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00001-of-00002\.safetensors: listed in "
                                                r"model\.safetensors\.index\.json but not found"):
        lutflash.from_quantized_pretrained(good)
    (good / "model.safetensors.index.json").unlink()
    (good / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors file"):
        lutflash.from_quantized_pretrained(good)


def test_refuses_index_that_disagrees_with_files(good):
    index = json.loads((good / "model.safetensors.index.json").read_text())
    key = sorted(index["weight_map"])[0]
    index["weight_map"][key] = "model-00002-of-00002.safetensors" \
        if index["weight_map"][key].startswith("model-00001") else "model-00001-of-00002.safetensors"
    (good / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"index.json: lists {key} in model-0000"):
        lutflash.from_quantized_pretrained(good)


def test_refuses_bad_arguments(good):
    with pytest.raises(TypeError, match="^dtype: "):
        lutflash.from_quantized_pretrained(good, dtype=torch.int8)
    with pytest.raises(TypeError, match="^meta_dtype: "):
        lutflash.from_quantized_pretrained(good, meta_dtype=torch.float64)
