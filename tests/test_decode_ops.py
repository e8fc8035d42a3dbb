"""lutflash.rms_norm, silu_mul and apply_rotary (lutflash/decode_ops.py, cuda/decode_ops.cu)
against float64 references, on the CPU (the torch composition) and on the GPU (the kernels,
also against the composition they stand for), on random shapes, dtypes and strides; their bad
inputs."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import lutflash
from lutflash import _C

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float64 reference vs a 16-bit result: a few roundings of the output dtype
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    err = (got.double() - want).abs().max().item() if got.numel() else 0.0
    bound = TOL[dtype] * scale * max(1.0, want.abs().max().item() if want.numel() else 0.0)
    assert err <= bound, f"max error {err:.3g} > {bound:.3g} ({dtype})"


def ref_rms_norm(x, weight, eps, residual=None):
    h = x.double() if residual is None else (x + residual).double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.double(), h


def ref_rotary(x, cos, sin):
    x = x.double()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.double() + rotated * sin.double()


def random_rows(rng: random.Random, device, dtype, width: int, generator, lead=None):
    """A (lead..., width) tensor (random leading dimensions unless given), sometimes a strided
    slice of a wider buffer."""
    if lead is None:
        lead = [rng.randint(0, 4) if rng.random() < 0.1 else rng.randint(1, 9)
                for _ in range(rng.randint(1, 3))]
    pad = rng.choice((0, 0, 3, 8))
    base = torch.randn(*lead, width + pad, generator=generator, dtype=torch.float32)
    return base.to(device, dtype)[..., pad:]


def rotary_case(rng: random.Random, device, dtype, generator):
    batch, heads, head_dim = rng.randint(1, 6), rng.randint(1, 9), 2 * rng.randint(1, 80)
    if rng.random() < 0.5:  # q and k sliced out of a fused (batch, 3, heads, head_dim) output
        x = torch.randn(batch, 3, heads, head_dim, generator=generator).to(device, dtype)[:, :2]
    else:
        x = torch.randn(batch, heads, rng.randint(1, 3), head_dim,
                        generator=generator).to(device, dtype)
    rows = rng.choice(("one", "flat", "batch"))
    angles = torch.rand(batch if rows == "batch" else 1, head_dim // 2, generator=generator) * 50
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(device, dtype), angles.sin().to(device, dtype)
    if rows == "flat":
        cos, sin = cos[0], sin[0]
    return x, cos, sin


def expected_rotary(x, cos, sin):
    batch, head_dim = x.shape[0], x.shape[-1]
    shape = (batch if cos.ndim == 2 and cos.shape[0] == batch else 1,) + (1,) * (x.ndim - 2)
    return ref_rotary(x, cos.reshape(*shape, head_dim), sin.reshape(*shape, head_dim))


def check_all(device, generator, cases: int = 40, seed: int = 7) -> None:
    rng = random.Random(seed)
    for _ in range(cases):
        dtype = rng.choice(DTYPES)
        hidden = rng.choice((1, 7, 64, 257, 1000, 4096, rng.randint(1, 3000)))
        x = random_rows(rng, device, dtype, hidden, generator)
        weight = (1 + 0.1 * torch.randn(hidden, generator=generator)).to(device, dtype)
        eps = rng.choice((1e-6, 1e-5, 0.0 if hidden > 1 else 1e-6))
        residual = (random_rows(rng, device, dtype, hidden, generator, lead=x.shape[:-1])
                    if rng.random() < 0.5 else None)
        got = lutflash.rms_norm(x, weight, eps, residual=residual)
        want, h = ref_rms_norm(x, weight, eps, residual)
        if residual is None:
            close(got, want, dtype, scale=2)
        else:
            close(got[0], want, dtype, scale=2)
            assert torch.equal(got[1], x + residual)

        width = 2 * rng.randint(1, 3000)
        g = random_rows(rng, device, dtype, width, generator) * 4
        gate, up = g.double().split(width // 2, dim=-1)
        close(lutflash.silu_mul(g), F.silu(gate) * up, dtype, scale=2)

        x, cos, sin = rotary_case(rng, device, dtype, generator)
        close(lutflash.apply_rotary(x, cos, sin), expected_rotary(x, cos, sin), dtype, scale=3)


def test_against_float64_cpu(generator):
    check_all(torch.device("cpu"), generator)


@pytest.mark.cuda
def test_against_float64_cuda(cuda_device, generator):
    check_all(cuda_device, generator, cases=120, seed=11)


@pytest.mark.cuda
def test_kernels_equal_the_torch_composition(cuda_device, generator):
    """The kernels follow the composition's roundings: rotary and the residual sum bit for bit,
    the norm and silu within one rounding of the dtype (the order of the norm's sum, silu's
    exp)."""
    rng = random.Random(3)
    for _ in range(30):
        dtype = rng.choice(DTYPES)
        hidden = rng.randint(1, 5000)
        x = random_rows(rng, cuda_device, dtype, hidden, generator)
        weight = torch.randn(hidden, generator=generator).to(cuda_device, dtype)
        residual = torch.randn(x.shape, generator=generator).to(cuda_device, dtype)
        with torch.enable_grad():  # a tensor that needs grad takes the composition
            ref_y, ref_h = lutflash.rms_norm(x, weight.requires_grad_(), 1e-6, residual)
        weight = weight.detach()
        y, h = lutflash.rms_norm(x, weight, 1e-6, residual)
        assert torch.equal(h, ref_h)
        torch.testing.assert_close(y, ref_y.detach(), rtol=TOL[dtype], atol=TOL[dtype])
        g = random_rows(rng, cuda_device, dtype, 2 * rng.randint(1, 2000), generator)
        d = g.shape[-1] // 2
        torch.testing.assert_close(lutflash.silu_mul(g), F.silu(g[..., :d]) * g[..., d:],
                                   rtol=TOL[dtype], atol=TOL[dtype])
        q, cos, sin = rotary_case(rng, cuda_device, dtype, generator)
        got = lutflash.apply_rotary(q, cos, sin)
        with torch.enable_grad():
            want = lutflash.apply_rotary(q.clone().requires_grad_(), cos, sin).detach()
        assert torch.equal(got, want)  # rotary rounds exactly where torch does


@pytest.mark.cuda
def test_graph_capture_and_streams(cuda_device, generator):
    x = torch.randn(3, 4096, generator=generator).to(cuda_device, torch.float16)
    r = torch.randn(3, 4096, generator=generator).to(cuda_device, torch.float16)
    w = torch.randn(4096, generator=generator).to(cuda_device, torch.float16)
    eager = lutflash.rms_norm(x, w, 1e-5, r)
    stream = torch.cuda.Stream(cuda_device)
    stream.wait_stream(torch.cuda.current_stream(cuda_device))
    with torch.cuda.stream(stream):
        side = lutflash.silu_mul(torch.cat((x, r), -1))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            captured = lutflash.rms_norm(x, w, 1e-5, r)
    graph.replay()
    torch.cuda.synchronize(cuda_device)
    assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])
    assert torch.equal(side, lutflash.silu_mul(torch.cat((x, r), -1)))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_gradients(device, generator):
    """With grad needed the composition runs: gradients as torch's own ops give."""
    dev = torch.device(device)
    x = torch.randn(2, 3, 16, generator=generator, dtype=torch.float64).to(dev).requires_grad_()
    w = torch.randn(16, generator=generator, dtype=torch.float64).to(dev).requires_grad_()
    torch.autograd.gradcheck(lambda a, b: lutflash.rms_norm(a, b, 1e-6), (x, w))
    torch.autograd.gradcheck(lutflash.silu_mul, (x,))
    cos, sin = torch.rand(2, 16, dtype=torch.float64, device=dev).unbind(0)
    torch.autograd.gradcheck(lambda a: lutflash.apply_rotary(a, cos, sin), (x,))


