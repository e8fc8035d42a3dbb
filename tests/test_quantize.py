"""The BCQ quantizers through lutflash.quantize and _C.bcq_quantize: the C quantizers
(csrc/bcq_quantize.c, CPU weights) and their torch twins (lutflash.bcq_torch, CUDA weights; run
here on the CPU through the `impl` fixture), checked against float64 references of rtn and
greedy and the optimality conditions that alternating must reach, and against each other."""

import itertools
import random

import pytest
import torch

import lutflash
from lutflash import _C
from lutflash.bcq import METHODS, MODES, meta_per_group, padded_rows, words_per_row
from lutflash.bcq_torch import quantize_torch

GENERAL, UNIFORM = MODES.index("general"), MODES.index("uniform")
RTN, GREEDY, ALTERNATING = (METHODS.index(m) for m in ("rtn", "greedy", "alternating"))


@pytest.fixture(params=["c", "torch"])
def impl(request, monkeypatch):
    """Which quantizers lutflash.quantize runs for the test's CPU weights: C, or the torch
    path that CUDA weights take (lutflash.bcq_torch)."""
    if request.param == "torch":
        monkeypatch.setattr(lutflash.bcq, "_runs_in_torch", lambda device: True)
    return request.param


def gaussian(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02


def group_errors(qweight, weight):
    """Squared error per (row, group), in float64."""
    n, k = weight.shape
    diff = qweight.dequantize(torch.float64) - weight.double()
    return diff.square().reshape(n, k // qweight.group_size, qweight.group_size).sum(-1)


def mse(qweight, weight):
    return (qweight.dequantize(torch.float64) - weight.double()).square().mean().item()


def stored_scale(qweight):
    """s per (row, group) from rtn metadata: s itself (uniform) or 2·α_0 (general)."""
    s = qweight.meta[:, 0, : qweight.out_features].double().t()
    return s if qweight.mode == "uniform" else 2 * s


def rtn_reference(weight, bits, group_size, scale):
    """s·(c − zp) in float64 from the rtn formula, with the quantizer's stored s."""
    n, k = weight.shape
    w = weight.double().reshape(n, k // group_size, group_size)
    top = 2**bits - 1
    lo = w.amin(-1)
    s = scale.unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    zp = torch.round(-lo.unsqueeze(-1) / safe).clamp(0, top)
    codes = (torch.round(w / safe) + zp).clamp(0, top)
    out = torch.where(s > 0, s * (codes - zp), lo.unsqueeze(-1).expand_as(w))
    return out.reshape(n, k)


def greedy_reference(weight, bits, group_size):
    n, k = weight.shape
    w = weight.double().reshape(n, k // group_size, group_size)
    out = w.mean(-1, keepdim=True).expand_as(w).clone()
    residual = w - out
    for _ in range(bits):
        signs = torch.where(residual >= 0, 1.0, -1.0).double()
        alpha = residual.abs().mean(-1, keepdim=True)
        out += alpha * signs
        residual -= alpha * signs
    return out.reshape(n, k)


def codes_of(qweight):
    """b as ±1 float64, shape (bits, n, k), unpacked from the planes."""
    n, k = qweight.shape
    shifts = torch.arange(32, dtype=torch.int32)
    bits = (qweight.planes[:, :, :n].unsqueeze(-1) >> shifts) & 1  # (words, bits, n, 32)
    bits = bits.permute(1, 2, 0, 3).reshape(qweight.bits, n, -1)[:, :, :k]
    return bits.double() * 2 - 1


def poisoned_outputs(n, k, bits, group_size, mode):
    planes = torch.full((words_per_row(k), bits, padded_rows(n)), -1, dtype=torch.int32)
    meta = torch.full((k // group_size, meta_per_group(bits, MODES[mode]), padded_rows(n)),
                      float("nan"))
    return planes, meta


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_rtn_is_uniform_asymmetric_quantization(mode, bits, impl):
    n, k, g = 24, 256, 64
    weight = gaussian(n, k, seed=bits)
    weight[3, 64:128] = 0.25  # a constant group: s = 0, dequantizes to exactly its value
    q = lutflash.quantize(weight, bits, g, "rtn", mode=mode)
    assert q.mode == mode
    scale = stored_scale(q)
    w = weight.double().reshape(n, k // g, g)
    expected_scale = (w.amax(-1) - w.amin(-1)) / (2**bits - 1)
    torch.testing.assert_close(scale, expected_scale, rtol=2**-23, atol=0)
    assert scale[3, 1] == 0
    ref = rtn_reference(weight, bits, g, scale)
    got = q.dequantize(torch.float64)
    # z = s·((2^q − 1)/2 − zp) is rounded to float32; α_i = s·2^(i−1) are exact.
    tolerance = 4 * 2**-24 * (2**bits * scale).repeat_interleave(g, dim=1)
    assert ((got - ref).abs() <= tolerance).all()
    assert (got[3, 64:128] == 0.25).all()


def test_rtn_general_alphas_are_powers_of_two():
    q = lutflash.quantize(gaussian(16, 128), 4, 32, "rtn", mode="general")
    alpha = q.alpha.double()
    ratios = alpha[..., 1:] / alpha[..., :-1]
    assert (ratios == 2).all()


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_greedy_matches_reference(bits, impl):
    weight = gaussian(16, 256, seed=10 + bits)
    q = lutflash.quantize(weight, bits, 64, "greedy")
    ref = greedy_reference(weight, bits, 64)
    torch.testing.assert_close(q.dequantize(torch.float64), ref, rtol=0, atol=1e-8)


@pytest.mark.parametrize("bits,group_size", [(1, 32), (2, 64), (3, 128), (4, 128), (3, 256)])
def test_alternating_never_worse_than_greedy(bits, group_size, impl):
    weight = gaussian(64, 512, seed=bits)
    weight[5] *= 50  # groups of very different scales
    greedy = group_errors(lutflash.quantize(weight, bits, group_size, "greedy"), weight)
    for rounds in (0, 1, 15):
        alt = lutflash.quantize(weight, bits, group_size, "alternating", rounds=rounds)
        assert (group_errors(alt, weight) <= greedy * (1 + 1e-6) + 1e-30).all()
    # With one plane only z and α move; with more the codes gain from the fit too.
    assert group_errors(alt, weight).sum() < (0.99 if bits == 1 else 0.95) * greedy.sum()


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_alternating_converges_to_a_fixed_point(bits, impl):
    """Run to convergence, the codes are the nearest levels for the stored α, z, and α, z are
    the least-squares fit for the stored codes."""
    n, k, g = 12, 128, 64
    weight = gaussian(n, k, seed=20 + bits)
    q = lutflash.quantize(weight, bits, g, "alternating", rounds=500)
    w = weight.double().reshape(n, k // g, g)
    alpha, offset = q.alpha.double(), q.offset.double()  # (n, groups, bits), (n, groups)

    patterns = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=bits)),
                            dtype=torch.float64)                       # (2^q, bits)
    levels = offset.unsqueeze(-1) + alpha @ patterns.t()               # (n, groups, 2^q)
    nearest = (w.unsqueeze(-1) - levels.unsqueeze(-2)).abs().amin(-1)  # (n, groups, g)
    got = (w - q.dequantize(torch.float64).reshape(n, k // g, g)).abs()
    assert (got <= nearest + 1e-6 * w.abs().amax()).all()

    signs = codes_of(q).permute(1, 2, 0).reshape(n, k // g, g, bits)
    design = torch.cat([signs, torch.ones(n, k // g, g, 1, dtype=torch.float64)], dim=-1)
    fit = torch.linalg.lstsq(design, w.unsqueeze(-1)).solution.squeeze(-1)
    stored = torch.cat([alpha, offset.unsqueeze(-1)], dim=-1)
    torch.testing.assert_close(stored, fit, rtol=1e-4, atol=1e-6 * w.abs().max().item())


@pytest.mark.parametrize("method", METHODS)
def test_error_falls_as_bits_rise(method, impl):
    weight = gaussian(32, 256, seed=3)
    errors = [mse(lutflash.quantize(weight, bits, 64, method), weight) for bits in range(1, 5)]
    assert all(b < 0.7 * a for a, b in itertools.pairwise(errors)), errors


def test_alternating_beats_rtn_on_gaussian_weights():
    weight = gaussian(128, 1024, seed=7)
    rtn = mse(lutflash.quantize(weight, 3, 128, "rtn"), weight)
    alternating = mse(lutflash.quantize(weight, 3, 128, "alternating", rounds=15), weight)
    assert alternating <= 0.85 * rtn, (alternating, rtn)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,k,group_size", [(13, 100, 100), (7, 256, 256), (1, 32, 32),
                                            (9, 160, None), (3, 33, None), (2, 1, None)])
def test_odd_shapes_and_one_group_per_row(method, n, k, group_size, impl):
    weight = gaussian(n, k, seed=n)
    q = lutflash.quantize(weight, 3, group_size, method)
    assert q.group_size == k and q.num_groups == 1
    assert q.dequantize().shape == (n, k)
    if method == "rtn":
        ref = rtn_reference(weight, 3, q.group_size, stored_scale(q))
        torch.testing.assert_close(q.dequantize(torch.float64), ref, rtol=0, atol=1e-7)
    elif method == "greedy":
        ref = greedy_reference(weight, 3, q.group_size)
        torch.testing.assert_close(q.dequantize(torch.float64), ref, rtol=0, atol=1e-8)
    else:
        greedy = lutflash.quantize(weight, 3, group_size, "greedy")
        assert (group_errors(q, weight) <= group_errors(greedy, weight) * (1 + 1e-6)).all()


@pytest.mark.parametrize("mode,method", [(UNIFORM, RTN), (GENERAL, RTN), (GENERAL, GREEDY),
                                         (GENERAL, ALTERNATING)])
def test_padding_is_zero_and_every_output_is_written(mode, method):
    n, k, bits, g = 13, 100, 3, 100
    weight = gaussian(n, k, seed=5)
    planes, meta = poisoned_outputs(n, k, bits, g, mode)
    _C.bcq_quantize(weight, planes, meta, n, k, bits, g, mode, method, 15)
    assert (planes[:, :, n:] == 0).all() and (meta[:, :, n:] == 0).all()
    assert (planes[-1] >> (k % 32) == 0).all()  # k positions past k: columns 100..127
    assert torch.isfinite(meta).all()
    q = lutflash.BCQWeight(planes, meta, (n, k), bits, g, MODES[mode])
    assert mse(q, weight) < 0.1 * weight.double().square().mean().item()


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("method", METHODS)
def test_every_bit_width_round_trips(bits, method, impl):
    n, k, g = 11, 128, 64
    weight = gaussian(n, k, seed=bits)
    q = lutflash.quantize(weight, bits, g, method, rounds=5)
    mode = "uniform" if method == "rtn" else "general"
    assert q.bits == bits and q.mode == mode
    assert q.planes.shape == (words_per_row(k), bits, padded_rows(n))
    assert q.meta.shape == (k // g, meta_per_group(bits, mode), padded_rows(n))
    assert (q.planes[:, :, n:] == 0).all() and (q.meta[:, :, n:] == 0).all()
    out = q.dequantize()
    assert out.shape == (n, k) and torch.isfinite(out).all()
    # Better than all zeros; far better from 2 bits on (1-bit rtn's levels are 0 and ±range).
    bound = 1.0 if bits == 1 else 0.4
    assert mse(q, weight) < bound * weight.double().square().mean().item()


@pytest.mark.parametrize("value,name", [(float("nan"), "NaN"), (float("inf"), "Inf"),
                                        (float("-inf"), "-Inf")])
def test_non_finite_weight_is_rejected_with_its_position(value, name, impl):
    weight = gaussian(8, 64)
    weight[5, 1] = value
    weight[3, 7] = value  # the first one in row-major order is reported
    with pytest.raises(ValueError, match=r"weight: contains NaN or Inf at \(3, 7\)"):
        lutflash.quantize(weight, 3, 32, "greedy")


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(weight=torch.ones(8, 64, dtype=torch.int32)), TypeError, "weight"),
    (dict(weight=torch.ones(64)), ValueError, "weight"),
    (dict(bits=0), ValueError, "bits"),
    (dict(bits=9), ValueError, "bits"),
    (dict(group_size=48), ValueError, "group_size"),
    (dict(group_size=96), ValueError, "group_size"),
    (dict(method="kmeans"), ValueError, "method"),
    (dict(method="greedy", mode="uniform"), ValueError, "mode"),
    (dict(method="alternating", mode="uniform"), ValueError, "mode"),
    (dict(rounds=-1), ValueError, "rounds"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    args = dict(weight=gaussian(8, 128), bits=3, group_size=64, method="alternating")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        lutflash.quantize(args.pop("weight"), **args)


def direct_args(**overrides):
    """Valid arguments of _C.bcq_quantize (n=5, k=96, 3 bits, group 32), with overrides."""
    n, k, bits, g = 5, 96, 3, 32
    planes, meta = poisoned_outputs(n, k, bits, g, GENERAL)
    args = dict(weight=gaussian(n, k), planes=planes, meta=meta, n=n, k=k, bits=bits,
                group_size=g, mode=GENERAL, method=ALTERNATING, rounds=3)
    args.update(overrides)
    return list(args.values())


def test_direct_call_with_valid_arguments():
    args = direct_args()
    assert _C.bcq_quantize(*args) is None
    assert torch.isfinite(args[2]).all()


@pytest.mark.parametrize("overrides,error,match", [
    (dict(planes=torch.zeros(3, 3, 5, dtype=torch.int32)), ValueError, "planes"),
    (dict(planes=torch.zeros(3, 2, 8, dtype=torch.int32)), ValueError, "planes"),
    (dict(planes=torch.zeros(3, 3, 8, dtype=torch.int64)), TypeError, "planes"),
    (dict(planes=torch.zeros(3, 3, 8, dtype=torch.float32)), TypeError, "planes"),
    (dict(planes=torch.zeros(8, 3, 3, dtype=torch.int32).transpose(0, 2)), ValueError, "planes"),
    (dict(planes=[0] * 72), TypeError, "planes"),
    (dict(meta=torch.zeros(3, 2, 8)), ValueError, "meta"),
    (dict(meta=torch.zeros(1, 4, 8)), ValueError, "meta"),
    (dict(meta=torch.zeros(3, 4, 8, dtype=torch.float16)), TypeError, "meta"),
    (dict(meta=torch.zeros(3, 4, 8, dtype=torch.float64)), TypeError, "meta"),
    (dict(weight=gaussian(5, 96).double()), TypeError, "weight"),
    (dict(weight=gaussian(96, 5).t()), ValueError, "weight"),
    (dict(weight=gaussian(5, 64)), ValueError, "weight"),
    (dict(weight=gaussian(1, 480).reshape(480)), ValueError, "weight"),
    (dict(n=0), ValueError, "n"),
    (dict(k=95), ValueError, "group_size"),
    (dict(bits=9), ValueError, "bits"),
    (dict(group_size=48), ValueError, "group_size"),
    (dict(mode=2), ValueError, "mode"),
    (dict(mode=UNIFORM, method=GREEDY), ValueError, "mode"),
    (dict(method=3), ValueError, "method"),
    (dict(method=-1), ValueError, "method"),
    (dict(method="rtn"), TypeError, "method"),
    (dict(rounds=-1), ValueError, "rounds"),
    (dict(rounds=2**40), ValueError, "rounds"),
])
def test_direct_call_validates_every_argument(overrides, error, match):
    with pytest.raises(error, match=match):
        _C.bcq_quantize(*direct_args(**overrides))


def test_direct_call_rejects_outputs_aliasing_the_weight():
    weight = gaussian(5, 96)
    args = direct_args(weight=weight, meta=weight.view(-1)[: 3 * 4 * 8].view(3, 4, 8))
    with pytest.raises(ValueError, match="meta: must not share memory with weight"):
        _C.bcq_quantize(*args)


def test_direct_call_rejects_read_only_outputs():
    np = pytest.importorskip("numpy")
    planes = np.zeros((3, 3, 8), dtype=np.int32)
    planes.flags.writeable = False
    with pytest.raises((TypeError, ValueError, BufferError), match="planes"):
        _C.bcq_quantize(*direct_args(planes=planes))


def test_direct_call_wrong_argument_count():
    with pytest.raises(TypeError, match="takes 10 arguments"):
        _C.bcq_quantize(*direct_args()[:9])


# The torch quantizers against the C ones. lutflash.quantize runs them for CUDA weights; the
# same comparison runs here on the CPU (bcq_torch.quantize_torch) and on the GPU (cuda tests).

WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
META_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def random_case(seed):
    """A seeded draw over the quantizers' space: (weight, quantize's arguments)."""
    rng = random.Random(seed)
    method = rng.choice(METHODS)
    mode = rng.choice(MODES) if method == "rtn" else "general"
    bits = rng.randint(1, 8)
    n = rng.choice([1, 3, 8, 13, rng.randint(1, 80)])
    if rng.random() < 0.3:  # one group per row, any k
        k = rng.randint(1, 300)
        group_size = k
    else:
        group_size = 32 * rng.randint(1, 6)
        k = group_size * rng.randint(1, 4)
    scale = rng.choice([0.02, 1.0, 300.0])
    weight = (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale)
    if rng.random() < 0.3:  # a constant group
        weight[rng.randrange(n), :group_size] = scale / 3
    weight = weight.to(rng.choice(WEIGHT_DTYPES))
    kwargs = dict(bits=bits, group_size=group_size, method=method, mode=mode,
                  meta_dtype=rng.choice(META_DTYPES), rounds=rng.choice([0, 1, 3, 15, 15]))
    return weight, kwargs


def codes_as_ints(qweight):
    """The integer codes (n, k) unpacked from the planes."""
    signs = codes_of(qweight)  # (bits, n, k) ±1
    weights = 2 ** torch.arange(qweight.bits, dtype=torch.float64).view(-1, 1, 1)
    return (((signs + 1) / 2) * weights).sum(0).long()


def assert_like_c(got, want, weight):
    """`got` (torch) against `want` (C) for one weight: rtn bit for bit; greedy and
    alternating with the same codes (but where a weight sits on a level midpoint to within
    rounding: ≥ 99.9% of them), their metadata within one unit in the last place of the
    metadata dtype (of the group's largest entry; groups whose codes all agree), and no group
    with an error more than 1e-6 relatively above C's."""
    assert got.device == want.device and got.shape == want.shape
    assert (got.bits, got.group_size, got.mode) == (want.bits, want.group_size, want.mode)
    assert got.meta.dtype == want.meta.dtype
    n, k = want.shape
    g = want.group_size
    if torch.equal(got.planes, want.planes) and torch.equal(got.meta, want.meta):
        return
    assert (got.planes[:, :, n:] == 0).all() and (got.meta[:, :, n:] == 0).all()
    same = codes_as_ints(got) == codes_as_ints(want)
    assert same.double().mean().item() >= 0.999, "codes differ from C's"
    same_group = same.reshape(n, k // g, g).all(-1).t()                 # (groups, n)
    a, b = got.meta[:, :, :n].double(), want.meta[:, :, :n].double()
    ulp = torch.finfo(want.meta.dtype).eps * b.abs().amax(1, keepdim=True)
    close = ((a - b).abs() <= ulp + torch.finfo(want.meta.dtype).tiny).all(1)
    assert (close | ~same_group).all(), "metadata differ from C's"
    w = weight.to(torch.float32)  # what both quantize
    bound = group_errors(want, w) * (1 + 1e-6) + 1e-12 * w.double().reshape(n, k // g, g).square().sum(-1)
    assert (group_errors(got, w) <= bound).all(), "a group's error is above C's"


@pytest.mark.parametrize("seed", range(48))
def test_torch_quantizers_match_c(seed):
    weight, kwargs = random_case(seed)
    want = lutflash.quantize(weight, **kwargs)
    got = quantize_torch(weight, kwargs["bits"], kwargs["group_size"], kwargs["mode"],
                         kwargs["method"], kwargs["rounds"], kwargs["meta_dtype"])
    if kwargs["method"] == "rtn":
        assert torch.equal(got.planes, want.planes) and torch.equal(got.meta, want.meta)
    assert_like_c(got, want, weight)
    # the metadata dtype only rounds the float32 result
    f32 = quantize_torch(weight, kwargs["bits"], kwargs["group_size"], kwargs["mode"],
                         kwargs["method"], kwargs["rounds"], torch.float32)
    assert torch.equal(f32.planes, got.planes)
    assert torch.equal(f32.meta.to(kwargs["meta_dtype"]), got.meta)


@pytest.mark.parametrize("method,mode", [("rtn", "uniform"), ("rtn", "general"),
                                         ("greedy", "general"), ("alternating", "general")])
def test_torch_quantizers_in_blocks_of_rows(method, mode):
    """Blocks of rows (a few rows, one row, not dividing n) and a strided weight give the
    one-block result."""
    weight = gaussian(37, 256, seed=4)
    whole = quantize_torch(weight, 3, 64, mode, method, 15, torch.float32)
    for chunk in (1, 256 * 5, 256 * 36):
        part = quantize_torch(weight, 3, 64, mode, method, 15, torch.float32, chunk_elements=chunk)
        assert torch.equal(part.planes, whole.planes) and torch.equal(part.meta, whole.meta)
    strided = quantize_torch(weight.t().contiguous().t(), 3, 64, mode, method, 15, torch.float32)
    assert torch.equal(strided.planes, whole.planes) and torch.equal(strided.meta, whole.meta)


def test_torch_quantizers_refuse_what_c_refuses(impl):
    big = torch.full((4, 64), 1e39, dtype=torch.float64)
    with pytest.raises(ValueError, match="weight: has values beyond the float32 range"):
        lutflash.quantize(big, 3, 32, "rtn")
    huge = gaussian(4, 64)
    huge[2, 32:] = 3e38
    huge[2, 40] = -3e38  # 1-bit rtn's scale, the whole range, overflows float32
    with pytest.raises(ValueError, match=r"weight: row 2, group 1 spans a range too large"):
        lutflash.quantize(huge, 1, 32, "rtn")


def test_quantize_runs_the_c_quantizers_on_the_cpu(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a CPU weight went to the torch quantizers")

    monkeypatch.setattr("lutflash.bcq_torch.quantize_torch", refuse)
    q = lutflash.quantize(gaussian(8, 64), 3, 32, "alternating")
    assert q.device.type == "cpu"


@pytest.mark.cuda
@pytest.mark.parametrize("seed", range(48))
def test_quantize_on_the_gpu_matches_c(seed, cuda_device, monkeypatch):
    weight, kwargs = random_case(seed)
    want = lutflash.quantize(weight, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("a CUDA weight went through the C quantizers")

    monkeypatch.setattr(_C, "bcq_quantize", refuse)
    device_weight = weight.to(cuda_device)
    got = lutflash.quantize(device_weight, **kwargs)
    assert got.device == device_weight.device and got.meta.device == got.device
    got = got.to("cpu")
    if kwargs["method"] == "rtn":
        assert torch.equal(got.planes, want.planes) and torch.equal(got.meta, want.meta)
    assert_like_c(got, want, weight)


@pytest.mark.cuda
@pytest.mark.parametrize("method", METHODS)
def test_quantize_on_the_gpu_large_weight(method, cuda_device):
    """A Llama-sized row count in several blocks of rows, on the device, against C."""
    weight = torch.randn(4100, 1024, generator=torch.Generator().manual_seed(9)).half() * 0.02
    want = lutflash.quantize(weight, 3, 128, method)
    device_weight = weight.to(cuda_device)
    for chunk in (1 << 20, 1 << 24):  # 5 blocks of rows, one block
        got = quantize_torch(device_weight, 3, 128, want.mode, method, 15, torch.float16,
                             chunk_elements=chunk)
        assert got.device == device_weight.device
        got = got.to("cpu")
        if method == "rtn":
            assert torch.equal(got.planes, want.planes) and torch.equal(got.meta, want.meta)
        assert_like_c(got, want, weight)
