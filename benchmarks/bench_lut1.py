"""The m <= 4 decode kernel (cuda/lutgemm_lut1.cu): its variants behind the LUTFLASH_LUT1_*
experiment knobs, against the copy floor, cuBLAS fp16 and torch int4, all in one run.

    python benchmarks/bench_lut1.py                          # all variants, a few shapes, m = 1
    python benchmarks/bench_lut1.py --variants old new --all-shapes --m 1 2 4

Variants (environment knobs, read by the launcher at every call):
  old      LUTFLASH_LUT1_MEMSET=1 LUTFLASH_LUT1_FLAGS=0: the kernel as it was before session 4
           (the workspace zeroed by a memset launch, round-robin row sets, L1-allocating loads)
  new      the defaults: a per-stream workspace the kernel leaves zero (no memset), flags 19
  others   LUTFLASH_LUT1_FLAGS bits (1 no-L1-allocate loads, 2 chunked row sets, 4 loads only:
           a diagnostic with wrong results, 8/16 L2 prefetch size 128/256 B),
           LUTFLASH_LUT1_DEEP=1, LUTFLASH_LUT1_BLOCKS=1
Also, for m = 1: the host cost of a call (lutflash.lutgemm and the raw lutflash._C.lutgemm with
preallocated buffers) and the GPU time per call of 20 calls captured in one CUDA graph.
Times: CUDA-event medians in microseconds, L2 flushed before every repetition (timing.py)."""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from bench_lutgemm import CUDA_SHAPES, int4_peer
from timing import CudaTimer, copy_bandwidth, time_cpu

import lutflash
from lutflash import _C
from lutflash.bcq import MODES, BCQWeight, meta_per_group

KNOBS = ("LUTFLASH_LUT1_MEMSET", "LUTFLASH_LUT1_FLAGS", "LUTFLASH_LUT1_DEEP", "LUTFLASH_LUT1_BLOCKS")
VARIANTS = {
    "old": {"LUTFLASH_LUT1_MEMSET": "1", "LUTFLASH_LUT1_FLAGS": "0"},  # as before session 4
    "nomemset": {"LUTFLASH_LUT1_FLAGS": "0"},
    "new": {},  # the defaults: no memset, flags 19 (noalloc + chunked + L2 256 B)
    "l2pf128": {"LUTFLASH_LUT1_FLAGS": "11"},
    "l2pf256": {"LUTFLASH_LUT1_FLAGS": "19"},  # the default since the end of session 4
    "flags3": {"LUTFLASH_LUT1_FLAGS": "3"},
    "noalloc": {"LUTFLASH_LUT1_FLAGS": "1"},
    "chunked": {"LUTFLASH_LUT1_FLAGS": "2"},
    "deep": {"LUTFLASH_LUT1_DEEP": "1"},
    "blocks1": {"LUTFLASH_LUT1_BLOCKS": "1"},
    "loadonly": {"LUTFLASH_LUT1_FLAGS": "7"},
    "loadonly+l2pf256": {"LUTFLASH_LUT1_FLAGS": "23"},
}
FEW_SHAPES = [(12288, 12288), (8192, 28672), (28672, 8192), (4096, 4096), (4096, 11008)]


def set_variant(name: str) -> None:
    for knob in KNOBS:
        os.environ.pop(knob, None)
    os.environ.update(VARIANTS[name])


def gpu_weight(n: int, k: int, bits: int, mode: str) -> BCQWeight:
    """Random codes and metadata made on the GPU (the timings do not depend on the values)."""
    planes = torch.randint(-2**31, 2**31, (k // 32, bits, n), dtype=torch.int64,
                           device="cuda").to(torch.int32)
    meta = torch.rand((k // 128, meta_per_group(bits, mode), n), device="cuda") * 0.1
    return BCQWeight(planes, meta.half(), (n, k), bits, 128, mode)


def graph_per_call(timer, fn, calls: int = 20) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return timer(graph.replay, 20) / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--all-shapes", action="store_true")
    parser.add_argument("--m", type=int, nargs="+", default=[1])
    parser.add_argument("--kinds", nargs="+", default=["3u", "4u", "3g", "4g"],
                        help="bits and mode initial: 3u = 3-bit uniform")
    parser.add_argument("--full-variants-for", default="3u",
                        help="the kind that runs every variant; the others run old and new")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--host", action="store_true", help="also host cost and CUDA graph")
    args = parser.parse_args()
    torch.manual_seed(0)
    timer = CudaTimer()
    bandwidth = copy_bandwidth(timer)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s on {torch.cuda.get_device_name()}")
    for k, n in CUDA_SHAPES if args.all_shapes else FEW_SHAPES:
        dense = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        int4 = int4_peer(dense)
        weights = {kind: gpu_weight(n, k, int(kind[0]), "uniform" if kind[1] == "u" else "general")
                   for kind in args.kinds}
        for m in args.m:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            cublas = timer(lambda: F.linear(x, dense), args.reps)
            xb = x.bfloat16()
            t_int4 = timer(lambda: int4(xb), args.reps) if int4 else float("nan")
            print(f"{k}->{n} m={m}: cuBLAS {cublas:.1f} int4 {t_int4:.1f}", flush=True)
            for kind, qw in weights.items():
                floor = qw.nbytes() / bandwidth * 1e6
                cells = [f"  {kind} floor {floor:.1f} target {1.25 * floor + 2:.1f} |"]
                names = args.variants if kind == args.full_variants_for else \
                    [v for v in ("old", "new") if v in args.variants]
                for name in names:
                    set_variant(name)
                    t = timer(lambda: lutflash.lutgemm(x, qw), args.reps)
                    cells.append(f"{name} {t:.1f} ({t / floor:.2f}xF)")
                set_variant("new")
                print(" ".join(cells), flush=True)
            if args.host and m == 1:
                qw = weights[args.kinds[0]]
                out = torch.empty(1, n, device="cuda", dtype=torch.float16)
                size = _C.lutgemm_workspace_bytes(True, 1, n, k, qw.bits, 128, MODES.index(qw.mode))
                ws = torch.empty(size, dtype=torch.uint8, device="cuda")
                clean = torch.zeros(size, dtype=torch.uint8, device="cuda")
                stream = torch.cuda.current_stream().cuda_stream
                raw = lambda: _C.lutgemm(x, qw.planes, qw.meta, None, out, ws, n, k, qw.bits,  # noqa: E731
                                         128, MODES.index(qw.mode), stream, clean)
                full = lambda: lutflash.lutgemm(x, qw)  # noqa: E731
                cells = [f"  host us/call: lutgemm {time_cpu(full, 200):.1f} raw _C {time_cpu(raw, 200):.1f}",
                         f"GPU: raw _C {timer(raw, args.reps):.1f} lutgemm {timer(full, args.reps):.1f}",
                         f"graph/call {graph_per_call(timer, full):.1f}"]
                set_variant("old")
                cells.append(f"old graph/call {graph_per_call(timer, full):.1f}")
                set_variant("new")
                print(" | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
