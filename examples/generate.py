"""Fast Hugging Face generation with a lutflash-patched model: static KV cache + CUDA graphs.

Compares, on the same model shape and prompt, tokens/s of

- fp16 (nn.Linear, attention "sdpa") and lutflash (3-bit LutLinear, attention "lutflash"),
  and with --attn-alone the fp16 model with attention "lutflash" alone,
- each with (a) `model.generate` (eager, dynamic cache) and (b) `lutflash.generation`'s static
  decode loop (StaticGenerator: the prompt prefilled eagerly, then one CUDA-graph replay per
  token; eager on the CPU).

    python examples/generate.py                      # GPU: 8 layers of Llama-2-7B's shape
    python examples/generate.py --layers 32 --new-tokens 256 --json gen.json
    python examples/generate.py --model /path/to/llama --bits 3 4
    python examples/generate.py --device cpu --layers 2 --hidden 512 --new-tokens 16  # smoke

Without --model, the model is transformers' LlamaForCausalLM from a LlamaConfig of Llama-2-7B's
dimensions (hidden 4096, MLP 11008, 32 heads of 128, vocabulary 32000) with --layers layers and
random weights. The lutflash rows swap every decoder nn.Linear for a LutLinear with a random
packed weight (lutflash.testing.random_lut_linear, uniform mode, group 128; quantizing the dense
weights would take minutes and changes nothing in the timing), with q/k/v and gate/up fused
(lutflash.nn.fuse_lut_linears); lm_head stays fp16. With --model, the checkpoint's own Linears are
swapped the same way (random values: this measures speed, not output quality; use
lutflash.patch_model(model, linear=dict(bits=...)) for real quantization).

Each configuration generates --new-tokens tokens after a --prompt-tokens prompt at batch
--batch, greedy, without an end-of-sequence token (all rows generate the same number of tokens),
after one untimed warm-up call (which for the static loop includes the graph capture, timed on
its own as "first call"). tokens/s counts the new tokens of the whole batch over the wall time of
the call, prefill included.

JSON (--json): {"meta": {environment(), model fields, batch, prompt_tokens, new_tokens, ...},
"rows": [{"label", "weights": "fp16"|"lutflash 3b", "attn", "loop": "generate"|"static",
"tokens_per_s", "seconds", "first_call_s"}], "speedups": {...}}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

import lutflash
from lutflash.generation import StaticGenerator
from lutflash.nn import fuse_lut_linears
from lutflash.testing import random_lut_linear

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
try:
    from timing import environment, write_json
except ImportError:  # the example copied without the benchmarks folder
    environment = None

    def write_json(path, data):
        import json

        Path(path).write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {path}")

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
GROUP_SIZE = 128


def build_model(args, device, dtype):
    import transformers

    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.model, dtype=dtype, attn_implementation="sdpa")
    else:
        dims = dict(LLAMA2_7B)
        if args.hidden:
            dims.update(hidden_size=args.hidden, intermediate_size=args.hidden * 11008 // 4096 // 128 * 128)
        config = transformers.LlamaConfig(**dims, num_hidden_layers=args.layers,
                                          attn_implementation="sdpa")
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config)  # on the device, no host copy
    model.generation_config.eos_token_id = None  # every call generates --new-tokens tokens
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def lut_swap(model, bits: int, generator) -> dict[str, nn.Module]:
    """Replaces every decoder nn.Linear (not lm_head) by a LutLinear with a random packed weight
    (values on the scale of a trained layer's); returns the dense modules it replaced."""
    old = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or module is model.get_output_embeddings():
            continue
        layer = random_lut_linear(module, bits, group_size=GROUP_SIZE, generator=generator)
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        old[name] = module
        setattr(owner, child, layer)
    return old


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def measure(model, ids, args, device, label, weights, attn) -> list[dict]:
    new, batch = args.new_tokens, ids.shape[0]
    rows = []
    mask = torch.ones_like(ids)

    def hf():
        return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                              pad_token_id=0)

    if "generate" in args.loops:
        first, _ = timed(hf, device)
        seconds, out = timed(hf, device)
        rows.append(dict(label=f"{label}, model.generate", weights=weights, attn=attn,
                         loop="generate", seconds=seconds, first_call_s=first,
                         tokens_per_s=batch * new / seconds))
        print(f"{rows[-1]['label']:<44} {rows[-1]['tokens_per_s']:9.1f} tok/s "
              f"(first call {first:.1f} s)", flush=True)
    if "static" in args.loops:
        runner = StaticGenerator(model, batch, ids.shape[1] + new,
                                 cuda_graph=None if device.type == "cuda" else False)
        first, _ = timed(lambda: runner.generate(ids, new), device)
        seconds, out = timed(lambda: runner.generate(ids, new), device)
        graph = "CUDA graph" if runner.cuda_graph else "eager"
        rows.append(dict(label=f"{label}, static ({graph})", weights=weights, attn=attn,
                         loop="static", seconds=seconds, first_call_s=first,
                         tokens_per_s=batch * new / seconds))
        print(f"{rows[-1]['label']:<44} {rows[-1]['tokens_per_s']:9.1f} tok/s "
              f"(first call, with capture, {first:.1f} s)", flush=True)
        if "generate" in args.loops and args.check:
            rows[-1].update(compare_tokens(model, hf(), out, ids.shape[1]))
    return rows


