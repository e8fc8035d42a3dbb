"""Timing and bookkeeping shared by every benchmark script (none keeps its own copy):

- `CudaTimer`: CUDA-event medians with L2 flushed before each repetition;
- `time_cpu` (median wall time), `time_cpu_detail` (wall and process time, and the result),
  `cpu_time_per_call` (best-of-rounds process time of a tight loop): CPU timing;
- `copy_bandwidth`: a device-to-device copy's bytes read plus written per second;
- `cuda_graph`: one call captured in a CUDA graph (replay it to time the GPU work alone);
- `git_commit`, `environment`: what ran where; `write_json`: the JSON files.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch


def time_cpu(fn, reps: int, warmup: int = 1) -> float:
    """Median wall time in microseconds, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def time_cpu_detail(fn, reps: int) -> tuple[float, float, object]:
    """Median wall seconds, median process (CPU, all threads) seconds and the last result, no
    warm-up. CPU time shows whether the wall time was inflated by other work on the machine."""
    walls, cpus, result = [], [], None
    for _ in range(reps):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def cpu_time_per_call(fn, calls: int, rounds: int = 5) -> float:
    """Process time per call in microseconds of `calls` back-to-back calls, the best of
    `rounds`, after calls // 10 warm-up calls: the host cost of a call, not the GPU's."""
    for _ in range(calls // 10):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - start) / calls)
    return best * 1e6


class CudaTimer:
    """Median CUDA-event time in microseconds of the GPU work, with L2 flushed before each
    repetition. The flush and a spin kernel (spin_cycles; 200k cycles are about 100 us) keep
    the GPU busy while the host enqueues the timed call, so the host's per-call overhead
    (measured on its own by bench_overhead.py) does not show in the measurement. Calls of a
    few microseconds with a long Python path (attention decode) need a ~1 ms spin."""

    def __init__(self, device="cuda", spin_cycles: int = 200_000):
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
        self.spin_cycles = spin_cycles

    def __call__(self, fn, reps: int, warmup: int = 3) -> float:
        for _ in range(warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends, strict=True):
            self.flush.zero_()
            torch.cuda._sleep(self.spin_cycles)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)) * 1e3


def copy_bandwidth(timer, device="cuda", nbytes: int = 2**30) -> float:
    """Bytes read + written per second by a copy of nbytes within `device`; timer(fn, reps)
    returns microseconds (a CudaTimer, or time_cpu on the CPU)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    micros = timer(lambda: dst.copy_(src), 20)
    return 2 * src.numel() / (micros * 1e-6)


def cuda_graph(fn, calls: int = 1) -> torch.cuda.CUDAGraph:
    """`calls` calls of fn captured in one CUDA graph (after a warm-up call on a side stream,
    as torch requires); time `graph.replay` to see the GPU work with no host work at all."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def git_commit() -> str:
    """HEAD's short hash, or $LUTFLASH_COMMIT where the tree was copied without .git (set by
    the caller, as scripts/gpu_check.sh documents; it only labels the JSON)."""
    if os.environ.get("LUTFLASH_COMMIT"):
        return os.environ["LUTFLASH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str) -> dict:
    """device, torch, date, commit, and gpu (CUDA) or cpu and threads (CPU)."""
    env = {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "commit": git_commit()}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    else:
        env.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


def write_json(path, data: dict) -> None:
    """Write `data` as indented JSON to path (str or Path) and say so."""
    Path(path).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path}")
