"""Markdown tables of a GPU benchmark run against the issues' targets.

    python benchmarks/report.py --lutgemm results/lutgemm_cuda_h100.json \
                                --attention results/attention_cuda_h100.json

Reads the JSON written by bench_lutgemm.py --device cuda and bench_attention.py --device cuda
and prints, for each target, the measured table and how many points meet it. Numbers only come
from the files: this script measures nothing. (compare.py sets two such files side by side.)
"""

from __future__ import annotations

import argparse
import json


def speedup_table(at: dict, shapes: list, ms: list, peer: str, bits: int) -> None:
    """Rows of shapes, columns of m: peer time / lutflash time, uniform / general mode."""
    print("| k→n | " + " | ".join(f"m={m}" for m in ms) + " |")
    print("|---" * (1 + len(ms)) + "|")
    for shape in shapes:
        cells = []
        for m in ms:
            r = at.get((shape, m))
            if r is None or peer not in r or f"lutflash {bits}b u" not in r:
                cells.append("-")
                continue
            cells.append(f"{r[peer] / r[f'lutflash {bits}b u']:.2f} / "
                         f"{r[peer] / r[f'lutflash {bits}b g']:.2f}")
        print(f"| {shape} | " + " | ".join(cells) + " |")


def lutgemm_report(data: dict) -> None:
    meta, rows = data["meta"], data["rows"]
    print(f"### LUT-GEMM — {meta.get('gpu')}, commit {meta.get('commit')}, {meta.get('date')}, "
          f"copy {meta['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s\n")
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    at = {(r["shape"], r["m"]): r for r in rows}

    print("m = 1, µs; target 1.25 × floor + 2 µs in brackets (floor = weight and metadata bytes / "
          "copy bandwidth)\n")
    labels = [f"{b}b {mode}" for b in (3, 4) for mode in ("u", "g")]
    print("| k→n | cuBLAS fp16 | torch int4 | " + " | ".join(labels) + " |")
    print("|---" * (3 + len(labels)) + "|")
    met = total = 0
    for shape in shapes:
        r = at.get((shape, 1))
        if r is None:
            continue
        cells = []
        for label in labels:
            if f"lutflash {label}" not in r:
                cells.append("-")
                continue
            time, target = r[f"lutflash {label}"], 1.25 * r[f"floor {label}"] + 2.0
            total += 1
            met += time <= target
            cells.append(f"{'**' if time <= target else ''}{time:.1f}{'**' if time <= target else ''}"
                         f" ({target:.1f})")
        print(f"| {shape} | {r['cuBLAS fp16']:.1f} | {r.get('torch int4', float('nan')):.1f} | "
              + " | ".join(cells) + " |")
    print(f"\nm = 1 target met at {met} of {total} points (bold).\n")

    ms = sorted({r["m"] for r in rows})
    print("Speedup over cuBLAS fp16 of 3-bit uniform / 3-bit general (target ≥ 3 for m ≤ 16; "
          "≥ 0.8 for m ≥ 256):\n")
    speedup_table(at, shapes, ms, "cuBLAS fp16", 3)
    small = [r for r in rows if r["m"] <= 16 and "lutflash 3b u" in r]
    large = [r for r in rows if r["m"] >= 256 and "lutflash 3b u" in r]
    print(f"\nm ≤ 16, 3-bit ≥ 3× cuBLAS (better mode): "
          f"{sum(r['cuBLAS fp16'] / min(r['lutflash 3b u'], r['lutflash 3b g']) >= 3 for r in small)}"
          f" of {len(small)} points; m ≥ 256 within 1.25× of cuBLAS: "
          f"{sum(min(r['lutflash 3b u'], r['lutflash 3b g']) <= 1.25 * r['cuBLAS fp16'] for r in large)}"
          f" of {len(large)} points (3-bit).\n")

    if any("torch int4" in r for r in rows):
        print("Speedup of 4-bit uniform / 4-bit general over torch's int4 kernel "
              "(`torch._weight_int4pack_mm`, g128; target > 1 at every m):\n")
        speedup_table(at, shapes, ms, "torch int4", 4)
        points = [r for r in rows if "torch int4" in r and "lutflash 4b u" in r]
        faster = sum(min(r["lutflash 4b u"], r["lutflash 4b g"]) < r["torch int4"] for r in points)
        print(f"\n4-bit faster than torch int4 (better mode): {faster} of {len(points)} points.\n")


