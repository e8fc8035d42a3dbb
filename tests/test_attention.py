"""flash_attention on the CPU against a float64 reference (DESIGN.md, "Numerical checks")."""

import math

import pytest
import torch

import lutflash
from lutflash import _C, flash_attention, flash_attention_varlen
from lutflash.attention import _backward, _forward
from lutflash.testing import MASK32, attention_reference, dropout_keep, philox4x32_10


def random_qkv(batch, seqlen_q, seqlen_k, heads_q, heads_kv, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen_q, heads_q, d, generator=g)
    k = torch.randn(batch, seqlen_k, heads_kv, d, generator=g)
    v = torch.randn(batch, seqlen_k, heads_kv, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def grad_close(a, b, rtol=2e-5):
    """‖a − b‖ ≤ rtol·(‖b‖ + √numel): relative, with an absolute floor of rtol per element for
    gradients that are exactly 0 in exact arithmetic (a one-key window) but not in fp32."""
    err = (a.double() - b.double()).norm().item()
    return err <= rtol * (b.double().norm().item() + math.sqrt(b.numel()))


# ------------------------------------------------------------------------------------------
# Philox.

def test_philox_known_answers():
    # Known-answer vectors of Random123 (kat_vectors, philox4x32_10).
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, expected in cases:
        words = philox4x32_10([torch.tensor(c) for c in counter], *key)
        assert tuple(w.item() for w in words) == expected


# ------------------------------------------------------------------------------------------
# Forward.

@pytest.mark.parametrize("variant", [0, 1])
@pytest.mark.parametrize("d", [1, 16, 40, 64, 128, 256])
def test_forward_fp32_matches_reference(d, variant):
    q, k, v = random_qkv(2, 70, 131, 4, 2, d, seed=d)
    out = torch.full_like(q, math.nan)
    lse = torch.full((2, 4, 70), math.nan)
    threads = torch.get_num_threads()
    ws = torch.empty(_C.attention_workspace_bytes(False, d, False, threads, 4, 2, 140),
                     dtype=torch.uint8)
    _C.attention_forward(q, k, v, None, None, None, None, out, lse, ws, None, 0, 0,
                         1 / math.sqrt(d), 0.0, -1, -1, 0.0, threads, variant, 0)
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double())
    assert rel_err(out, ref) < 1e-5
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def check_lowp(out, ref64, q, k, v, **kw):
    """FlashAttention's criterion: error vs float64 within 2x the naive low-precision error."""
    naive, _ = attention_reference(q, k, v, **kw)
    ours = (out.double() - ref64).abs().max().item()
    baseline = (naive.double() - ref64).abs().max().item()
    assert ours <= 2 * baseline + 1e-3, (ours, baseline)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_low_precision(poison, dtype, causal):
    q, k, v = random_qkv(2, 96, 150, 4, 4, 64, dtype=dtype, seed=3)
    out = flash_attention(q, k, v, causal=causal)
    assert out.dtype == dtype
    ref, _ = attention_reference(q.double(), k.double(), v.double(), causal=causal)
    check_lowp(out, ref, q, k, v, causal=causal)


