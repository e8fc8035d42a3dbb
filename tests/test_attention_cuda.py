"""flash_attention on CUDA (cuda/attention_*.cu) against the float64 reference, the CPU kernel's
dropout mask, and torch's CUDA machinery (streams, graphs, autograd)."""

import math
import os

import pytest
import torch

import lutflash
from lutflash import flash_attention, flash_attention_varlen
from lutflash.testing import attention_reference, dropout_keep, poisoned_empty

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("cuda_device")]

# scripts/multi_gpu_check.sh runs this file with LUTFLASH_TEST_DEVICE=cuda:1, cuda:0 current
DEVICE = os.environ.get("LUTFLASH_TEST_DEVICE", "cuda")

DTYPES = [torch.float16, torch.bfloat16]


def make_case(batch, seqlen_q, seqlen_k, heads_q, heads_kv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shape_q, shape_k = (batch, seqlen_q, heads_q, d), (batch, seqlen_k, heads_kv, d)
    return tuple(torch.randn(s, generator=g).to(dtype) for s in (shape_q, shape_k, shape_k))


def max_err(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item() if b.numel() else 0.0


def assert_lowp_close(ours, naive, exact, what):
    """FlashAttention's criterion: within 2x the naive same-precision error, plus a floor."""
    err, baseline = max_err(ours, exact), max_err(naive, exact)
    assert err <= 2 * baseline + 2e-3, (what, err, baseline)


# Sampled feature grid: every value of every axis appears; combinations vary per case.
AXES = {
    "d": [64, 128, 32, 96, 256, 40, 80, 8],
    "causal": [False, True],
    "window": [(-1, -1), (20, -1), (7, 3), (0, 0), (-1, 5)],
    "softcap": [0.0, 4.0],
    "alibi": [None, "heads", "batch_heads"],
    "heads": [(4, 4), (4, 2), (6, 1)],
    "seqlens": [(37, 37), (29, 140), (130, 33), (200, 264), (1, 70), (256, 128)],
    "dropout_p": [0.0, 0.3],
    "dtype": DTYPES,
}
GRID = [{name: values[(n + a + n // len(values)) % len(values)]
         for a, (name, values) in enumerate(AXES.items())} for n in range(16)]


def test_grid_covers_every_value():
    for name, values in AXES.items():
        assert {repr(c[name]) for c in GRID} == {repr(x) for x in values}, name


def grid_inputs(case, seed):
    heads_q, heads_kv = case["heads"]
    seqlen_q, seqlen_k = case["seqlens"]
    batch = 2
    q, k, v = make_case(batch, seqlen_q, seqlen_k, heads_q, heads_kv, case["d"], case["dtype"],
                        seed)
    alibi = None
    if case["alibi"] == "heads":
        alibi = torch.rand(heads_q) * 0.5
    elif case["alibi"] == "batch_heads":
        alibi = torch.rand(batch, heads_q) * 0.5
    kwargs = dict(causal=case["causal"], window=case["window"], softcap=case["softcap"],
                  dropout_p=case["dropout_p"])
    ref_kwargs = dict(kwargs, alibi=alibi)
    if case["dropout_p"] > 0:
        kwargs["seed"] = (4321 + seed, 3)
        ref_kwargs["keep"] = dropout_keep(4321 + seed, 3, batch, heads_q, seqlen_q, seqlen_k,
                                          case["dropout_p"])
    return q, k, v, alibi, kwargs, ref_kwargs


@pytest.mark.parametrize("n", range(len(GRID)))
def test_forward_and_gradients_match_reference(poison, n):
    case = GRID[n]
    q, k, v, alibi, kwargs, ref_kwargs = grid_inputs(case, seed=n)
    qc, kc, vc = (t.to(DEVICE).requires_grad_() for t in (q, k, v))
    out, lse = flash_attention(qc, kc, vc, alibi_slopes=alibi.to(DEVICE) if alibi is not None
                               else None, return_lse=True, **kwargs)
    assert out.dtype == case["dtype"] and out.shape == q.shape
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_reference(q64, k64, v64, **ref_kwargs)
    # The naive baseline: the reference in q's dtype (matmuls and softmax rounded to it).
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    naive, _ = attention_reference(ql, kl, vl, **ref_kwargs)
    assert_lowp_close(out, naive, ref, "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert torch.allclose(lse.cpu().double()[finite], ref_lse[finite], atol=2e-3, rtol=1e-3)

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(n)).to(case["dtype"])
    out.backward(grad.to(DEVICE))
    ref.backward(grad.double())
    naive.backward(grad)
    for name, ours, low, exact in (("dq", qc.grad, ql.grad, q64.grad),
                                   ("dk", kc.grad, kl.grad, k64.grad),
                                   ("dv", vc.grad, vl.grad, v64.grad)):
        assert ours.dtype == case["dtype"]
        assert_lowp_close(ours, low, exact, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
def test_long_sequences(dtype, d):
    q, k, v = make_case(1, 1000, 1100, 2, 1, d, dtype, seed=d)
    for causal in (False, True):
        out = flash_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), causal=causal)
        ref, _ = attention_reference(q.double(), k.double(), v.double(), causal=causal)
        naive, _ = attention_reference(q.float(), k.float(), v.float(), causal=causal)
        assert_lowp_close(out, naive.to(dtype), ref, f"causal={causal}")


@pytest.mark.parametrize("seqlens", [(70, 128), (33, 64)])
def test_dropout_mask_matches_cpu_kernel(seqlens):
    # v = identity (Sk = D): out[b, i, h, j] = P[i, j] * keep[i, j] / (1 - p), so the mask is
    # visible in the output. A small scale keeps every P far above fp16's smallest normal.
    seqlen_q, seqlen_k = seqlens
    batch, heads, p = 2, 3, 0.25
    q, k, _ = make_case(batch, seqlen_q, seqlen_k, heads, heads, seqlen_k, torch.float32, 6)
    v = torch.eye(seqlen_k).view(1, seqlen_k, 1, seqlen_k).expand(batch, -1, heads, -1)
    v = v.contiguous()
    kw = dict(dropout_p=p, seed=(99, 5), softmax_scale=0.05)
    cpu = flash_attention(q, k, v, **kw)
    cpu_keep = (cpu != 0).permute(0, 2, 1, 3)
    assert torch.equal(cpu_keep, dropout_keep(99, 5, batch, heads, seqlen_q, seqlen_k, p))
    for dtype in DTYPES:
        gpu = flash_attention(q.to(DEVICE).to(dtype), k.to(DEVICE).to(dtype), v.to(DEVICE).to(dtype), **kw)
        assert torch.equal((gpu != 0).permute(0, 2, 1, 3).cpu(), cpu_keep), dtype
        assert torch.allclose(gpu.float().cpu(), cpu, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (9, 2))])
def test_varlen_matches_dense_per_sequence(poison, causal, window):
    lengths_q, lengths_k = [5, 0, 170, 33], [9, 4, 165, 33]
    heads_q, heads_kv, d, dtype = 4, 2, 64, torch.bfloat16
    g = torch.Generator().manual_seed(8)
    q = torch.randn(sum(lengths_q), heads_q, d, generator=g).to(dtype).to(DEVICE).requires_grad_()
    k = torch.randn(sum(lengths_k), heads_kv, d, generator=g).to(dtype).to(DEVICE).requires_grad_()
    v = torch.randn(sum(lengths_k), heads_kv, d, generator=g).to(dtype).to(DEVICE).requires_grad_()
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32)
    alibi = torch.rand(len(lengths_q), heads_q).to(DEVICE)
    kw = dict(causal=causal, window=window, dropout_p=0.2, seed=4)
    out, lse = flash_attention_varlen(q, k, v, cu_q.to(DEVICE), cu_k.to(DEVICE), max(lengths_q),
                                      max(lengths_k), alibi_slopes=alibi, return_lse=True, **kw)
    grad = torch.randn_like(out)
    out.backward(grad)
    for b in range(len(lengths_q)):
        if lengths_q[b] == 0:
            continue
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        # The same sequence alone, as batch b of a dense call (dropout counters use b).
        qd, kd, vd = (t[s].detach()[None].expand(b + 1, -1, -1, -1).contiguous()
                      .requires_grad_() for t, s in ((q, qs), (k, ks), (v, ks)))
        alibi_d = alibi[: b + 1].contiguous()
        dense, dense_lse = flash_attention(qd, kd, vd, alibi_slopes=alibi_d, return_lse=True, **kw)
        assert torch.equal(out[qs], dense[b])
        assert torch.equal(lse[:, qs], dense_lse[b])
        gd = torch.zeros_like(dense)
        gd[b] = grad[qs]
        dense.backward(gd)
        assert torch.allclose(q.grad[qs].float(), qd.grad[b].float(), atol=1e-2, rtol=1e-2)
        assert torch.allclose(k.grad[ks].float(), kd.grad[b].float(), atol=1e-2, rtol=1e-2)
        assert torch.allclose(v.grad[ks].float(), vd.grad[b].float(), atol=1e-2, rtol=1e-2)


