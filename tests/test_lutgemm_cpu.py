"""The CPU LUT-GEMM kernel against the float64 reference (dequantize, then matmul)."""

import contextlib
import itertools
import sys

import pytest
import torch

import lutflash
from lutflash import _C
from lutflash.bcq import BCQWeight, meta_per_group, padded_rows, words_per_row
from lutflash.testing import assert_close_to_reference, lutgemm_reference, random_bcq_weight, relative_error

lutgemm_module = sys.modules["lutflash.lutgemm"]  # the module; lutflash.lutgemm is the function

VARIANTS = ["portable", "avx2", "avx512"]
# The C variant numbers (lutgemm_cpu.h) and, for the ones that need an instruction set this CPU
# may lack, the reason a test of them is skipped there.
VARIANT_IDS = {"portable": 1, "avx2": 2, "avx512": 3}
MISSING_ISA = {"avx2": "AVX2 kernel: this CPU has no AVX2 and FMA",
               "avx512": "AVX-512 kernel: this CPU has no AVX-512F"}


def supported(variant):
    order = ["portable", "avx2", "avx512"]
    return order.index(variant) <= order.index(_C.lutgemm_cpu_variant())


@pytest.fixture(params=VARIANTS)
def cpu_variant(request):
    if not supported(request.param):
        pytest.skip(MISSING_ISA[request.param])
    _C.lutgemm_cpu_variant(request.param)
    # The inner loop that runs is the one asked for, not a silent fallback.
    assert _C.cpu_kernel_isa("lutgemm", VARIANT_IDS[request.param]) == request.param
    yield request.param
    _C.lutgemm_cpu_variant("best")


@contextlib.contextmanager
def cpu_tables(name):
    """The CPU kernel's tables for the duration: "float" (exact), "int16" or "auto"."""
    previous = _C.lutgemm_cpu_tables(name)
    try:
        yield
    finally:
        _C.lutgemm_cpu_tables(previous)


def poisoned_call(x, qweight, bias=None):
    """Calls the raw kernel into a NaN-filled output so that unwritten elements fail."""
    n, k = qweight.shape
    x2d = x.reshape(-1, k)
    out = torch.full((x2d.shape[0], n), float("nan"), dtype=x.dtype)
    lutgemm_module.lutgemm_into(x2d, qweight.planes, qweight.meta, bias, out, n, k, qweight.bits,
                              qweight.group_size, lutflash.bcq.MODES.index(qweight.mode))
    return out.reshape(*x.shape[:-1], n)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", ["general", "uniform"])
@pytest.mark.parametrize("group_size", [32, 128, None])
def test_fp32_matches_reference(cpu_variant, bits, mode, group_size, generator):
    n, k = 37, 256  # odd n: padded rows must not leak into the output
    qweight = random_bcq_weight(n, k, bits, group_size, mode, generator=generator)
    bias = torch.randn(n, generator=generator)
    for m in (1, 2, 5, 16, 64):
        x = torch.randn(m, k, generator=generator)
        out = poisoned_call(x, qweight, bias)
        assert relative_error(out, lutgemm_reference(x, qweight, bias)) < 1e-5


@pytest.mark.parametrize("m", [1, 3, 8, 33, 64, 65, 130])
def test_many_activation_rows(cpu_variant, m, generator):
    # more rows than one table block (64) and than one pass (4)
    qweight = random_bcq_weight(70, 96, 3, 32, "general", generator=generator)
    x = torch.randn(m, 96, generator=generator)
    assert relative_error(poisoned_call(x, qweight), lutgemm_reference(x, qweight)) < 1e-5


@pytest.mark.parametrize("n,k,group_size", [(1, 32, 32), (5, 100, 100), (9, 33, None),
                                            (530, 64, 64), (1100, 320, 160), (3, 1, None)])
