"""Property-based tests (hypothesis) of lutflash.lutgemm and LutLinear against the float64
reference (DESIGN.md, "Numerical checks").

Instead of a grid, each test draws a whole call: the layout of the BCQ weight (n, k, bits 1..8,
group size: a multiple of 32 dividing k, or k itself given as k or None, which allows any k,
a partial last packed word included; both modes; float32/float16/bfloat16 metadata), x
(float32/float16/bfloat16, any number of leading dims including none and empty ones, and
non-contiguous layouts: padded rows, an unaligned start, a transposed last dim, broadcast rows,
a row step, permuted batch dims), an optional bias (x's dtype, as lutflash/lutgemm.py requires) and, on the
CPU, the kernel variant (portable/avx2/avx512) or, on the GPU, the path (auto/lut/mma).

Every property is one function taking the device: the CPU tests run it with a fixed seed and
few, small examples; the GPU tests (`@pytest.mark.cuda`, the `cuda_device` fixture) run it with
more examples and shapes large enough to reach every kernel path (m ≤ 2 LUT kernels, the
tensor-core path from m = 3, bits 5..8, split k, several m and n tiles).

Outputs are poisoned: `torch.empty` returns NaN-filled float tensors while lutgemm runs, and
the raw kernel writes into a NaN-filled buffer whose columns past n must stay NaN.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import lutflash
from lutflash import _C
from lutflash.bcq import META_DTYPES, METHODS, MODES, WORD_K
from lutflash.nn import LutLinear
from lutflash.testing import assert_close_to_reference, lutgemm_reference, poisoned_empty, random_bcq_weight

lutgemm_module = sys.modules["lutflash.lutgemm"]  # the module; lutflash.lutgemm is the function

X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
X_LAYOUTS = ("contiguous", "padded_rows", "transposed", "broadcast", "row_step", "permuted")
_VARIANT_ORDER = ("portable", "avx2", "avx512")
CPU_VARIANTS = ("best",) + _VARIANT_ORDER[: _VARIANT_ORDER.index(_C.lutgemm_cpu_variant()) + 1]
GPU_PATHS = ("auto", "lut", "mma")
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Profile:
    """What one device's tests draw from."""

    choices: tuple[str, ...]   # CPU kernel variants or GPU paths (lutgemm_module._PATHS)
    max_m: int                 # rows of x (the product of its leading dims)
    edge_ms: tuple[int, ...]   # values of m at the kernels' tile boundaries
    small_n: int               # n is drawn in [1, small_n] or [large_n[0], large_n[1]]
    large_n: tuple[int, int]
    max_k: int
    quant_n: int               # weight shape for quantize-then-lutgemm
    quant_k: int


# CPU: m crosses the kernel's 4-row passes and 64-row table blocks; n crosses the 512-row tile.
CPU_PROFILE = Profile(CPU_VARIANTS, max_m=70, edge_ms=(3, 4, 5, 63, 64, 65, 70), small_n=100,
                      large_n=(500, 1100), max_k=640, quant_n=48, quant_k=256)
# GPU: m up to 300 (lut for m <= 2 or fp32 x, mma from m = 3, tiles of 16/64/128 rows), n and
# k up to 8192 (split k, many column tiles).
GPU_PROFILE = Profile(GPU_PATHS, max_m=300,
                      edge_ms=(2, 3, 4, 8, 9, 16, 17, 63, 64, 65, 128, 129, 256, 300),
                      small_n=300, large_n=(301, 8192), max_k=8192, quant_n=600, quant_k=1024)

_CPU_SETTINGS = settings(derandomize=True, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow])
_GPU_SETTINGS = settings(derandomize=True, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                HealthCheck.function_scoped_fixture])


def cpu_settings(max_examples: int):
    """A fixed seed and few examples: the CPU profile, run by CI."""
    return settings(_CPU_SETTINGS, max_examples=max_examples)


def gpu_settings(max_examples: int):
    """A fixed seed too, and more examples over larger shapes: the GPU profile."""
    return settings(_GPU_SETTINGS, max_examples=max_examples)


def needs_cuda(test):
    test = pytest.mark.cuda(test)
    return pytest.mark.skipif(not torch.cuda.is_available() or not _C.built_with_cuda(),
                              reason="needs a CUDA GPU and lutflash built with CUDA")(test)


# ------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------


