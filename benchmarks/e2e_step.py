"""The GPU sections of bench_e2e.py: a hand-written decoder step, eager and CUDA-graph replay.

Section "step": a Llama-2-7B-shaped decoder (32 layers, hidden 4096, SwiGLU MLP 11008, 32
heads of 128 without GQA, RMSNorm, rotary, vocabulary 32000, dense 16-bit lm_head) decoding
one token per sequence at batch 1 and 8 against a KV cache of `context` (1024) positions.
The step is plain torch ops (no Hugging Face), so that a whole step can be captured in one
CUDA graph. Per layer: RMSNorm (F.rms_norm) → q/k/v as ONE fused projection 4096→12288 (for
every variant) → rotary of q and k together at position `pos` (a device tensor) → k and v
written into the preallocated cache at `pos` with index_copy_ (no host sync) → attention of the
new query over the cache → o projection → residual → RMSNorm → gate/up as ONE fused projection
4096→22016 → SiLU·mul → down → residual; then the final RMSNorm, the lm_head and the argmax. The
cache has exactly `context` positions and `pos` = context − 1: each step rewrites the last
position and attends over all `context` of them, so no mask is needed and every step (and every
graph replay) is the same decode step at context `context`; the other positions hold random values.

Variants:
- "fp16": nn.Linear weights in float16 (F.linear, cuBLAS) + F.scaled_dot_product_attention,
  cache (B, H, S, D) as Hugging Face keeps it;
- "fp16 ops": "fp16" with lutflash's row-wise ops (below) instead of torch's: what the ops
  alone are worth, apart from the quantized projections;
- "int4": torch._weight_int4pack_mm (tinygemm, group 128) on bfloat16 activations, each weight
  RTN-quantized by bench_lutgemm.int4_peer; SDPA; lm_head bfloat16;
- "lutflash {b}b": LutLinear with random packed weights (lutflash.testing.random_bcq_weight,
  uniform mode, group 128, float16 metadata), float16 activations, lutflash.flash_attention
  on a (B, S, H, D) cache, and lutflash's row-wise ops (step_fused: each residual add fused
  into the RMSNorm after it, rotary of q and k in one kernel, SiLU·mul in one).
Each projection shape has one random template, built once; every layer holds its own copy (its
own memory, so that a step reads every layer's bytes from HBM as a real model would; the values
being equal changes no timing). The variants are built one at a time and freed before the next.

Timing: "eager" is the median wall time of single steps, each followed by a device
synchronize (the host's launch time included: what a Python decode loop gets); "graph" is the
step captured once in a torch.cuda.CUDAGraph (after a warm-up on a side stream,
timing.cuda_graph), timed with CUDA events around `graph_replays` back-to-back replays, the
median of `graph_runs` such runs. L2 is not flushed: a step reads gigabytes, far more than L2.
Floor: the bytes a step reads (every layer's weights and metadata, the norms, the lm_head, the
embedding rows and the KV cache read) over the copy rate (bytes read + written per second of a
1 GiB device copy, timing.copy_bandwidth) measured at the start of the same run.

Checks (in the JSON): for fp16 and lutflash at the first batch, the step's logits against the
same model in float32 (the templates upcast or dequantized, float32 activations and cache,
SDPA); for every variant, the graph replay's logits against the eager step's.

Section "opt175b": the OPT-175B-shaped 3-bit stack on one GPU: 96 layers of LutLinear
12288→36864 (q/k/v fused), 12288→12288 (o), 12288→49152 (fc1), 49152→12288 (fc2), m = 1,
float16 activations, packed random weights (~71 GB) built on the GPU one layer at a time (a
copy of one template per shape). One pass over the 384 layers is timed eager and under graph
replay against floor = packed bytes / copy rate. If the weights do not fit in free memory the
section reports "not run: needs X GB" (and so does an out-of-memory error while building).

A failure in one variant (or batch, or mode) is caught and written to its rows as an error
string; the rest of the run goes on.
"""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from bench_lutgemm import CHECK_TOLERANCE, int4_peer
from timing import CudaTimer, copy_bandwidth, cuda_graph, time_cpu

import lutflash
from lutflash.bcq import meta_per_group, padded_rows, words_per_row
from lutflash.nn import LutLinear
from lutflash.testing import random_bcq_weight, relative_error

