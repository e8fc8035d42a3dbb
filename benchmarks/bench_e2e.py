"""End-to-end decode benchmarks, in sections (--section; JSON schemas below).

    python benchmarks/bench_e2e.py --device cpu                  # hf: ~1B shape, 16 layers (~2 min)
    python benchmarks/bench_e2e.py --device cpu --quick          # hf: 2 layers, smoke run (~20 s)
    python benchmarks/bench_e2e.py --device cpu --json e2e.json
    python benchmarks/bench_e2e.py --device cuda --json results/e2e_cuda.json    # step + opt175b
    python benchmarks/bench_e2e.py --device cuda --quick --json /tmp/e2e_quick.json  # < 1 min
    python benchmarks/bench_e2e.py --device cpu --section step opt175b --quick   # CPU smoke run

Sections "step" and "opt175b" (the default with --device cuda) are e2e_step.py's, which
describes them: a hand-written, CUDA-graph capturable Llama-2-7B-shaped decode step at batch 1
and 8, context 1024, eager and graph replay, fp16 nn.Linear + SDPA, torch's int4 kernel + SDPA,
lutflash 3- and 4-bit + lutflash attention, against the floor (bytes a step reads / the copy
rate measured in the same run); and the OPT-175B-shaped 3-bit stack on one GPU. They print a
table, the checks and the issue's targets (met / missed), and write the JSON and a PNG plot
(--plot, default next to the JSON; skipped with a message where matplotlib is missing).

Section "hf" (the default on the CPU), described from here to the JSON schema:

The model is transformers' LlamaForCausalLM built from a LlamaConfig with random weights (speed
does not depend on the values): by default the body of Llama-3.2-1B (hidden 2048, 16 layers,
32 query heads and 8 key/value heads of 64, SwiGLU MLP 8192) with a 32000-token vocabulary and
an untied lm_head, 1.10 B parameters. Each configuration prefills a --prompt-token context
(default 128) at batch 1, runs --warmup decode steps, then times --steps decode steps one token
at a time (median wall time per step, with the process time beside it). A step is one forward of
one token with the cache plus the argmax of its logits (the tokens fed are drawn beforehand, so
that every configuration sees the same inputs). The load average before the run is printed and
saved: with 2 threads on 2 cores, anything else running (a compiler) stalls OpenMP barriers for
whole scheduler slices and multiplies small ops' times; measure on a quiet machine.

Configurations (labels as in the table and the JSON):
- "fp32": nn.Linear in float32, attention "sdpa";
- "bf16": the same model cast to bfloat16;
- "lutflash {b}b": every nn.Linear of the decoder layers (q, k, v, o, gate, up, down) replaced
  by a LutLinear with a random packed weight (lutflash.testing.random_lut_linear, uniform mode,
  group 128, bfloat16 metadata; nothing is quantized from the dense weights, which would take
  minutes and change nothing in the timing), bfloat16 activations; lm_head stays a dense
  bfloat16 nn.Linear ("dense head") or is a LutLinear too ("lut head", --lm-head); attention
  "sdpa" or "lutflash" (attn_implementation="lutflash", --attn).

Bytes per token: the bytes of every parameter and buffer a step reads, i.e. all of the model's
tensors except the token embedding, of which one row is read; the KV cache read at the median
context length is reported beside it (it is small here). "GB/s" is the weight bytes per token
over the time per token: the bandwidth the step implies, whatever bounds it.

Target (end-to-end CPU decode issue): the 3-bit model decodes ≥ 4× faster than fp32.

--device cuda --section hf: the model building, the swap and the step timing are written
device-agnostic (the step synchronizes the device); one eager run is in RESULTS.md. The GPU
measurements proper (CUDA graphs, fp16 and int4 peers, the 7B and 175B shapes) are the step
and opt175b sections.

JSON of section hf (--json):
    {"meta": {environment(), "quick": bool, "model": {LlamaConfig fields}, "params": int,
              "prompt_tokens": int, "warmup": int, "steps": int, "group_size": 128,
              "mode": "uniform", "seconds": float, "load_average": float (1 min, before)},
     "rows": [{"label": str, "dtype": "float32"|"bfloat16", "bits": int|null,
               "lm_head": "dense"|"lut", "attn": "sdpa"|"lutflash", "fused": bool,
               "ms_per_token": float (median), "tokens_per_s": float,
               "cpu_ms_per_token": float (median process time), "prefill_ms": float,
               "weight_bytes_per_token": int, "kv_bytes_per_token": int,
               "weight_gb_per_s": float, "x_fp32": float|null, "x_bf16": float|null}],
     "checks": [{"label": str, "rel_err": float}]}   # first decode step's logits, lutflash
                                                     # attention against sdpa, same weights

JSON of sections step and opt175b (--json; each section's key only when it ran):
    {"meta": {environment(), "quick": bool, "sections": [str], "copy_bandwidth_bytes_per_s":
              float (bytes read + written), "batches": [int], "steps": int (eager, timed),
              "warmup": int, "graph_runs": int, "graph_replays": int, "opt_steps": int,
              "group_size": 128, "mode": "uniform", "seconds": float},
     "step": {"model": {"layers", "hidden", "mlp", "heads", "head_dim", "vocab": int},
              "context": int,
              "rows": [{"variant": "fp16"|"fp16 ops"|"int4"|"lutflash 3b"|"lutflash 4b", "batch": int,
                        "mode": "eager"|"graph", "ms_per_step": float|null,
                        "error": str|null (why there is no time), "weight_bytes": int,
                        "kv_bytes": int, "bytes_per_step": int, "floor_ms": float,
                        "x_fp16": float|null (fp16's ms / this ms, same batch and mode),
                        "x_floor": float|null (this ms / floor)}],
                       # rows with an error may lack the byte and ratio fields
              "checks": [{"variant": str, "batch": int,
                          "check": "float32 model"|"graph vs eager", "rel_err": float}],
              "targets": [{"target": str, "value": float|null, "bound": float,
                           "met": bool|null (null: not measured)}]},
     "opt175b": {"layers", "hidden", "mlp", "bits": int, "weight_bytes": int,
                 "floor_ms": float, "eager_ms": float|null, "graph_ms": float|null (one pass
                 over all layers), "error": str|null ("not run: needs X GB ..." included),
                 "checks": [{"projection": "qkv"|"o"|"fc1"|"fc2", "rel_err": float}],
                 "targets": [as above]}}
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import os
import time
from pathlib import Path

import torch
from timing import environment, time_cpu_detail, write_json
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import lutflash
from lutflash.nn import LutLinear, fuse_lut_linears
from lutflash.testing import random_lut_linear, relative_error

MODEL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=32000,
             max_position_embeddings=4096, tie_word_embeddings=False)
QUICK_LAYERS, QUICK_STEPS, QUICK_WARMUP = 2, 16, 3
GROUP_SIZE, MODE = 128, "uniform"
META_SCALE = 0.02  # random_bcq_weight's alphas are O(1): scale them to the dense init's 0.02
TARGET_BITS, TARGET_SPEEDUP = 3, 4.0

# transformers 5.x renamed forward's past_key_values to cache (the old name warns)
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters \
    else "past_key_values"


def build_model(layers: int, device: torch.device) -> LlamaForCausalLM:
    config = LlamaConfig(**{**MODEL, "num_hidden_layers": layers}, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()  # float32, transformers' init (std 0.02)
    model.requires_grad_(False)
    return model.to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode(model: LlamaForCausalLM, prompt: torch.Tensor, warmup: int, steps: int):
    """Prefill `prompt`, run `warmup` decode steps, time `steps` more. Returns (median wall s,
    median process s, prefill s, the first decode step's logits as float32)."""
    device = prompt.device
    cache = DynamicCache(config=model.config)
    # The tokens fed are drawn beforehand, not the argmax fed back: random weights give near-ties
    # that would make two runs of the same weights diverge; the argmax is still computed.
    tokens = torch.randint(0, model.config.vocab_size, (warmup + steps, 1, 1),
                           generator=torch.Generator().manual_seed(2)).to(device)
    synchronize(device)
    start = time.perf_counter()
    model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{CACHE_ARG: cache})
    synchronize(device)
    prefill = time.perf_counter() - start
    first_logits, argmax = [], []

    def step():
        logits = model(input_ids=tokens[len(argmax)], use_cache=True, **{CACHE_ARG: cache}).logits
        argmax.append(logits[:, -1].argmax(-1))
        synchronize(device)
        if not first_logits:
            first_logits.append(logits[0, -1].float().clone())

    for _ in range(warmup):
        step()
    wall, cpu, _ = time_cpu_detail(step, steps)
    if not torch.isfinite(first_logits[0]).all():
        raise RuntimeError("non-finite logits: the benchmark's model is broken")
    return wall, cpu, prefill, first_logits[0]


