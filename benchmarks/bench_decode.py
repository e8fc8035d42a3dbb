"""The CUDA decode path (split-KV) in its modes against SDPA flash and a copy's bandwidth, all
in one process so the before/after comparison is honest:

    python benchmarks/bench_decode.py [--reps 20] [--sweep] [--json out.json]

Shapes of bench_attention.py's decode section (Sq = 1, D = 128, Hq = 32, fp16, causal,
B in {1, 16}, Hkv in {32, 8}, Sk = 1k ... 64k). Modes (cuda/attention_cuda.cuh, the
LUTFLASH_DECODE switch read per call): old = the previous split rule and serial combine,
serial = the new split rule with that combine, nopdl = the new rule and combine launched
plainly, waves = full waves of 2 CTAs per SM instead of the new rule, new = the default (new
rule, new combine with programmatic dependent launch). Eager calls are timed by CudaTimer with a ~1 ms spin; "graph"
replays one captured call (no host work at all). --sweep also times forced split counts
(LUTFLASH_DECODE_SPLITS) at B = 1 and at B = 16 with 8 kv heads."""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from timing import CudaTimer, copy_bandwidth
from torch.nn.attention import SDPBackend, sdpa_kernel

import lutflash

MODES = {"old": "old", "serial": "serial", "nopdl": "nopdl", "waves": "waves", "new": ""}


def set_mode(mode: str, splits: int = 0):
    os.environ["LUTFLASH_DECODE"] = MODES[mode]
    os.environ["LUTFLASH_DECODE_SPLITS"] = str(splits)


def graph_of(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    timer = CudaTimer(spin_cycles=2_000_000)
    bandwidth = copy_bandwidth(timer)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s "
          f"(bytes = K + V + q + out; % of copy in brackets)")
    print(f"{'B':>3} {'Hkv':>4} {'Sk':>6} | {'old':>13} {'serial':>7} {'nopdl':>7} {'waves':>7} "
          f"{'new':>13} | {'graph old':>9} {'graph new':>9} | {'fa2':>7} {'new/fa2':>7} "
          f"{'old/fa2':>7}")
    rows = []
    for batch in (1, 16):
        for heads_kv in (32, 8):
            for sk in (1024, 4096, 16384, 65536):
                q = torch.randn(batch, 1, 32, 128, device="cuda", dtype=torch.float16)
                k, v = (torch.randn(batch, sk, heads_kv, 128, device="cuda", dtype=torch.float16)
                        for _ in range(2))
                moved = 2 * k.numel() * 2 + 2 * q.numel() * 2

                def ours():
                    return lutflash.flash_attention(q, k, v, causal=True)

                row = {"batch": batch, "heads_kv": heads_kv, "seqlen_k": sk, "bytes": moved}
                for mode in MODES:
                    set_mode(mode)
                    row[mode] = timer(ours, args.reps)
                for mode in ("old", "new"):
                    set_mode(mode)  # the mode is read while capturing
                    graph = graph_of(ours)
                    row["graph_" + mode] = timer(graph.replay, args.reps)
                    del graph
                set_mode("new")
                qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    row["fa2"] = timer(lambda: F.scaled_dot_product_attention(
                        qt, kt, vt, is_causal=False, enable_gqa=heads_kv != 32), args.reps)
                rows.append(row)
                cell = lambda us: f"{us:7.1f} ({100 * moved / (us * 1e-6) / bandwidth:3.0f}%)"  # noqa: E731
                print(f"{batch:>3} {heads_kv:>4} {sk:>6} | {cell(row['old'])} {row['serial']:7.1f} "
                      f"{row['nopdl']:7.1f} {row['waves']:7.1f} "
                      f"{cell(row['new'])} | {row['graph_old']:9.1f} {row['graph_new']:9.1f} | "
                      f"{row['fa2']:7.1f} {row['fa2'] / row['new']:7.2f} {row['fa2'] / row['old']:7.2f}",
                      flush=True)
                if args.sweep and (batch == 1 or heads_kv == 8):
                    sweep = {}
                    counts = (1, 2, 4, 6, 8, 12, 16, 24, 32, 64) if batch == 1 else (1, 2, 3)
                    for splits in counts:
                        set_mode("new", splits)
                        sweep[splits] = timer(ours, args.reps)
                    set_mode("new")
                    row["sweep"] = sweep
                    print("      forced splits (new mode, us): " + "  ".join(
                        f"{s}:{t:.1f}" for s, t in sweep.items()), flush=True)
                del q, k, v
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "copy_bandwidth": bandwidth,
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