# The feature grid: every value of every axis appears (the first len(values) cases run
# through them); combinations are varied by shifting each axis per case and per cycle.
AXES = {
    "causal": [False, True],
    "window": [(-1, -1), (20, -1), (7, 3), (0, 0), (-1, 5)],
    "softcap": [0.0, 4.0],
    "alibi": [None, "heads", "batch_heads"],
    "heads": [(4, 4), (4, 2), (6, 1)],
    "seqlens": [(37, 37), (29, 140), (130, 33), (64, 64), (1, 70)],
    "dropout_p": [0.0, 0.3],
    "d": [8, 40, 64, 96],
}
GRID = [{name: values[(n + a + n // len(values)) % len(values)]
         for a, (name, values) in enumerate(AXES.items())} for n in range(12)]


def grid_case(case, dtype=torch.float32, seed=0):
    heads_q, heads_kv = case["heads"]
    seqlen_q, seqlen_k = case["seqlens"]
    batch = 2
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, heads_q, heads_kv, case["d"], dtype, seed)
    alibi = None
    if case["alibi"] == "heads":
        alibi = torch.rand(heads_q) * 0.5
    elif case["alibi"] == "batch_heads":
        alibi = torch.rand(batch, heads_q) * 0.5
    kwargs = dict(causal=case["causal"], window=case["window"], softcap=case["softcap"],
                  alibi_slopes=alibi, dropout_p=case["dropout_p"])
    seed_pair = (12345 + seed, 7)
    ref_kwargs = dict(causal=case["causal"], window=case["window"], softcap=case["softcap"],
                      alibi=alibi, dropout_p=case["dropout_p"])
    if case["dropout_p"] > 0:
        kwargs["seed"] = seed_pair
        ref_kwargs["keep"] = dropout_keep(*seed_pair, batch, heads_q, seqlen_q, seqlen_k,
                                          case["dropout_p"])
    return q, k, v, kwargs, ref_kwargs


def test_grid_covers_every_value():
    for name, values in AXES.items():
        assert {repr(c[name]) for c in GRID} == {repr(x) for x in values}, name


@pytest.mark.parametrize("case", GRID, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_forward_and_gradients_match_reference(poison, case):
    q, k, v, kwargs, ref_kwargs = grid_case(case)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out, lse = flash_attention(q, k, v, return_lse=True, **kwargs)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_reference(q64, k64, v64, **ref_kwargs)
    assert rel_err(out, ref) < 1e-5
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse.double()[finite], ref_lse[finite], atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad.double())
    for name, ours, theirs in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad),
                               ("dv", v.grad, v64.grad)):
        assert grad_close(ours, theirs), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gradients_low_precision(poison, dtype):
    case = dict(GRID[1])
    q, k, v, kwargs, ref_kwargs = grid_case(case, dtype=dtype, seed=5)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out = flash_attention(q, k, v, **kwargs)
    grad = torch.randn_like(out)
    out.backward(grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64, **ref_kwargs)
    ref.backward(grad.double())
    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
    naive, _ = attention_reference(ql, kl, vl, **ref_kwargs)
    naive.backward(grad)
    for ours, low, exact in ((q.grad, ql.grad, q64.grad), (k.grad, kl.grad, k64.grad),
                             (v.grad, vl.grad, v64.grad)):
        assert ours.dtype == dtype
        err = (ours.double() - exact).abs().max().item()
        baseline = (low.double() - exact).abs().max().item()
        assert err <= 2 * baseline + 1e-3, (err, baseline)


def test_lse_gradient(poison):
    q, k, v = random_qkv(1, 40, 50, 2, 2, 32, seed=9)
    q.requires_grad_(), k.requires_grad_()
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    (out.sum() + lse.sum()).backward()
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    ref, ref_lse = attention_reference(q64, k64, v.double(), causal=True)
    (ref.sum() + ref_lse.sum()).backward()
    assert grad_close(q.grad, q64.grad) and grad_close(k.grad, k64.grad)


def test_portable_backward_matches_reference():
    q, k, v, kwargs, ref_kwargs = grid_case(GRID[3], seed=2)
    args = (None, None, 0, 0, 1 / math.sqrt(q.shape[-1]), kwargs["softcap"],
            kwargs["window"][0], 0 if kwargs["causal"] else kwargs["window"][1],
            kwargs["alibi_slopes"], kwargs["dropout_p"],
            torch.tensor(kwargs["seed"]) if "seed" in kwargs else None)
    out, lse = _forward(q, k, v, *args, variant=1)
    grad = torch.randn_like(out)
    dq, dk, dv = _backward(grad, q, k, v, out, lse, None, *args, variant=1)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64, **ref_kwargs)
    ref.backward(grad.double())
    assert rel_err(out, ref) < 1e-5
    for ours, theirs in ((dq, q64.grad), (dk, k64.grad), (dv, v64.grad)):
        assert grad_close(ours, theirs)


