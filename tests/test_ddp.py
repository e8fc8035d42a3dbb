"""Data-parallel training with lutflash: examples/train_ddp.py (a tiny Llama with lutflash
attention, 3-bit LutLinear layers and LoRA adapters) run by torchrun with 2 processes and a
per-rank batch of B/2 matches the same training in one process with batch B, compared by
scripts/compare_runs.py. The CPU tests use the gloo backend; the GPU ones one GPU (two ranks on
two GPUs with NCCL is scripts/multi_gpu_check.sh)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lutflash

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train_ddp.py"
COMPARE = ROOT / "scripts" / "compare_runs.py"
TIMEOUT = 300


def environment() -> dict:
    """The subprocesses import the lutflash this test imported, one CPU thread each."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    package_root = str(Path(lutflash.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


def single(json_path, *options) -> list[str]:
    return [sys.executable, str(TRAIN), "--json", str(json_path), *options]


def torchrun(nproc, json_path, *options) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", str(TRAIN), "--json", str(json_path), *options]


def run_concurrently(*commands) -> None:
    """Starts every command, waits for all; fails with the output of any that failed."""
    processes = [subprocess.Popen(command, cwd=ROOT, env=environment(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for command in commands]
    failures = []
    for command, process in zip(commands, processes, strict=True):
        try:
            output, _ = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        if process.returncode != 0:
            failures.append(f"$ {' '.join(command)}\n(exit {process.returncode})\n{output[-4000:]}")
    assert not failures, "\n\n".join(failures)


def compare(a, b, *options) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(COMPARE), str(a), str(b), *options], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def check_match(a, b) -> None:
    result = compare(a, b)
    assert result.returncode == 0, result.stdout + result.stderr
    first, second = (json.loads(Path(p).read_text()) for p in (a, b))
    assert first["world_size"] == 1 and second["world_size"] == 2
    # 2 layers x 7 adapted projections, each with A and B; nothing else is trainable
    assert len(first["grads"]) == 28 and all("lora_" in name for name in first["grads"])
    assert all(value > 0 for name, value in first["grad_norms"].items() if "lora_B" in name)


def test_gloo_two_processes_match_one_process(tmp_path):
    one, two = tmp_path / "single.json", tmp_path / "ddp.json"
    run_concurrently(single(one, "--device", "cpu", "--threads", "1"),
                     torchrun(2, two, "--backend", "gloo", "--device", "cpu"))
    check_match(one, two)

    # the comparison catches a difference: one gradient value off by 1% of its tensor's norm
    data = json.loads(two.read_text())
    name = next(name for name in data["grads"] if "lora_B" in name)
    data["grads"][name][0] += 0.01 * data["grad_norms"][name]
    perturbed = tmp_path / "perturbed.json"
    perturbed.write_text(json.dumps(data))
    result = compare(one, perturbed)
    assert result.returncode == 1 and name in result.stdout, result.stdout
    data["args"]["lr"] *= 2
    perturbed.write_text(json.dumps(data))
    assert compare(one, perturbed).returncode == 2


@pytest.mark.cuda
@pytest.mark.skipif(not lutflash.built_with_cuda, reason="lutflash built without CUDA")
def test_one_gpu_nccl_and_two_ranks_sharing_it_match_one_process(tmp_path):
    """On one GPU: NCCL with world size 1, and gloo with two ranks on cuda:0 (NCCL refuses two
    ranks on one GPU), each against the single-process run."""
    one, nccl, gloo = (tmp_path / f"{name}.json" for name in ("single", "nccl", "gloo"))
    run_concurrently(single(one, "--device", "cuda"))
    run_concurrently(torchrun(1, nccl, "--backend", "nccl", "--device", "cuda"))
    run_concurrently(torchrun(2, gloo, "--backend", "gloo", "--device", "cuda", "--share-gpu"))
    result = compare(one, nccl)
    assert result.returncode == 0, result.stdout + result.stderr
    check_match(one, gloo)

