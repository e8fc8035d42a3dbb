"""A catalogue of bad inputs to the public API, each refused cleanly.

Every case runs in a child process (a short snippet run by ``sys.executable``) and must raise
the named exception class with a message that names the argument at fault: not crash the
interpreter (a signal), not hang (a timeout), not return an answer. The children run in
parallel from one module-scoped fixture; each case is its own test, named by its id.

Cases cover lutflash.lutgemm (and the raw _C.lutgemm the op calls, since the C layer validates
everything again), lutflash.quantize, lutflash.nn.LutLinear (constructor, from_linear,
from_bcq, forward, load_state_dict), BCQWeight.from_state_tensors, safetensors files (truncated,
corrupted, lying about the layout), lutflash.flash_attention / flash_attention_varlen
(and the raw _C.attention_forward) and lutflash.flash_attention_with_kvcache (and the raw
_C.attention_kvcache_forward). Huge sizes are expand()/as_strided views: nothing big is
allocated. Device-mix cases that need a GPU are marked cuda (skipped without one); the "meta"
device stands in for a second device elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

CHILD_TIMEOUT_S = 60
WORKERS = 4
MARK = "@@lutflash-bad-input@@"

# Shared by every child: small valid inputs and helpers that build raw calls and files.
PRELUDE = r'''
import json, math, os, struct, sys
import torch
import lutflash
from lutflash import _C
from lutflash.bcq import BCQWeight
from lutflash.nn import LutLinear

N, K, BITS, GROUP = 16, 64, 3, 32
TMP = sys.argv[1]
gen = torch.Generator().manual_seed(0)
INT32_MAX = 2**31 - 1


def weight(n=N, k=K):
    return torch.randn(n, k, generator=gen)


def qweight():
    return lutflash.quantize(weight(), BITS, GROUP, "rtn", mode="general")


def layer(bias=True):
    return LutLinear.from_bcq(qweight(), torch.randn(N, generator=gen) if bias else None)


def state(**change):
    sd = dict(layer().state_dict())
    sd.update(change)
    return sd


def huge(shape, dtype=torch.float32, row=True):
    """A view of the given (huge) shape with outer strides 0 over one contiguous row (the last
    dimension), or over one element (row=False): nothing big is allocated."""
    if not row or len(shape) == 1:
        return torch.zeros(1, dtype=dtype).as_strided(shape, (0,) * len(shape))
    return torch.zeros(shape[-1], dtype=dtype).as_strided(shape, (0,) * (len(shape) - 1) + (1,))


def raw_lutgemm(m=2, **override):
    """Calls _C.lutgemm with valid arguments, some replaced."""
    qw = qweight()
    args = dict(x=torch.randn(m, K), planes=qw.planes, meta=qw.meta, bias=None,
                out=torch.empty(m, N),
                workspace=torch.empty(_C.lutgemm_workspace_bytes(False, m, N, K, BITS, GROUP, 0),
                                      dtype=torch.uint8),
                n=N, k=K, bits=BITS, group_size=GROUP, mode=0, stream=0)
    args.update(override)
    return _C.lutgemm(*args.values())


def qkv(b=1, sq=8, sk=8, hq=4, hkv=2, d=16):
    q = torch.randn(b, sq, hq, d, generator=gen)
    k = torch.randn(b, sk, hkv, d, generator=gen)
    return q, k, torch.randn(b, sk, hkv, d, generator=gen)


def varlen_qkv(total=8, hq=4, hkv=2, d=16):
    return tuple(t[0] for t in qkv(1, total, total, hq, hkv, d))


def cu(*offsets):
    return torch.tensor(offsets, dtype=torch.int32)


def varlen(**change):
    q, k, v = varlen_qkv()
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu(0, 3, 8), cu_seqlens_k=cu(0, 3, 8),
                max_seqlen_q=5, max_seqlen_k=5)
    options = {name: change.pop(name) for name in list(change) if name not in args}
    args.update(change)
    return lutflash.flash_attention_varlen(*args.values(), **options)


def raw_attention(**override):
    """Calls _C.attention_forward with valid dense arguments, some replaced."""
    q, k, v = qkv()
    ws = torch.empty(_C.attention_workspace_bytes(False, 16, False, 1, 4, 1, 8), dtype=torch.uint8)
    args = dict(q=q, k=k, v=v, cu_q=None, cu_k=None, alibi=None, rng=None,
                out=torch.empty_like(q), lse=torch.empty(1, 4, 8), ws=ws, sinks=None, max_q=0,
                max_k=0,
                scale=0.25, softcap=0.0, left=-1, right=-1, dropout=0.0, threads=1, variant=0,
                stream=0)
    args.update(override)
    return _C.attention_forward(*args.values())


def kvcache(paged=False, **change):
    """lutflash.flash_attention_with_kvcache on valid small arguments (a dense cache of 12 rows,
    or 4 pages of 6 rows with a block table), some replaced."""
    q, k, v = qkv(b=2, sq=1, sk=1)
    args = dict(q=q, k_cache=torch.randn(2, 12, 2, 16), v_cache=torch.randn(2, 12, 2, 16),
                k=k, v=v)
    options = dict(cache_seqlens=torch.tensor([3, 5], dtype=torch.int32))
    if paged:
        args.update(k_cache=torch.randn(4, 6, 2, 16), v_cache=torch.randn(4, 6, 2, 16))
        options.update(block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32))
    for name, value in change.items():
        (args if name in args else options)[name] = value
    return lutflash.flash_attention_with_kvcache(*args.values(), **options)


def raw_kvcache(**override):
    """Calls _C.attention_kvcache_forward with valid dense arguments, some replaced."""
    q, k, v = qkv(b=2, sq=1, sk=1)
    ws = torch.empty(_C.attention_workspace_bytes(False, 16, False, 1, 4, 2, 2), dtype=torch.uint8)
    args = dict(q=q, k_cache=torch.randn(2, 12, 2, 16), v_cache=torch.randn(2, 12, 2, 16), k=k,
                v=v, cache_seqlens=torch.tensor([3, 5], dtype=torch.int32), cache_batch_idx=None,
                block_table=None, alibi=None, sinks=None, cos=None, sin=None,
                q_rotated=None,
                out=torch.empty_like(q), lse=torch.empty(2, 4, 1), ws=ws, scale=0.25,
                softcap=0.0, left=-1, right=-1, interleaved=0, threads=1, variant=0, stream=0)
    args.update(override)
    return _C.attention_kvcache_forward(*args.values())


def save(sd, name="layer.safetensors"):
    from safetensors.torch import save_file
    path = os.path.join(TMP, name)
    save_file({key: value.contiguous() for key, value in sd.items()}, path)
    return path


def load(path):
    from safetensors.torch import load_file
    return load_file(path)


def rewrite_header(path, edit):
    """Applies edit(header dict) to a safetensors file's JSON header, data left as is."""
    with open(path, "rb") as f:
        data = f.read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data[8 + length:])
