"""Where a decode step's GPU time goes: the kernels of e2e_step's Llama-2-7B-shaped step.

    python benchmarks/profile_step.py --variants fp16 "lutflash 3b" --batch 1 [--layers 32]

For each variant, a few eager steps run under torch.profiler (CUDA activity only); the kernels
are summed per step by name (device µs and launches per step) and by class (projection
kernels, attention, cuBLAS/lm_head, everything else: the small element-wise ops of norms,
rotary, cache writes, residuals). The graph-replay time of the same step is printed beside the
kernel sum: the difference is the idle time between kernels inside the graph. Device only.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from e2e_step import LLAMA2_7B, Shape, State, build, dense_templates, free_memory, time_graph
from timing import cuda_graph

CLASSES = (("lutgemm", ("decode_kernel", "lutgemm", "lut_", "mma_kernel", "pipelined")),
           ("attention", ("attn", "flash", "fmha", "sdpa", "attention")),
           ("gemm", ("gemm", "gemv", "cutlass", "sm90_xmma", "cublas", "int4", "tinygemm")))


def kernel_class(name: str) -> str:
    low = name.lower()
    for label, keys in CLASSES:
        if any(k in low for k in keys):
            return label
    return "other"


def profile(variant: str, shape: Shape, batch: int, context: int, steps: int) -> None:
    device = torch.device("cuda")
    dense = dense_templates(shape, device)
    model, _ = build(variant, shape, dense, device, torch.Generator().manual_seed(3))
    del dense
    free_memory()
    state = State(model, batch, context)
    for _ in range(3):
        model.step(state)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            model.step(state)
        torch.cuda.synchronize()
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time_total > 0:
            entry = per_name[event.name]
            entry[0] += event.device_time_total / steps
            entry[1] += 1 / steps
    total = sum(v[0] for v in per_name.values())
    launches = sum(v[1] for v in per_name.values())
    by_class: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, (us, count) in per_name.items():
        c = by_class[kernel_class(name)]
        c[0] += us
        c[1] += count
    graph = cuda_graph(lambda: model.step(state))
    graph_ms = time_graph(graph, 5, 10)
    print(f"\n## {variant}, batch {batch}, {shape.layers} layers, context {context}")
    print(f"graph replay {graph_ms * 1e3:.0f} µs/step; kernels sum {total:.0f} µs/step in "
          f"{launches:.0f} launches; gaps {graph_ms * 1e3 - total:.0f} µs")
    print("| class | µs/step | launches/step | share |\n|---|---|---|---|")
    for label, (us, count) in sorted(by_class.items(), key=lambda kv: -kv[1][0]):
        print(f"| {label} | {us:.0f} | {count:.0f} | {us / total:.0%} |")
    print("| kernel | µs/step | launches/step | µs/launch |\n|---|---|---|---|")
    for name, (us, count) in sorted(per_name.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"| {name[:90]} | {us:.1f} | {count:.0f} | {us / count:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["fp16", "lutflash 3b"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=LLAMA2_7B.layers)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py: needs a CUDA device")
    shape = Shape(**{**LLAMA2_7B.__dict__, "layers": args.layers})
    for variant in args.variants:
        profile(variant, shape, args.batch, args.context, args.steps)
        free_memory()  # the variant's model, state and graph went with profile's frame


if __name__ == "__main__":
    main()
