"""The CPU LUT-GEMM kernel against the float64 reference (dequantize, then matmul)."""

import itertools

import pytest
import torch

import lutflash
from lutflash import _C
from lutflash.testing import assert_close_to_reference, lutgemm_reference, random_bcq_weight, relative_error

VARIANTS = ["portable", "avx2", "avx512"]


def supported(variant):
    order = ["portable", "avx2", "avx512"]
    return order.index(variant) <= order.index(_C.lutgemm_cpu_variant())


@pytest.fixture(params=VARIANTS)
def cpu_variant(request):
    if not supported(request.param):
        pytest.skip(f"this CPU has no {request.param}")
    _C.lutgemm_cpu_variant(request.param)
    yield request.param
    _C.lutgemm_cpu_variant("best")


def poisoned_call(x, qweight, bias=None):
    """Calls the raw kernel into a NaN-filled output so that unwritten elements fail."""
    n, k = qweight.shape
    x2d = x.reshape(-1, k)
    out = torch.full((x2d.shape[0], n), float("nan"), dtype=x.dtype)
    lutflash.ops.lutgemm_into(x2d, qweight.planes, qweight.meta, bias, out, n, k, qweight.bits,
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
