"""The tensor-core lutgemm path before/after the pipelined kernel, against cuBLAS fp16 and
torch's int4 kernel, in one process (LUTFLASH_LUTGEMM_MMA=old selects the previous kernel):

    python benchmarks/bench_mma_pipe.py [--m 16 64 ...] [--old-shapes 2]

CUDA-event medians with L2 flushed (timing.CudaTimer); weights 128-group, fp16 metadata."""

import argparse
import os

import torch
import torch.nn.functional as F
from bench_lutgemm import CUDA_SHAPES, int4_peer
from timing import CudaTimer

import lutflash
from lutflash.testing import random_bcq_weight, relative_error

KNOB_SHAPES = [(12288, 12288), (4096, 11008), (8192, 28672)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, nargs="+", default=[16, 64, 256, 1024, 4096])
    parser.add_argument("--old-shapes", type=int, default=9, help="shapes that also time the old kernel")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--check-m", type=int, nargs="*", default=[16, 256])
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    timer = CudaTimer(dev)
    os.environ["LUTFLASH_LUTGEMM_PATH"] = "mma"
    print(torch.cuda.get_device_name(), torch.__version__)
    print("us; (x) = cuBLAS time / this time")
    for si, (k, n) in enumerate(CUDA_SHAPES):
        weight = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        qw = {(b, md): random_bcq_weight(n, k, b, 128, md, meta_dtype=torch.float16, device=dev)
              for b, md in ((3, "general"), (3, "uniform"), (4, "uniform"))}
        int4 = int4_peer(weight)
        for m in args.m:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            row = {"cuBLAS": timer(lambda: F.linear(x, weight), args.reps)}
            if int4 is not None:
                xb = x.bfloat16()
                row["int4"] = timer(lambda: int4(xb), args.reps)
            for (b, md), q in qw.items():
                row[f"{b}b{md[0]}"] = timer(lambda: lutflash.lutgemm(x, q), args.reps)
            if si < args.old_shapes:
                os.environ["LUTFLASH_LUTGEMM_MMA"] = "old"
                row["old3bg"] = timer(lambda: lutflash.lutgemm(x, qw[(3, "general")]), args.reps)
                del os.environ["LUTFLASH_LUTGEMM_MMA"]
            if m in args.check_m:  # a wrong answer must not pass for a fast one
                for (b, md), q in qw.items():
                    ref = F.linear(x, q.dequantize(torch.float16))
                    err = relative_error(lutflash.lutgemm(x, q), ref)
                    row_err = f"check {k}->{n} m={m} {b}b{md[0]}: rel err {err:.2e}"
                    print(row_err + ("" if err < 1e-2 else "  <-- WRONG"), flush=True)
            if (k, n) in KNOB_SHAPES and m in (16, 64, 256, 1024):
                for knob, value in (("LUTFLASH_PIPE_BM", "16"), ("LUTFLASH_PIPE_BM", "64"),
                                    ("LUTFLASH_PIPE_SPLITS", "1")):
                    os.environ[knob] = value
                    t = timer(lambda: lutflash.lutgemm(x, qw[(3, "uniform")]), args.reps)
                    del os.environ[knob]
                    row[f"3bu {knob[14:]}={value}"] = t
            cells = [f"{k}->{n} m={m}"]
            for key, v in row.items():
                cells.append(f"{key} {v:.1f}" + ("" if key == "cuBLAS" else f" ({row['cuBLAS'] / v:.2f}x)"))
            print(" | ".join(cells), flush=True)
        del weight, qw, int4
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
