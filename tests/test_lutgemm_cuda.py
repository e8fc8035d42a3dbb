"""The CUDA lutgemm kernels (cuda/lutgemm_*.cu) against the float64 reference.

Both GPU paths are checked: "lut" (tables of partial sums, the decode path) and "mma" (tensor
cores, the prefill path). The private path argument (_lutgemm and lutgemm_into's
_path) forces one; "auto" leaves the choice to the kernel (by x's dtype and m).
"""

import itertools
import os
import sys

import pytest
import torch

import lutflash
from lutflash import _C
from lutflash.bcq import MODES
from lutflash.testing import assert_close_to_reference, lutgemm_reference, random_bcq_weight, relative_error

lutgemm_module = sys.modules["lutflash.lutgemm"]  # the module; lutflash.lutgemm is the function

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or not _C.built_with_cuda(),
                       reason="needs a CUDA GPU and lutflash built with CUDA"),
    pytest.mark.usefixtures("cuda_device"),  # checks the caller's current device is kept
]

# scripts/multi_gpu_check.sh runs this file with LUTFLASH_TEST_DEVICE=cuda:1, cuda:0 current
DEVICE = os.environ.get("LUTFLASH_TEST_DEVICE", "cuda")
LOWP = [torch.float16, torch.bfloat16]


@pytest.fixture
def path(request):
    """The kernel path to force ("lut", "mma"), or "auto": the kernel's own choice."""
    return getattr(request, "param", "auto")


