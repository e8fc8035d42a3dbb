"""Attention over a KV cache for decoding: ``flash_attention_with_kvcache``.

One call appends the step's new keys and values to the caches in place (rotating the keys and
the queries with the rotary embedding when its tables are given) and attends each query to its
sequence's valid cache prefix. Caches are dense, (B_cache, S_cache, Hkv, D) with
``cache_batch_idx`` choosing a row per sequence, or paged, (num_pages, page_size, Hkv, D) with a
``block_table`` of page numbers per sequence; page_size is any positive number.

The semantics are flash-attn's ``flash_attn_with_kvcache`` and DESIGN.md's "Attention
semantics" with the key count of sequence b being L_b = cache_seqlens[b] + Sn: csrc/attention_params.h
(``attention_fwd_params``' cache fields and ``kvcache_append_params``) defines them for the
kernels. Inference only: no autograd.

Operator: ``lutflash::flash_attention_with_kvcache`` (mutates k_cache and v_cache; returns
fresh (out, lse)).
"""

from __future__ import annotations

import torch

from . import _C
from ._runtime import FLOAT_DTYPES, direct_call, may_keep, scratch_workspace, stream_of
from .attention import (MAX_HEAD_DIM, _check_options, _cuda_operand, _inner_contiguous,
                        check_sinks)

_INT32_MAX = 2**31 - 1

__all__ = ["flash_attention_with_kvcache"]


def _forward(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table,
             softmax_scale, softcap, window_left, window_right, alibi_slopes, rotary_cos,
             rotary_sin, rotary_interleaved, sinks=None, variant=0):
    """Runs the append and the kernel (no dispatcher); returns (out, lse)."""
    if q.device.type == "cuda":  # 16-byte aligned rows; the caches are written in place as they are
        q, k, v = (None if t is None else _cuda_operand(t, t.shape[-1]) for t in (q, k, v))
    batch, seqlen_q, heads_q, d = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)
    q_rotated = None if rotary_cos is None else torch.empty(q.shape, dtype=q.dtype,
                                                            device=q.device)
    threads = max(1, torch.get_num_threads())
    stream = stream_of(q.device)
    # the CUDA forward's decode path sizes its split records by the cache's capacity
    capacity = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
    size = _C.attention_workspace_bytes(q.device.type == "cuda", d, False, threads, heads_q,
                                        batch, batch * seqlen_q, k_cache.shape[2], seqlen_q,
                                        capacity)
    workspace = scratch_workspace(q.device, stream, size, may_keep(q.device))
    _C.attention_kvcache_forward(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx,
                                 block_table, alibi_slopes, sinks, rotary_cos, rotary_sin,
                                 q_rotated,
                                 out, lse, workspace, softmax_scale, softcap, window_left,
                                 window_right, int(rotary_interleaved), threads, variant, stream)
    return out, lse


@torch.library.custom_op("lutflash::flash_attention_with_kvcache",
                         mutates_args=("k_cache", "v_cache"))
def _kvcache_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                k: torch.Tensor | None, v: torch.Tensor | None, cache_seqlens: torch.Tensor,
                cache_batch_idx: torch.Tensor | None, block_table: torch.Tensor | None,
                softmax_scale: float, softcap: float, window_left: int, window_right: int,
                alibi_slopes: torch.Tensor | None, rotary_cos: torch.Tensor | None,
                rotary_sin: torch.Tensor | None, rotary_interleaved: bool,
                sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table,
                    softmax_scale, softcap, window_left, window_right, alibi_slopes, rotary_cos,
                    rotary_sin, rotary_interleaved, sinks)


@_kvcache_op.register_fake
def _(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, softmax_scale,
      softcap, window_left, window_right, alibi_slopes, rotary_cos, rotary_sin,
      rotary_interleaved, sinks=None):
    batch, seqlen_q, heads_q, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32)


