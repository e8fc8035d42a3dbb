"""Nsight Compute helpers: run one lutflash call of a given shape for the profiler, and pick the
metrics that matter for these kernels out of ncu's CSV.

    # one 3-bit uniform lutgemm per shape (k x n), m = 1, after a warm-up outside the profiled range
    ncu --profile-from-start off --set full --csv --page raw \\
        python benchmarks/ncu_profile.py lutgemm --shapes 12288x12288 4096x11008 --m 1 > prof.csv
    # one attention forward (add --backward for forward + backward, --seqlen-q 1 for decode)
    ncu --profile-from-start off --set full --csv --page raw \\
        python benchmarks/ncu_profile.py attention --seqlen 4096 --batch 4 > prof.csv
    python benchmarks/ncu_profile.py pick prof.csv   # time, DRAM, occupancy, issue, stalls

The `lutgemm` and `attention` commands open the profiler (cudaProfilerStart) only around the
calls, so `--profile-from-start off` skips the warm-up, the weight set-up and torch's own
kernels. nsys works the same way (`nsys profile --capture-range=cudaProfilerApi`). With
--device cpu they run the same calls on the CPU, without a profiler.
"""

from __future__ import annotations

import argparse
import csv
import re
from contextlib import contextmanager

import torch

PATTERNS = [r"^gpu__time_duration\.sum$", r"^dram__throughput\.avg\.pct_of_peak_sustained_elapsed$",
            r"^dram__bytes_read\.sum$", r"^dram__bytes_read\.sum\.per_second$",
            r"^sm__warps_active\.avg\.pct_of_peak_sustained_active$",
            r"^sm__maximum_warps_per_active_cycle_pct$", r"^launch__(grid_size|registers_per_thread|"
            r"occupancy_limit_\w+|shared_mem_per_block_dynamic|waves_per_multiprocessor)$",
            r"^sm__throughput\.avg\.pct_of_peak_sustained_elapsed$",
            r"^smsp__issue_active\.avg\.pct_of_peak_sustained_active$",
            r"^smsp__inst_executed\.sum$", r"^l1tex__throughput\.avg\.pct_of_peak_sustained_active$",
            r"^l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld\.sum$",
            r"^l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld\.sum$",
            r"^l1tex__t_sector_hit_rate\.pct$", r"^lts__t_sector_hit_rate\.pct$",
            r"^l1tex__lsu_writeback_active_mem_lg\.avg\.pct_of_peak_sustained_active$",
            r"^smsp__average_warp_latency_per_inst_issued\.ratio$",
            r"^smsp__pcsamp_warps_issue_stalled_\w+$", r"^sm__cycles_elapsed\.avg$",
            r"^smsp__warps_eligible\.avg\.per_cycle_active$",
            r"^lts__t_sectors_srcunit_tex_op_read\.sum$", r"^sm__ctas_launched\.sum$"]
STALL = "smsp__pcsamp_warps_issue_stalled_"


def pick(path: str) -> None:
    """Print the PATTERNS metrics of every kernel in `ncu --csv --page raw` output, and the
    ten largest stall reasons as shares of the stall samples."""
    with open(path, errors="replace") as f:
        rows = list(csv.reader(f))
    start = next(i for i, r in enumerate(rows) if r and r[0] == "ID")
    head, units, data = rows[start], rows[start + 1], rows[start + 2:]
    chosen = [i for i, h in enumerate(head) if any(re.search(p, h) for p in PATTERNS)]
    name_col = head.index("Kernel Name") if "Kernel Name" in head else None
    for row in data:
        if name_col is not None:
            print("==", row[name_col][:90])
        stalls = []
        for i in chosen:
            if i >= len(row):
                continue
            if head[i].startswith(STALL):
                try:
                    value = float(row[i].replace(",", ""))
                except ValueError:
                    continue
                if value > 0 and not head[i].endswith("_not_issued"):
                    stalls.append((value, head[i].removeprefix(STALL)))
                continue
            print(f"  {head[i]} = {row[i]} {units[i]}")
        total = sum(v for v, _ in stalls) or 1
        print("  stall samples %:", ", ".join(f"{n} {100 * v / total:.1f}" for v, n in
                                              sorted(stalls, reverse=True)[:10]))


@contextmanager
def profiled(device: str):
    """The profiler's capture range (CUDA), after the warm-up calls."""
    if device != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    try:
        yield
        torch.cuda.synchronize()
    finally:
        torch.cuda.profiler.stop()


def run_lutgemm(args) -> None:
    import lutflash
    from lutflash.testing import random_bcq_weight

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    calls = []
    for k, n in args.shapes:
        gen = torch.Generator().manual_seed(0)
        weight = random_bcq_weight(n, k, args.bits, args.group_size, args.mode, dtype,
                                   generator=gen).to(args.device)
        x = torch.randn(args.m, k, dtype=dtype, device=args.device)
        calls.append(lambda x=x, weight=weight: lutflash.lutgemm(x, weight))
    for call in calls:  # warm-up: workspaces, lazy module loading
        call()
    with profiled(args.device):
        for call in calls:
            for _ in range(args.calls):
                call()
    print(f"ran {args.calls} lutgemm call(s) on each of {len(calls)} shape(s)")


def run_attention(args) -> None:
    import lutflash

    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    shape_q = (args.batch, args.seqlen_q or args.seqlen, args.heads, args.head_dim)
    shape_kv = (args.batch, args.seqlen, args.heads_kv or args.heads, args.head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(args.device, dtype).requires_grad_(args.backward)
               for shape in (shape_q, shape_kv, shape_kv))

    def call():
        out = lutflash.flash_attention(q, k, v, causal=args.causal)
        if args.backward:
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    call()
    with profiled(args.device):
        for _ in range(args.calls):
            call()
    print(f"ran {args.calls} attention call(s): q {shape_q}, k and v {shape_kv}, {args.dtype}, "
          f"causal={args.causal}, backward={args.backward}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pick", help="summarize `ncu --csv --page raw` output")
    p.add_argument("csv")
    for name in ("lutgemm", "attention"):
        p = commands.add_parser(name, help=f"run {name} calls inside the profiler's range")
        p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
        p.add_argument("--calls", type=int, default=1, help="profiled calls (per shape)")
        if name == "lutgemm":
            p.add_argument("--shapes", type=lambda s: tuple(int(v) for v in s.split("x")),
                           nargs="+", default=[(12288, 12288)], help="k x n pairs")
            p.add_argument("--m", type=int, default=1)
            p.add_argument("--bits", type=int, default=3)
            p.add_argument("--group-size", type=int, default=128)
            p.add_argument("--mode", choices=["uniform", "general"], default="uniform")
        else:
            p.add_argument("--batch", type=int, default=1)
            p.add_argument("--seqlen", type=int, default=4096, help="keys (and queries)")
            p.add_argument("--seqlen-q", type=int, help="default --seqlen; 1 for decode")
            p.add_argument("--heads", type=int, default=16)
            p.add_argument("--heads-kv", type=int, help="default --heads")
            p.add_argument("--head-dim", type=int, default=128)
            p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="bfloat16")
            p.add_argument("--causal", action="store_true")
            p.add_argument("--backward", action="store_true")
    args = parser.parse_args()
    if args.command == "pick":
        pick(args.csv)
    elif args.command == "lutgemm":
        run_lutgemm(args)
    else:
        run_attention(args)


if __name__ == "__main__":
    main()
