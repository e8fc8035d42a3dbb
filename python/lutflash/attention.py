"""Exact softmax attention (FlashAttention-2's algorithm) as PyTorch custom ops with autograd.

The semantics are DESIGN.md's "Attention semantics": q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D),
scores s = scale·q·kᵀ, optionally soft-capped (c·tanh(s/c)) and ALiBi-biased
(−m_h·|i + Sk − Sq − j|), masked to a band around the bottom-right aligned diagonal (causal,
sliding window), softmax over the keys, optional dropout, times v. The score matrix is never
materialized; the backward recomputes it from the saved logsumexp.

Dropout randomness. Every kept/dropped decision is a pure function of (seed, offset, b, h, i, j)
through Philox4x32-10 (csrc/philox.h documents the exact counter layout), so the backward,
the CPU and the GPU kernels all draw the same mask. The pair (seed, offset) travels to the
kernel as an int64 tensor ``rng_state`` of shape (2,):

- ``seed=s`` (an int in [0, 2^63)) uses (s, 0): the same seed gives the same mask;
  ``seed=(s, o)`` sets the offset too (only its low 32 bits are used).
- otherwise both words are drawn from ``generator`` (a torch.Generator on the CPU), or from
  torch's default CPU generator, with ``torch.randint(0, 2**62, (2,))``: reseeding with
  ``torch.manual_seed`` reproduces the mask (also under torch.compile, for the default
  generator).

Operators: ``lutflash::flash_attention``, ``lutflash::flash_attention_varlen`` and
``lutflash::flash_attention_backward`` (each returns fresh tensors; the forward ops return
(out, lse)).
"""

from __future__ import annotations

import math

import torch

from . import _C
from ._runtime import FLOAT_DTYPES, direct_call, may_keep, scratch_workspace, stream_of

MAX_HEAD_DIM = 256
_INT32_MAX = 2**31 - 1

__all__ = ["flash_attention", "flash_attention_varlen"]


def _inner_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _workspace(q: torch.Tensor, stream: int, cu_seqlens_q, backward: bool, threads: int,
               k=None, max_seqlen_q: int = 0, max_seqlen_k: int = 0) -> torch.Tensor:
    varlen = cu_seqlens_q is not None
    batch = cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0]
    total_q = q.shape[0] if varlen else q.shape[0] * q.shape[1]
    args = [q.device.type == "cuda", q.shape[-1], backward, threads, q.shape[-2], batch, total_q]
    if k is not None and q.device.type == "cuda" and not backward:
        # the CUDA forward's decode path (split-KV partial outputs and lse) sizes by the shapes
        seqlen_q = max_seqlen_q if varlen else q.shape[1]
        seqlen_k = max_seqlen_k if varlen else k.shape[1]
        args += [k.shape[-2], seqlen_q, seqlen_k]
    size = _C.attention_workspace_bytes(*args)
    return scratch_workspace(q.device, stream, size, may_keep(q.device))


def _cuda_operand(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """t as the CUDA kernels read it: the head dim zero-padded to `head_dim` (a multiple of 8;
    zero columns change no score and give output columns that are sliced off) and every row
    16-byte aligned, copying only when needed."""
    if t.shape[-1] != head_dim:
        return torch.nn.functional.pad(t, (0, head_dim - t.shape[-1]))
    if t.numel() == 0 or (t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:-1])):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _cuda_head_dim(d: int) -> int:
    return (d + 7) // 8 * 8


def _lse_shape(q: torch.Tensor, varlen: bool) -> tuple[int, ...]:
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