def test_strided_inputs(poison):
    base = torch.randn(2, 50, 3, 6, 32)
    q, k, v = base[:, :, 0, ::2], base[:, :, 1, 1::2], base[:, :, 2, :3]
    assert not q.is_contiguous()
    out = flash_attention(q, k, v, causal=True)
    ref, _ = attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert rel_err(out, ref) < 1e-5
    # A transposed last dimension is copied, not refused.
    qt = torch.randn(2, 32, 3, 50).permute(0, 3, 2, 1)
    assert rel_err(flash_attention(qt, k, v), attention_reference(qt.double(), k.double(),
                                                                  v.double())[0]) < 1e-5


def test_fully_masked_rows(poison):
    # Sq > Sk with causal: the first Sq - Sk queries see no key.
    q, k, v = random_qkv(1, 30, 10, 2, 2, 16, seed=4)
    for t in (q, k, v):
        t.requires_grad_()
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    assert torch.all(out[:, :20] == 0) and torch.all(lse[:, :, :20] == -math.inf)
    assert torch.isfinite(lse[:, :, 20:]).all()
    out.sum().backward()
    assert torch.all(q.grad[:, :20] == 0) and torch.isfinite(k.grad).all()
    # A window that excludes every key.
    out, lse = flash_attention(q, k, v, window=(0, 0), return_lse=True)
    assert torch.all(out[:, :20] == 0) and torch.all(lse[:, :, :20] == -math.inf)


@pytest.mark.parametrize("shape", [(0, 5, 5), (2, 0, 5), (2, 5, 0), (2, 0, 0)])
def test_empty(shape):
    batch, seqlen_q, seqlen_k = shape
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, 2, 1, 8)
    for t in (q, k, v):
        t.requires_grad_()
    out, lse = flash_attention(q, k, v, return_lse=True)
    assert out.shape == q.shape and lse.shape == (batch, 2, seqlen_q)
    assert torch.all(out == 0) and torch.all(lse == -math.inf)
    out.sum().backward()
    for t in (q, k, v):
        assert torch.all(t.grad == 0)


# ------------------------------------------------------------------------------------------
# Dropout.

def test_dropout_mask_matches_philox_and_is_reproducible():
    # v = identity (Sk = D): out[b, i, h, j] = P[i, j] * keep[i, j] / (1 - p), so the kernel's
    # mask is visible in the output.
    batch, heads, seqlen_q, seqlen_k, p = 2, 3, 70, 128, 0.25
    q, k, _ = random_qkv(batch, seqlen_q, seqlen_k, heads, heads, seqlen_k, seed=6)
    v = torch.eye(seqlen_k).view(1, seqlen_k, 1, seqlen_k).expand(batch, -1, heads, -1)
    out = flash_attention(q, k, v.contiguous(), dropout_p=p, seed=(99, 5))
    kernel_keep = (out != 0).permute(0, 2, 1, 3)
    assert torch.equal(kernel_keep, dropout_keep(99, 5, batch, heads, seqlen_q, seqlen_k, p))
    again = flash_attention(q, k, v.contiguous(), dropout_p=p, seed=(99, 5))
    assert torch.equal(out, again)
    other = flash_attention(q, k, v.contiguous(), dropout_p=p, seed=(99, 6))
    assert not torch.equal(out, other)
    keep_rate = kernel_keep.double().mean().item()
    assert abs(keep_rate - (1 - p)) < 0.01


def test_dropout_generator_is_reproducible():
    q, k, v = random_qkv(1, 40, 40, 2, 2, 16, seed=7)
    a = flash_attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(1))
    b = flash_attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(1))
    c = flash_attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3)
    d = flash_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    assert torch.equal(d, flash_attention(q, k, v, dropout_p=0.5))


# ------------------------------------------------------------------------------------------
# Varlen.