def attention_report(data: dict) -> None:
    rows = data["rows"]
    print(f"### FlashAttention — {data.get('gpu')}, commit {data.get('commit', '?')}, "
          f"torch {data.get('torch')}\n")
    seqlens = sorted({r["seqlen"] for r in rows})
    for index, name, target in ((0, "forward", 1.0), (1, "forward+backward", 0.9)):
        if not any(r["lutflash"][index] for r in rows):
            continue  # the section did not run
        print(f"{name}: lutflash TFLOP/s (× FA2; target ≥ {target} at seqlen ≥ 1k), FA2, cuDNN\n")
        print("| dtype | D | causal | " + " | ".join(f"S={s}" for s in seqlens) + " |")
        print("|---" * (3 + len(seqlens)) + "|")
        met = total = 0
        for dtype, d, causal in dict.fromkeys((r["dtype"], r["head_dim"], r["causal"]) for r in rows):
            cells = []
            for s in seqlens:
                r = next((r for r in rows if (r["dtype"], r["head_dim"], r["causal"], r["seqlen"])
                          == (dtype, d, causal, s)), None)
                if r is None or not r["lutflash"][index] or not r["fa2"][index]:
                    cells.append("-")
                    continue
                ratio = r["lutflash"][index] / r["fa2"][index]
                ok = ratio >= target
                if s >= 1024:
                    total += 1
                    met += ok
                bold = "**" if ok and s >= 1024 else ""
                cudnn = r["cudnn"][index]
                cells.append(f"{r['lutflash'][index]:.0f} ({bold}{ratio:.2f}{bold}) / "
                             f"{r['fa2'][index]:.0f} / {cudnn:.0f}" if cudnn else
                             f"{r['lutflash'][index]:.0f} ({bold}{ratio:.2f}{bold}) / {r['fa2'][index]:.0f}")
            print(f"| {dtype} | {d} | {causal} | " + " | ".join(cells) + " |")
        print(f"\n{name} target met at {met} of {total} points with seqlen ≥ 1k.\n")

    decode, bandwidth = data.get("decode", []), data.get("copy_bandwidth")
    if decode and bandwidth:
        graphs = any(r.get("lutflash_graph_us") for r in decode)
        print(f"decode (Sq = 1, D = 128, Hq = 32), copy bandwidth {bandwidth / 1e12:.2f} TB/s"
              + ("; graph: one call replayed from a CUDA graph" if graphs else "") + ":\n")
        print("| dtype | B | Hkv | Sk | lutflash µs | % of copy | FA2 µs | speedup vs FA2 | "
              + ("graph µs: lutflash / FA2 | " if graphs else "") + "target |")
        print("|---" * (10 if graphs else 9) + "|")
        for r in decode:
            if not r.get("lutflash_us"):
                continue
            share = 100 * r["bytes"] / (r["lutflash_us"] * 1e-6) / bandwidth
            speedup = r["fa2_us"] / r["lutflash_us"] if r.get("fa2_us") else float("nan")
            if r["seqlen_k"] >= 16384:
                verdict = f"≥ 85% of copy: {'met' if share >= 85 else 'missed'}"
            elif r["batch"] == 1 and r["seqlen_k"] == 1024:
                verdict = f"≥ 1.3× FA2: {'met' if speedup >= 1.3 else 'missed'}"
            else:
                verdict = ""
            graph = (f"{r.get('lutflash_graph_us') or float('nan'):.1f} / "
                     f"{r.get('fa2_graph_us') or float('nan'):.1f} | " if graphs else "")
            print(f"| {r.get('dtype', 'float16')} | {r['batch']} | {r['heads_kv']} | {r['seqlen_k']} | "
                  f"{r['lutflash_us']:.1f} | {share:.0f}% | {r.get('fa2_us') or float('nan'):.1f} | "
                  f"{speedup:.2f} | {graph}{verdict} |")
        print()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lutgemm", help="JSON from bench_lutgemm.py --device cuda")
    parser.add_argument("--attention", help="JSON from bench_attention.py --device cuda")
    args = parser.parse_args()
    if args.lutgemm:
        with open(args.lutgemm) as f:
            lutgemm_report(json.load(f))
    if args.attention:
        with open(args.attention) as f:
            attention_report(json.load(f))


if __name__ == "__main__":
    main()
