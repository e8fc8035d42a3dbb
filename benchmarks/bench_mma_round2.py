"""Round 2 of the tensor-core lutgemm path: the same rows as bench_mma_pipe.py in a compact
form, so that two builds (before/after) can be timed in one GPU session, each process with its
own cuBLAS and torch int4 peers:

    python benchmarks/bench_mma_round2.py --tag after [--m 8 16 ...] [--knob LUTFLASH_PIPE_STAGES=8]
    python benchmarks/bench_mma_round2.py --ncu 12288 12288 16   # one 3-bit uniform call (ncu)

CUDA-event medians with L2 flushed (timing.CudaTimer); weights g = 128, fp16 metadata, fp16 x.
A knob (env setting) is timed on 3-bit uniform at m <= --knob-max-m and its output checked."""

import argparse
import os

import torch
import torch.nn.functional as F
from bench_lutgemm import int4_peer
from timing import CudaTimer

import lutflash
from lutflash.testing import random_bcq_weight, relative_error

SHAPES = [(12288, 12288), (4096, 4096), (8192, 28672), (4096, 11008), (28672, 8192)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tag", default="after")
    parser.add_argument("--m", type=int, nargs="+", default=[8, 16, 64, 256, 1024, 4096])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--knob", action="append", default=[], help="NAME=VALUE, timed on 3bu")
    parser.add_argument("--knob-max-m", type=int, default=16)
    parser.add_argument("--int4-max-m", type=int, default=256)
    parser.add_argument("--ncu", type=int, nargs=3, metavar=("K", "N", "M"))
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="the first this many")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    os.environ["LUTFLASH_LUTGEMM_PATH"] = "mma"
    if args.ncu:
        k, n, m = args.ncu
        q = random_bcq_weight(n, k, 3, 128, "uniform", meta_dtype=torch.float16, device=dev)
        x = torch.randn(m, k, device=dev, dtype=torch.float16)
        for _ in range(3):
            lutflash.lutgemm(x, q)
        torch.cuda.synchronize()
        return
    timer = CudaTimer(dev)
    print(f"[{args.tag}]", torch.cuda.get_device_name(), torch.__version__, flush=True)
    for k, n in SHAPES[:args.shapes]:
        weight = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        qw = {(b, md): random_bcq_weight(n, k, b, 128, md, meta_dtype=torch.float16, device=dev)
              for b, md in ((3, "general"), (3, "uniform"), (4, "uniform"))}
        int4 = int4_peer(weight)
        for m in args.m:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            row = {"cuBLAS": timer(lambda: F.linear(x, weight), args.reps)}
            if int4 is not None and m <= args.int4_max_m:
                xb = x.bfloat16()
                row["int4"] = timer(lambda: int4(xb), args.reps)
            for (b, md), q in qw.items():
                row[f"{b}b{md[0]}"] = timer(lambda: lutflash.lutgemm(x, q), args.reps)
            errs = []
            if m in (16, 256):  # a wrong answer must not pass for a fast one
                for (b, md), q in qw.items():
                    ref = F.linear(x, q.dequantize(torch.float16))
                    errs.append(relative_error(lutflash.lutgemm(x, q), ref))
            for knob in args.knob if m <= args.knob_max_m else []:
                name, value = knob.split("=")
                os.environ[name] = value
                q = qw[(3, "uniform")]
                row[f"3bu {name.removeprefix('LUTFLASH_PIPE_')}={value}"] = timer(lambda: lutflash.lutgemm(x, q), args.reps)
                errs.append(relative_error(lutflash.lutgemm(x, q), F.linear(x, q.dequantize(torch.float16))))
                del os.environ[name]
            cells = [f"{args.tag} {k}->{n} m={m}"]
            cells += [f"{key} {v:.1f}" for key, v in row.items()]
            if errs:
                cells.append(f"maxerr {max(errs):.1e}" + (" WRONG" if max(errs) > 1e-2 else ""))
            print(" | ".join(cells), flush=True)
        del weight, qw, int4
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
