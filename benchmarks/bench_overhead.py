"""Per-call overhead of the Python-to-C path: a tiny lutgemm against a tiny F.linear.

    python benchmarks/bench_overhead.py [--device cpu|cuda] [--json PATH]

Both calls do almost no arithmetic (m = 1, 32 -> 8), so the time per call is the cost of
getting from Python into the kernel and back. Reported: best-of-5 mean CPU time per call over
many calls, for each layer of the stack (the raw extension call, the op, LutLinear), with and
without autograd recording (timing.cpu_time_per_call). --json writes
    {"device", "torch", "date", "commit", CPU: "cpu", "threads", CUDA: "gpu",
     "us_per_call": {case: µs}}
"""

import argparse

import torch
import torch.nn.functional as F
from timing import cpu_time_per_call, environment, write_json

import lutflash
from lutflash import _C
from lutflash.lutgemm import _lutgemm_op
from lutflash.nn import LutLinear
from lutflash.testing import random_bcq_weight


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    qweight = random_bcq_weight(8, 32, 3, 32, "general", device=device)
    layer = LutLinear.from_bcq(qweight).to(device)
    weight = torch.randn(8, 32, device=device, dtype=dtype)
    x = torch.randn(1, 32, device=device, dtype=dtype)
    x_grad = x.clone().requires_grad_()
    out = torch.empty(1, 8, device=device, dtype=dtype)
    stream = torch.cuda.current_stream().cuda_stream if device.type == "cuda" else 0
    workspace = torch.empty(_C.lutgemm_workspace_bytes(device.type == "cuda", 1, 8, 32, 3, 32, 0),
                            dtype=torch.uint8, device=device)
    if device.type == "cuda":
        layer = layer.half()
    cases = {
        "F.linear": lambda: F.linear(x, weight),
        "_C.lutgemm (raw, preallocated)": lambda: _C.lutgemm(x, qweight.planes, qweight.meta, None,
                                                             out, workspace, 8, 32, 3, 32, 0, stream),
        "lutflash.lutgemm": lambda: lutflash.lutgemm(x, qweight),
        "LutLinear": lambda: layer(x),
        "torch.ops.lutflash.lutgemm (dispatcher)": lambda: _lutgemm_op(
            x, qweight.planes, qweight.meta, None, 8, 32, 3, 32, 0),
        "F.linear, x requires grad": lambda: F.linear(x_grad, weight),
        "LutLinear, x requires grad": lambda: layer(x_grad),
    }
    results = {}
    for name, fn in cases.items():
        results[name] = cpu_time_per_call(fn, args.calls)
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"{name:42s} {results[name]:7.2f} us/call")
    if args.json:
        record = environment(args.device)
        record["us_per_call"] = results
        write_json(args.json, record)


if __name__ == "__main__":
    main()
