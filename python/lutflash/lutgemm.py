"""The lutgemm operator: a torch.library custom op over the C/CUDA kernels."""

from __future__ import annotations

import torch

from . import _C
from ._runtime import FLOAT_DTYPES, direct_call, may_keep, scratch_workspace, stream_of
from .bcq import MODES, WORD_K, BCQWeight, dequantize_packed

# The zeroed workspace of the decode kernel (m <= 8), kept per (device, stream) like the scratch
# one (_runtime.scratch_workspace, which says why): the kernel leaves it zero, so no memset
# launch is needed per call. Not used while a CUDA graph is being captured.
_clean_workspaces: dict[tuple[int, int], torch.Tensor] = {}


def _workspaces(device: torch.device, stream: int, size: int, m: int):
    """(workspace, clean_workspace or None) for one call on `device`'s `stream`."""
    keep = may_keep(device)
    workspace = scratch_workspace(device, stream, size, keep)
    if not keep or m > 8:
        return workspace, None
    key = (device.index, stream)
    clean = _clean_workspaces.get(key)
    if clean is None or clean.numel() < size:
        # allocated and zeroed on this stream, so it is ordered before the calls that use it
        clean = torch.zeros(max(size, 1 << 20), dtype=torch.uint8, device=device)
        _clean_workspaces[key] = clean
    return workspace, clean


# The CUDA kernel path (lutgemm_params::path): "auto" chooses from x's dtype and m; tests and
# benchmarks force the others through the private keyword of lutgemm_into and _lutgemm.
_PATHS = ("auto", "lut", "mma")


def lutgemm_into(x2d: torch.Tensor, planes: torch.Tensor, meta: torch.Tensor,
                 bias: torch.Tensor | None, out: torch.Tensor, n: int, k: int, bits: int,
                 group_size: int, mode: int, *, _path: int = 0) -> torch.Tensor:
    """Runs the kernel on a (m, k) input into a preallocated (m, n) output; no autograd.
    _path: index in _PATHS (CUDA only)."""
    device = x2d.device
    on_cuda = device.type == "cuda"
    m = x2d.shape[0]
    size = _C.lutgemm_workspace_bytes(on_cuda, m, n, k, bits, group_size, mode)
    stream = stream_of(device)
    workspace, clean = _workspaces(device, stream, size, m)
    _C.lutgemm(x2d, planes, meta, bias, out, workspace, n, k, bits, group_size, mode, stream,
               clean, _path)
    return out


# Defined with torch.library.Library rather than torch.library.custom_op: dispatching to it
# costs about 4 us instead of about 25 us, which matters for decoding, where a model makes
# hundreds of small lutgemm calls per token.
_lib = torch.library.Library("lutflash", "FRAGMENT")
_lib.define("lutgemm(Tensor x, Tensor planes, Tensor meta, Tensor? bias, SymInt n, SymInt k, "
            "SymInt bits, SymInt group_size, SymInt mode) -> Tensor")


def _lutgemm_kernel(x, planes, meta, bias, n, k, bits, group_size, mode, _path=0):
    # DLPack refuses tensors that require grad; autograd is handled around this op.
    if x.requires_grad:
        x = x.detach()
    if bias is not None and bias.requires_grad:
        bias = bias.detach()
    x2d = x if x.dim() == 2 else x.reshape(-1, k)
    # the kernels read rows ldx apart: a broadcast or overlapping input is copied first
    if x2d.stride(-1) != 1 or (x2d.shape[0] > 1 and x2d.stride(0) < k):
        x2d = x2d.contiguous()
    out = torch.empty((x2d.shape[0], n), dtype=x.dtype, device=x.device)
    lutgemm_into(x2d, planes, meta, bias, out, n, k, bits, group_size, mode, _path=_path)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], n)


_lib.impl("lutgemm", _lutgemm_kernel, "CPU")
_lib.impl("lutgemm", _lutgemm_kernel, "CUDA")
_lutgemm_op = torch.ops.lutflash.lutgemm.default


