"""quantization_config=LutflashConfig(...) for transformers' from_pretrained and save_pretrained.

    from transformers import AutoModelForCausalLM
    import lutflash
    from lutflash.integrations.hf_quantizer import LutflashConfig

    model = AutoModelForCausalLM.from_pretrained(name, quantization_config=LutflashConfig(
        bits=3, group_size=128, method="alternating", modules_to_not_convert=["lm_head"]))
    model.save_pretrained(folder)                       # packed buffers + quantization_config
    model = AutoModelForCausalLM.from_pretrained(folder)  # LutLinear layers, no re-quantization

Before the weights load, every nn.Linear not named in modules_to_not_convert becomes an empty
LutLinear; each full-precision weight is then quantized as it arrives, on the device it is
loaded to (lutflash.quantize), so the whole full-precision model is never held there. A saved
model's state_dict holds each layer's ``planes``, ``meta`` and ``layout`` buffers
(docs/FORMAT.md); loading it back fills the same buffers and checks every layer's layout.

Registered with transformers when lutflash registers its other integrations (importing
transformers.modeling_utils after lutflash, or lutflash after it): import lutflash before
from_pretrained of a saved lutflash model, or transformers skips the unknown method.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..bcq import ALL_METHODS, MODES, quantize
from ..nn import LutLinear, quantize_model

NAME = "lutflash"
_META_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class LutflashConfig(QuantizationConfigMixin):
    """bits 1..8; group_size a multiple of 32 (or None: one group per row); method "rtn",
    "greedy" or "alternating" (lutflash.quantize); mode "general" or "uniform" (default: what
    the method gives); meta_dtype "float32", "float16" or "bfloat16" (default: the model's
    dtype when 16-bit, else float32); modules_to_not_convert: names (or name suffixes) of
    Linear layers kept in full precision, e.g. ["lm_head"].

    method "gptq" is calibrated: pass `calibration`, a list of batches (token-id tensors or
    dicts of model inputs, as lutflash.quantize_model takes them). The full-precision weights
    then load first and the whole model is quantized after loading, layer by layer
    (lutflash.quantize_model(..., method="gptq")), on the device it was loaded to; `damp` goes
    to lutflash.quantize. awq=True (any method, with `calibration`) adds lutflash.quantize_model's
    AWQ-style scale search, also after loading. The calibration batches are not saved with the config (a saved gptq
    model loads its packed weights like any other)."""

    def __init__(self, bits: int = 3, group_size: int | None = 128, method: str = "alternating",
                 mode: str | None = None, meta_dtype: str | None = None, rounds: int = 15,
                 modules_to_not_convert: list[str] | None = None, calibration=None,
                 damp: float = 0.01, awq: bool = False, **kwargs):
        self.quant_method = NAME
        self.bits, self.group_size, self.method, self.mode = bits, group_size, method, mode
        self.meta_dtype, self.rounds = meta_dtype, rounds
        self.modules_to_not_convert = modules_to_not_convert
        self.calibration, self.damp, self.awq = calibration, damp, awq
        self.post_init()

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()  # without the calibration batches: not part of the saved config
        data.pop("calibration", None)
        return data

    def __iter__(self):
        yield from self.to_dict().items()

    def post_init(self):
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits: expected an int in 1..8, got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int)
                                            or self.group_size < 1):
            raise ValueError(f"group_size: expected a positive int or None, got {self.group_size!r}")
        if self.method not in ALL_METHODS:
            raise ValueError(f"method: expected one of {ALL_METHODS}, got {self.method!r}")
        if not isinstance(self.awq, bool):
            raise ValueError(f"awq: expected a bool, got {self.awq!r}")
        if self.calibration is not None:
            if self.method != "gptq" and not self.awq:
                raise ValueError(f"calibration: only method='gptq' or awq=True use calibration "
                                 f"batches, got method={self.method!r}")
            from ..gptq import check_calibration

            self.calibration = check_calibration(self.calibration)
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or \
                not 0 <= self.damp < 1e6:
            raise ValueError(f"damp: expected a non-negative float, got {self.damp!r}")
        if self.mode is None:
            self.mode = "uniform" if self.method == "rtn" else "general"
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if self.meta_dtype is not None and self.meta_dtype not in _META_DTYPES:
            raise ValueError(f"meta_dtype: expected one of {tuple(_META_DTYPES)} or None, got "
                             f"{self.meta_dtype!r}")


class LutflashQuantize(ConversionOps):
    """Quantizes one full-precision Linear weight into its (empty) LutLinear as it loads."""

    def __init__(self, hf_quantizer: LutflashHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model=None, full_layer_name: str | None = None,
                missing_keys=None, **kwargs) -> dict[str, torch.Tensor]:
        _, value = next(iter(input_dict.items()))
        weight = value[0] if isinstance(value, list) else value
        module, _ = get_module_from_name(model, full_layer_name)
        config = self.hf_quantizer.quantization_config
        qweight = quantize(weight, config.bits, module.group_size, config.method,
                           rounds=config.rounds, mode=config.mode, meta_dtype=module.meta.dtype)
        prefix = full_layer_name.rsplit(".", 1)[0]
        state = qweight.state_tensors()
        module.planes, module.meta = state["planes"], state["meta"]
        module.layout = state["layout"].to(qweight.device)
        del module.weight  # the placeholder of _process_model_before_weight_loading
        if missing_keys is not None:
            for name in ("weight", "planes", "meta", "layout"):
                missing_keys.discard(f"{prefix}.{name}")
        module._is_hf_initialized = True
        return {}


class LutflashHfQuantizer(HfQuantizer):
    """transformers' hooks for quant_method "lutflash" (see the module's docstring)."""

    requires_calibration = False
    quantization_config: LutflashConfig

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    def update_dtype(self, dtype):
        self.dtype = dtype
        return dtype

    def _calibrated(self) -> bool:
        """Quantized after loading (gptq or awq on full-precision weights) rather than as they
        load."""
        config = self.quantization_config
        return (config.method == "gptq" or getattr(config, "awq", False)) and not self.pre_quantized

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized or self._calibrated():
            return False
        module, name = get_module_from_name(model, param_name)
        return isinstance(module, LutLinear) and name == "weight"

    def get_quantize_ops(self):
        return LutflashQuantize(self)

    def _process_model_before_weight_loading(self, model, keep_in_fp32_modules=None, **kwargs):
        config = self.quantization_config
        if config.meta_dtype is None:  # fixed now, so that the saved config says what was used
            dtype = getattr(self, "dtype", None)
            config.meta_dtype = ("float16" if dtype == torch.float16 else
                                 "bfloat16" if dtype == torch.bfloat16 else "float32")
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, config.modules_to_not_convert or [], keep_in_fp32_modules)
        if self._calibrated():
            if config.calibration is None:
                raise ValueError("calibration: method='gptq' and awq=True quantize on calibration "
                                 "batches; pass LutflashConfig(..., calibration=[token-id "
                                 "tensors or dicts of model inputs])")
            return  # the Linear layers load in full precision; quantized after loading
        for name, module in list(model.named_modules()):
            if not isinstance(module, torch.nn.Linear) or \
                    not should_convert_module(name, self.modules_to_not_convert):
                continue
            layer = LutLinear(module.in_features, module.out_features, module.bias is not None,
                              bits=config.bits, group_size=config.group_size, mode=config.mode,
                              device=module.weight.device, dtype=_META_DTYPES[config.meta_dtype])
            if not self.pre_quantized:  # the checkpoint's weight key must exist to be loaded:
                # a placeholder that the quantize op replaces with the packed buffers
                layer.register_parameter("weight", torch.nn.Parameter(
                    torch.empty_like(module.weight, device="meta"), requires_grad=False))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self._calibrated():
            config = self.quantization_config
            keep = self.modules_to_not_convert
            quantize_model(model, config.bits, config.group_size, config.method, mode=config.mode,
                           rounds=config.rounds, meta_dtype=_META_DTYPES[config.meta_dtype],
                           skip=lambda name, module: not should_convert_module(name, keep),
                           progress=False, calibration=config.calibration, damp=config.damp,
                           awq=config.awq)
            config.calibration = None  # no longer needed; not part of the saved config
        for name, module in model.named_modules():
            if isinstance(module, LutLinear):
                if "weight" in module._parameters:
                    raise ValueError(f"{name}.weight: the checkpoint holds no weight for this "
                                     f"layer, so it could not be quantized")
                module._check_layout(module.layout, f"{name}.")
                _ = module.qweight  # building the BCQWeight checks the buffers' shapes and dtypes
                for buffer in ("planes", "meta"):  # the kernels read them 16-byte aligned; a
                    # tensor mapped from a safetensors file is only 8-byte aligned
                    if getattr(module, buffer).data_ptr() % 16:
                        setattr(module, buffer, getattr(module, buffer).clone())
        return model


def register() -> None:
    """Registers quant_method "lutflash" with transformers. Idempotent."""
    if NAME not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(NAME)(LutflashConfig)
    if NAME not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(NAME)(LutflashHfQuantizer)