def weight(n, k, bits, group_size, mode, meta_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return random_bcq_weight(n, k, bits, group_size, mode, meta_dtype, generator=gen).to(DEVICE)


def poisoned_call(x2d, qweight, bias=None, path="auto"):
    """The raw kernel into a NaN-filled output, so that unwritten elements fail."""
    n, k = qweight.shape
    out = torch.full((x2d.shape[0], n), float("nan"), dtype=x2d.dtype, device=x2d.device)
    lutgemm_module.lutgemm_into(x2d, qweight.planes, qweight.meta, bias, out, n, k, qweight.bits,
                              qweight.group_size, MODES.index(qweight.mode),
                              _path=lutgemm_module._PATHS.index(path))
    return out


def naive(x, qweight, bias):
    """The same product done naively in x's precision: the yardstick of the tolerance."""
    w = qweight.dequantize(torch.float64).to(x.dtype)
    out = x @ w.t()
    return out + bias if bias is not None else out


def check(x, qweight, bias, path="auto"):
    ref = lutgemm_reference(x, qweight, bias)
    if path == "auto":
        out = lutflash.lutgemm(x, qweight, bias)
    else:
        out = lutgemm_module._lutgemm(x, qweight, bias, path=path)
    assert out.dtype == x.dtype and out.device == x.device
    assert_close_to_reference(out, ref, naive(x, qweight, bias))
    raw = poisoned_call(x.reshape(-1, x.shape[-1]), qweight, bias, path)
    assert_close_to_reference(raw.reshape(out.shape), ref, naive(x, qweight, bias))


# Every (bits, mode, group) with both dtypes; m cycles so that each value meets each axis value.
M_VALUES = [1, 2, 3, 8, 16, 33, 64, 256]
GRID = list(itertools.product([1, 2, 3, 4], MODES, [32, 128, None], LOWP))


@pytest.mark.parametrize("bits,mode,group_size,dtype", GRID)
def test_matches_reference(bits, mode, group_size, dtype, path):
    n, k = 75, 384  # odd n: padded rows must not leak into the output
    index = GRID.index((bits, mode, group_size, dtype))
    qweight = weight(n, k, bits, group_size, mode, dtype, seed=index)
    bias = torch.randn(n, dtype=dtype, device=DEVICE) if index % 2 else None
    for m in (M_VALUES[index % 8], M_VALUES[(index + 3) % 8], M_VALUES[(index + 5) % 8]):
        check(torch.randn(m, k, dtype=dtype, device=DEVICE), qweight, bias, path=path)


@pytest.mark.parametrize("path", ["lut", "mma"], indirect=True)
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("dtype", LOWP)
def test_both_paths(m, dtype, path):
    # k = 1056: 33 words (an odd number of pipeline words); g = 96 straddles stages;
    # n = 201: odd, two row tiles of the mma path
    for bits, mode, group_size in ((3, "general", 96), (4, "uniform", 32), (1, "general", None)):
        qweight = weight(201, 1056, bits, group_size, mode, dtype, seed=m + bits)
        check(torch.randn(m, 1056, dtype=dtype, device=DEVICE), qweight,
              torch.randn(201, dtype=dtype, device=DEVICE), path=path)


@pytest.mark.parametrize("path", ["lut", "mma", "auto"], indirect=True)
@pytest.mark.parametrize("k", [1, 31, 97, 197])
def test_odd_k_one_group(k, path):
    # g = k: one group per row, k neither even nor a multiple of 32
    qweight = weight(13, k, 3, None, "general", torch.float16, seed=k)
    for m in (1, 5, 70):
        check(torch.randn(m, k, dtype=torch.float16, device=DEVICE), qweight, None, path=path)


@pytest.mark.parametrize("path", ["lut", "mma"], indirect=True)
@pytest.mark.parametrize("m,k", [(1, 8192), (4, 8192), (16, 4096), (64, 4096)])
def test_split_k(m, k, path):
    # few output tiles and a long k: the kernels split k and reduce through the workspace
    qweight = weight(72, k, 3, 128, "uniform", torch.bfloat16, seed=m)
    check(torch.randn(m, k, dtype=torch.bfloat16, device=DEVICE), qweight,
          torch.randn(72, dtype=torch.bfloat16, device=DEVICE), path=path)


@pytest.mark.parametrize("path", ["lut", "mma"], indirect=True)
@pytest.mark.parametrize("meta_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dtype", LOWP)
def test_meta_dtypes(meta_dtype, dtype, path):
    qweight = weight(40, 256, 4, 64, "general", meta_dtype, seed=3)
    for m in (1, 24):
        check(torch.randn(m, 256, dtype=dtype, device=DEVICE), qweight, None, path=path)


@pytest.mark.parametrize("bits", [5, 6, 7, 8])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", ["lut", "mma"], indirect=True)
def test_more_bits(bits, mode, path):
    # m = 3, 17, 130: the 16-, 64- and 128-row tensor-core tiles (general 6..8 bits: a ring of
    # 3 stages); fp32 metadata at 8 bits: the largest stage
    dtype = LOWP[bits % 2]
    meta_dtype = torch.float32 if bits == 8 else dtype
    qweight = weight(30, 320, bits, 64, mode, meta_dtype, seed=bits)
    for m in (1, 3, 17, 130):
        check(torch.randn(m, 320, dtype=dtype, device=DEVICE), qweight, None, path=path)


@pytest.mark.parametrize("mode", MODES)
def test_fp32_activations(mode):
    qweight = weight(77, 320, 3, 32, mode, torch.float32, seed=5)
    bias = torch.randn(77, device=DEVICE)
    for m in (1, 2, 3, 9, 70):
        x = torch.randn(m, 320, device=DEVICE)
        ref = lutgemm_reference(x, qweight, bias)
        assert relative_error(lutflash.lutgemm(x, qweight, bias), ref) < 1e-5
        assert relative_error(poisoned_call(x, qweight, bias), ref) < 1e-5


@pytest.mark.parametrize("dtype", LOWP)
def test_large_m_tiles(dtype):
    # several m and n tiles of the mma path, no split
    qweight = weight(300, 512, 3, 128, "general", dtype, seed=11)
    bias = torch.randn(300, dtype=dtype, device=DEVICE)
    check(torch.randn(600, 512, dtype=dtype, device=DEVICE), qweight, bias)


@pytest.mark.parametrize("path", ["lut", "mma"], indirect=True)
def test_strided_unaligned_x(path):
    # rows ldx = k + 3 apart, starting one element in: no alignment beyond the element size
    qweight = weight(50, 160, 2, 32, "uniform", torch.float16, seed=2)
    for m in (1, 3, 40):
        wide = torch.randn(m, 163, dtype=torch.float16, device=DEVICE)
        x = wide[:, 1:161]
        assert x.stride(0) == 163 and x.data_ptr() % 4 == 2
        check(x, qweight, None, path=path)


@pytest.mark.parametrize("dtype", LOWP + [torch.float32])
def test_matches_cpu_kernel(dtype):
    qweight = weight(90, 448, 3, 64, "general", torch.float32, seed=8)
    cpu_weight = qweight.to("cpu")
    for m in (1, 6, 50):
        x = torch.randn(m, 448, dtype=dtype)
        gpu = lutflash.lutgemm(x.to(DEVICE), qweight).cpu().double()
        cpu = lutflash.lutgemm(x, cpu_weight).double()
        ref = lutgemm_reference(x, cpu_weight)
        tol = 1e-5 if dtype == torch.float32 else 3 * relative_error(naive(x.to(DEVICE), qweight, None), ref)
        assert relative_error(gpu, cpu) < tol + 1e-6


def test_quantized_linear():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(257, 512, generator=gen)
    qweight = lutflash.quantize(w, bits=3, group_size=128, method="greedy").to(DEVICE, torch.float16)
    for m in (1, 4, 100):
        check(torch.randn(m, 512, dtype=torch.float16, device=DEVICE), qweight, None)


def test_grad_x():
    qweight = weight(64, 256, 3, 128, "general", torch.float32, seed=4)
    bias = torch.randn(64, device=DEVICE, requires_grad=True)
    x = torch.randn(2, 5, 256, device=DEVICE, requires_grad=True)
    out = lutflash.lutgemm(x, qweight, bias)
    grad = torch.randn_like(out)
    out.backward(grad)
    w = qweight.dequantize(torch.float64).cpu()
    expect = grad.double().cpu() @ w
    assert relative_error(x.grad, expect) < 1e-5
    assert relative_error(bias.grad, grad.double().sum((0, 1)).cpu()) < 1e-5


@pytest.mark.parametrize("m", [1, 64])
def test_cuda_graph(m):
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 384)
    layer = lutflash.nn.LutLinear.from_linear(linear, bits=3, group_size=128, method="rtn").to(DEVICE).half()
    static_x = torch.randn(m, 512, dtype=torch.float16, device=DEVICE)
    stream = torch.cuda.Stream(device=DEVICE)
    stream.wait_stream(torch.cuda.current_stream(DEVICE))
    with torch.cuda.stream(stream):  # warm-up outside the graph, as torch asks
        layer(static_x)
    torch.cuda.current_stream(DEVICE).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(DEVICE), torch.cuda.graph(graph):
        static_out = layer(static_x)
    for _ in range(3):
        static_x.copy_(torch.randn(m, 512, dtype=torch.float16, device=DEVICE))
        graph.replay()
        torch.cuda.synchronize(DEVICE)
        expect = layer(static_x)
        assert_close_to_reference(static_out, lutgemm_reference(static_x, layer.qweight, layer.bias),
                                  naive(static_x, layer.qweight, layer.bias))
        assert torch.allclose(static_out, expect, rtol=1e-2, atol=1e-2)