@st.composite
def k_and_group(draw, max_k: int):
    """(k, group_size argument): g = k (passed as k or None) allows any k, a partial last word
    included; otherwise g is a multiple of 32 dividing k."""
    if draw(st.booleans()):
        k = draw(st.one_of(st.integers(1, 100), st.integers(1, max_k)))
        return k, draw(st.sampled_from((None, k)))
    g = WORD_K * draw(st.one_of(st.integers(1, 4), st.integers(1, max_k // WORD_K)))
    return g * draw(st.integers(1, max(1, max_k // g))), g


def divisors(m: int) -> list[int]:
    return [d for d in range(1, m + 1) if m % d == 0]


@st.composite
def leading_shapes(draw, max_m: int, edge_ms: tuple[int, ...] = (0, 1)):
    """x.shape[:-1]: () (a 1-D x), or 1..3 dims whose product m is in [0, max_m], drawn with
    extra weight on `edge_ms` (tile boundaries of the kernels)."""
    if draw(st.integers(0, 7)) == 0:
        return ()
    m = draw(st.one_of(st.integers(0, 8), st.sampled_from(edge_ms), st.integers(0, max_m)))
    dims, rest = [], m
    for _ in range(draw(st.integers(0, 2))):
        d = draw(st.sampled_from(divisors(rest))) if rest else draw(st.integers(0, 3))
        dims.append(d)
        rest = rest // d if rest else 0
    dims.append(rest)
    return tuple(draw(st.permutations(dims)))


@dataclass(frozen=True)
class Case:
    n: int
    k: int
    group_size: int | None
    bits: int
    mode: str
    meta_dtype: torch.dtype
    lead: tuple[int, ...]
    x_dtype: torch.dtype
    x_layout: str
    x_offset: int          # "padded_rows": first column of x inside its wider rows
    bias: bool
    choice: str            # CPU variant or GPU path
    out_guard: int         # extra NaN columns past n in the raw kernel's output
    seed: int

    def weight(self, device):
        gen = torch.Generator().manual_seed(self.seed)
        return random_bcq_weight(self.n, self.k, self.bits, self.group_size, self.mode,
                                 self.meta_dtype, device=device, generator=gen)

    def inputs(self, device):
        """(x, bias) on device, x in the drawn layout, never all zeros."""
        gen = torch.Generator().manual_seed(self.seed + 1)
        x = make_x(self.lead, self.k, self.x_dtype, self.x_layout, self.x_offset, gen, device)
        bias = None
        if self.bias:
            bias = torch.randn(self.n, generator=gen).to(self.x_dtype).to(device)
        return x, bias


def make_x(lead, k, dtype, layout, offset, gen, device):
    """A (*lead, k) tensor whose memory layout is `layout`. The values are drawn and rounded
    to dtype before the view is taken, so the view's strides are what the op sees."""
    scale = k ** -0.5  # keeps fp16 outputs of 8-bit weights with k = 8192 far from overflow

    def base(*shape):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    if layout == "padded_rows":  # rows wider than k, x starting `offset` elements in
        return base(*lead, k + offset + 3)[..., offset:offset + k]
    if layout == "transposed" and lead:  # the last dim is not contiguous
        return base(k, *lead).movedim(0, -1)
    if layout == "broadcast" and lead:  # stride-0 rows
        return base(k).expand(*lead, k)
    if layout == "row_step" and lead:
        return base(2 * lead[0], *lead[1:], k)[::2]
    if layout == "permuted" and len(lead) >= 2:  # batch dims in a non-contiguous order
        return base(*reversed(lead), k).permute(*reversed(range(len(lead))), len(lead))
    return base(*lead, k)


@st.composite
def cases(draw, profile: Profile, bits: tuple[int, int] = (1, 8)):
    k, group_size = draw(k_and_group(profile.max_k))
    n = draw(st.one_of(st.integers(1, profile.small_n), st.integers(*profile.large_n)))
    return Case(
        n=n, k=k, group_size=group_size, bits=draw(st.sampled_from(range(bits[0], bits[1] + 1))),
        mode=draw(st.sampled_from(MODES)), meta_dtype=draw(st.sampled_from(META_DTYPES)),
        lead=draw(leading_shapes(profile.max_m, profile.edge_ms)),
        x_dtype=draw(st.sampled_from(X_DTYPES)), x_layout=draw(st.sampled_from(X_LAYOUTS)),
        x_offset=draw(st.integers(0, 3)), bias=draw(st.booleans()),
        choice=draw(st.sampled_from(profile.choices)), out_guard=draw(st.integers(0, 3)),
        seed=draw(st.integers(0, 2**31 - 1)))


@dataclass(frozen=True)
class GradCase:
    case: Case
    via: str               # "function" (lutflash.lutgemm) or "module" (LutLinear)
    grad_x: bool
    grad_bias: bool
    grad_chunks: int | None  # backward dequantizes Ŵ in about this many column blocks (None: one)


@st.composite
def grad_cases(draw, profile: Profile):
    grads = draw(st.sampled_from(("x", "bias", "both")))
    case = draw(cases(profile))
    if grads != "x":
        case = dataclasses.replace(case, bias=True)
    return GradCase(case, via=draw(st.sampled_from(("function", "module"))),
                    grad_x=grads != "bias", grad_bias=grads != "x",
                    grad_chunks=draw(st.sampled_from((None, 2, 3))))


@dataclass(frozen=True)
class QuantCase:
    n: int
    k: int
    group_size: int | None
    bits: int
    method: str
    mode: str | None
    rounds: int
    meta_dtype: torch.dtype | None
    w_dtype: torch.dtype
    w_scale: float
    lead: tuple[int, ...]
    x_dtype: torch.dtype
    bias: bool
    choice: str
    seed: int


@st.composite
def quant_cases(draw, profile: Profile):
    k, group_size = draw(k_and_group(profile.quant_k))
    method = draw(st.sampled_from(METHODS))
    mode = draw(st.sampled_from((None, "uniform", "general") if method == "rtn"
                                else (None, "general")))
    return QuantCase(
        n=draw(st.integers(1, profile.quant_n)), k=k, group_size=group_size,
        bits=draw(st.sampled_from(range(1, 9))), method=method, mode=mode, rounds=draw(st.integers(0, 15)),
        meta_dtype=draw(st.sampled_from((None,) + META_DTYPES)),
        w_dtype=draw(st.sampled_from((torch.float32, torch.float16, torch.bfloat16,
                                      torch.float64))),
        w_scale=draw(st.sampled_from((1e-3, 0.02, 1.0, 30.0))),
        lead=draw(leading_shapes(min(profile.max_m, 40))), x_dtype=draw(st.sampled_from(X_DTYPES)),
        bias=draw(st.booleans()), choice=draw(st.sampled_from(profile.choices)),
        seed=draw(st.integers(0, 2**31 - 1)))


# ------------------------------------------------------------------------------------------
# Checking code, shared by the CPU and GPU tests
# ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def kernel_choice(device: torch.device, choice: str):
    """Selects the CPU kernel variant or forces the GPU path for the duration."""
    if device.type == "cpu":
        _C.lutgemm_cpu_variant(choice)
        try:
            yield
        finally:
            _C.lutgemm_cpu_variant("best")
        return
    if choice == "auto":
        yield
        return
    into = lutgemm_module.lutgemm_into

    def forced(x2d, *args, **kwargs):
        # the tensor-core path takes float16/bfloat16 x only (float32 is refused: a bad-input test)
        path = "lut" if choice == "mma" and x2d.dtype == torch.float32 else choice
        kwargs["_path"] = lutgemm_module._PATHS.index(path)
        return into(x2d, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lutgemm_module, "lutgemm_into", forced)  # what lutflash.lutgemm's kernel calls
        yield


@contextlib.contextmanager
def poisoned_outputs():
    """NaN-filled torch.empty (lutflash.testing.poisoned_empty) for the duration."""
    with pytest.MonkeyPatch.context() as mp:
        poisoned_empty(mp)
        yield


def reference(x, qweight, bias=None):
    """x · Ŵᵀ + bias in float64: lutgemm_reference on the CPU; the same formula on the GPU
    (a float64 dequantization and matmul of 8192 × 8192 weights is slow on the host)."""
    if x.device.type == "cpu":
        return lutgemm_reference(x, qweight, bias)
    out = x.detach().double() @ qweight.dequantize(torch.float64).t()
    return out if bias is None else out + bias.detach().double()


def naive(x, qweight, bias=None):
    """The same product done naively in x's precision (tests/test_lutgemm_cpu.py's rule):
    weight rounded to x's dtype, float32 accumulation, one rounding, then the bias added."""
    out = (x.float() @ qweight.dequantize(x.dtype).float().t()).to(x.dtype)
    return out if bias is None else out + bias


def assert_matches(out, ref, lowp_naive):
    """fp32: relative norm error < 1e-5; fp16/bf16: ≤ 2 × naive's max error + a floor."""
    assert torch.isfinite(ref).all()
    assert not torch.isnan(out).any(), "output has NaN (an element left unwritten?)"
    assert_close_to_reference(out, ref.to(out.device), lowp_naive)


def raw_into_poisoned(x, qweight, bias, guard):
    """lutgemm_module.lutgemm_into on an (m, n) view of a NaN-filled (m, n + guard) buffer:
    returns (out, the guard columns), which must stay NaN."""
    n, k = qweight.shape
    x2d = x.reshape(-1, k)
    if x2d.stride(-1) != 1 or (x2d.shape[0] > 1 and x2d.stride(0) < k):
        x2d = x2d.contiguous()  # the kernel's input contract (lutgemm_module._lutgemm_kernel does this)
    buffer = torch.full((x2d.shape[0], n + guard), math.nan, dtype=x.dtype, device=x.device)
    lutgemm_module.lutgemm_into(x2d, qweight.planes, qweight.meta, bias, buffer[:, :n], n, k,
                              qweight.bits, qweight.group_size, MODES.index(qweight.mode))
    return buffer[:, :n].reshape(*x.shape[:-1], n), buffer[:, n:]


def check_forward(case: Case, device: torch.device):
    qweight = case.weight(device)
    x, bias = case.inputs(device)
    ref, lowp = reference(x, qweight, bias), naive(x, qweight, bias)
    with kernel_choice(device, case.choice):
        with poisoned_outputs():
            out = lutflash.lutgemm(x, qweight, bias)
        raw, guard = raw_into_poisoned(x, qweight, bias, case.out_guard)
    assert out.shape == (*x.shape[:-1], case.n)
    assert out.dtype == x.dtype and out.device == x.device
    assert_matches(out, ref, lowp)
    assert_matches(raw, ref, lowp)
    assert torch.isnan(guard).all(), "the kernel wrote past column n of its output"


def check_grad(gcase: GradCase, device: torch.device):
    """Forward and backward through lutflash.lutgemm or LutLinear against float64 autograd."""
    case = gcase.case
    qweight = case.weight(device)
    x, bias = case.inputs(device)
    x = x.detach().requires_grad_(gcase.grad_x)  # keeps x's strides
    if gcase.via == "module":
        layer = LutLinear.from_bcq(qweight, bias)
        if bias is not None:
            layer.bias.requires_grad_(gcase.grad_bias)
            bias = layer.bias
    elif bias is not None:
        bias = bias.detach().requires_grad_(gcase.grad_bias)
    gen = torch.Generator().manual_seed(case.seed + 2)
    grad_out = torch.randn(*x.shape[:-1], case.n, generator=gen).to(x.dtype).to(device)

    with contextlib.ExitStack() as stack:
        stack.enter_context(kernel_choice(device, case.choice))
        stack.enter_context(poisoned_outputs())
        if gcase.grad_chunks is not None:  # blocks of whole words/groups, the last partial
            mp = stack.enter_context(pytest.MonkeyPatch.context())
            mp.setattr(lutgemm_module, "_GRAD_CHUNK_ELEMENTS",
                       case.n * -(-case.k // gcase.grad_chunks))
        out = layer(x) if gcase.via == "module" else lutflash.lutgemm(x, qweight, bias)
        out.backward(grad_out)
    assert_matches(out.detach(), reference(x, qweight, bias), naive(x.detach(), qweight, bias))

    weight64 = qweight.dequantize(torch.float64)
    x64 = x.detach().double().requires_grad_()
    out64 = x64 @ weight64.t()
    if bias is not None:
        bias64 = bias.detach().double().requires_grad_()
        out64 = out64 + bias64
    out64.backward(grad_out.double())
    if gcase.grad_x:
        # naive: grad_out · Ŵ done in x's precision
        assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == x.dtype
        assert_matches(x.grad, x64.grad, grad_out @ qweight.dequantize(x.dtype))
    else:
        assert x.grad is None
    if bias is not None:
        if gcase.grad_bias:
            assert bias.grad is not None and bias.grad.dtype == bias.dtype
            assert_matches(bias.grad, bias64.grad, grad_out.reshape(-1, case.n).sum(0))
        else:
            assert bias.grad is None


def check_quantized(qcase: QuantCase, device: torch.device):
    """quantize (rtn/greedy/alternating), then lutgemm: x · Ŵᵀ of the dequantized weight."""
    gen = torch.Generator().manual_seed(qcase.seed)
    weight = (torch.randn(qcase.n, qcase.k, generator=gen) * qcase.w_scale).to(qcase.w_dtype)
    qweight = lutflash.quantize(weight.to(device), qcase.bits, qcase.group_size, qcase.method,
                                rounds=qcase.rounds, mode=qcase.mode, meta_dtype=qcase.meta_dtype)
    assert qweight.device == weight.to(device).device
    x = make_x(qcase.lead, qcase.k, qcase.x_dtype, "contiguous", 0, gen, device)
    bias = torch.randn(qcase.n, generator=gen).to(qcase.x_dtype).to(device) if qcase.bias else None
    with kernel_choice(device, qcase.choice), poisoned_outputs():
        out = lutflash.lutgemm(x, qweight, bias)
    assert out.shape == (*qcase.lead, qcase.n)
    assert_matches(out, reference(x, qweight, bias), naive(x, qweight, bias))


# ------------------------------------------------------------------------------------------
# The tests: each property on the CPU (fixed seed, small) and on the GPU (more, larger)
# ------------------------------------------------------------------------------------------

# n > 512 (more than one CPU row tile) with a bias: a bias read at the tile-local row went
# unnoticed once; these explicit examples always run.
WIDE_WITH_BIAS = Case(n=1030, k=96, group_size=32, bits=3, mode="general",
                      meta_dtype=torch.float32, lead=(5,), x_dtype=torch.float32,
                      x_layout="contiguous", x_offset=0, bias=True, choice="best", out_guard=1,
                      seed=7)
WIDE_WITH_BIAS_BF16 = Case(n=777, k=45, group_size=None, bits=2, mode="uniform",
                           meta_dtype=torch.bfloat16, lead=(2, 3), x_dtype=torch.bfloat16,
                           x_layout="padded_rows", x_offset=1, bias=True, choice="portable",
                           out_guard=2, seed=8)

# the common 3- and 4-bit settings of each quantizer, whatever the derandomized draws give
QUANT_3_AND_4_BITS = [
    QuantCase(n=40, k=256, group_size=128, bits=3, method="alternating", mode=None, rounds=15,
              meta_dtype=torch.float16, w_dtype=torch.float32, w_scale=0.02, lead=(2, 3),
              x_dtype=torch.float16, bias=True, choice="best", seed=1),
    QuantCase(n=33, k=96, group_size=32, bits=4, method="rtn", mode=None, rounds=15,
              meta_dtype=None, w_dtype=torch.bfloat16, w_scale=1.0, lead=(5,),
              x_dtype=torch.bfloat16, bias=False, choice="best", seed=2),
    QuantCase(n=17, k=77, group_size=None, bits=3, method="greedy", mode="general", rounds=0,
              meta_dtype=torch.float32, w_dtype=torch.float32, w_scale=30.0, lead=(3,),
              x_dtype=torch.float32, bias=True, choice="best", seed=3),
]


@cpu_settings(150)
@example(case=WIDE_WITH_BIAS)
@example(case=WIDE_WITH_BIAS_BF16)
@given(case=cases(CPU_PROFILE))
def test_forward_cpu(case):
    check_forward(case, CPU)


@cpu_settings(80)
@given(gcase=grad_cases(CPU_PROFILE))
def test_grad_cpu(gcase):
    check_grad(gcase, CPU)


@cpu_settings(100)
@example(qcase=QUANT_3_AND_4_BITS[0])
@example(qcase=QUANT_3_AND_4_BITS[1])
@example(qcase=QUANT_3_AND_4_BITS[2])
@given(qcase=quant_cases(CPU_PROFILE))
def test_quantize_then_lutgemm_cpu(qcase):
    check_quantized(qcase, CPU)


@needs_cuda
@gpu_settings(120)
@example(case=dataclasses.replace(WIDE_WITH_BIAS, choice="auto"))
@given(case=cases(GPU_PROFILE))
def test_forward_cuda(case, cuda_device):
    check_forward(case, cuda_device)


@needs_cuda
@gpu_settings(50)
@given(case=cases(GPU_PROFILE, bits=(5, 8)))
def test_forward_more_bits_cuda(case, cuda_device):
    # bits 5..8 take the older lut and mma kernels (pipe_kernel and lut1 are for bits <= 4)
    check_forward(case, cuda_device)


@needs_cuda
@gpu_settings(50)
@given(gcase=grad_cases(GPU_PROFILE))
def test_grad_cuda(gcase, cuda_device):
    check_grad(gcase, cuda_device)


@needs_cuda
@gpu_settings(30)
@given(qcase=quant_cases(GPU_PROFILE))
def test_quantize_then_lutgemm_cuda(qcase, cuda_device):
    check_quantized(qcase, cuda_device)

