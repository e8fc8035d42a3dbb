"""One m = 1 lutgemm call per shape, for ncu: ncu -k regex:lut1 python benchmarks/profile_lut1.py"""
import sys

import torch

import lutflash
from lutflash.testing import random_bcq_weight

for shape in sys.argv[1:] or ["12288x12288"]:  # n x k
    n, k = (int(v) for v in shape.split("x"))
    gen = torch.Generator().manual_seed(0)
    w = random_bcq_weight(n, k, 3, 128, "uniform", torch.float16, generator=gen).to("cuda")
    x = torch.randn(1, k, dtype=torch.float16, device="cuda")
    for _ in range(2):
        lutflash.lutgemm(x, w)
    torch.cuda.synchronize()
