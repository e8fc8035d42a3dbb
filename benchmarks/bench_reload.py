"""How long a saved lutflash model takes to load back, against reading its files twice.

A Llama-shaped model from config (random weights) is saved in float16, loaded with
`quantization_config=LutflashConfig(bits, group_size, method="rtn")` (quantized while loading),
saved again (`save_pretrained`: packed planes and metadata, safetensors) and then loaded back
with `AutoModelForCausalLM.from_pretrained(folder)`, which rebuilds the LutLinear layers
without re-quantizing; every byte of the loaded parameters and buffers is then read once, so
that lazily mapped pages count. The yardstick (issue 11: "a saved 3-bit model reloads in less time than
reading its files twice") is the time to read every file of the saved folder into memory
twice, measured in the same run with the files in the page cache, as the load sees them.
Median of --repeats runs each.

    python benchmarks/bench_reload.py --hidden 2048 --layers 8 --json reload.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from timing import environment, write_json

import lutflash  # noqa: F401  (registers quant_method "lutflash")
from lutflash.integrations.hf_quantizer import LutflashConfig


def read_files(folder: Path) -> int:
    total = 0
    for path in sorted(folder.iterdir()):
        if path.is_file():
            total += len(path.read_bytes())
    return total


def load_and_touch(folder: Path) -> None:
    """from_pretrained, then every byte of every parameter and buffer read once (a mapped
    file's pages are only read when touched)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    for t in (*model.parameters(), *model.buffers()):
        t.detach().clone()  # a copy reads every page, as read_bytes does


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    config = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                                      num_key_value_heads=args.hidden // 128, vocab_size=32000)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir, saved_dir = Path(tmp) / "fp16", Path(tmp) / "lutflash"
        transformers.LlamaForCausalLM(config).to(torch.float16).save_pretrained(dense_dir)
        quantized = transformers.AutoModelForCausalLM.from_pretrained(
            dense_dir, dtype=torch.float16,
            quantization_config=LutflashConfig(bits=args.bits, group_size=args.group_size,
                                               method="rtn"))
        quantized.save_pretrained(saved_dir)
        del quantized
        size = read_files(saved_dir)  # also warms the page cache
        dense_size = sum(p.stat().st_size for p in dense_dir.iterdir() if p.is_file())
        read_twice = median_time(lambda: (read_files(saved_dir), read_files(saved_dir)), args.repeats)
        load = median_time(lambda: load_and_touch(saved_dir), args.repeats)
    print(f"Llama hidden {args.hidden}, {args.layers} layers: fp16 files {dense_size / 1e6:.1f} MB, "
          f"lutflash {args.bits}-bit files {size / 1e6:.1f} MB; {torch.get_num_threads()} threads")
    print(f"read the saved files twice: {read_twice:.3f} s")
    print(f"from_pretrained + touch:    {load:.3f} s ({load / read_twice:.2f}x reading twice; "
          f"target < 1: {'met' if load < read_twice else 'missed'})")
    if args.json:
        write_json(args.json, {"meta": {**environment("cpu"), "benchmark": "reload"},
                               "config": vars(args) | {"json": None},
                               "results": {"fp16_bytes": dense_size, "saved_bytes": size,
                                           "read_twice_s": read_twice, "load_s": load}})


if __name__ == "__main__":
    main()