def _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
             softcap, window_left, window_right, alibi_slopes, dropout_p, rng_state, variant=0,
             sinks=None):
    """Runs the kernel (no autograd); returns (out, lse)."""
    q, k, v = (_inner_contiguous(t.detach()) for t in (q, k, v))
    varlen = cu_seqlens_q is not None
    d = q.shape[-1]
    if q.device.type == "cuda":
        q, k, v = (_cuda_operand(t, _cuda_head_dim(d)) for t in (q, k, v))
    # packed rows outside cu_seqlens belong to no sequence: they come out as 0 (lse -inf)
    alloc = torch.zeros if varlen else torch.empty
    out = alloc(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, varlen), dtype=torch.float32, device=q.device)
    if varlen:
        lse.fill_(-math.inf)
    threads = max(1, torch.get_num_threads())
    stream = stream_of(q.device)
    _C.attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state, out, lse,
                         _workspace(q, stream, cu_seqlens_q, False, threads, k, max_seqlen_q,
                                    max_seqlen_k), sinks,
                         max_seqlen_q, max_seqlen_k,
                         softmax_scale, softcap, window_left, window_right, dropout_p, threads,
                         variant, stream)
    if out.shape[-1] != d:
        out = out[..., :d].contiguous()
    return out, lse


def _backward(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
              max_seqlen_k, softmax_scale, softcap, window_left, window_right, alibi_slopes,
              dropout_p, rng_state, variant=0, deterministic=False):
    """Runs the backward kernel (no autograd); returns (dq, dk, dv). On CUDA, deterministic
    picks the bitwise repeatable passes instead of the fast backward (float32 dQ atomics in
    the workspace); the CPU backward is always deterministic."""
    dout, q, k, v, out = (_inner_contiguous(t.detach()) for t in (dout, q, k, v, out))
    d = q.shape[-1]
    if q.device.type == "cuda":
        dout, q, k, v, out = (_cuda_operand(t, _cuda_head_dim(d)) for t in (dout, q, k, v, out))
    lse = lse.detach().contiguous()
    dlse = dlse.detach().contiguous() if dlse is not None else None
    alloc = torch.zeros if cu_seqlens_q is not None else torch.empty  # see _forward
    dq = alloc(q.shape, dtype=q.dtype, device=q.device)
    dk = alloc(k.shape, dtype=k.dtype, device=k.device)
    dv = alloc(v.shape, dtype=v.dtype, device=v.device)
    delta = torch.empty_like(lse)
    threads = max(1, torch.get_num_threads())
    stream = stream_of(q.device)
    if q.device.type == "cuda" and deterministic:
        workspace = torch.empty(0, dtype=torch.uint8, device=q.device)
    else:
        workspace = _workspace(q, stream, cu_seqlens_q, True, threads)
    _C.attention_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state, dout,
                          out, lse, dlse, dq, dk, dv, delta, workspace,
                          max_seqlen_q, max_seqlen_k, softmax_scale, softcap, window_left,
                          window_right, dropout_p, threads, variant, stream,
                          int(deterministic))
    if dq.shape[-1] != d:
        dq, dk, dv = (t[..., :d].contiguous() for t in (dq, dk, dv))
    return dq, dk, dv


@torch.library.custom_op("lutflash::flash_attention", mutates_args=())
def _flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                        softcap: float, window_left: int, window_right: int,
                        alibi_slopes: torch.Tensor | None, dropout_p: float,
                        rng_state: torch.Tensor | None, deterministic: bool = False,
                        sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    # deterministic only matters to the backward (it travels through the autograd context)
    return _forward(q, k, v, None, None, 0, 0, softmax_scale, softcap, window_left, window_right,
                    alibi_slopes, dropout_p, rng_state, sinks=sinks)


@_flash_attention_op.register_fake
def _(q, k, v, softmax_scale, softcap, window_left, window_right, alibi_slopes, dropout_p,
      rng_state, deterministic=False, sinks=None):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, False), dtype=torch.float32)


@torch.library.custom_op("lutflash::flash_attention_varlen", mutates_args=())
def _flash_attention_varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                               max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                               softcap: float, window_left: int, window_right: int,
                               alibi_slopes: torch.Tensor | None, dropout_p: float,
                               rng_state: torch.Tensor | None, deterministic: bool = False,
                               sinks: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    softmax_scale, softcap, window_left, window_right, alibi_slopes, dropout_p,
                    rng_state, sinks=sinks)


