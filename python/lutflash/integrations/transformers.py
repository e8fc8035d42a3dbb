"""Hugging Face transformers integration: attn_implementation="lutflash".

Importing this module (which lutflash does by itself as soon as transformers is imported) runs
`register()`, which adds "lutflash" to

- `AttentionInterface`: `lutflash_attention_forward`, which runs lutflash.flash_attention, and
- `AttentionMaskInterface`: transformers' own mask builder for flash attention, so the attention
  function receives a 2-D (batch, kv_length) boolean padding mask, or None when nothing is padded.

so that `from_pretrained(..., attn_implementation="lutflash")`, `from_config(...)` and
`model.set_attn_implementation("lutflash")` work for every model built on `AttentionInterface`.

Padding never reaches the kernel: padded keys are removed (and, for causal or windowed attention,
padded queries too) and the ragged batch goes through flash_attention_varlen, which keeps every
sequence to itself. Causal attention is bottom-right aligned, which is what a KV cache needs.

KV caches (transformers 5.x): the unused rows of a static cache are never attended (with no mask,
one flash_attention_with_kvcache call per layer on the cache as it lies: lutflash_attention_mask,
_attention_prefix); continuous batching (generate_batch) keeps "lutflash", and its decode steps
over the paged cache are one paged flash_attention_with_kvcache call per layer (_attention_paged),
a path transformers offers only to flash-attn 2/3 on CUDA/XPU and that importing lutflash opens to
"lutflash" on every device (_hook_decode_fast_path).

Supported transformers versions are 4.57 and 5.x. What differs between them is handled by looking
at what arrives (or at what transformers defines), never at its version string:

- Models whose mask code predates `AttentionMaskInterface` (OPT, GPT-J, ... in 4.x) build their own
  4-D causal + padding mask for any implementation not named "flash_attention_2". A 4-D mask that
  is exactly a padding mask (causal or not) is reduced to the 2-D one; any other 4-D mask is refused.
- Some models compute `is_causal` the SDPA way, as `attention_mask is None and ...` (GPT-2 in 4.x),
  so they pass is_causal=False next to a 2-D padding mask, which cannot carry the causal structure
  itself. A module that declares `is_causal = True` is then attended causally, as it must be.
- transformers' flash-attention loader returns 4 functions in 4.x and 5 (with the paged-cache one)
  in 5.x; the "lutflash" answer matches what the installed loader returns.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from transformers import modeling_flash_attention_utils as _hf_flash_utils
from transformers.masking_utils import (AttentionMaskInterface, causal_mask_function,
                                        flash_attention_mask)
from transformers.modeling_utils import AttentionInterface
from transformers.utils import logging

from ..attention import flash_attention, flash_attention_varlen
from ..kvcache import flash_attention_with_kvcache

__all__ = ["NAME", "lutflash_attention_forward", "lutflash_attention_mask", "register",
           "use_lutflash_rotary"]

NAME = "lutflash"

logger = logging.get_logger(__name__)


def lutflash_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention function transformers calls for attn_implementation="lutflash".

    query (B, Hq, Sq, D), key and value (B, Hkv, Sk, D) with Hq a multiple of Hkv (GQA);
    attention_mask a (B, Sk) padding mask (True or 1 = a real token) or None. Returns the output
    (B, Sq, Hq, Dv) and None for the attention weights, which are never materialized.

    scaling defaults to 1/sqrt(D); dropout is what the model passes (0 outside training);
    sliding_window w lets a query see the w keys ending at its own position (w - 1 back);
    softcap c > 0 caps scores as c·tanh(s/c); is_causal defaults to `module.is_causal`.
    s_aux (Hq,): attention sinks (gpt-oss), one logit per query head in every row's softmax
    denominator, differentiable (lutflash.flash_attention's sinks).
    Packed sequences (batch 1, several sequences side by side) are kept apart either from
    `cu_seq_lens_q/k` and `max_length_q/k` keyword arguments or, failing those, from position_ids
    that restart. With `block_table`, `k_cache` and `v_cache` keyword arguments (the decode fast
    path of transformers' continuous batching) key and value are the new token of each sequence,
    which the kernel appends to the paged cache before attending (_attention_paged).
    """
    if kwargs.get("output_attentions", False):
        logger.warning_once('attn_implementation="lutflash" does not return attention weights '
                            '(output_attentions=True); use "eager" to get them')

    declared_causal = getattr(module, "is_causal", None)
    causal = bool(is_causal if is_causal is not None
                  else (declared_causal if declared_causal is not None else True))
    if attention_mask is not None and attention_mask.dim() == 4:
        reduced = _padding_mask_from_4d(attention_mask, query.shape[0], query.shape[2])
        if reduced is None:
            raise ValueError(
                'attn_implementation="lutflash" takes a 2-D (batch, kv_length) padding mask, or a '
                "4-D one that is exactly a padding mask (causal or not); got a 4-D attention_mask "
                f"of shape {tuple(attention_mask.shape)} that is not: models or inputs with custom "
                '4-D masks need "eager" or "sdpa"')
        attention_mask, causal = reduced  # the 4-D mask says whether attention is causal
    elif attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            'attn_implementation="lutflash" takes a 2-D (batch, kv_length) padding mask, got a '
            f"{attention_mask.dim()}-D attention_mask of shape {tuple(attention_mask.shape)}: "
            'models or inputs with custom 4-D masks need "eager" or "sdpa"')
    elif attention_mask is not None and not causal and declared_causal is True:
        # SDPA-style is_causal (False because a mask is passed, e.g. GPT-2 in transformers 4.x):
        # a 2-D padding mask holds no causal structure, so the module's own declaration holds.
        causal = True

    options = {
        "causal": causal,
        "softmax_scale": float(scaling) if scaling is not None else None,
        "window": _window(sliding_window, causal),
        "softcap": float(softcap) if softcap else 0.0,
        "dropout_p": float(dropout),
        # attention sinks (gpt-oss): one logit per query head, in float32 for the kernels (the
        # cast keeps the parameter's gradient)
        "sinks": None if s_aux is None else s_aux.float(),
    }

    # (B, H, S, D) -> (B, S, H, D): a view whose last dimension stays contiguous.
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if kwargs.get("block_table") is not None:
        return _attention_paged(q, k, v, kwargs, options), None
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    if value_dim < head_dim:  # e.g. MLA: the kernel wants one head dim, so pad v and crop below
        v = F.pad(v, (0, head_dim - value_dim))
    elif value_dim > head_dim:
        raise ValueError(f"value head dim {value_dim} is larger than the query/key head dim "
                         f"{head_dim}; lutflash needs value_dim <= head_dim")

    prefix_lengths = _prefix_lengths(attention_mask, k.shape[1])
    if prefix_lengths is not None:
        out = _attention_prefix(q, k, v, prefix_lengths, attention_mask, options)
    elif attention_mask is not None:
        out = _attention_padded(q, k, v, attention_mask, options)
    else:
        segments = _packed_segments(q, k, kwargs)
        if segments is not None:
            out = _attention_packed(q, k, v, segments, options)
        else:
            out = flash_attention(q, k, v, **options)
    return out[..., :value_dim], None