# ------------------------------------------------------------------------------------------
# Public API: checks in the caller's terms (the C layer checks everything again, the values
# of CPU index tensors too).

def _check_tensor(name: str, t, q: torch.Tensor | None, ndim: int, dtypes, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        expected = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name}: expected dtype {expected}, got {t.dtype}")
    if t.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {what}, got shape {tuple(t.shape)}")
    if q is not None and t.device != q.device:
        raise ValueError(f"{name}: expected a tensor on {q.device} (the device of q), got "
                         f"{t.device}")


def _check_shape(name: str, t: torch.Tensor, shape: tuple, what: str) -> None:
    if any(want is not None and got != want for got, want in zip(t.shape, shape, strict=True)):
        expected = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name}: expected shape ({expected}) {what}, got {tuple(t.shape)}")


def _check_tensors(q, k_cache, v_cache, k, v, cache_batch_idx, block_table, rotary_cos,
                   rotary_sin) -> None:
    _check_tensor("q", q, None, 4, FLOAT_DTYPES, "(batch, seqlen, heads, head_dim)")
    paged = block_table is not None
    layout = "(num_pages, page_size, heads_kv, head_dim)" if paged else \
        "(batch_cache, seqlen_cache, heads_kv, head_dim)"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, t, q, 4, (q.dtype,), layout)
    batch, _, heads_q, d = q.shape
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q: expected a head dim in [1, {MAX_HEAD_DIM}], got {d}")
    heads_kv = k_cache.shape[2]
    if heads_kv < 1 or heads_q % heads_kv:
        raise ValueError(f"k_cache: expected a number of kv heads that divides the {heads_q} "
                         f"query heads of q, got {heads_kv}")
    _check_shape("k_cache", k_cache, (None, None, heads_kv, d), layout)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: expected shape {tuple(k_cache.shape)} (the shape of "
                         f"k_cache), got {tuple(v_cache.shape)}")
    if (k is None) != (v is None):
        raise ValueError("v: expected k and v both given or both None")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            _check_tensor(name, t, q, 4, (q.dtype,), "(batch, seqlen_new, heads_kv, head_dim)")
        _check_shape("k", k, (batch, None, heads_kv, d), "(batch, seqlen_new, heads_kv, "
                     "head_dim), like q's batch and k_cache's heads")
        if v.shape != k.shape:
            raise ValueError(f"v: expected shape {tuple(k.shape)} (the shape of k), got "
                             f"{tuple(v.shape)}")
    if paged:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx: expected None with block_table (a paged cache's "
                             "rows are chosen by block_table)")
        _check_tensor("block_table", block_table, q, 2, (torch.int32,), "(batch, max_pages)")
        _check_shape("block_table", block_table, (batch, None), "(batch, max_pages)")
        if k_cache.shape[1] < 1:
            raise ValueError("k_cache: expected pages of at least one row, got page_size 0")
        if block_table.shape[1] * k_cache.shape[1] > _INT32_MAX:
            raise ValueError(f"block_table: {block_table.shape[1]} pages of {k_cache.shape[1]} "
                             f"rows per sequence exceed 2^31 - 1 keys")
    elif cache_batch_idx is not None:
        _check_tensor("cache_batch_idx", cache_batch_idx, q, 1, (torch.int32,), "(batch,)")
        _check_shape("cache_batch_idx", cache_batch_idx, (batch,), "(batch,)")
    elif k_cache.shape[0] != batch:
        raise ValueError(f"k_cache: expected batch {batch} (the batch of q) without "
                         f"cache_batch_idx, got {k_cache.shape[0]}")
    if not paged and k_cache.shape[1] > _INT32_MAX:
        raise ValueError(f"k_cache: sequence lengths above 2^31 - 1 are not supported, got "
                         f"{k_cache.shape[1]}")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_sin: expected rotary_cos and rotary_sin both given or both None")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos: rotary embeddings apply to new keys: expected k and v")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            _check_tensor(name, t, q, 2, (q.dtype,), "(seqlen_ro, rotary_dim / 2)")
        if not 1 <= rotary_cos.shape[1] <= d // 2:
            raise ValueError(f"rotary_cos: expected rotary_dim / 2 columns with 2 <= rotary_dim "
                             f"<= {d} (the head dim), got {rotary_cos.shape[1]} columns")
        if rotary_sin.shape != rotary_cos.shape:
            raise ValueError(f"rotary_sin: expected shape {tuple(rotary_cos.shape)} (the shape of "
                             f"rotary_cos), got {tuple(rotary_sin.shape)}")


