"""Attention sinks (`sinks=`, gpt-oss's s_aux): one logit per query head in every row's softmax
denominator, with no value. Forward (out, lse) and gradients (q, k, v and the sinks) against
the float64 reference of lutflash.testing.attention_reference, on random cases across the
options (GQA, causal, windows, softcap, ALiBi, Sq > Sk rows that see no key, varlen), CPU and
CUDA; bad inputs."""

import math
import random

import pytest
import torch

from lutflash import flash_attention, flash_attention_varlen
from lutflash.attention import _flash_attention_op
from lutflash.testing import attention_reference


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def random_case(rng: random.Random, device_type: str):
    heads_kv = rng.choice([1, 2, 3])
    heads_q = heads_kv * rng.choice([1, 2, 4])
    d = rng.choice([8, 16, 64, 128] if device_type == "cuda" else [1, 5, 16, 40, 64])
    sq = rng.choice([1, 1, 3, 17, 64])
    sk = rng.choice([1, 9, 70, 200])
    causal = rng.random() < 0.5
    window = (rng.choice([-1, 0, 5, 40]), rng.choice([-1, 0, 3])) if rng.random() < 0.3 else (-1, -1)
    softcap = rng.choice([0.0, 0.0, 5.0])
    alibi = rng.random() < 0.2
    scale = rng.choice([None, 0.3])
    sink_scale = rng.choice([0.5, 3.0, 20.0])  # from barely to fully dominant sinks
    return dict(batch=rng.choice([1, 2, 3]), heads_q=heads_q, heads_kv=heads_kv, d=d, sq=sq, sk=sk,
                causal=causal, window=window, softcap=softcap, alibi=alibi, scale=scale,
                sink_scale=sink_scale)


def make_inputs(case, dtype, device, gen):
    b, hq, hkv, d = case["batch"], case["heads_q"], case["heads_kv"], case["d"]
    q = torch.randn(b, case["sq"], hq, d, generator=gen).to(device, dtype)
    k = torch.randn(b, case["sk"], hkv, d, generator=gen).to(device, dtype)
    v = torch.randn(b, case["sk"], hkv, d, generator=gen).to(device, dtype)
    sinks = (torch.randn(hq, generator=gen) * case["sink_scale"]).to(device)
    alibi = torch.rand(hq, generator=gen).to(device) * 0.3 if case["alibi"] else None
    return q, k, v, sinks, alibi


def options(case, alibi):
    return dict(causal=case["causal"], window=case["window"], softcap=case["softcap"],
                alibi_slopes=alibi, softmax_scale=case["scale"])


def reference(q, k, v, sinks, case, alibi):
    return attention_reference(q, k, v, causal=case["causal"], scale=case["scale"],
                               window=case["window"], softcap=case["softcap"],
                               alibi=None if alibi is None else alibi.double(), sinks=sinks)


