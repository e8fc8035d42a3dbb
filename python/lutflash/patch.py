"""patch_model: convert a loaded model to lutflash in one call."""

from __future__ import annotations

import sys
import warnings
from typing import Any

from torch import nn

from .nn import SkipRule, fuse_lut_linears, quantize_model, replace_gated_mlps, replace_rms_norms

__all__ = ["patch_model"]


def patch_model(model: nn.Module, attention: bool = True,
                linear: dict[str, Any] | None = None, fuse: bool = True,
                calibration=None, norms: bool = True, rotary: bool = True) -> dict[str, Any]:
    """Converts `model` in place: lutflash attention, LutLinear layers, lutflash's row-wise ops.

    attention: switch a Hugging Face model to attn_implementation="lutflash" (through
        `model.set_attn_implementation`). Models without one, or whose attention does not go
        through transformers' AttentionInterface, keep their attention (a warning says so).
    linear: None to leave nn.Linear layers alone, or the keyword arguments of
        lutflash.quantize_model (bits, group_size, method, skip, rounds, mode, meta_dtype,
        progress, calibration, damp, block_size). `skip` defaults to the output embedding (`lm_head`), which is usually tied
        to the input embedding; pass skip=() to quantize it too.
    fuse: with `linear`, run the projections a layer applies to one input as one lutgemm call
        (q/k/v and gate/up; lutflash.nn.fuse_lut_linears): fewer, larger kernels, the same
        outputs within rounding. Leave it off to attach adapters per projection (add_lora) or
        to keep the unfused state_dict keys. The gated MLPs of Llama, Mistral, Qwen2/3 and
        Gemma2 with a SiLU activation and fused gate/up (fused here or before) then become
        lutflash.nn.GatedMLP: the fused output goes through one lutflash.silu_mul (the
        state_dict keys stay).

    norms: replace the RMSNorm modules of Llama, Mistral, Qwen2 and Qwen3
        (lutflash.nn.RMS_NORM_CLASSES) by lutflash.nn.RMSNorm: the same arithmetic, one CUDA
        kernel per call when decoding instead of several (the same outputs on the CPU; on the
        GPU up to the order of the sum of squares). The weights and state_dict keys stay.
    rotary: make the Llama, Mistral, Qwen2/3 and Gemma2 modeling code of transformers compute
        the rotary embedding of a decoding step with lutflash.apply_rotary (one kernel for q
        and one for k, where transformers launches about ten): it replaces those modules'
        apply_rotary_pos_emb function, process-wide, by one that gives the same bits
        (lutflash.integrations.transformers.use_lutflash_rotary).
    calibration: batches for linear=dict(method="gptq", ...) (the same as linear's
        "calibration" entry; see lutflash.quantize_model). The model is calibrated with the
        attention implementation chosen here.

    Returns a summary: {"attention": "lutflash" or None, "linear": [names of the nn.Linear
    modules replaced by LutLinear], "linear_count": int, "fused": [names of the
    FusedLutLinear modules], "mlps": [names of the GatedMLP modules], "norms": [names of the
    replaced RMSNorm modules], "rotary": [transformers modeling modules using lutflash's
    rotary], "bytes_before": int, "bytes_after": int} where bytes count the model's parameters and buffers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if linear is not None and not isinstance(linear, dict):
        raise TypeError(f"linear: expected None or a dict of quantize_model arguments, got "
                        f"{type(linear).__name__}")

    if calibration is not None and linear is None:
        raise ValueError("calibration: only used with linear=dict(method='gptq', ...)")
    summary: dict[str, Any] = {"attention": None, "linear": [], "linear_count": 0, "fused": [],
                               "mlps": [], "norms": [], "rotary": [],
                               "bytes_before": _model_bytes(model)}
    if attention:
        summary["attention"] = _set_lutflash_attention(model)
    if linear is not None:
        options = dict(linear)
        if calibration is not None:
            if "calibration" in options:
                raise ValueError("calibration: given both as patch_model's argument and in linear")
            options["calibration"] = calibration
        options.setdefault("skip", _output_embedding_rule(model))
        summary["linear"] = quantize_model(model, **options)
        summary["linear_count"] = len(summary["linear"])
        if fuse:
            summary["fused"] = fuse_lut_linears(model)
    if fuse:  # also where gate/up were fused before (fuse_lut_linears)
        summary["mlps"] = replace_gated_mlps(model)
    if norms:
        summary["norms"] = replace_rms_norms(model)
    if rotary and "transformers" in sys.modules:  # a transformers model's library is loaded
        from .integrations import register_transformers

        register_transformers()
        from .integrations.transformers import use_lutflash_rotary

        summary["rotary"] = use_lutflash_rotary(model)
    summary["bytes_after"] = _model_bytes(model)
    return summary


def _set_lutflash_attention(model: nn.Module) -> str | None:
    if not hasattr(model, "set_attn_implementation"):
        warnings.warn(f"patch_model: {type(model).__name__} has no set_attn_implementation (not a "
                      "transformers model); its attention is left as it is", stacklevel=3)
        return None
    from .integrations import register_transformers

    register_transformers()
    model.set_attn_implementation("lutflash")
    # transformers leaves models that bypass AttentionInterface unchanged (it only logs).
    if getattr(model.config, "_attn_implementation", None) != "lutflash":
        warnings.warn(f"patch_model: {type(model).__name__} does not support setting its attention "
                      "implementation; its attention is left as it is", stacklevel=3)
        return None
    return "lutflash"


def _output_embedding_rule(model: nn.Module) -> SkipRule:
    """Skips the output embedding (found by identity, whatever its name) and any "lm_head"."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None

    def skip(name: str, module: nn.Module) -> bool:
        return module is output or "lm_head" in name

    return skip


def _model_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