def test_non_default_stream():
    qweight = weight(200, 1024, 3, 128, "uniform", torch.float16, seed=9)
    stream = torch.cuda.Stream(device=DEVICE)
    xs = [torch.randn(m, 1024, dtype=torch.float16, device=DEVICE) for m in (1, 16, 130)]
    torch.cuda.synchronize(DEVICE)
    with torch.cuda.stream(stream):
        outs = [lutflash.lutgemm(x, qweight) for x in xs]
    stream.synchronize()
    for x, out in zip(xs, outs, strict=True):
        assert_close_to_reference(out, lutgemm_reference(x, qweight), naive(x, qweight, None))


@pytest.mark.parametrize("path", ["lut", "auto"], indirect=True)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("mode", MODES)
def test_decode_rows(m, mode, path):
    # lutgemm_decode.cu: m ≤ 8 in activation-row tiles of 1, 2 or 4 (gridDim.z for m > 4);
    # n = 203 (odd, a partial 16-row set), k = 1056 (33 words: a partial slab), every group size
    # kind, every bit count, poisoned outputs (check), fp32 and 16-bit metadata
    for bits, group_size, meta_dtype in ((1, 32, torch.float16), (2, 96, torch.float32),
                                         (3, None, torch.bfloat16), (4, 352, torch.float16),
                                         (3, 32, torch.float32)):
        qweight = weight(203, 1056, bits, group_size, mode, meta_dtype, seed=17 * m + bits)
        dtype = torch.bfloat16 if bits % 2 else torch.float16
        check(torch.randn(m, 1056, dtype=dtype, device=DEVICE), qweight,
              torch.randn(203, dtype=dtype, device=DEVICE) if m % 2 else None, path=path)


