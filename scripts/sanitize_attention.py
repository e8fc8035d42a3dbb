"""flash_attention calls (forward and backward) on the GPU for compute-sanitizer:

    compute-sanitizer --tool memcheck  python scripts/sanitize_attention.py
    compute-sanitizer --tool racecheck python scripts/sanitize_attention.py
    compute-sanitizer --tool initcheck python scripts/sanitize_attention.py

    python scripts/sanitize_attention.py --decode   # only the decode-path cases (racecheck)

Every padded head dim, partial tiles, causal with Sq != Sk, windows, GQA, softcap, ALiBi,
dropout and varlen, and the corner where queries outnumber keys (whole query blocks that see
no key, bands clipped at both ends). Outputs are compared with the float64 reference under
DESIGN.md's rule, and the deterministic backward is run twice and compared bitwise, so that a
silent wrong answer or a race the sanitizer misses also fails."""

import sys

import torch

from lutflash import flash_attention, flash_attention_varlen
from lutflash.testing import attention_reference

CASES = [  # (batch, Sq, Sk, Hq, Hkv, d, dtype, options)
    (1, 37, 37, 2, 2, 32, torch.float16, dict()),
    (2, 29, 140, 4, 2, 64, torch.bfloat16, dict(causal=True)),
    (1, 130, 33, 3, 1, 96, torch.float16, dict(window=(7, 3), softcap=4.0)),
    (1, 200, 264, 2, 2, 128, torch.bfloat16, dict(causal=True, dropout_p=0.3, seed=1)),
    (1, 70, 70, 2, 1, 256, torch.float16, dict(window=(20, -1))),
    (2, 65, 65, 2, 2, 40, torch.bfloat16, dict(alibi=True)),
    # queries outnumber keys: query blocks with no visible key, bands clipped at both ends
    (1, 800, 64, 2, 2, 256, torch.float16, dict(causal=True, window=(30, 12))),
    (1, 256, 108, 2, 1, 256, torch.bfloat16, dict(causal=True)),
    (1, 300, 16, 2, 2, 64, torch.float16, dict(causal=True)),
    (1, 2048, 64, 2, 2, 128, torch.bfloat16, dict(window=(20, 7), alibi=True)),
    (1, 1000, 16, 2, 1, 32, torch.float16, dict(window=(3, 0), softcap=5.0)),
    (1, 640, 24, 2, 2, 96, torch.bfloat16, dict(causal=True, dropout_p=0.2, seed=3)),
    # decode path (split-KV + combine; one split writing out directly)
    (1, 1, 3000, 8, 2, 128, torch.bfloat16, dict()),
    (2, 4, 700, 4, 1, 64, torch.float16, dict(causal=True)),
    (2, 1, 130, 2, 2, 256, torch.float16, dict(window=(40, 0))),
    (2, 16, 5, 8, 2, 64, torch.float16, dict(causal=True, window=(2, 0))),  # rows with no key
    (1, 12, 3, 4, 4, 128, torch.bfloat16, dict(causal=True)),
]


def check(out, q, k, v, alibi, options, name):
    """DESIGN.md's rule: error vs float64 at most 2x the error of the naive computation in the
    inputs' precision, plus a floor."""
    kw = {n: options[n] for n in ("causal", "window", "softcap") if n in options}
    # on the CPU: torch's own GPU kernels would show up in the sanitizer's report
    q, k, v = (t.detach().cpu() for t in (q, k, v))
    alibi = alibi.cpu() if alibi is not None else None
    ref, _ = attention_reference(q.double(), k.double(), v.double(), alibi=alibi, **kw)
    naive, _ = attention_reference(q, k, v, alibi=alibi, **kw)
    err = (out.cpu().double() - ref).abs().max().item()
    bound = 2 * (naive.double() - ref).abs().max().item() + 1e-3
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"
    return err


def main():
    gen = torch.Generator().manual_seed(0)
    decode_only = "--decode" in sys.argv[1:]
    for batch, sq, sk, hq, hkv, d, dtype, options in CASES:
        if decode_only and sq > 16:
            continue
        q = torch.randn(batch, sq, hq, d, generator=gen).to("cuda", dtype).requires_grad_()
        k = torch.randn(batch, sk, hkv, d, generator=gen).to("cuda", dtype).requires_grad_()
        v = torch.randn(batch, sk, hkv, d, generator=gen).to("cuda", dtype).requires_grad_()
        options = dict(options)
        alibi = torch.rand(hq, generator=gen).cuda() if options.pop("alibi", False) else None
        name = f"B={batch} Sq={sq} Sk={sk} H={hq}/{hkv} d={d} {dtype} {options}"
        dout = torch.randn(batch, sq, hq, d, generator=gen).to("cuda", dtype)
        grads = []
        for deterministic in (False, True, True):
            out = flash_attention(q, k, v, alibi_slopes=alibi, deterministic=deterministic,
                                  **options)
            grads.append(torch.autograd.grad(out, (q, k, v), dout))
        torch.cuda.synchronize()
        assert all(torch.isfinite(g).all().item() for g in grads[0] + grads[1]), name
        assert all(torch.equal(a, b) for a, b in zip(grads[1], grads[2], strict=True)), (
            f"{name}: deterministic backward differs between two calls")
        err = float("nan")
        if options.get("dropout_p", 0.0) == 0.0:
            err = check(out, q, k, v, alibi, options, name)
        print(f"{name}: max err {err:.2e}, grads finite and repeatable")
    if decode_only:
        print("ok")
        return
    lengths = [5, 0, 70, 33]
    cu = torch.tensor([0, 5, 5, 75, 108], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(sum(lengths), 2, 64, generator=gen).to("cuda", torch.float16)
               .requires_grad_() for _ in range(3))
    out = flash_attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    assert torch.isfinite(out).all().item()
    # varlen with queries outnumbering keys in every sequence (799 queries, 3 keys)
    cu_q = torch.tensor([0, 799, 1200], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, 3, 5], dtype=torch.int32, device="cuda")
    q = torch.randn(1200, 2, 224, generator=gen).to("cuda", torch.float16)
    k, v = (torch.randn(5, 2, 224, generator=gen).to("cuda", torch.float16) for _ in range(2))
    out = flash_attention_varlen(q, k, v, cu_q, cu_k, 799, 3, window=(5, 1))
    for s, (q0, q1, k0, k1) in enumerate(((0, 799, 0, 3), (799, 1200, 3, 5))):
        check(out[q0:q1][None], q[q0:q1][None], k[k0:k1][None], v[k0:k1][None], None,
              dict(window=(5, 1)), f"varlen sequence {s}")
    # offsets beyond the packed tensors (GPU values are not checked on the host): the kernels
    # must clamp them, which memcheck verifies
    q, k, v = (torch.randn(108, 2, 64, generator=gen).to("cuda", torch.float16)
               .requires_grad_() for _ in range(3))
    bad = torch.tensor([-7, 50, 100000], dtype=torch.int32, device="cuda")
    out = flash_attention_varlen(q, k, v, bad, bad, 100000, 100000)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    print("ok")


if __name__ == "__main__":
    main()
