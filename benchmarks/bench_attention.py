"""lutflash.flash_attention vs torch's scaled_dot_product_attention, measured in the same run.

    python benchmarks/bench_attention.py --device cpu [--json out.json] [--reps 5]
    python benchmarks/bench_attention.py --device cuda   # SDPA FLASH_ATTENTION and CUDNN_ATTENTION
    python benchmarks/bench_attention.py --device cuda --decode-only   # only the decode section

CPU: B=1, H=8, D in {64, 128}, S in {512, 1024, 2048, 4096}, causal and not; forward and
forward+backward; the median of --reps repetitions after one warm-up. It also measures the peak
resident memory of a forward at S=16384 in a fresh subprocess and compares it with the S^2
score buffer that a non-tiled implementation would need.

CUDA: the FlashAttention grid (batch x seqlen = 16k tokens, hidden 2048, D in {64, 128},
S = 512 ... 16384, causal and not, fp16 and bf16), TFLOP/s counted as 4·B·S²·H·D (halved for
causal; the backward as 2.5 forwards), CUDA-event medians with L2 flushed; then decode
(Sq = 1, Hq = 32, Hkv in {32, 8}, D = 128, Sk = 1k ... 64k) against a copy's bandwidth.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import time_cpu

import lutflash


def median_seconds(fn, reps: int) -> float:
    return time_cpu(fn, reps) * 1e-6


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


PEERS = [("sdpa_cpu", None)]  # the CUDA comparison (bench_cuda) names its own backends


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


def bench_cuda(args) -> dict:
    """The FlashAttention benchmark grid (16k tokens per batch, hidden 2048) and decode."""
    from timing import CudaTimer, copy_bandwidth, git_commit
    from torch.nn.attention import SDPBackend, sdpa_kernel

    timer = CudaTimer()
    results = {"device": "cuda", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "commit": git_commit(), "rows": [], "decode": []}
    backends = {"fa2": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    print(f"{'dtype':>8} {'D':>4} {'S':>6} {'B':>3} {'causal':>6} | TFLOP/s fwd: "
          f"{'lutflash':>8} {'fa2':>6} {'cudnn':>6} | fwd+bwd: {'lutflash':>8} {'fa2':>6} {'cudnn':>6}")
    for dtype in ([] if args.decode_only else args.cuda_dtypes):
        dt = getattr(torch, dtype)
        for d in args.head_dims:
            heads = 2048 // d
            for s in args.cuda_seqlens:
                batch = max(1, 16384 // s)
                for causal in (False, True):
                    q, k, v = (torch.randn(batch, s, heads, d, device="cuda", dtype=dt,
                                           requires_grad=True) for _ in range(3))
                    grad = torch.randn_like(q)
                    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
                    flops = 4.0 * batch * s * s * heads * d * (0.5 if causal else 1.0)
                    row = {"dtype": dtype, "head_dim": d, "seqlen": s, "batch": batch,
                           "heads": heads, "causal": causal}

                    def ours():
                        return lutflash.flash_attention(q, k, v, causal=causal)

                    def sdpa():
                        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

                    for name, fn, inputs, g in (("lutflash", ours, (q, k, v), grad),
                                                ("fa2", sdpa, (qt, kt, vt), grad.transpose(1, 2)),
                                                ("cudnn", sdpa, (qt, kt, vt), grad.transpose(1, 2))):
                        context = sdpa_kernel(backends[name]) if name in backends else nullcontext()
                        try:
                            with context:
                                with torch.no_grad():
                                    forward = timer(fn, args.reps)

                                def both(fn=fn, inputs=inputs, g=g):
                                    torch.autograd.grad(fn(), inputs, g)
                                total = timer(both, args.reps)
                            row[name] = (flops / forward / 1e6, 3.5 * flops / total / 1e6)
                        except RuntimeError as error:
                            row[name] = (None, None)
                            row[name + "_error"] = str(error).splitlines()[0][:160]
                    results["rows"].append(row)
                    cells = lambda i: " ".join(  # noqa: E731
                        f"{row[n][i]:{8 if n == 'lutflash' else 6}.0f}" if row[n][i] else
                        f"{'-':>{8 if n == 'lutflash' else 6}}" for n in ("lutflash", "fa2", "cudnn"))
                    print(f"{dtype:>8} {d:>4} {s:>6} {batch:>3} {str(causal):>6} | {'':12}"
                          f"{cells(0)} | {'':9}{cells(1)}", flush=True)
    if args.decode or args.decode_only:
        # a ~1 ms spin: a decode call is a few to a few hundred us of GPU time, and the host's
        # Python path must never show through (B = 1 timings jumped 2-4x with the 100 us spin)
        timer = CudaTimer(spin_cycles=2_000_000)
        results["copy_bandwidth"] = bandwidth = copy_bandwidth(timer)
        print(f"decode (Sq = 1, D = 128, Hq = 32): copy bandwidth {bandwidth / 1e12:.2f} TB/s")
        print(f"{'B':>3} {'Hkv':>4} {'Sk':>6} | {'lutflash us':>11} {'GB/s':>6} {'% copy':>7} | "
              f"{'fa2 us':>8} {'speedup':>7}")
        for batch in (1, 16):
            for heads_kv in (32, 8):
                for sk in (1024, 4096, 16384, 65536):
                    q = torch.randn(batch, 1, 32, 128, device="cuda", dtype=torch.float16)
                    k, v = (torch.randn(batch, sk, heads_kv, 128, device="cuda",
                                        dtype=torch.float16) for _ in range(2))
                    moved = 2 * k.numel() * 2 + 2 * q.numel() * 2
                    ours = timer(lambda: lutflash.flash_attention(q, k, v, causal=True), args.reps)
                    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
                    try:
                        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                            fa2 = timer(lambda: F.scaled_dot_product_attention(
                                qt, kt, vt, is_causal=False, enable_gqa=heads_kv != 32), args.reps)
                    except RuntimeError:
                        fa2 = None
                    row = {"batch": batch, "heads_kv": heads_kv, "seqlen_k": sk, "lutflash_us": ours,
                           "fa2_us": fa2, "bytes": moved}
                    results["decode"].append(row)
                    rate = moved / (ours * 1e-6)
                    print(f"{batch:>3} {heads_kv:>4} {sk:>6} | {ours:11.1f} {rate / 1e9:6.0f} "
                          f"{100 * rate / bandwidth:6.0f}% | "
                          f"{fa2 if fa2 else float('nan'):8.1f} {fa2 / ours if fa2 else float('nan'):7.2f}",
                          flush=True)
    return results


def plot_cuda(results: dict, prefix: str) -> None:
    """PNG plots of a bench_cuda result: PREFIX_fwd.png and PREFIX_fwdbwd.png (TFLOP/s against
    seqlen, one panel per dtype x head dim x causal) and PREFIX_decode.png (decode bandwidth as
    a share of the copy, lutflash and fa2, against Sk)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return
    rows = results.get("rows", [])
    panels = list(dict.fromkeys((r["dtype"], r["head_dim"], r["causal"]) for r in rows))
    for index, name in ((0, "fwd"), (1, "fwdbwd")):
        if not panels:
            break
        cols = 4
        fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, squeeze=False,
                                 figsize=(4.5 * cols, 3.6 * ((len(panels) + cols - 1) // cols)))
        for ax, (dtype, d, causal) in zip(axes.flat, panels, strict=False):
            mine = [r for r in rows if (r["dtype"], r["head_dim"], r["causal"]) == (dtype, d, causal)]
            for impl in ("lutflash", "fa2", "cudnn"):
                points = [(r["seqlen"], r[impl][index]) for r in mine if r[impl][index]]
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=impl)
            ax.set(title=f"{dtype} D={d} {'causal' if causal else 'full'}", xscale="log",
                   xlabel="seqlen", ylabel="TFLOP/s " + ("fwd" if index == 0 else "fwd+bwd"))
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7)
        fig.suptitle(f"{results.get('gpu', '')} {results.get('commit', '')}")
        fig.tight_layout()
        fig.savefig(f"{prefix}_{name}.png", dpi=90)
        plt.close(fig)
        print(f"wrote {prefix}_{name}.png")
    decode = results.get("decode", [])
    if decode and results.get("copy_bandwidth"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        configs = dict.fromkeys((r["batch"], r["heads_kv"]) for r in decode)
        for color, (batch, heads_kv) in enumerate(configs):
            mine = [r for r in decode if (r["batch"], r["heads_kv"]) == (batch, heads_kv)]
            for impl, style in (("lutflash", "-"), ("fa2", ":")):
                points = [(r["seqlen_k"], 100 * r["bytes"] / (r[impl + "_us"] * 1e-6)
                           / results["copy_bandwidth"]) for r in mine if r.get(impl + "_us")]
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", linestyle=style,
                            color=f"C{color}", label=f"{impl} B={batch} Hkv={heads_kv}")
        ax.axhline(85, color="gray", linewidth=0.8)
        ax.set(title=f"decode, Sq=1 D=128 Hq=32 fp16 ({results.get('gpu', '')})", xscale="log",
               xlabel="Sk", ylabel="% of copy bandwidth")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{prefix}_decode.png", dpi=90)
        plt.close(fig)
        print(f"wrote {prefix}_decode.png")


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
    parser.add_argument("--plot", help="GPU: write PNG plots PLOT_fwd.png, PLOT_fwdbwd.png, "
                        "PLOT_decode.png")
    parser.add_argument("--replot", metavar="JSON",
                        help="only draw --plot from a JSON file an earlier --device cuda run wrote")
    parser.add_argument("--cuda-seqlens", type=int, nargs="+",
                        default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--cuda-dtypes", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--no-decode", dest="decode", action="store_false")
    parser.add_argument("--decode-only", action="store_true",
                        help="only the decode section (skips the FlashAttention grid)")
    args = parser.parse_args()
    if args.replot:
        with open(args.replot) as f:
            plot_cuda(json.load(f), args.plot or str(Path(args.replot).with_suffix("")))
        return
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no GPU visible to torch")
        results = bench_cuda(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        if args.plot:
            plot_cuda(results, args.plot)
        return

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
              + " ".join(f"{name + ' ms':>14}" for name, _ in PEERS) + f" {'ratio':>6}")
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
                        ours = median_seconds(lutflash_fn(q, k, v, causal, backward), args.reps)
                    except RuntimeError as error:  # no GPU kernel yet
                        ours, row["lutflash_error"] = None, str(error).splitlines()[0]
                    row["lutflash_s"] = ours
                    for name, backend in PEERS:
                        try:
                            row[name + "_s"] = median_seconds(
                                sdpa_fn(q, k, v, causal, backward, backend), args.reps)
                        except RuntimeError as error:
                            row[name + "_s"], row[name + "_error"] = None, str(error)[:200]
                    peer_times = [row[n + "_s"] for n, _ in PEERS if row[n + "_s"]]
                    best_peer = min(peer_times) if peer_times else None
                    row["ratio_vs_best_peer"] = ours / best_peer if ours and best_peer else None
                    flops = attention_flops(s, args.heads, d, causal, backward)
                    row["lutflash_gflops"] = flops / ours / 1e9 if ours else None
                    results["rows"].append(row)

                    def fmt(x):
                        return f"{x * 1e3:.2f}" if x else "-"
                    ratio = row["ratio_vs_best_peer"]
                    print(f"{row['pass']:<8} {d:>4} {s:>6} {str(causal):>6} {fmt(ours):>12} "
                          + " ".join(f"{fmt(row[n + '_s']):>14}" for n, _ in PEERS)
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
