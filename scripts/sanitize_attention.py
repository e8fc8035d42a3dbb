"""A handful of flash_attention calls (forward and backward) on the GPU for compute-sanitizer:

    compute-sanitizer --tool memcheck python scripts/sanitize_attention.py
    compute-sanitizer --tool racecheck python scripts/sanitize_attention.py

    python scripts/sanitize_attention.py --decode   # only the decode-path cases (racecheck)

Every padded head dim, partial tiles, causal with Sq != Sk, windows, GQA, softcap, ALiBi,
dropout and varlen. Outputs are compared with the float64 reference too, so that a silent
wrong answer also fails."""

import sys

import torch

from lutflash import flash_attention, flash_attention_varlen

CASES = [  # (batch, Sq, Sk, Hq, Hkv, d, dtype, options)
    (1, 37, 37, 2, 2, 32, torch.float16, dict()),
    (2, 29, 140, 4, 2, 64, torch.bfloat16, dict(causal=True)),
    (1, 130, 33, 3, 1, 96, torch.float16, dict(window=(7, 3), softcap=4.0)),
    (1, 200, 264, 2, 2, 128, torch.bfloat16, dict(causal=True, dropout_p=0.3, seed=1)),
    (1, 70, 70, 2, 1, 256, torch.float16, dict(window=(20, -1))),
    (2, 65, 65, 2, 2, 40, torch.bfloat16, dict(alibi=True)),
    # decode path (split-KV + combine; one split writing out directly)
    (1, 1, 3000, 8, 2, 128, torch.bfloat16, dict()),
    (2, 4, 700, 4, 1, 64, torch.float16, dict(causal=True)),
    (2, 1, 130, 2, 2, 256, torch.float16, dict(window=(40, 0))),
]


def reference(q, k, v, causal=False, window=(-1, -1), softcap=0.0, alibi=None):
    """float64 attention without dropout on (B, S, H, D) tensors."""
    q, k, v = (t.double() for t in (q, k, v))
    heads_q, heads_kv = q.shape[2], k.shape[2]
    k = k.repeat_interleave(heads_q // heads_kv, dim=2)
    v = v.repeat_interleave(heads_q // heads_kv, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / q.shape[-1] ** 0.5
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    sq, sk = q.shape[1], k.shape[1]
    i = torch.arange(sq, device=q.device).view(-1, 1)
    j = torch.arange(sk, device=q.device).view(1, -1)
    diagonal = i + sk - sq
    if alibi is not None:
        s = s - alibi.double().view(1, -1, 1, 1) * (diagonal - j).abs()
    left, right = window
    right = 0 if causal else right
    visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if left >= 0:
        visible &= j >= diagonal - left
    if right >= 0:
        visible &= j <= diagonal + right
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num()
    return torch.einsum("bhij,bjhd->bihd", p, v)


def main():
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    decode_only = "--decode" in sys.argv[1:]
    for batch, sq, sk, hq, hkv, d, dtype, options in CASES:
        if decode_only and sq > 16:
            continue
        q = torch.randn(batch, sq, hq, d, generator=gen).to("cuda", dtype).requires_grad_()
        k = torch.randn(batch, sk, hkv, d, generator=gen).to("cuda", dtype).requires_grad_()
        v = torch.randn(batch, sk, hkv, d, generator=gen).to("cuda", dtype).requires_grad_()
        options = dict(options)
        alibi = torch.rand(hq, generator=gen).cuda() if options.pop("alibi", False) else None
        out = flash_attention(q, k, v, alibi_slopes=alibi, **options)
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        grads_finite = all(torch.isfinite(t.grad).all().item() for t in (q, k, v))
        err = float("nan")
        if options.get("dropout_p", 0.0) == 0.0:
            ref = reference(q.detach(), k.detach(), v.detach(), alibi=alibi,
                            **{n: options[n] for n in ("causal", "window", "softcap")
                               if n in options})
            err = ((out.double() - ref).norm() / ref.norm()).item()
            worst = max(worst, err)
        print(f"B={batch} Sq={sq} Sk={sk} H={hq}/{hkv} d={d} {dtype} {options}: rel err "
              f"{err:.2e}, finite grads {grads_finite}")
        assert grads_finite
    if decode_only:
        assert worst < 1e-2, f"worst relative error {worst:.3g}"
        print("ok")
        return
    # the 3-pass deterministic backward (the default above is the single pass with atomics)
    for d, causal in ((64, True), (128, False)):
        q, k, v = (torch.randn(2, 200, 2, d, generator=gen).to("cuda", torch.bfloat16)
                   .requires_grad_() for _ in range(3))
        out = flash_attention(q, k, v, causal=causal, deterministic=True)
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        assert all(torch.isfinite(t.grad).all().item() for t in (q, k, v))
    lengths = [5, 0, 70, 33]
    cu = torch.tensor([0, 5, 5, 75, 108], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(sum(lengths), 2, 64, generator=gen).to("cuda", torch.float16)
               .requires_grad_() for _ in range(3))
    out = flash_attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    print("varlen: finite", torch.isfinite(out).all().item())
    # offsets beyond the packed tensors (GPU values are not checked on the host): the kernels
    # must clamp them, which memcheck verifies
    bad = torch.tensor([-7, 50, 100000], dtype=torch.int32, device="cuda")
    out = flash_attention_varlen(q, k, v, bad, bad, 100000, 100000)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    assert worst < 1e-2, f"worst relative error {worst:.3g}"
    print("ok")


if __name__ == "__main__":
    main()
