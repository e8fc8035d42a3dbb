"""Low-rank adapters (LoRA, Hu et al. 2021) beside frozen LutLinear weights, for fine-tuning a
quantized model (as in QLoRA, Dettmers et al. 2023):

    y = lutgemm(x) + b + (alpha / r) · (dropout(x) · Aᵀ) · Bᵀ

with A (r × in_features) and B (out_features × r) trainable, B zero-initialized so that a new
adapter leaves the layer's output unchanged. The packed weight stays in its buffers (never a
parameter, never dequantized in the forward), so data-parallel training (DistributedDataParallel)
reduces only the adapters' and the biases' gradients.

    replaced = lutflash.add_lora(model, rank=8, alpha=16, targets=("q_proj", "v_proj"))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .nn import LutLinear, SkipRule, _skipped

__all__ = ["LoraLutLinear", "add_lora"]


class LoraLutLinear(LutLinear):
    """A LutLinear with a trainable low-rank update: y = lutgemm(x) + b + scaling·(x·Aᵀ)·Bᵀ.

    The state_dict holds the LutLinear entries (planes, meta, layout, bias) under the same names,
    plus ``lora_A`` (rank, in_features) and ``lora_B`` (out_features, rank), so a quantized
    model's state_dict loads into its adapted copy with strict=False and the adapters alone are
    the entries whose names contain "lora_". A and B start in the dtype of ``meta``
    (``.to(dtype)`` converts them with the bias) and may be given their own, e.g. float32
    adapters in a bfloat16 model (QLoRA's mixed precision): the update is computed in the
    adapters' dtype and added in the input's.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 3,
                 group_size: int | None = 128, mode: str = "general", rank: int = 8,
                 alpha: float | None = None, dropout: float = 0.0, device=None,
                 dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, bits=bits, group_size=group_size,
                         mode=mode, device=device, dtype=dtype)
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank: expected a positive int, got {rank!r}")
        alpha = float(rank if alpha is None else alpha)
        if not math.isfinite(alpha):
            raise ValueError(f"alpha: expected a finite number, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        dtype = self.meta.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    @classmethod
    def from_lut_linear(cls, base: LutLinear, rank: int = 8, alpha: float | None = None,
                        dropout: float = 0.0) -> LoraLutLinear:
        """An adapted layer that shares `base`'s packed weight and bias (no copy); its adapters
        are new, on base's device and in its dtype."""
        if not isinstance(base, LutLinear):
            raise TypeError(f"base: expected a lutflash.nn.LutLinear, got {type(base).__name__}")
        if isinstance(base, LoraLutLinear):
            raise TypeError("base: already a LoraLutLinear")
        module = cls(base.in_features, base.out_features, base.bias is not None, bits=base.bits,
                     group_size=base.group_size, mode=base.mode, rank=rank, alpha=alpha,
                     dropout=dropout, device="meta", dtype=base.meta.dtype)
        module.planes, module.meta, module.layout = base.planes, base.meta, base.layout
        if base.bias is not None:
            module.bias = base.bias
        device = base.planes.device
        module.lora_A = nn.Parameter(torch.empty_like(module.lora_A, device=device))
        module.lora_B = nn.Parameter(torch.empty_like(module.lora_B, device=device))
        module.reset_lora_parameters()
        module.train(base.training)
        return module

    def reset_lora_parameters(self) -> None:
        """A as nn.Linear initializes its weight (Kaiming-uniform), B = 0."""
        if self.lora_A.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_adapter = self.lora_dropout(x).to(self.lora_A.dtype)
        update = F.linear(F.linear(x_adapter, self.lora_A), self.lora_B)
        return super().forward(x) + (self.scaling * update).to(x.dtype)

    def extra_repr(self) -> str:
        dropout = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, dropout={dropout:g}"


def add_lora(model: nn.Module, rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
             targets: SkipRule | None = None, *, train_bias: bool = True) -> list[str]:
    """Replaces LutLinear layers of `model` (in place) by LoraLutLinear layers sharing their
    packed weights, freezes every other parameter of the model, and returns the names of the
    replaced layers.

    targets: None for every LutLinear, or substrings of module names (e.g. ("q_proj", "v_proj")),
        or a callable (name, module) -> bool; only LutLinear layers are considered (quantize
        first, e.g. with lutflash.quantize_model or lutflash.patch_model).
    alpha: the scale numerator, scaling = alpha / rank (default alpha = rank, scaling 1).
    train_bias: keep the biases of the adapted layers trainable (the only trainable parameters
        besides the adapters).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(targets, str):
        targets = (targets,)
    chosen = [(name, module) for name, module in model.named_modules()
              if type(module) is LutLinear and (targets is None or _skipped(name, module, targets))]
    if not chosen:
        raise ValueError(f"targets: no LutLinear layer of {type(model).__name__} matches "
                         f"{targets!r}; quantize the model first (lutflash.quantize_model)")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name, base in chosen:
        adapted = LoraLutLinear.from_lut_linear(base, rank, alpha, dropout)
        if adapted.bias is not None:
            adapted.bias.requires_grad_(train_bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, adapted)
    return [name for name, _ in chosen]
