"""Time lutflash.quantize over every Linear of a Llama-shaped model, decoder layer by layer.

The weights are random (N(0, 0.02²), float16 unless --dtype says otherwise), made on the device
one Linear at a time, so the model is never held whole. Per decoder layer: q, k, v, o
(hidden × hidden), gate, up (intermediate × hidden), down (hidden × intermediate). Every
Linear is quantized with each --methods entry (a tqdm bar over the layers) and the clock is
read after torch.cuda.synchronize(); making the random weights and activations is not timed.

gptq needs the Hessian of each Linear's inputs: for every distinct input of a layer (q/k/v
share one, gate/up share one; o and down have their own) --calib-seqs × --seq-len rows of
random N(0, 1) activations (float16) are made on the device in blocks of --calib-chunk rows
and accumulated with lutflash.gptq.HessianAccumulator (timed: "hessian s"), then each Linear
is quantized with method="gptq" ("quantize s"). No model runs forward: a real calibration
(lutflash.quantize_model(..., calibration=...)) adds the decoder layers' forward passes over
the calibration tokens.

--layers N times N of the model's decoder layers and extrapolates the model's total × L/N
(labelled "extrapolated" in the table and the JSON). On a CUDA device the peer is what
quantize did before it ran on the GPU: the C quantizers on the host CPU, the weight copied
there and the result copied back (--peer-layers of them, extrapolated likewise; not for gptq,
which always ran on the device).

    python benchmarks/bench_quantize_model.py --model llama2-7b --device cuda \\
        --methods rtn alternating gptq --layers 4 --json quantize_7b.json
    python benchmarks/bench_quantize_model.py --model tiny --device cpu --calib-seqs 4 \\
        --seq-len 128     # a smoke test in seconds

JSON: {"meta": environment() + {"benchmark": "bcq_quantize_model"}, "config": {...},
"rows": [{"impl": "lutflash" | "c_on_host", "method", "layers_timed", "seconds_timed",
"hessian_seconds", "quantize_seconds", "model_seconds", "extrapolated", "rel_mse",
"peak_memory_bytes"}]}
"""

from __future__ import annotations

import argparse
import time

import torch
from timing import environment, write_json
from tqdm.auto import tqdm

import lutflash
from lutflash.bcq import ALL_METHODS, METHODS
from lutflash.gptq import HessianAccumulator