def _window(sliding_window: int | None, causal: bool) -> tuple[int, int]:
    """transformers' sliding_window w counts the query's own position: a causal query sees keys
    j with i - j < w, a bidirectional one |i - j| < w. lutflash's window is (left, right)."""
    if sliding_window is None or sliding_window <= 0:
        return (-1, -1)
    return (sliding_window - 1, 0 if causal else sliding_window - 1)


# The 4-D mask of the last call and its reduction: a model passes the same mask to every layer.
_reduced_4d_cache: tuple | None = None


def _padding_mask_from_4d(mask: torch.Tensor, batch: int, q_len: int):
    """(padding mask (B, Sk) or None when nothing is padded, causal) when the 4-D mask
    (B or 1, H or 1, Sq, Sk), boolean (True = attend) or additive (0 = attend, a large negative
    value = masked), is exactly key padding, with or without a bottom-right causal pattern (the
    masks that transformers 4.x models build themselves). None when it is anything else."""
    global _reduced_4d_cache
    version = _version(mask)
    cached = _reduced_4d_cache
    if (cached is not None and version is not None and cached[0]() is mask
            and cached[1] == version and cached[2] == (batch, q_len)):
        return cached[3]

    result = None
    if mask.shape[0] in (1, batch) and mask.shape[2] == q_len:
        if mask.dtype == torch.bool:
            allowed = mask
        elif mask.is_floating_point():
            allowed = mask == 0
            # additive masks hold 0 or a "minus infinity": finfo.min, -inf, or an older -1e4
            if not bool((allowed | (mask <= -1e4)).all()):
                allowed = None
        else:
            allowed = None
        if allowed is not None:
            k_len = mask.shape[3]
            # The last query sees every real key under bottom-right causal attention too.
            keys = allowed[:, 0, -1, :].expand(batch, k_len)
            key_pattern = keys[:, None, None, :]
            rows = torch.arange(q_len, device=mask.device)[:, None] + (k_len - q_len)
            causal = torch.arange(k_len, device=mask.device)[None, :] <= rows
            for is_causal, expected in ((True, key_pattern & causal), (False, key_pattern)):
                if bool((allowed == expected).all()):
                    result = (None if bool(keys.all()) else keys.contiguous(), is_causal)
                    break

    _reduced_4d_cache = None if version is None else (weakref.ref(mask), version, (batch, q_len),
                                                      result)
    return result


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place modification counter; None for an inference tensor (it has none)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _unpad_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For a (B, S) mask: the flat indices of its real tokens, cu_seqlens (int32, B + 1) and
    the longest sequence length."""
    lengths = mask.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten()).flatten()
    cu_seqlens = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    return indices, cu_seqlens, int(lengths.max())


# Static caches (StaticCache: the k/v tensors of a layer are max_cache_len long, or the window
# for a sliding-window layer, and only the first L = (tokens cached before) + Sq are real until
# they fill). When the model passes no 2-D attention mask, the mask transformers asks "lutflash"
# for (lutflash_attention_mask) is exactly "the first L keys of every sequence", with L known on
# the device only for full layers (a tensor, so that a step can be captured in a CUDA graph or
# compiled) and as an int for sliding ones. Those masks are remembered here (weak references to
# the mask tensors with their lengths; a model builds one per kind of layer, full and sliding,
# for each forward) so that the attention function recognizes them by identity and attends to the
# first L keys without reading L on the host: _attention_prefix, one flash_attention_with_kvcache
# call on the cache as it lies. Every other mask takes the unpadding path, which reads lengths on
# the host (a synchronization on a GPU).
_prefix_masks: list[tuple] = []  # (weakref to the mask, lengths), most recent first
_PREFIX_MASKS_KEPT = 4


def lutflash_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0,
                            kv_offset=0, mask_function=causal_mask_function,
                            attention_mask: torch.Tensor | None = None, **kwargs):
    """The mask builder registered for "lutflash" in transformers' AttentionMaskInterface.

    transformers' own flash-attention mask (a (B, kv_length) padding mask, or None when nothing is
    padded), except for a layer of a static cache with no padding mask (attention_mask None, keys
    from the first on (kv_offset 0) and more of them than seen so far: kv_length > q_offset +
    q_length, or a tensor q_offset, which StaticCache's full layers give): then a (B, kv_length)
    boolean mask whose first q_offset + q_length columns are True, built on the device without
    reading q_offset, and marked as a prefix mask for lutflash_attention_forward. The prefix mask
    only says which keys exist; among them the pattern is the attention function's (causal and
    sliding window from the module), as it is when transformers' own mask is None.
    """
    static = (isinstance(q_offset, torch.Tensor)
              or (isinstance(q_offset, int) and q_offset + q_length < kv_length))
    if attention_mask is None and static and isinstance(kv_offset, int) and kv_offset == 0:
        global _prefix_masks
        if isinstance(q_offset, torch.Tensor):  # (B,) int32 on the device: the kernel's cache_seqlens
            lengths = (q_offset.to(torch.int32).reshape(-1) + q_length).expand(batch_size)
            lengths = lengths.contiguous()
            device = lengths.device
        else:
            lengths = q_offset + q_length
            device = kwargs.get("device")
        positions = torch.arange(kv_length, device=device)[None, :]
        mask = positions < (lengths[:, None] if isinstance(lengths, torch.Tensor) else lengths)
        mask = mask.expand(batch_size, kv_length)
        alive = [entry for entry in _prefix_masks if entry[0]() is not None]
        _prefix_masks = [(weakref.ref(mask), lengths)] + alive[:_PREFIX_MASKS_KEPT - 1]
        return mask
    return flash_attention_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                                mask_function, attention_mask, **kwargs)


def _prefix_lengths(mask, k_len: int) -> torch.Tensor | int | None:
    """The per-sequence key lengths ((B,) int32, or one int for all) when `mask` is one of the
    prefix masks lutflash_attention_mask built last and covers all k_len keys; None otherwise."""
    if mask is None or mask.dim() != 2 or mask.shape[1] != k_len:
        return None
    for reference, lengths in _prefix_masks:
        if reference() is mask:
            return lengths
    return None


def _attention_prefix(q, k, v, lengths, mask, options):
    """Attention of q (B, Sq, Hq, D) to the first lengths[b] keys of k and v (B, Sk, Hkv, D),
    the queries being the last Sq of those keys: one flash_attention_with_kvcache call that reads
    the keys where they lie (transformers' (B, Hkv, Sk, D) cache tensors, seen as (B, Sk, Hkv, D))
    and stops at lengths[b], with no host synchronization (CUDA-graph capturable). That call has no
    dropout and no backward pass: a training step (dropout, or gradients to compute) unpads with
    the mask instead."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if options["dropout_p"] > 0 or needs_grad:
        return _attention_padded(q, k, v, mask, options, queries_at_end=False)
    return flash_attention_with_kvcache(
        q, k, v, cache_seqlens=lengths, causal=options["causal"], window=options["window"],
        softcap=options["softcap"], softmax_scale=options["softmax_scale"],
        sinks=options["sinks"])


def _attention_padded(q, k, v, mask, options, queries_at_end=True):
    """Padded batch -> ragged varlen batch -> padded output (zeros where a query was padding).

    mask covers the keys (its last Sk columns are used; a static cache can hold more keys than
    the mask, and those are dropped). Self-attention queries are the last Sq keys, so for causal
    or windowed attention the queries are unpadded with mask[:, -Sq:]; that keeps the
    bottom-right alignment exact per sequence. Full bidirectional attention (BERT, cross-attention)
    keeps every query and only removes padded keys, exactly like the eager additive mask; so does
    queries_at_end=False (a prefix mask: the queries are the last Sq of each sequence's real keys,
    which the per-sequence bottom-right alignment of the kernel finds by itself).
    """
    batch, q_len, q_heads, head_dim = q.shape
    mask = mask.to(device=q.device, dtype=torch.bool)
    if k.shape[1] > mask.shape[1]:
        k, v = k[:, : mask.shape[1]], v[:, : mask.shape[1]]
    k_len = k.shape[1]
    mask = mask[:, -k_len:]

    k_indices, cu_seqlens_k, max_seqlen_k = _unpad_indices(mask)
    k = k.reshape(batch * k_len, *k.shape[2:]).index_select(0, k_indices)
    v = v.reshape(batch * k_len, *v.shape[2:]).index_select(0, k_indices)

    if queries_at_end and (options["causal"] or options["window"] != (-1, -1)):
        q_indices, cu_seqlens_q, max_seqlen_q = _unpad_indices(mask[:, -q_len:])
        q = q.reshape(batch * q_len, q_heads, head_dim).index_select(0, q_indices)
        out = flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, **options)
        padded = out.new_zeros(batch * q_len, q_heads, out.shape[-1])
        return padded.index_copy(0, q_indices, out).view(batch, q_len, q_heads, -1)

    cu_seqlens_q = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device=q.device)
    q = q.reshape(batch * q_len, q_heads, head_dim)
    out = flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, q_len, max_seqlen_k,
                                 **options)
    return out.view(batch, q_len, q_heads, -1)


