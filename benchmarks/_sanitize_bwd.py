"""Tiny fast-backward call for compute-sanitizer (memcheck / racecheck)."""
import torch

import lutflash

for d, causal, hq, hkv in ((64, True, 4, 2), (128, False, 2, 2)):
    q = torch.randn(2, 200, hq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 230, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    lutflash.flash_attention(q, k, v, causal=causal).sum().backward()
torch.cuda.synchronize()
print("sanitize run done")
