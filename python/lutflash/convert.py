"""Published quantized checkpoints as BCQ weights: GPTQ and AWQ, converted exactly.

Both formats store an asymmetric uniform weight W[j, i] = s · (c − zp) with an integer code c,
an integer zero point zp and a 16-bit scale s per (output row j, group of input columns). That
is exactly uniform-mode BCQ (docs/FORMAT.md): the bits of c are the planes, α_i = s · 2^(i−1)
and z = s · ((2^q − 1)/2 − zp). With 16-bit scales, z is exact in float32 metadata (the
default), so the converted weight dequantizes to the checkpoint's own values bit for bit.

GPTQ (AutoGPTQ, GPTQModel; ``quant_method: "gptq"``):

- ``qweight`` int32 (in_features · bits / 32, out_features): down each column, the codes of
  input channels 0, 1, 2, … as one little-endian bit stream (bit b of the stream is bit b % 32
  of word b // 32), ``bits`` bits each; for 2, 4 and 8 bits that is 32 / bits codes per word,
  for 3 bits codes cross word boundaries (10⅔ per word).
- ``qzeros`` int32 (groups, out_features · bits / 32): the zero points, packed the same way
  along each row. ``checkpoint_format="gptq"`` (v1, what AutoGPTQ writes) stores zp − 1, so
  zp = stored + 1; ``"gptq_v2"`` stores zp.
- ``scales`` (groups, out_features), ``g_idx`` int32 (in_features,): the group of each input
  channel. With act-order (``desc_act``) g_idx is not i // group_size; lutflash's groups are
  contiguous column ranges, so such a checkpoint is refused.

AWQ (llm-awq, AutoAWQ's "GEMM" version; ``quant_method: "awq"``, 4 bits):

- ``qweight`` int32 (in_features, out_features / 8): word c of row i holds the codes of output
  columns 8c … 8c + 7, nibble p (bits 4p … 4p + 3) holding column 8c + AWQ_ORDER[p].
- ``qzeros`` int32 (groups, out_features / 8), packed the same way; ``scales`` (groups,
  out_features). W = (c − zp) · s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bcq import META_DTYPES, WORD_K, BCQWeight, check_layout, padded_rows, words_per_row
from .nn import LutLinear

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output column (within 8) of nibble p of an AWQ word
GPTQ_FORMATS = ("gptq", "gptq_v2")
GPTQ_BITS = (2, 3, 4, 8)


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              g_idx: torch.Tensor | None = None, *, bits: int, group_size: int | None = None,
              checkpoint_format: str = "gptq",
              meta_dtype: torch.dtype = torch.float32) -> BCQWeight:
    """The BCQ weight (uniform mode) of one GPTQ-packed linear layer.

    bits: 2, 3, 4 or 8. group_size: the checkpoint's (-1 or None: one group per row; it must
    then be a multiple of 32 or in_features, as for every BCQ weight). The result lives on
    qweight's device; meta_dtype float32 keeps it exact (float16/bfloat16 round z).
    """
    if bits not in GPTQ_BITS:
        raise ValueError(f"bits: GPTQ packs {GPTQ_BITS} bits, got {bits!r}")
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"checkpoint_format: expected one of {GPTQ_FORMATS}, got "
                         f"{checkpoint_format!r}")
    _check_int32(qweight, "qweight", 2)
    _check_int32(qzeros, "qzeros", 2)
    rows, n = qweight.shape
    if rows * WORD_K % bits:
        raise ValueError(f"qweight: {rows} rows of 32 bits do not hold whole {bits}-bit codes")
    k = rows * WORD_K // bits
    groups, group_size = _groups(scales, k, n, group_size)
    if tuple(qzeros.shape) != (groups, n * bits // WORD_K) or n * bits % WORD_K:
        raise ValueError(f"qzeros: expected shape ({groups}, {n} * {bits} / 32) for "
                         f"{n} output features, got {tuple(qzeros.shape)}")
    if g_idx is not None:
        _check_g_idx(g_idx, k, group_size)
    codes = _unpack_stream(qweight, bits, k).t()                     # (n, k)
    zeros = _unpack_stream(qzeros.t(), bits, n).t()                  # (groups, n)
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    return _uniform_bcq(codes, zeros.t(), scales.t(), bits, group_size, meta_dtype)


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *,
             group_size: int, bits: int = 4,
             meta_dtype: torch.dtype = torch.float32) -> BCQWeight:
    """The BCQ weight (uniform mode) of one AWQ GEMM-packed linear layer (4 bits)."""
    if bits != 4:
        raise ValueError(f"bits: AWQ's GEMM packing holds 4-bit codes, got {bits!r}")
    _check_int32(qweight, "qweight", 2)
    _check_int32(qzeros, "qzeros", 2)
    k, words = qweight.shape
    n = words * 8
    groups, group_size = _groups(scales, k, n, group_size)
    if tuple(qzeros.shape) != (groups, words):
        raise ValueError(f"qzeros: expected shape ({groups}, {words}), got {tuple(qzeros.shape)}")
    codes = _unpack_awq(qweight).t()                                 # (n, k)
    zeros = _unpack_awq(qzeros).t()                                  # (n, groups)
    return _uniform_bcq(codes, zeros, scales.t(), bits, group_size, meta_dtype)


def _check_int32(t, name: str, ndim: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.ndim != ndim:
        got = (f"a {t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor)
               else type(t).__name__)
        raise TypeError(f"{name}: expected a {ndim}-D int32 tensor, got {got}")


def _groups(scales, k: int, n: int, group_size: int | None) -> tuple[int, int]:
    """(groups, group size) from scales of shape (groups, n), checked against group_size."""
    if not isinstance(scales, torch.Tensor) or not scales.is_floating_point() or scales.ndim != 2:
        got = (f"a {scales.dtype} tensor of shape {tuple(scales.shape)}"
               if isinstance(scales, torch.Tensor) else type(scales).__name__)
        raise TypeError(f"scales: expected a 2-D floating-point tensor, got {got}")
    if scales.shape[1] != n or scales.shape[0] < 1 or k % scales.shape[0]:
        raise ValueError(f"scales: expected shape (groups, {n}) with groups dividing "
                         f"in_features = {k}, got {tuple(scales.shape)}")
    groups = scales.shape[0]
    if group_size is None or group_size == -1:
        group_size = k // groups
    if not isinstance(group_size, int) or group_size * groups != k:
        raise ValueError(f"group_size: {group_size} does not give the {groups} groups of scales "
                         f"over in_features = {k}")
    if group_size != k and group_size % WORD_K:
        raise ValueError(f"group_size: lutflash's groups are multiples of {WORD_K} columns (or "
                         f"the whole row), got {group_size}")
    if not torch.isfinite(scales).all():
        raise ValueError("scales: expected finite values, found inf or NaN")
    return groups, group_size


def _check_g_idx(g_idx, k: int, group_size: int) -> None:
    if not isinstance(g_idx, torch.Tensor) or g_idx.ndim != 1 or g_idx.numel() != k or \
            g_idx.is_floating_point():
        got = (f"a {g_idx.dtype} tensor of shape {tuple(g_idx.shape)}"
               if isinstance(g_idx, torch.Tensor) else type(g_idx).__name__)
        raise TypeError(f"g_idx: expected an integer tensor of {k} entries, got {got}")
    plain = torch.arange(k, device=g_idx.device) // group_size
    if not torch.equal(g_idx.to(torch.int64), plain):
        raise ValueError(
            "g_idx: the checkpoint was quantized with act-order (desc_act): its groups are not "
            "contiguous ranges of input channels, which lutflash's format needs; convert a "
            "checkpoint made without act-order, or quantize the full-precision model with "
            "lutflash.quantize_model")


def _unpack_stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Codes 0 .. count−1 of each column of `words` (int32, a little-endian bit stream per
    column), as int64 of shape (count, columns)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    start = torch.arange(count, device=words.device) * bits
    index, shift = start // WORD_K, (start % WORD_K)[:, None]
    value = w[index] >> shift
    spill = (start % WORD_K + bits > WORD_K)[:, None]  # the code continues in the next word
    nxt = w[(index + 1).clamp(max=w.shape[0] - 1)] << (WORD_K - shift)
    return torch.where(spill, value | nxt, value) & ((1 << bits) - 1)


def _unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """AWQ's interleaved nibbles: (rows, cols) int32 words → (rows, 8 · cols) int64 codes."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = 4 * torch.arange(8, device=words.device)
    nibbles = (w[..., None] >> shifts) & 0xF                         # (rows, cols, nibble p)
    column = torch.tensor(AWQ_ORDER, device=words.device).argsort()  # nibble of column c
    return nibbles[..., column].reshape(words.shape[0], -1)


