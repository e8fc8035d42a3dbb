"""What both ops share on the Python side: the floating dtypes the kernels take and the raw
handle of a device's current stream."""

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