def test_fully_masked_rows_and_empty(poison):
    # Causal with Sq > Sk: the first Sq - Sk rows see no key.
    q, k, v = (t.to(DEVICE).requires_grad_() for t in make_case(1, 90, 40, 2, 2, 64, torch.float16, 2))
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    assert torch.all(out[:, :50] == 0) and torch.all(lse[:, :, :50] == -math.inf)
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, :, 50:]).all()
    out.sum().backward()
    assert torch.all(q.grad[:, :50] == 0) and torch.isfinite(k.grad).all()
    for sq, sk in ((0, 5), (5, 0)):
        q, k, v = (t.to(DEVICE).requires_grad_() for t in make_case(2, sq, sk, 2, 1, 32,
                                                                  torch.bfloat16, 3))
        out = flash_attention(q, k, v)
        assert out.shape == q.shape and torch.all(out == 0)
        out.sum().backward()
        assert torch.all(k.grad == 0) and torch.all(v.grad == 0)


# (batch, Sq, Sk, Hq, Hkv, d, dtype, options): a spread of shapes, Sq > Sk included
REPEAT_CASES = [
    (2, 300, 300, 4, 2, 128, torch.bfloat16, dict(causal=True)),
    (1, 800, 64, 12, 12, 256, torch.float16, dict(causal=True, window=(30, 12))),
    (1, 256, 108, 4, 4, 256, torch.bfloat16, dict(causal=True)),
    (1, 2048, 64, 2, 2, 128, torch.bfloat16, dict(window=(20, 7))),
    (3, 97, 1000, 4, 1, 64, torch.float16, dict(causal=True, softcap=3.0)),
    (1, 4000, 16, 2, 1, 40, torch.float16, dict(causal=True, dropout_p=0.3, seed=2)),
    (2, 64, 64, 2, 2, 96, torch.bfloat16, dict(window=(4, 4))),
]


