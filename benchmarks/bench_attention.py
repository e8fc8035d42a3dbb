"""lutflash.flash_attention vs torch's scaled_dot_product_attention, measured in the same run.

    python benchmarks/bench_attention.py --device cpu [--json out.json] [--reps 5]
    python benchmarks/bench_attention.py --device cuda   # SDPA FLASH_ATTENTION and CUDNN_ATTENTION

Shapes: B=1, H=8, D in {64, 128}, S in {512, 1024, 2048, 4096}, causal and not; forward and
forward+backward; the median of --reps repetitions after one warm-up. On the CPU it also
measures the peak resident memory of a forward at S=16384 in a fresh subprocess and compares
it with the S^2 score buffer that a non-tiled implementation would need.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import lutflash


def median_seconds(fn, reps: int, device: str) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            # L2 flush between repetitions: overwrite a buffer larger than the cache.
            flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
            flush.zero_()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def attention_flops(s: int, h: int, d: int, causal: bool, backward: bool) -> float:
    forward = 4.0 * s * s * h * d * (0.5 if causal else 1.0)
    return forward * (3.5 if backward else 1.0)  # the backward is 2.5 forwards


def make_inputs(s, h, d, device, dtype, requires_grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, s, h, d, generator=g).to(device=device, dtype=dtype)
               .requires_grad_(requires_grad) for _ in range(3))
    return q, k, v


def lutflash_fn(q, k, v, causal, backward):
    def run():
        out = lutflash.flash_attention(q, k, v, causal=causal)
        if backward:
            out.backward(torch.ones_like(out))
    return run


def sdpa_fn(q, k, v, causal, backward, backend=None):
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_(backward) for t in (q, k, v))

    def run():
        if backend is None:
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        else:
            with torch.nn.attention.sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        if backward:
            out.backward(torch.ones_like(out))
    return run


def peers(device):
    if device == "cpu":
        return [("sdpa_cpu", None)]
    from torch.nn.attention import SDPBackend
    return [("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)]


def peak_memory_subprocess(s: int, h: int, d: int) -> dict:
    """Peak RSS growth of one forward at sequence length s, in a fresh interpreter (tracemalloc
    cannot see the kernel's C memory; the kernel's /proc peak, reset just before the call, can).
    Linux only."""
    code = f"""
import torch, lutflash

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

q, k, v = (torch.randn(1, {s}, {h}, {d}) for _ in range(3))
lutflash.flash_attention(q[:, :64], k[:, :64], v[:, :64])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current resident size
before = status("VmRSS:")
out = lutflash.flash_attention(q, k, v)
print(status("VmHWM:") - before)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    grown = int(result.stdout.strip().splitlines()[-1])
    score_buffer = s * s * h * 4
    output = s * h * d * 4
    return {"seqlen": s, "heads": h, "head_dim": d, "peak_rss_growth_bytes": grown,
            "output_bytes": output, "s2_score_buffer_bytes": score_buffer,
            "no_s2_buffer": grown < score_buffer / 8}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="default: float32 on the CPU, bfloat16 on the GPU")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--memory-seqlen", type=int, default=16384)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU visible to torch")
    dtype = getattr(torch, args.dtype or ("float32" if device == "cpu" else "bfloat16"))
    results = {"device": device, "dtype": str(dtype), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "rows": []}
    if device == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
    modes = [False] if args.no_backward else [False, True]
    header = (f"{'pass':<8} {'D':>4} {'S':>6} {'causal':>6} {'lutflash ms':>12} "
              + " ".join(f"{name + ' ms':>14}" for name, _ in peers(device)) + f" {'ratio':>6}")
    print(f"device={device} dtype={dtype} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(header)
    for backward in modes:
        for d in args.head_dims:
            for s in args.seqlens:
                for causal in (False, True):
                    q, k, v = make_inputs(s, args.heads, d, device, dtype, backward)
                    row = {"pass": "fwd+bwd" if backward else "fwd", "head_dim": d, "seqlen": s,
                           "causal": causal, "batch": 1, "heads": args.heads}
                    try:
                        ours = median_seconds(lutflash_fn(q, k, v, causal, backward), args.reps,
                                              device)
                    except RuntimeError as error:  # no GPU kernel yet
                        ours, row["lutflash_error"] = None, str(error).splitlines()[0]
                    row["lutflash_s"] = ours
                    for name, backend in peers(device):
                        try:
                            row[name + "_s"] = median_seconds(
                                sdpa_fn(q, k, v, causal, backward, backend), args.reps, device)
                        except RuntimeError as error:
                            row[name + "_s"], row[name + "_error"] = None, str(error)[:200]
                    peer_times = [row[n + "_s"] for n, _ in peers(device) if row[n + "_s"]]
                    best_peer = min(peer_times) if peer_times else None
                    row["ratio_vs_best_peer"] = ours / best_peer if ours and best_peer else None
                    flops = attention_flops(s, args.heads, d, causal, backward)
                    row["lutflash_gflops"] = flops / ours / 1e9 if ours else None
                    results["rows"].append(row)

                    def fmt(x):
                        return f"{x * 1e3:.2f}" if x else "-"
                    ratio = row["ratio_vs_best_peer"]
                    print(f"{row['pass']:<8} {d:>4} {s:>6} {str(causal):>6} {fmt(ours):>12} "
                          + " ".join(f"{fmt(row[n + '_s']):>14}" for n, _ in peers(device))
                          + f" {f'{ratio:.2f}' if ratio else '-':>6}", flush=True)
    errors = {r["lutflash_error"] for r in results["rows"] if r.get("lutflash_error")}
    for error in errors:
        print(f"lutflash: {error}")
    if device == "cpu" and args.memory_seqlen:
        memory = peak_memory_subprocess(args.memory_seqlen, args.heads, 128)
        results["memory"] = memory
        print(f"forward at S={memory['seqlen']}, H={memory['heads']}, D=128: peak RSS grew "
              f"{memory['peak_rss_growth_bytes'] / 2**20:.1f} MiB (output "
              f"{memory['output_bytes'] / 2**20:.1f} MiB; an S^2 fp32 score buffer would be "
              f"{memory['s2_score_buffer_bytes'] / 2**20:.0f} MiB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
