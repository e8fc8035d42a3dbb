"""Data-parallel LoRA fine-tuning of a quantized Llama-style model with lutflash.

A tiny Llama from a transformers LlamaConfig (no download) runs its attention through
lutflash.flash_attention (attn_implementation="lutflash") and its linear layers through
LUT-GEMM (3-bit BCQ, lutflash.patch_model), with trainable low-rank adapters beside the frozen
packed weights (lutflash.add_lora). It trains for a few AdamW steps on a fixed synthetic dataset
and writes the losses and the last step's gradients to a JSON file (scripts/compare_runs.py
compares two such files).

Data parallelism is exact by construction: every step takes the same global batch of --batch
sequences (all of one length, no padding), and rank r of W takes rows [r·B/W, (r+1)·B/W). Each
rank's loss is the mean over its tokens; DistributedDataParallel averages the gradients over the
ranks, which is the gradient of the mean over the global batch. So a 2-process run matches the
1-process run with the same --batch up to floating-point rounding.

    python examples/train_ddp.py --device cpu --json single.json
    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --backend gloo --device cpu \\
        --json ddp.json
    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --backend nccl --device cuda \\
        --json ddp.json
    python scripts/compare_runs.py single.json ddp.json

Run without torchrun (no WORLD_SIZE in the environment) it is one plain process, without a
process group; under torchrun every rank uses cuda:LOCAL_RANK (made current) or the CPU.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import time

import torch
import torch.distributed as dist
import transformers
from torch.nn.parallel import DistributedDataParallel

import lutflash

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("nccl", "gloo"), default=None,
                        help="process-group backend under torchrun (default: nccl on cuda, gloo on cpu)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--share-gpu", action="store_true",
                        help="every rank uses cuda:0 (gloo only: to try world size 2 on one GPU)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="the model's dtype (default: float32 on cpu, bfloat16 on cuda, where "
                             "lutflash attention takes float16/bfloat16)")
    parser.add_argument("--adapter-dtype", choices=tuple(DTYPES), default="float32",
                        help="the LoRA adapters' dtype (their gradients are all-reduced in it)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4, help="global batch (sequences per step)")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--method", default="rtn", choices=("rtn", "greedy", "alternating"))
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--json", default=None, help="where rank 0 writes the results")
    return parser.parse_args(argv)


def build_model(args) -> tuple[torch.nn.Module, list[str]]:
    """The same model in every process: seeded init, quantized on the CPU, then adapters."""
    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=args.layers, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=128)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="lutflash")
    # fuse=False: one adapter per projection (q, k, v, gate, up apart), as LoRA recipes expect
    lutflash.patch_model(model, attention=True,
                         linear=dict(bits=args.bits, group_size=args.group_size,
                                     method=args.method, progress=False), fuse=False)
    adapted = lutflash.add_lora(model, rank=args.rank, alpha=args.alpha)
    return model, adapted


def synthetic_batches(args, vocab_size: int) -> torch.Tensor:
    """(steps, batch, seq_len) token ids: each sequence an arithmetic progression modulo the
    vocabulary with its own start and stride, so there is something to learn."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    count = args.steps * args.batch
    start = torch.randint(0, vocab_size, (count, 1), generator=generator)
    stride = torch.randint(1, 8, (count, 1), generator=generator)
    tokens = (start + stride * torch.arange(args.seq_len)) % vocab_size
    return tokens.view(args.steps, args.batch, args.seq_len)


def setup_distributed(args) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initializes the process group under torchrun."""
    distributed = "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        if args.share_gpu and backend == "nccl" and world_size > 1:
            raise SystemExit("--share-gpu: NCCL refuses two ranks on one GPU; use --backend gloo")
        index = 0 if args.share_gpu else local_rank
        if index >= torch.cuda.device_count():
            raise SystemExit(f"rank {rank}: needs cuda:{index}, this machine has "
                             f"{torch.cuda.device_count()} GPU(s)")
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        if backend == "nccl":
            raise SystemExit("--backend nccl needs --device cuda")
        device = torch.device("cpu")
    if distributed:
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return rank, world_size, device


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch % world_size:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the world size {world_size}")
    rank, world_size, device = setup_distributed(args)
    distributed = dist.is_initialized()

    model, adapted = build_model(args)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    model.to(device=device, dtype=DTYPES[args.dtype]).train()
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.to(DTYPES[args.adapter_dtype])
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if distributed:
        # The packed weights are buffers that never change: DDP's constructor broadcasts them
        # from rank 0 once; there is no need to do it again before every forward.
        no_forward_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers"
                           in inspect.signature(DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})
        model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                        **no_forward_sync)
    optimizer = torch.optim.AdamW(trainable.values(), lr=args.lr, weight_decay=0.01)

    data = synthetic_batches(args, model_config(model).vocab_size)
    shard = args.batch // world_size
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        input_ids = data[step, rank * shard:(rank + 1) * shard].to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        global_loss = loss.detach().float()
        if distributed:
            dist.all_reduce(global_loss)  # SUM: gloo has no AVG
            global_loss /= world_size
        losses.append(global_loss.item())
        if rank == 0:
            print(f"step {step}: loss {losses[-1]:.6f}", flush=True)
        if step < args.steps - 1:  # keep the last step's gradients for the fingerprint
            optimizer.step()
    elapsed = time.perf_counter() - start

    result = {
        "world_size": world_size,
        "backend": dist.get_backend() if distributed else None,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "args": vars(args),
        "adapted_layers": adapted,
        "losses": losses,
        "final_loss": losses[-1],
        "seconds": elapsed,
        "grads": {name: p.grad.detach().double().flatten().tolist() for name, p in trainable.items()},
        "grad_norms": {name: p.grad.detach().double().norm().item() for name, p in trainable.items()},
        "param_norms": {name: p.detach().double().norm().item() for name, p in trainable.items()},
    }
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)
        print(f"wrote {args.json} ({len(trainable)} trainable tensors, "
              f"{sum(p.numel() for p in trainable.values())} values, {elapsed:.2f} s)", flush=True)
    if distributed:
        dist.destroy_process_group()
    return result


def model_config(model: torch.nn.Module):
    return (model.module if isinstance(model, DistributedDataParallel) else model).config


if __name__ == "__main__":
    main()
