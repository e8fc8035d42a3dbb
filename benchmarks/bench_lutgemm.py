"""LUT-GEMM benchmark: lutflash against what a user would run instead, in the same run.

    python benchmarks/bench_lutgemm.py --device cpu    # LLaMA-7B shapes, m = 1, 2, 4, 8, 16
    python benchmarks/bench_lutgemm.py --device cuda   # OPT-175B / LLaMA-2-7B / 70B shapes
    python benchmarks/bench_lutgemm.py --device cuda --quick --json a.json   # before/after run

CPU peers: torch F.linear in float32 and in bfloat16; lutflash runs with float32 x (exact float
tables) and bfloat16 x (int16 tables looked up by byte shuffles), for each instruction-set
variant this CPU has (--variants; forced with _C.lutgemm_cpu_variant), and a table of speedups
is printed at the end. CUDA peers: F.linear in float16 (cuBLAS),
torch._weight_int4pack_mm (torch's int4 group-128 kernel, bfloat16), and the memory floor:
bytes of the packed weight and metadata over the bandwidth of a device-to-device copy measured
in this run. GPU times are CUDA-event medians with L2 flushed before every repetition
(timing.CudaTimer). Each lutflash product at m in --check-m is also compared with F.linear on
the dequantized weight, so that a wrong answer cannot pass for a fast one.

--quick (CUDA): 6 shapes (square 12288² and 4096², up-projections 4096→11008 and 8192→28672,
down-projections 11008→4096 and 28672→8192) at m = 1 (the m <= 2 kernel), 4 and 16 (tensor
cores with k split) and 256 (tensor cores), every --bits and --modes: 192 timings of 53 calls
of ~0.2 ms flush and spin plus <= 0.3 ms of kernel, about 4 s of GPU time on an H200; with
start-up, the copy bandwidth and the weights' set-up (made on the CPU) about 30 s in all.
--quick (CPU): 4096², m = 1 and 16. A before/after comparison is this script run at two
commits, then `python benchmarks/compare.py before.json after.json`.

JSON (--json), stable; readers: report.py, compare.py:
    {"meta": {"device": "cpu"|"cuda", "torch": str, "date": "YYYY-MM-DD", "commit": str,
              "quick": bool, "reps": int,
              CPU: "cpu": str, "threads": int;
              CUDA: "gpu": str, "copy_bandwidth_bytes_per_s": float,
                    "bits_per_weight": {bits: float}},
     "rows": [{"shape": "K->N", "m": int, "<timing>": µs, ...}],
     "checks": [{"shape": "K->N", "m": int, "impl": str, "rel_err": float}]}
    timings, CPU: "F.linear fp32", "F.linear bf16", "lutflash {bits}b" (general mode, float32 x,
    best variant), "lutflash {bits}b {fp32|bf16} {variant}" (x's dtype, forced variant);
    CUDA: "cuBLAS fp16", "torch int4" (absent where torch lacks it), "lutflash {bits}b {u|g}"
    (uniform or general mode) and "floor {bits}b {u|g}" (the memory floor, not a measurement).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import CudaTimer, copy_bandwidth, environment, time_cpu, write_json

import lutflash
from lutflash.bcq import bits_per_weight
from lutflash.testing import random_bcq_weight, relative_error

CPU_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
CUDA_SHAPES = [(12288, 12288), (12288, 49152), (49152, 12288), (4096, 4096), (4096, 11008),
               (11008, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]
CPU_M = [1, 2, 4, 8, 16]
CPU_VARIANTS = ["portable", "avx2", "avx512"]
CUDA_M = [1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096]
QUICK_CPU_SHAPES, QUICK_CPU_M = [(4096, 4096)], [1, 16]
QUICK_CUDA_SHAPES = [(12288, 12288), (4096, 4096), (4096, 11008), (8192, 28672), (11008, 4096),
                     (28672, 8192)]
QUICK_CUDA_M = [1, 4, 16, 256]
CHECK_TOLERANCE = 1e-2  # relative error against F.linear on the dequantized weight


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


def check(checks: list, args, shape: str, m: int, label: str, x, qweight) -> None:
    """Relative error of lutflash.lutgemm against F.linear on the dequantized weight."""
    if m not in args.check_m:
        return
    error = relative_error(lutflash.lutgemm(x, qweight), F.linear(x, qweight.dequantize(x.dtype)))
    checks.append({"shape": shape, "m": m, "impl": label, "rel_err": error})
    if not error < CHECK_TOLERANCE:
        print(f"  WRONG: {label} at {shape} m={m}: relative error {error:.2e}", flush=True)


def cpu_variants(requested: list[str]) -> list[str]:
    """The requested variants this CPU can run (variants are ordered; the best is the last)."""
    best = CPU_VARIANTS.index(lutflash._C.lutgemm_cpu_variant("best"))
    return [v for v in requested if CPU_VARIANTS.index(v) <= best]


def bench_cpu(args) -> tuple[list[dict], list[dict]]:
    rows, checks = [], []
    variants = cpu_variants(args.variants)
    for k, n in args.shapes:
        weight = torch.randn(n, k) * 0.02
        weight_bf16 = weight.bfloat16()
        qweights = {bits: random_bcq_weight(n, k, bits, 128, "general") for bits in args.bits}
        for m in args.m:
            x = torch.randn(m, k)
            x_bf16 = x.bfloat16()
            row = {"shape": f"{k}->{n}", "m": m,
                   "F.linear fp32": time_cpu(lambda: F.linear(x, weight), args.reps),
                   "F.linear bf16": time_cpu(lambda: F.linear(x_bf16, weight_bf16), args.reps)}
            for bits, qweight in qweights.items():
                label = f"lutflash {bits}b"
                row[label] = time_cpu(lambda: lutflash.lutgemm(x, qweight), args.reps)
                check(checks, args, row["shape"], m, label, x, qweight)
                for variant in variants:
                    lutflash._C.lutgemm_cpu_variant(variant)
                    for dtype, xv in (("fp32", x), ("bf16", x_bf16)):
                        label = f"lutflash {bits}b {dtype} {variant}"
                        row[label] = time_cpu(lambda: lutflash.lutgemm(xv, qweight), args.reps)
                        check(checks, args, row["shape"], m, label, xv, qweight)
                lutflash._C.lutgemm_cpu_variant("best")
            rows.append(row)
            print_row(row, "F.linear fp32")
    print_cpu_table(rows, args.bits, variants)
    return rows, checks


def print_cpu_table(rows: list[dict], bits: list[int], variants: list[str]) -> None:
    """Per shape and m: lutflash µs and its speedup over F.linear fp32 / bf16, per variant."""
    print("\n| shape | m | F.linear fp32 µs | F.linear bf16 µs | "
          + " | ".join(f"{b}b {d} {v}: µs (× fp32 / × bf16)" for v in variants
                       for d in ("fp32", "bf16") for b in bits) + " |")
    print("|---" * (4 + 2 * len(variants) * len(bits)) + "|")
    for r in rows:
        cells = [r["shape"], str(r["m"]), f"{r['F.linear fp32']:.0f}", f"{r['F.linear bf16']:.0f}"]
        for v in variants:
            for d in ("fp32", "bf16"):
                for b in bits:
                    t = r[f"lutflash {b}b {d} {v}"]
                    cells.append(f"{t:.0f} ({r['F.linear fp32'] / t:.1f} / "
                                 f"{r['F.linear bf16'] / t:.1f})")
        print("| " + " | ".join(cells) + " |")


def bench_cuda(args) -> tuple[list[dict], list[dict], float]:
    device = torch.device("cuda")
    timer = CudaTimer(device)
    bandwidth = copy_bandwidth(timer, device)
    print(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s ({torch.cuda.get_device_name()})")
    rows, checks = [], []
    for k, n in args.shapes:
        weight = torch.randn(n, k, device=device, dtype=torch.float16) * 0.02
        qweights = {(bits, mode): random_bcq_weight(n, k, bits, 128, mode,
                                                    meta_dtype=torch.float16, device=device)
                    for bits in args.bits for mode in args.modes}
        int4 = int4_peer(weight)
        for m in args.m:
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
                check(checks, args, row["shape"], m, label, x, qweight)
            rows.append(row)
            print_row(row, "cuBLAS fp16")
    return rows, checks, bandwidth


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
    plt.close(fig)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="a representative subset for before/after runs (see above); "
                        "--shapes and --m still override it")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--modes", nargs="+", default=["general", "uniform"],
                        help="CUDA only; the CPU rows are general mode")
    parser.add_argument("--m", type=int, nargs="+")
    parser.add_argument("--shapes", type=lambda s: tuple(int(v) for v in s.split("x")), nargs="+",
                        help="k x n pairs such as 4096x11008")
    parser.add_argument("--reps", type=int, default=None, help="default 20 (CPU), 50 (CUDA)")
    parser.add_argument("--check-m", type=int, nargs="*", default=[1, 16, 256],
                        help="the m at which every product is checked (none: no checks)")
    parser.add_argument("--variants", nargs="+", choices=CPU_VARIANTS, default=["avx2", "avx512"],
                        help="CPU: the kernel variants timed (those this CPU has)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.exit(1, "--device cuda: no GPU visible to torch\n")
    if args.shapes is None:
        args.shapes = ((QUICK_CUDA_SHAPES if cuda else QUICK_CPU_SHAPES) if args.quick
                       else (CUDA_SHAPES if cuda else CPU_SHAPES))
    if args.m is None:
        args.m = (QUICK_CUDA_M if cuda else QUICK_CPU_M) if args.quick else (CUDA_M if cuda else CPU_M)
    args.reps = args.reps or (50 if cuda else 20)
    torch.manual_seed(0)
    meta = environment(args.device)
    meta.update(quick=args.quick, reps=args.reps)
    if cuda:
        rows, checks, bandwidth = bench_cuda(args)
        meta.update(copy_bandwidth_bytes_per_s=bandwidth,
                    bits_per_weight={b: bits_per_weight(b, 128, "general") for b in args.bits})
    else:
        rows, checks = bench_cpu(args)
    wrong = [c for c in checks if not c["rel_err"] < CHECK_TOLERANCE]
    if checks:
        print(f"checks: {len(checks) - len(wrong)} of {len(checks)} products within relative "
              f"error {CHECK_TOLERANCE:g} of F.linear on the dequantized weight")
    if args.json:
        write_json(args.json, {"meta": meta, "rows": rows, "checks": checks})
    if args.plot:
        plot(rows, args.plot, args.device)


if __name__ == "__main__":
    main()
