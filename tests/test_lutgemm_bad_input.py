"""Every class of bad input to lutgemm gets a clear exception naming the argument, and
nothing is written out of bounds."""

import pytest
import torch

import lutflash
from lutflash import _C
from lutflash.bcq import BCQWeight
from lutflash.nn import LutLinear
from lutflash.testing import random_bcq_weight

N, K, BITS, GROUP = 16, 64, 3, 32


@pytest.fixture
def qweight(generator):
    return random_bcq_weight(N, K, BITS, GROUP, "general", generator=generator)


def raw_args(qweight, m=2, **override):
    """Valid arguments of _C.lutgemm, with some replaced."""
    args = dict(x=torch.randn(m, K), planes=qweight.planes, meta=qweight.meta, bias=None,
                out=torch.empty(m, N),
                workspace=torch.empty(_C.lutgemm_workspace_bytes(False, m, N, K, BITS, GROUP, 0),
                                      dtype=torch.uint8),
                n=N, k=K, bits=BITS, group_size=GROUP, mode=0, stream=0)
    args.update(override)
    return list(args.values())


def test_valid_raw_call_works(qweight):
    _C.lutgemm(*raw_args(qweight))


@pytest.mark.parametrize("x,error,match", [
    (torch.randn(2, K).to(torch.int32), TypeError, "x: expected dtype float32, float16 or bfloat16"),
    (torch.randn(2, K).double(), TypeError, "x: expected dtype"),
    (torch.randn(2, K + 1), ValueError, r"x: expected shape \(\.\.\., 64\)"),
    (torch.randn(K)[:0], ValueError, "x: expected shape"),
    ("not a tensor", TypeError, "x: expected a torch.Tensor"),
])
def test_bad_x(qweight, x, error, match):
    with pytest.raises(error, match=match):
        lutflash.lutgemm(x, qweight)


def test_bad_device(qweight):
    with pytest.raises(ValueError, match="x: expected a tensor on cpu"):
        lutflash.lutgemm(torch.randn(2, K, device="meta"), qweight)
    with pytest.raises(TypeError, match="x: could not be borrowed through DLPack"):
        _C.lutgemm(*raw_args(qweight, x=torch.randn(2, K, device="meta")))


def test_bad_bias(qweight):
    x = torch.randn(2, K)
    with pytest.raises(ValueError, match=r"bias: expected shape \(16,\)"):
        lutflash.lutgemm(x, qweight, torch.randn(N + 1))
    with pytest.raises(TypeError, match="bias: expected dtype torch.float32"):
        lutflash.lutgemm(x, qweight, torch.randn(N).half())
    with pytest.raises(TypeError, match="bias: expected dtype float32"):
        _C.lutgemm(*raw_args(qweight, bias=torch.randn(N).half()))
    with pytest.raises(ValueError, match="bias: expected a contiguous tensor"):
        _C.lutgemm(*raw_args(qweight, bias=torch.randn(N, 2)[:, 0]))


def test_bad_qweight_type():
    with pytest.raises(TypeError, match="qweight: expected a lutflash.BCQWeight"):
        lutflash.lutgemm(torch.randn(2, K), torch.randn(N, K))


@pytest.mark.parametrize("field,value,error,match", [
    ("n", 0, ValueError, r"n: expected an int in \[1"),
    ("k", -3, ValueError, r"k: expected an int in \[1"),
    ("bits", 0, ValueError, r"bits: expected an int in \[1, 8\]"),
    ("bits", 9, ValueError, r"bits: expected an int in \[1, 8\]"),
    ("group_size", 48, ValueError, "group_size: expected a multiple of 32 that divides k"),
    ("group_size", 96, ValueError, "group_size: expected a multiple of 32 that divides k"),
    ("mode", 2, ValueError, "mode: expected an int"),
    ("bits", 2.0, TypeError, "bits: expected an int"),
    ("stream", "s", TypeError, "stream: expected an int"),
])
def test_bad_scalars(qweight, field, value, error, match):
    with pytest.raises(error, match=match):
        _C.lutgemm(*raw_args(qweight, **{field: value}))


def test_packed_tensors_must_match_the_layout(qweight):
    with pytest.raises(ValueError, match=r"planes: expected shape \(2, 2, 16\)"):
        _C.lutgemm(*raw_args(qweight, bits=2))
    with pytest.raises(ValueError, match=r"meta: expected shape \(2, 2, 16\)"):
        _C.lutgemm(*raw_args(qweight, mode=1))
    with pytest.raises(TypeError, match="planes: expected dtype int32"):
        _C.lutgemm(*raw_args(qweight, planes=qweight.planes.float()))
    with pytest.raises(TypeError, match="meta: expected dtype float32, float16 or bfloat16"):
        _C.lutgemm(*raw_args(qweight, meta=qweight.meta.double()))


def test_non_contiguous_and_misaligned_buffers(qweight):
    strided = torch.empty(qweight.planes.shape[::-1], dtype=torch.int32).permute(2, 1, 0)
    strided.copy_(qweight.planes)
    with pytest.raises(ValueError, match="planes: expected a contiguous tensor"):
        _C.lutgemm(*raw_args(qweight, planes=strided))
    shifted = torch.empty(qweight.planes.numel() + 1, dtype=torch.int32)[1:].view(
        qweight.planes.shape)
    shifted.copy_(qweight.planes)
    with pytest.raises(ValueError, match="planes: expected data aligned to 16 bytes"):
        _C.lutgemm(*raw_args(qweight, planes=shifted))
    size = _C.lutgemm_workspace_bytes(False, 2, N, K, BITS, GROUP, 0)
    workspace = torch.empty(size + 64, dtype=torch.uint8)[1:size + 1]
    with pytest.raises(ValueError, match="workspace: expected data aligned to 64 bytes"):
        _C.lutgemm(*raw_args(qweight, workspace=workspace))
    with pytest.raises(ValueError, match="x: expected a contiguous last dimension"):
        _C.lutgemm(*raw_args(qweight, x=torch.randn(K, 2).t()))