@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (9, 2))])
def test_varlen_matches_dense_per_sequence(poison, causal, window):
    lengths_q, lengths_k = [5, 0, 70, 33], [9, 4, 65, 33]
    heads_q, heads_kv, d = 4, 2, 24
    g = torch.Generator().manual_seed(8)
    q = torch.randn(sum(lengths_q), heads_q, d, generator=g, requires_grad=True)
    k = torch.randn(sum(lengths_k), heads_kv, d, generator=g, requires_grad=True)
    v = torch.randn(sum(lengths_k), heads_kv, d, generator=g, requires_grad=True)
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32)
    alibi = torch.rand(len(lengths_q), heads_q)
    out, lse = flash_attention_varlen(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k),
                                      causal=causal, window=window, alibi_slopes=alibi,
                                      dropout_p=0.2, seed=4, return_lse=True)
    grad = torch.randn_like(out)
    out.backward(grad)
    for b in range(len(lengths_q)):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        q64, k64, v64 = (t[s].detach().double()[None].requires_grad_()
                         for t, s in ((q, qs), (k, ks), (v, ks)))
        keep = dropout_keep(4, 0, len(lengths_q), heads_q, lengths_q[b], lengths_k[b], 0.2)[b:b+1]
        ref, ref_lse = attention_reference(q64, k64, v64, causal=causal, window=window,
                                           alibi=alibi[b], keep=keep, dropout_p=0.2)
        if lengths_q[b] == 0:
            continue
        assert rel_err(out[qs], ref[0]) < 1e-5
        finite = torch.isfinite(ref_lse[0])
        assert torch.allclose(lse[:, qs].double()[finite], ref_lse[0][finite], atol=1e-5)
        ref.backward(grad[qs].double()[None])
        assert grad_close(q.grad[qs], q64.grad[0])
        assert grad_close(k.grad[ks], k64.grad[0])
        assert grad_close(v.grad[ks], v64.grad[0])


# ------------------------------------------------------------------------------------------
# torch integration.

def test_opcheck():
    q, k, v = random_qkv(1, 20, 24, 4, 2, 16, seed=10)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.lutflash.flash_attention.default,
                          (q, k, v, 0.25, 0.0, -1, 0, None, 0.0, None, False))
    torch.library.opcheck(torch.ops.lutflash.flash_attention.default,
                          (q, k, v, 0.25, 2.0, 5, 0, torch.rand(4), 0.3, torch.tensor([1, 2]),
                           True))
    cu = torch.tensor([0, 8, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 10, 24], dtype=torch.int32)
    torch.library.opcheck(torch.ops.lutflash.flash_attention_varlen.default,
                          (q[0], k[0], v[0], cu, cu_k, 12, 14, 0.25, 0.0, -1, -1, None, 0.0,
                           None, False))
    out, lse = torch.ops.lutflash.flash_attention(q, k, v, 0.25, 0.0, -1, 0, None, 0.0, None,
                                                  False)
    torch.library.opcheck(torch.ops.lutflash.flash_attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                           out.detach(), lse.detach(), None, None, None, 0, 0, 0.25, 0.0, -1,
                           0, None, 0.0, None, True))


def test_torch_compile_fullgraph():
    # Inductor, fullgraph: the fake implementations, the autograd registration and the
    # dropout state drawn from the default generator all trace without a graph break.
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(32, 96)

        def forward(self, x):
            q, k, v = self.proj(x).view(*x.shape[:2], 3, 2, 16).unbind(2)
            return flash_attention(q, k, v, causal=True, dropout_p=0.1).square().sum()

    torch._dynamo.reset()
    block = Block()
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(2, 12, 32)
    torch.manual_seed(11)
    loss = compiled(x)
    loss.backward()
    grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    torch.manual_seed(11)
    eager = block(x)
    eager.backward()
    assert torch.allclose(loss, eager, rtol=1e-5)
    for a, p in zip(grads, block.parameters(), strict=True):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Bad input.