def _packed_segments(q, k, kwargs):
    """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) when several sequences are packed
    along the sequence axis, else None. Explicit cu_seq_lens_* / max_length_* keywords win;
    otherwise a batch of one whose 2-D position_ids restart (a step other than +1) is split where
    they restart, the same rule transformers uses to build packed masks for the other backends."""
    explicit = [kwargs.get(name) for name in
                ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")]
    if all(value is not None for value in explicit):
        cu_q, cu_k, max_q, max_k = explicit
        return (cu_q.to(device=q.device, dtype=torch.int32),
                cu_k.to(device=q.device, dtype=torch.int32), int(max_q), int(max_k))

    position_ids = kwargs.get("position_ids")
    seq_len = q.shape[1]
    if (position_ids is None or position_ids.dim() != 2 or q.shape[0] != 1 or seq_len < 2
            or k.shape[1] != seq_len or position_ids.shape[-1] != seq_len):
        return None
    positions = position_ids[0].to(q.device)
    starts = torch.nonzero(positions.diff() != 1).flatten() + 1
    if starts.numel() == 0:
        return None
    bounds = torch.tensor([0, seq_len], dtype=torch.int32, device=q.device)
    cu_seqlens = torch.cat((bounds[:1], starts.to(torch.int32), bounds[1:]))
    max_seqlen = int(cu_seqlens.diff().max())
    return cu_seqlens, cu_seqlens, max_seqlen, max_seqlen


def _attention_packed(q, k, v, segments, options):
    batch, q_len = q.shape[:2]
    q, k, v = (t.reshape(-1, *t.shape[2:]) for t in (q, k, v))
    out = flash_attention_varlen(q, k, v, *segments, **options)
    return out.view(batch, q_len, *out.shape[1:])


def _attention_paged(q, k, v, kwargs, options):
    """transformers' continuous-batching decode step with a block table (its "decode fast path",
    generation/continuous_batching): N sequences decode one token each, packed in a batch of one.
    q (1, N, Hq, D) and k, v (1, N, Hkv, D) are the new tokens; kwargs hold k_cache and v_cache
    (num_pages, page_size, Hkv, D), block_table (N, max_pages) int32 (-1 past a sequence's pages)
    and cu_seq_lens_k (N + 1,) int32, whose steps count each sequence's keys with the new one.
    One flash_attention_with_kvcache call appends the new keys and values to the pages at
    cache_seqlens = those counts - 1 and attends over them, with no host synchronization."""
    block_table, k_cache, v_cache = (kwargs.get(name) for name in ("block_table", "k_cache",
                                                                     "v_cache"))
    cu_seqlens_k = kwargs.get("cu_seq_lens_k")
    if k_cache is None or v_cache is None or cu_seqlens_k is None:
        raise ValueError("block_table: the paged-cache path also needs k_cache, v_cache and "
                         "cu_seq_lens_k keyword arguments")
    tokens = q.shape[1]
    if q.shape[0] != 1 or block_table.dim() != 2 or block_table.shape[0] != tokens:
        raise ValueError(
            f"block_table: expected one decoded token per sequence, q (1, N, Hq, D) and a "
            f"(N, max_pages) block table; got q {tuple(q.shape)}, block_table "
            f"{tuple(block_table.shape)}")
    if options["dropout_p"] > 0:
        raise ValueError("dropout: the paged-cache (decode) path has no dropout")
    cache_seqlens = (cu_seqlens_k[1:tokens + 1] - cu_seqlens_k[:tokens] - 1).to(torch.int32)
    # one sequence per token: (1, N, H, D) -> (N, 1, H, D), views
    q, k, v = (t.reshape(tokens, 1, *t.shape[2:]) for t in (q, k, v))
    out = flash_attention_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table,
        causal=options["causal"], window=options["window"], softcap=options["softcap"],
        softmax_scale=options["softmax_scale"], sinks=options["sinks"])
    return out.reshape(1, tokens, *out.shape[2:])