@pytest.mark.parametrize("n", range(len(REPEAT_CASES)))
def test_deterministic_calls_are_bitwise_repeatable(n):
    """deterministic=True: two calls on the same inputs give bitwise-equal outputs, lse and
    gradients (the forward never uses atomics; a race shows up as a difference)."""
    batch, sq, sk, hq, hkv, d, dtype, options = REPEAT_CASES[n]
    q, k, v = (t.to(DEVICE).requires_grad_() for t in make_case(batch, sq, sk, hq, hkv, d,
                                                              dtype, 4 + n))
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(n)).to(DEVICE, dtype)
    results = []
    for _ in range(3):
        out, lse = flash_attention(q, k, v, deterministic=True, return_lse=True, **options)
        results.append((out, lse, *torch.autograd.grad(out, (q, k, v), grad)))
    for first, later in ((results[0], results[1]), (results[0], results[2])):
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), first, later, strict=True):
            assert torch.equal(a, b), name


# The two CUDA backwards (the default fast one with float32 dQ atomics, and deterministic=True)
# on features the grid samples only sparsely: (batch, Sq, Sk, Hq, Hkv, d, dtype, options).
BACKWARD_CASES = [
    (2, 300, 300, 4, 2, 128, torch.bfloat16, dict(causal=True)),
    (1, 200, 333, 6, 2, 64, torch.float16, dict(window=(50, 20))),
    (2, 257, 190, 4, 1, 96, torch.bfloat16, dict(softcap=5.0, causal=True)),
    (1, 150, 150, 4, 4, 40, torch.float16, dict(dropout_p=0.2, seed=(5, 1))),
    (2, 129, 400, 2, 2, 32, torch.bfloat16, dict(alibi=True, window=(-1, 7))),
    (1, 520, 260, 4, 2, 128, torch.float16, dict(causal=True, dropout_p=0.1, seed=3)),
    # queries outnumber keys: query blocks that see no key, bands clipped at both ends
    (1, 800, 64, 4, 2, 256, torch.float16, dict(causal=True, window=(30, 12))),
    (1, 600, 40, 4, 2, 128, torch.bfloat16, dict(causal=True)),
    (2, 300, 16, 2, 2, 64, torch.float16, dict(window=(5, 0), alibi=True)),
    (1, 1000, 24, 4, 1, 32, torch.bfloat16, dict(causal=True, softcap=4.0)),
    (1, 700, 50, 2, 2, 96, torch.float16, dict(window=(3, 2), dropout_p=0.25, seed=9)),
]


