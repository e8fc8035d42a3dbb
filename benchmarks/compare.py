"""Before/after table of two runs of the same benchmark, e.g. at two commits:

    python benchmarks/bench_lutgemm.py --device cuda --quick --json before.json   # at commit A
    python benchmarks/bench_lutgemm.py --device cuda --quick --json after.json    # at commit B
    python benchmarks/compare.py before.json after.json [--tolerance 0.05] [--impl lutflash]

Reads JSON written by bench_lutgemm.py or bench_attention.py (either device; see the schema at
the top of each script) and prints, for every row and measurement present in both files, the
two values and the speedup of AFTER over BEFORE (> 1: AFTER is faster, whatever the unit:
µs, seconds or TFLOP/s), marking rows whose speedup is off 1 by more than --tolerance; then the
geometric mean of the speedups per section and measurement. The peers' (cuBLAS, int4, SDPA)
ratios are the noise between the two runs: a lutflash change smaller than theirs is not one.
--fail makes the exit status 1 when a lutflash measurement got slower than the tolerance.
Numbers only come from the files: this script measures nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict


def measurements(data: dict) -> dict[tuple[str, str, str], tuple[float, bool]]:
    """{(section, row, measurement): (value, higher_is_better)} of one benchmark file."""
    out = {}
    rows = data.get("rows", [])
    if "meta" in data:  # bench_lutgemm.py: times in µs
        for r in rows:
            for key, value in r.items():
                if key not in ("shape", "m") and not key.startswith("floor") and value:
                    out[("lutgemm", f"{r['shape']} m={r['m']}", key)] = (value, False)
        return out
    for r in rows:
        causal = "causal" if r["causal"] else "full"
        if "pass" in r:  # bench_attention.py --device cpu: seconds
            row = f"{r.get('dtype', '')} D={r['head_dim']} S={r['seqlen']} {causal}".strip()
            for key, value in r.items():
                if key.endswith("_s") and value:
                    out[(r["pass"], row, key[:-2])] = (value, False)
        else:  # bench_attention.py --device cuda: [fwd, fwd+bwd] TFLOP/s
            row = f"{r['dtype']} D={r['head_dim']} S={r['seqlen']} B={r['batch']} {causal}"
            for key, value in r.items():
                if isinstance(value, list):
                    for section, tflops in zip(("fwd", "fwd+bwd"), value, strict=True):
                        if tflops:
                            out[(section, row, key)] = (tflops, True)
    for r in data.get("decode", []):
        row = f"{r.get('dtype', 'float16')} B={r['batch']} Hkv={r['heads_kv']} Sk={r['seqlen_k']}"
        for key, value in r.items():
            if key.endswith("_us") and value:
                out[("decode", row, key[:-3])] = (value, False)
    for r in data.get("kvcache", []):
        row = f"{r.get('dtype', 'float16')} B={r['batch']} Sk={r['seqlen_k']}"
        for key, value in r.items():
            if key.endswith("_us") and value:
                out[("kvcache", row, key[:-3])] = (value, False)
    return out


def label(data: dict, path: str) -> str:
    meta = data.get("meta", data)
    return (f"{path}: commit {meta.get('commit', '?')}, {meta.get('gpu') or meta.get('cpu', '?')}, "
            f"{meta.get('date', '?')}, torch {meta.get('torch', '?')}"
            + (", --quick" if meta.get("quick") else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="flag speedups outside [1 / (1 + t), 1 + t] (default 0.05)")
    parser.add_argument("--impl", default="", help="regex: only measurements whose name matches")
    parser.add_argument("--flagged", action="store_true", help="print only the flagged rows")
    parser.add_argument("--fail", action="store_true",
                        help="exit 1 if a lutflash measurement got slower by more than the tolerance")
    args = parser.parse_args()
    with open(args.before) as f:
        before_data = json.load(f)
    with open(args.after) as f:
        after_data = json.load(f)
    before, after = measurements(before_data), measurements(after_data)
    if ("meta" in before_data) != ("meta" in after_data):
        sys.exit("the two files come from different benchmarks")
    print("before " + label(before_data, args.before))
    print("after  " + label(after_data, args.after))
    keys = [key for key in before if key in after and re.search(args.impl, key[2])]
    if not keys:
        sys.exit("no measurement in common")
    missing = len(set(before) ^ set(after))
    if missing:
        print(f"({missing} measurements are in only one of the files)")

    high = 1 + args.tolerance
    speedups = defaultdict(list)
    slower = 0
    print(f"\nspeedup = after over before (> 1: after is faster); '!' marks a change beyond "
          f"±{100 * args.tolerance:g}%\n")
    width = max(len(k[1]) for k in keys)
    name_width = max(len(k[2]) for k in keys)
    print(f"{'section':<8} {'row':<{width}} {'measurement':<{name_width}} {'before':>10} "
          f"{'after':>10} {'speedup':>8}")
    for key in keys:
        (a, higher_better), (b, _) = before[key], after[key]
        speedup = b / a if higher_better else a / b
        speedups[(key[0], key[2])].append(speedup)
        flagged = not 1 / high <= speedup <= high
        slower += flagged and speedup < 1 and key[2].startswith("lutflash")
        if flagged or not args.flagged:
            print(f"{key[0]:<8} {key[1]:<{width}} {key[2]:<{name_width}} {a:>10.4g} {b:>10.4g} "
                  f"{speedup:>8.3f}" + ("  !" + (" slower" if speedup < 1 else " faster")
                                         if flagged else ""))
    print("\ngeometric mean of the speedups (after over before):\n")
    print(f"{'section':<8} {'measurement':<{name_width}} {'rows':>5} {'geomean':>8} {'min':>7} "
          f"{'max':>7} {'flagged':>8}")
    for (section, name), values in speedups.items():
        geomean = math.exp(sum(math.log(v) for v in values) / len(values))
        flagged = sum(not 1 / high <= v <= high for v in values)
        print(f"{section:<8} {name:<{name_width}} {len(values):>5} {geomean:>8.3f} "
              f"{min(values):>7.3f} {max(values):>7.3f} {flagged:>8}")
    if args.fail and slower:
        print(f"\n{slower} lutflash measurements slower by more than {100 * args.tolerance:g}%")
        sys.exit(1)


if __name__ == "__main__":
    main()
