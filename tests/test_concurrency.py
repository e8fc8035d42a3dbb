"""lutgemm and flash_attention called from two threads at once give the results of serial calls.

On the GPU each thread enqueues on a CUDA stream of its own (the ops use the current stream, and
lutgemm keeps a zeroed workspace per stream); on the CPU both threads run OpenMP kernels at the
same time, with torch's thread count above 1, while the ops run without the GIL. Shapes differ
between the threads, and every case is repeated so that a race has many chances to show.
"""

import threading

import pytest
import torch

import lutflash
from lutflash.testing import random_bcq_weight

ROUNDS = 8


def make_work(device, dtype, seed, shapes):
    """A closure computing, from fixed inputs, lutgemm (with bias) and flash_attention forward
    and backward (deterministic): a list of output tensors."""
    n, k, m, seqlen, heads, d, causal = shapes
    g = torch.Generator().manual_seed(seed)
    qweight = random_bcq_weight(n, k, 3, 128, "general", generator=g).to(device)
    xs = [(torch.randn(rows, k, generator=g)).to(device, dtype) for rows in m]
    bias = torch.randn(n, generator=g).to(device, dtype)
    q, kk, v = (torch.randn(2, seqlen, h, d, generator=g).to(device, dtype)
                for h in (heads, heads // 2, heads // 2))
    grad = torch.randn(2, seqlen, heads, d, generator=g).to(device, dtype)

    def work():
        outs = [lutflash.lutgemm(x, qweight, bias) for x in xs]
        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, kk, v))
        out = lutflash.flash_attention(qg, kg, vg, causal=causal, deterministic=True)
        out.backward(grad)
        return [*outs, out.detach(), qg.grad, kg.grad, vg.grad]

    return work


# Two jobs of different shapes: m = 1 and 2 take the decode paths (on the GPU, the kernel that
# splits a long k over blocks, summing into a zeroed workspace kept per stream), 70 and 33 the
# batched ones; n is odd-sized and k long so that k is split.
SHAPES = [(392, 4096, (1, 70), 200, 4, 64, True), (264, 2048, (2, 33), 130, 6, 40, False)]


def run_concurrently(works, before=None, after=None):
    """Runs each work ROUNDS times, all threads released together each round; returns the
    results per thread and round, or raises what a thread raised."""
    results = [[None] * ROUNDS for _ in works]
    errors = []
    barrier = threading.Barrier(len(works))

    def loop(index, work):
        try:
            if before is not None:
                before(index)
            for r in range(ROUNDS):
                barrier.wait()
                results[index][r] = work()
            if after is not None:
                after(index)
        except BaseException as exc:  # noqa: BLE001 - reported in the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=loop, args=(i, w)) for i, w in enumerate(works)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def assert_bitwise_equal(results, serial):
    for index, (rounds, expected) in enumerate(zip(results, serial, strict=True)):
        for r, outs in enumerate(rounds):
            for i, (got, want) in enumerate(zip(outs, expected, strict=True)):
                assert torch.equal(got.cpu(), want.cpu()), (
                    f"thread {index}, round {r}, output {i}: "
                    f"{(got.cpu() != want.cpu()).sum().item()} elements differ from the serial call")


@pytest.fixture
def two_torch_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(max(2, previous))
    yield torch.get_num_threads()
    torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_threads_match_serial(two_torch_threads, dtype):
    assert two_torch_threads > 1
    works = [make_work("cpu", dtype, seed, shapes) for seed, shapes in enumerate(SHAPES)]
    serial = [work() for work in works]
    assert_bitwise_equal([[work() for _ in range(2)] for work in works], serial)  # repeatable
    assert_bitwise_equal(run_concurrently(works), serial)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_streams_match_serial(cuda_device, dtype):
    """Two threads, each enqueueing on its own stream, against serial calls on the default
    stream. Attention (forward and the deterministic backward) must match bitwise; lutgemm
    within one rounding step (split-k sums with float32 atomics add in an order that varies
    from run to run: two serial calls that happened to agree proved nothing, as a GPU run
    showed)."""
    works = [make_work(cuda_device, dtype, seed, shapes) for seed, shapes in enumerate(SHAPES)]
    serial = [work() for work in works]
    again = [work() for work in works]
    torch.cuda.synchronize(cuda_device)
    repeatable = [[torch.equal(a, b) for a, b in zip(first, second, strict=True)]
                  for first, second in zip(serial, again, strict=True)]
    lutgemm_outputs = len(SHAPES[0][2])
    for flags in repeatable:
        assert all(flags[lutgemm_outputs:]), "attention is not bitwise repeatable serially"

    streams = [torch.cuda.Stream(device=cuda_device) for _ in works]
    contexts = [None] * len(works)

    def enter(index):
        contexts[index] = torch.cuda.stream(streams[index])
        contexts[index].__enter__()
        # inputs were made on the default stream
        streams[index].wait_stream(torch.cuda.default_stream(cuda_device))

    def leave(index):
        streams[index].synchronize()
        contexts[index].__exit__(None, None, None)

    results = run_concurrently(works, before=enter, after=leave)
    torch.cuda.synchronize(cuda_device)
    for index, (rounds, expected) in enumerate(zip(results, serial, strict=True)):
        for r, outs in enumerate(rounds):
            for i, (got, want) in enumerate(zip(outs, expected, strict=True)):
                what = f"thread {index}, round {r}, output {i}"
                if i >= lutgemm_outputs:  # attention: bitwise
                    assert torch.equal(got, want), what
                else:  # lutgemm: split-k atomics may add in another order
                    torch.testing.assert_close(got, want, rtol=2 * torch.finfo(dtype).eps,
                                               atol=1e-3, msg=what)