@torch.inference_mode()
def compare_tokens(model, ref, out, prompt: int) -> dict:
    """How far the static loop's tokens follow model.generate's; at the first token where they
    differ, both candidates' logits in one full forward over the common prefix: two 16-bit
    paths (different attention kernels) may rightly part at a near-tie, not at a clear winner."""
    same = (ref == out).float().mean().item()
    result = {"tokens_equal": same}
    print(f"  tokens equal to model.generate's: {same * 100:.1f}%")
    differ = (ref != out).nonzero()
    if len(differ):
        row, col = (int(v) for v in differ[differ[:, 1].argmin()])
        logits = model(input_ids=ref[row:row + 1, :col]).logits[0, -1].float()
        a, b = logits[ref[row, col]].item(), logits[out[row, col]].item()
        gap, spread = abs(a - b), logits.std().item()
        near_tie = gap <= 0.01 * spread
        result.update(first_divergence=col - prompt, logit_gap=gap, logit_std=spread,
                      near_tie=near_tie)
        print(f"  first divergence at new token {col - prompt}: logits {a:.4f} (generate) vs "
              f"{b:.4f} (static) in a full forward, gap {gap:.1e} against a spread of "
              f"{spread:.2f}: " + ("a near-tie" if near_tie else "NOT a near-tie: a bug?"))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local transformers checkpoint (default: random Llama)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, help="hidden size (default 4096, Llama-2-7B)")
    parser.add_argument("--bits", type=int, nargs="+", default=[3])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--loops", nargs="+", choices=["generate", "static"],
                        default=["generate", "static"])
    parser.add_argument("--attn", default="lutflash", choices=["lutflash", "sdpa"],
                        help="attention of the lutflash rows (the fp16 rows use sdpa)")
    parser.add_argument("--attn-alone", action="store_true",
                        help="also run the unquantized model with lutflash attention only")
    parser.add_argument("--device", choices=["cuda", "cpu"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip comparing the static loop's tokens with model.generate's")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)

    start = time.perf_counter()
    model = build_model(args, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {type(model).__name__}, {model.config.num_hidden_layers} layers, "
          f"{params / 1e9:.2f} B parameters, {dtype}, {device}; batch {args.batch}, prompt "
          f"{args.prompt_tokens}, {args.new_tokens} new tokens", flush=True)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.prompt_tokens),
                        generator=torch.Generator().manual_seed(1)).to(device)

    base = "fp16" if dtype == torch.float16 else "fp32"
    rows = measure(model, ids, args, device, f"{base} (nn.Linear, sdpa)", base, "sdpa")
    if args.attn_alone:  # the same model with lutflash attention only
        lutflash.patch_model(model, attention=True, norms=False, rotary=False)
        rows += measure(model, ids, args, device, f"{base} (nn.Linear, lutflash)",
                        f"{base} lutflash attn", "lutflash")
        model.set_attn_implementation("sdpa")
    generator = torch.Generator().manual_seed(2)
    for bits in args.bits:
        dense = lut_swap(model, bits, generator)
        fused = fuse_lut_linears(model)
        mlps = {name: m for name, m in model.named_modules()
                if type(m).__name__ in lutflash.nn.GATED_MLP_CLASSES}
        # lutflash attention, RMSNorm, rotary, and SiLU·mul of the fused gate/up output
        lutflash.patch_model(model, attention=args.attn == "lutflash")
        rows += measure(model, ids, args, device, f"lutflash {bits}b ({args.attn})",
                        f"lutflash {bits}b", args.attn)
        model.set_attn_implementation("sdpa")
        for name, module in mlps.items():  # the modules that hold the fused gate/up
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module)
        for name in fused:
            parent, _, child = name.rpartition(".")
            delattr(model.get_submodule(parent), child)
        for name, module in dense.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module)

    by = {(r["weights"], r["loop"]): r["tokens_per_s"] for r in rows}
    speedups = {}
    print()
    for bits in args.bits:
        w = f"lutflash {bits}b"
        for loop in ("generate", "static"):
            if (w, loop) in by and (base, loop) in by:
                speedups[f"{w} / {base}, {loop}"] = by[(w, loop)] / by[(base, loop)]
        if (w, "static") in by and (base, "generate") in by:
            speedups[f"{w} static / {base} generate"] = by[(w, "static")] / by[(base, "generate")]
    alone = f"{base} lutflash attn"
    for loop in ("generate", "static"):
        if (alone, loop) in by and (base, loop) in by:
            speedups[f"{alone} / {base} sdpa, {loop}"] = by[(alone, loop)] / by[(base, loop)]
    if (base, "static") in by and (base, "generate") in by:
        speedups[f"{base} static / {base} generate"] = by[(base, "static")] / by[(base, "generate")]
    for name, value in speedups.items():
        print(f"speedup {name:<40} {value:6.2f}x")
    elapsed = time.perf_counter() - start
    print(f"total {elapsed:.0f} s")
    if args.json:
        meta = environment(args.device) if environment else {"device": args.device}
        config = model.config
        fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size")
        meta.update(model={"path": args.model, **{f: getattr(config, f, None) for f in fields}},
                    params=params, dtype=str(dtype), batch=args.batch,
                    prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                    group_size=GROUP_SIZE, attn=args.attn, seconds=elapsed)
        write_json(args.json, {"meta": meta, "rows": rows, "speedups": speedups})


if __name__ == "__main__":
    main()