# transformers 5 treats any attn_implementation whose name contains "flash" as a flash-attention
# flavour and, when it is set, preloads the kernels for that name through
# modeling_flash_attention_utils._lazy_imports, which only knows flash-attn packages and hub
# kernels and raises for anything else. We answer that lookup for "lutflash" with flash-attn-style
# entry points over our kernels (flash_attn_func, flash_attn_varlen_func and, in 5.x,
# flash_attn_with_kvcache), so the preload succeeds and transformers code that calls its generic
# _flash_attention_forward with our name computes the right thing. transformers reads the
# keyword arguments these functions accept from their signatures (_lazy_define_process_function)
# and passes only those. transformers 4.x has the same loader (4 functions instead of 5, without
# the paged-cache one) but never asks it for "lutflash" by itself: its generic wrapper looks up
# whatever flash implementation was loaded last (lazy_import_flash_attention(name,
# force_import=True) loads one by name).


def _flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                     window_size=(-1, -1), softcap=0.0, deterministic=False):
    return flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                           window=tuple(window_size), softcap=softcap or 0.0,
                           dropout_p=dropout_p, deterministic=deterministic)


def _flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            dropout_p=0.0, softmax_scale=None, causal=False,
                            window_size=(-1, -1), softcap=0.0, deterministic=False):
    return flash_attention_varlen(q, k, v, cu_seqlens_q.to(torch.int32),
                                  cu_seqlens_k.to(torch.int32), int(max_seqlen_q),
                                  int(max_seqlen_k), causal=causal, softmax_scale=softmax_scale,
                                  window=tuple(window_size), softcap=softcap or 0.0,
                                  dropout_p=dropout_p, deterministic=deterministic)