def _uniform_bcq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int,
                 group_size: int, meta_dtype: torch.dtype) -> BCQWeight:
    """BCQ of W[r, c] = s[r, g] · (codes[r, c] − zeros[r, g]), g = c // group_size."""
    if meta_dtype not in META_DTYPES:
        raise TypeError(f"meta_dtype: expected one of {META_DTYPES}, got {meta_dtype}")
    n, k = codes.shape
    check_layout(n, k, bits, group_size, "uniform")
    words, n_pad = words_per_row(k), padded_rows(n)
    padded = torch.zeros((n_pad, words * WORD_K), dtype=torch.int64, device=codes.device)
    padded[:n, :k] = codes
    weights = torch.ones(WORD_K, dtype=torch.int64, device=codes.device) << torch.arange(
        WORD_K, device=codes.device)
    planes = torch.empty((words, bits, n_pad), dtype=torch.int32, device=codes.device)
    for i in range(bits):
        word = (((padded >> i) & 1).view(n_pad, words, WORD_K) * weights).sum(-1)  # < 2^32
        planes[:, i, :] = (word - ((word >> 31) << 32)).to(torch.int32).t()  # as signed int32
    s = scales.to(torch.float64)
    z = s * ((2 ** bits - 1) / 2 - zeros.to(torch.float64))
    meta = torch.zeros((k // group_size, 2, n_pad), dtype=torch.float64, device=codes.device)
    meta[:, 0, :n] = s.t()
    meta[:, 1, :n] = z.t()
    return BCQWeight(planes.contiguous(), meta.to(meta_dtype), (n, k), bits, group_size,
                     "uniform")


@dataclass(frozen=True)
class CheckpointFormat:
    """How a GPTQ or AWQ checkpoint packs its layers, read from its ``quantization_config``
    (config.json) by :meth:`from_config`: method "gptq" or "awq", bits, group_size (-1: one group
    per row) and, for GPTQ, the zero-point convention ("gptq" or "gptq_v2")."""

    method: str
    bits: int
    group_size: int
    gptq_format: str = "gptq"

    @classmethod
    def from_config(cls, quantization_config) -> CheckpointFormat:
        """Refuses (ValueError, "quantization_config: ...") what lutflash cannot read exactly:
        other methods, bits GPTQ/AWQ do not pack, GPTQ formats other than "gptq"/"gptq_v2"
        (marlin, bitblas, ...), AWQ versions other than "gemm" (gemv, gemv_fast, llm-awq).

        Keys as transformers' GPTQConfig/AwqConfig write them: GPTQ's zero convention is
        ``checkpoint_format`` (AutoGPTQ, and transformers' legacy key) or ``format``
        (GPTQModel), the former winning where both are present; AWQ's packing is ``version``
        or ``format``. group_size defaults to 128 and AWQ's bits to 4, as in transformers."""
        if hasattr(quantization_config, "to_dict") and not isinstance(quantization_config, dict):
            quantization_config = quantization_config.to_dict()
        if not isinstance(quantization_config, dict):
            raise TypeError(f"quantization_config: expected a dict (config.json's "
                            f"quantization_config), got {type(quantization_config).__name__}")
        config = quantization_config
        method = str(config.get("quant_method", "")).lower()
        if method not in ("gptq", "awq"):
            raise ValueError(f"quantization_config: quant_method must be 'gptq' or 'awq' (the "
                             f"formats lutflash converts), got {config.get('quant_method')!r}")
        bits = config.get("bits", 4 if method == "awq" else None)
        allowed = GPTQ_BITS if method == "gptq" else (4,)
        if isinstance(bits, bool) or bits not in allowed:
            raise ValueError(f"quantization_config: {method.upper()} checkpoints pack "
                             f"{', '.join(map(str, allowed))} bits, "
                             f"the config says bits = {bits!r}")
        group_size = config.get("group_size", 128)
        if isinstance(group_size, bool) or not isinstance(group_size, int) or \
                (group_size != -1 and group_size < 1):
            raise ValueError(f"quantization_config: group_size must be -1 or a positive int, got "
                             f"{group_size!r}")
        if method == "gptq":
            fmt = config.get("checkpoint_format") or config.get("format") or "gptq"
            fmt = str(fmt).lower()
            if config.get("is_marlin_format"):
                fmt = "marlin"
            if fmt not in GPTQ_FORMATS:
                raise ValueError(f"quantization_config: GPTQ checkpoint_format {fmt!r} is not "
                                 f"read by lutflash (it reads {GPTQ_FORMATS}); re-save the model "
                                 f"in the gptq format")
            pack = str(config.get("pack_dtype") or "int32").lower().replace("torch.", "")
            if pack != "int32":
                raise ValueError(f"quantization_config: GPTQ pack_dtype {pack!r}: lutflash reads "
                                 f"codes packed in int32 words")
            return cls("gptq", bits, group_size, fmt)
        version = str(config.get("version") or config.get("format") or "gemm").lower()
        if version != "gemm":
            raise ValueError(f"quantization_config: AWQ version {version!r} is not the GEMM "
                             f"packing, the only one lutflash reads")
        return cls("awq", bits, group_size)

    def tensor_names(self) -> tuple[str, ...]:
        """The tensors of one quantized layer (g_idx, GPTQ's, may be absent)."""
        return ("qweight", "qzeros", "scales", "g_idx") if self.method == "gptq" else \
            ("qweight", "qzeros", "scales")

    def layer_group_size(self, name: str, in_features: int) -> int:
        """The group size of one layer: the whole row for -1 or a group at least as long as
        the row (GPTQ then has one group), else group_size, which must divide in_features."""
        if self.group_size == -1 or self.group_size >= in_features:
            return in_features
        if in_features % self.group_size:
            raise ValueError(f"{name}: in_features = {in_features} is not a multiple of "
                             f"group_size = {self.group_size} (config.json); lutflash's groups "
                             f"must tile the row")
        return self.group_size

    def packed_shapes(self, name: str, out_features: int,
                      in_features: int) -> dict[str, tuple[int, ...]]:
        """The shapes of the layer's tensors for a Linear(in_features, out_features)."""
        n, k, bits = out_features, in_features, self.bits
        groups = k // self.layer_group_size(name, k)
        if self.method == "gptq":
            for what, size in (("in_features", k), ("out_features", n)):
                if size * bits % WORD_K:
                    raise ValueError(f"{name}: {what} = {size} does not fill whole 32-bit words "
                                     f"of {bits}-bit codes, so it cannot be a GPTQ-packed layer")
            return {"qweight": (k * bits // WORD_K, n), "qzeros": (groups, n * bits // WORD_K),
                    "scales": (groups, n), "g_idx": (k,)}
        if n % 8:
            raise ValueError(f"{name}: out_features = {n} is not a multiple of 8, so it cannot "
                             f"be an AWQ-packed layer")
        return {"qweight": (k, n // 8), "qzeros": (groups, n // 8), "scales": (groups, n)}

    def convert(self, name: str, tensors: dict[str, torch.Tensor], out_features: int,
                in_features: int, meta_dtype: torch.dtype = torch.float32) -> BCQWeight:
        """The BCQ weight of layer `name` (a Linear(in_features, out_features)) from its
        checkpoint tensors; every error names the layer."""
        shapes = self.packed_shapes(name, out_features, in_features)
        required = [key for key in ("qweight", "qzeros", "scales") if key not in tensors]
        if required:
            absent = ", ".join(f"{name}.{key}" for key in required)
            raise ValueError(f"{name}: the checkpoint has no {absent} for this "
                             f"{self.method.upper()}-quantized layer")
        for key, shape in shapes.items():
            value = tensors.get(key)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(
                    f"{name}.{key}: expected shape {shape} for a {self.bits}-bit "
                    f"{self.method.upper()} Linear(in_features={in_features}, out_features="
                    f"{out_features}) with group_size {self.group_size} (config.json), got "
                    f"{tuple(value.shape)}")
        group_size = self.layer_group_size(name, in_features)
        try:
            if self.method == "gptq":
                return from_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"],
                                 tensors.get("g_idx"), bits=self.bits, group_size=group_size,
                                 checkpoint_format=self.gptq_format, meta_dtype=meta_dtype)
            return from_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"],
                            group_size=group_size, bits=self.bits, meta_dtype=meta_dtype)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{name}.{error}") from error


def load_quantized_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor],
                              quantization_config: dict) -> list[str]:
    """Loads a GPTQ or AWQ checkpoint's state_dict into `model` (built from the checkpoint's
    config, e.g. AutoModelForCausalLM.from_config): every nn.Linear whose `qweight` and `qzeros`
    are in the state_dict becomes a LutLinear holding the exact conversion; the other tensors
    load as they are (load_state_dict, strict: nothing may be missing or left over).

    quantization_config: the checkpoint's ``quantization_config`` (config.json): quant_method
    "gptq" (bits, group_size, desc_act, checkpoint_format) or "awq" (bits 4, group_size,
    version "gemm"); see CheckpointFormat.from_config. Returns the names of the converted
    layers. lutflash.from_quantized_pretrained reads a whole checkpoint folder without building
    the full-precision layers first.
    """
    fmt = CheckpointFormat.from_config(quantization_config)
    state = dict(state_dict)
    converted = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or not (
                f"{name}.qweight" in state or f"{name}.qzeros" in state):
            continue
        tensors = {key: state.pop(f"{name}.{key}") for key in fmt.tensor_names()
                   if f"{name}.{key}" in state}
        qweight = fmt.convert(name, tensors, module.out_features, module.in_features)
        bias = state.pop(f"{name}.bias", None)
        layer = LutLinear.from_bcq(qweight, bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        converted.append(name)
    expected = set(model.state_dict())
    tied = getattr(model, "_tied_weights_keys", None) or {}
    missing = sorted(k for k in expected - set(state) if k not in tied and not any(
        k.startswith(f"{name}.") for name in converted))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"state_dict: does not match the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    model.load_state_dict(state, strict=False)
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    return converted
