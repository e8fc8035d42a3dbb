"""Perplexity of a small trained language model quantized by each lutflash method.

A character-level Llama (hidden 128, 2 layers) is trained on tests/data/corpus.txt (the first
90%), then quantized (every decoder Linear; lm_head and embeddings stay float32) with rtn,
alternating and gptq at 4 and 3 bits; perplexity per character on the held-out last 10%. The
same code (lutflash.accuracy) runs in tests/test_accuracy.py with assertions. Prints a markdown
table; --json writes
    {"benchmark": "accuracy", "date", "commit", "machine": {"cpu", "cores", "torch"},
     "setup": {...}, "train_seconds", "rows": [{"variant", "bits", "method", "mode", "ppl",
     "gap", "seconds"}]}

    python benchmarks/bench_accuracy.py [--steps 400] [--json results/accuracy.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from timing import git_commit, write_json

from lutflash import accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = accuracy.Setup()
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps")
    parser.add_argument("--group-size", type=int, default=defaults.group_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--corpus", default=str(accuracy.CORPUS))
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    args = parser.parse_args()

    setup = accuracy.Setup(steps=args.steps, group_size=args.group_size, seed=args.seed)
    result = accuracy.run(setup, args.corpus)
    print(f"trained in {result['train_seconds']:.0f} s on {result['train_chars']} characters; "
          f"perplexity per character on {result['heldout_chars']} held-out characters, "
          f"group size {setup.group_size}")
    print(accuracy.markdown_table(result["rows"]))
    rows = {row["variant"]: row for row in result["rows"]}
    ratio = rows["3-bit gptq"]["gap"] / rows["3-bit rtn"]["gap"]
    print(f"3-bit gptq gap / 3-bit rtn gap: {ratio:.2f}")
    if args.json:
        write_json(args.json, {
            "benchmark": "accuracy", "date": time.strftime("%Y-%m-%d"), "commit": git_commit(),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "torch": torch.__version__}, **result})


if __name__ == "__main__":
    main()