GROUP_SIZE, MODE, META_SCALE, WEIGHT_STD = 128, "uniform", 0.02, 0.02
EPS, ROPE_THETA = 1e-5, 10000.0


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    mlp: int
    heads: int
    head_dim: int
    vocab: int

    def projections(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each projection of a layer."""
        h = self.hidden
        return {"qkv": (3 * h, h), "o": (h, h), "gate_up": (2 * self.mlp, h),
                "down": (h, self.mlp)}


LLAMA2_7B = Shape(layers=32, hidden=4096, mlp=11008, heads=32, head_dim=128, vocab=32000)
CPU_QUICK = Shape(layers=2, hidden=256, mlp=512, heads=2, head_dim=128, vocab=1000)
OPT175B = dict(layers=96, hidden=12288, mlp=49152)
OPT_CPU_QUICK = dict(layers=2, hidden=256, mlp=1024)

# targets of issue 10 (deliverable 5)
TARGET_FP16_GRAPH_B1, TARGET_FLOOR_B1 = 4.5, 1.4
TARGET_FP16_GRAPH_B8, TARGET_FP16_EAGER_B1 = 3.0, 1.5
TARGET_OPT_MS, TARGET_OPT_FLOOR = 21.0, 1.25
CHECK_REF_TOLERANCE = 5e-2  # logits vs the float32 model, after 32 layers in 16 bits


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def short(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


# --- the projections ---------------------------------------------------------------------------

class Dense:
    """y = x Wᵀ with a dense weight (F.linear)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def __call__(self, x):
        return F.linear(x, self.weight)

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class Int4:
    """torch._weight_int4pack_mm through bench_lutgemm.int4_peer (bfloat16 x)."""

    def __init__(self, weight: torch.Tensor):
        self.fn = int4_peer(weight, GROUP_SIZE)
        if self.fn is None:
            raise RuntimeError("torch._weight_int4pack_mm unavailable in this torch")
        n, k = weight.shape
        # tinygemm's packed weight holds n·k/2 bytes; scales and zeros (k/g, n, 2) bfloat16
        self.bytes = n * k // 2 + (k // GROUP_SIZE) * n * 2 * 2

    def __call__(self, x):
        return self.fn(x)

    def nbytes(self) -> int:
        return self.bytes


def lut_bytes(layer: LutLinear) -> int:
    return layer.qweight.nbytes()


def nbytes(projection) -> int:
    return lut_bytes(projection) if isinstance(projection, LutLinear) else projection.nbytes()


def dense_templates(shape: Shape, device, seed: int = 1) -> dict[str, torch.Tensor]:
    """One float32 N(0, 0.02²) weight per projection shape, plus "embed" and "lm_head"."""
    generator = torch.Generator(device=device).manual_seed(seed)
    shapes = {**shape.projections(), "embed": (shape.vocab, shape.hidden),
              "lm_head": (shape.vocab, shape.hidden)}
    return {name: torch.randn(size, generator=generator, device=device) * WEIGHT_STD
            for name, size in shapes.items()}


def bcq_template(n: int, k: int, bits: int, device, generator: torch.Generator):
    """A random packed uniform-mode weight (float16 metadata) with metadata scaled so that the
    dequantized weight has about the dense init's magnitude."""
    qweight = random_bcq_weight(n, k, bits, GROUP_SIZE, MODE, generator=generator)
    qweight.meta.mul_(META_SCALE)
    return qweight.to(device, meta_dtype=torch.float16)


# --- the decoder -------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # torch's own (one fused kernel on CUDA where this torch has it, instead of ~8 small ones)
    return F.rms_norm(x, (x.shape[-1],), weight, EPS)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotary embedding (rotate_half convention) of x (..., D) at one position."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Decoder:
    """The weights of one variant and its step; the per-batch buffers are a State."""

    def __init__(self, shape: Shape, layers: list[dict], embed, lm_head, dtype, attention: str,
                 ops: str = "torch"):
        self.shape, self.layers, self.embed, self.lm_head = shape, layers, embed, lm_head
        self.dtype, self.attention, self.ops = dtype, attention, ops
        device = embed.device
        self.norms = [(torch.ones(shape.hidden, dtype=dtype, device=device),
                       torch.ones(shape.hidden, dtype=dtype, device=device)) for _ in layers]
        self.final_norm = torch.ones(shape.hidden, dtype=dtype, device=device)
        d = shape.head_dim
        self.inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, d, 2, device=device,
                                                          dtype=torch.float32) / d)

    def weight_bytes(self, batch: int) -> int:
        """Bytes of the model a step reads: projections, norms, lm_head, `batch` embedding rows."""
        projections = sum(nbytes(p) for layer in self.layers for p in layer.values())
        norms = (2 * len(self.layers) + 1) * self.shape.hidden * self.final_norm.element_size()
        head = self.lm_head.numel() * self.lm_head.element_size()
        return projections + norms + head + batch * self.shape.hidden * self.embed.element_size()

    def cache_shape(self, batch: int, context: int) -> tuple[int, ...]:
        s = self.shape
        if self.attention == "sdpa":
            return (batch, s.heads, context, s.head_dim)
        return (batch, context, s.heads, s.head_dim)

    def embed_and_rotary(self, state: State):
        """The new tokens' embeddings and the rotary cos and sin (head_dim,) at `pos`."""
        angles = state.pos.float() * self.inv_freq
        angles = torch.cat((angles, angles))
        return (self.embed.index_select(0, state.tokens), angles.cos().to(self.dtype),
                angles.sin().to(self.dtype))

    def step(self, state: State) -> None:
        if self.ops == "lutflash":
            self.step_fused(state)
            return
        s, batch = self.shape, state.tokens.shape[0]
        x, cos, sin = self.embed_and_rotary(state)
        for layer, (norm1, norm2), (k_cache, v_cache) in zip(self.layers, self.norms,
                                                             state.caches, strict=True):
            h = rms_norm(x, norm1)
            qkv = layer["qkv"](h).view(batch, 3, s.heads, s.head_dim)
            q, k = rotate(qkv[:, :2], cos, sin).unbind(1)  # q and k in one set of kernels
            out = self.attend(state, q, k, qkv[:, 2], k_cache, v_cache)
            x = x + layer["o"](out.reshape(batch, s.heads * s.head_dim))
            h = rms_norm(x, norm2)
            gate, up = layer["gate_up"](h).chunk(2, dim=-1)
            x = x + layer["down"](F.silu(gate) * up)
        logits = F.linear(rms_norm(x, self.final_norm), self.lm_head)
        state.logits.copy_(logits)
        state.next_token.copy_(logits.argmax(-1))

    def attend(self, state: State, q, k, v, k_cache, v_cache):
        """The new token's k and v written into the cache at `pos`, its q over the cache."""
        if self.attention == "sdpa":  # cache (B, H, S, D)
            k_cache.index_copy_(2, state.pos, k.unsqueeze(2))
            v_cache.index_copy_(2, state.pos, v.unsqueeze(2))
            return F.scaled_dot_product_attention(q.unsqueeze(2), k_cache, v_cache)
        k_cache.index_copy_(1, state.pos, k.unsqueeze(1))  # lutflash, cache (B, S, H, D)
        v_cache.index_copy_(1, state.pos, v.unsqueeze(1))
        return lutflash.flash_attention(q.unsqueeze(1), k_cache, v_cache)

    def step_fused(self, state: State) -> None:
        """The same step with lutflash's row-wise ops: each residual add fused into the
        RMSNorm after it (lutflash.rms_norm with residual=), rotary of q and k in one kernel
        (lutflash.apply_rotary on the fused q/k/v output's slice), SiLU·mul in one."""
        s, batch = self.shape, state.tokens.shape[0]
        x, cos, sin = self.embed_and_rotary(state)
        pending = None  # the last projection's output, not yet added to the residual x
        for layer, (norm1, norm2), (k_cache, v_cache) in zip(self.layers, self.norms,
                                                             state.caches, strict=True):
            if pending is None:
                h = lutflash.rms_norm(x, norm1, EPS)
            else:
                h, x = lutflash.rms_norm(pending, norm1, EPS, residual=x)
            qkv = layer["qkv"](h).view(batch, 3, s.heads, s.head_dim)
            q, k = lutflash.apply_rotary(qkv[:, :2], cos, sin).unbind(1)
            out = self.attend(state, q, k, qkv[:, 2], k_cache, v_cache)
            pending = layer["o"](out.reshape(batch, s.heads * s.head_dim))
            h, x = lutflash.rms_norm(pending, norm2, EPS, residual=x)
            pending = layer["down"](lutflash.silu_mul(layer["gate_up"](h)))
        h, _ = lutflash.rms_norm(pending, self.final_norm, EPS, residual=x)
        logits = F.linear(h, self.lm_head)
        state.logits.copy_(logits)
        state.next_token.copy_(logits.argmax(-1))


