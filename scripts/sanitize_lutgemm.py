"""A handful of lutgemm calls on the GPU for compute-sanitizer:

    compute-sanitizer --tool memcheck python scripts/sanitize_lutgemm.py

Both kernel paths (lut, mma), forced through lutflash.lutgemm._lutgemm (the module), split and unsplit k, odd n
and k, bits 1..8, both modes. Outputs
are compared with the float64 reference too, so that a silent wrong answer also fails."""

import sys

import torch

from lutflash.testing import lutgemm_reference, random_bcq_weight, relative_error

lutgemm_module = sys.modules["lutflash.lutgemm"]  # the module; lutflash.lutgemm is the function

CASES = [  # (path, m, n, k, bits, group_size, mode, dtype)
    ("lut", 1, 37, 96, 1, 32, "general", torch.float16),
    ("lut", 1, 1030, 4096, 3, 128, "uniform", torch.bfloat16),  # split k, 2 row blocks
    ("lut", 3, 9, 31, 2, None, "general", torch.float16),       # k < one word
    ("lut", 5, 77, 320, 4, 64, "uniform", torch.float32),
    ("lut", 1, 77, 640, 4, 64, "general", torch.float32),       # decode kernel: fp32 meta, partial slab
    ("lut", 6, 77, 640, 3, 32, "uniform", torch.float16),       # decode kernel, m tiles of 4 (gridDim.z = 2)
    ("lut", 2, 203, 1056, 4, 96, "general", torch.bfloat16),    # 2-row decode kernel, partial slab
    ("mma", 2, 37, 96, 1, 32, "uniform", torch.float16),
    ("mma", 16, 201, 1056, 3, 96, "general", torch.bfloat16),   # split k
    ("mma", 40, 130, 197, 2, None, "general", torch.float16),   # odd k, g = k
    ("mma", 300, 260, 512, 4, 128, "uniform", torch.float16),   # several m and n tiles
    ("mma", 130, 520, 2048, 3, 128, "general", torch.float16),  # split k at m > 64, partial tiles
    ("mma", 17, 300, 1600, 2, 32, "uniform", torch.bfloat16),   # g = 32, odd words, split k
    ("mma", 130, 75, 640, 8, 64, "general", torch.float16),     # 8 bits: a ring of 3 stages
    ("mma", 20, 75, 640, 6, 32, "uniform", torch.bfloat16),     # 6 bits uniform: sums of ±2^(i-1)
]


def main():
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for path, m, n, k, bits, group_size, mode, dtype in CASES:
        meta_dtype = torch.float32 if dtype == torch.float32 else dtype
        qweight = random_bcq_weight(n, k, bits, group_size, mode, meta_dtype, generator=gen).to("cuda")
        x = torch.randn(m, k, generator=gen).to("cuda", dtype)
        bias = torch.randn(n, generator=gen).to("cuda", dtype)
        out = lutgemm_module._lutgemm(x, qweight, bias, path=path)
        torch.cuda.synchronize()
        err = relative_error(out, lutgemm_reference(x, qweight, bias))
        worst = max(worst, err)
        print(f"{path} m={m} n={n} k={k} bits={bits} g={group_size} {mode} {dtype}: rel err {err:.2e}")
    assert worst < 2e-2, f"worst relative error {worst:.3g}"
    print("ok")


if __name__ == "__main__":
    main()
