"""What both ops share on the Python side: the floating dtypes the kernels take, the raw
handle of a device's current stream, and when an op may skip the dispatcher."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# torch.cuda.current_stream builds a Stream object (a few microseconds); torch's own binding
# that returns the handle alone is used where this torch has it.
_raw_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def stream_of(device: torch.device) -> int:
    """The current stream of `device` as the integer the C entry points take (0 on the CPU)."""
    if device.type != "cuda":
        return 0
    if _raw_current_stream is not None and device.index is not None:
        return _raw_current_stream(device.index)
    return torch.cuda.current_stream(device).cuda_stream


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _dispatch_modes_active() -> bool:
    return bool(torch._C._len_torch_dispatch_stack()) or torch._C._is_torch_function_mode_enabled()


def direct_call(*tensors) -> bool:
    """Whether an op may call its kernel directly instead of going through its torch.library
    op: nothing needs the dispatcher (no gradient to record, no torch.compile tracing, no
    dispatch or function modes) and every tensor argument (None skipped) is a plain tensor or
    Parameter (a subclass may override what the op does).
    The dispatcher and autograd wrapping cost 15 to 30 us per call, which decoding, with
    hundreds of small calls per token, cannot afford; this check runs on every call, so it is
    one loop and no temporaries."""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or (grad and t.requires_grad)):
            return False
    return not torch.compiler.is_compiling() and not _dispatch_modes_active()


# Scratch workspaces kept between calls on CUDA, one per (device, stream), so that a call
# allocates nothing but its outputs (a torch.empty costs about as much host time as the rest of
# the Python path). Per stream, because calls on one stream run one after the other while two
# streams may run at once; shared by the ops (lutgemm's split-k partial sums, attention's
# split-KV records), whose kernels take any content. Not used while a CUDA graph is being
# captured: the graph would bake in a buffer that eager calls on the same stream also use, and
# replays of two graphs could overlap; captured calls allocate theirs (the graph keeps them).
# Workspaces over _SCRATCH_MAX_BYTES (prefill-sized) are allocated per call: their kernels
# take far longer than the allocation.
_scratch_workspaces: dict[tuple[int, int], torch.Tensor] = {}
_SCRATCH_MAX_BYTES = 64 << 20
_is_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing",
                        torch.cuda.is_current_stream_capturing)


def may_keep(device: torch.device) -> bool:
    """Whether a call on `device` may use buffers kept between calls: a CUDA device whose
    current stream is not being captured (asked once per call, by the op)."""
    return device.type == "cuda" and not _is_capturing()


def scratch_workspace(device: torch.device, stream: int, size: int, keep: bool) -> torch.Tensor:
    """A uint8 buffer of at least `size` bytes for one call on `device`'s `stream`, any
    content: the kept one where `keep` (may_keep(device)) and it is not prefill-sized, else a
    fresh one (also on the CPU, where calls from several threads may run at once)."""
    if not keep or size > _SCRATCH_MAX_BYTES:
        return torch.empty(size, dtype=torch.uint8, device=device)
    key = (device.index, stream)
    workspace = _scratch_workspaces.get(key)
    if workspace is None or workspace.numel() < size:
        workspace = torch.empty(max(size, 1 << 20), dtype=torch.uint8, device=device)
        _scratch_workspaces[key] = workspace
    return workspace
