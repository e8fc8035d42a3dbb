"""Helpers for numerical checks of lutflash's kernels: random packed weights, float64
references and the tolerance rule of DESIGN.md ("Numerical checks")."""

from __future__ import annotations

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