def test_bad_output_and_workspace(qweight):
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 16\)"):
        _C.lutgemm(*raw_args(qweight, out=torch.empty(2, N - 1)))
    with pytest.raises(TypeError, match="out: expected dtype float32"):
        _C.lutgemm(*raw_args(qweight, out=torch.empty(2, N).half()))
    with pytest.raises(ValueError, match="workspace: expected at least"):
        _C.lutgemm(*raw_args(qweight, workspace=torch.empty(16, dtype=torch.uint8)))
    with pytest.raises(TypeError, match="workspace: expected dtype uint8"):
        _C.lutgemm(*raw_args(qweight, workspace=torch.empty(4096, dtype=torch.float32)))
    x = torch.randn(2, K)
    with pytest.raises(ValueError, match="out: must not share memory with x"):
        _C.lutgemm(*raw_args(qweight, x=x, out=x[:, :N]))


def test_failed_calls_write_nothing(qweight):
    out = torch.full((2, N), 7.0)
    with pytest.raises(ValueError):
        _C.lutgemm(*raw_args(qweight, out=out, workspace=torch.empty(16, dtype=torch.uint8)))
    assert (out == 7.0).all()


def test_wrong_argument_count(qweight):
    with pytest.raises(TypeError, match="takes 12 arguments"):
        _C.lutgemm(*raw_args(qweight)[:5])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(bits=0), ValueError, r"bits: expected an int in \[1, 8\]"),
    (dict(bits=9), ValueError, r"bits: expected an int in \[1, 8\]"),
    (dict(group_size=48), ValueError, "group_size: expected a multiple of 32"),
    (dict(group_size=128, k=96), ValueError, "group_size: expected a multiple of 32"),
    (dict(mode="sparse"), ValueError, "mode: expected one of"),
])
def test_bad_lutlinear_configuration(kwargs, error, match):
    config = dict(in_features=64, out_features=8, bits=3, group_size=32, mode="general")
    if "k" in kwargs:
        config["in_features"] = kwargs.pop("k")
    config.update(kwargs)
    with pytest.raises(error, match=match):
        LutLinear(config.pop("in_features"), config.pop("out_features"), **config)


def test_bcq_weight_validation(qweight):
    with pytest.raises(ValueError, match="version"):
        BCQWeight(qweight.planes, qweight.meta, (N, K), BITS, GROUP, "general", version=2)
    with pytest.raises(TypeError, match="planes: expected an int32 tensor"):
        BCQWeight(qweight.planes.long(), qweight.meta, (N, K), BITS, GROUP, "general")
    with pytest.raises(ValueError, match="meta: expected shape"):
        BCQWeight(qweight.planes, qweight.meta[:1], (N, K), BITS, GROUP, "general")
    with pytest.raises(ValueError, match="planes: expected shape"):
        BCQWeight(qweight.planes, qweight.meta, (N, K), BITS + 1, GROUP, "general")


def test_negative_views_are_refused_not_miscomputed(qweight):
    x = torch._neg_view(torch.randn(2, K))
    assert x.is_neg()
    with pytest.raises(ValueError, match=r"x: negative-bit views are not supported"):
        _C.lutgemm(*raw_args(qweight, x=x))


def test_broadcast_input_is_accepted_by_the_op(qweight):
    row = torch.randn(1, K)
    out = lutflash.lutgemm(row.expand(4, K), qweight)
    torch.testing.assert_close(out, lutflash.lutgemm(row, qweight).expand(4, N))
    with pytest.raises(ValueError, match="x: expected a contiguous last dimension and non-overlapping rows"):
        _C.lutgemm(*raw_args(qweight, m=4, x=row.expand(4, K)))


def test_workspace_must_not_alias_the_weight(qweight):
    size = _C.lutgemm_workspace_bytes(False, 2, N, K, BITS, GROUP, 0)
    buffer = torch.zeros(qweight.planes.numel() * 4 + size + 64, dtype=torch.uint8)
    planes = buffer[: qweight.planes.numel() * 4].view(torch.int32).view(qweight.planes.shape)
    planes.copy_(qweight.planes)
    with pytest.raises(ValueError, match="workspace: must not share memory with planes"):
        _C.lutgemm(*raw_args(qweight, planes=planes, workspace=buffer[:size + 64]))


def test_misaligned_and_read_only_numpy_outputs(qweight):
    np = pytest.importorskip("numpy")
    raw = np.zeros(2 * N * 4 + 1, dtype=np.uint8)
    misaligned = raw[1:].view(np.float32).reshape(2, N)
    with pytest.raises(ValueError, match="out: expected data aligned to 4 bytes"):
        _C.lutgemm(*raw_args(qweight, out=misaligned))
    read_only = np.zeros((2, N), dtype=np.float32)
    read_only.flags.writeable = False
    with pytest.raises((ValueError, TypeError), match="out: "):
        _C.lutgemm(*raw_args(qweight, out=read_only))
    assert (read_only == 0).all()


def test_quantizing_a_range_beyond_float32_metadata():
    weight = torch.tensor([[3e38, -3e38] * 16])
    with pytest.raises(ValueError, match="weight: row 0, group 0 spans a range too large"):
        lutflash.quantize(weight, 1, 32, "rtn")
    with pytest.raises(ValueError, match="beyond the float32 range"):
        lutflash.quantize(torch.full((1, 32), 1e300, dtype=torch.float64), 2, 32, "rtn")
