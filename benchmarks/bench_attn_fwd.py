"""Forward grid of the CUDA attention against torch SDPA (flash = FA2, cuDNN) in one process.

B*S = 16k tokens, hidden 2048 (H = 2048 / D), D in {64, 128}, causal (bottom-right) or not,
S in {1k..16k}; TFLOP/s = 4*B*S^2*H*D (halved for causal) / time. `--exps` times the
experimental kernels of run_attn_fwd_tiles (LUTFLASH_FWD_EXP, bf16 only) next to the default,
after checking each against SDPA flash's output.

    PYTHONPATH=python python3 benchmarks/bench_attn_fwd.py [--exps 1 2 3] [--dtypes bfloat16]
"""

import argparse
import math
import os
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(__file__))
from timing import CudaTimer  # noqa: E402

import lutflash.attention as A  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exps", type=int, nargs="*", default=[])
    ap.add_argument("--dtypes", nargs="*", default=["bfloat16", "float16"])
    ap.add_argument("--seqlens", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--dims", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    timer = CudaTimer()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for dname in args.dtypes:
        dtype = getattr(torch, dname)
        for d in args.dims:
            h = 2048 // d
            for causal in (False, True):
                for s in args.seqlens:
                    b = 16384 // s
                    g = torch.Generator(device="cuda").manual_seed(s + d)
                    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=dtype, generator=g)
                               for _ in range(3))
                    flops = 4 * b * s * s * h * d * (0.5 if causal else 1.0)
                    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

                    def ours():
                        return A._forward(q, k, v, None, None, 0, 0, 1 / math.sqrt(d), 0.0, -1,
                                          0 if causal else -1, None, 0.0, None)[0]

                    def sdpa(backend):
                        def run():
                            with sdpa_kernel(backend):
                                return torch.nn.functional.scaled_dot_product_attention(
                                    qt, kt, vt, is_causal=causal)
                        return run

                    ref = sdpa(SDPBackend.FLASH_ATTENTION)().transpose(1, 2).float()
                    res = {}
                    exps = [0] + (args.exps if dname == "bfloat16" else [])
                    for e in exps:
                        os.environ["LUTFLASH_FWD_EXP"] = str(e)
                        err = (ours().float() - ref).abs().max().item()
                        tag = "def" if e == 0 else f"e{e}"
                        if not err < 2e-2:
                            print(f"  !! {tag} max err {err:.3g}")
                        res[tag] = flops / (timer(ours, args.reps) * 1e-6) / 1e12
                    os.environ["LUTFLASH_FWD_EXP"] = "0"
                    res["fa2"] = flops / (timer(sdpa(SDPBackend.FLASH_ATTENTION), args.reps)
                                          * 1e-6) / 1e12
                    try:
                        res["cudnn"] = flops / (timer(sdpa(SDPBackend.CUDNN_ATTENTION), args.reps)
                                                * 1e-6) / 1e12
                    except RuntimeError:
                        res["cudnn"] = float("nan")
                    best = max(v for kk, v in res.items() if kk not in ("fa2", "cudnn"))
                    print(f"{dname[:4]} d={d:3d} {'causal' if causal else 'full  '} S={s:5d} "
                          + " ".join(f"{kk} {vv:5.1f}" for kk, vv in res.items())
                          + f" | def/fa2 {res['def'] / res['fa2']:.3f} best/fa2 "
                          f"{best / res['fa2']:.3f}", flush=True)


if __name__ == "__main__":
    main()