class State:
    """Static buffers of a step at one batch: tokens, position, KV caches, outputs."""

    def __init__(self, model: Decoder, batch: int, context: int, seed: int = 2):
        device = model.embed.device
        generator = torch.Generator(device=device).manual_seed(seed)
        self.tokens = torch.randint(0, model.shape.vocab, (batch,), generator=generator,
                                    device=device)
        self.pos = torch.tensor([context - 1], device=device)
        shape = model.cache_shape(batch, context)
        self.caches = [tuple(torch.randn(shape, generator=generator, device=device,
                                         dtype=model.dtype) for _ in range(2))
                       for _ in model.layers]
        self.logits = torch.empty(batch, model.shape.vocab, dtype=model.dtype, device=device)
        self.next_token = torch.empty(batch, dtype=torch.long, device=device)

    def kv_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for pair in self.caches for c in pair)

    def converted(self, model: Decoder, source: Decoder) -> State:
        """A copy for `model` (its dtype and cache layout) of this state of `source`."""
        copy = State.__new__(State)
        copy.tokens, copy.pos = self.tokens, self.pos
        swap = source.attention != model.attention  # (B, S, H, D) <-> (B, H, S, D)
        copy.caches = [tuple((c.transpose(1, 2) if swap else c).to(model.dtype).contiguous()
                             for c in pair) for pair in self.caches]
        copy.logits = torch.empty_like(self.logits, dtype=model.dtype)
        copy.next_token = torch.empty_like(self.next_token)
        return copy