def model_bytes(model: LlamaForCausalLM) -> int:
    """Bytes a decode step reads of the model's own tensors: all parameters and buffers except
    the token embedding, of which one row."""
    embedding = model.get_input_embeddings().weight
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers()) if t is not embedding}
    row = embedding.shape[1] * embedding.element_size()
    return sum(t.numel() * t.element_size() for t in tensors.values()) + row


def kv_bytes(config: LlamaConfig, context: int, dtype: torch.dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * context
            * torch.finfo(dtype).bits // 8)


def lut_layers(model: LlamaForCausalLM, bits: int, lm_head: bool,
               generator: torch.Generator) -> dict[str, LutLinear]:
    """A LutLinear with a random packed weight (bf16 metadata) for every decoder nn.Linear and,
    with lm_head, for the output layer."""
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or (name == "lm_head" and not lm_head):
            continue
        layers[name] = random_lut_linear(module, bits, group_size=GROUP_SIZE,
                                         meta_dtype=torch.bfloat16, meta_scale=META_SCALE,
                                         generator=generator)
    return layers


def swap(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Puts `modules` in place by name; returns the modules they replaced."""
    old = {}
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        old[name] = getattr(owner, child)
        setattr(owner, child, module)
    return old


def run(model, prompt, args, label: str, **fields) -> tuple[dict, torch.Tensor]:
    dtype = model.lm_head.weight.dtype if isinstance(model.lm_head, nn.Linear) else torch.bfloat16
    wall, cpu, prefill, logits = decode(model, prompt, args.warmup, args.steps)
    weights = model_bytes(model)
    context = args.prompt_tokens + args.warmup + args.steps // 2
    row = {"label": label, "dtype": str(dtype).removeprefix("torch."), **fields,
           "ms_per_token": wall * 1e3, "tokens_per_s": 1 / wall, "cpu_ms_per_token": cpu * 1e3,
           "prefill_ms": prefill * 1e3, "weight_bytes_per_token": weights,
           "kv_bytes_per_token": kv_bytes(model.config, context, dtype),
           "weight_gb_per_s": weights / wall / 1e9}
    print(f"{label:<34} {row['ms_per_token']:8.1f} ms/token  {row['tokens_per_s']:6.2f} tok/s  "
          f"(process {row['cpu_ms_per_token']:7.1f} ms, prefill {row['prefill_ms']:7.0f} ms, "
          f"{weights / 1e6:7.0f} MB, {row['weight_gb_per_s']:5.1f} GB/s)", flush=True)
    return row, logits


def bench(args, device: torch.device) -> tuple[list[dict], list[dict], dict]:
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(args.layers, device)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.layers} layers, {params / 1e9:.3f} B parameters, built in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    prompt = torch.randint(0, MODEL["vocab_size"], (1, args.prompt_tokens), device=device)
    rows, checks = [], []
    base = dict(bits=None, lm_head="dense", attn="sdpa", fused=False)
    if "fp32" in args.baselines:
        rows.append(run(model, prompt, args, "fp32 (nn.Linear, sdpa)", **base)[0])
    model.to(torch.bfloat16)
    if "bf16" in args.baselines:
        rows.append(run(model, prompt, args, "bf16 (nn.Linear, sdpa)", **base)[0])
    generator = torch.Generator().manual_seed(1)
    for bits, head, fuse in itertools.product(args.bits, args.lm_head, args.fuse):
        dense = swap(model, lut_layers(model, bits, head == "lut", generator))
        fused = fuse_lut_linears(model) if fuse == "yes" else []
        reference = None
        for attn in args.attn:
            model.set_attn_implementation(attn)
            label = f"lutflash {bits}b ({head} head, {attn}{', fused' if fused else ''})"
            row, logits = run(model, prompt, args, label, bits=bits, lm_head=head, attn=attn,
                              fused=bool(fused))
            rows.append(row)
            if attn == "sdpa":
                reference = logits
            elif reference is not None:
                checks.append({"label": label, "rel_err": relative_error(logits, reference)})
        model.set_attn_implementation("sdpa")
        for name in fused:  # the parts go with the swap below; the fused modules here
            parent, _, child = name.rpartition(".")
            delattr(model.get_submodule(parent), child)
        swap(model, dense)
    return rows, checks, {"params": params}


def add_speedups(rows: list[dict]) -> None:
    peers = {r["label"].split()[0]: r["ms_per_token"] for r in rows if r["bits"] is None}
    for r in rows:
        for peer in ("fp32", "bf16"):
            r[f"x_{peer}"] = peers[peer] / r["ms_per_token"] if peer in peers else None


def print_table(rows: list[dict]) -> None:
    def ratio(value):
        return "—" if value is None else f"{value:.2f}"

    print("\n| config | ms/token | tokens/s | × fp32 | × bf16 | weights MB/token | GB/s "
          "| KV MB/token | prefill ms |")
    print("|---" * 9 + "|")
    for r in rows:
        print(f"| {r['label']} | {r['ms_per_token']:.1f} | {r['tokens_per_s']:.2f} | "
              f"{ratio(r['x_fp32'])} | {ratio(r['x_bf16'])} | "
              f"{r['weight_bytes_per_token'] / 1e6:.0f} | {r['weight_gb_per_s']:.1f} | "
              f"{r['kv_bytes_per_token'] / 1e6:.1f} | {r['prefill_ms']:.0f} |")


def report_target(rows: list[dict], layers: int) -> None:
    hits = [r for r in rows if r["bits"] == TARGET_BITS and r["x_fp32"] is not None]
    if not hits:
        return
    best = max(hits, key=lambda r: r["x_fp32"])
    met = "MET" if best["x_fp32"] >= TARGET_SPEEDUP else "NOT met"
    if layers != MODEL["num_hidden_layers"]:
        met += f" on {layers} layers (the target is for {MODEL['num_hidden_layers']})"
    print(f"\ntarget: {TARGET_BITS}-bit decode >= {TARGET_SPEEDUP:g}x fp32: {met} "
          f"(best {best['x_fp32']:.2f}x, {best['label']}; "
          + ", ".join(f"{r['label']} {r['x_fp32']:.2f}x" for r in hits if r is not best) + ")")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--section", nargs="+", choices=["hf", "step", "opt175b"],
                        help="hf: the Hugging Face decode above (default on the CPU); step and "
                        "opt175b: e2e_step.py's sections (default on CUDA: both)")
    parser.add_argument("--quick", action="store_true",
                        help=f"hf: {QUICK_LAYERS} layers, {QUICK_STEPS} steps, {QUICK_WARMUP} "
                        "warm-up steps (explicit --layers/--steps/--warmup still win); step: "
                        "4 layers (CUDA) or a 2-layer hidden-256 model (CPU), 10 steps, 3 graph "
                        "runs; opt175b: 8 layers (CUDA) or 2 of hidden 256 (CPU)")
    parser.add_argument("--layers", type=int, help=f"hf: default {MODEL['num_hidden_layers']}; "
                        "step: default 32")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="hf only")
    parser.add_argument("--steps", type=int,
                        help="timed decode steps (hf: default 48; step: eager steps, default 50)")
    parser.add_argument("--warmup", type=int,
                        help="untimed decode steps first (hf: default 6; step: default 5)")
    parser.add_argument("--bits", type=int, nargs="*",
                        help="lutflash bits (hf: default 2 3 4; step: default 3 4)")
    parser.add_argument("--attn", nargs="+", choices=["sdpa", "lutflash"],
                        default=["sdpa", "lutflash"], help="hf: attention of the lutflash rows")
    parser.add_argument("--lm-head", nargs="+", choices=["dense", "lut"], default=["dense", "lut"],
                        help="hf: lm_head of the lutflash rows: dense bf16 nn.Linear or LutLinear")
    parser.add_argument("--baselines", nargs="*", choices=["fp32", "bf16"],
                        default=["fp32", "bf16"], help="hf only")
    parser.add_argument("--threads", type=int,
                        help="torch threads (default: every core this process may run on)")
    parser.add_argument("--fuse", nargs="+", choices=["no", "yes"], default=["no"],
                        help="hf: lutflash runs with q/k/v and gate/up unfused, fused "
                             "(lutflash.nn.fuse_lut_linears) or both")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="step only")
    parser.add_argument("--context", type=int, default=1024,
                        help="step: KV cache positions attended by each step")
    parser.add_argument("--variants", nargs="+", choices=["fp16", "fp16-ops", "int4", "lutflash"],
                        default=["fp16", "fp16-ops", "int4", "lutflash"],
                        help="step only (fp16-ops: fp16 with lutflash's row-wise ops)")
    parser.add_argument("--graph-runs", type=int,
                        help="step: timed runs of --graph-replays replays (default 10)")
    parser.add_argument("--graph-replays", type=int, default=20, help="step only")
    parser.add_argument("--opt-layers", type=int,
                        help="opt175b: layers of the stack (default 96; 0 skips the section)")
    parser.add_argument("--opt-steps", type=int,
                        help="opt175b: timed eager passes and graph runs of 2 replays (default 10)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path,
                        help="step/opt175b: PNG path (default: the --json path with .png)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(1, "--device cuda: no GPU visible to torch\n")
    args.section = args.section or (["hf"] if args.device == "cpu" else ["step", "opt175b"])
    if "hf" in args.section and len(args.section) > 1:
        parser.error("--section hf writes its own JSON: run it apart from step and opt175b")
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    if args.section == ["hf"]:
        main_hf(args)
    else:
        main_step(args)


def main_step(args) -> None:
    import e2e_step

    quick = args.quick
    args.bits = args.bits if args.bits is not None else [3, 4]
    args.steps = args.steps or (10 if quick else 50)
    args.warmup = args.warmup if args.warmup is not None else (3 if quick else 5)
    args.graph_runs = args.graph_runs or (3 if quick else 10)
    args.opt_steps = args.opt_steps or (3 if quick else 10)
    device = torch.device(args.device)
    start = time.perf_counter()
    with torch.inference_mode():
        data = e2e_step.run(args, device)
    elapsed = time.perf_counter() - start
    print(f"total {elapsed:.0f} s, lutflash {lutflash.__version__}")
    meta = environment(args.device)
    meta.update(quick=quick, sections=args.section,
                copy_bandwidth_bytes_per_s=data.pop("copy_bandwidth_bytes_per_s"),
                batches=args.batch, steps=args.steps, warmup=args.warmup,
                graph_runs=args.graph_runs, graph_replays=args.graph_replays,
                opt_steps=args.opt_steps, group_size=e2e_step.GROUP_SIZE, mode=e2e_step.MODE,
                seconds=elapsed)
    data = {"meta": meta, **data}
    if args.json:
        write_json(args.json, data)
    plot = args.plot or (args.json.with_suffix(".png") if args.json else None)
    if plot:
        e2e_step.plot(data, plot, args.device)


def main_hf(args) -> None:
    args.bits = args.bits if args.bits is not None else [2, 3, 4]
    args.layers = args.layers or (QUICK_LAYERS if args.quick else MODEL["num_hidden_layers"])
    args.steps = args.steps or (QUICK_STEPS if args.quick else 48)
    args.warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else 6)
    device = torch.device(args.device)
    if device.type == "cuda":
        print("--device cuda: device-agnostic code, not yet run on a GPU; check the numbers")

    load = os.getloadavg()[0]
    print(f"load average before the run: {load:.2f} ({len(os.sched_getaffinity(0))} cores)")
    if load > 0.5 and device.type == "cpu":
        print("  warning: the machine is busy; CPU timings will be inflated", flush=True)
    start = time.perf_counter()
    with torch.inference_mode():
        rows, checks, info = bench(args, device)
    add_speedups(rows)
    print_table(rows)
    for c in checks:
        print(f"check: {c['label']}: first step's logits, relative error vs sdpa {c['rel_err']:.1e}")
    report_target(rows, args.layers)
    elapsed = time.perf_counter() - start
    print(f"total {elapsed:.0f} s, lutflash {lutflash.__version__}, {torch.get_num_threads()} "
          f"threads")
    if args.json:
        meta = environment(args.device)
        meta.update(quick=args.quick, model={**MODEL, "num_hidden_layers": args.layers},
                    prompt_tokens=args.prompt_tokens, warmup=args.warmup, steps=args.steps,
                    group_size=GROUP_SIZE, mode=MODE, seconds=elapsed, load_average=load,
                    **info)
        write_json(args.json, {"meta": meta, "rows": rows, "checks": checks})


if __name__ == "__main__":
    main()
