"""lutflash.from_quantized_pretrained: a GPTQ or AWQ checkpoint folder as a transformers model
whose quantized Linear layers are LutLinear.

    model = lutflash.from_quantized_pretrained("Llama-2-7B-GPTQ", device="cuda")

The folder is what Hugging Face hosts for such a model: config.json, whose
``quantization_config`` says quant_method "gptq" or "awq" (AutoGPTQ's separate
quantize_config.json is read when config.json has none), and safetensors files (one, or shards
listed by model.safetensors.index.json). The model is built from config.json with its
parameters on the meta device, so no full-precision weight of a quantized layer is ever
allocated; each layer whose checkpoint has ``qweight``/``qzeros`` becomes a LutLinear holding
the exact conversion (lutflash.from_gptq / from_awq, via convert.CheckpointFormat), and every
other tensor is read from the files, shard by shard, into its parameter.

transformers' own from_pretrained cannot be routed here: for a folder whose config already holds
a GPTQ or AWQ quantization_config, it refuses a different quantization_config class
(``quantization_config=LutflashConfig(...)``) and builds transformers' GPTQ/AWQ quantizer, which
needs optimum and gptqmodel, before any quantizer of ours could see the weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from .bcq import META_DTYPES
from .convert import CheckpointFormat
from .nn import LutLinear

__all__ = ["from_quantized_pretrained"]

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
AUTOGPTQ_CONFIG_FILE = "quantize_config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Checkpoint keys transformers itself drops when loading (old non-persistent buffers saved by
# earlier versions); anything else the model does not have is an error.
IGNORED_KEYS = (r"(^|\.)rotary_emb\.inv_freq$", r"(^|\.)position_ids$")


def from_quantized_pretrained(path: str | os.PathLike, *, device: str | torch.device | None = None,
                              dtype: torch.dtype = torch.float16,
                              attn_implementation: str | None = None,
                              meta_dtype: torch.dtype = torch.float32,
                              quantization_config: dict | None = None,
                              trust_remote_code: bool = False) -> nn.Module:
    """Loads the GPTQ or AWQ checkpoint folder `path` as an AutoModelForCausalLM whose quantized
    nn.Linear layers are lutflash.nn.LutLinear (uniform-mode BCQ, dequantizing to the
    checkpoint's own scale · (code − zero) bit for bit with float32 meta_dtype).

    device: where the model goes (default: the CPU); layers are converted there.
    dtype: the floating dtype of every tensor that is not a quantized layer (embeddings, norms,
        lm_head, layers left in full precision, the LutLinear biases): what the activations
        are (the dtype the model is built with, from_config(dtype=dtype)).
    attn_implementation: as in from_pretrained, e.g. "lutflash" or "sdpa".
    meta_dtype: the dtype of the LutLinear scales and offsets; float32 keeps the conversion
        exact, float16/bfloat16 round the offsets.
    quantization_config: use this dict instead of config.json's (e.g. to fix a wrong field).
    trust_remote_code: passed to AutoConfig / AutoModelForCausalLM.

    Which layers are quantized is read from the tensors (``<layer>.qweight``), so
    ``modules_to_not_convert``, ``modules_in_block_to_quantize`` and a quantized lm_head are all
    honoured; the checkpoint's keys must be the transformers model's names. Tied embeddings are
    tied when the checkpoint holds only one side. Returns the model in eval mode; its
    config.quantization_config becomes a lutflash one, so ``save_pretrained`` writes a lutflash
    checkpoint that from_pretrained loads back (import lutflash first).

    Raises FileNotFoundError (no folder, config.json or safetensors file) or ValueError /
    TypeError naming the file, tensor or layer: no quantization_config, a method, bits or
    packing lutflash does not read, act-order (desc_act) GPTQ layers, missing or left-over
    tensors, shapes that do not match config.json, unreadable (truncated, corrupt) files.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    if meta_dtype not in META_DTYPES:
        raise TypeError(f"meta_dtype: expected one of {META_DTYPES}, got {meta_dtype!r}")
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"path: {str(folder)!r} is not a folder (expected a Hugging Face "
                                f"model folder with {CONFIG_FILE} and *.safetensors files)")
    fmt = CheckpointFormat.from_config(_quantization_config(folder, quantization_config))
    device = torch.device(device) if device is not None else torch.device("cpu")

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, **kwargs)

    with contextlib.ExitStack() as stack:
        shards = _Shards(folder, stack)
        converted = _convert_quantized_layers(model, shards, fmt, device, dtype, meta_dtype)
        _load_other_tensors(model, shards, device, converted)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:  # every parameter was loaded or tied above: a bug if not
            raise RuntimeError(f"{name}: left unloaded on the meta device")
    model.to(device)  # the buffers built with the model (rotary tables, ...)
    if (folder / GENERATION_CONFIG_FILE).is_file():  # eos tokens, sampling defaults: as
        from transformers import GenerationConfig  # from_pretrained reads them

        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.config.quantization_config = _lutflash_config(model, fmt, meta_dtype)
    return model.eval()


