"""The lutgemm operator: a torch.library custom op over the C/CUDA kernels."""

from __future__ import annotations

import torch

from . import _C
from .bcq import MODES, BCQWeight, dequantize_packed

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _stream_of(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def lutgemm_into(x2d: torch.Tensor, planes: torch.Tensor, meta: torch.Tensor,
                 bias: torch.Tensor | None, out: torch.Tensor, n: int, k: int, bits: int,
                 group_size: int, mode: int) -> torch.Tensor:
    """Runs the kernel on a (m, k) input into a preallocated (m, n) output; no autograd."""
    on_cuda = x2d.device.type == "cuda"
    size = _C.lutgemm_workspace_bytes(on_cuda, x2d.shape[0], n, k, bits, group_size, mode)
    workspace = torch.empty(size, dtype=torch.uint8, device=x2d.device)
    _C.lutgemm(x2d, planes, meta, bias, out, workspace, n, k, bits, group_size, mode,
               _stream_of(x2d.device))
    return out


@torch.library.custom_op("lutflash::lutgemm", mutates_args=())
def _lutgemm_op(x: torch.Tensor, planes: torch.Tensor, meta: torch.Tensor,
                bias: torch.Tensor | None, n: int, k: int, bits: int, group_size: int,
                mode: int) -> torch.Tensor:
    x2d = x.reshape(-1, k)
    if x2d.shape[0] > 0 and x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    out = torch.empty((x2d.shape[0], n), dtype=x.dtype, device=x.device)
    lutgemm_into(x2d, planes, meta, bias, out, n, k, bits, group_size, mode)
    return out.reshape(*x.shape[:-1], n)


@_lutgemm_op.register_fake
def _(x, planes, meta, bias, n, k, bits, group_size, mode):
    return x.new_empty((*x.shape[:-1], n))


def _setup_context(ctx, inputs, output):
    x, planes, meta, bias, n, k, bits, group_size, mode = inputs
    ctx.save_for_backward(planes, meta)
    ctx.layout = (n, k, bits, group_size, mode)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    planes, meta = ctx.saved_tensors
    n, k, bits, group_size, mode = ctx.layout
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = dequantize_packed(planes, meta, n, k, bits, group_size, MODES[mode],
                                   dtype=grad_out.dtype)
        grad_x = grad_out @ weight
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad_out.reshape(-1, n).sum(0)
    return grad_x, None, None, grad_bias, None, None, None, None, None


_lutgemm_op.register_autograd(_backward, setup_context=_setup_context)


def check_lutgemm_args(x, n: int, k: int, device: torch.device, bias) -> None:
    """Python-side checks with messages in the user's terms (the C layer checks again)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x: expected dtype float32, float16 or bfloat16, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"x: expected shape (..., {k}) (in_features of the weight), got "
                         f"{tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"x: expected a tensor on {device} (the weight's device), got {x.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (n,):
            raise ValueError(f"bias: expected shape ({n},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias: expected dtype {x.dtype} (the dtype of x), got {bias.dtype}")
        if bias.device != device:
            raise ValueError(f"bias: expected a tensor on {device}, got {bias.device}")


def lutgemm(x: torch.Tensor, qweight: BCQWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · Ŵᵀ (+ bias) for a BCQ weight Ŵ of shape (n, k).

    x: (..., k) float32, float16 or bfloat16 on the weight's device; the result is (..., n) in
    x's dtype, accumulated in float32. Differentiable in x and bias (the weight is frozen).
    """
    if not isinstance(qweight, BCQWeight):
        raise TypeError(f"qweight: expected a lutflash.BCQWeight, got {type(qweight).__name__}")
    n, k = qweight.shape
    check_lutgemm_args(x, n, k, qweight.device, bias)
    return _lutgemm_op(x, qweight.planes, qweight.meta, bias, n, k, qweight.bits,
                       qweight.group_size, MODES.index(qweight.mode))