@_flash_attention_varlen_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, softcap,
      window_left, window_right, alibi_slopes, dropout_p, rng_state, deterministic=False,
      sinks=None):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, True), dtype=torch.float32)


@torch.library.custom_op("lutflash::flash_attention_backward", mutates_args=())
def _flash_attention_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                 v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                 dlse: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
                                 cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int,
                                 max_seqlen_k: int, softmax_scale: float, softcap: float,
                                 window_left: int, window_right: int,
                                 alibi_slopes: torch.Tensor | None, dropout_p: float,
                                 rng_state: torch.Tensor | None, deterministic: bool = False
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                     max_seqlen_k, softmax_scale, softcap, window_left, window_right,
                     alibi_slopes, dropout_p, rng_state, deterministic=deterministic)


@_flash_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      softmax_scale, softcap, window_left, window_right, alibi_slopes, dropout_p, rng_state,
      deterministic=False):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save(ctx, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state, sinks,
          options):
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state,
                          sinks)
    # (max_seqlen_q, max_seqlen_k, scale, softcap, left, right, dropout_p, deterministic)
    ctx.options = options


def _sinks_grad(sinks, grad_out, out, lse, grad_lse, varlen: bool) -> torch.Tensor:
    """d loss / d sinks. The sink of head h takes p_sink = exp(sink_h - lse) of each of the
    head's rows, and every key's probability shrinks by the same share, so
    d loss / d sink_h = -sum over rows of p_sink * (rowsum(dO * O) - dlse). Rows that belong to
    no sequence (varlen padding: lse -inf) add nothing."""
    delta = (grad_out.float() * out.float()).sum(-1)  # (B, Sq, Hq) or (total_q, Hq)
    delta = delta.transpose(0, 1) if varlen else delta.transpose(1, 2)  # like lse
    if grad_lse is not None:
        delta = delta - grad_lse
    head = sinks.reshape(-1, 1) if varlen else sinks.reshape(1, -1, 1)
    share = torch.where(torch.isfinite(lse), torch.exp(head - lse) * delta, 0.0)
    return -share.sum(dim=1 if varlen else (0, 2))


def _autograd_backward(ctx, grad_out, grad_lse):
    """The autograd formula of both ops (dense and varlen): dq, dk, dv, dsinks (the last
    input) and None for the rest."""
    (q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state,
     sinks) = ctx.saved_tensors
    max_q, max_k, scale, softcap, left, right, dropout_p, deterministic = ctx.options
    dq, dk, dv = _flash_attention_backward_op(grad_out, q, k, v, out, lse, grad_lse,
                                              cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale,
                                              softcap, left, right, alibi_slopes, dropout_p,
                                              rng_state, deterministic)
    # one gradient per input the op was called with (the dispatcher may drop defaulted ones)
    grads = [dq, dk, dv] + [None] * (len(ctx.needs_input_grad) - 3)
    if sinks is not None and ctx.needs_input_grad[-1]:
        grads[-1] = _sinks_grad(sinks, grad_out, out, lse, grad_lse,
                                cu_seqlens_q is not None).to(sinks.dtype)
    return tuple(grads)


def _setup_dense(ctx, inputs, output):
    (q, k, v, scale, softcap, left, right, alibi_slopes, dropout_p, rng_state, deterministic,
     *sinks) = inputs
    _save(ctx, q, k, v, *output, None, None, alibi_slopes, rng_state, sinks[0] if sinks else None,
          (0, 0, scale, softcap, left, right, dropout_p, deterministic))




def _setup_varlen(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, scale, softcap, left, right, alibi_slopes, dropout_p,
     rng_state, deterministic, *sinks) = inputs
    _save(ctx, q, k, v, *output, cu_q, cu_k, alibi_slopes, rng_state, sinks[0] if sinks else None,
          (max_q, max_k, scale, softcap, left, right, dropout_p, deterministic))




