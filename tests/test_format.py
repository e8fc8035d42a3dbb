"""The worked example of docs/FORMAT.md, byte for byte."""

import torch

import lutflash
from lutflash.bcq import BCQWeight
from lutflash.nn import LutLinear


def worked_example() -> BCQWeight:
    planes = torch.zeros((1, 2, 8), dtype=torch.int32)
    planes[0, 0, 0], planes[0, 1, 0], planes[0, 1, 1] = 9, 3, 5
    meta = torch.zeros((1, 3, 8))
    meta[0, :, 0] = torch.tensor([0.5, 1.0, 0.25])
    meta[0, :, 1] = torch.tensor([0.1, 0.2, -1.0])
    return BCQWeight(planes, meta, (2, 4), bits=2, group_size=4, mode="general")


def test_worked_example_dequantizes_as_documented():
    expected = torch.tensor([[1.75, 0.75, -1.25, -0.25], [-0.9, -1.3, -0.9, -1.3]],
                            dtype=torch.float64)
    torch.testing.assert_close(worked_example().dequantize(torch.float64), expected,
                               rtol=0, atol=1e-7)


def test_worked_example_through_the_kernel():
    qweight = worked_example()
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    expected = x.double() @ qweight.dequantize(torch.float64).t()
    torch.testing.assert_close(lutflash.lutgemm(x, qweight).double(), expected, rtol=1e-6,
                               atol=1e-6)


def test_layout_buffer_matches_documentation():
    layer = LutLinear.from_bcq(worked_example())
    assert layer.layout.tolist() == [1, 2, 4, 2, 4, 0]
    assert worked_example().state_tensors()["layout"].tolist() == [1, 2, 4, 2, 4, 0]


def test_uniform_mode_alphas_are_powers_of_two():
    planes = torch.zeros((1, 3, 8), dtype=torch.int32)
    planes[0, :, 0] = torch.tensor([0b0011, 0b0101, 0b0000])  # codes c = 3, 1, 2, 0 for q=3
    meta = torch.zeros((1, 2, 8))
    meta[0, :, 0] = torch.tensor([0.5, 0.0])  # s = 0.5, z = 0
    qweight = BCQWeight(planes, meta, (1, 4), bits=3, group_size=4, mode="uniform")
    codes = torch.tensor([3.0, 1.0, 2.0, 0.0], dtype=torch.float64)
    # b_i = 2 bit_i(c) - 1 and α_i = s 2^(i-1) give s (c - 3.5): the asymmetric weight with zp = 3.5
    torch.testing.assert_close(qweight.dequantize(torch.float64)[0], 0.5 * (codes - 3.5))