def qkv_small():
    return random_qkv(1, 8, 8, 4, 2, 16)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(window=(-2, 0)), ValueError, "window"),
    (dict(window=(1,)), TypeError, "window"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
    (dict(softmax_scale=math.nan), ValueError, "softmax_scale"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (dict(dropout_p=0.1, seed=-1), ValueError, "seed"),
    (dict(dropout_p=0.1, generator=3), TypeError, "generator"),
    (dict(alibi_slopes=torch.rand(3)), ValueError, "alibi_slopes"),
    (dict(alibi_slopes=torch.rand(4, dtype=torch.float64)), TypeError, "alibi_slopes"),
    (dict(causal=1), TypeError, "causal"),
])
def test_bad_options_raise(kwargs, error, match):
    q, k, v = qkv_small()
    with pytest.raises(error, match=match):
        flash_attention(q, k, v, **kwargs)


def test_bad_tensors_raise():
    q, k, v = qkv_small()
    with pytest.raises(ValueError, match="k: expected a number of kv heads"):
        flash_attention(q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1))
    with pytest.raises(ValueError, match="q: expected a head dim"):
        flash_attention(q[..., :0], k[..., :0], v[..., :0])
    big = torch.randn(1, 2, 1, 257)
    with pytest.raises(ValueError, match="q: expected a head dim"):
        flash_attention(big, big, big)
    with pytest.raises(TypeError, match="k: expected dtype"):
        flash_attention(q, k.half(), v)
    with pytest.raises(TypeError, match="q: expected dtype"):
        flash_attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="v: expected shape"):
        flash_attention(q, k, v[:, :4])
    with pytest.raises(ValueError, match="k: expected batch"):
        flash_attention(q, torch.cat([k, k]), torch.cat([v, v]))
    with pytest.raises(ValueError, match="q: expected a 4-D"):
        flash_attention(q[0], k[0], v[0])
    with pytest.raises(TypeError, match="q: expected a torch.Tensor"):
        flash_attention(q.numpy(), k, v)
    with pytest.raises(ValueError, match="k: expected head dim"):
        flash_attention(q, k[..., :8], v[..., :8])


def test_bad_varlen_raise():
    q, k, v = (t[0] for t in qkv_small())
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    cases = [
        (dict(cu_seqlens_q=cu.long()), TypeError, "cu_seqlens_q: expected dtype int32"),
        (dict(cu_seqlens_k=torch.tensor([0, 5, 3], dtype=torch.int32)), ValueError,
         "cu_seqlens_k: expected non-decreasing"),
        (dict(cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32)), ValueError,
         "cu_seqlens_k: expected shape"),
        (dict(cu_seqlens_q=torch.tensor([0, 3, 9], dtype=torch.int32)), ValueError,
         "cu_seqlens_q: the last offset 9 is beyond"),
        (dict(max_seqlen_q=4), ValueError, "max_seqlen_q: expected at least"),
        (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k"),
        (dict(cu_seqlens_q=cu.view(1, 3)), ValueError, "cu_seqlens_q: expected shape"),
    ]
    for change, error, match in cases:
        args = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=5, max_seqlen_k=5)
        args.update(change)
        with pytest.raises(error, match=match):
            flash_attention_varlen(q, k, v, **args)


