"""Time lutflash.quantize (C, OpenMP) for each method on one weight, and its error.

The peer is torch's own CPU ops doing asymmetric round-to-nearest over the same groups
(what a pure-PyTorch rtn quantizer costs). Times are medians of --repeats wall and process
(CPU, all threads) times (timing.time_cpu_detail). Prints a table; --json writes the numbers:
    {"benchmark": "bcq_quantize", "date", "commit", "machine": {"cpu", "cores", "torch",
     "load_average_before"}, "config": {"n", "k", "bits", "group_size", "rounds", "repeats",
     "seed"}, "results": [{"impl": "torch" | "lutflash", "method", "seconds", "cpu_seconds",
     "rel_mse"}]}

    python benchmarks/bench_quantize.py --n 4096 --k 11008 --bits 3
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from timing import git_commit, time_cpu_detail, write_json

from lutflash.bcq import METHODS, quantize


def torch_rtn(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Asymmetric round-to-nearest in plain torch, dequantized (the peer)."""
    n, k = weight.shape
    w = weight.reshape(n, k // group_size, group_size)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    top = 2**bits - 1
    scale = ((hi - lo) / top).clamp_min(torch.finfo(torch.float32).tiny)
    zp = torch.round(-lo / scale).clamp(0, top)
    codes = (torch.round(w / scale) + zp).clamp(0, top)
    return (scale * (codes - zp)).reshape(n, k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="out_features")
    parser.add_argument("--k", type=int, default=11008, help="in_features")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (median)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]  # other work on the machine inflates wall times
    torch.manual_seed(args.seed)
    weight = torch.randn(args.n, args.k) * 0.02
    norm = weight.square().mean().item()
    rows = []

    seconds, cpu, approx = time_cpu_detail(lambda: torch_rtn(weight, args.bits, args.group_size),
                                 args.repeats)
    rows.append({"impl": "torch", "method": "rtn", "seconds": seconds, "cpu_seconds": cpu,
                 "rel_mse": (approx - weight).square().mean().item() / norm})
    for method in args.methods:
        quantize(weight[:8], args.bits, args.group_size, method, rounds=args.rounds)  # warm-up
        seconds, cpu, q = time_cpu_detail(lambda m=method: quantize(weight, args.bits, args.group_size, m,
                                                          rounds=args.rounds), args.repeats)
        rel_mse = (q.dequantize() - weight).square().mean().item() / norm
        rows.append({"impl": "lutflash", "method": method, "seconds": seconds, "cpu_seconds": cpu,
                     "rel_mse": rel_mse})

    print(f"weight {args.n}x{args.k} float32, bits {args.bits}, group {args.group_size}, "
          f"rounds {args.rounds}, threads {torch.get_num_threads()} (OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}), {os.cpu_count()} cores")
    print(f"1-minute load average before the runs: {load_before:.2f}")
    print(f"{'impl':<10} {'method':<12} {'seconds':>9} {'cpu s':>8} {'rel. MSE':>10}")
    for row in rows:
        print(f"{row['impl']:<10} {row['method']:<12} {row['seconds']:>9.3f} "
              f"{row['cpu_seconds']:>8.3f} {row['rel_mse']:>10.5f}")

    if args.json:
        record = {
            "benchmark": "bcq_quantize",
            "date": time.strftime("%Y-%m-%d"),
            "commit": git_commit(),
            "machine": {"cpu": platform.processor() or platform.machine(),
                        "cores": os.cpu_count(), "torch": torch.__version__,
                        "load_average_before": load_before},
            "config": {"n": args.n, "k": args.k, "bits": args.bits,
                       "group_size": args.group_size, "rounds": args.rounds,
                       "repeats": args.repeats, "seed": args.seed},
            "results": rows,
        }
        write_json(args.json, record)


if __name__ == "__main__":
    main()