def _flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                             cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None,
                             block_table=None, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                             alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """flash-attn's flash_attn_with_kvcache, run by lutflash.flash_attention_with_kvcache.
    cache_seqlens None means full caches; num_splits is a tuning hint lutflash does without; a
    left-padded cache (cache_leftpad) is not supported."""
    if cache_leftpad is not None:
        raise ValueError("cache_leftpad: lutflash's KV-cache attention has no left padding")
    if cache_seqlens is None:  # every cache full: S_cache keys, or max_pages pages of keys
        cache_seqlens = k_cache.shape[1] * (1 if block_table is None else block_table.shape[1])
        cache_seqlens -= 0 if k is None else k.shape[1]
    return flash_attention_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
        block_table=block_table, causal=causal, window=tuple(window_size),
        softcap=softcap or 0.0, alibi_slopes=alibi_slopes, softmax_scale=softmax_scale,
        rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved,
        return_lse=return_softmax_lse)


def _hook_flash_lazy_imports() -> None:
    original = getattr(_hf_flash_utils, "_lazy_imports", None)
    if original is None or getattr(original, "_lutflash_hook", False):
        return

    # 5.x loads flash_attn_with_kvcache (paged cache) too, and keeps it in this module global.
    with_kvcache = hasattr(_hf_flash_utils, "_flash_with_kvcache_fn")

    def _lazy_imports(implementation, *args, **kwargs):
        if implementation == NAME:
            pad, unpad = _hf_flash_utils._pad_input, _hf_flash_utils._unpad_input
            if with_kvcache:
                return (_flash_attn_func, _flash_attn_varlen_func, _flash_attn_with_kvcache, pad,
                        unpad)
            return _flash_attn_func, _flash_attn_varlen_func, pad, unpad
        return original(implementation, *args, **kwargs)

    _lazy_imports._lutflash_hook = True
    _hf_flash_utils._lazy_imports = _lazy_imports


