"""Binary-coding quantized (BCQ) weights: the packed format and the quantizers' front end.

A weight W of shape (n, k) with `bits` = q and group size g is represented as

    Ŵ[r, c] = Σ_{i<q} α_i[r, c // g] · b_i[r, c] + z[r, c // g],   b_i ∈ {−1, +1}

and stored as two tensors (docs/FORMAT.md, format version 1):

- ``planes``: int32 of shape (ceil(k/32), q, n_pad): bit j of word [w, i, r] is the code of
  weight (r, 32w + j) in plane i (1 means +1). n_pad is n rounded up to a multiple of 8;
  padded rows and the k positions past k are zero bits.
- ``meta``: (k/g, q+1, n_pad) in "general" mode (α_0..α_{q−1}, then z) or (k/g, 2, n_pad) in
  "uniform" mode (s, then z; α_i = s·2^(i−1)), in float32, float16 or bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _C
from ._runtime import FLOAT_DTYPES

FORMAT_VERSION = _C.BCQ_FORMAT_VERSION
MAX_BITS = _C.BCQ_MAX_BITS
WORD_K = _C.BCQ_WORD_K
ROW_PAD = _C.BCQ_ROW_PAD
MODES = ("general", "uniform")
METHODS = ("rtn", "greedy", "alternating")  # data-free: C (in _C's numbering), torch on CUDA
CALIBRATED_METHODS = ("gptq",)  # lutflash.gptq, in torch; needs the layer's input Hessian
ALL_METHODS = METHODS + CALIBRATED_METHODS
META_DTYPES = FLOAT_DTYPES  # metadata takes the same floating dtypes as activations
MAX_DIM = 2**31 - 1  # n and k, as the C layer takes them


def padded_rows(n: int) -> int:
    return (n + ROW_PAD - 1) // ROW_PAD * ROW_PAD


def words_per_row(k: int) -> int:
    return (k + WORD_K - 1) // WORD_K


def meta_per_group(bits: int, mode: str) -> int:
    return bits + 1 if mode == "general" else 2


def check_layout(n: int, k: int, bits: int, group_size: int, mode: str) -> None:
    """Raises ValueError unless (n, k, bits, group_size, mode) describe a valid BCQ weight."""
    for name, value in (("n (out_features)", n), ("k (in_features)", k), ("bits", bits),
                        ("group_size", group_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if n < 1 or k < 1:
        raise ValueError(f"shape: expected positive (out_features, in_features), got ({n}, {k})")
    for name, value in (("n (out_features)", n), ("k (in_features)", k)):
        if value > MAX_DIM:  # checked before anything of that size is allocated
            raise ValueError(f"{name}: expected at most 2^31 - 1 (the kernels' limit), got {value}")
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits: expected an int in [1, {MAX_BITS}], got {bits}")
    if group_size != k and (group_size < 1 or group_size % WORD_K or k % group_size):
        raise ValueError(
            f"group_size: expected a multiple of {WORD_K} that divides k = {k}, or k itself, "
            f"got {group_size}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


@dataclass(eq=False)
class BCQWeight:
    """A packed BCQ weight. Build one with :func:`lutflash.quantize`."""

    planes: torch.Tensor
    meta: torch.Tensor
    shape: tuple[int, int]
    bits: int
    group_size: int
    mode: str
    version: int = FORMAT_VERSION

    def __post_init__(self):
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.validate()

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.planes.device

    @property
    def num_groups(self) -> int:
        return self.in_features // self.group_size

    @property
    def alpha(self) -> torch.Tensor:
        """α as (n, num_groups, bits) float32 (computed from s in uniform mode)."""
        n = self.out_features
        if self.mode == "general":
            return self.meta[:, : self.bits, :n].float().permute(2, 0, 1)
        powers = torch.pow(2.0, torch.arange(self.bits, device=self.device) - 1.0)
        return self.meta[:, 0, :n].float().t().unsqueeze(-1) * powers

    @property
    def offset(self) -> torch.Tensor:
        """z as (n, num_groups) float32."""
        return self.meta[:, -1, : self.out_features].float().t()

    def nbytes(self) -> int:
        """Bytes of the packed weight and its metadata (what a kernel must read)."""
        return self.planes.numel() * 4 + self.meta.numel() * self.meta.element_size()

    def validate(self) -> None:
        """Raises ValueError/TypeError unless the tensors match the declared layout."""
        if self.version != FORMAT_VERSION:
            raise ValueError(
                f"version: this lutflash reads BCQ format version {FORMAT_VERSION}, got "
                f"{self.version}")
        n, k = self.shape
        check_layout(n, k, self.bits, self.group_size, self.mode)
        if not isinstance(self.planes, torch.Tensor) or self.planes.dtype != torch.int32:
            raise TypeError(f"planes: expected an int32 tensor, got {_describe(self.planes)}")
        if not isinstance(self.meta, torch.Tensor) or self.meta.dtype not in META_DTYPES:
            raise TypeError(
                f"meta: expected a float32, float16 or bfloat16 tensor, got {_describe(self.meta)}")
        want_planes = (words_per_row(k), self.bits, padded_rows(n))
        if tuple(self.planes.shape) != want_planes:
            raise ValueError(f"planes: expected shape {want_planes}, got {tuple(self.planes.shape)}")
        want_meta = (k // self.group_size, meta_per_group(self.bits, self.mode), padded_rows(n))
        if tuple(self.meta.shape) != want_meta:
            raise ValueError(f"meta: expected shape {want_meta}, got {tuple(self.meta.shape)}")
        if self.meta.device != self.planes.device:
            raise ValueError(
                f"meta: expected a tensor on {self.planes.device} like planes, got {self.meta.device}")

    def to(self, device=None, meta_dtype=None) -> BCQWeight:
        """A copy on `device` with metadata in `meta_dtype` (either may be None: unchanged)."""
        meta = self.meta
        if meta_dtype is not None:
            if meta_dtype not in META_DTYPES:
                raise TypeError(f"meta_dtype: expected one of {META_DTYPES}, got {meta_dtype}")
            meta = meta.to(meta_dtype)
        return BCQWeight(self.planes.to(device).contiguous(), meta.to(device).contiguous(),
                         self.shape, self.bits, self.group_size, self.mode, self.version)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ as a dense (n, k) tensor in `dtype` (computed in float64 when dtype is float64)."""
        return dequantize_packed(self.planes, self.meta, *self.shape, self.bits,
                                 self.group_size, self.mode, dtype)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors and the layout as tensors, for state_dicts and safetensors."""
        layout = torch.tensor([self.version, self.shape[0], self.shape[1], self.bits,
                               self.group_size, MODES.index(self.mode)], dtype=torch.int64)
        return {"planes": self.planes, "meta": self.meta, "layout": layout}

    @classmethod
    def from_state_tensors(cls, planes, meta, layout) -> BCQWeight:
        check_layout_tensor(layout, "layout")
        layout = [int(v) for v in layout.flatten().tolist()]
        if len(layout) != 6:
            raise ValueError(f"layout: expected 6 entries, got {len(layout)}")
        version, n, k, bits, group_size, mode = layout
        if version != FORMAT_VERSION:
            raise ValueError(
                f"layout: this lutflash reads BCQ format version {FORMAT_VERSION}, got {version}")
        if mode not in (0, 1):
            raise ValueError(f"layout: mode must be 0 (general) or 1 (uniform), got {mode}")
        return cls(planes, meta, (n, k), bits, group_size, MODES[mode], version)


def check_layout_tensor(layout, name: str) -> None:
    """A stored layout is an integer tensor (int64 as written; int32 accepted)."""
    if not isinstance(layout, torch.Tensor) or layout.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: expected an int64 tensor [version, n, k, bits, group_size, "
                        f"mode], got {_describe(layout)}")


def _describe(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dtype} tensor of shape {tuple(obj.shape)}"
    return type(obj).__name__


def dequantize_packed(planes: torch.Tensor, meta: torch.Tensor, n: int, k: int, bits: int,
                      group_size: int, mode: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpacks (planes, meta) to the dense (n, k) weight; the reference every kernel meets."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    shifts = torch.arange(WORD_K, device=planes.device, dtype=torch.int32)
    if mode == "general":
        alpha = meta[:, :bits, :n].to(compute)                       # (groups, bits, n)
    else:
        powers = torch.pow(2.0, torch.arange(bits, device=meta.device, dtype=compute) - 1.0)
        alpha = meta[:, :1, :n].to(compute) * powers[None, :, None]
    out = meta[:, -1, :n].to(compute).t().repeat_interleave(group_size, dim=1)
    for plane in range(bits):
        bit = (planes[:, plane, :n].unsqueeze(-1) >> shifts) & 1     # (words, n, 32)
        signs = bit.permute(1, 0, 2).reshape(n, -1)[:, :k].to(compute) * 2 - 1
        out += alpha[:, plane, :].t().repeat_interleave(group_size, dim=1) * signs
    return out.to(dtype)


def quantize(weight: torch.Tensor, bits: int, group_size: int | None = 128,
             method: str = "alternating", *, rounds: int = 15, mode: str | None = None,
             meta_dtype: torch.dtype | None = None, hessian: torch.Tensor | None = None,
             damp: float = 0.01, block_size: int = 128) -> BCQWeight:
    """Quantizes a dense (out_features, in_features) weight to BCQ, on the weight's device.

    method: "rtn" (asymmetric round-to-nearest, exact uniform BCQ), "greedy",
    "alternating" (least-squares alphas and optimal codes, repeated `rounds` times), or
    "gptq" (calibrated: column by column with error feedback through the inverse of
    `hessian`, lutflash.gptq; in torch). rtn, greedy and alternating run in C (OpenMP) for a
    CPU weight and in torch on the GPU for a CUDA weight (lutflash.bcq_torch, which mirrors
    the C quantizers: rtn bit for bit, greedy and alternating up to the order of the sums
    over a group); on any other device the weight goes through the C quantizers on the CPU
    and the result comes back. gptq runs in torch on the weight's device, CUDA included.
    group_size: a multiple of 32 dividing in_features, or None (or in_features) for one
    group per row. mode: "uniform" (rtn's default) or "general" (the others'; rtn and gptq can
    give either; gptq's default is general). meta_dtype: dtype of the stored metadata; default
    float32, or the weight's dtype when that is float16 or bfloat16. The result lives on the
    weight's device.

    gptq only: hessian, the (in_features, in_features) matrix 2/N Σ xᵀx of the layer's inputs
    x (lutflash.gptq.HessianAccumulator builds it); damp, the fraction of its mean diagonal
    added to the diagonal; block_size, columns per lazy update block. In general mode each
    group's alphas and offset come from greedy + `rounds` rounds of alternating least squares
    on the group's error-updated weights.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.ndim != 2:
        raise ValueError(f"weight: expected a 2-D (out_features, in_features) tensor, got shape "
                         f"{tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight: expected a floating-point tensor, got {weight.dtype}")
    if weight.is_meta:
        raise ValueError("weight: expected a tensor with data, got one on the meta device")
    if method not in ALL_METHODS:
        raise ValueError(f"method: expected one of {ALL_METHODS}, got {method!r}")
    n, k = weight.shape
    if group_size is None or group_size == -1:
        group_size = k
    if mode is None:
        mode = "uniform" if method == "rtn" else "general"
    if n == 0 or k == 0:
        raise ValueError(f"weight: expected a non-empty weight, got shape {tuple(weight.shape)}")
    check_layout(n, k, bits, group_size, mode)
    if not isinstance(rounds, int) or isinstance(rounds, bool):
        raise TypeError(f"rounds: expected an int, got {type(rounds).__name__}")
    if rounds < 0:
        raise ValueError(f"rounds: expected a non-negative int, got {rounds}")
    if meta_dtype is None:
        meta_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float32
    if meta_dtype not in META_DTYPES:
        raise TypeError(f"meta_dtype: expected one of {META_DTYPES}, got {meta_dtype}")
    if method == "gptq":
        return _quantize_gptq(weight, bits, group_size, mode, rounds, meta_dtype, hessian, damp,
                              block_size)
    if hessian is not None:
        raise ValueError(f"hessian: only method='gptq' uses it, got method={method!r}")
    if mode == "uniform" and method != "rtn":
        raise ValueError(f"mode: method {method!r} gives non-uniform alphas; use mode='general'")

    if _runs_in_torch(weight.device):
        from .bcq_torch import quantize_torch

        return quantize_torch(weight.detach(), bits, group_size, mode, method, rounds, meta_dtype)
    source = weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if weight.dtype == torch.float64 and not torch.isfinite(source).all() and torch.isfinite(weight).all():
        raise ValueError("weight: has values beyond the float32 range, which the quantizers use")
    planes = torch.empty((words_per_row(k), bits, padded_rows(n)), dtype=torch.int32)
    meta = torch.empty((k // group_size, meta_per_group(bits, mode), padded_rows(n)),
                       dtype=torch.float32)
    _C.bcq_quantize(source, planes, meta, n, k, bits, group_size, MODES.index(mode),
                    METHODS.index(method), rounds)
    result = BCQWeight(planes, meta.to(meta_dtype), (n, k), bits, group_size, mode)
    return result.to(weight.device) if weight.device.type != "cpu" else result


def _runs_in_torch(device: torch.device) -> bool:
    """Whether rtn, greedy and alternating run in torch on `device` (lutflash.bcq_torch: CUDA)
    rather than in C on the CPU."""
    return device.type == "cuda"


def _quantize_gptq(weight, bits, group_size, mode, rounds, meta_dtype, hessian, damp, block_size):
    from .gptq import check_hessian, gptq_quantize

    n, k = weight.shape
    if hessian is None:
        raise ValueError("hessian: method='gptq' needs the Hessian of the layer's inputs, "
                         "2/N Σ xᵀx (lutflash.gptq.HessianAccumulator), or use "
                         "lutflash.quantize_model(..., calibration=batches)")
    check_hessian(hessian, k)
    if not isinstance(block_size, int) or isinstance(block_size, bool):
        raise TypeError(f"block_size: expected an int, got {type(block_size).__name__}")
    if block_size < 1:
        raise ValueError(f"block_size: expected a positive int, got {block_size}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 <= damp < 1e6 \
            or damp != damp:
        raise ValueError(f"damp: expected a non-negative float (a fraction of the mean diagonal "
                         f"of the Hessian), got {damp!r}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight: has non-finite values")
    return gptq_quantize(weight, hessian, bits, group_size, mode, rounds=rounds, damp=float(damp),
                         block_size=block_size, meta_dtype=meta_dtype)


def bits_per_weight(bits: int, group_size: int, mode: str, meta_bytes: int = 2) -> float:
    """Storage cost per weight of the format, metadata included (padding excluded)."""
    return bits + 8 * meta_bytes * meta_per_group(bits, mode) / group_size


__all__ = ["BCQWeight", "quantize", "FORMAT_VERSION", "bits_per_weight"]