def check_case(case, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, sinks, alibi = make_inputs(case, dtype, device, gen)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, sinks)]
    out, lse = flash_attention(*leaves[:3], **options(case, alibi), sinks=leaves[3],
                               return_lse=True)
    ref_leaves = [t.detach().double().cpu().requires_grad_(True) for t in (q, k, v, sinks)]
    ref, ref_lse = reference(*ref_leaves, case, None if alibi is None else alibi.cpu())
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert rel(out.cpu(), ref) < tol, case
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=tol * 10, rtol=tol)
    grad = torch.randn(out.shape, generator=gen).to(device, dtype)
    dlse = torch.randn(lse.shape, generator=gen).to(device)
    torch.autograd.backward((out, lse), (grad, dlse))
    torch.autograd.backward((ref, ref_lse), (grad.cpu().double(), dlse.cpu().double()))
    for name, ours, theirs in zip("q k v sinks".split(), leaves, ref_leaves, strict=True):
        scale = theirs.grad.norm()
        err = (ours.grad.cpu().double() - theirs.grad).norm()
        assert err <= 10 * tol * scale + 1e-6, (name, float(err), float(scale), case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinks_random_cases_cpu(dtype):
    rng = random.Random(7 if dtype == torch.float32 else 8)
    for index in range(40 if dtype == torch.float32 else 15):
        check_case(random_case(rng, "cpu"), dtype, "cpu", seed=index)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sinks_random_cases_cuda(dtype, cuda_device):
    rng = random.Random(17 if dtype == torch.float16 else 18)
    for index in range(40):
        check_case(random_case(rng, "cuda"), dtype, cuda_device, seed=index)


@pytest.mark.cuda
@pytest.mark.parametrize("sk", [4096, 20000])
def test_sinks_decode_splits_cuda(sk, cuda_device):
    """Sq = 1 over long keys takes the split-KV decode path: the sink joins in the combine."""
    case = dict(batch=2, heads_q=8, heads_kv=2, d=128, sq=1, sk=sk, causal=True,
                window=(-1, -1), softcap=0.0, alibi=False, scale=None, sink_scale=3.0)
    check_case(case, torch.float16, cuda_device, seed=sk)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_sinks_varlen(device):
    gen = torch.Generator().manual_seed(3)
    dtype = torch.float32 if device == "cpu" else torch.float16
    lengths_q, lengths_k = [3, 0, 5, 1], [4, 2, 7, 0]
    cu_q = torch.tensor([0] + list(torch.tensor(lengths_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lengths_k).cumsum(0)), dtype=torch.int32)
    # two padding rows past the last sequence of q: they belong to no sequence
    q = torch.randn(sum(lengths_q) + 2, 4, 16, generator=gen).to(device, dtype)
    k = torch.randn(sum(lengths_k), 2, 16, generator=gen).to(device, dtype)
    v = torch.randn(sum(lengths_k), 2, 16, generator=gen).to(device, dtype)
    sinks = torch.randn(4, generator=gen).to(device).requires_grad_(True)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = flash_attention_varlen(*leaves, cu_q.to(device), cu_k.to(device), 5, 7,
                                      causal=True, sinks=sinks, return_lse=True)
    ref_sinks = sinks.detach().double().cpu().requires_grad_(True)
    grad = torch.randn(out.shape, generator=gen).to(device, dtype)
    out.backward(grad)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    ref_sink_grad = torch.zeros(4, dtype=torch.float64)
    for b in range(4):
        qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        s = ref_sinks.detach().clone().requires_grad_(True)
        ref, ref_lse = attention_reference(
            *(t.detach().double().cpu()[None, idx] for t, idx in ((q, qs), (k, ks), (v, ks))),
            causal=True, sinks=s)
        assert rel(out[qs].detach().cpu(), ref[0]) < tol or ref.numel() == 0
        torch.testing.assert_close(lse[:, qs].detach().cpu().double(), ref_lse[0], atol=tol * 10,
                                   rtol=tol)
        ref.backward(grad[qs].double().cpu()[None])
        ref_sink_grad += s.grad
    assert float((out[-2:] == 0).all()) and bool(torch.isneginf(lse[:, -2:]).all())
    torch.testing.assert_close(sinks.grad.cpu().double(), ref_sink_grad, atol=tol * 10, rtol=tol * 10)


def test_sinks_empty_rows_give_zero_and_the_sink():
    """A row that sees no key: output 0, lse = its head's sink."""
    q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    sinks = torch.tensor([0.5, -2.0])
    out, lse = flash_attention(q, k, v, causal=True, sinks=sinks, return_lse=True)
    # Sq = 4 > Sk = 2, bottom-right causal: rows 0 and 1 see nothing
    assert bool((out[:, :2] == 0).all())
    torch.testing.assert_close(lse[0, :, :2], sinks[:, None].expand(2, 2))


def test_sinks_opcheck():
    q, k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 6, 1, 8), torch.randn(1, 6, 1, 8)
    sinks = torch.randn(2, requires_grad=True)
    torch.library.opcheck(_flash_attention_op,
                          (q.requires_grad_(), k, v, 0.3, 0.0, -1, 0, None, 0.0, None, False,
                           sinks))