@pytest.mark.parametrize("n", range(len(BACKWARD_CASES)))
def test_fast_and_deterministic_backwards(poison_all, n):
    batch, sq, sk, hq, hkv, d, dtype, options = BACKWARD_CASES[n]
    q, k, v = make_case(batch, sq, sk, hq, hkv, d, dtype, seed=200 + n)
    kwargs = dict(options)
    alibi = torch.rand(batch, hq) * 0.5 if kwargs.pop("alibi", False) else None
    ref_kwargs = {key: val for key, val in kwargs.items() if key != "seed"}
    if kwargs.get("dropout_p", 0.0) > 0:
        seed = kwargs["seed"] if isinstance(kwargs["seed"], tuple) else (kwargs["seed"], 0)
        ref_kwargs["keep"] = dropout_keep(*seed, batch, hq, sq, sk, kwargs["dropout_p"])
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(n)).to(dtype)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64, alibi=alibi, **ref_kwargs)
    ref.backward(grad.double())
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    naive, _ = attention_reference(ql, kl, vl, alibi=alibi, **ref_kwargs)
    naive.backward(grad)

    def grads(deterministic):
        qc, kc, vc = (t.to(DEVICE).requires_grad_() for t in (q, k, v))
        out = flash_attention(qc, kc, vc, deterministic=deterministic,
                              alibi_slopes=alibi.to(DEVICE) if alibi is not None else None,
                              **kwargs)
        return torch.autograd.grad(out, (qc, kc, vc), grad.to(DEVICE))

    fast, det, det2 = grads(False), grads(True), grads(True)
    for name, f, a, b, low, exact in zip("dq dk dv".split(), fast, det, det2,
                                         (ql.grad, kl.grad, vl.grad), (q64.grad, k64.grad,
                                                                       v64.grad), strict=True):
        assert torch.equal(a, b), name  # deterministic=True is bitwise repeatable
        assert_lowp_close(f, low, exact, "fast " + name)
        assert_lowp_close(a, low, exact, "deterministic " + name)
        # the two paths agree as closely as each agrees with the exact gradient
        baseline = max_err(low, exact)
        assert max_err(f, a) <= 2 * baseline + 2e-3, (name, max_err(f, a), baseline)


def test_strided_inputs_and_unaligned_head_dim():
    qkv = torch.randn(2, 50, 3, 4, 72, dtype=torch.float16, device=DEVICE)
    q, k, v = qkv.unbind(2)
    out = flash_attention(q, k, v, causal=True)
    ref = flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    assert torch.equal(out, ref)
    odd = [t[..., :13] for t in (q, k, v)]  # head dim 13: padded to 16 by the wrapper
    out = flash_attention(*odd)
    exact, _ = attention_reference(*(t.cpu().double() for t in odd))
    naive, _ = attention_reference(*(t.cpu().float() for t in odd))
    assert_lowp_close(out, naive.half(), exact, "d=13")


def test_non_default_stream_and_cuda_graph():
    q, k, v = (t.to(DEVICE) for t in make_case(2, 256, 256, 4, 4, 64, torch.float16, 5))
    eager = flash_attention(q, k, v, causal=True)
    stream = torch.cuda.Stream(device=DEVICE)
    stream.wait_stream(torch.cuda.current_stream(DEVICE))
    with torch.cuda.stream(stream):
        side = flash_attention(q, k, v, causal=True)
    torch.cuda.current_stream(DEVICE).wait_stream(stream)
    assert torch.equal(side, eager)

    # the default backward sums dq with float32 atomics; with Sk = 256 every dq element gets
    # two partial sums (two 128-key blocks), whose sum does not depend on their order, so the
    # graph replay and the eager run below still agree bitwise
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    warm = torch.cuda.Stream(device=DEVICE)
    warm.wait_stream(torch.cuda.current_stream(DEVICE))
    with torch.cuda.stream(warm):
        flash_attention(qg, kg, vg, causal=True).sum().backward()
    torch.cuda.current_stream(DEVICE).wait_stream(warm)
    qg.grad = kg.grad = vg.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(DEVICE), torch.cuda.graph(graph):
        out = flash_attention(qg, kg, vg, causal=True)
        out.sum().backward()
    graph.replay()
    torch.cuda.synchronize(DEVICE)
    assert torch.equal(out, eager)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    flash_attention(*ref, causal=True).sum().backward()
    for a, b in zip((qg, kg, vg), ref, strict=True):
        assert torch.equal(a.grad, b.grad)


