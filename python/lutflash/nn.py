"""nn.Module front end: LutLinear, a drop-in for nn.Linear over a BCQ weight, and
quantize_model, which swaps a model's nn.Linear layers for it; RMSNorm over lutflash.rms_norm
and replace_rms_norms, which swaps Hugging Face's Llama-convention norms for it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from .bcq import (
    ALL_METHODS,
    FORMAT_VERSION,
    META_DTYPES,
    MODES,
    BCQWeight,
    check_layout,
    check_layout_tensor,
    meta_per_group,
    padded_rows,
    quantize,
    words_per_row,
)
from .decode_ops import rms_norm, rms_norm_composition, silu_mul
from .lutgemm import check_lutgemm_args, lutgemm_call


class LutLinear(nn.Module):
    """y = x · Ŵᵀ + b with Ŵ a frozen BCQ weight, computed by lutgemm.

    The packed weight lives in the buffers ``planes`` (int32) and ``meta`` (float), with its
    layout in the int64 buffer ``layout`` = [format version, out_features, in_features, bits,
    group_size, mode]; all three are saved in the state_dict, and loading checks the layout.
    ``.to(dtype)`` converts ``meta`` and ``bias``; the bias stays trainable.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 3,
                 group_size: int | None = 128, mode: str = "general", device=None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        group_size = in_features if group_size in (None, -1) else group_size
        check_layout(out_features, in_features, bits, group_size, mode)
        dtype = dtype or torch.float32
        if dtype not in META_DTYPES:
            raise TypeError(f"dtype: expected one of {META_DTYPES}, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.mode = bits, group_size, mode
        self._mode_index = MODES.index(mode)
        rows = padded_rows(out_features)
        self.register_buffer("planes", torch.zeros(
            (words_per_row(in_features), bits, rows), dtype=torch.int32, device=device))
        self.register_buffer("meta", torch.zeros(
            (in_features // group_size, meta_per_group(bits, mode), rows), dtype=dtype,
            device=device))
        self.register_buffer("layout", torch.tensor(self._expected_layout(), dtype=torch.int64,
                                                    device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 3, group_size: int | None = 128,
                    method: str = "alternating", *, rounds: int = 15, mode: str | None = None,
                    meta_dtype: torch.dtype | None = None) -> LutLinear:
        """Quantizes an nn.Linear's weight (see lutflash.quantize) into a new LutLinear on the
        same device, with the same bias and dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        qweight = quantize(linear.weight, bits, group_size, method, rounds=rounds, mode=mode,
                           meta_dtype=meta_dtype)
        return cls.from_bcq(qweight, linear.bias)

    @classmethod
    def from_bcq(cls, qweight: BCQWeight, bias: torch.Tensor | None = None) -> LutLinear:
        if not isinstance(qweight, BCQWeight):
            raise TypeError(f"qweight: expected a lutflash.BCQWeight, got {type(qweight).__name__}")
        n, k = qweight.shape
        if bias is not None:
            if not isinstance(bias, torch.Tensor):
                raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
            if tuple(bias.shape) != (n,):
                raise ValueError(f"bias: expected shape ({n},) (out_features), got "
                                 f"{tuple(bias.shape)}")
            if not bias.is_floating_point():
                raise TypeError(f"bias: expected a floating-point tensor, got {bias.dtype}")
        module = cls(k, n, bias is not None, bits=qweight.bits, group_size=qweight.group_size,
                     mode=qweight.mode, device=qweight.device, dtype=qweight.meta.dtype)
        with torch.no_grad():
            module.planes.copy_(qweight.planes)
            module.meta.copy_(qweight.meta)
            if bias is not None:  # trainable like nn.Linear's, unless it was a frozen Parameter
                trainable = bias.requires_grad or not isinstance(bias, nn.Parameter)
                module.bias = nn.Parameter(bias.detach().clone(), requires_grad=trainable)
        return module

    @property
    def qweight(self) -> BCQWeight:
        return BCQWeight(self.planes, self.meta, (self.out_features, self.in_features), self.bits,
                         self.group_size, self.mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # buffers and the bias straight from their dicts: nn.Module.__getattr__ costs ~0.3 us a
        # lookup, and a decoding step makes hundreds of these calls
        buffers = self._buffers
        planes, meta, bias = buffers["planes"], buffers["meta"], self._parameters.get("bias")
        check_lutgemm_args(x, self.out_features, self.in_features, planes.device, bias)
        return lutgemm_call(x, planes, meta, bias, self.out_features, self.in_features,
                            self.bits, self.group_size, self._mode_index)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, group_size={self.group_size}, "
                f"mode={self.mode}, meta_dtype={self.meta.dtype}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        layout = state_dict.get(prefix + "layout")
        if layout is not None:
            self._check_layout(layout, prefix)
        for name in ("planes", "meta"):
            value = state_dict.get(prefix + name)
            mine = getattr(self, name)
            if value is not None and tuple(value.shape) != tuple(mine.shape):
                raise ValueError(f"{prefix}{name}: expected shape {tuple(mine.shape)} for "
                                 f"{self.extra_repr()}, got {tuple(value.shape)}")
            if name == "planes" and value is not None and value.dtype != torch.int32:
                raise TypeError(f"{prefix}planes: expected dtype torch.int32, got {value.dtype}")
            if name == "meta" and value is not None and value.dtype not in META_DTYPES:
                raise TypeError(f"{prefix}meta: expected dtype float32, float16 or bfloat16, got "
                                f"{value.dtype}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _expected_layout(self) -> list[int]:
        """The layout entries of this module's shape and format (what its buffer must hold)."""
        return [FORMAT_VERSION, self.out_features, self.in_features, self.bits, self.group_size,
                MODES.index(self.mode)]

    def _check_layout(self, layout: torch.Tensor, prefix: str) -> None:
        check_layout_tensor(layout, f"{prefix}layout")
        values = [int(v) for v in layout.flatten().tolist()]
        if len(values) != 6:
            raise ValueError(f"{prefix}layout: expected 6 entries, got {len(values)}")
        names = ("format version", "out_features", "in_features", "bits", "group_size", "mode")
        for name, got, want in zip(names, values, self._expected_layout(), strict=True):
            if got != want:
                if name == "format version":
                    raise ValueError(f"{prefix}layout: this lutflash reads BCQ format version "
                                     f"{want}, the state_dict holds version {got}")
                raise ValueError(f"{prefix}layout: the state_dict's {name} is {got}, this module's "
                                 f"is {want}")


SkipRule = Iterable[str] | Callable[[str, nn.Module], bool]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Puts `module` where the dotted `name` of model.named_modules() is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _skipped(name: str, module: nn.Module, skip: SkipRule) -> bool:
    if callable(skip):
        return bool(skip(name, module))
    return any(pattern in name for pattern in skip)


def quantize_model(model: nn.Module, bits: int = 3, group_size: int | None = 128,
                   method: str = "alternating", *, skip: SkipRule = (), rounds: int = 15,
                   mode: str | None = None, meta_dtype: torch.dtype | None = None,
                   progress: bool = True, calibration: Sequence | None = None,
                   damp: float = 0.01, block_size: int = 128, awq: bool = False) -> list[str]:
    """Replaces every nn.Linear of `model` (in place) by a LutLinear quantized with
    lutflash.quantize, and returns the names of the replaced modules.

    skip: substrings of module names to leave alone (e.g. ("lm_head",)), or a callable
    (name, module) -> bool. A progress bar (tqdm) shows the layers as they are quantized.

    method="gptq" is calibrated and needs `calibration`: a list of batches, each a tensor of
    token ids ((seq,) or (batch, seq)) or a dict of the model's keyword arguments
    ({"input_ids": ..., "attention_mask": ...}). The model must be a decoder whose layers sit
    in a ModuleList (Hugging Face causal LMs: model.layers, transformer.h, decoder.layers,
    gpt_neox.layers); the layers are calibrated in order, each on the outputs of the
    already-quantized layers before it (lutflash.gptq.quantize_model_calibrated). damp and
    block_size go to lutflash.quantize.

    awq=True (with `calibration`, for any method) first searches, layer by layer, AWQ-style
    input-channel scales for each group of projections fed by a norm or a Linear (Llama-style
    input_layernorm → q/k/v, v_proj → o_proj when their shapes match, post_attention_layernorm
    → gate/up, up_proj → down_proj; OPT's norms and v_proj → out_proj) and folds them into that
    preceding module, leaving the full-precision function unchanged (lutflash.gptq.awq_layer);
    the search quantizes with `method` (gptq: rtn in uniform mode, alternating in general).
    A norm whose output is not weight × normalized (Gemma's 1 + weight) is left alone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if method not in ALL_METHODS:
        raise ValueError(f"method: expected one of {ALL_METHODS}, got {method!r}")
    if method == "gptq" and calibration is None:
        raise ValueError("calibration: method='gptq' needs calibration batches (a list of "
                         "token-id tensors or dicts of model inputs)")
    if not isinstance(awq, bool):
        raise TypeError(f"awq: expected a bool, got {type(awq).__name__}")
    if awq and calibration is None:
        raise ValueError("calibration: awq=True searches scales on calibration batches; pass "
                         "calibration=[token-id tensors or dicts of model inputs]")
    if method != "gptq" and calibration is not None and not awq:
        raise ValueError(f"calibration: only method='gptq' or awq=True use calibration batches, "
                         f"got method={method!r}")
    if isinstance(skip, str):
        skip = (skip,)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not _skipped(name, module, skip)]

    def quantized(name, linear, hessian=None):
        try:
            if hessian is None:
                return LutLinear.from_linear(linear, bits, group_size, method, rounds=rounds,
                                             mode=mode, meta_dtype=meta_dtype)
            qweight = quantize(linear.weight, bits, group_size, method, rounds=rounds, mode=mode,
                               meta_dtype=meta_dtype, hessian=hessian, damp=damp,
                               block_size=block_size)
            return LutLinear.from_bcq(qweight, linear.bias)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{name}: {error}") from error

    if calibration is not None:
        from .gptq import check_calibration, quantize_model_calibrated

        calibration = check_calibration(calibration)
        for name, linear in targets:  # the layout and arguments, before any forward pass
            group = linear.in_features if group_size in (None, -1) else group_size
            try:
                check_layout(linear.out_features, linear.in_features, bits, group,
                             mode or ("uniform" if method == "rtn" else "general"))
            except (ValueError, TypeError) as error:
                raise type(error)(f"{name}: {error}") from error
        # the scale search quantizes with the data-free method nearest to the final one
        search = method if method != "gptq" else ("rtn" if mode == "uniform" else "alternating")
        make = quantized if method == "gptq" else (lambda name, linear, hessian: quantized(name, linear))
        return quantize_model_calibrated(model, targets, calibration, make, progress,
                                         awq=(bits, group_size, search) if awq else None)

    from tqdm.auto import tqdm

    replaced = []
    for name, linear in tqdm(targets, desc="lutflash: quantizing", unit="layer",
                             disable=not progress):
        _set_submodule(model, name, quantized(name, linear))
        replaced.append(name)
    return replaced


# Sibling projections that Hugging Face decoders apply to one input: attention's q/k/v (Llama,
# Mistral, Qwen2, Gemma2, OPT, ...) and the gated MLP's gate/up.
FUSE_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _fusion_key(layer: LutLinear) -> tuple:
    """What layers must share to be fused."""
    return (layer.in_features, layer.bits, layer.group_size, layer.mode, layer.meta.dtype,
            layer.planes.device)


def _concat_rows(layers: list[LutLinear], bias_dtype: torch.dtype | None):
    """One BCQWeight (and bias or None) whose output rows are the layers' rows in order."""
    first = layers[0]
    n = sum(layer.out_features for layer in layers)
    rows = padded_rows(n)

    def cat(name):
        parts = [getattr(layer, name)[..., :layer.out_features] for layer in layers]
        merged = torch.cat(parts, dim=-1)
        return torch.nn.functional.pad(merged, (0, rows - n))  # padded rows are zero bits/meta

    qweight = BCQWeight(cat("planes"), cat("meta"), (n, first.in_features), first.bits,
                        first.group_size, first.mode)
    bias = None
    if bias_dtype is not None:  # layers without a bias add zeros
        bias = torch.cat([layer.bias.detach() if layer.bias is not None else
                          torch.zeros(layer.out_features, dtype=bias_dtype, device=first.planes.device)
                          for layer in layers])
    return qweight, bias


class FusedLutLinear(nn.Module):
    """Several LutLinear layers that read the same input, run as one lutgemm call.

    ``fused`` is a LutLinear whose output rows are the layers' rows one after the other. Each
    former layer is replaced by a :class:`LutLinearPart`; the first part called with an input
    computes every part's output at once and hands the others theirs when they are called with
    that same tensor (same object, unmodified: its version counter, which inference tensors
    lack, see _version). A part called with another input computes the fused product for it, so
    results never depend on the call order.
    """

    def __init__(self, layers: list[LutLinear]):
        super().__init__()
        if len({_fusion_key(layer) for layer in layers}) != 1:
            raise ValueError("layers: expected LutLinear layers of one input size, bits, "
                             "group size, mode, metadata dtype and device")
        biases = [layer.bias for layer in layers if layer.bias is not None]
        qweight, bias = _concat_rows(layers, biases[0].dtype if biases else None)
        self.fused = LutLinear.from_bcq(qweight, bias)
        if bias is not None:
            self.fused.bias.requires_grad_(any(b.requires_grad for b in biases))
        self.splits = [layer.out_features for layer in layers]
        self._pending: list | None = None  # [input, its version, outputs not yet handed out]

    def part_output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced: no Python state (nor is_inference())
            return self.fused(x).split(self.splits, dim=-1)[index]
        pending = self._pending
        version = _version(x)
        if (pending is None or pending[0] is not x or pending[1] != version
                or pending[2][index] is None):
            outputs = list(self.fused(x).split(self.splits, dim=-1))
            pending = self._pending = [x, version, outputs]
        out, pending[2][index] = pending[2][index], None
        if all(o is None for o in pending[2]):
            self._pending = None  # every part has its output: drop the reference to x
        return out


def _version(x: torch.Tensor) -> int | None:
    """x's version counter (bumped by each in-place change), or None for an inference tensor,
    which has none: such a tensor changed in place between two parts' calls is not noticed
    (models do not do that; inference mode leaves no way to tell)."""
    return None if x.is_inference() else x._version


class LutLinearPart(nn.Module):
    """The rows of one former LutLinear inside a FusedLutLinear (see there); holds no weights."""

    def __init__(self, group: FusedLutLinear, index: int):
        super().__init__()
        object.__setattr__(self, "_group", group)  # not a submodule: its parent registers it
        self.index = index
        self.in_features, self.out_features = group.fused.in_features, group.splits[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group.part_output(x, self.index)

    def extra_repr(self) -> str:
        return f"rows {sum(self._group.splits[:self.index])}..+{self.out_features} of the fused layer"


def fuse_lut_linears(model: nn.Module, groups=FUSE_GROUPS) -> list[str]:
    """Fuses sibling LutLinear layers that read one input (`groups` of child names, by
    default q/k/v and gate/up) into one FusedLutLinear per group, registered on the parent as
    the names joined by "_" (e.g. ``q_proj_k_proj_v_proj``); the children become
    LutLinearPart. Returns the names of the fused modules. A group is fused only where all its
    children are LutLinear layers of one input size, format, dtype and device. The state_dict
    then holds the fused buffers (the unfused keys are gone), and adapters (lutflash.add_lora)
    see the fused layer only: fuse after loading, and leave fusion off for per-projection LoRA.
    """
    fused_names = []
    for parent_name, parent in list(model.named_modules()):
        for group in groups:
            layers = [getattr(parent, child, None) for child in group]
            if not all(isinstance(layer, LutLinear) for layer in layers):
                continue
            if len({_fusion_key(layer) for layer in layers}) != 1:
                continue
            fused = FusedLutLinear(layers)
            name = "_".join(group)
            parent.add_module(name, fused)
            for index, child in enumerate(group):
                setattr(parent, child, LutLinearPart(fused, index))
            fused_names.append(f"{parent_name}.{name}" if parent_name else name)
    return fused_names


# Hugging Face RMSNorm classes whose forward is Llama's: float32 arithmetic, the normalized row
# cast back to the input's dtype, then multiplied by the weight (tests/test_transformers.py
# checks each against its own module, bit for bit on the CPU).
RMS_NORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


class RMSNorm(nn.Module):
    """Llama-convention RMSNorm over lutflash.rms_norm (one CUDA kernel when decoding),
    holding the replaced module's ``weight`` Parameter and ``variance_epsilon``, so that the
    state_dict keys stay the same. An input whose dtype differs from the weight's gets the
    original module's arithmetic (its product promotes to the wider dtype)."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:
            return rms_norm_composition(x, self.weight, self.variance_epsilon)
        return rms_norm(x, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def replace_rms_norms(model: nn.Module) -> list[str]:
    """Replaces every module of a class in RMS_NORM_CLASSES by an RMSNorm sharing its weight;
    returns their names."""
    names = []
    for name, module in list(model.named_modules()):
        if type(module).__name__ not in RMS_NORM_CLASSES or name == "":
            continue
        weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 1 or eps is None:
            continue
        _set_submodule(model, name, RMSNorm(weight, eps))
        names.append(name)
    return names


# Hugging Face gated MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x))
# (tests/test_transformers.py checks each against its own module).
GATED_MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Gemma2MLP"})


class GatedMLP(nn.Module):
    """down_proj(silu(gate) · up) with gate/up one FusedLutLinear: one lutgemm, one
    lutflash.silu_mul, one down projection (where the replaced module ran silu and mul apart).
    Holds the replaced module's children under their names, so the state_dict is unchanged."""

    def __init__(self, mlp: nn.Module, gate_up: FusedLutLinear):
        super().__init__()
        self.gate_proj, self.up_proj = mlp.gate_proj, mlp.up_proj
        self.gate_proj_up_proj = gate_up
        self.down_proj = mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_proj_up_proj.fused(x)))


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation" or \
        act is torch.nn.functional.silu


def replace_gated_mlps(model: nn.Module) -> list[str]:
    """Replaces each module of a class in GATED_MLP_CLASSES whose activation is SiLU and whose
    gate/up projections were fused by fuse_lut_linears (in that order) by a GatedMLP; returns
    their names."""
    names = []
    for name, module in list(model.named_modules()):
        if type(module).__name__ not in GATED_MLP_CLASSES or name == "":
            continue
        gate_up = getattr(module, "gate_proj_up_proj", None)
        gate, up = getattr(module, "gate_proj", None), getattr(module, "up_proj", None)
        if not (isinstance(gate_up, FusedLutLinear) and _is_silu(getattr(module, "act_fn", None))
                and isinstance(gate, LutLinearPart) and isinstance(up, LutLinearPart)
                and gate._group is gate_up and up._group is gate_up
                and (gate.index, up.index) == (0, 1) and len(gate_up.splits) == 2
                and gate_up.splits[0] == gate_up.splits[1]):
            continue
        _set_submodule(model, name, GatedMLP(module, gate_up))
        names.append(name)
    return names