'''

CHILD = '''
{prelude}
MARK = {mark!r}


def _emit(report):
    sys.stdout.write("\\n" + MARK + json.dumps(report) + "\\n")
    sys.stdout.flush()


try:
{body}
except BaseException as error:  # noqa: BLE001 - the parent judges the class
    _emit(dict(raised=[c.__name__ for c in type(error).__mro__], type=type(error).__name__,
               message=str(error)))
else:
    _emit(dict(raised=None))
'''


@dataclass(frozen=True)
class Case:
    id: str
    code: str           # statements run in the child; they must raise
    error: str          # the exception class (by name) the child must raise
    names: str          # text the message must contain: the argument at fault
    cuda: str = ""      # non-empty: needs a CUDA GPU, for this reason


def case(id, error, names, code, cuda=""):
    return Case(id, textwrap.dedent(code).strip(), error, names, cuda)


CASES = [
    # ---------------------------------------------------------------- lutflash.lutgemm
    case("lutgemm/x-int32", "TypeError", "x",
         "lutflash.lutgemm(torch.ones(2, K, dtype=torch.int32), qweight())"),
    case("lutgemm/x-wrong-in-features", "ValueError", "x",
         "lutflash.lutgemm(torch.randn(2, K + 1), qweight())"),
    case("lutgemm/x-on-meta-device", "ValueError", "x",
         "lutflash.lutgemm(torch.randn(2, K, device='meta'), qweight())"),
    case("lutgemm/x-negative-bit-view", "ValueError", "x",
         "lutflash.lutgemm(torch._neg_view(torch.randn(2, K)), qweight())"),
    case("lutgemm/qweight-dense-tensor", "TypeError", "qweight",
         "lutflash.lutgemm(torch.randn(2, K), torch.randn(N, K))"),
    case("lutgemm/bias-wrong-shape", "ValueError", "bias",
         "lutflash.lutgemm(torch.randn(2, K), qweight(), torch.randn(N + 1))"),
    case("lutgemm/bias-wrong-dtype", "TypeError", "bias",
         "lutflash.lutgemm(torch.randn(2, K), qweight(), torch.randn(N).half())"),
    case("lutgemm/x-cuda-weight-cpu", "ValueError", "x",
         "lutflash.lutgemm(torch.randn(2, K, device='cuda'), qweight())",
         cuda="a CUDA tensor cannot be made without a GPU"),
    case("bcqweight/k-beyond-int32", "ValueError", "k",
         # planes (2^26, 1, 8) as a stride-0 view: the layout is checked before any kernel
         """
         k = 2**31
         BCQWeight(huge((k // 32, 1, 8), torch.int32), torch.zeros(1, 2, 8), (8, k), 1, k,
                   "uniform")
         """),
    case("bcqweight/n-beyond-int32", "ValueError", "n",
         """
         n = 2**31
         BCQWeight(huge((1, 1, n), torch.int32, row=False), huge((1, 2, n), row=False), (n, 32), 1,
                   32, "uniform")
         """),
    # ---------------------------------------------------------------- raw _C.lutgemm
    case("c-lutgemm/x-last-dim-stride-0", "ValueError", "x",
         "raw_lutgemm(x=torch.randn(2, 1).expand(2, K))"),
    case("c-lutgemm/x-overlapping-rows", "ValueError", "x",
         "raw_lutgemm(x=torch.randn(K + 1).as_strided((2, K), (1, 1)))"),
    case("c-lutgemm/x-negative-strides-numpy", "ValueError", "x",
         """
         import numpy as np
         raw_lutgemm(x=np.ascontiguousarray(np.random.rand(2, K).astype(np.float32))[::-1])
         """),
    case("c-lutgemm/k-2^31", "ValueError", "k",
         "raw_lutgemm(k=2**31)"),
    case("c-lutgemm/out-read-only-numpy", "ValueError", "out",
         """
         import numpy as np
         out = np.zeros((2, N), dtype=np.float32)
         out.flags.writeable = False
         raw_lutgemm(out=out)
         """),
    # ---------------------------------------------------------------- lutflash.quantize
    case("quantize/bits-0", "ValueError", "bits", "lutflash.quantize(weight(), 0, GROUP)"),
    case("quantize/group-size-not-dividing-k", "ValueError", "group_size",
         "lutflash.quantize(weight(k=96), 3, 64)"),
    case("quantize/unknown-method", "ValueError", "method",
         "lutflash.quantize(weight(), 3, GROUP, 'gptq')"),
    case("quantize/weight-1d", "ValueError", "weight", "lutflash.quantize(torch.randn(K), 3, GROUP)"),
    case("quantize/weight-nan", "ValueError", "weight",
         """
         w = weight()
         w[3, 5] = math.nan
         lutflash.quantize(w, 3, GROUP)
         """),
    case("quantize/weight-inf", "ValueError", "weight",
         """
         w = weight()
         w[0, 0] = -math.inf
         lutflash.quantize(w, 2, GROUP, 'rtn')
         """),
    case("quantize/weight-on-meta-device", "ValueError", "weight",
         "lutflash.quantize(torch.randn(N, K, device='meta'), 3, GROUP)"),
    case("quantize/meta-dtype-float64", "TypeError", "meta_dtype",
         "lutflash.quantize(weight(), 3, GROUP, meta_dtype=torch.float64)"),
    # ---------------------------------------------------------------- LutLinear
    case("lutlinear/in-features-float", "TypeError", "in_features",
         "LutLinear(64.0, 16)"),
    case("lutlinear/in-features-2^31", "ValueError", "in_features",
         # would allocate 6 GiB of planes before the fix
         "LutLinear(2**31, 8, group_size=None, bits=3)"),
    case("lutlinear/from-linear-not-linear", "TypeError", "linear",
         "LutLinear.from_linear(torch.nn.Conv1d(4, 4, 1))"),
    case("lutlinear/from-bcq-not-bcq", "TypeError", "qweight",
         "LutLinear.from_bcq(torch.randn(N, K))"),
    case("lutlinear/from-bcq-bias-wrong-shape", "ValueError", "bias",
         "LutLinear.from_bcq(qweight(), torch.randn(N + 1))"),
    case("lutlinear/from-bcq-bias-int", "TypeError", "bias",
         "LutLinear.from_bcq(qweight(), torch.ones(N, dtype=torch.int64))"),
    case("lutlinear/forward-x-wrong-in-features", "ValueError", "x",
         "layer()(torch.randn(3, K - 1))"),
    case("lutlinear/forward-x-half-bias-float", "TypeError", "bias",
         "layer()(torch.randn(3, K).half())"),
    case("lutlinear/forward-bias-replaced-wrong-shape", "ValueError", "bias",
         """
         module = layer()
         module.bias = torch.nn.Parameter(torch.randn(N + 1))
         module(torch.randn(3, K))
         """),
    # ---------------------------------------------------------------- load_state_dict
    case("load/layout-unknown-version", "ValueError", "layout",
         "layer().load_state_dict(state(layout=torch.tensor([99, N, K, BITS, GROUP, 0])))"),
    case("load/layout-bits-mismatch", "ValueError", "layout",
         "layer().load_state_dict(state(layout=torch.tensor([1, N, K, 4, GROUP, 0])))"),
    case("load/layout-float", "TypeError", "layout",
         "layer().load_state_dict(state(layout=torch.tensor([1.0, N, K, BITS, GROUP, 0.5])))"),
    case("load/planes-shape-lies", "ValueError", "planes",
         "layer().load_state_dict(state(planes=torch.zeros(2, 2, N, dtype=torch.int32)))"),
    case("load/meta-int32", "TypeError", "meta",
         "layer().load_state_dict(state(meta=torch.ones(2, BITS + 1, N, dtype=torch.int32)))"),
    case("load/bias-wrong-shape", "RuntimeError", "bias",
         "layer().load_state_dict(state(bias=torch.zeros(N + 1)))"),
    case("load/planes-missing", "RuntimeError", "planes",
         """
         sd = state()
         del sd["planes"]
         layer().load_state_dict(sd)
         """),
    case("load/planes-on-meta-device", "RuntimeError", "planes",
         "layer().load_state_dict(state(planes=torch.zeros(2, BITS, N, dtype=torch.int32, "
         "device='meta')))"),
    case("from-state-tensors/unknown-version", "ValueError", "layout",
         """
         t = qweight().state_tensors()
         t["layout"][0] = 2
         BCQWeight.from_state_tensors(**t)
         """),
    case("from-state-tensors/layout-not-a-tensor", "TypeError", "layout",
         "BCQWeight.from_state_tensors(qweight().planes, qweight().meta, [1, N, K, BITS, GROUP, 0])"),
    case("from-state-tensors/bits-lie", "ValueError", "planes",
         """
         t = qweight().state_tensors()
         t["layout"][3] = 2
         BCQWeight.from_state_tensors(**t)
         """),
    # ---------------------------------------------------------------- safetensors files
    case("safetensors/truncated-file", "SafetensorError", "header",
         """
         path = save(layer().state_dict())
         size = os.path.getsize(path)
         os.truncate(path, size - 100)
         layer().load_state_dict(load(path))
         """),
    case("safetensors/header-length-flipped", "SafetensorError", "header",
         """
         path = save(layer().state_dict())
         with open(path, "r+b") as f:
             f.write(b"\\xff" * 8)
         layer().load_state_dict(load(path))
         """),
    case("safetensors/header-json-garbled", "SafetensorError", "header",
         """
         path = save(layer().state_dict())
         with open(path, "r+b") as f:
             f.seek(8)
             f.write(b"[")
         layer().load_state_dict(load(path))
         """),
    case("safetensors/planes-dtype-F32", "TypeError", "planes",
         """
         path = save(layer().state_dict())
         rewrite_header(path, lambda h: h["planes"].update(dtype="F32"))
         layer().load_state_dict(load(path))
         """),
    case("safetensors/meta-dtype-F64", "TypeError", "meta",
         """
         sd = state()
         path = save(dict(sd, meta=sd["meta"].double()))
         layer().load_state_dict(load(path))
         """),
    case("safetensors/planes-shape-lies", "ValueError", "planes",
         # same bytes, declared (6, 1, 16) instead of (2, 3, 16)
         """
         path = save(layer().state_dict())
         rewrite_header(path, lambda h: h["planes"].update(shape=[6, 1, N]))
         layer().load_state_dict(load(path))
         """),
    case("safetensors/layout-unknown-version", "ValueError", "layout",
         """
         sd = state()
         sd["layout"] = sd["layout"].clone()
         sd["layout"][0] = 2
         path = save(sd)
         layer().load_state_dict(load(path))
         """),
    case("safetensors/from-state-tensors-bits-lie", "ValueError", "planes",
         """
         t = qweight().state_tensors()
         t["layout"][3] = 4
         loaded = load(save(t))
         BCQWeight.from_state_tensors(loaded["planes"], loaded["meta"], loaded["layout"])
         """),
    # ---------------------------------------------------------------- flash_attention
    case("attention/q-float64", "TypeError", "q",
         "q, k, v = qkv(); lutflash.flash_attention(q.double(), k.double(), v.double())"),
    case("attention/k-dtype-mismatch", "TypeError", "k",
         "q, k, v = qkv(); lutflash.flash_attention(q, k.half(), v)"),
    case("attention/kv-heads-not-dividing", "ValueError", "k",
         "q, k, v = qkv(hq=4, hkv=3); lutflash.flash_attention(q, k, v)"),
    case("attention/k-on-meta-device", "ValueError", "k",
         "q, k, v = qkv(); lutflash.flash_attention(q, k.to('meta'), v.to('meta'))"),
    case("attention/k-on-cuda-q-on-cpu", "ValueError", "k",
         "q, k, v = qkv(); lutflash.flash_attention(q, k.cuda(), v.cuda())",
         cuda="a CUDA tensor cannot be made without a GPU"),
    case("attention/seqlen-q-2^31", "ValueError", "q",
         # a stride-0 view: refused before out (128 GiB) is allocated
         """
         q, k, v = qkv()
         lutflash.flash_attention(huge((1, 2**31, 4, 16)), k, v)
         """),
    case("attention/seqlen-k-2^31", "ValueError", "k",
         """
         q, k, v = qkv()
         big = huge((1, 2**31, 2, 16))
         lutflash.flash_attention(q, big, big)
         """),
    case("attention/softmax-scale-nan", "ValueError", "softmax_scale",
         "lutflash.flash_attention(*qkv(), softmax_scale=math.nan)"),
    case("attention/softmax-scale-underflows-float32", "ValueError", "softmax_scale",
         "lutflash.flash_attention(*qkv(), softmax_scale=1e-50)"),
    case("attention/softcap-nan", "ValueError", "softcap",
         "lutflash.flash_attention(*qkv(), softcap=math.nan)"),
    case("attention/dropout-p-nan", "ValueError", "dropout_p",
         "lutflash.flash_attention(*qkv(), dropout_p=math.nan)"),
    case("attention/dropout-p-rounds-to-1", "ValueError", "dropout_p",
         "lutflash.flash_attention(*qkv(), dropout_p=1 - 1e-9, seed=0)"),
    case("attention/alibi-wrong-shape", "ValueError", "alibi_slopes",
         "lutflash.flash_attention(*qkv(), alibi_slopes=torch.rand(2, 4))"),
    case("attention/alibi-nan", "ValueError", "alibi_slopes",
         "lutflash.flash_attention(*qkv(), alibi_slopes=torch.tensor([0.5, math.nan, 0.1, 0.2]))"),
    # ---------------------------------------------------------------- raw _C.attention_forward
    case("c-attention/q-last-dim-stride-0", "ValueError", "q",
         "raw_attention(q=torch.randn(1, 8, 4, 1).expand(1, 8, 4, 16))"),
    case("c-attention/alibi-inf", "ValueError", "alibi_slopes",
         "raw_attention(alibi=torch.tensor([0.5, math.inf, 0.1, 0.2]))"),
    case("c-attention/k-seqlen-2^31", "ValueError", "k",
         "big = huge((1, 2**31, 2, 16)); raw_attention(k=big, v=big)"),
    case("c-attention/cu-seqlens-non-contiguous", "ValueError", "cu_seqlens_q",
         """
         q, k, v = varlen_qkv()
         offsets = cu(0, 0, 3, 3, 8, 8)[::2]
         raw_attention(q=q, k=k, v=v, cu_q=offsets, cu_k=cu(0, 3, 8), out=torch.empty_like(q),
                       lse=torch.empty(4, 8), max_q=5, max_k=5)
         """),
    # ---------------------------------------------------------------- flash_attention_with_kvcache
    # each of these would read or write outside the caches if it were not refused
    case("kvcache/block-table-page-past-the-cache", "ValueError", "block_table",
         "kvcache(paged=True, block_table=torch.tensor([[0, 1], [2, 4]], dtype=torch.int32), "
         "cache_seqlens=torch.tensor([3, 9], dtype=torch.int32))"),
    case("kvcache/block-table-negative-page", "ValueError", "block_table",
         "kvcache(paged=True, block_table=torch.tensor([[-7, 1], [2, 3]], dtype=torch.int32))"),
    case("kvcache/cache-seqlens-beyond-the-cache", "ValueError", "cache_seqlens",
         "kvcache(cache_seqlens=torch.tensor([3, 12], dtype=torch.int32))"),
    case("kvcache/cache-seqlens-int32-max", "ValueError", "cache_seqlens",
         "kvcache(cache_seqlens=INT32_MAX)"),
    case("kvcache/cache-seqlens-negative", "ValueError", "cache_seqlens",
         "kvcache(cache_seqlens=torch.tensor([-100, 5], dtype=torch.int32))"),
    case("kvcache/paged-cache-seqlens-beyond-the-pages", "ValueError", "cache_seqlens",
         "kvcache(paged=True, cache_seqlens=torch.tensor([3, 12], dtype=torch.int32))"),
    case("kvcache/cache-batch-idx-past-the-cache", "ValueError", "cache_batch_idx",
         "kvcache(cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32))"),
    case("kvcache/rotary-positions-past-the-tables", "ValueError", "rotary_cos",
         "kvcache(rotary_cos=torch.rand(4, 8), rotary_sin=torch.rand(4, 8))"),
    case("kvcache/rotary-dim-above-head-dim", "ValueError", "rotary_cos",
         "kvcache(rotary_cos=torch.rand(16, 9), rotary_sin=torch.rand(16, 9))"),
    case("kvcache/block-table-2^31-keys", "ValueError", "block_table",
         # a stride-0 table of 2^30 pages of 4 rows: refused before its values are copied
         "kvcache(paged=True, block_table=huge((2, 2**30), torch.int32, row=False))"),
    case("kvcache/cache-overlapping-rows", "ValueError", "k_cache",
         "kvcache(k_cache=torch.randn(2, 1, 2, 16).expand(2, 12, 2, 16))"),
    case("c-kvcache/cache-seqlens-beyond-the-cache", "ValueError", "cache_seqlens",
         "raw_kvcache(cache_seqlens=torch.tensor([12, 0], dtype=torch.int32))"),
    case("c-kvcache/block-table-page-past-the-cache", "ValueError", "block_table",
         """
         raw_kvcache(k_cache=torch.randn(4, 6, 2, 16), v_cache=torch.randn(4, 6, 2, 16),
                     block_table=torch.tensor([[0, 1], [4, 3]], dtype=torch.int32))
         """),
    case("c-kvcache/cache-batch-idx-negative", "ValueError", "cache_batch_idx",
         "raw_kvcache(cache_batch_idx=torch.tensor([0, -1], dtype=torch.int32))"),
    case("c-kvcache/rotary-positions-past-the-tables", "ValueError", "rotary_cos",
         "q = qkv(b=2, sq=1)[0]; raw_kvcache(q=q, cos=torch.rand(5, 8), sin=torch.rand(5, 8), "
         "q_rotated=torch.empty_like(q))"),
    case("c-kvcache/cache-read-only-numpy", "ValueError", "v_cache",
         """
         import numpy as np
         cache = np.zeros((2, 12, 2, 16), dtype=np.float32)
         cache.flags.writeable = False
         raw_kvcache(v_cache=cache)
         """),
    case("kvcache/k-cache-on-cuda-q-on-cpu", "ValueError", "k_cache",
         "kvcache(k_cache=torch.randn(2, 12, 2, 16, device='cuda'))",
         cuda="a CUDA tensor cannot be made without a GPU"),
    case("kvcache/cache-seqlens-on-cpu-q-on-cuda", "ValueError", "cache_seqlens",
         """
         q, k, v = (t.cuda().half() for t in qkv(b=2, sq=1, sk=1))
         cache = torch.zeros(2, 12, 2, 16, device='cuda', dtype=torch.half)
         lutflash.flash_attention_with_kvcache(q, cache, cache.clone(), k, v,
                                               cache_seqlens=torch.tensor([3, 5], dtype=torch.int32))
         """, cuda="a CUDA tensor cannot be made without a GPU"),
    # ---------------------------------------------------------------- flash_attention_varlen
    case("varlen/cu-seqlens-int64", "TypeError", "cu_seqlens_q",
         "varlen(cu_seqlens_q=cu(0, 3, 8).long())"),
    case("varlen/cu-seqlens-decreasing", "ValueError", "cu_seqlens_k",
         "varlen(cu_seqlens_k=cu(0, 5, 3))"),
    case("varlen/cu-seqlens-beyond-total", "ValueError", "cu_seqlens_q",
         "varlen(cu_seqlens_q=cu(0, 3, 9))"),
    case("varlen/cu-seqlens-huge-last-offset", "ValueError", "cu_seqlens_k",
         "varlen(cu_seqlens_k=cu(0, 3, INT32_MAX), max_seqlen_k=INT32_MAX)"),
    case("varlen/cu-seqlens-first-negative", "ValueError", "cu_seqlens_q",
         "varlen(cu_seqlens_q=cu(-1, 3, 8))"),
    case("varlen/cu-seqlens-length-mismatch", "ValueError", "cu_seqlens_k",
         "varlen(cu_seqlens_k=cu(0, 8))"),
    case("varlen/cu-seqlens-2^31-entries", "ValueError", "cu_seqlens_q",
         # a stride-0 view of 2^31 + 1 zeros: refused before its values are read or copied
         "z = huge((2**31 + 1,), torch.int32); varlen(cu_seqlens_q=z, cu_seqlens_k=z)"),
    case("varlen/max-seqlen-too-small", "ValueError", "max_seqlen_q",
         "varlen(max_seqlen_q=4)"),
    case("varlen/max-seqlen-2^70", "ValueError", "max_seqlen_q",
         "varlen(max_seqlen_q=2**70)"),
]


def _run_child(case: Case, root: str) -> dict:
    workdir = tempfile.mkdtemp(dir=root)
    source = CHILD.format(prelude=PRELUDE, mark=MARK, body=textwrap.indent(case.code, "    "))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-c", source, workdir], capture_output=True,
                              text=True, timeout=CHILD_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return dict(problem=f"hung: no exit within {CHILD_TIMEOUT_S} s")
    result = dict(returncode=proc.returncode, stderr=proc.stderr[-3000:],
                  seconds=time.monotonic() - start)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            result["report"] = json.loads(line[len(MARK):])
    return result


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bad_inputs"))
    runnable = [c for c in CASES if not c.cuda]
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        results = pool.map(lambda c: _run_child(c, root), runnable)
        return dict(zip((c.id for c in runnable), results, strict=True))


def test_catalogue_is_large_and_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert len(ids) >= 40


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.id, marks=(pytest.mark.cuda,) if c.cuda else ()) for c in CASES])
def test_bad_input_is_refused(case, outcomes, tmp_path):
    # cuda cases are skipped by conftest without a GPU; with one they run here, alone
    outcome = _run_child(case, str(tmp_path)) if case.cuda else outcomes[case.id]
    assert "problem" not in outcome, f"{case.id}: {outcome.get('problem')}"
    rc, stderr = outcome["returncode"], outcome["stderr"]
    assert rc >= 0, f"{case.id}: the child died of signal {-rc}\n{stderr}"
    assert "report" in outcome, f"{case.id}: the child exited {rc} without a report\n{stderr}"
    report = outcome["report"]
    assert report["raised"] is not None, f"{case.id}: no exception (a silent answer)"
    assert case.error in report["raised"], (
        f"{case.id}: expected {case.error}, got {report['type']}: {report['message']}")
    assert re.search(rf"(?<![\w.]){re.escape(case.names)}(?!\w)", report["message"]), (
        f"{case.id}: the message does not name {case.names!r}: {report['message']}")
    assert rc == 0, f"{case.id}: the child exited {rc}\n{stderr}"