def _read_json(file: Path) -> dict:
    try:
        with open(file, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _quantization_config(folder: Path, override: dict | None) -> dict:
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found; a GPTQ or AWQ checkpoint folder has "
                                f"the model's {CONFIG_FILE} with its quantization_config")
    config = _read_json(config_file)
    if override is not None:
        return override
    if config.get("quantization_config") is not None:
        return config["quantization_config"]
    autogptq = folder / AUTOGPTQ_CONFIG_FILE  # AutoGPTQ's own file, before transformers read GPTQ
    if autogptq.is_file():
        return {"quant_method": "gptq", **_read_json(autogptq)}
    raise ValueError(f"{config_file}: has no quantization_config (nor is there a "
                     f"{AUTOGPTQ_CONFIG_FILE}), so this is not a GPTQ or AWQ checkpoint; a "
                     f"full-precision model loads with from_pretrained and is quantized with "
                     f"lutflash.quantize_model or quantization_config=LutflashConfig(...)")


class _Shards:
    """The checkpoint's safetensors files, open for reading: which file holds each key."""

    def __init__(self, folder: Path, stack: contextlib.ExitStack):
        from safetensors import SafetensorError, safe_open  # transformers' dependency, not ours

        self.errors = (SafetensorError, OSError)
        index_file = folder / INDEX_FILE
        index = None
        if index_file.is_file():
            weight_map = _read_json(index_file).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index_file}: expected a non-empty \"weight_map\" of tensor "
                                 f"names to files")
            index = weight_map
            files = [folder / name for name in sorted(set(weight_map.values()))]
            for file in files:
                if not file.is_file():
                    raise FileNotFoundError(f"{file}: listed in {INDEX_FILE} but not found")
        elif (folder / SINGLE_FILE).is_file():
            files = [folder / SINGLE_FILE]
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{folder}: no *.safetensors file (lutflash reads "
                                        f"safetensors checkpoints, not pytorch_model.bin)")
        self.handles, self.file_of = {}, {}
        for file in files:
            try:
                handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
                keys = list(handle.keys())
            except self.errors as error:
                raise ValueError(f"{file}: not a readable safetensors file ({error}); it may be "
                                 f"truncated or corrupt: download it again") from error
            self.handles[file] = handle
            for key in keys:
                if key in self.file_of:
                    raise ValueError(f"{file}: holds {key}, which {self.file_of[key]} holds too")
                self.file_of[key] = file
        for key, name in (index or {}).items():
            if key not in self.file_of or self.file_of[key].name != name:
                raise ValueError(f"{index_file}: lists {key} in {name}, which does not hold it")

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def keys(self):
        return self.file_of.keys()

    def get(self, key: str) -> torch.Tensor:
        file = self.file_of[key]
        try:
            return self.handles[file].get_tensor(key)
        except self.errors as error:
            raise ValueError(f"{file}: could not read {key} ({error})") from error


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered inside the block goes to the meta device as it is registered
    (its initialization then costs nothing); buffers, such as rotary tables computed at
    construction, stay real. One nn.Linear's weight is allocated, uninitialized, at a time."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        param = module._parameters.get(name)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"),
                                                    requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _convert_quantized_layers(model, shards: _Shards, fmt: CheckpointFormat, device, dtype,
                              meta_dtype) -> dict[str, LutLinear]:
    """Replaces each Linear the checkpoint quantizes by its LutLinear; returns them by name."""
    names = sorted({key.rsplit(".", 1)[0] for key in shards.keys()
                    if key.endswith((".qweight", ".qzeros"))})
    if not names:
        raise ValueError(f"the checkpoint's quantization_config says quant_method "
                         f"{fmt.method!r}, but no tensor in its files is a quantized layer's "
                         f"(<layer>.qweight, <layer>.qzeros)")
    converted = {}
    for name in names:
        module = _submodule(model, name)
        if module is None:
            raise ValueError(f"{name}.qweight: the checkpoint quantizes {name}, which "
                             f"{type(model).__name__} (built from config.json) does not have")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name}: quantized in the checkpoint, but the model's {name} is a "
                             f"{type(module).__name__}, not an nn.Linear")
        tensors = {key: shards.get(f"{name}.{key}").to(device) for key in fmt.tensor_names()
                   if f"{name}.{key}" in shards}
        qweight = fmt.convert(name, tensors, module.out_features, module.in_features, meta_dtype)
        del tensors
        bias = None
        if f"{name}.bias" in shards:
            bias = shards.get(f"{name}.bias")
            if module.bias is None and not bias.any():
                bias = None  # AutoGPTQ saves a zero bias for layers that have none
            elif not bias.is_floating_point():
                raise TypeError(f"{name}.bias: expected a floating-point tensor, got {bias.dtype}")
            else:
                bias = bias.to(device=device, dtype=dtype if module.bias is None
                               else module.bias.dtype)
        elif module.bias is not None:
            raise ValueError(f"{name}.bias: missing from the checkpoint; the model's {name} has "
                             f"a bias")
        try:
            layer = LutLinear.from_bcq(qweight, bias)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{name}.{error}") from error
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        converted[name] = layer
    return converted