@pytest.mark.parametrize("m", [1, 2, 4, 6])
def test_decode_split_k_rows(m):
    # long k, few rows: many slabs reduced through the workspace, several m tiles for m = 6
    qweight = weight(40, 12288, 3, 128, "general", torch.float16, seed=m)
    check(torch.randn(m, 12288, dtype=torch.float16, device=DEVICE), qweight, None)
    x = torch.randn(m, 12288, dtype=torch.float32, device=DEVICE)  # fp32 x takes the decode kernel too
    check(x, qweight, None)


@pytest.mark.parametrize("m", [1, 4, 8])
@pytest.mark.parametrize("n", [20000, 40000])
def test_decode_many_rows_few_slabs(m, n):
    # tens of thousands of rows over 2 or 4 slabs of k: long row tiles reduced through the
    # workspace, with a bias
    qweight = weight(n, 1024, 3, 128, "uniform", torch.float16, seed=n + m)
    check(torch.randn(m, 1024, dtype=torch.float16, device=DEVICE), qweight,
          torch.randn(n, dtype=torch.float16, device=DEVICE), path="lut")


@pytest.mark.parametrize("m", [17, 32, 48, 64])
def test_mma_tiles_on_a_wide_layer(m):
    # many column tiles and split k, as on LLM layers; the reference is computed on the GPU
    qweight = weight(12288, 4096, 3, 128, "general", torch.float16, seed=m)
    x = torch.randn(m, 4096, dtype=torch.float16, device=DEVICE)
    out = poisoned_call(x, qweight)
    w64 = qweight.dequantize(torch.float64)
    ref = x.double() @ w64.t()
    assert_close_to_reference(out, ref, (x @ w64.to(x.dtype).t()))


@pytest.mark.parametrize("path", ["mma"], indirect=True)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m", [80, 256])
def test_mma_split_k_large_m(m, mode, bits, path):
    # few (m, n) tiles at m > 64: the pipelined kernel splits k (fp32 workspace, float4
    # atomics); n = 520 leaves a partial 256-row tile, m = 80 a partial 128-row tile
    dtype = LOWP[(bits + m) % 2]
    qweight = weight(520, 2048, bits, 128, mode, dtype, seed=bits + m)
    check(torch.randn(m, 2048, dtype=dtype, device=DEVICE), qweight,
          torch.randn(520, dtype=dtype, device=DEVICE), path=path)


@pytest.mark.parametrize("path", ["mma"], indirect=True)
@pytest.mark.parametrize("meta_dtype", [torch.float32, torch.bfloat16])
def test_mma_groups_and_odd_words(meta_dtype, path):
    # g = 32: a new group every word; k = 1600 = 50 words: a last stage with one word;
    # m = 130: two 128-row tiles, the second with 2 rows
    for bits, mode in ((2, "general"), (3, "uniform")):
        qweight = weight(264, 1600, bits, 32, mode, meta_dtype, seed=bits)
        check(torch.randn(130, 1600, dtype=torch.bfloat16, device=DEVICE), qweight, None, path=path)


def clean_workspaces_are_zero():
    torch.cuda.synchronize(DEVICE)
    return all(not buf.any() for buf in lutgemm_module._clean_workspaces.values())


def test_decode_clean_workspace():
    # the decode kernel leaves its per-stream workspace (counters and split-k sums) zero, so
    # calls of any shape can follow each other without a memset
    for i, (m, n, k, bits, mode) in enumerate([(1, 203, 12288, 3, "uniform"),
                                               (1, 4100, 4096, 4, "uniform"),
                                               (2, 203, 4096, 3, "general"),
                                               (1, 40, 12288, 3, "general"),
                                               (6, 1030, 2048, 4, "uniform"),
                                               (1, 203, 12288, 3, "uniform")]):
        qweight = weight(n, k, bits, 128, mode, torch.float16, seed=100 + i)
        x = torch.randn(m, k, dtype=torch.float16, device=DEVICE)
        for _ in range(2):
            check(x, qweight, None)
        assert clean_workspaces_are_zero()