def test_float32_is_refused():
    q, k, v = (t.to(DEVICE) for t in make_case(1, 8, 8, 2, 2, 16, torch.float32, 1))
    with pytest.raises(NotImplementedError, match="CUDA"):
        flash_attention(q, k, v)


def test_opcheck():
    q, k, v = (t.to(DEVICE).requires_grad_() for t in make_case(1, 20, 24, 4, 2, 32,
                                                              torch.float16, 10))
    args = (q, k, v, 1 / math.sqrt(32), 0.0, -1, 0, None, 0.0, None, False)
    torch.library.opcheck(lutflash.attention._flash_attention_op, args)


# Decode (split-KV, cuda/attention_decode.cuh attn_decode_kernel): up to 16 query rows, plain
# scores. The cases reach one split (direct write) and many (workspace records + combine),
# several row groups, GQA groups and masks that leave whole splits empty.
DECODE_CASES = [  # (batch, Sq, Sk, Hq, Hkv, d, dtype, causal, window)
    (1, 1, 5000, 8, 2, 128, torch.bfloat16, False, (-1, -1)),
    (2, 4, 3000, 8, 1, 64, torch.float16, True, (-1, -1)),
    (1, 16, 1000, 4, 4, 96, torch.bfloat16, False, (100, 0)),
    (3, 1, 200, 6, 6, 256, torch.float16, False, (-1, -1)),
    (1, 2, 777, 4, 2, 40, torch.bfloat16, True, (-1, -1)),
    (1, 3, 4100, 32, 8, 128, torch.float16, False, (-1, 2)),
    (2, 1, 20000, 4, 1, 32, torch.bfloat16, False, (-1, -1)),
]


@pytest.fixture
def poison_all(monkeypatch):
    """Like poison, and the byte workspace filled with 0xff (float32 NaN) too, so that a
    workspace record the combine reads without the decode kernel writing it shows."""
    poisoned_empty(monkeypatch, workspaces=True)


@pytest.mark.parametrize("n", range(len(DECODE_CASES)))
def test_decode_matches_reference(poison_all, n):
    batch, sq, sk, hq, hkv, d, dtype, causal, window = DECODE_CASES[n]
    q, k, v = make_case(batch, sq, sk, hq, hkv, d, dtype, seed=100 + n)
    out, lse = flash_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), causal=causal, window=window,
                               return_lse=True)
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), causal=causal,
                                       window=window)
    naive, _ = attention_reference(q.float(), k.float(), v.float(), causal=causal,
                                   window=window)
    assert_lowp_close(out, naive.to(dtype), ref, "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert torch.allclose(lse.cpu().double()[finite], ref_lse[finite], atol=2e-3, rtol=1e-3)
    # the tiled kernel (variant 1 skips the decode path) agrees too
    tiled, tiled_lse = lutflash.attention._forward(
        q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), None, None, 0, 0, 1.0 / math.sqrt(d), 0.0,
        window[0], 0 if causal else window[1], None, 0.0, None, variant=1)
    assert_lowp_close(tiled, naive.to(dtype), ref, "tiled")
    assert torch.allclose(tiled_lse[finite.to(DEVICE)], lse[finite.to(DEVICE)], atol=1e-3, rtol=1e-4)


def test_decode_varlen(poison_all):
    lengths_q, lengths_k = [1, 0, 3, 16, 2], [3000, 5, 0, 700, 1]
    heads_q, heads_kv, d, dtype = 8, 2, 128, torch.bfloat16
    g = torch.Generator().manual_seed(9)
    q = torch.randn(sum(lengths_q), heads_q, d, generator=g).to(dtype)
    k = torch.randn(sum(lengths_k), heads_kv, d, generator=g).to(dtype)
    v = torch.randn(sum(lengths_k), heads_kv, d, generator=g).to(dtype)
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32)
    for causal in (False, True):
        out, lse = flash_attention_varlen(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE),
                                          cu_q.to(DEVICE), cu_k.to(DEVICE),
                                          max(lengths_q), max(lengths_k), causal=causal,
                                          return_lse=True)
        out, lse = out.cpu(), lse.cpu()
        for b in range(len(lengths_q)):
            qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            if lengths_q[b] == 0:
                continue
            ref, ref_lse = attention_reference(q[qs].double()[None], k[ks].double()[None],
                                               v[ks].double()[None], causal=causal)
            naive, _ = attention_reference(q[qs].float()[None], k[ks].float()[None],
                                           v[ks].float()[None], causal=causal)
            assert_lowp_close(out[qs][None], naive.to(dtype), ref, f"b={b}")
            got = lse[:, qs].double()
            finite = torch.isfinite(ref_lse[0])
            assert torch.equal(torch.isfinite(got), finite), b
            assert torch.allclose(got[finite], ref_lse[0][finite], atol=2e-3, rtol=1e-3), b
            assert torch.all(out[qs][~finite.T] == 0)