@torch.library.register_fake("lutflash::lutgemm")
def _(x, planes, meta, bias, n, k, bits, group_size, mode):
    return x.new_empty((*x.shape[:-1], n))


def _setup_context(ctx, inputs, output):
    x, planes, meta, bias, n, k, bits, group_size, mode = inputs
    ctx.save_for_backward(planes, meta)
    ctx.layout = (n, k, bits, group_size, mode)
    ctx.has_bias = bias is not None


# Dense weight elements the backward dequantizes at once (128 MB in float16).
_GRAD_CHUNK_ELEMENTS = 1 << 26


def _grad_input(grad_out, planes, meta, n, k, bits, group_size, mode):
    """grad_out · Ŵ, dequantizing Ŵ a block of input columns at a time so that a large
    layer's backward never holds the whole dense weight. Each block of grad_x columns is one
    product over all of n, so every element is rounded once, as in a plain matmul (blocks of
    weight rows would round partial sums that may cancel)."""
    grad = grad_out.reshape(-1, n)
    unit = WORD_K if group_size == k else group_size  # blocks of whole words and groups
    cols = max(unit, _GRAD_CHUNK_ELEMENTS // max(n, 1) // unit * unit)
    parts = []
    for c0 in range(0, k, cols):
        c1 = min(k, c0 + cols)
        words = planes[c0 // WORD_K:-(-c1 // WORD_K)]
        if group_size == k:  # one group: its metadata covers every block
            block_meta, block_group = meta, c1 - c0
        else:
            block_meta, block_group = meta[c0 // group_size:c1 // group_size], group_size
        weight = dequantize_packed(words, block_meta, n, c1 - c0, bits, block_group, mode,
                                   dtype=grad_out.dtype)
        parts.append(grad @ weight)
    grad_x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return grad_x.reshape(*grad_out.shape[:-1], k)


def _backward(ctx, grad_out):
    planes, meta = ctx.saved_tensors
    n, k, bits, group_size, mode = ctx.layout
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _grad_input(grad_out, planes, meta, n, k, bits, group_size, MODES[mode])
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad_out.reshape(-1, n).sum(0)
    return grad_x, None, None, grad_bias, None, None, None, None, None


torch.library.register_autograd("lutflash::lutgemm", _backward, setup_context=_setup_context)


def lutgemm_call(x, planes, meta, bias, n, k, bits, group_size, mode) -> torch.Tensor:
    """Runs lutflash::lutgemm, calling the kernel directly when nothing needs the dispatcher
    (_runtime.direct_call): about 15 us of autograd and dispatcher overhead saved per call."""
    if direct_call(x, bias):
        return _lutgemm_kernel(x, planes, meta, bias, n, k, bits, group_size, mode)
    return _lutgemm_op(x, planes, meta, bias, n, k, bits, group_size, mode)


def check_lutgemm_args(x, n: int, k: int, device: torch.device, bias) -> None:
    """Python-side checks with messages in the user's terms (the C layer checks again)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
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
    return lutgemm_call(x, qweight.planes, qweight.meta, bias, n, k, qweight.bits,
                        qweight.group_size, MODES.index(qweight.mode))


def _lutgemm(x: torch.Tensor, qweight: BCQWeight, bias: torch.Tensor | None = None, *,
             path: str = "auto") -> torch.Tensor:
    """lutgemm with the CUDA kernel path forced ("auto", "lut" or "mma"); no autograd. For
    tests and benchmarks: lutflash.lutgemm always chooses automatically."""
    n, k = qweight.shape
    check_lutgemm_args(x, n, k, qweight.device, bias)
    return _lutgemm_kernel(x, qweight.planes, qweight.meta, bias, n, k, qweight.bits,
                           qweight.group_size, MODES.index(qweight.mode), _PATHS.index(path))
