"""lutflash.flash_attention vs torch's scaled_dot_product_attention, measured in the same run.

    python benchmarks/bench_attention.py --device cpu [--json out.json] [--reps 5]
    python benchmarks/bench_attention.py --device cuda   # SDPA FLASH_ATTENTION and CUDNN_ATTENTION
    python benchmarks/bench_attention.py --device cuda --sections decode   # one section only
    python benchmarks/bench_attention.py --device cuda --quick --json a.json   # before/after run

Sections (--sections, default all four):
  fwd     forward only (under no_grad);
  fwdbwd  forward + backward (torch.autograd.grad of the output with a given gradient);
          --deterministic also times lutflash's deterministic=True backward;
  decode  Sq = 1, Hq = 32, Hkv in {32, 8} (MHA, GQA), D = 128, causal, B in {1, 16},
          Sk = 1k ... 64k: eager calls and (CUDA) replays of one call captured in a CUDA graph,
          against SDPA flash and the bandwidth of a copy measured in the same run (bytes moved
          = K + V + q + out).
  kvcache decode through lutflash.flash_attention_with_kvcache with the new token appended
          (k, v of one row written at cache_seqlens = Sk - 1), Hq = 32, Hkv = 8, D = 128, causal,
          B in {1, 16, 64}, Sk = 1k ... 64k, contiguous and paged caches (pages of 16 and 256,
          shuffled), eager and graph replay; peers: torch SDPA (flash) over the same contiguous
          cache (without the append) and the plain lutflash.flash_attention call over it.

CUDA grid (fwd, fwdbwd): batch x seqlen = --tokens (16k) tokens, hidden 2048 (H = 2048 / D),
D in {64, 128}, S = 512 ... 16384, causal (bottom-right) and not, fp16 and bf16; peers SDPA's
FLASH_ATTENTION (FlashAttention-2, "fa2") and CUDNN_ATTENTION backends. TFLOP/s counted as
4·B·S²·H·D (halved for causal; the backward as 2.5 forwards). Times are CUDA-event medians
with L2 flushed (timing.CudaTimer; decode with a ~1 ms spin so that the host never shows).

CPU grid: B = 1, H = --heads, D in {64, 128}, S in {512 ... 4096}, causal and not, against
torch's CPU SDPA; medians of --reps wall times after a warm-up. It also measures the peak
resident memory of a forward at S = --memory-seqlen in a fresh subprocess and compares it with
the S² score buffer a non-tiled implementation would need. CPU decode: B = 1, Sk = 1k, 4k.

--quick (CUDA): fwd and fwdbwd at S = 1k, 4k, 16k, D = 64 and 128, causal and not, fp16 and
bf16 (24 grid points: 6 timings of 8 calls each, about 12 s of GPU time on an H200, mostly the
S = 16k fwd+bwd calls), decode at Sk = 1k, 4k, 16k, B = 1 and 16, Hkv = 32 and 8, both dtypes
(24 points: 4 timings of 23 calls of ~1.1 ms, about 3 s): under a minute in all, cuDNN's
per-shape set-up included. --quick (CPU): S = 256, 1024 at D = 64, memory at S = 4096.
A before/after comparison is this script run at two commits, then
`python benchmarks/compare.py before.json after.json`.

JSON (--json), stable; readers: report.py, compare.py. Keys of both devices:
    "device", "torch", "date", "commit", "quick", "reps", "sections", "rows", and where the
    decode section ran "copy_bandwidth" (bytes/s) and "decode": [{"dtype", "batch",
    "heads_kv", "seqlen_k", "bytes", "lutflash_us", "<peer>_us", CUDA: "lutflash_graph_us",
    "fa2_graph_us"}] (peer: "fa2" on CUDA, "sdpa_cpu" on the CPU; a time is null where the
    call failed).
    Where the kvcache section ran: "kvcache": [{"dtype", "batch", "seqlen_k", "bytes", and per
    call name (contiguous, plain, sdpa, paged16, paged256) "<name>_us" and, on CUDA,
    "<name>_graph_us" (null where the call failed, with "<name>_error")}].
  CUDA: "gpu"; rows [{"dtype", "head_dim", "seqlen", "batch", "heads", "causal",
    "lutflash" | "fa2" | "cudnn" | "lutflash_det": [fwd TFLOP/s, fwd+bwd TFLOP/s] (null where
    not measured or failed), "<impl>_error": str}].
  CPU: "dtype" (the first --dtypes), "cpu", "threads", "memory" ({"seqlen", "heads", "head_dim",
    "peak_rss_growth_bytes", "output_bytes", "s2_score_buffer_bytes", "no_s2_buffer"}), rows
    [{"pass": "fwd" | "fwd+bwd", "dtype", "head_dim", "seqlen", "causal", "batch", "heads",
    "lutflash_s", "sdpa_cpu_s", "ratio_vs_best_peer", "lutflash_gflops", "<impl>_error"}].
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
from timing import CudaTimer, copy_bandwidth, cuda_graph, environment, time_cpu, write_json
from torch.nn.attention import SDPBackend, sdpa_kernel

import lutflash

SECTIONS = ("fwd", "fwdbwd", "decode", "kvcache")
# (device, quick) -> defaults of the size flags
DEFAULTS = {
    ("cpu", False): dict(dtypes=["float32"], seqlens=[512, 1024, 2048, 4096], head_dims=[64, 128],
                         decode_seqlens=[1024, 4096], decode_batches=[1], memory_seqlen=16384,
                         kvcache_seqlens=[1024, 4096], kvcache_batches=[1]),
    ("cpu", True): dict(dtypes=["float32"], seqlens=[256, 1024], head_dims=[64],
                        decode_seqlens=[1024], decode_batches=[1], memory_seqlen=4096,
                        kvcache_seqlens=[1024], kvcache_batches=[1]),
    ("cuda", False): dict(dtypes=["float16", "bfloat16"], seqlens=[512, 1024, 2048, 4096, 8192, 16384],
                          head_dims=[64, 128], decode_seqlens=[1024, 4096, 16384, 65536],
                          decode_batches=[1, 16], kvcache_seqlens=[1024, 4096, 16384, 65536],
                          kvcache_batches=[1, 16, 64]),
    ("cuda", True): dict(dtypes=["float16", "bfloat16"], seqlens=[1024, 4096, 16384],
                         head_dims=[64, 128], decode_seqlens=[1024, 4096, 16384],
                         decode_batches=[1, 16], kvcache_seqlens=[1024, 16384],
                         kvcache_batches=[1, 16, 64]),
}
HIDDEN = 2048  # CUDA grid: H = HIDDEN / D
DECODE_HEADS, DECODE_HEAD_DIM = 32, 128


def attention_flops(s: int, h: int, d: int, causal: bool, backward: bool) -> float:
    forward = 4.0 * s * s * h * d * (0.5 if causal else 1.0)
    return forward * (3.5 if backward else 1.0)  # the backward is 2.5 forwards


# --------------------------------------------------------------------------------------------
# CPU grid

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


def sdpa_fn(q, k, v, causal, backward):
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_(backward) for t in (q, k, v))

    def run():
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        if backward:
            out.backward(torch.ones_like(out))
    return run


def cpu_grid(args) -> list[dict]:
    rows = []
    modes = [backward for backward, name in ((False, "fwd"), (True, "fwdbwd"))
             if name in args.sections]
    if not modes:
        return rows
    print(f"{'pass':<8} {'dtype':>9} {'D':>4} {'S':>6} {'causal':>6} {'lutflash ms':>12} "
          f"{'sdpa_cpu ms':>12} {'ratio':>6}")
    for backward in modes:
        for dtype in args.dtypes:
            for d in args.head_dims:
                for s in args.seqlens:
                    for causal in (False, True):
                        q, k, v = make_inputs(s, args.heads, d, "cpu", getattr(torch, dtype), backward)
                        row = {"pass": "fwd+bwd" if backward else "fwd", "dtype": dtype,
                               "head_dim": d, "seqlen": s, "causal": causal, "batch": 1,
                               "heads": args.heads}
                        for name, fn in (("lutflash", lutflash_fn), ("sdpa_cpu", sdpa_fn)):
                            try:
                                row[name + "_s"] = time_cpu(fn(q, k, v, causal, backward),
                                                            args.reps) * 1e-6
                            except RuntimeError as error:
                                row[name + "_s"] = None
                                row[name + "_error"] = str(error).splitlines()[0][:200]
                        ours, peer = row["lutflash_s"], row["sdpa_cpu_s"]
                        row["ratio_vs_best_peer"] = ours / peer if ours and peer else None
                        flops = attention_flops(s, args.heads, d, causal, backward)
                        row["lutflash_gflops"] = flops / ours / 1e9 if ours else None
                        rows.append(row)
                        ratio = row["ratio_vs_best_peer"]
                        print(f"{row['pass']:<8} {dtype:>9} {d:>4} {s:>6} {str(causal):>6} "
                              f"{ms(ours):>12} {ms(peer):>12} "
                              f"{f'{ratio:.2f}' if ratio else '-':>6}", flush=True)
    for error in {r["lutflash_error"] for r in rows if r.get("lutflash_error")}:
        print(f"lutflash: {error}")
    return rows


def ms(seconds):
    return f"{seconds * 1e3:.2f}" if seconds else "-"


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


# --------------------------------------------------------------------------------------------
# CUDA grid (written for any device, so that its logic also runs on the CPU)

def gpu_grid(args, device: str, timer) -> list[dict]:
    """TFLOP/s of forward and forward+backward on the FlashAttention grid."""
    backends = {"fa2": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    fwd, fwdbwd = "fwd" in args.sections, "fwdbwd" in args.sections
    impls = ["lutflash"] + (["lutflash_det"] if args.deterministic and fwdbwd else []) + ["fa2", "cudnn"]
    rows = []
    if not (fwd or fwdbwd):
        return rows
    print(f"{'dtype':>8} {'D':>4} {'S':>6} {'B':>3} {'causal':>6} | TFLOP/s fwd: "
          f"{'lutflash':>8} {'fa2':>6} {'cudnn':>6} | fwd+bwd: {'lutflash':>8} {'fa2':>6} {'cudnn':>6}"
          + (f" {'determ.':>7}" if "lutflash_det" in impls else ""))
    for dtype in args.dtypes:
        dt = getattr(torch, dtype)
        for d in args.head_dims:
            heads = HIDDEN // d
            for s in args.seqlens:
                batch = max(1, args.tokens // s)
                for causal in (False, True):
                    q, k, v = (torch.randn(batch, s, heads, d, device=device, dtype=dt,
                                           requires_grad=True) for _ in range(3))
                    grad = torch.randn_like(q)
                    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
                    flops = 4.0 * batch * s * s * heads * d * (0.5 if causal else 1.0)
                    row = {"dtype": dtype, "head_dim": d, "seqlen": s, "batch": batch,
                           "heads": heads, "causal": causal}

                    def ours(deterministic=False):
                        return lutflash.flash_attention(q, k, v, causal=causal,
                                                        deterministic=deterministic)

                    def sdpa():
                        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

                    for name in impls:
                        fn, inputs, g = ((ours, (q, k, v), grad) if name == "lutflash" else
                                         (lambda: ours(True), (q, k, v), grad) if name == "lutflash_det"
                                         else (sdpa, (qt, kt, vt), grad.transpose(1, 2)))
                        context = sdpa_kernel(backends[name]) if name in backends else nullcontext()
                        forward = total = None
                        try:
                            with context:
                                if fwd and name != "lutflash_det":
                                    with torch.no_grad():
                                        forward = timer(fn, args.reps)
                                if fwdbwd:
                                    def both(fn=fn, inputs=inputs, g=g):
                                        torch.autograd.grad(fn(), inputs, g)
                                    total = timer(both, args.reps)
                        except RuntimeError as error:
                            row[name + "_error"] = str(error).splitlines()[0][:160]
                        row[name] = [flops / forward / 1e6 if forward else None,
                                     3.5 * flops / total / 1e6 if total else None]
                    rows.append(row)

                    def cells(i, names=("lutflash", "fa2", "cudnn")):
                        return " ".join(
                            f"{row[n][i]:{8 if n == 'lutflash' else 6}.0f}" if row[n][i] else
                            f"{'-':>{8 if n == 'lutflash' else 6}}" for n in names)
                    print(f"{dtype:>8} {d:>4} {s:>6} {batch:>3} {str(causal):>6} | {'':12}"
                          f"{cells(0)} | {'':9}{cells(1)}"
                          + (f" {cells(1, ('lutflash_det',)):>7}" if "lutflash_det" in row else ""),
                          flush=True)
    return rows


def time_call(row: dict, name: str, fn, timer, reps: int, cuda: bool) -> None:
    """row[name_us] (eager) and, on CUDA, row[name_graph_us] (one captured call replayed);
    None where the call failed, with the eager failure in row[name_error]."""
    try:
        row[name + "_us"] = timer(fn, reps)
    except RuntimeError as e:
        row[name + "_us"], row[name + "_error"] = None, str(e)[:200]
    if cuda:
        try:
            graph = cuda_graph(fn)
            row[name + "_graph_us"] = timer(graph.replay, reps)
            del graph
        except RuntimeError:
            row[name + "_graph_us"] = None


def decode(args, device: str, timer, bandwidth: float) -> list[dict]:
    """Sq = 1 attention over a KV cache: eager calls, CUDA-graph replays (CUDA) and SDPA."""
    cuda = device == "cuda"
    peer = "fa2" if cuda else "sdpa_cpu"
    print(f"decode (Sq = 1, D = {DECODE_HEAD_DIM}, Hq = {DECODE_HEADS}, causal): copy bandwidth "
          f"{bandwidth / 1e12:.3f} TB/s; % of it in brackets")
    print(f"{'dtype':>8} {'B':>3} {'Hkv':>4} {'Sk':>6} | {'lutflash us':>16} {peer + ' us':>16} "
          f"{'speedup':>7}" + (f" | {'graph: lutflash':>15} {'fa2':>16} {'speedup':>7}" if cuda else ""))
    rows = []
    for dtype in args.dtypes:
        dt = getattr(torch, dtype)
        for batch in args.decode_batches:
            for heads_kv in (DECODE_HEADS, 8):
                for sk in args.decode_seqlens:
                    q = torch.randn(batch, 1, DECODE_HEADS, DECODE_HEAD_DIM, device=device, dtype=dt)
                    k, v = (torch.randn(batch, sk, heads_kv, DECODE_HEAD_DIM, device=device, dtype=dt)
                            for _ in range(2))
                    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
                    moved = (2 * k.numel() + 2 * q.numel()) * k.element_size()

                    def ours():
                        return lutflash.flash_attention(q, k, v, causal=True)

                    def sdpa(heads_kv=heads_kv):
                        with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if cuda else nullcontext():
                            return F.scaled_dot_product_attention(
                                qt, kt, vt, is_causal=False, enable_gqa=heads_kv != DECODE_HEADS)

                    row = {"dtype": dtype, "batch": batch, "heads_kv": heads_kv, "seqlen_k": sk,
                           "bytes": moved}
                    for name, fn in (("lutflash", ours), (peer, sdpa)):
                        time_call(row, name, fn, timer, args.decode_reps, cuda)
                    rows.append(row)

                    def cell(us, moved=moved):
                        return f"{us:8.1f} ({100 * moved / (us * 1e-6) / bandwidth:3.0f}%)" if us \
                            else f"{'-':>16}"

                    def speedup(a, b):
                        return f"{a / b:7.2f}" if a and b else f"{'-':>7}"
                    line = (f"{dtype:>8} {batch:>3} {heads_kv:>4} {sk:>6} | "
                            f"{cell(row['lutflash_us']):>16} {cell(row[peer + '_us']):>16} "
                            f"{speedup(row[peer + '_us'], row['lutflash_us'])}")
                    if cuda:
                        line += (f" | {cell(row['lutflash_graph_us']):>15} "
                                 f"{cell(row['fa2_graph_us']):>16} "
                                 f"{speedup(row['fa2_graph_us'], row['lutflash_graph_us'])}")
                    print(line, flush=True)
    return rows


def kvcache(args, device: str, timer, bandwidth: float) -> list[dict]:
    """Decode with append over a KV cache: flash_attention_with_kvcache, contiguous and paged."""
    heads, heads_kv, d = DECODE_HEADS, 8, DECODE_HEAD_DIM
    cuda = device == "cuda"
    print(f"kvcache (Sq = 1 + append, Hq = {heads}, Hkv = {heads_kv}, D = {d}, causal): us, % of "
          f"the copy bandwidth {bandwidth / 1e12:.3f} TB/s in brackets")
    rows = []
    for dtype in args.dtypes:
        dt = getattr(torch, dtype)
        for batch in args.kvcache_batches:
            for sk in args.kvcache_seqlens:
                if cuda and 4 * batch * sk * heads_kv * d * dt.itemsize > 40 * 2**30:
                    continue
                q = torch.randn(batch, 1, heads, d, device=device, dtype=dt)
                k_new, v_new = (torch.randn(batch, 1, heads_kv, d, device=device, dtype=dt)
                                for _ in range(2))
                k, v = (torch.randn(batch, sk, heads_kv, d, device=device, dtype=dt)
                        for _ in range(2))
                seqlens = torch.full((batch,), sk - 1, dtype=torch.int32, device=device)
                qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
                moved = (2 * k.numel() + 2 * q.numel()) * k.element_size()
                row = {"dtype": dtype, "batch": batch, "seqlen_k": sk, "bytes": moved}
                fns = {
                    "contiguous": lambda: lutflash.flash_attention_with_kvcache(
                        q, k, v, k_new, v_new, cache_seqlens=seqlens, causal=True),
                    "plain": lambda: lutflash.flash_attention(q, k, v, causal=True),
                    "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True),
                }
                for page in (16, 256):
                    pages = batch * sk // page
                    kp, vp = (t.reshape(pages, page, heads_kv, d) for t in (k, v))
                    table = torch.randperm(pages, device=device).to(torch.int32)
                    kp, vp = kp[torch.argsort(table)], vp[torch.argsort(table)]
                    table = table.reshape(batch, sk // page)
                    fns[f"paged{page}"] = (
                        lambda kp=kp, vp=vp, table=table: lutflash.flash_attention_with_kvcache(
                            q, kp, vp, k_new, v_new, cache_seqlens=seqlens, block_table=table,
                            causal=True))
                for name, fn in fns.items():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if cuda and name == "sdpa" \
                            else nullcontext():
                        time_call(row, name, fn, timer, args.decode_reps, cuda)
                rows.append(row)
                cells = []
                for name in fns:
                    for suffix in ("_us", "_graph_us") if cuda else ("_us",):
                        us = row.get(name + suffix)
                        cells.append(f"{name}{suffix[:-3]} " + (
                            f"{us:.1f} ({100 * moved / (us * 1e-6) / bandwidth:.0f}%)" if us else "-"))
                print(f"{dtype:>8} B={batch:<3} Sk={sk:<6} " + " | ".join(cells), flush=True)
                del k, v, fns
    return rows


# --------------------------------------------------------------------------------------------
# plots

def plot_cuda(results: dict, prefix: str) -> None:
    """PNG plots of a CUDA result: PREFIX_fwd.png and PREFIX_fwdbwd.png (TFLOP/s against
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
        if not any(r["lutflash"][index] for r in rows):
            continue
        cols = min(4, len(panels))
        fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, squeeze=False,
                                 figsize=(4.5 * cols, 3.6 * ((len(panels) + cols - 1) // cols)))
        for ax, (dtype, d, causal) in zip(axes.flat, panels, strict=False):
            mine = [r for r in rows if (r["dtype"], r["head_dim"], r["causal"]) == (dtype, d, causal)]
            for impl in ("lutflash", "lutflash_det", "fa2", "cudnn"):
                points = [(r["seqlen"], r[impl][index]) for r in mine if r.get(impl, [None] * 2)[index]]
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
    decode_rows = results.get("decode", [])
    if decode_rows and results.get("copy_bandwidth"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        configs = dict.fromkeys((r.get("dtype", "float16"), r["batch"], r["heads_kv"])
                                for r in decode_rows)
        for color, config in enumerate(configs):
            mine = [r for r in decode_rows if (r.get("dtype", "float16"), r["batch"], r["heads_kv"])
                    == config]
            for impl, style in (("lutflash", "-"), ("fa2", ":"), ("sdpa_cpu", ":")):
                points = [(r["seqlen_k"], 100 * r["bytes"] / (r[impl + "_us"] * 1e-6)
                           / results["copy_bandwidth"]) for r in mine if r.get(impl + "_us")]
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", linestyle=style,
                            color=f"C{color}", label=f"{impl} {config[0]} B={config[1]} Hkv={config[2]}")
        ax.axhline(85, color="gray", linewidth=0.8)
        ax.set(title=f"decode, Sq=1 D=128 Hq=32, eager ({results.get('gpu', '')})", xscale="log",
               xlabel="Sk", ylabel="% of copy bandwidth")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(f"{prefix}_decode.png", dpi=90)
        plt.close(fig)
        print(f"wrote {prefix}_decode.png")


# --------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="a representative subset for before/after runs (see above); the size "
                        "flags still override it")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--deterministic", action="store_true",
                        help="fwdbwd: also time deterministic=True (CUDA grid)")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "float16", "bfloat16"],
                        help="default: float32 on the CPU, float16 and bfloat16 on the GPU")
    parser.add_argument("--seqlens", type=int, nargs="+", help="the fwd/fwdbwd grid's")
    parser.add_argument("--head-dims", type=int, nargs="+")
    parser.add_argument("--heads", type=int, default=8, help="CPU grid (CUDA: 2048 / D)")
    parser.add_argument("--tokens", type=int, default=16384, help="CUDA grid: batch x seqlen")
    parser.add_argument("--decode-seqlens", type=int, nargs="+")
    parser.add_argument("--decode-batches", type=int, nargs="+")
    parser.add_argument("--kvcache-seqlens", type=int, nargs="+")
    parser.add_argument("--kvcache-batches", type=int, nargs="+")
    parser.add_argument("--reps", type=int, default=5, help="fwd/fwdbwd repetitions")
    parser.add_argument("--decode-reps", type=int, default=20)
    parser.add_argument("--memory-seqlen", type=int,
                        help="CPU, with the fwd section; 0: no memory measurement")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write PNG plots PLOT_fwd.png, PLOT_fwdbwd.png, "
                        "PLOT_decode.png (CUDA results)")
    parser.add_argument("--replot", metavar="JSON",
                        help="only draw --plot from a JSON file an earlier --device cuda run wrote")
    args = parser.parse_args()
    if args.replot:
        with open(args.replot) as f:
            plot_cuda(json.load(f), args.plot or str(Path(args.replot).with_suffix("")))
        return
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU visible to torch")
    for key, value in DEFAULTS[(args.device, args.quick)].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.manual_seed(0)

    results = environment(args.device)
    results.update(quick=args.quick, reps=args.reps, sections=args.sections)
    if cuda:
        results["rows"] = gpu_grid(args, "cuda", CudaTimer())
    else:
        print(f"dtypes={args.dtypes} threads={torch.get_num_threads()} torch={torch.__version__}")
        results["dtype"] = f"torch.{args.dtypes[0]}"
        results["rows"] = cpu_grid(args)
    if "decode" in args.sections:
        if cuda:
            # a ~1 ms spin: a decode call is a few to a few hundred us of GPU time, and the host's
            # Python path must never show through (B = 1 timings jumped 2-4x with the 100 us spin)
            timer = CudaTimer(spin_cycles=2_000_000)
        else:
            def timer(fn, reps):
                return time_cpu(fn, reps)
        bandwidth = copy_bandwidth(timer, args.device, 2**30 if cuda else 2**28)
        results["copy_bandwidth"] = bandwidth
        results["decode"] = decode(args, args.device, timer, bandwidth)
    if "kvcache" in args.sections:
        if "decode" not in args.sections:
            timer = CudaTimer(spin_cycles=2_000_000) if cuda else (lambda fn, reps: time_cpu(fn, reps))
            bandwidth = copy_bandwidth(timer, args.device, 2**30 if cuda else 2**28)
            results["copy_bandwidth"] = bandwidth
        results["kvcache"] = kvcache(args, args.device, timer, bandwidth)
    if not cuda and args.memory_seqlen and "fwd" in args.sections:
        memory = peak_memory_subprocess(args.memory_seqlen, args.heads, 128)
        results["memory"] = memory
        print(f"forward at S={memory['seqlen']}, H={memory['heads']}, D=128: peak RSS grew "
              f"{memory['peak_rss_growth_bytes'] / 2**20:.1f} MiB (output "
              f"{memory['output_bytes'] / 2**20:.1f} MiB; an S^2 fp32 score buffer would be "
              f"{memory['s2_score_buffer_bytes'] / 2**20:.0f} MiB)")
    if args.json:
        write_json(args.json, results)
    if args.plot and cuda:
        plot_cuda(results, args.plot)


if __name__ == "__main__":
    main()