def test_decode_cuda_graph():
    """Captured with many splits (the combine a programmatic dependent launch on sm_90) and
    replayed twice on new inputs: every replay recomputes from what the inputs hold then."""
    q, k, v = (t.to(DEVICE) for t in make_case(1, 1, 8192, 16, 4, 128, torch.bfloat16, 11))
    graph = torch.cuda.CUDAGraph()
    warm = torch.cuda.Stream(device=DEVICE)
    warm.wait_stream(torch.cuda.current_stream(DEVICE))
    with torch.cuda.stream(warm):
        flash_attention(q, k, v)
    torch.cuda.current_stream(DEVICE).wait_stream(warm)
    with torch.cuda.device(DEVICE), torch.cuda.graph(graph):
        out = flash_attention(q, k, v)
    for seed in (12, 13):
        for t, new in zip((q, k, v), make_case(1, 1, 8192, 16, 4, 128, torch.bfloat16, seed),
                          strict=True):
            t.copy_(new)
        eager = flash_attention(q, k, v)
        graph.replay()
        torch.cuda.synchronize(DEVICE)
        assert torch.equal(out, eager), seed


@pytest.mark.parametrize("sk,window", [(64, (-1, -1)), (300, (-1, -1)), (1000, (-1, -1)),
                                       (4096, (-1, -1)), (9000, (-1, -1)), (40000, (-1, -1)),
                                       (9000, (100, 0)), (20000, (3000, 0))])
def test_decode_split_counts(poison_all, sk, window):
    """The decode path's split counts as the shapes give them (2 CTAs without splits, so up to
    half the SM count): one split (direct write), a few, more than 32 (the combine's lanes hold
    several weights each), and windows that leave trailing splits without keys."""
    batch, sq, hq, hkv, d, dtype = 1, 2, 8, 2, 128, torch.float16
    q, k, v = make_case(batch, sq, sk, hq, hkv, d, dtype, seed=sk)
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), window=window)
    naive, _ = attention_reference(q.float(), k.float(), v.float(), window=window)
    out, lse = flash_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), window=window,
                               return_lse=True)
    assert_lowp_close(out, naive.to(dtype), ref, f"sk={sk}")
    assert torch.allclose(lse.cpu().double(), ref_lse, atol=2e-3, rtol=1e-3), sk


@pytest.mark.parametrize("variant", [1, 2, 3])
@pytest.mark.parametrize("d", [64, 128])
def test_forward_tile_variants(variant, d):
    """The alternative tile shapes (csrc/attention.c passes the variant to the CUDA forward)."""
    q, k, v = make_case(2, 300, 333, 4, 2, d, torch.float16, seed=variant * 7 + d)
    for causal in (False, True):
        out, lse = lutflash.attention._forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), None, None, 0, 0,
                                               1.0 / math.sqrt(d), 0.0, -1, 0 if causal else -1,
                                               None, 0.0, None, variant=variant)
        ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), causal=causal)
        naive, _ = attention_reference(q.float(), k.float(), v.float(), causal=causal)
        assert_lowp_close(out, naive.to(torch.float16), ref, f"variant={variant}")
        assert torch.allclose(lse.cpu().double(), ref_lse, atol=2e-3, rtol=1e-3)


def test_gpu_offsets_outside_the_packed_tensors_are_clamped():
    # cu_seqlens on the GPU are not read on the host (that would synchronize): offsets outside
    # [0, total] must neither crash nor touch memory outside the tensors
    q, k, v = (torch.randn(40, 2, 64, device=DEVICE, dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    bad = torch.tensor([-7, 20, 100000], dtype=torch.int32, device=DEVICE)
    out = flash_attention_varlen(q, k, v, bad, bad, 100000, 100000)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize(DEVICE)
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