def _tied_pairs(model: nn.Module) -> dict[str, str]:
    """{target: source} of the parameters the model ties (lm_head.weight: embed_tokens.weight)."""
    if hasattr(model, "get_expanded_tied_weights_keys"):  # transformers 5
        return dict(model.get_expanded_tied_weights_keys(all_submodels=True))
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return {}
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(module): name for name, module in model.named_modules()}
    if inputs is None or outputs is None or id(outputs) not in names:
        return {}
    return {f"{names[id(outputs)]}.weight": f"{names[id(inputs)]}.weight"}


def _load_other_tensors(model, shards: _Shards, device, converted: dict[str, LutLinear]) -> None:
    """Reads every parameter and persistent buffer outside the LutLinear layers from the
    checkpoint (cast to the dtype the model was built with), ties what the model ties and the
    checkpoint holds once, and refuses missing or left-over tensors."""
    used = {f"{name}.{key}" for name in converted for key in ("qweight", "qzeros", "scales",
                                                               "g_idx", "bias")}
    parameters = dict(model.named_parameters(remove_duplicate=False))
    expected = {key: tensor for key, tensor in model.state_dict(keep_vars=True).items()
                if key.rpartition(".")[0] not in converted}
    absent = []
    for key, current in expected.items():
        if key not in shards:
            absent.append(key)
            continue
        value = shards.get(key)
        if tuple(value.shape) != tuple(current.shape):
            raise ValueError(f"{key}: the checkpoint's tensor has shape {tuple(value.shape)}, the "
                             f"model built from config.json has {tuple(current.shape)}")
        if current.is_floating_point() != value.is_floating_point():
            raise TypeError(f"{key}: the checkpoint holds a {value.dtype} tensor, the model a "
                            f"{current.dtype} one")
        _assign(model, key, value.to(device=device, dtype=current.dtype), key in parameters)
        used.add(key)

    missing = []
    tied = {target: source for target, source in _tied_pairs(model).items()
            if target in expected and source in expected}
    for key in absent:
        partners = [source for target, source in tied.items() if target == key] + \
                   [target for target, source in tied.items() if source == key]
        loaded = [other for other in partners if other in shards]
        if loaded and key in parameters:
            parent, _, attr = key.rpartition(".")
            setattr(_submodule(model, parent) if parent else model, attr,
                    model.get_parameter(loaded[0]))
        elif key in parameters:
            missing.append(key)
        # else a persistent buffer the checkpoint does not hold: it keeps the value it was
        # built with, as from_pretrained's initialization would give it
    for target, source in tied.items():  # both sides saved: share them when they are equal
        if target in shards and source in shards and target in parameters:
            kept = model.get_parameter(source)
            if torch.equal(model.get_parameter(target), kept):
                parent, _, attr = target.rpartition(".")
                setattr(_submodule(model, parent) if parent else model, attr, kept)
    if missing:
        raise ValueError(f"the checkpoint has no tensor for {len(missing)} of the model's "
                         f"parameters: {', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''}")
    ignored = [re.compile(p) for p in (*IGNORED_KEYS,
                                       *(getattr(model, "_keys_to_ignore_on_load_unexpected",
                                                 None) or ()))]
    unexpected = sorted(key for key in shards.keys() if key not in used
                        and not any(p.search(key) for p in ignored))
    if unexpected:
        raise ValueError(f"the checkpoint holds {len(unexpected)} tensor(s) that "
                         f"{type(model).__name__} (built from config.json) has no place for: "
                         f"{', '.join(unexpected[:8])}{', ...' if len(unexpected) > 8 else ''}")


def _assign(model: nn.Module, key: str, value: torch.Tensor, is_parameter: bool) -> None:
    parent, _, attr = key.rpartition(".")
    module = model.get_submodule(parent) if parent else model
    if is_parameter:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = value


def _lutflash_config(model: nn.Module, fmt: CheckpointFormat, meta_dtype: torch.dtype):
    """The quantization_config of the converted model: lutflash's, uniform mode, naming the
    Linear layers the checkpoint left in full precision, so that save_pretrained writes a folder
    that from_pretrained reads back into the same layers."""
    from .integrations.hf_quantizer import LutflashConfig

    kept = sorted(name for name, module in model.named_modules() if isinstance(module, nn.Linear))
    return LutflashConfig(bits=fmt.bits, group_size=None if fmt.group_size == -1 else
                          fmt.group_size, method="rtn", mode="uniform",
                          meta_dtype=str(meta_dtype).removeprefix("torch."),
                          modules_to_not_convert=kept)