def test_odd_shapes(cpu_variant, n, k, group_size, generator):
    qweight = random_bcq_weight(n, k, 2, group_size, "uniform", generator=generator)
    x = torch.randn(3, k, generator=generator)
    assert relative_error(poisoned_call(x, qweight), lutgemm_reference(x, qweight)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("meta_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision(cpu_variant, dtype, meta_dtype, generator):
    n, k = 48, 512
    qweight = random_bcq_weight(n, k, 3, 128, "general", meta_dtype=meta_dtype,
                                generator=generator)
    bias = torch.randn(n, generator=generator).to(dtype)
    x = torch.randn(7, k, generator=generator).to(dtype)
    out = poisoned_call(x, qweight, bias)
    assert out.dtype == dtype
    ref = lutgemm_reference(x, qweight, bias)
    naive = (x.float() @ qweight.dequantize(dtype).float().t()).to(dtype) + bias
    assert_close_to_reference(out, ref, naive)


@pytest.mark.parametrize("bits", [5, 6, 7, 8])
def test_more_bits(bits, generator):
    qweight = random_bcq_weight(20, 64, bits, 32, "general", generator=generator)
    x = torch.randn(4, 64, generator=generator)
    assert relative_error(poisoned_call(x, qweight), lutgemm_reference(x, qweight)) < 1e-5


def test_batched_leading_dims_and_strided_input(generator):
    qweight = random_bcq_weight(24, 64, 3, 32, "general", generator=generator)
    x = torch.randn(2, 3, 5, 64, generator=generator)
    out = lutflash.lutgemm(x, qweight)
    assert out.shape == (2, 3, 5, 24)
    ref = lutgemm_reference(x.reshape(-1, 64), qweight).reshape(2, 3, 5, 24)
    assert relative_error(out, ref) < 1e-5
    wide = torch.randn(6, 100, generator=generator)
    rows = wide[:, 10:74]  # rows 100 elements apart
    assert relative_error(lutflash.lutgemm(rows, qweight), lutgemm_reference(rows, qweight)) < 1e-5
    transposed = torch.randn(64, 6, generator=generator).t()  # last dim not contiguous
    assert relative_error(lutflash.lutgemm(transposed, qweight),
                          lutgemm_reference(transposed, qweight)) < 1e-5


def test_variants_agree(generator):
    qweight = random_bcq_weight(200, 256, 4, 64, "uniform", generator=generator)
    x = torch.randn(9, 256, generator=generator)
    outs = []
    for variant in [v for v in VARIANTS if supported(v)]:
        _C.lutgemm_cpu_variant(variant)
        outs.append(lutflash.lutgemm(x, qweight))
    _C.lutgemm_cpu_variant("best")
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)


def test_empty_batch_gives_empty_output(generator):
    qweight = random_bcq_weight(8, 32, 2, 32, "general", generator=generator)
    out = lutflash.lutgemm(torch.randn(0, 32), qweight)
    assert out.shape == (0, 8)
    assert lutflash.lutgemm(torch.randn(2, 0, 32), qweight).shape == (2, 0, 8)


def test_numpy_arrays_through_dlpack(generator):
    np = pytest.importorskip("numpy")
    qweight = random_bcq_weight(16, 64, 3, 32, "general", generator=generator)
    x = torch.randn(2, 64, generator=generator)
    out = np.full((2, 16), np.nan, dtype=np.float32)
    workspace = np.empty(_C.lutgemm_workspace_bytes(False, 2, 16, 64, 3, 32, 0) + 64, np.uint8)
    offset = (-workspace.ctypes.data) % 64  # the kernel wants 64-byte aligned tables
    _C.lutgemm(x.numpy(), qweight.planes.numpy(), qweight.meta.numpy(), None, out,
               workspace[offset:offset + workspace.size - 64], 16, 64, 3, 32, 0, 0)
    assert relative_error(torch.from_numpy(out), lutgemm_reference(x, qweight)) < 1e-5


def test_grid_of_layouts_is_covered():
    # every (bits, mode) pair the format allows builds and validates
    for bits, mode in itertools.product(range(1, 9), ["general", "uniform"]):
        random_bcq_weight(8, 32, bits, 32, mode).validate()


def test_variants_run_the_instruction_set_they_name():
    """The variant a test selects is the kernel that runs (cpu_kernel_isa reports what the C
    dispatch picks), and "best" is the widest one this CPU has, so that no test passes by
    exercising the portable loop under another name."""
    features = _C.cpu_features()
    best = ("avx512" if features.get("avx512f") else
            "avx2" if features.get("avx2") and features.get("fma") else "portable")
    assert _C.lutgemm_cpu_variant() == best
    assert _C.cpu_kernel_isa("lutgemm", 0) == best
    for name in VARIANTS:
        if supported(name):
            assert _C.cpu_kernel_isa("lutgemm", VARIANT_IDS[name]) == name
    with pytest.raises(ValueError, match="op"):
        _C.cpu_kernel_isa("conv", 0)
    with pytest.raises(ValueError, match="variant"):
        _C.cpu_kernel_isa("lutgemm", 4)


X_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", X_DTYPES, ids=str)
def test_bias_beyond_the_first_row_tile(cpu_variant, dtype, generator):
    """n spans several 512-row work tiles (odd n, the last tile nearly empty): every output row
    gets its own bias element, not the one at its position inside the tile."""
    n, k = 1537, 128
    qweight = random_bcq_weight(n, k, 3, 64, "general", generator=generator)
    # a bias as large as the products, distinct per row, so that a misread one cannot hide
    bias = (4 * torch.randn(n, generator=generator)).to(dtype)
    for m in (1, 5):
        x = torch.randn(m, k, generator=generator).to(dtype)
        out = poisoned_call(x, qweight, bias)
        ref = lutgemm_reference(x, qweight, bias)
        naive = (x.float() @ qweight.dequantize(torch.float32).t() + bias.float()).to(dtype)
        assert_close_to_reference(out, ref, naive)
        # the bias alone: out(x, bias) - out(x, None) is the bias, row by row
        shift = out.double() - poisoned_call(x, qweight).double()
        tol = 1e-5 if dtype == torch.float32 else 0.1
        assert (shift - bias.double()).abs().max().item() < tol * (1 + bias.double().abs().max().item())


@pytest.mark.parametrize("tables", ["float", "int16"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_output_is_the_rounded_float32_result(cpu_variant, dtype, tables, generator):
    """fp16/bf16 outputs are the float32 result rounded to nearest, ties to even: the kernel on
    the same values given as float32 (bitwise the same arithmetic, same tables) rounded by
    torch's own conversion. Truncation (or any other rounding) differs on about half the
    elements."""
    n, k = 600, 256
    qweight = random_bcq_weight(n, k, 3, 128, "general", generator=generator)
    x = torch.randn(9, k, generator=generator).to(dtype)
    bias = torch.randn(n, generator=generator).to(dtype)
    with cpu_tables(tables):
        out = poisoned_call(x, qweight, bias)
        exact = poisoned_call(x.float(), qweight, bias.float())
    # the test means something only if the float32 results need rounding
    assert (exact.to(dtype).float() != exact).double().mean().item() > 0.9
    assert torch.equal(out, exact.to(dtype)), (out != exact.to(dtype)).sum().item()


def all_ones_weight(n, k=32):
    """1 bit, one group, alpha 1, offset 0, every code +1: Ŵ is all ones, out[i, r] = Σ x[i]."""
    rows = padded_rows(n)
    planes = torch.zeros(words_per_row(k), 1, rows, dtype=torch.int32)
    planes[:, :, :n] = -1  # every bit set
    meta = torch.zeros(1, meta_per_group(1, "general"), rows)
    meta[0, 0, :n] = 1.0
    return BCQWeight(planes, meta, (n, k), 1, k, "general")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_output_rounds_ties_to_even(cpu_variant, dtype):
    """Sums exact in float32 that fall exactly halfway between two fp16/bf16 values (and just
    off halfway) round like torch: ties to the even neighbour."""
    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)  # spacing of the type in [1, 2)
    pairs = [(1.0, ulp / 2), (1.0 + ulp, ulp / 2), (-1.0, -ulp / 2), (-1.0 - ulp, -ulp / 2),
             (1.0, ulp / 4), (1.0 + ulp, 3 * ulp / 4), (1.0, 3 * ulp / 4), (2.0 + 2 * ulp, ulp)]
    x = torch.zeros(len(pairs), 32, dtype=dtype)
    for row, (a, b) in enumerate(pairs):
        x[row, 0], x[row, 5] = a, b
        assert x[row, 0].item() == a and x[row, 5].item() == b  # both exact in the type
    sums = torch.tensor([a + b for a, b in pairs], dtype=torch.float32)
    with cpu_tables("float"):  # exact sums: int16 tables would round ulp / 4 away
        out = poisoned_call(x, all_ones_weight(3))
    expected = sums.to(dtype)[:, None].expand(-1, 3)
    assert torch.equal(out, expected), (out[:, 0].tolist(), expected[:, 0].tolist())


# int16 tables (csrc/lutgemm_cpu_int16.h): the default for float16/bfloat16 x, an opt-in for
# float32 x. Approximate: each table entry carries a relative error of about 2^-15 of its
# group's scale, so they are held to the fp16/bf16 rule (2x the naive error + 1e-4 max|ref|),
# and float32 x to INT16_FP32_RTOL.
INT16_FP32_RTOL = 5e-4  # measured 1.0e-4 .. 1.5e-4 on random inputs


def low_precision_naive(x, qweight, bias=None):
    """The same product done naively in x's precision: the low-precision rule's yardstick."""
    out = x.float() @ qweight.dequantize(x.dtype).float().t()
    return (out if bias is None else out + bias.float()).to(x.dtype)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("mode", ["general", "uniform"])
@pytest.mark.parametrize("group_size", [32, 128, None])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_int16_tables_match_reference(cpu_variant, bits, mode, group_size, dtype, generator):
    n, k = 37, 256
    qweight = random_bcq_weight(n, k, bits, group_size, mode, generator=generator)
    bias = torch.randn(n, generator=generator).to(dtype)
    assert _C.lutgemm_cpu_tables() == "auto"  # float16/bfloat16 x take int16 tables by default
    for m in (1, 2, 3, 4, 5, 7, 8, 9, 17):
        x = torch.randn(m, k, generator=generator).to(dtype)
        out = poisoned_call(x, qweight, bias)
        assert_close_to_reference(out, lutgemm_reference(x, qweight, bias),
                                  low_precision_naive(x, qweight, bias))


@pytest.mark.parametrize("n,k,group_size", [(1, 32, 32), (5, 100, 100), (9, 33, None),
                                            (530, 64, 64), (1100, 320, 160), (3, 1, None),
                                            (70, 4096, 128), (600, 1000, None)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_int16_tables_odd_shapes(cpu_variant, n, k, group_size, dtype, generator):
    # odd n (a partial last 32/64-row step), k with a partial last word, several row tiles
    qweight = random_bcq_weight(n, k, 3, group_size, "general", generator=generator)
    for m in (1, 6, 70):
        x = (3 * torch.randn(m, k, generator=generator)).to(dtype)
        assert_close_to_reference(poisoned_call(x, qweight), lutgemm_reference(x, qweight),
                                  low_precision_naive(x, qweight))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("mode", ["general", "uniform"])
def test_int16_tables_for_float32_x(cpu_variant, bits, mode, generator):
    """The opt-in: float32 x through int16 tables, within the documented tolerance (and not
    exact, or the test would not be exercising the int16 kernel)."""
    qweight = random_bcq_weight(300, 512, bits, 128, mode, generator=generator)
    x = torch.randn(8, 512, generator=generator)
    ref = lutgemm_reference(x, qweight)
    with cpu_tables("int16"):
        error = relative_error(poisoned_call(x, qweight), ref)
    assert 1e-7 < error < INT16_FP32_RTOL
    with cpu_tables("float"):
        assert relative_error(poisoned_call(x, qweight), ref) < 1e-5


def test_int16_variants_agree_bitwise(generator):
    """The lookups sum integers exactly and the float epilogue is shared: every instruction
    set gives the same bits (the portable loop is the reference of the shuffle kernels)."""
    qweight = random_bcq_weight(1100, 320, 4, 32, "uniform", generator=generator)
    x = torch.randn(11, 320, generator=generator).to(torch.bfloat16)
    outs = []
    for variant in [v for v in VARIANTS if supported(v)]:
        _C.lutgemm_cpu_variant(variant)
        outs.append(poisoned_call(x, qweight))
    _C.lutgemm_cpu_variant("best")
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_int16_tables_propagate_inf_and_nan(cpu_variant, generator):
    """A non-finite activation makes the outputs of its row NaN or inf, as in float32; the
    other rows are unaffected."""
    qweight = random_bcq_weight(40, 128, 2, 64, "general", generator=generator)
    x = torch.randn(3, 128, generator=generator).to(torch.float16)
    x[0, 5], x[2, 100] = float("nan"), float("inf")
    out = poisoned_call(x, qweight)
    assert not out[0].isfinite().any() and not out[2].isfinite().any()
    assert out[1].isfinite().all()


def test_int16_tables_with_tiny_activations(cpu_variant, generator):
    """Activations near the bottom of bfloat16's range (the scale's inverse would overflow
    float32): still within the rule relative to their own magnitude."""
    qweight = random_bcq_weight(24, 64, 3, 32, "general", generator=generator)
    x = (torch.randn(2, 64, generator=generator) * 1e-36).to(torch.bfloat16)
    out = poisoned_call(x, qweight).double() * 1e36
    ref = lutgemm_reference(x, qweight) * 1e36
    assert relative_error(out, ref) < 1e-2


def test_cpu_tables_setting():
    assert _C.lutgemm_cpu_tables() == "auto"
    with cpu_tables("int16"):
        assert _C.lutgemm_cpu_tables() == "int16"
    assert _C.lutgemm_cpu_tables() == "auto"
    with pytest.raises(ValueError, match="name"):
        _C.lutgemm_cpu_tables("int8")