def test_c_layer_validates_again():
    q, k, v = qkv_small()
    d, threads = 16, 1
    ws = torch.empty(_C.attention_workspace_bytes(False, d, False, threads, 4, 1, 8),
                     dtype=torch.uint8)
    out, lse = torch.empty_like(q), torch.empty(1, 4, 8)

    def call(**change):
        args = dict(q=q, k=k, v=v, cu_q=None, cu_k=None, alibi=None, rng=None, out=out, lse=lse,
                    ws=ws, sinks=None, max_q=0, max_k=0, scale=0.25, softcap=0.0, left=-1, right=-1,
                    dropout=0.0, threads=threads, variant=0, stream=0)
        args.update(change)
        return _C.attention_forward(*args.values())

    call()
    with pytest.raises(ValueError, match="lse: expected shape"):
        call(lse=torch.empty(1, 4, 7))
    with pytest.raises(TypeError, match="out: expected dtype"):
        call(out=torch.empty_like(q).half())
    with pytest.raises(ValueError, match="workspace: expected at least"):
        call(ws=ws[:64])
    with pytest.raises(ValueError, match="out: must not share memory with q"):
        call(out=q)
    with pytest.raises(ValueError, match="rng_state: required"):
        call(dropout=0.5)
    with pytest.raises(ValueError, match="softmax_scale"):
        call(scale=math.inf)
    with pytest.raises(ValueError, match="window_left"):
        call(left=-2)
    with pytest.raises(ValueError, match="k: expected a number of kv heads"):
        call(k=torch.randn(1, 8, 3, 16), v=torch.randn(1, 8, 3, 16))
    with pytest.raises(ValueError, match="q: expected non-negative strides and a contiguous"):
        call(q=torch.randn(1, 8, 16, 4).transpose(2, 3))
    cu = torch.tensor([0, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_q: the last offset"):
        call(q=q[0], k=k[0], v=v[0], out=out[0], lse=torch.empty(4, 8), cu_q=cu,
             cu_k=torch.tensor([0, 8], dtype=torch.int32), max_q=9, max_k=8)


def test_cuda_tensors_are_refused_cleanly():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    q, k, v = (t.cuda() for t in qkv_small())
    with pytest.raises(RuntimeError, match="CUDA"):
        flash_attention(q, k, v)


def test_packed_rows_outside_cu_seqlens_are_zero():
    # rows 0 and 9 of the packed tensors belong to no sequence
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(10, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    cu = torch.tensor([1, 4, 9], dtype=torch.int32)
    out, lse = lutflash.flash_attention_varlen(q, k, v, cu, cu, 5, 5, return_lse=True)
    assert (out[0] == 0).all() and (out[9] == 0).all()
    assert torch.isinf(lse[:, [0, 9]]).all() and torch.isfinite(lse[:, 1:9]).all()
    out.sum().backward()
    for grad in (q.grad, k.grad, v.grad):
        assert (grad[0] == 0).all() and (grad[9] == 0).all()


def test_scalars_must_survive_float32():
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="softmax_scale"):
        lutflash.flash_attention(q, q, q, softmax_scale=1e39)
    with pytest.raises(ValueError, match="softcap"):
        lutflash.flash_attention(q, q, q, softcap=1e39)
    with pytest.raises(ValueError, match="dropout_p"):
        lutflash.flash_attention(q, q, q, dropout_p=1 - 1e-9)


# ------------------------------------------------------------------------------------------
# Every CPU kernel variant, by the instruction set it runs: a variant this CPU cannot run is
# skipped by name instead of silently testing the portable loops again.

ATTENTION_VARIANTS = {"portable": 1, "avx512": 3}  # attention_cpu.h's variant numbers


@pytest.fixture(params=list(ATTENTION_VARIANTS))
def attention_variant(request):
    name = request.param
    if name == "avx512" and not _C.cpu_features().get("avx512f"):
        pytest.skip("AVX-512 kernel: this CPU has no AVX-512F")
    variant = ATTENTION_VARIANTS[name]
    # the loops that run are the ones named, not a fallback
    assert _C.cpu_kernel_isa("attention", variant) == name
    return variant


def test_best_attention_variant_is_the_widest_the_cpu_has():
    best = "avx512" if _C.cpu_features().get("avx512f") else "portable"
    assert _C.cpu_kernel_isa("attention", 0) == best
    assert _C.cpu_kernel_isa("attention", 1) == "portable"


# Several key blocks (BLOCK_K = 64) per query block, so that the online softmax carries its
# running max and sum across steps; each feature at least once.
VARIANT_CASES = [
    dict(causal=False, window=(-1, -1), softcap=0.0, alibi=None, heads=(4, 2),
         seqlens=(70, 200), dropout_p=0.0, d=64),
    dict(causal=True, window=(-1, -1), softcap=0.0, alibi=None, heads=(4, 4),
         seqlens=(130, 190), dropout_p=0.0, d=40),
    dict(causal=False, window=(50, 10), softcap=4.0, alibi="heads", heads=(6, 1),
         seqlens=(100, 230), dropout_p=0.0, d=96),
    dict(causal=True, window=(-1, -1), softcap=0.0, alibi="batch_heads", heads=(2, 2),
         seqlens=(65, 160), dropout_p=0.3, d=16),
]


def variant_call(case, variant, dtype=torch.float32, seed=0):
    """(q, k, v, the kernel's raw argument tuple, reference kwargs) for _forward/_backward."""
    q, k, v, kwargs, ref_kwargs = grid_case(case, dtype=dtype, seed=seed)
    window = kwargs["window"]
    args = (None, None, 0, 0, 1 / math.sqrt(q.shape[-1]), kwargs["softcap"], window[0],
            0 if kwargs["causal"] else window[1], kwargs["alibi_slopes"], kwargs["dropout_p"],
            torch.tensor(kwargs["seed"]) if "seed" in kwargs else None)
    return q, k, v, args, ref_kwargs


@pytest.mark.parametrize("case", VARIANT_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_each_variant_matches_reference(attention_variant, case):
    q, k, v, args, ref_kwargs = variant_call(case, attention_variant, seed=3)
    out, lse = _forward(q, k, v, *args, variant=attention_variant)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attention_reference(q64, k64, v64, **ref_kwargs)
    assert rel_err(out, ref) < 1e-5
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse.double()[finite], ref_lse[finite], atol=1e-5, rtol=1e-5)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    dq, dk, dv = _backward(grad, q, k, v, out, lse, None, *args, variant=attention_variant)
    ref.backward(grad.double())
    for name, ours, theirs in (("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        assert grad_close(ours, theirs), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", VARIANT_CASES[:2] + VARIANT_CASES[3:],
                         ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_low_precision_is_the_rounded_float32_result(attention_variant, case, dtype):
    """fp16/bf16 inputs are read as the float32 values they hold and every result is rounded
    once, to nearest with ties to even: out, dq, dk and dv equal, bitwise, the float32 kernel
    on the same values rounded by torch. Truncation differs on about half the elements."""
    q, k, v, args, _ = variant_call(case, attention_variant, dtype=dtype, seed=5)
    q32, k32, v32 = (t.float() for t in (q, k, v))
    out, lse = _forward(q, k, v, *args, variant=attention_variant)
    out32, lse32 = _forward(q32, k32, v32, *args, variant=attention_variant)
    assert out.dtype == dtype
    assert torch.equal(lse, lse32)
    # the check means something only if the float32 results need rounding
    assert (out32.to(dtype).float() != out32).double().mean().item() > 0.9
    assert torch.equal(out, out32.to(dtype)), (out != out32.to(dtype)).sum().item()
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    grads = _backward(dout, q, k, v, out, lse, None, *args, variant=attention_variant)
    grads32 = _backward(dout.float(), q32, k32, v32, out.float(), lse, None, *args,
                        variant=attention_variant)
    for name, ours, exact in zip(("dq", "dk", "dv"), grads, grads32, strict=True):
        assert ours.dtype == dtype
        assert torch.equal(ours, exact.to(dtype)), name


@pytest.mark.parametrize("varlen", [False, True])
def test_direct_call_equals_the_op(monkeypatch, varlen):
    # Without a gradient to record, flash_attention skips the dispatcher and runs _forward
    # itself; the result must be the op's, bit for bit, and the op must not be called.
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 7, 4, 32, generator=g) for _ in range(3))
    kw = dict(causal=True, softcap=3.0, window=(4, -1), return_lse=True)
    if varlen:
        cu = torch.tensor([0, 3, 14], dtype=torch.int32)
        args = [t.reshape(14, 4, 32) for t in (q, k, v)] + [cu, cu, 11, 11]
        fn, op = flash_attention_varlen, "_flash_attention_varlen_op"
    else:
        args, fn, op = [q, k, v], flash_attention, "_flash_attention_op"
    with torch.no_grad():
        direct = fn(*args, **kw)
    through_op = fn(*[a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                      else a for a in args], **kw)
    for a, b in zip(direct, through_op, strict=True):
        assert torch.equal(a, b.detach())
    monkeypatch.setattr(lutflash.attention, op, lambda *a, **k: pytest.fail("the op was called"))
    with torch.inference_mode():
        fn(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args], **kw)
