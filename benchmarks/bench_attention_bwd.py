"""CUDA attention backward: forward+backward and backward-only TFLOP/s of lutflash's fast
backward (default), its deterministic backward and torch SDPA's FlashAttention-2 backend, on the
issue's grid (batch * seqlen = 16k tokens, hidden 2048, H = 2048 / D), CUDA-event medians with
L2 flushed (benchmarks/timing.py). FLOPs: forward 4·B·S²·H·D (halved when causal), backward 2.5x
the forward. Also prints the largest difference between the two lutflash backwards.

    PYTHONPATH=python python benchmarks/bench_attention_bwd.py [--seqlens 1024 4096 16384]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from timing import CudaTimer  # noqa: E402

import lutflash  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    timer = CudaTimer()
    print(torch.cuda.get_device_name(), torch.__version__, args.dtype)
    print(f"{'D':>4} {'S':>6} {'causal':>6} | {'fwd+bwd TFLOP/s: fast':>22} {'determ':>7} "
          f"{'fa2':>6} {'fast/fa2':>8} | {'bwd only: fast':>14} {'determ':>7} {'fa2':>6} "
          f"| max|fast-det| dq dk dv")
    for d in args.head_dims:
        heads = args.hidden // d
        for s in args.seqlens:
            batch = max(1, args.tokens // s)
            for causal in (False, True):
                g = torch.Generator(device="cuda").manual_seed(s + d)
                q, k, v = (torch.randn(batch, s, heads, d, device="cuda", dtype=dtype,
                                       generator=g).requires_grad_() for _ in range(3))
                grad = torch.randn(batch, s, heads, d, device="cuda", dtype=dtype, generator=g)
                fwd = 4.0 * batch * s * s * heads * d * (0.5 if causal else 1.0)

                def ours(deterministic):
                    return lambda: lutflash.flash_attention(q, k, v, causal=causal,
                                                            deterministic=deterministic)

                qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
                gt = grad.transpose(1, 2)

                def fa2():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return torch.nn.functional.scaled_dot_product_attention(
                            qt, kt, vt, is_causal=causal)

                row = {}
                grads = {}
                for name, fn, inputs, go in (("fast", ours(False), (q, k, v), grad),
                                             ("det", ours(True), (q, k, v), grad),
                                             ("fa2", fa2, (qt, kt, vt), gt)):
                    def both(fn=fn, inputs=inputs, go=go):
                        torch.autograd.grad(fn(), inputs, go)

                    total = timer(both, args.reps)
                    out = fn()

                    def back(out=out, inputs=inputs, go=go):
                        torch.autograd.grad(out, inputs, go, retain_graph=True)

                    bwd = timer(back, args.reps)
                    row[name] = (3.5 * fwd / total / 1e6, 2.5 * fwd / bwd / 1e6)
                    if name != "fa2":
                        grads[name] = torch.autograd.grad(out, inputs, go)
                    del out
                diffs = [(a.float() - b.float()).abs().max().item()
                         for a, b in zip(grads["fast"], grads["det"], strict=True)]
                print(f"{d:>4} {s:>6} {str(causal):>6} | {row['fast'][0]:>22.1f} "
                      f"{row['det'][0]:>7.1f} {row['fa2'][0]:>6.1f} "
                      f"{row['fast'][0] / row['fa2'][0]:>8.2f} | {row['fast'][1]:>14.1f} "
                      f"{row['det'][1]:>7.1f} {row['fa2'][1]:>6.1f} | "
                      + " ".join(f"{x:.2e}" for x in diffs), flush=True)
                del q, k, v, qt, kt, vt, grads


if __name__ == "__main__":
    main()