def build(variant: str, shape: Shape, dense: dict[str, torch.Tensor], device,
          generator: torch.Generator) -> tuple[Decoder, Decoder | None]:
    """The variant's decoder and, for fp16 and lutflash, the same model in float32 (the
    templates upcast or dequantized once, shared by every layer) for the check."""
    projections = shape.projections()
    if variant in ("fp16", "fp16 ops"):
        half = {name: w.half() for name, w in dense.items()}
        layers = [{name: Dense(half[name].clone()) for name in projections}
                  for _ in range(shape.layers)]
        model = Decoder(shape, layers, half["embed"], half["lm_head"], torch.float16, "sdpa",
                        ops="lutflash" if variant == "fp16 ops" else "torch")
        reference = {name: Dense(half[name].float()) for name in projections}
    elif variant == "int4":
        layers = [{name: Int4(dense[name]) for name in projections} for _ in range(shape.layers)]
        return Decoder(shape, layers, dense["embed"].bfloat16(), dense["lm_head"].bfloat16(),
                       torch.bfloat16, "sdpa"), None
    else:  # "lutflash {bits}b"
        bits = int(variant.split()[1].removesuffix("b"))
        templates = {name: bcq_template(n, k, bits, device, generator)
                     for name, (n, k) in projections.items()}
        layers = [{name: LutLinear.from_bcq(t) for name, t in templates.items()}
                  for _ in range(shape.layers)]
        model = Decoder(shape, layers, dense["embed"].half(), dense["lm_head"].half(),
                        torch.float16, "lutflash", ops="lutflash")
        reference = {name: Dense(t.dequantize(torch.float32)) for name, t in templates.items()}
    ref_model = Decoder(shape, [reference] * shape.layers, model.embed.float(),
                        model.lm_head.float(), torch.float32, "sdpa")
    return model, ref_model


# --- timing ------------------------------------------------------------------------------------

def time_eager(fn, device, steps: int, warmup: int) -> float:
    """Median ms of single calls, each followed by a device synchronize."""
    def call():
        fn()
        synchronize(device)
    synchronize(device)
    return time_cpu(call, steps, warmup) / 1e3


def time_graph(graph: torch.cuda.CUDAGraph, runs: int, replays: int) -> float:
    """Median over `runs` of the CUDA-event ms per replay of `replays` back-to-back replays."""
    graph.replay()  # warm-up
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return statistics.median(times)


# --- section "step" ----------------------------------------------------------------------------

