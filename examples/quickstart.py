"""lutflash quickstart: quantize a small model's nn.Linear layers to 3-bit BCQ and compare.

    python examples/quickstart.py [--bits 3] [--group-size 128] [--method alternating]
"""

import argparse
import copy
import time

import torch
from torch import nn

import lutflash


def model_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--method", default="alternating", choices=["rtn", "greedy", "alternating"])
    args = parser.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(),
                          nn.Linear(2048, 1024), nn.GELU(), nn.Linear(1024, 256)).eval()
    x = torch.randn(16, 1024)
    with torch.no_grad():
        reference = model(x)

    quantized = copy.deepcopy(model)
    start = time.perf_counter()
    replaced = lutflash.quantize_model(quantized, bits=args.bits, group_size=args.group_size,
                                       method=args.method)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        out = quantized(x)

    error = (out - reference).norm() / reference.norm()
    print(f"replaced {len(replaced)} nn.Linear layers by LutLinear "
          f"({args.bits}-bit, group {args.group_size}, {args.method}) in {seconds:.1f} s")
    print(quantized)
    print(f"size:   {model_bytes(model) / 2**20:7.2f} MiB -> {model_bytes(quantized) / 2**20:7.2f} MiB "
          f"({model_bytes(model) / model_bytes(quantized):.1f}x smaller)")
    print(f"output: relative error {error:.4f} against the float32 model")
    for bits in (2, 3, 4):
        layer = lutflash.nn.LutLinear.from_linear(model[2], bits=bits, group_size=args.group_size,
                                                  method=args.method)
        weight_error = (layer.qweight.dequantize() - model[2].weight).norm() / model[2].weight.norm()
        print(f"  layer 2 at {bits} bits: relative weight error {weight_error:.4f}")


if __name__ == "__main__":
    main()
