"""Helpers for numerical checks of lutflash's kernels: random packed weights, float64
references and the tolerance rule of DESIGN.md ("Numerical checks")."""

from __future__ import annotations

import math
import sys

import torch

from .bcq import MODES, WORD_K, BCQWeight, meta_per_group, padded_rows, words_per_row


def random_bcq_weight(n: int, k: int, bits: int, group_size: int | None = 128,
                      mode: str = "general", meta_dtype: torch.dtype = torch.float32,
                      device="cpu", generator: torch.Generator | None = None) -> BCQWeight:
    """A BCQ weight with random codes, alphas and offsets (padding bits and rows zero)."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    group_size = k if group_size is None else group_size
    rows, words = padded_rows(n), words_per_row(k)
    planes = torch.randint(-2**31, 2**31, (words, bits, rows), dtype=torch.int64,
                           generator=generator).to(torch.int32)
    planes[:, :, n:] = 0
    tail = k - (words - 1) * WORD_K
    if tail < WORD_K:
        planes[-1] &= (1 << tail) - 1
    groups, per_group = k // group_size, meta_per_group(bits, mode)
    meta = torch.rand((groups, per_group, rows), generator=generator) * 0.9 + 0.1
    if mode == "general":  # decreasing alphas like a greedy quantizer's
        meta[:, :bits] *= torch.pow(0.5, torch.arange(bits, dtype=torch.float32))[None, :, None]
    meta[:, -1] = torch.randn((groups, rows), generator=generator) * 0.1
    meta[:, :, n:] = 0
    return BCQWeight(planes, meta.to(meta_dtype), (n, k), bits, group_size, mode).to(device)


def random_lut_linear(like: torch.nn.Linear, bits: int, *, group_size: int = 128,
                      meta_dtype: torch.dtype = torch.float16, meta_scale: float = 0.02,
                      generator: torch.Generator | None = None):
    """A frozen LutLinear of `like`'s shape, device and bias with a random uniform-mode packed
    weight (random_bcq_weight), its metadata scaled by `meta_scale` so the dequantized weight
    has about a trained layer's magnitude: for benchmarks, where speed does not depend on the
    values and quantizing the dense weight would only cost time."""
    from .nn import LutLinear

    qweight = random_bcq_weight(like.out_features, like.in_features, bits, group_size, "uniform",
                                generator=generator)
    qweight.meta.mul_(meta_scale)
    bias = None if like.bias is None else like.bias.detach()
    return LutLinear.from_bcq(qweight.to(like.weight.device, meta_dtype=meta_dtype),
                              bias).requires_grad_(False)


def lutgemm_reference(x: torch.Tensor, qweight: BCQWeight, bias: torch.Tensor | None = None):
    """x · Ŵᵀ + bias in float64 on the CPU."""
    weight = qweight.to("cpu").dequantize(torch.float64)
    out = x.detach().to("cpu", torch.float64) @ weight.t()
    if bias is not None:
        out = out + bias.detach().to("cpu", torch.float64)
    return out


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    if not torch.isfinite(out64).all():
        return float("inf")
    return (torch.linalg.vector_norm(out64 - ref64) /
            torch.linalg.vector_norm(ref64).clamp_min(1e-30)).item()


def max_abs_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    if not torch.isfinite(out64).all():
        return float("inf")
    return (out64 - ref64).abs().max().item() if out64.numel() else 0.0


def assert_close_to_reference(out, ref, naive=None, *, fp32_rtol: float = 1e-5,
                              floor: float = 1e-4, factor: float = 2.0) -> None:
    """DESIGN.md's rule: float32 outputs within fp32_rtol relative (norm) error of the float64
    reference; float16/bfloat16 outputs with max error at most `factor` × the max error of
    `naive` (the same computation done naively in that precision) + `floor` × max |ref|."""
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if out.dtype == torch.float32 or naive is None:
        err = relative_error(out, ref)
        assert err < fp32_rtol, f"relative error {err:.3g} >= {fp32_rtol:.3g}"
        return
    err, naive_err = max_abs_error(out, ref), max_abs_error(naive, ref)
    scale = ref.abs().max().item() if ref.numel() else 0.0
    bound = factor * naive_err + floor * scale
    assert err <= bound, f"max error {err:.3g} > {factor} x naive {naive_err:.3g} + floor"


# Attention: Philox4x32-10 (the dropout contract of csrc/philox.h) and naive attention.


PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF


def philox4x32_10(counter, key0, key1):
    """counter: four int64 tensors holding uint32 values; int64 products wrap modulo 2^64, so
    their low 64 bits are the exact unsigned products."""
    c0, c1, c2, c3 = counter
    for _ in range(10):
        p0, p1 = c0 * PHILOX_M0, c2 * PHILOX_M1
        hi0, lo0 = (p0 >> 32) & MASK32, p0 & MASK32
        hi1, lo1 = (p1 >> 32) & MASK32, p1 & MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ key0, lo1, hi0 ^ c3 ^ key1, lo0
        key0, key1 = (key0 + PHILOX_W0) & MASK32, (key1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def dropout_keep(seed, offset, batch, heads, seqlen_q, seqlen_k, p):
    """(batch, heads, Sq, Sk) bool: the contract of csrc/philox.h."""
    b = torch.arange(batch).view(-1, 1, 1, 1)
    h = torch.arange(heads).view(1, -1, 1, 1)
    i = torch.arange(seqlen_q).view(1, 1, -1, 1)
    j = torch.arange(seqlen_k).view(1, 1, 1, -1)
    shape = (batch, heads, seqlen_q, seqlen_k)
    counter = [(j >> 2).expand(shape), i.expand(shape), (b * heads + h).expand(shape),
               torch.full(shape, offset & MASK32, dtype=torch.int64)]
    words = torch.stack(philox4x32_10(counter, seed & MASK32, (seed >> 32) & MASK32), -1)
    word = words.gather(-1, (j & 3).expand(shape).unsqueeze(-1)).squeeze(-1)
    threshold = min(int(p * 4294967296.0), MASK32)
    return word >= threshold


def attention_reference(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0,
                        alibi=None, keep=None, dropout_p=0.0, sinks=None):
    """Naive attention in q's dtype and on q's device, on (B, S, H, D) tensors; returns (out,
    lse). Float64 inputs make it the reference of DESIGN.md; inputs in a low precision make it
    the naive computation whose error sets the tolerance. keep: the dropout mask (B, Hq, Sq, Sk)
    of `dropout_keep`. sinks (Hq,): one more logit per head in every row's softmax, with no
    value (differentiable here, for reference gradients)."""
    batch, seqlen_q, heads_q, d = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = k.repeat_interleave(heads_q // heads_kv, dim=2)
    v = v.repeat_interleave(heads_q // heads_kv, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(seqlen_q, device=q.device).view(-1, 1)
    j = torch.arange(seqlen_k, device=q.device).view(1, -1)
    diagonal = i + seqlen_k - seqlen_q
    if alibi is not None:
        slopes = alibi.to(s.dtype).view(-1 if alibi.ndim == 2 else 1, heads_q, 1, 1)
        s = s - slopes * (diagonal - j).abs().to(s.dtype)
    left, right = window
    if causal:
        right = 0
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if left >= 0:
        visible &= j >= diagonal - left
    if right >= 0:
        visible &= j <= diagonal + right
    s = s.masked_fill(~visible, -math.inf)
    if sinks is not None:
        sink = sinks.to(s.dtype).view(1, heads_q, 1, 1).expand(batch, heads_q, seqlen_q, 1)
        lse = torch.logsumexp(torch.cat((s, sink), dim=-1), dim=-1)
        probs = torch.exp(s - lse.unsqueeze(-1))
    else:
        lse = torch.logsumexp(s, dim=-1)
        seen = visible.any(-1).view(1, 1, -1, 1)
        probs = torch.softmax(torch.where(seen, s, 0.0), dim=-1) * seen
    if keep is not None:
        probs = probs * keep.to(probs.device) / (1.0 - dropout_p)
    out = torch.einsum("bhij,bjhd->bihd", probs, v)
    return out, lse


def poisoned_empty(monkeypatch, workspaces: bool = False):
    """Makes torch.empty return NaN-filled float tensors while `monkeypatch` (pytest's fixture
    or pytest.MonkeyPatch.context()) is active, so that an output element a kernel forgets to
    write fails the comparison. With `workspaces`, uint8 tensors (the byte workspaces) are
    filled with 0xff too, float32 NaN wherever a kernel reads them as floats (lutgemm's kept
    scratch workspaces are replaced by poisoned ones)."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(math.nan)
        elif workspaces and t.dtype == torch.uint8:
            t.fill_(255)
        return t

    monkeypatch.setattr(torch, "empty", empty)
    if workspaces:  # the ops' kept scratch workspaces are made again, poisoned, on first use
        monkeypatch.setattr(sys.modules["lutflash._runtime"], "_scratch_workspaces", {})