def _cache_seqlens(cache_seqlens, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        if not 0 <= cache_seqlens <= _INT32_MAX:
            raise ValueError(f"cache_seqlens: expected an int in [0, 2^31 - 1], got "
                             f"{cache_seqlens}")
        return torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens: expected an int32 tensor (batch,) or an int, got "
                        f"{type(cache_seqlens).__name__}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens: expected dtype int32, got {cache_seqlens.dtype}")
    if cache_seqlens.shape != (batch,):
        raise ValueError(f"cache_seqlens: expected shape ({batch},) (the batch of q), got "
                         f"{tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens: expected a tensor on {device} (the device of q), got "
                         f"{cache_seqlens.device}")
    return cache_seqlens.contiguous()


def flash_attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 k: torch.Tensor | None = None, v: torch.Tensor | None = None, *,
                                 cache_seqlens: torch.Tensor | int,
                                 cache_batch_idx: torch.Tensor | None = None,
                                 block_table: torch.Tensor | None = None, causal: bool = False,
                                 window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                                 alibi_slopes: torch.Tensor | None = None,
                                 softmax_scale: float | None = None,
                                 rotary_cos: torch.Tensor | None = None,
                                 rotary_sin: torch.Tensor | None = None,
                                 rotary_interleaved: bool = False, return_lse: bool = False,
                                 sinks: torch.Tensor | None = None):
    """Exact attention of q over a KV cache, after appending k and v to it in place.

    q: (B, Sq, Hq, D), float32, float16 or bfloat16, D in [1, 256]. The caches k_cache and
    v_cache (of q's dtype and device) are either dense, (B_cache, S_cache, Hkv, D), or paged,
    (num_pages, page_size, Hkv, D) with ``block_table`` given; Hq % Hkv == 0 (query head h reads
    kv head h // (Hq / Hkv)). Their last dimension must be contiguous and their rows must not
    overlap (any other strides: a slice of a bigger buffer works); they are never copied.
    Paged k_cache and v_cache may be two views of one buffer (transformers' paged cache passes
    a layer's alternating K and V pages as v_cache[p] = k_cache[p + 1]): only the pages the
    block table names are read or written, and those must not coincide between K and V.

    cache_seqlens: int32 (B,), or an int for every sequence: how many keys the cache of
    sequence b holds before this call. k, v (optional, both or neither): (B, Sn, Hkv, D), the
    new keys and values, written IN PLACE into the caches at rows cache_seqlens[b] ..
    cache_seqlens[b] + Sn - 1 before attending (cache_seqlens itself is not changed: add Sn
    for the next step). Sequence b then attends to its first L_b = cache_seqlens[b] + Sn keys,
    which must fit in the cache: L_b <= S_cache, or <= max_pages · page_size when paged.

    cache_batch_idx: int32 (B,), the cache row of sequence b (default: row b, and then
    B_cache must equal B); rows may repeat when nothing is appended. Not combined with
    block_table. block_table: int32 (B, max_pages); key j of sequence b is row j % page_size
    of page block_table[b, j // page_size]; page_size is any number >= 1, pages may be
    shared and in any order; entries past a sequence's last key are never read (any value).

    causal: query i sees key j iff j <= i + L_b - Sq (bottom-right aligned on the valid
    length). window (left, right): j in [i + L_b - Sq - left, i + L_b - Sq + right], -1
    unbounded; combined with causal, right becomes 0. softcap c > 0: s = c·tanh(s/c).
    alibi_slopes (Hq,) or (B, Hq) float32: s -= slope·|i + L_b - Sq - j|. softmax_scale
    defaults to 1/sqrt(D). sinks (Hq,) float32: attention sinks as in flash_attention. A query
    row that sees no key (L_b = 0, or Sq > L_b under causal) gives 0 and lse = -inf (the
    sink, with sinks). No dropout.

    rotary_cos, rotary_sin (only with k and v): (seqlen_ro, rotary_dim / 2) of q's dtype,
    rotary_dim <= D. The first rotary_dim features of each new key are rotated at its position
    cache_seqlens[b] + i before it is written, and those of q at cache_seqlens[b] + i when
    causal or windowed, else all at cache_seqlens[b] (flash-attn's convention); pairs
    (t, t + rotary_dim/2), or (2t, 2t + 1) when rotary_interleaved. Computed in float32,
    rounded once to the dtype; q itself is not changed (the rotated copy is attended).
    seqlen_ro must cover every position used.

    Values: on the CPU, cache_seqlens, cache_batch_idx and block_table are checked (ValueError
    naming the argument). On CUDA they are not read by the host (no synchronization, CUDA
    graph capturable): out-of-range values are clamped by the kernels, never followed out of
    the tensors. CUDA tensors: float16 and bfloat16, D a multiple of 8, cache rows 16-byte
    aligned (the caches cannot be padded or copied).

    Not differentiable: raises RuntimeError if q, k, v or a cache requires grad while grad
    mode is on (call it under torch.no_grad() or torch.inference_mode()). Traced by
    torch.compile (fullgraph) as the custom op ``lutflash::flash_attention_with_kvcache``,
    which mutates k_cache and v_cache.

    Returns out (B, Sq, Hq, D) in q's dtype, or (out, lse) with lse (B, Hq, Sq) float32 when
    return_lse.
    """
    _check_tensors(q, k_cache, v_cache, k, v, cache_batch_idx, block_table, rotary_cos,
                   rotary_sin)
    if torch.is_grad_enabled():
        for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
            if t is not None and t.requires_grad:
                raise RuntimeError(f"{name}: flash_attention_with_kvcache is not differentiable "
                                   "(an inference entry point); call it under torch.no_grad() "
                                   "or pass tensors that do not require grad")
    batch = q.shape[0]
    scale, softcap, left, right, alibi_slopes = _check_options(
        q, batch, causal, softmax_scale, window, softcap, alibi_slopes, 0.0, None, None, False,
        return_lse)[:5]
    sinks = check_sinks(sinks, q)
    if not isinstance(rotary_interleaved, bool):
        raise TypeError(f"rotary_interleaved: expected a bool, got "
                        f"{type(rotary_interleaved).__name__}")
    if q.device.type == "cuda" and q.shape[-1] % 8:
        raise ValueError(f"k_cache: the CUDA kernels need a head dim that is a multiple of 8 "
                         f"(the caches are written in place, so they cannot be padded), got "
                         f"{q.shape[-1]}")
    cache_seqlens = _cache_seqlens(cache_seqlens, batch, q.device)
    q, k, v = (None if t is None else _inner_contiguous(t) for t in (q, k, v))
    cache_batch_idx, block_table, rotary_cos, rotary_sin = (
        None if t is None else t.contiguous()
        for t in (cache_batch_idx, block_table, rotary_cos, rotary_sin))
    args = (q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, scale,
            softcap, left, right, alibi_slopes, rotary_cos, rotary_sin, rotary_interleaved, sinks)
    if direct_call(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table,
                   alibi_slopes, rotary_cos, rotary_sin, sinks):  # the kernel, no dispatcher
        out, lse = _forward(*args)
    else:
        out, lse = _kvcache_op(*args)
    return (out, lse) if return_lse else out