_flash_attention_op.register_autograd(_autograd_backward, setup_context=_setup_dense)
_flash_attention_varlen_op.register_autograd(_autograd_backward, setup_context=_setup_varlen)


# ------------------------------------------------------------------------------------------
# Public API: Python-level validation with messages in the caller's terms (C checks again).

def _check_qkv(q, k, v, ndim: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")
        if t.ndim != ndim:
            raise ValueError(f"{name}: expected a {ndim}-D tensor {layout}, got shape "
                             f"{tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected a tensor on {q.device} (the device of q), got "
                             f"{t.device}")
    d = q.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q: expected a head dim in [1, {MAX_HEAD_DIM}], got {d}")
    if k.shape[-1] != d:
        raise ValueError(f"k: expected head dim {d} (the head dim of q), got {k.shape[-1]}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected shape {tuple(k.shape)} (the shape of k), got "
                         f"{tuple(v.shape)}")
    heads_q, heads_kv = q.shape[-2], k.shape[-2]
    if heads_q < 1 or heads_kv < 1 or heads_q % heads_kv:
        raise ValueError(f"k: expected a number of kv heads that divides the {heads_q} query "
                         f"heads of q, got {heads_kv}")
    if ndim == 4:  # the kernels' limits, checked before out and lse are allocated
        for name, t in (("q", q), ("k", k)):
            if t.shape[1] > _INT32_MAX:
                raise ValueError(f"{name}: sequence lengths above 2^31 - 1 are not supported, "
                                 f"got {t.shape[1]}")
        if q.shape[0] * heads_q > 2**32:
            raise ValueError(f"q: batch * heads above 2^32 is not supported, got "
                             f"{q.shape[0]} * {heads_q}")


def _check_options(q, batch: int, causal, softmax_scale, window, softcap, alibi_slopes,
                   dropout_p, generator, seed, deterministic, return_lse):
    """Returns (scale, softcap, window_left, window_right, alibi, dropout_p, rng_state,
    deterministic)."""
    for name, flag in (("causal", causal), ("deterministic", deterministic),
                       ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale: expected a float or None, got "
                        f"{type(softmax_scale).__name__}")
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale: expected a positive finite float, got {softmax_scale}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap: expected a float, got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap: expected a finite float >= 0 (0 disables it), got {softcap}")
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or any(isinstance(w, bool) or not isinstance(w, int) for w in window)):
        raise TypeError(f"window: expected a pair of ints (left, right), got {window!r}")
    left, right = window
    if left < -1 or right < -1:
        raise ValueError(f"window: expected values >= -1 (-1 means unbounded), got {tuple(window)}")
    if causal:
        right = 0  # causal is the window's right edge on the diagonal
    # a NaN or infinite slope gives NaN scores (inf * 0 on the diagonal)
    alibi_slopes = _check_head_floats("alibi_slopes", alibi_slopes, q,
                                      ((q.shape[-2],), (batch, q.shape[-2])),
                                      f"({q.shape[-2]},) or ({batch}, {q.shape[-2]})")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p: expected a float, got {type(dropout_p).__name__}")
    if not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p}")
    rng_state = None
    if dropout_p > 0:
        rng_state = _rng_state(seed, generator)
    return (float(softmax_scale), float(softcap), left, right, alibi_slopes, float(dropout_p),
            rng_state, deterministic)


def _check_head_floats(name: str, t, q: torch.Tensor, shapes, shape_text: str):
    """None, or t as the kernels take it: a contiguous float32 tensor of one of `shapes` on q's
    device with finite values (read only on the CPU: on a GPU that would synchronize; the C
    layer checks there too)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name}: expected dtype float32, got {t.dtype}")
    if tuple(t.shape) not in shapes:
        raise ValueError(f"{name}: expected shape {shape_text}, got {tuple(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"{name}: expected a tensor on {q.device} (the device of q), got "
                         f"{t.device}")
    if (t.device.type == "cpu" and not torch.compiler.is_compiling()
            and not torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or infinity")
    return t.contiguous()


def check_sinks(sinks, q: torch.Tensor) -> torch.Tensor | None:
    """sinks as the kernels take it: None or a finite float32 (Hq,) tensor on q's device."""
    return _check_head_floats("sinks", sinks, q, ((q.shape[-2],),),
                              f"({q.shape[-2]},) (one logit per query head)")


