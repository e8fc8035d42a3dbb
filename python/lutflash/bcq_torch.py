"""The data-free BCQ quantizers in torch, on any device: what ``lutflash.quantize`` runs for a
CUDA weight (a CPU weight goes to the C quantizers, csrc/bcq_quantize.c), and the pieces that
GPTQ (lutflash.gptq) fits its groups with.

Each function mirrors the C quantizer step by step, in float64 on a float32 copy of the
weight as C computes, vectorized over all (row, group) pairs at once:

- :func:`rtn_grid` / :func:`rtn_codes`: asymmetric round-to-nearest with C's min/max, scale
  rounding and round-half-to-even; the result is bit-identical to C's.
- :func:`fit_bcq`: greedy BCQ, then ``rounds`` rounds of alternating least squares (C's normal
  equations from the per-pattern histogram, solved by Cholesky with C's singularity test and
  fallback, the levels summed as C sums them and ordered as C orders ties, codes by C's
  midpoint rule, a round kept only if it lowers the squared error, a group stopping at its
  first round that does not). Sums are taken in torch's order rather than C's left-to-right
  order and the small systems are solved by torch.linalg, so alphas and offsets can differ
  from C's in the last bits of float64 (almost never in the stored float32), and a code only
  where a weight sits on a level midpoint to within that rounding.
- :func:`pack_codes`: integer codes and per-group parameters into a packed BCQWeight.

:func:`quantize_torch` puts them together over blocks of rows, so that the working set stays
near ``CHUNK_ELEMENTS`` float64 weights (about 1 GB at the default) whatever the weight's size.
"""

from __future__ import annotations

import torch

from .bcq import WORD_K, BCQWeight, meta_per_group, padded_rows, words_per_row

__all__ = ["CHUNK_ELEMENTS", "fit_bcq", "pack_codes", "quantize_torch", "rtn_codes", "rtn_divisor",
           "rtn_grid"]

# Weights per block of rows in quantize_torch and pack_codes. Alternating holds about eight
# float64 or int64 tensors of that many elements at its peak: ~1 GB at 2^24.
CHUNK_ELEMENTS = 1 << 24

# bit j of a packed word as an int32 (bit 31 is the sign bit: -2^31)
_BIT_VALUES = [(1 << j) - (1 << 32 if j == 31 else 0) for j in range(WORD_K)]


def rtn_grid(w: torch.Tensor, bits: int, scale_dtype: torch.dtype = torch.float32):
    """C's rtn grid for each row of w (B, g): (s, zp, z), float64 (B,) each.

    s = (max − min)/(2^q − 1) rounded to float32 (C stores it so) and then to `scale_dtype`
    (GPTQ rounds it to the metadata dtype before choosing codes; quantize keeps float32);
    zp = round(−min/s) clamped to [0, 2^q − 1]; z = s·((2^q − 1)/2 − zp). Where s = 0 (a
    constant group) z = min and zp = 0, so that every code is 0 (:func:`rtn_codes`). z is
    returned unrounded (C rounds it to float32 when it stores it).
    """
    top = float((1 << bits) - 1)
    w64 = w.to(torch.float64)
    lo, hi = w64.amin(1), w64.amax(1)
    s = ((hi - lo) / top).to(torch.float32).to(scale_dtype).to(torch.float64)
    zero = s == 0
    zp = torch.round(-lo / torch.where(zero, torch.ones_like(s), s)).clamp(0, top)
    z = torch.where(zero, lo, s * (top / 2 - zp))
    return s, torch.where(zero, torch.zeros_like(zp), zp), z


def rtn_divisor(s: torch.Tensor) -> torch.Tensor:
    """What :func:`rtn_codes` divides by: s, or inf where s = 0 (w/inf rounds to code 0)."""
    return torch.where(s == 0, torch.full_like(s, float("inf")), s)