def run_batch(model: Decoder, ref_model: Decoder | None, variant: str, batch: int, args,
              device, bandwidth: float, checks: list) -> list[dict]:
    """Eager and graph rows of one variant at one batch (errors caught per mode)."""
    state = State(model, batch, args.context)
    weights, kv = model.weight_bytes(batch), state.kv_bytes()
    floor_ms = (weights + kv) / bandwidth * 1e3
    base = {"variant": variant, "batch": batch, "weight_bytes": weights, "kv_bytes": kv,
            "bytes_per_step": weights + kv, "floor_ms": floor_ms}
    rows, eager_logits = [], None
    try:
        ms = time_eager(lambda: model.step(state), device, args.steps, args.warmup)
        rows.append({**base, "mode": "eager", "ms_per_step": ms, "error": None})
    except Exception as error:  # noqa: BLE001 - reported in the row, the run goes on
        traceback.print_exc()
        rows.append({**base, "mode": "eager", "ms_per_step": None, "error": short(error)})
    if rows[-1]["error"] is None:
        try:
            if not torch.isfinite(state.logits).all():
                raise RuntimeError("non-finite logits: the benchmark's model is broken")
            eager_logits = state.logits.float().clone()
            if ref_model is not None and batch == args.batch[0]:
                ref_state = state.converted(ref_model, model)
                ref_model.step(ref_state)
                checks.append({"variant": variant, "batch": batch, "check": "float32 model",
                               "rel_err": relative_error(eager_logits, ref_state.logits)})
                del ref_state
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            checks.append({"variant": variant, "batch": batch, "check": "float32 model",
                           "rel_err": None, "error": short(error)})
    if device.type != "cuda":
        rows.append({**base, "mode": "graph", "ms_per_step": None,
                     "error": "skipped: CUDA graphs need a GPU"})
        return rows
    graph = None
    try:
        graph = cuda_graph(lambda: model.step(state))
        ms = time_graph(graph, args.graph_runs, args.graph_replays)
        rows.append({**base, "mode": "graph", "ms_per_step": ms, "error": None})
        if eager_logits is not None:
            checks.append({"variant": variant, "batch": batch, "check": "graph vs eager",
                           "rel_err": relative_error(state.logits, eager_logits)})
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        rows.append({**base, "mode": "graph", "ms_per_step": None, "error": short(error)})
    del graph, state
    free_memory()
    return rows


def bench_step(args, device, bandwidth: float) -> dict:
    shape = CPU_QUICK if (args.quick and device.type == "cpu") else LLAMA2_7B
    shape = Shape(**{**shape.__dict__, "layers": args.layers or (
        4 if args.quick and device.type == "cuda" else shape.layers)})
    print(f"\n## step: {shape}, context {args.context}, batches {args.batch}", flush=True)
    variants = [v.replace("-", " ") for v in args.variants if v != "lutflash"]
    if "lutflash" in args.variants:
        variants += [f"lutflash {b}b" for b in args.bits]
    dense = dense_templates(shape, device)
    generator = torch.Generator().manual_seed(3)
    rows, checks = [], []
    for variant in variants:
        if variant == "int4" and device.type != "cuda":
            rows += [{"variant": variant, "batch": b, "mode": mode, "ms_per_step": None,
                      "error": "skipped: torch's int4 kernel needs a GPU"}
                     for b in args.batch for mode in ("eager", "graph")]
            continue
        start = time.perf_counter()
        model = ref_model = None
        try:
            model, ref_model = build(variant, shape, dense, device, generator)
            print(f"{variant}: built in {time.perf_counter() - start:.1f} s", flush=True)
        except Exception as error:  # noqa: BLE001 - out of memory included
            traceback.print_exc()
            rows += [{"variant": variant, "batch": b, "mode": mode, "ms_per_step": None,
                      "error": short(error)} for b in args.batch for mode in ("eager", "graph")]
        if model is not None:
            for batch in args.batch:
                try:
                    new = run_batch(model, ref_model, variant, batch, args, device, bandwidth,
                                    checks)
                except Exception as error:  # noqa: BLE001 - the state (KV cache) not built
                    traceback.print_exc()
                    new = [{"variant": variant, "batch": batch, "mode": mode,
                            "ms_per_step": None, "error": short(error)}
                           for mode in ("eager", "graph")]
                    free_memory()
                for r in new:
                    print(f"  batch {batch} {r['mode']:<5} "
                          + (f"{r['ms_per_step']:8.3f} ms/step (floor {r['floor_ms']:.3f} ms)"
                             if r["ms_per_step"] is not None else r["error"]), flush=True)
                rows += new
        del model, ref_model
        free_memory()
    del dense
    free_memory()
    add_ratios(rows)
    targets = step_targets(rows, shape)
    return {"model": shape.__dict__, "context": args.context, "rows": rows, "checks": checks,
            "targets": targets}


