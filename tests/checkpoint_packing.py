"""GPTQ and AWQ packing, written from the formats' documentation (AutoGPTQ's `pack` loop, with
its word-by-word layout of 3-bit codes, and AutoAWQ's GEMM packing order), independently of
lutflash's bit-stream reading of them. Shared by test_convert.py (one layer) and
test_checkpoints.py (whole checkpoint folders)."""

import torch

from lutflash.convert import AWQ_ORDER


def gptq_pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's packing of integer rows into int32 rows (values: (rows, cols), < 2^bits):
    for 2, 4, 8 bits 32/bits consecutive rows per word; for 3 bits, groups of 32 rows in 3
    words: rows 0-9 at bits 0..29 and the low 2 bits of row 10 at 30..31; its high bit at bit 0
    of the second word, rows 11-20 from bit 1, the low bit of row 21 at bit 31; its high 2 bits
    at bits 0..1 of the third word, rows 22-31 from bit 2."""
    v = [[int(x) for x in row] for row in values.t().tolist()]  # per column, the row values
    rows, cols = values.shape
    out = [[0] * cols for _ in range(rows * bits // 32)]
    for c in range(cols):
        col, word, i = v[c], 0, 0
        while word < len(out):
            if bits in (2, 4, 8):
                for j in range(32 // bits):
                    out[word][c] |= col[i + j] << (bits * j)
                i += 32 // bits
                word += 1
            else:
                for j in range(10):
                    out[word][c] |= col[i + j] << (3 * j)
                i += 10
                out[word][c] |= (col[i] << 30) & 0xFFFFFFFF
                word += 1
                out[word][c] |= (col[i] >> 2) & 1
                i += 1
                for j in range(10):
                    out[word][c] |= col[i + j] << (3 * j + 1)
                i += 10
                out[word][c] |= (col[i] << 31) & 0xFFFFFFFF
                word += 1
                out[word][c] |= (col[i] >> 1) & 3
                i += 1
                for j in range(10):
                    out[word][c] |= col[i + j] << (3 * j + 2)
                i += 10
                word += 1
    return torch.tensor(out, dtype=torch.int64).to(torch.int32)  # wraps to signed int32


def awq_pack_cols(values: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's GEMM packing: 8 output columns per int32, column 8w + AWQ_ORDER[p] in nibble p."""
    rows, cols = values.shape
    words = torch.zeros((rows, cols // 8), dtype=torch.int64)
    for p, column in enumerate(AWQ_ORDER):
        words |= values[:, column::8].to(torch.int64) << (4 * p)
    return words.to(torch.int32)


def gptq_checkpoint(n, k, bits, group_size, sym, fmt, scale_dtype, gen):
    """Random codes, zeros and scales of a (out n, in k) layer and their GPTQ tensors."""
    groups = k // group_size
    codes = torch.randint(0, 2 ** bits, (k, n), generator=gen)
    if sym:
        zeros = torch.full((groups, n), 2 ** (bits - 1))
    else:
        zeros = torch.randint(0, 2 ** bits, (groups, n), generator=gen)
    if fmt == "gptq":  # v1 stores zp − 1; a zero point of 0 wraps to 2^bits − 1 and reads back 2^bits
        zeros = zeros.clamp(min=1)
        stored = zeros - 1
    else:
        stored = zeros
    scales = (torch.rand(groups, n, generator=gen) * 0.05 + 1e-3).to(scale_dtype)
    qweight = gptq_pack_rows(codes, bits)
    qzeros = gptq_pack_rows(stored.t(), bits).t().contiguous()
    g_idx = torch.arange(k, dtype=torch.int32) // group_size
    return codes, zeros, scales, qweight, qzeros, g_idx


def source_weight(codes, zeros, scales, group_size, dtype):
    """The checkpoint's own dequantization W[j, i] = s · (c − zp) as (out, in): exact in
    float64; in a 16-bit dtype the integer difference times the scale, rounded once."""
    zp = zeros.repeat_interleave(group_size, dim=0)      # (k, n)
    s = scales.repeat_interleave(group_size, dim=0)
    if dtype == torch.float64:
        return ((codes - zp).double() * s.double()).t()
    return ((codes - zp).to(dtype) * s.to(dtype)).t()