# transformers' continuous batching (generate_batch and its manager, 5.x) decodes with a block
# table, handing the attention function its paged cache (the "decode fast path"), only for
# implementation names matching ".*flash.*[23]" on CUDA or XPU whose loader gives a
# flash_attn_with_kvcache (continuous_batching/initialization.py,
# ensure_decode_fast_path_is_available); otherwise it sets max_blocks_per_request = 0 and every
# step takes the varlen path, which first gathers each sequence's keys out of the pages. Our KV-cache
# kernel reads the pages itself on every device, so for "lutflash" the one condition kept is
# transformers' own first one: every attention type of the model has a block-table cache (full
# attention; sliding-window and compressed-latent layers have none). transformers hands the kernel
# a layer's K and V pages as two views of one buffer in which they alternate (v_cache[p] is
# k_cache[p + 1]; generation/continuous_batching/cache_allocators/full_attention.py), which
# flash_attention_with_kvcache takes with a block table.


def _hook_decode_fast_path() -> None:
    try:
        from transformers.generation.continuous_batching import initialization
    except ImportError:  # transformers 4.x, or a 5.x before this module
        return
    original = getattr(initialization, "ensure_decode_fast_path_is_available", None)
    allocators = getattr(initialization, "ATTN_TYPE_TO_ALLOCATOR", None)
    layer_groups = getattr(initialization, "group_layers_by_attn_type", None)
    if (original is None or allocators is None or layer_groups is None
            or getattr(original, "_lutflash_hook", False)):
        return

    def ensure_decode_fast_path_is_available(config, cb_config, user_requested, *args, **kwargs):
        if getattr(config, "_attn_implementation", None) != NAME:
            return original(config, cb_config, user_requested, *args, **kwargs)
        if cb_config.max_blocks_per_request != 0 and not all(
                allocators[kind].supports_block_table for kind in layer_groups(config)):
            if user_requested:
                logger.warning(f"Although max_blocks_per_request={cb_config.max_blocks_per_request}"
                               ", the decode fast path is not available: some of the model's "
                               "attention types have no block-table cache")
            cb_config.max_blocks_per_request = 0

    ensure_decode_fast_path_is_available._lutflash_hook = True
    initialization.ensure_decode_fast_path_is_available = ensure_decode_fast_path_is_available