def test_decode_two_streams():
    # each stream has its own clean workspace: interleaved calls on two streams stay right
    qweights = [weight(1030, 8192, 3, 128, "uniform", torch.float16, seed=s) for s in (1, 2)]
    xs = [torch.randn(1, 8192, dtype=torch.float16, device=DEVICE) for _ in range(2)]
    streams = [torch.cuda.Stream(device=DEVICE) for _ in range(2)]
    torch.cuda.synchronize(DEVICE)
    outs = [[], []]
    for _ in range(20):
        for s in range(2):
            with torch.cuda.stream(streams[s]):
                outs[s].append(lutflash.lutgemm(xs[s], qweights[s]))
    torch.cuda.synchronize(DEVICE)
    for s in range(2):
        ref = lutgemm_reference(xs[s], qweights[s])
        for out in outs[s]:
            assert_close_to_reference(out, ref, naive(xs[s], qweights[s], None))
    assert clean_workspaces_are_zero()


def test_decode_graph_then_eager():
    # a captured call zeroes a workspace of its own; eager calls on the capture stream and
    # replays interleave without disturbing each other
    qweight = weight(1030, 8192, 3, 128, "uniform", torch.float16, seed=5)
    static_x = torch.randn(1, 8192, dtype=torch.float16, device=DEVICE)
    stream = torch.cuda.Stream(device=DEVICE)
    stream.wait_stream(torch.cuda.current_stream(DEVICE))
    with torch.cuda.stream(stream):
        lutflash.lutgemm(static_x, qweight)
    torch.cuda.current_stream(DEVICE).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(DEVICE), torch.cuda.graph(graph):
        static_out = lutflash.lutgemm(static_x, qweight)
    x2 = torch.randn(1, 8192, dtype=torch.float16, device=DEVICE)
    for _ in range(3):
        static_x.copy_(torch.randn(1, 8192, dtype=torch.float16, device=DEVICE))
        graph.replay()
        eager = lutflash.lutgemm(x2, qweight)
        torch.cuda.synchronize(DEVICE)
        assert_close_to_reference(static_out, lutgemm_reference(static_x, qweight),
                                  naive(static_x, qweight, None))
        assert_close_to_reference(eager, lutgemm_reference(x2, qweight), naive(x2, qweight, None))
    assert clean_workspaces_are_zero()


@pytest.mark.parametrize("path", ["mma"], indirect=True)
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_mma_uniform_weights_exact(bits, dtype, path):
    # x = rows of the identity: the output is the kernel's dequantized weight tile itself, which
    # must be the float64 value rounded once to x's dtype (the uniform mode's integer-code
    # dequantization, or for 5..8 bits sums of ±2^(i−1): every step but the last fma is
    # exact). m = 16, 64, 256: each tile height.
    k, n = 256, 75
    qweight = weight(n, k, bits, 32 if bits % 2 else 128, "uniform", dtype, seed=bits)
    exact = qweight.dequantize(torch.float64).to(dtype).t()  # (k, n)
    for m in (16, 64, 256):
        x = torch.eye(k, dtype=dtype, device=DEVICE)[:m]
        out = poisoned_call(x, qweight, path=path)
        assert torch.equal(out, exact[:m]), (out - exact[:m]).abs().max().item()


@pytest.mark.parametrize("m", [1, 2, 4])
def test_sees_the_previous_kernels_writes(m):
    """Weights, metadata and x written by the kernels just before a decode call, with no
    synchronization, are the ones it uses (a kernel that started early or cached weights
    across calls would not)."""
    gen = torch.Generator().manual_seed(5)
    n, k = 3000, 4096
    a, b = (weight(n, k, 3, 128, "uniform", torch.float16, seed) for seed in (1, 2))
    layer = weight(n, k, 3, 128, "uniform", torch.float16, 3)
    xs = [torch.randn(m, k, generator=gen).half().to(DEVICE) for _ in range(2)]
    x = torch.empty_like(xs[0])
    want = {(i, j): naive(xs[j], w, None) for i, w in enumerate((a, b)) for j in range(2)}
    outs = []
    for step in range(12):
        i, j = step % 2, (step // 2) % 2
        src = (a, b)[i]
        layer.planes.copy_(src.planes)  # kernels that write what the next one reads
        layer.meta.copy_(src.meta)
        x.copy_(xs[j])
        outs.append(((i, j), lutflash.lutgemm(x, layer)))
    for key, out in outs:  # another weight or x than the intended gives an error of ~1.4
        assert relative_error(out.float(), want[key].float()) < 1e-2, key
