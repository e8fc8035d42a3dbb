"""Prints the metrics that matter for a bandwidth-bound kernel from `ncu --csv --page raw`
output (one row per profiled kernel): time, DRAM, occupancy, issue, L1/shared, stall reasons.

    ncu --set full --csv --page raw -k regex:lut1 ... > prof.csv; python ncu_pick.py prof.csv"""
import csv
import re
import sys

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


def main():
    rows = list(csv.reader(open(sys.argv[1], errors="replace")))
    start = next(i for i, r in enumerate(rows) if r and r[0] == "ID")
    head, units, data = rows[start], rows[start + 1], rows[start + 2:]
    pick = [i for i, h in enumerate(head) if any(re.search(p, h) for p in PATTERNS)]
    name_col = head.index("Kernel Name") if "Kernel Name" in head else None
    for row in data:
        if name_col is not None:
            print("==", row[name_col][:90])
        stalls = []
        for i in pick:
            if i >= len(row):
                continue
            if head[i].startswith("smsp__pcsamp_warps_issue_stalled"):
                try:
                    v = float(row[i].replace(",", ""))
                except ValueError:
                    continue
                if v > 0 and not head[i].endswith("_not_issued"):
                    stalls.append((v, head[i].replace("smsp__pcsamp_warps_issue_stalled_", "")))
                continue
            print(f"  {head[i]} = {row[i]} {units[i]}")
        total = sum(v for v, _ in stalls) or 1
        print("  stall samples %:", ", ".join(f"{n} {100 * v / total:.1f}" for v, n in
                                              sorted(stalls, reverse=True)[:10]))


if __name__ == "__main__":
    main()