def add_ratios(rows: list[dict]) -> None:
    fp16 = {(r["batch"], r["mode"]): r["ms_per_step"] for r in rows if r["variant"] == "fp16"}
    for r in rows:
        ms, peer = r["ms_per_step"], fp16.get((r["batch"], r["mode"]))
        r["x_fp16"] = peer / ms if ms and peer else None
        r["x_floor"] = ms / r["floor_ms"] if ms and r.get("floor_ms") else None


def find(rows, variant, batch, mode):
    for r in rows:
        if (r["variant"], r["batch"], r["mode"]) == (variant, batch, mode):
            return r
    return None


def step_targets(rows: list[dict], shape: Shape) -> list[dict]:
    def target(name, value, bound, higher_is_better=True):
        met = None if value is None else (value >= bound if higher_is_better else value <= bound)
        return {"target": name, "value": value, "bound": bound, "met": met}

    def get(variant, batch, mode, key):
        r = find(rows, variant, batch, mode)
        return None if r is None else r.get(key)

    out = [target("3b graph batch 1: x fp16 >= 4.5", get("lutflash 3b", 1, "graph", "x_fp16"),
                  TARGET_FP16_GRAPH_B1),
           target("3b graph batch 1: x floor <= 1.4", get("lutflash 3b", 1, "graph", "x_floor"),
                  TARGET_FLOOR_B1, higher_is_better=False),
           target("3b graph batch 8: x fp16 >= 3", get("lutflash 3b", 8, "graph", "x_fp16"),
                  TARGET_FP16_GRAPH_B8),
           target("3b eager batch 1: x fp16 >= 1.5", get("lutflash 3b", 1, "eager", "x_fp16"),
                  TARGET_FP16_EAGER_B1)]
    for batch in (1, 8):
        for mode in ("graph", "eager"):
            lut, int4 = (get(v, batch, mode, "ms_per_step") for v in ("lutflash 4b", "int4"))
            note = " (eager: reported beside the graph target)" if mode == "eager" else ""
            out.append(target(f"4b {mode} batch {batch}: x int4 > 1{note}",
                              int4 / lut if lut and int4 else None, 1.0))
    if shape.layers != LLAMA2_7B.layers or shape.hidden != LLAMA2_7B.hidden:
        for t in out:
            t["target"] += f" [on {shape.layers} layers of hidden {shape.hidden}]"
    return out


def print_step_table(section: dict) -> None:
    def cell(value, fmt):
        return "—" if value is None else format(value, fmt)

    print("\n| batch | mode | variant | ms/step | tokens/s | × fp16 | floor ms | × floor | "
          "GB/step |")
    print("|---" * 9 + "|")
    for r in sorted(section["rows"], key=lambda r: (r["batch"], r["mode"] != "eager")):
        ms = r["ms_per_step"]
        if ms is None:
            print(f"| {r['batch']} | {r['mode']} | {r['variant']} | {r['error']} | | | | | |")
            continue
        print(f"| {r['batch']} | {r['mode']} | {r['variant']} | {ms:.3f} | "
              f"{r['batch'] * 1e3 / ms:.0f} | {cell(r['x_fp16'], '.2f')} | "
              f"{r['floor_ms']:.3f} | {cell(r['x_floor'], '.2f')} | "
              f"{r['bytes_per_step'] / 1e9:.3f} |")
    for c in section["checks"]:
        bound = CHECK_REF_TOLERANCE if c["check"] == "float32 model" else CHECK_TOLERANCE
        if c["rel_err"] is None:
            print(f"check: {c['variant']} batch {c['batch']}, logits vs {c['check']}: FAILED "
                  f"({c['error']})")
            continue
        verdict = "ok" if c["rel_err"] < bound else "WRONG"
        print(f"check: {c['variant']} batch {c['batch']}, logits vs {c['check']}: relative "
              f"error {c['rel_err']:.1e} ({verdict}, bound {bound:g})")
    print_targets(section["targets"])


def print_targets(targets: list[dict]) -> None:
    for t in targets:
        verdict = {True: "MET", False: "MISSED", None: "not measured"}[t["met"]]
        value = "" if t["value"] is None else f": {t['value']:.2f}"
        print(f"target {t['target']}{value} — {verdict}")