@pytest.mark.parametrize("sinks, error, match", [
    ([0.0, 1.0], TypeError, "sinks: expected a torch.Tensor"),
    (torch.zeros(2, dtype=torch.float64), TypeError, "sinks: expected dtype float32"),
    (torch.zeros(3), ValueError, r"sinks: expected shape \(2,\)"),
    (torch.zeros(1, 2), ValueError, r"sinks: expected shape \(2,\)"),
    (torch.tensor([0.0, math.inf]), ValueError, "sinks: expected finite values"),
    (torch.tensor([math.nan, 0.0]), ValueError, "sinks: expected finite values"),
])
def test_sinks_bad_inputs(sinks, error, match):
    q, k, v = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8)
    with pytest.raises(error, match=match):
        flash_attention(q, k, v, sinks=sinks)


@pytest.mark.cuda
def test_sinks_on_another_device(cuda_device):
    q, k, v = (torch.randn(1, 3, 2, 8, device=cuda_device, dtype=torch.float16) for _ in range(3))
    with pytest.raises(ValueError, match="sinks: expected a tensor on"):
        flash_attention(q, k, v, sinks=torch.zeros(2))


@pytest.mark.parametrize("page_size", [None, 3])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_sinks_kvcache(device, page_size):
    """flash_attention_with_kvcache with sinks: each sequence against the reference over its
    valid keys (after the append), dense and paged caches."""
    from lutflash import flash_attention_with_kvcache

    gen = torch.Generator().manual_seed(11)
    dtype = torch.float32 if device == "cpu" else torch.float16
    batch, sq, hq, hkv, d, capacity = 3, 2, 4, 2, 16, 12
    lengths = torch.tensor([0, 4, 10], dtype=torch.int32)  # cached keys before the call
    kc = torch.randn(batch, capacity, hkv, d, generator=gen).to(device, dtype)
    vc = torch.randn(batch, capacity, hkv, d, generator=gen).to(device, dtype)
    q = torch.randn(batch, sq, hq, d, generator=gen).to(device, dtype)
    k = torch.randn(batch, sq, hkv, d, generator=gen).to(device, dtype)
    v = torch.randn(batch, sq, hkv, d, generator=gen).to(device, dtype)
    sinks = (torch.randn(hq, generator=gen) * 2).to(device)
    kwargs = dict(cache_seqlens=lengths.to(device), causal=True, sinks=sinks, return_lse=True)
    if page_size is None:
        out, lse = flash_attention_with_kvcache(q, kc, vc, k, v, **kwargs)
        keys, values = kc, vc
    else:
        pages = capacity // page_size
        order = torch.randperm(batch * pages, generator=gen)
        table = order.view(batch, pages).to(torch.int32)
        kp = torch.empty(batch * pages, page_size, hkv, d, dtype=dtype, device=device)
        vp = torch.empty_like(kp)
        kp[order] = kc.reshape(batch * pages, page_size, hkv, d)
        vp[order] = vc.reshape(batch * pages, page_size, hkv, d)
        out, lse = flash_attention_with_kvcache(q, kp, vp, k, v, block_table=table.to(device),
                                                **kwargs)
        keys = kp[order].reshape(batch, capacity, hkv, d)
        values = vp[order].reshape(batch, capacity, hkv, d)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for b in range(batch):
        valid = int(lengths[b]) + sq
        assert torch.equal(keys[b, int(lengths[b]):valid].cpu(), k[b].cpu())
        ref, ref_lse = attention_reference(q[b:b + 1].double().cpu(),
                                           keys[b:b + 1, :valid].double().cpu(),
                                           values[b:b + 1, :valid].double().cpu(), causal=True,
                                           sinks=sinks.double().cpu())
        assert rel(out[b:b + 1].cpu(), ref) < tol
        torch.testing.assert_close(lse[b:b + 1].cpu().double(), ref_lse, atol=tol * 10, rtol=tol)


def test_sinks_kvcache_bad_input():
    from lutflash import flash_attention_with_kvcache

    q, kc = torch.randn(1, 1, 2, 8), torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match=r"sinks: expected shape \(2,\)"):
        flash_attention_with_kvcache(q, kc, kc.clone(), cache_seqlens=2, sinks=torch.zeros(3))