def rtn_codes(w: torch.Tensor, divisor: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (float64) of w on the grid of :func:`rtn_grid`: round(w/s) + zp clamped
    to [0, 2^q − 1] (round half to even, as C's rint), 0 in a constant group. w is (B, g), or
    (B,) (one column: GPTQ); divisor = rtn_divisor(s) and zp are (B,)."""
    if w.ndim == 2:
        divisor, zp = divisor.unsqueeze(1), zp.unsqueeze(1)
    return (torch.round(w.to(torch.float64) / divisor) + zp).clamp(0, float((1 << bits) - 1))


def fit_bcq(w: torch.Tensor, bits: int, rounds: int):
    """Greedy BCQ, then up to `rounds` rounds of alternating least squares, for each row of
    w (B, g) (float64); C's quantize_group_alternating (rounds = 0: quantize_group_greedy).
    Returns (codes (B, g) uint8, bit i of a code = plane i is +1; alpha (B, bits) float64;
    offset (B,) float64)."""
    w = w.to(torch.float64)
    B, g = w.shape
    mean = w.sum(1) / g
    residual = w - mean.unsqueeze(1)
    codes = torch.zeros(B, g, dtype=torch.uint8, device=w.device)
    alpha = torch.empty(B, bits, dtype=torch.float64, device=w.device)
    for i in range(bits):
        a = residual.abs().sum(1) / g
        plus = residual >= 0
        codes |= plus.to(torch.uint8) << i
        residual -= torch.where(plus, a.unsqueeze(1), -a.unsqueeze(1))
        alpha[:, i] = a
    if rounds == 0 or B == 0:
        return codes, alpha, mean
    best = (residual * residual).sum(1)
    del residual
    return _alternate(w, bits, rounds, codes, alpha, mean, best)


def _histogram(w: torch.Tensor, codes: torch.Tensor, levels: int):
    """Count and sum of the weights per code pattern, (B, levels) float64 each."""
    sorted_codes, order = codes.to(torch.int64).sort(dim=1, stable=True)
    prefix = _prefix_sums(w.gather(1, order))
    targets = torch.arange(levels + 1, device=w.device).expand(w.shape[0], -1).contiguous()
    bounds = torch.searchsorted(sorted_codes, targets)                 # (B, levels + 1)
    return _block_sums(prefix, bounds)


def _prefix_sums(values: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros_like(values[:, :1]), values.cumsum(1)], 1)


def _block_sums(prefix: torch.Tensor, bounds: torch.Tensor):
    """Counts and sums of the blocks [bounds[:, t], bounds[:, t + 1]) of the prefixed rows."""
    count = (bounds[:, 1:] - bounds[:, :-1]).to(torch.float64)
    total = prefix.gather(1, bounds[:, 1:]) - prefix.gather(1, bounds[:, :-1])
    return count, total


def _sign_table(bits: int, device) -> torch.Tensor:
    """(2^q, q + 1) float64: entry [p, i] = +1 if bit i of pattern p is set, else −1, for the
    planes i < q; then a column of ones (the offset's)."""
    p = torch.arange(1 << bits, device=device).unsqueeze(1)
    signs = ((p >> torch.arange(bits, device=device)) & 1) * 2 - 1
    return torch.cat([signs, torch.ones_like(p)], 1).to(torch.float64)


def _fit_scales(hist, g: int, table, outer, state):
    """C's fit_scales for each row: least-squares α and z for the codes whose histogram is
    hist (R, 2, 2^q) (count, then sum of the weights, per pattern). The normal equations'
    entries are the signed moments of the histogram (C's Walsh–Hadamard transform; here
    products with the ±1 tables); a row whose system C calls singular (a Cholesky pivot
    ≤ 1e-10·g) keeps its α and z from `state` (R, q + 2), as C does. Returns (R, q + 1)."""
    dim = table.shape[1]
    a = (hist[:, 0] @ outer).reshape(-1, dim, dim)
    rhs = hist[:, 1] @ table
    chol, info = torch.linalg.cholesky_ex(a)
    pivots = chol.diagonal(dim1=1, dim2=2)
    solvable = (info == 0) & (pivots * pivots > 1e-10 * g).all(1)
    fit = torch.cholesky_solve(rhs.unsqueeze(2), chol).squeeze(2)
    return torch.where(solvable.unsqueeze(1), fit, state[:, :dim])


def _sorted_levels(fit, table):
    """C's sorted_levels: the 2^q values z ± α_0 ± α_1 ... (added in that order, so each
    value is C's to the last bit) ascending, with their patterns; a stable sort, so equal
    values keep ascending patterns, C's merge order."""
    values = fit[:, -1:].expand(-1, table.shape[0])
    for i in range(table.shape[1] - 1):
        values = values + fit[:, i:i + 1] * table[:, i]
    return values.sort(dim=1, stable=True)


def _midpoints(values):
    return 0.5 * (values[:, :-1] + values[:, 1:])


def _alternate(w, bits: int, rounds: int, codes, alpha, offset, best):
    """C's rounds of alternating least squares from the greedy state (codes, alpha, offset,
    squared error best). The weights of each group are sorted once: the nearest-level codes
    of a round split them into consecutive runs, one per level, whose counts and sums (the
    next fit's histogram) come from prefix sums. Rows drop out at their first round that does
    not lower their error (or when it reaches 0), as in C."""
    B, g = w.shape
    levels = 1 << bits
    table = _sign_table(bits, w.device)
    outer = (table.unsqueeze(2) * table.unsqueeze(1)).reshape(levels, -1)
    sorted_w = w.sort(1).values
    prefix = _prefix_sums(sorted_w)
    hist = torch.stack(_histogram(w, codes, levels), 1)               # (B, 2, levels)
    state = torch.cat([alpha, offset.unsqueeze(1), best.unsqueeze(1)], 1)  # α, z, error
    kept_values = torch.empty(B, levels, dtype=torch.float64, device=w.device)
    kept_patterns = torch.empty(B, levels, dtype=torch.int64, device=w.device)
    moved = torch.zeros(B, dtype=torch.bool, device=w.device)
    active = torch.nonzero(best > 0).squeeze(1)
    for _ in range(rounds):
        if active.numel() == 0:
            break
        everyone = active.numel() == B

        def pick(t, everyone=everyone, active=active):
            return t if everyone else t[active]

        current = pick(state)
        fit = _fit_scales(pick(hist), g, table, outer, current)
        values, patterns = _sorted_levels(fit, table)
        mids = _midpoints(values)
        ws = pick(sorted_w)
        diff = ws - values.gather(1, torch.searchsorted(mids, ws))      # level: number of mids < w
        err = (diff * diff).sum(1)
        better = torch.nonzero(err < current[:, -1]).squeeze(1)  # one host sync per round
        rows = active[better]
        state[rows] = torch.cat([fit[better], err[better].unsqueeze(1)], 1)
        values, patterns, mids, ws = values[better], patterns[better], mids[better], ws[better]
        kept_values[rows] = values
        kept_patterns[rows] = patterns
        moved[rows] = True
        # the next fit's histogram: level t holds the sorted weights in (mid_{t−1}, mid_t]
        inner = torch.searchsorted(ws, mids, right=True)
        edge = torch.zeros_like(inner[:, :1])
        level_hist = torch.stack(_block_sums(prefix[rows], torch.cat([edge, inner, edge + g], 1)), 1)
        hist[rows] = torch.zeros_like(level_hist).scatter_(
            2, patterns.unsqueeze(1).expand(-1, 2, -1), level_hist)
        active = rows[torch.nonzero(state[rows, -1] > 0).squeeze(1)]
    rows = torch.nonzero(moved).squeeze(1)
    if rows.numel():
        values = kept_values[rows]
        index = torch.searchsorted(_midpoints(values), w[rows])
        codes[rows] = kept_patterns[rows].gather(1, index).to(torch.uint8)
    return codes, state[:, :bits], state[:, bits]


def pack_codes(codes: torch.Tensor, params: torch.Tensor, bits: int, group_size: int, mode: str,
               meta_dtype: torch.dtype = torch.float32) -> BCQWeight:
    """A BCQWeight from integer codes and per-group parameters.

    codes: (n, k) integers in [0, 2^bits): bit i of codes[r, c] is the sign of plane i (1 means
    +1). params: (n, k // group_size, bits + 1) = α_0..α_{q−1}, z (mode "general") or
    (n, k // group_size, 2) = s, z (mode "uniform"), stored in `meta_dtype`. The result lives
    on the codes' device; rows are packed in blocks of about CHUNK_ELEMENTS codes.
    """
    n, k = codes.shape
    device = codes.device
    words = words_per_row(k)
    planes = torch.zeros(words, bits, padded_rows(n), dtype=torch.int32, device=device)
    bit_values = torch.tensor(_BIT_VALUES, dtype=torch.int32, device=device)
    step = max(1, CHUNK_ELEMENTS // (words * WORD_K))
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        block = torch.zeros(r1 - r0, words * WORD_K, dtype=torch.int32, device=device)
        block[:, :k] = codes[r0:r1]
        block = block.reshape(r1 - r0, words, WORD_K)
        for i in range(bits):
            # distinct powers of two: the int32 sum is the word, bit 31 included, in any order
            word = (((block >> i) & 1) * bit_values).sum(-1, dtype=torch.int32)
            planes[:, i, r0:r1] = word.t()
    groups = k // group_size
    meta = torch.zeros(groups, meta_per_group(bits, mode), padded_rows(n), dtype=meta_dtype,
                       device=device)
    meta[:, :, :n] = params.to(meta_dtype).permute(1, 2, 0)
    return BCQWeight(planes, meta, (n, k), bits, group_size, mode)


def quantize_torch(weight: torch.Tensor, bits: int, group_size: int, mode: str, method: str,
                   rounds: int, meta_dtype: torch.dtype, *,
                   chunk_elements: int = CHUNK_ELEMENTS) -> BCQWeight:
    """rtn, greedy or alternating on the weight's device, as csrc/bcq_quantize.c computes it
    (rtn bit for bit); arguments are checked by lutflash.quantize, which calls this for CUDA
    weights. The weight is taken in blocks of rows of about `chunk_elements` weights."""
    n, k = weight.shape
    _check_finite(weight)
    device = weight.device
    groups = k // group_size
    codes = torch.empty(n, k, dtype=torch.uint8, device=device)
    params = torch.empty(n, groups, meta_per_group(bits, mode), dtype=torch.float32,
                         device=device)
    powers = torch.pow(2.0, torch.arange(bits, device=device, dtype=torch.float64) - 1.0)
    step = max(1, chunk_elements // k)
    with torch.no_grad():
        for r0 in range(0, n, step):
            r1 = min(r0 + step, n)
            # C reads the weight as float32 and computes in float64
            w = weight[r0:r1].to(torch.float32).to(torch.float64).reshape(-1, group_size)
            if method == "rtn":
                s, zp, z = rtn_grid(w, bits)
                block_codes = rtn_codes(w, rtn_divisor(s), zp, bits).to(torch.uint8)
                alpha = s.unsqueeze(1) * powers  # C: α_i = s·2^(i−1), stored s = 2·α_0
            else:
                block_codes, alpha, z = fit_bcq(w, bits, rounds if method == "alternating" else 0)
            codes[r0:r1] = block_codes.reshape(r1 - r0, k)
            if mode == "uniform":
                block = torch.stack([2.0 * alpha[:, 0], z], 1)
            else:
                block = torch.cat([alpha, z.unsqueeze(1)], 1)
            params[r0:r1] = block.to(torch.float32).reshape(r1 - r0, groups, -1)
    finite = torch.isfinite(params).all(-1)
    if not bool(finite.all()):
        row, group = (int(v) for v in torch.nonzero(~finite)[0])
        raise ValueError(f"weight: row {row}, group {group} spans a range too large for float32 "
                         f"metadata")
    return pack_codes(codes, params, bits, group_size, mode, meta_dtype)


def _check_finite(weight: torch.Tensor) -> None:
    """The C quantizers' refusals: float64 values past float32's range, then NaN or Inf."""
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        index = int(torch.nonzero(~finite.flatten())[0])
        raise ValueError(f"weight: contains NaN or Inf at ({index // weight.shape[1]}, "
                         f"{index % weight.shape[1]})")
    if weight.dtype == torch.float64 and not bool(torch.isfinite(weight.to(torch.float32)).all()):
        raise ValueError("weight: has values beyond the float32 range, which the quantizers use")