# --- section "opt175b" -------------------------------------------------------------------------

def packed_bytes(n: int, k: int, bits: int) -> int:
    rows = padded_rows(n)
    return (words_per_row(k) * bits * rows * 4
            + k // GROUP_SIZE * meta_per_group(bits, MODE) * rows * 2)


def bench_opt(args, device, bandwidth: float, bits: int = 3) -> dict:
    dims = OPT_CPU_QUICK if (args.quick and device.type == "cpu") else OPT175B
    if args.opt_layers is not None:
        layers = args.opt_layers
    elif args.quick:
        layers = 2 if device.type == "cpu" else 8
    else:
        layers = dims["layers"]
    h, mlp = dims["hidden"], dims["mlp"]
    shapes = {"qkv": (3 * h, h), "o": (h, h), "fc1": (mlp, h), "fc2": (h, mlp)}
    need = layers * sum(packed_bytes(n, k, bits) for n, k in shapes.values())
    floor_ms = need / bandwidth * 1e3
    info = {"layers": layers, "hidden": h, "mlp": mlp, "bits": bits, "weight_bytes": need,
            "floor_ms": floor_ms, "eager_ms": None, "graph_ms": None, "error": None,
            "checks": []}
    print(f"\n## opt175b: {layers} layers of {shapes}, {bits}-bit, {need / 1e9:.1f} GB, floor "
          f"{floor_ms:.2f} ms", flush=True)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if need + (2 << 30) > free:
            info["error"] = (f"not run: needs {need / 1e9:.1f} GB (+2 GiB spare), "
                             f"{free / 1e9:.1f} GB free")
            print(info["error"])
            return add_opt_targets(info)
    stack = x = graph = templates = None
    try:
        generator = torch.Generator().manual_seed(4)
        templates = {name: bcq_template(n, k, bits, device, generator)
                     for name, (n, k) in shapes.items()}
        x = torch.randn(1, h, device=device, dtype=torch.float16)
        for name, t in templates.items():  # one product per shape against its dense weight
            inp = x if t.in_features == h else torch.randn(1, mlp, device=device,
                                                             dtype=torch.float16)
            error = relative_error(lutflash.lutgemm(inp, t),
                                   F.linear(inp.float(), t.dequantize(torch.float32)))
            info["checks"].append({"projection": name, "rel_err": error})
        free_memory()  # the dense float32 copies of the checks go back before the stack is built
        stack = []
        for i in range(layers):
            try:
                stack.append({name: LutLinear.from_bcq(t) for name, t in templates.items()})
            except torch.cuda.OutOfMemoryError:
                raise RuntimeError(f"not run: out of memory after {i} of {layers} layers, needs "
                                   f"{need / 1e9:.1f} GB") from None
        templates = None

        def one_pass():
            for layer in stack:
                layer["qkv"](x)
                layer["o"](x)
                layer["fc2"](layer["fc1"](x))

        info["eager_ms"] = time_eager(one_pass, device, args.opt_steps, 2)
        print(f"  eager {info['eager_ms']:.2f} ms/pass ({info['eager_ms'] / floor_ms:.2f}x floor)",
              flush=True)
        if device.type == "cuda":
            graph = cuda_graph(one_pass)
            info["graph_ms"] = time_graph(graph, args.opt_steps, 2)
            print(f"  graph {info['graph_ms']:.2f} ms/pass ({info['graph_ms'] / floor_ms:.2f}x "
                  f"floor)", flush=True)
    except Exception as error:  # noqa: BLE001 - out of memory included
        traceback.print_exc()
        info["error"] = str(error) if str(error).startswith("not run") else short(error)
    del stack, graph, x, templates
    free_memory()
    return add_opt_targets(info)


def add_opt_targets(info: dict) -> dict:
    ms, floor_ms = info["graph_ms"], info["floor_ms"]
    note = "" if info["layers"] == OPT175B["layers"] and info["hidden"] == OPT175B["hidden"] \
        else f" [on {info['layers']} layers of hidden {info['hidden']}]"
    info["targets"] = [
        {"target": f"opt175b graph <= {TARGET_OPT_MS:g} ms{note}", "value": ms,
         "bound": TARGET_OPT_MS, "met": None if ms is None else ms <= TARGET_OPT_MS},
        {"target": f"opt175b graph x floor <= {TARGET_OPT_FLOOR:g}{note}",
         "value": None if ms is None else ms / floor_ms, "bound": TARGET_OPT_FLOOR,
         "met": None if ms is None else ms / floor_ms <= TARGET_OPT_FLOOR}]
    return info


def print_opt(info: dict) -> None:
    def cell(v):
        return "—" if v is None else f"{v:.2f}"

    print(f"\n| OPT-175B-shaped {info['bits']}-bit stack | layers | GB | floor ms | eager ms | "
          f"graph ms | graph × floor |")
    print("|---" * 7 + "|")
    graph = info["graph_ms"]
    print(f"| {info['error'] or 'ok'} | {info['layers']} | {info['weight_bytes'] / 1e9:.1f} | "
          f"{info['floor_ms']:.2f} | {cell(info['eager_ms'])} | {cell(graph)} | "
          f"{cell(None if graph is None else graph / info['floor_ms'])} |")
    for c in info["checks"]:
        verdict = "ok" if c["rel_err"] < CHECK_TOLERANCE else "WRONG"
        print(f"check: opt175b {c['projection']}, m = 1 vs F.linear on the dequantized weight: "
              f"relative error {c['rel_err']:.1e} ({verdict})")
    print_targets(info["targets"])


# --- entry point (called by bench_e2e.py) ------------------------------------------------------

def measure_bandwidth(device) -> float:
    if device.type == "cuda":
        return copy_bandwidth(CudaTimer(device), device)
    return copy_bandwidth(lambda fn, reps: time_cpu(fn, reps), device, nbytes=2**26)


def plot(data: dict, path, device: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    rows = data.get("step", {}).get("rows", [])
    batches = sorted({r["batch"] for r in rows})
    opt = data.get("opt175b")
    panels = len(batches) + (opt is not None)
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, squeeze=False, figsize=(6 * panels, 4.5))
    for ax, batch in zip(axes[0], batches, strict=False):
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        for i, mode in enumerate(("eager", "graph")):
            values = [(find(rows, v, batch, mode) or {}).get("ms_per_step") or 0
                      for v in variants]
            ax.bar([j + 0.4 * i for j in range(len(variants))], values, width=0.4, label=mode)
        floors = [(find(rows, v, batch, "graph") or {}).get("floor_ms") or 0 for v in variants]
        ax.scatter([j + 0.2 for j in range(len(variants))], floors, color="k", marker="_",
                   s=400, label="floor", zorder=3)
        ax.set_xticks([j + 0.2 for j in range(len(variants))], variants, fontsize=8)
        ax.set(title=f"decode step, batch {batch} ({device})", ylabel="ms / step")
        ax.legend(fontsize=8)
    if opt is not None:
        ax = axes[0][-1]
        labels = ["floor", "eager", "graph"]
        values = [opt["floor_ms"], opt["eager_ms"] or 0, opt["graph_ms"] or 0]
        ax.bar(labels, values, color=["k", "C0", "C1"])
        ax.axhline(TARGET_OPT_FLOOR * opt["floor_ms"], color="r", linestyle=":",
                   label=f"{TARGET_OPT_FLOOR:g} × floor")
        if opt["layers"] == OPT175B["layers"] and opt["hidden"] == OPT175B["hidden"]:
            ax.axhline(TARGET_OPT_MS, color="m", linestyle="--", label=f"{TARGET_OPT_MS:g} ms")
        ax.set(title=f"OPT-175B-shaped {opt['bits']}-bit stack, {opt['layers']} layers",
               ylabel="ms / pass")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def run(args, device: torch.device) -> dict:
    """Runs the requested sections; returns {"copy_bandwidth_bytes_per_s", "step"?,
    "opt175b"?}."""
    bandwidth = measure_bandwidth(device)
    print(f"copy rate: {bandwidth / 1e12:.3f} TB/s (bytes read + written)", flush=True)
    out = {"copy_bandwidth_bytes_per_s": bandwidth}
    if "step" in args.section:
        out["step"] = bench_step(args, device, bandwidth)
    if "opt175b" in args.section and args.opt_layers != 0:
        out["opt175b"] = bench_opt(args, device, bandwidth)
    if "step" in out:
        print_step_table(out["step"])
    if "opt175b" in out:
        print_opt(out["opt175b"])
    return out