# Modeling modules whose apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1) is Llama's
# q * cos + rotate_half(q) * sin (tests/test_transformers.py checks each, bit for bit).
ROTARY_MODULES = tuple(f"transformers.models.{name}.modeling_{name}"
                       for name in ("llama", "mistral", "qwen2", "qwen3", "gemma2"))


def _decode_rotary(original):
    """apply_rotary_pos_emb as `original` computes it, through lutflash.apply_rotary (one
    kernel for q and one for k) where that runs its CUDA kernel: one position per sequence
    (decoding), cos/sin of q's dtype. Any other call goes to `original`. The kernel rounds where
    torch does, so both give the same bits."""
    from ..decode_ops import _kernel, rotary_kernel

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if (unsqueeze_dim == 1 and q.ndim == 4 and k.ndim == 4 and cos.ndim == 3
                and q.shape[2] == 1 and k.shape[2] == 1 and cos.shape[1] == 1
                and cos.shape == sin.shape and cos.shape[0] in (1, q.shape[0])
                and cos.shape[-1] == q.shape[-1] == k.shape[-1] and q.shape[0] == k.shape[0]
                and q.dtype == k.dtype == cos.dtype == sin.dtype and _kernel(q, k, cos, sin)):
            # checked here once for both: the kernel directly (what apply_rotary runs)
            cos, sin = cos[:, 0], sin[:, 0]
            return rotary_kernel(q, cos, sin), rotary_kernel(k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.__wrapped__ = original
    apply_rotary_pos_emb._lutflash = True
    return apply_rotary_pos_emb


def use_lutflash_rotary(model: torch.nn.Module) -> list[str]:
    """Makes the modeling modules of `model`'s Llama-family layers (ROTARY_MODULES) compute
    their rotary embedding with lutflash.apply_rotary when decoding. This replaces the module's
    `apply_rotary_pos_emb` function, so every model of those families in the process takes
    it; the results are the same bits as transformers' own (which every other call still
    runs). Idempotent; returns the names of the modeling modules now using it."""
    import sys

    names = sorted({type(m).__module__ for m in model.modules()} & set(ROTARY_MODULES))
    for name in names:
        module = sys.modules[name]
        function = getattr(module, "apply_rotary_pos_emb", None)
        if function is not None and not getattr(function, "_lutflash", False):
            module.apply_rotary_pos_emb = _decode_rotary(function)
    return names


# transformers treats every name with "flash" in it as a flash-attention request, and a model that
# lists its own `_compatible_flash_implementations` (gpt-oss: hub kernels with attention sinks)
# swaps any other flash name for the first of those. lutflash covers what those models need
# (sinks, windows, softcap), so a request for it is kept: the model instance's list gains NAME
# before transformers checks it.
def _hook_compatible_flash_implementations() -> None:
    from transformers.modeling_utils import PreTrainedModel

    original = getattr(PreTrainedModel, "_check_and_adjust_attn_implementation", None)
    if original is None or getattr(original, "_lutflash_hook", False):
        return

    @functools.wraps(original)
    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        compatible = getattr(self, "_compatible_flash_implementations", None)
        if attn_implementation == NAME and compatible is not None and NAME not in compatible:
            self._compatible_flash_implementations = [*compatible, NAME]
        return original(self, attn_implementation, *args, **kwargs)

    _check_and_adjust_attn_implementation._lutflash_hook = True
    PreTrainedModel._check_and_adjust_attn_implementation = _check_and_adjust_attn_implementation


def register() -> None:
    """Registers attn_implementation="lutflash" and quant_method "lutflash" (hf_quantizer.py)
    with transformers. Idempotent."""
    AttentionInterface.register(NAME, lutflash_attention_forward)
    AttentionMaskInterface.register(NAME, lutflash_attention_mask)
    _hook_flash_lazy_imports()
    _hook_decode_fast_path()
    _hook_compatible_flash_implementations()
    try:
        from . import hf_quantizer
    except ImportError:  # transformers 4.x: no weight-conversion API, no quantization_config
        return
    hf_quantizer.register()


register()