MODELS = {
    "llama2-7b": dict(hidden=4096, intermediate=11008, layers=32),
    "tiny": dict(hidden=256, intermediate=768, layers=2),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def layer_linears(model: dict) -> list[tuple[str, int, int, str]]:
    """(name, out_features, in_features, input) of one decoder layer, in call order; Linears
    with the same input read the same activations."""
    h, i = model["hidden"], model["intermediate"]
    return [("q_proj", h, h, "attention input"), ("k_proj", h, h, "attention input"),
            ("v_proj", h, h, "attention input"), ("o_proj", h, h, "attention output"),
            ("gate_proj", i, h, "mlp input"), ("up_proj", i, h, "mlp input"),
            ("down_proj", h, i, "mlp hidden")]


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def hessian(k: int, rows: int, chunk: int, dtype, device, generator) -> tuple[torch.Tensor, float]:
    """H of `rows` random activations and the seconds spent accumulating it (not making them)."""
    acc = HessianAccumulator(k)
    seconds = 0.0
    for start in range(0, rows, chunk):
        x = torch.randn(min(chunk, rows - start), k, device=device, dtype=dtype, generator=generator)
        t0 = clock(device)
        acc.add_batch(x)
        seconds += clock(device) - t0
    return acc.hessian, seconds


def run(method: str, args, model: dict, device: torch.device, impl: str, layers: int) -> dict:
    """Quantizes every Linear of `layers` decoder layers; one result row."""
    dtype = DTYPES[args.dtype]
    rows = args.calib_seqs * args.seq_len
    quantize_s = hessian_s = 0.0
    err = norm = 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    label = method if impl == "lutflash" else f"{method} (C on host)"
    for layer in tqdm(range(layers), desc=label, unit="layer"):
        generator = torch.Generator(device=device).manual_seed(args.seed + layer)
        hessians = {}
        for _name, n, k, source in layer_linears(model):
            h = None
            if method == "gptq":
                if source not in hessians:
                    hessians[source], seconds = hessian(k, rows, args.calib_chunk, dtype, device,
                                                        generator)
                    hessian_s += seconds
                h = hessians[source]
            weight = torch.randn(n, k, device=device, dtype=dtype, generator=generator) * 0.02
            t0 = clock(device)
            if impl == "lutflash":
                q = lutflash.quantize(weight, args.bits, args.group_size, method,
                                      rounds=args.rounds, hessian=h)
            else:  # what quantize did for a CUDA weight before: C on the host, copied back
                q = lutflash.quantize(weight.cpu(), args.bits, args.group_size, method,
                                      rounds=args.rounds).to(device)
            quantize_s += clock(device) - t0
            w = weight.float()
            err += (q.dequantize(torch.float32) - w).square().sum().item()
            norm += w.square().sum().item()
            del q, weight, w
        del hessians
    timed = quantize_s + hessian_s
    total = model["layers"]
    return {"impl": impl, "method": method, "layers_timed": layers,
            "seconds_timed": timed, "hessian_seconds": hessian_s, "quantize_seconds": quantize_s,
            "model_seconds": timed * total / layers, "extrapolated": layers != total,
            "rel_mse": err / norm,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="llama2-7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", default=["rtn", "alternating", "gptq"],
                        choices=ALL_METHODS)
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers to time (default all); the model's total is "
                             "extrapolated x layers/N")
    parser.add_argument("--peer-layers", type=int, default=1,
                        help="layers for the C-on-host peer on a CUDA device (0: none)")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16",
                        help="the weights' and activations' dtype")
    parser.add_argument("--calib-seqs", type=int, default=128, help="gptq calibration sequences")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration sequence")
    parser.add_argument("--calib-chunk", type=int, default=8192,
                        help="activation rows made and accumulated at a time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    args = parser.parse_args()

    device = torch.device(args.device)
    model = MODELS[args.model]
    layers = min(args.layers or model["layers"], model["layers"])
    if layers < 1:
        parser.error("--layers: expected a positive number")
    results = []
    for method in args.methods:
        results.append(run(method, args, model, device, "lutflash", layers))
        if device.type == "cuda" and args.peer_layers > 0 and method in METHODS:
            results.append(run(method, args, model, device, "c_on_host",
                               min(args.peer_layers, model["layers"])))

    meta = environment(device.type)
    meta["benchmark"] = "bcq_quantize_model"
    linears = len(layer_linears(model))
    print(f"{args.model}: {model['layers']} decoder layers x {linears} Linears "
          f"(hidden {model['hidden']}, intermediate {model['intermediate']}), random "
          f"{args.dtype} weights; {args.bits} bits, group {args.group_size}, rounds {args.rounds}; "
          f"{meta.get('gpu') or meta.get('cpu')}, commit {meta['commit']}")
    if "gptq" in args.methods:
        print(f"gptq: Hessians of {args.calib_seqs} x {args.seq_len} = "
              f"{args.calib_seqs * args.seq_len} random activation rows per distinct layer "
              f"input (4 per layer), no model forward pass (a real calibration adds one)")
    print(f"{'impl':<10} {'method':<12} {'layers':>6} {'hessian s':>10} {'quantize s':>11} "
          f"{'timed s':>9} {'model s':>9} {'':<13} {'rel. MSE':>9} {'peak GiB':>9}")
    for row in results:
        peak = row["peak_memory_bytes"]
        print(f"{row['impl']:<10} {row['method']:<12} {row['layers_timed']:>6} "
              f"{row['hessian_seconds']:>10.2f} {row['quantize_seconds']:>11.2f} "
              f"{row['seconds_timed']:>9.2f} {row['model_seconds']:>9.1f} "
              f"{'extrapolated' if row['extrapolated'] else 'measured':<13} "
              f"{row['rel_mse']:>9.5f} {peak / 2**30 if peak is not None else float('nan'):>9.2f}")
    if args.json:
        config = {"model": args.model, **model, "linears_per_layer": linears, "bits": args.bits,
                  "group_size": args.group_size, "rounds": args.rounds, "dtype": args.dtype,
                  "calib_seqs": args.calib_seqs, "seq_len": args.seq_len,
                  "calib_chunk": args.calib_chunk, "seed": args.seed,
                  "activations": "random N(0, 1), no model forward pass"}
        write_json(args.json, {"meta": meta, "config": config, "rows": results})


if __name__ == "__main__":
    main()
