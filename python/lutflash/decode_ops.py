"""The row-wise ops around a decoder layer's projections: RMSNorm (with the residual add
before it), SiLU·mul of a fused gate/up output, and the rotary embedding.

A decode step runs each on a few rows once or twice per layer; in torch each is several small
kernels (the add and the norm; silu and mul; neg, cat, two muls and an add), and at batch 1
their launches cost more than their bytes. On CUDA, for inference (no gradient needed, not
traced by torch.compile, no dispatch modes: ``_runtime.direct_call``), each is one lutflash
kernel (cuda/decode_ops.cu). Everywhere else (the CPU, autograd, torch.compile) they are the torch
composition they stand for, which is also the definition the kernels follow: arithmetic in
float32, results rounded to the input's dtype where the torch composition rounds, so the two
agree up to the order of the norm's sum.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _C
from ._runtime import FLOAT_DTYPES, direct_call, stream_of

_HAS_CUDA = _C.built_with_cuda()
_DTYPES = (*FLOAT_DTYPES, torch.float64)  # float64: the torch composition only


def _kernel(x: torch.Tensor, *others) -> bool:
    """Whether the call runs the CUDA kernel (else the torch composition)."""
    return (_HAS_CUDA and x.device.type == "cuda" and x.dtype in FLOAT_DTYPES and x.numel() > 0
            and direct_call(x, *others))


def _check_float(name: str, t, like: torch.Tensor | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if like is None:
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: expected dtype float32, float16, bfloat16 or float64, got "
                            f"{t.dtype}")
        return
    if t.dtype != like.dtype:
        raise TypeError(f"{name}: expected dtype {like.dtype} (the dtype of x), got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected a tensor on {like.device} (x's device), got {t.device}")


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """t as (rows, width) without a copy where its rows are already dense."""
    t2 = t.reshape(-1, width)
    dense = t2.stride(-1) == 1 and (t2.shape[0] <= 1 or t2.stride(0) >= width)
    return t2 if dense else t2.contiguous()  # e.g. a broadcast (stride 0) or strided input


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             residual: torch.Tensor | None = None):
    """RMSNorm over the last dimension as Llama, Mistral and Qwen2 compute it.

    h = x, or x + residual (rounded to x's dtype) when ``residual`` is given;
    y = (h · rsqrt(mean(h², -1) + eps)) in float32, rounded to x's dtype, times ``weight``.
    Returns y, or (y, h) with a residual (h is the new residual stream). x: (..., hidden)
    float32/float16/bfloat16 (float64: the composition); weight: (hidden,) and residual: x's shape, both of x's dtype and
    device. Differentiable (through the torch composition)."""
    _check_float("x", x)
    if x.ndim < 1:
        raise ValueError("x: expected at least 1 dimension (..., hidden), got a scalar")
    hidden = x.shape[-1]
    _check_float("weight", weight, x)
    if weight.shape != (hidden,):
        raise ValueError(f"weight: expected shape ({hidden},) (x's last dimension), got "
                         f"{tuple(weight.shape)}")
    if residual is not None:
        _check_float("residual", residual, x)
        if residual.shape != x.shape:
            raise ValueError(f"residual: expected shape {tuple(x.shape)} (x's shape), got "
                             f"{tuple(residual.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) \
            or eps < 0:
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
    if _kernel(x, weight, residual):
        x2 = _rows(x, hidden)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        total = None if residual is None else torch.empty_like(out)
        _C.rms_norm(x2, None if residual is None else _rows(residual, hidden),
                    weight.contiguous(), out.view(-1, hidden),
                    None if total is None else total.view(-1, hidden), float(eps),
                    stream_of(x.device))
        return out if total is None else (out, total)
    h = x if residual is None else x + residual
    y = rms_norm_composition(h, weight, eps)
    return y if residual is None else (y, h)


def rms_norm_composition(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The torch ops rms_norm stands for (Hugging Face's LlamaRMSNorm.forward, with float64
    kept in float64): a weight of another dtype than h promotes the product, as there."""
    y = h.to(torch.promote_types(h.dtype, torch.float32))
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(h.dtype)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up for x = (..., 2·d) holding gate then up (a fused gate/up projection's
    output): (..., d) in x's dtype, silu rounded to it before the product (torch's
    ``F.silu(gate) * up``). Differentiable (through the torch composition)."""
    _check_float("x", x)
    if x.ndim < 1 or x.shape[-1] % 2:
        raise ValueError(f"x: expected an even last dimension (gate and up halves), got shape "
                         f"{tuple(x.shape)}")
    d = x.shape[-1] // 2
    if _kernel(x):
        out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
        if out.numel():
            _C.silu_mul(_rows(x, 2 * d), out.view(-1, d), stream_of(x.device))
        return out
    gate, up = x.split(d, dim=-1)
    return F.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x · cos + rotate_half(x) · sin (Llama's rotary embedding, halves convention), each
    product and the sum rounded to x's dtype as in torch.

    x: (batch, ..., head_dim), e.g. (batch, heads, seq, head_dim) or a strided view such as
    q and k sliced out of a fused q/k/v output; cos and sin: (head_dim,), (1, head_dim) or
    (batch, head_dim) (one position per sequence, decoding), of x's dtype and device; head_dim
    even. Returns a new tensor of x's shape. Differentiable (through the torch composition);
    any cos/sin that broadcast against x also work there, the kernel takes the shapes above."""
    _check_float("x", x)
    if x.ndim < 2 or x.shape[-1] % 2:
        raise ValueError(f"x: expected shape (batch, ..., head_dim) with an even head_dim, got "
                         f"{tuple(x.shape)}")
    _check_float("cos", cos, x)
    _check_float("sin", sin, x)
    if cos.shape != sin.shape:
        raise ValueError(f"sin: expected cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    batch, head_dim = x.shape[0], x.shape[-1]
    per_sequence = cos.shape == (batch, head_dim)  # one row per sequence of x
    if _kernel(x, cos, sin) and (per_sequence or cos.shape in ((head_dim,), (1, head_dim))):
        return rotary_kernel(x, cos, sin)
    if per_sequence and x.ndim > 2:  # against x's batch, not its last dimensions
        cos = cos.reshape(batch, *([1] * (x.ndim - 2)), head_dim)
        sin = sin.reshape(batch, *([1] * (x.ndim - 2)), head_dim)
    return x * cos + rotate_half(x) * sin


def rotary_kernel(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary's CUDA kernel, for arguments apply_rotary has checked and sent there
    (cos/sin of shape (head_dim,), (1, head_dim) or (batch, head_dim); _kernel true)."""
    batch, head_dim = x.shape[0], x.shape[-1]
    rows = batch if cos.shape == (batch, head_dim) else 1
    x3 = x.reshape(batch, -1, head_dim)  # a view where x's middle dimensions merge
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    out = torch.empty((batch, x3.shape[1], head_dim), dtype=x.dtype, device=x.device)
    _C.rotary(x3, cos.reshape(rows, head_dim).contiguous(),
              sin.reshape(rows, head_dim).contiguous(), out, stream_of(x.device))
    return out.view(x.shape)