def bad_cases(device):
    x = torch.randn(2, 8, device=device)
    w = torch.ones(8, device=device)
    half = x.half()
    return [
        (lambda: lutflash.rms_norm(x.long(), w), TypeError, "x: expected dtype"),
        (lambda: lutflash.rms_norm([1.0], w), TypeError, "x: expected a torch.Tensor"),
        (lambda: lutflash.rms_norm(x, torch.ones(7, device=device)), ValueError,
         r"weight: expected shape \(8,\)"),
        (lambda: lutflash.rms_norm(x, w.half()), TypeError, "weight: expected dtype"),
        (lambda: lutflash.rms_norm(x, w, residual=torch.ones(3, 8, device=device)), ValueError,
         "residual: expected shape"),
        (lambda: lutflash.rms_norm(half, w.half(), residual=x), TypeError,
         "residual: expected dtype"),
        (lambda: lutflash.rms_norm(x, w, eps=-1.0), ValueError, "eps: expected"),
        (lambda: lutflash.rms_norm(x, w, eps=float("nan")), ValueError, "eps: expected"),
        (lambda: lutflash.rms_norm(torch.tensor(1.0, device=device), w), ValueError,
         "x: expected at least 1 dimension"),
        (lambda: lutflash.silu_mul(torch.ones(2, 7, device=device)), ValueError,
         "x: expected an even last dimension"),
        (lambda: lutflash.silu_mul(x.int()), TypeError, "x: expected dtype"),
        (lambda: lutflash.apply_rotary(torch.ones(2, 3, 7, device=device), w[:7], w[:7]),
         ValueError, "x: expected shape"),
        (lambda: lutflash.apply_rotary(x, w, w[:4]), ValueError, "sin: expected cos's shape"),
        (lambda: lutflash.apply_rotary(x, w.half(), w.half()), TypeError, "cos: expected dtype"),
        (lambda: lutflash.apply_rotary(torch.ones(8, device=device), w, w), ValueError,
         "x: expected shape"),
    ]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_bad_inputs(device):
    for call, error, message in bad_cases(device):
        with pytest.raises(error, match=message):
            call()


