"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from pathlib import Path

import torch


def time_cpu(fn, reps: int) -> float:
    """Median wall time in microseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


class CudaTimer:
    """Median CUDA-event time in microseconds of the GPU work, with L2 flushed before each
    repetition. The flush and a ~100 us spin kernel keep the GPU busy while the host enqueues
    the timed call, so the host's per-call overhead (measured on its own by
    bench_overhead.py) does not show in the measurement."""

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
            torch.cuda._sleep(self.spin_cycles)  # 200k cycles: about 100 us
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)) * 1e3


def copy_bandwidth(timer: CudaTimer, device="cuda") -> float:
    """Bytes read + written per second by a device-to-device copy of 1 GiB."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    micros = timer(lambda: dst.copy_(src), reps=20)
    return 2 * src.numel() / (micros * 1e-6)


def git_commit() -> str:
    """HEAD's short hash, or $LUTFLASH_COMMIT where the tree was copied without .git."""
    if os.environ.get("LUTFLASH_COMMIT"):
        return os.environ["LUTFLASH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