def _rng_state(seed, generator) -> torch.Tensor:
    if seed is not None:
        pair = seed if isinstance(seed, (tuple, list)) else (seed, 0)
        if (len(pair) != 2 or any(isinstance(s, bool) or not isinstance(s, int) for s in pair)
                or not all(0 <= s < 2**63 for s in pair)):
            raise ValueError(f"seed: expected an int in [0, 2^63) or a pair (seed, offset) of "
                             f"them, got {seed!r}")
        return torch.tensor(pair, dtype=torch.int64)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator: expected a CPU torch.Generator, got one on {generator.device}")
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=generator)


def _check_cu_seqlens(name: str, cu: torch.Tensor, q: torch.Tensor, max_name: str,
                      max_seqlen) -> None:
    """Type, shape and device; the values are checked once both offsets are known good."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype int32, got {cu.dtype}")
    if cu.ndim != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name}: expected shape (batch + 1,), got {tuple(cu.shape)}")
    if cu.shape[0] - 1 > _INT32_MAX:
        raise ValueError(f"{name}: batches above 2^31 - 1 sequences are not supported, got "
                         f"{cu.shape[0] - 1}")
    if cu.device != q.device:
        raise ValueError(f"{name}: expected a tensor on {q.device} (the device of q), got "
                         f"{cu.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"{max_name}: expected an int, got {type(max_seqlen).__name__}")
    if not 0 <= max_seqlen <= _INT32_MAX:
        raise ValueError(f"{max_name}: expected an int in [0, 2^31 - 1], got {max_seqlen}")


def _check_cu_seqlens_values(name: str, cu: torch.Tensor, total: int, max_name: str,
                             max_seqlen: int) -> None:
    if cu.device.type != "cpu" or torch.compiler.is_compiling():
        return  # reading values would synchronize the GPU / break the graph; C checks them
    offsets = cu.tolist()
    if offsets[0] < 0:
        raise ValueError(f"{name}: expected offsets >= 0, got {offsets[0]} first")
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name}: expected non-decreasing offsets, got {offsets}")
    if offsets[-1] > total:
        raise ValueError(f"{name}: the last offset {offsets[-1]} is beyond the {total} rows of "
                         f"the packed tensor")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{max_name}: expected at least the longest sequence, {max(lengths)}, "
                         f"got {max_seqlen}")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    softmax_scale: float | None = None, window: tuple[int, int] = (-1, -1),
                    softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                    dropout_p: float = 0.0, generator: torch.Generator | None = None,
                    seed: int | tuple[int, int] | None = None, deterministic: bool = False,
                    return_lse: bool = False, sinks: torch.Tensor | None = None):
    """Exact softmax attention, differentiable in q, k, v (and sinks).

    q: (B, Sq, Hq, D); k, v: (B, Sk, Hkv, D) with Hq % Hkv == 0 (query head h reads kv head
    h // (Hq / Hkv)); float32, float16 or bfloat16, D in [1, 256]. The last dimension should be
    contiguous (other strides are free); if it is not, a contiguous copy is used.

    softmax_scale: defaults to 1/sqrt(D). causal: query i sees key j iff j <= i + Sk - Sq
    (bottom-right aligned). window (left, right): j in [i + Sk - Sq - left, i + Sk - Sq + right],
    -1 unbounded; combined with causal, right becomes 0. softcap c > 0: s = c·tanh(s/c).
    alibi_slopes (Hq,) or (B, Hq) float32: s -= slope·|i + Sk - Sq - j|. dropout_p: see the
    module docstring for seed/generator. sinks (Hq,) float32: attention sinks (gpt-oss's
    s_aux), one logit per query head that joins every row's softmax denominator without a
    value: out_i = sum_j exp(s_ij - lse_i) v_j with lse_i = log(sum_j exp(s_ij) + exp(sink_h))
    (a row that sees no key gives 0 and lse = sink_h); differentiable. deterministic: on CUDA, False (the default) runs the
    fast backward, which sums dq with float32 atomics in an extra (B·Sq·Hq·D float32) workspace,
    so dq may differ in the last bits from run to run; True runs a slower backward whose every
    gradient element has one writer and a fixed summation order (bitwise repeatable). The CPU
    backward is always deterministic. A query row that sees no key gives 0 (lse = -inf).

    CUDA tensors: float16 and bfloat16 (float32 raises NotImplementedError); head dims that are
    not a multiple of 8 are zero-padded (a copy). The kernels run on the current stream,
    allocate nothing but the outputs, and can be captured in a CUDA graph (the dropout seed
    drawn at capture time is then replayed).

    Returns out (B, Sq, Hq, D) in q's dtype, or (out, lse) with lse (B, Hq, Sq) float32 when
    return_lse.
    """
    _check_qkv(q, k, v, 4, "(batch, seqlen, heads, head_dim)")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k: expected batch {q.shape[0]} (the batch of q), got {k.shape[0]}")
    options = _check_options(q, q.shape[0], causal, softmax_scale, window, softcap, alibi_slopes,
                             dropout_p, generator, seed, deterministic, return_lse)
    sinks = check_sinks(sinks, q)
    q, k, v = (_inner_contiguous(t) for t in (q, k, v))
    if direct_call(q, k, v, options[4], sinks):  # what the op runs, without the dispatcher
        out, lse = _forward(q, k, v, None, None, 0, 0, *options[:-1], sinks=sinks)
    else:
        out, lse = _flash_attention_op(q, k, v, *options, sinks)
    return (out, lse) if return_lse else out


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                           softmax_scale: float | None = None,
                           window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: torch.Tensor | None = None, dropout_p: float = 0.0,
                           generator: torch.Generator | None = None,
                           seed: int | tuple[int, int] | None = None,
                           deterministic: bool = False, return_lse: bool = False,
                           sinks: torch.Tensor | None = None):
    """flash_attention over a batch of packed sequences of different lengths, without padding.

    q: (total_q, Hq, D); k, v: (total_k, Hkv, D); sequence b is rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k and v
    (int32, shape (B + 1,), non-decreasing); max_seqlen_q/k bound the sequence lengths. The
    masks, ALiBi distances and dropout indices are per sequence; sinks as in flash_attention. Returns out (total_q, Hq, D),
    or (out, lse) with lse (Hq, total_q) float32 when return_lse.
    """
    _check_qkv(q, k, v, 3, "(total_seqlen, heads, head_dim)")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q, "max_seqlen_q", max_seqlen_q)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q, "max_seqlen_k", max_seqlen_k)
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_k: expected shape {tuple(cu_seqlens_q.shape)} (the shape of "
                         f"cu_seqlens_q), got {tuple(cu_seqlens_k.shape)}")
    _check_cu_seqlens_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", max_seqlen_q)
    _check_cu_seqlens_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", max_seqlen_k)
    batch = cu_seqlens_q.shape[0] - 1
    options = _check_options(q, batch, causal, softmax_scale, window, softcap, alibi_slopes,
                             dropout_p, generator, seed, deterministic, return_lse)
    sinks = check_sinks(sinks, q)
    q, k, v = (_inner_contiguous(t) for t in (q, k, v))
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    if direct_call(q, k, v, options[4], sinks):  # what the op runs, without the dispatcher
        out, lse = _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            *options[:-1], sinks=sinks)
    else:
        out, lse = _flash_attention_varlen_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                              max_seqlen_k, *options, sinks)
    return (out, lse) if return_lse else out