def test_c_entries_refuse_cpu_tensors_and_bad_arguments():
    x = torch.ones(2, 8)
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        _C.rms_norm(x, None, torch.ones(8), torch.empty(2, 8), None, 1e-6, 0)
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        _C.silu_mul(x, torch.empty(2, 4), 0)
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        _C.rotary(x.view(2, 1, 8), torch.ones(1, 8), torch.ones(1, 8), torch.empty(2, 1, 8), 0)
    with pytest.raises(TypeError, match="takes 7 arguments"):
        _C.rms_norm(x)
    with pytest.raises(ValueError, match="eps: expected a finite number"):
        _C.rms_norm(x, None, torch.ones(8), torch.empty(2, 8), None, -1.0, 0)


@pytest.mark.cuda
def test_c_entries_check_shapes_and_outputs(cuda_device):
    x = torch.ones(2, 8, device=cuda_device)
    w = torch.ones(8, device=cuda_device)
    with pytest.raises(ValueError, match="out: expected shape"):
        _C.rms_norm(x, None, w, torch.empty(2, 9, device=cuda_device), None, 1e-6, 0)
    with pytest.raises(ValueError, match="sum: expected a tensor exactly when residual"):
        _C.rms_norm(x, x.clone(), w, torch.empty(2, 8, device=cuda_device), None, 1e-6, 0)
    with pytest.raises(ValueError, match="out: must not share memory with x"):
        _C.rms_norm(x, None, w, x, None, 1e-6, 0)
    with pytest.raises(ValueError, match="x: expected an even last dimension"):
        _C.silu_mul(torch.ones(2, 7, device=cuda_device), torch.empty(2, 3, device=cuda_device), 0)
    with pytest.raises(ValueError, match="cos: expected shape"):
        _C.rotary(x.view(2, 1, 8), torch.ones(3, 8, device=cuda_device),
                  torch.ones(3, 8, device=cuda_device), torch.empty(2, 1, 8, device=cuda_device), 0)
    with pytest.raises(ValueError, match="x: expected an even head dimension"):
        _C.rotary(torch.ones(2, 1, 7, device=cuda_device), torch.ones(1, 7, device=cuda_device),
                  torch.ones(1, 7, device=cuda_device), torch.empty(2, 1, 7, device=cuda_device), 0)
