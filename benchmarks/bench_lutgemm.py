"""LUT-GEMM benchmark: lutflash against what a user would run instead, in the same run.

    python benchmarks/bench_lutgemm.py --device cpu    # LLaMA-7B shapes, m = 1, 4, 16
    python benchmarks/bench_lutgemm.py --device cuda   # OPT-175B / LLaMA-2-7B / 70B shapes

CPU peers: torch F.linear in float32. CUDA peers: F.linear in float16 (cuBLAS),
torch._weight_int4pack_mm (torch's int4 group-128 kernel, bfloat16), and the memory floor:
bytes of the packed weight and metadata over the bandwidth of a device-to-device copy measured
in this run. GPU times are CUDA-event medians with L2 flushed before every repetition.
Prints a table; --json and --plot write the numbers and a latency-vs-m plot.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import CudaTimer, copy_bandwidth, git_commit, time_cpu

import lutflash
from lutflash.bcq import bits_per_weight
from lutflash.testing import random_bcq_weight

CPU_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
CUDA_SHAPES = [(12288, 12288), (12288, 49152), (49152, 12288), (4096, 4096), (4096, 11008),
               (11008, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]


def int4_peer(weight: torch.Tensor, group_size: int = 128):
    """torch's own int4 kernel (tinygemm) on an RTN-quantized copy of `weight`, or None."""
    n, k = weight.shape
    try:
        w = weight.float().reshape(n, k // group_size, group_size)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        codes = ((w - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
        packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        weight_int4 = torch._convert_weight_to_int4pack(packed, 8)
        zero = lo + 8 * scale  # tinygemm dequantizes (code - 8) * scale + zero
        scales_zeros = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1)
        scales_zeros = scales_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)
        return lambda x: torch._weight_int4pack_mm(x, weight_int4, group_size, scales_zeros)
    except (RuntimeError, AttributeError, TypeError) as error:
        print(f"torch._weight_int4pack_mm unavailable: {str(error).splitlines()[0]}")
        return None


def bench_cpu(args) -> list[dict]:
    rows = []
    for k, n in args.shapes or CPU_SHAPES:
        weight = torch.randn(n, k) * 0.02
        for m in args.m or [1, 4, 16]:
            x = torch.randn(m, k)
            row = {"shape": f"{k}->{n}", "m": m,
                   "F.linear fp32": time_cpu(lambda: F.linear(x, weight), args.reps)}
            for bits in args.bits:
                qweight = random_bcq_weight(n, k, bits, 128, "general")
                row[f"lutflash {bits}b"] = time_cpu(lambda: lutflash.lutgemm(x, qweight), args.reps)
            rows.append(row)
            print_row(row, "F.linear fp32")
    return rows


def bench_cuda(args) -> tuple[list[dict], float]:
    device = torch.device("cuda")
    timer = CudaTimer(device)
    bandwidth = copy_bandwidth(timer, device)
    print(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s ({torch.cuda.get_device_name()})")
    rows = []
    for k, n in args.shapes or CUDA_SHAPES:
        weight = torch.randn(n, k, device=device, dtype=torch.float16) * 0.02
        qweights = {(bits, mode): random_bcq_weight(n, k, bits, 128, mode,
                                                    meta_dtype=torch.float16, device=device)
                    for bits in args.bits for mode in args.modes}
        int4 = int4_peer(weight)
        for m in args.m or [1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096]:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            row = {"shape": f"{k}->{n}", "m": m,
                   "cuBLAS fp16": timer(lambda: F.linear(x, weight), args.reps)}
            if int4 is not None:
                xb = x.bfloat16()
                row["torch int4"] = timer(lambda: int4(xb), args.reps)
            for (bits, mode), qweight in qweights.items():
                label = f"lutflash {bits}b {mode[0]}"
                row[label] = timer(lambda: lutflash.lutgemm(x, qweight), args.reps)
                row[f"floor {bits}b {mode[0]}"] = qweight.nbytes() / bandwidth * 1e6
            rows.append(row)
            print_row(row, "cuBLAS fp16")
    return rows, bandwidth


def print_row(row: dict, peer: str) -> None:
    cells = [f"{row['shape']:>12} m={row['m']:<5}"]
    for key, value in row.items():
        if key in ("shape", "m"):
            continue
        speedup = "" if key == peer or key.startswith("floor") else f" ({row[peer] / value:.2f}x)"
        cells.append(f"{key} {value:9.1f}us{speedup}")
    print(" | ".join(cells), flush=True)


def plot(rows: list[dict], path: Path, device: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    cols = min(3, len(shapes))
    fig, axes = plt.subplots((len(shapes) + cols - 1) // cols, cols, squeeze=False,
                             figsize=(5 * cols, 4 * ((len(shapes) + cols - 1) // cols)))
    for ax, shape in zip(axes.flat, shapes, strict=False):
        mine = [r for r in rows if r["shape"] == shape]
        ms = [r["m"] for r in mine]
        for key in mine[0]:
            if key in ("shape", "m") or (key.startswith("floor") and "3b" not in key):
                continue
            ax.plot(ms, [r[key] for r in mine], marker="o", label=key,
                    linestyle=":" if key.startswith("floor") else "-")
        ax.set(title=f"{shape} ({device})", xlabel="m", ylabel="µs", xscale="log", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--modes", nargs="+", default=["general", "uniform"])
    parser.add_argument("--m", type=int, nargs="+")
    parser.add_argument("--shapes", type=lambda s: tuple(int(v) for v in s.split("x")), nargs="+",
                        help="k x n pairs such as 4096x11008")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    meta = {"device": args.device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "commit": git_commit()}
    if args.device == "cpu":
        args.reps = args.reps or 20
        meta.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
        rows = bench_cpu(args)
    else:
        args.reps = args.reps or 50
        rows, bandwidth = bench_cuda(args)
        meta.update(gpu=torch.cuda.get_device_name(), copy_bandwidth_bytes_per_s=bandwidth,
                    bits_per_weight={b: bits_per_weight(b, 128, "general") for b in args.bits})
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, args.plot, args.device)


if __name__ == "__main__":
    main()
