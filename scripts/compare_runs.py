"""Compares two training runs written by examples/train_ddp.py --json: the loss of every step,
and the last step's gradient of every trainable parameter. Exits 1 if they differ by more than
the tolerance, 2 if the files do not describe the same training.

    python scripts/compare_runs.py single.json ddp.json [--loss-rtol R] [--grad-rtol R]

Losses: |a − b| ≤ loss_rtol·|b|. Gradients, per parameter: ‖a − b‖ ≤ grad_rtol·‖b‖ + grad_atol
(L2 norms over the parameter's elements; the absolute floor covers gradients that are zero, such
as a LoRA A before its B has moved). A data-parallel run differs from a single-process one only by
rounding (summation order, kernels chosen by batch size), so the default tolerances follow the
runs' dtype: float32 1e-5 (loss) and 1e-4 (gradients), where the CPU runs differ by about 1e-7 and
1e-5; float16/bfloat16 2e-3 and 5e-2, where bfloat16 CPU runs differ by about 2e-5 and 1.6e-2
(bfloat16 activations round gradients by about 1% whatever the batch split).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

# Arguments that must agree for the comparison to mean anything (the world size and the backend
# are what is being compared; the device may differ too).
SAME_TRAINING = ("steps", "batch", "seq_len", "layers", "bits", "group_size", "method", "rank",
                 "alpha", "lr", "seed", "dtype", "adapter_dtype")
# (loss_rtol, grad_rtol) by the runs' dtype
TOLERANCES = {"float32": (1e-5, 1e-4), "float16": (2e-3, 5e-2), "bfloat16": (2e-3, 5e-2)}


def l2(values) -> float:
    return math.sqrt(sum(v * v for v in values))


def compare(a: dict, b: dict, loss_rtol: float, grad_rtol: float, grad_atol: float
            ) -> tuple[list[str], list[str]]:
    """(lines of the report, failures)."""
    failures = []
    for key in SAME_TRAINING:
        if a["args"].get(key) != b["args"].get(key):
            raise ValueError(f"not the same training: {key} = {a['args'].get(key)!r} vs "
                             f"{b['args'].get(key)!r}")
    if sorted(a["grads"]) != sorted(b["grads"]):
        only = sorted(set(a["grads"]) ^ set(b["grads"]))
        raise ValueError(f"not the same trainable parameters: {only[:5]} ...")

    lines = [f"A: world size {a['world_size']}, {a['backend']}, {a['device']} ({a['device_name']}), "
             f"{a['dtype']}",
             f"B: world size {b['world_size']}, {b['backend']}, {b['device']} ({b['device_name']}), "
             f"{b['dtype']}",
             "step  loss A          loss B          rel diff"]
    for step, (loss_a, loss_b) in enumerate(zip(a["losses"], b["losses"], strict=True)):
        rel = abs(loss_a - loss_b) / max(abs(loss_b), 1e-30)
        bad = not rel <= loss_rtol  # NaN fails
        lines.append(f"{step:4d}  {loss_a:.9f}  {loss_b:.9f}  {rel:.2e}{'  FAIL' if bad else ''}")
        if bad:
            failures.append(f"loss at step {step}: {loss_a} vs {loss_b} (rel {rel:.2e} > {loss_rtol})")

    worst = (0.0, None)
    for name in sorted(a["grads"]):
        grad_a, grad_b = a["grads"][name], b["grads"][name]
        if len(grad_a) != len(grad_b):
            raise ValueError(f"{name}: {len(grad_a)} gradient values vs {len(grad_b)}")
        diff = l2(x - y for x, y in zip(grad_a, grad_b, strict=True))
        bound = grad_rtol * l2(grad_b) + grad_atol
        if not diff <= bound:
            failures.append(f"gradient of {name}: |A - B| = {diff:.3e} > {bound:.3e} "
                            f"(|B| = {l2(grad_b):.3e})")
        ratio = diff / bound if bound > 0 else math.inf
        if not ratio <= worst[0]:
            worst = (ratio, name)
    lines.append(f"gradients: {len(a['grads'])} tensors; closest to its bound: {worst[1]} "
                 f"at {worst[0]:.2e} of it")
    return lines, failures


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--loss-rtol", type=float, default=None, help="default: by dtype")
    parser.add_argument("--grad-rtol", type=float, default=None, help="default: by dtype")
    parser.add_argument("--grad-atol", type=float, default=1e-8)
    args = parser.parse_args(argv)
    try:
        a, b = (load(path) for path in (args.a, args.b))
        loss_rtol, grad_rtol = TOLERANCES[a["args"]["dtype"]]
        args.loss_rtol = loss_rtol if args.loss_rtol is None else args.loss_rtol
        args.grad_rtol = grad_rtol if args.grad_rtol is None else args.grad_rtol
        lines, failures = compare(a, b, args.loss_rtol, args.grad_rtol, args.grad_atol)
    except (OSError, KeyError, ValueError) as error:
        print(f"compare_runs: {error}")
        return 2
    print("\n".join(lines))
    if failures:
        print(f"MISMATCH ({len(failures)}):")
        print("\n".join(f"  {failure}" for failure in failures))
        return 1
    print(f"match: losses within rtol {args.loss_rtol}, gradients within rtol {args.grad_rtol}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
