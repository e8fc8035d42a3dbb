"""Accuracy of lutflash's quantizers on a small trained language model: the code shared by
tests/test_accuracy.py (assertions) and benchmarks/bench_accuracy.py (the table).

A character-level Llama (transformers.LlamaForCausalLM, hidden 128, 2 layers) is trained for a
few hundred steps on the first 90% of a text (tests/data/corpus.txt), then copies of it are
quantized (every Linear of the decoder layers; the embedding and lm_head stay in float32) and
the perplexity per character of each copy is measured on the held-out last 10%. Calibrated
variants (method "gptq", awq=True) take their calibration sequences from the training part.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

CORPUS = Path(__file__).resolve().parents[2] / "tests" / "data" / "corpus.txt"

# (label, bits, method, mode, awq) in the table's order; None bits = the float32 model
VARIANTS = (("fp32", None, None, None, False),
            ("4-bit rtn", 4, "rtn", "uniform", False),
            ("4-bit alternating", 4, "alternating", "general", False),
            ("4-bit gptq", 4, "gptq", "general", False),
            ("3-bit rtn", 3, "rtn", "uniform", False),
            ("3-bit alternating", 3, "alternating", "general", False),
            ("3-bit gptq", 3, "gptq", "general", False),
            ("3-bit gptq uniform", 3, "gptq", "uniform", False),
            ("3-bit rtn + awq", 3, "rtn", "uniform", True),
            ("3-bit gptq + awq", 3, "gptq", "general", True))


@dataclass
class Setup:
    """What the accuracy run does; the defaults train for 1-3 minutes on 2 cores."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 256
    seq: int = 128
    batch: int = 16
    steps: int = 300
    lr: float = 3e-3
    seed: int = 0
    group_size: int = 64
    calibration_sequences: int = 32
    eval_chars: int = 30_000
    variants: tuple = field(default=VARIANTS)


class CharTokenizer:
    """One token per distinct character of the text."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)


def load_corpus(path: str | Path = CORPUS) -> tuple[CharTokenizer, torch.Tensor, torch.Tensor]:
    """(tokenizer, training ids, held-out ids): the first 90% and the last 10% of the text."""
    text = Path(path).read_text(encoding="utf-8")
    tokenizer = CharTokenizer(text)
    ids = tokenizer.encode(text)
    split = int(len(ids) * 0.9)
    return tokenizer, ids[:split], ids[split:]


def build_model(vocab_size: int, setup: Setup):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=setup.hidden, intermediate_size=setup.intermediate,
        num_hidden_layers=setup.layers, num_attention_heads=setup.heads,
        num_key_value_heads=setup.heads, max_position_embeddings=setup.seq,
        tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def train(train_ids: torch.Tensor, vocab_size: int, setup: Setup):
    """The float32 model after setup.steps AdamW steps on random windows of train_ids."""
    torch.manual_seed(setup.seed)
    model = build_model(vocab_size, setup)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=setup.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, setup.lr, total_steps=setup.steps,
                                                   pct_start=0.1)
    g = torch.Generator().manual_seed(setup.seed)
    for _ in range(setup.steps):
        starts = torch.randint(0, len(train_ids) - setup.seq - 1, (setup.batch,), generator=g)
        batch = torch.stack([train_ids[s:s + setup.seq] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq: int, limit: int | None = None) -> float:
    """exp(mean negative log-likelihood per character) over non-overlapping windows."""
    ids = ids[:limit] if limit else ids
    windows = ids[: len(ids) // seq * seq].view(-1, seq)
    total, count = 0.0, 0
    for chunk in windows.split(32):
        logits = model(input_ids=chunk).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                chunk[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


def calibration_batches(train_ids: torch.Tensor, setup: Setup) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(setup.seed + 1)
    starts = torch.randint(0, len(train_ids) - setup.seq, (setup.calibration_sequences,),
                           generator=g)
    ids = torch.stack([train_ids[s:s + setup.seq] for s in starts.tolist()])
    return list(ids.split(8))


def quantized_copy(model, bits: int, method: str, mode: str, setup: Setup, calibration,
                   awq: bool = False):
    """A copy of `model` with every decoder Linear quantized (lm_head kept)."""
    from .nn import quantize_model

    copied = copy.deepcopy(model)
    calibrated = method == "gptq" or awq
    quantize_model(copied, bits, setup.group_size, method, mode=mode, skip=("lm_head",),
                   progress=False, calibration=calibration if calibrated else None, awq=awq)
    return copied


def evaluate(model, train_ids, heldout_ids, setup: Setup) -> list[dict]:
    """One row per variant: {"variant", "bits", "method", "mode", "awq", "ppl", "gap",
    "seconds"} where gap is ppl / fp32 ppl − 1 and seconds the quantization time."""
    calibration = calibration_batches(train_ids, setup)
    rows = []
    base = None
    for label, bits, method, mode, awq in setup.variants:
        start = time.perf_counter()
        quantized = model if bits is None else quantized_copy(model, bits, method, mode, setup,
                                                              calibration, awq)
        seconds = time.perf_counter() - start
        ppl = perplexity(quantized, heldout_ids, setup.seq, setup.eval_chars)
        base = ppl if bits is None else base
        rows.append({"variant": label, "bits": bits, "method": method, "mode": mode, "awq": awq,
                     "ppl": ppl,
                     "gap": ppl / base - 1.0, "seconds": seconds if bits else 0.0})
    return rows


def run(setup: Setup | None = None, corpus: str | Path = CORPUS) -> dict:
    """Trains, quantizes, evaluates: {"setup": ..., "train_seconds": ..., "rows": [...]}."""
    setup = setup or Setup()
    tokenizer, train_ids, heldout_ids = load_corpus(corpus)
    start = time.perf_counter()
    model = train(train_ids, tokenizer.vocab_size, setup)
    train_seconds = time.perf_counter() - start
    rows = evaluate(model, train_ids, heldout_ids, setup)
    return {"setup": {k: v for k, v in vars(setup).items() if k != "variants"},
            "vocab_size": tokenizer.vocab_size, "train_chars": len(train_ids),
            "heldout_chars": min(len(heldout_ids), setup.eval_chars),
            "train_seconds": train_seconds, "rows": rows}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| variant | mode | perplexity | gap to fp32 | quantize s |",
             "|---|---|---|---|---|"]
    for row in rows:
        gap = "" if row["bits"] is None else f"{100 * row['gap']:+.2f}%"
        mode = row["mode"] or ""
        seconds = "" if row["bits"] is None else f"{row['seconds']:.2f}"
        lines.append(f"| {row['variant']} | {mode} | {row['ppl']:.4f} | {gap} | {seconds} |")
    return "\n".join(lines)
