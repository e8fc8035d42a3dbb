"""flash_attention_with_kvcache against a float64 reference written from its definition
(csrc/attention_params.h, DESIGN.md "Attention semantics" with L_b = cache_seqlens[b] + Sn keys).

A case is a `Spec` (every structural choice: dtype, shapes, dense or paged cache and its page
size, cache_batch_idx, cache lengths, new keys or none, rotary, masks, layouts) turned into
tensors by `build`; `check` runs the call and compares:
- out (and lse) with float64 attention over each sequence's valid keys, read from the
  expected cache, with q rotated the way the header defines (float32 math, one rounding);
- the caches after the call with the expected caches: on the CPU equal bit for bit, rows
  outside the appended range and memory around strided views untouched;
- q, k, v and cache_seqlens unchanged.
Specs are drawn at random from fixed seeds (a parametrized sweep whose coverage is asserted),
and by hypothesis (derandomized, small CPU profile). Every call's outputs are poisoned (NaN)
first. GPU variants carry @pytest.mark.cuda (float16/bfloat16, head dims multiples of 8).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from lutflash import _C, flash_attention, flash_attention_with_kvcache
from lutflash import kvcache as kvcache_module
from lutflash import testing as lutflash_testing
from lutflash.testing import attention_reference

CPU_DTYPES = (torch.float32, torch.float32, torch.float16, torch.bfloat16)
GPU_DTYPES = (torch.float16, torch.bfloat16)
PAGE_SIZES = (1, 2, 3, 5, 7, 16, 17, 63, 64, 100, 129, 256, 333, 512)
ELEMENT_BUDGET = 1_500_000  # elements of one cache (the reference copies it)


@dataclass(frozen=True)
class Spec:
    dtype: torch.dtype
    batch: int
    heads_q: int
    heads_kv: int
    d: int
    seqlen_q: int
    seqlen_new: int | None         # None: no k and v
    cache_lens: tuple[int, ...]    # cache_seqlens, before the append
    capacity_slack: int            # dense: S_cache - the longest L_b; paged: extra pages
    page_size: int | None          # None: a dense cache
    batch_idx: str | None          # None, "perm" (a permutation into a bigger cache), "repeat"
    garbage_table: bool            # block-table entries past the used pages out of range
    rotary: tuple | None           # (rotary_dim / 2, interleaved, extra rows of the tables)
    causal: bool
    window: tuple[int, int]
    softcap: float
    alibi: str | None              # None, "heads", "batch_heads"
    scale: float | None
    return_lse: bool
    strided: bool                  # caches, q, k and v as views into wider buffers
    cache_seqlens_int: bool        # cache_seqlens passed as a Python int (all lengths equal)
    seed: int

    @property
    def lengths(self):
        return [n + (self.seqlen_new or 0) for n in self.cache_lens]


def spec_ok(spec: Spec) -> bool:
    return cache_elements(spec) <= ELEMENT_BUDGET


def cache_elements(spec: Spec) -> int:
    longest = max(spec.lengths, default=0)
    if spec.page_size is None:
        rows = len(spec.cache_lens) + (3 if spec.batch_idx else 0)
        return rows * (longest + spec.capacity_slack) * spec.heads_kv * spec.d
    pages = spec.batch * (math.ceil(longest / spec.page_size) + spec.capacity_slack) + 2
    return pages * spec.page_size * spec.heads_kv * spec.d


def random_spec(seed: int, dtypes=CPU_DTYPES, head_dims=None) -> Spec:
    """A spec drawn from the whole space with Python's random (fixed seed)."""
    r = random.Random(seed)
    for _ in range(100):
        heads_kv = r.choice([1, 1, 2, 3])
        group = r.choice([1, 2, 3, 4])
        d = r.choice(head_dims) if head_dims else r.choice(
            [1, 2, 3, 7, 8, 16, 31, 40, 64, 65, 96, 128, 200, 256, r.randint(1, 256)])
        batch = r.randint(1, 4)
        append = r.random() < 0.65
        seqlen_new = r.choice([0, 1, 1, 2, 3, r.randint(1, 40)]) if append else None
        seqlen_q = r.choice([1, 1, 2, 3, r.randint(1, 24)])
        if seqlen_new and r.random() < 0.6:
            seqlen_q = seqlen_new  # the usual prefill/decode shape
        lens = tuple(r.choice([0, 0, 1, r.randint(0, 8), r.randint(0, 150)]) for _ in range(batch))
        cache_seqlens_int = r.random() < 0.15
        if cache_seqlens_int:
            lens = (lens[0],) * batch
        page_size = r.choice(PAGE_SIZES + (r.randint(1, 512),)) if r.random() < 0.45 else None
        batch_idx = None
        if page_size is None and r.random() < 0.4:
            batch_idx = "repeat" if not append and r.random() < 0.4 else "perm"
        rotary = None
        if append and d >= 2 and r.random() < 0.45:
            rotary = (r.choice([1, d // 2, r.randint(1, d // 2)]), r.random() < 0.5,
                      r.choice([0, 3]))
        window = r.choice([(-1, -1), (-1, -1), (5, -1), (3, 2), (0, 0), (-1, 4), (40, 0)])
        spec = Spec(
            dtype=r.choice(dtypes), batch=batch, heads_q=heads_kv * group, heads_kv=heads_kv,
            d=d, seqlen_q=seqlen_q, seqlen_new=seqlen_new, cache_lens=lens,
            capacity_slack=r.choice([0, 0, 1, 5]), page_size=page_size, batch_idx=batch_idx,
            garbage_table=r.random() < 0.5, rotary=rotary, causal=r.random() < 0.5,
            window=window, softcap=r.choice([0.0, 0.0, 5.0]),
            alibi=r.choice([None, None, "heads", "batch_heads"]),
            scale=r.choice([None, None, 0.3]), return_lse=r.random() < 0.5,
            strided=r.random() < 0.3, cache_seqlens_int=cache_seqlens_int,
            seed=r.randint(0, 2**31 - 1))
        if spec_ok(spec):
            return spec
    raise AssertionError("no spec within the budget")


# ------------------------------------------------------------------------------------------
# Tensors of a spec.

@dataclass
class Case:
    spec: Spec
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k: torch.Tensor | None
    v: torch.Tensor | None
    cache_seqlens: torch.Tensor          # what the call gets (or its int, see kwargs)
    cache_batch_idx: torch.Tensor | None
    block_table: torch.Tensor | None
    alibi: torch.Tensor | None
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    buffers: list = field(default_factory=list)  # (buffer, its content before the call)

    def kwargs(self):
        s = self.spec
        return dict(
            cache_seqlens=s.cache_lens[0] if s.cache_seqlens_int else self.cache_seqlens,
            cache_batch_idx=self.cache_batch_idx, block_table=self.block_table,
            causal=s.causal, window=s.window, softcap=s.softcap, alibi_slopes=self.alibi,
            softmax_scale=s.scale, rotary_cos=self.cos, rotary_sin=self.sin,
            rotary_interleaved=bool(s.rotary and s.rotary[1]), return_lse=s.return_lse)


def _tensor(shape, spec: Spec, g, device, strided: bool, buffers: list):
    """randn of `shape` in spec's dtype; when strided, a view into a wider buffer (padded last
    dimension, rows and heads swapped), whose whole content is recorded to check later that
    nothing outside the view changed."""
    if not strided:
        return torch.randn(shape, generator=g).to(spec.dtype).to(device)
    pad = 8
    wide = (shape[0], shape[2], shape[1], shape[3] + pad)
    buffer = torch.randn(wide, generator=g).to(spec.dtype).to(device)
    buffers.append((buffer, buffer.clone()))
    return buffer.transpose(1, 2)[..., :shape[3]]


def build(spec: Spec, device="cpu") -> Case:
    g = torch.Generator().manual_seed(spec.seed)
    r = random.Random(spec.seed)
    b, hq, hkv, d = spec.batch, spec.heads_q, spec.heads_kv, spec.d
    buffers = []
    lengths = spec.lengths
    longest = max(lengths, default=0)
    q = _tensor((b, spec.seqlen_q, hq, d), spec, g, device, spec.strided, buffers)
    k = v = None
    if spec.seqlen_new is not None:
        k = _tensor((b, spec.seqlen_new, hkv, d), spec, g, device, spec.strided, buffers)
        v = _tensor((b, spec.seqlen_new, hkv, d), spec, g, device, False, buffers)
    cache_batch_idx = block_table = None
    if spec.page_size is None:
        rows = b + (3 if spec.batch_idx else 0)
        shape = (rows, longest + spec.capacity_slack, hkv, d)
        if spec.batch_idx == "perm":
            cache_batch_idx = torch.randperm(rows, generator=g)[:b].to(torch.int32)
        elif spec.batch_idx == "repeat":
            cache_batch_idx = torch.randint(0, 2, (b,), generator=g, dtype=torch.int32)
    else:
        used = max(1, math.ceil(longest / spec.page_size))
        max_pages = used + spec.capacity_slack
        num_pages = b * max_pages + 2  # two pages no sequence uses
        shape = (num_pages, spec.page_size, hkv, d)
        block_table = torch.randperm(num_pages, generator=g)[:b * max_pages].view(b, max_pages)
        block_table = block_table.to(torch.int32)
        if spec.garbage_table:  # entries past each sequence's last key are never read
            for row, length in enumerate(lengths):
                first_unused = math.ceil(length / spec.page_size)
                block_table[row, first_unused:] = r.choice([-1, num_pages, 2**31 - 1])
    k_cache = _tensor(shape, spec, g, device, spec.strided, buffers)
    v_cache = _tensor(shape, spec, g, device, spec.strided, buffers)
    alibi = None
    if spec.alibi == "heads":
        alibi = torch.rand(hq, generator=g) * 0.5
    elif spec.alibi == "batch_heads":
        alibi = torch.rand(b, hq, generator=g) * 0.5
    cos = sin = None
    if spec.rotary is not None:
        half, _, extra = spec.rotary
        seqlen_ro = max([n + max(spec.seqlen_new, spec.seqlen_q) for n in spec.cache_lens]) + extra
        inv_freq = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
        angles = torch.arange(seqlen_ro, dtype=torch.float64)[:, None] * inv_freq
        cos = angles.cos().to(spec.dtype).to(device)
        sin = angles.sin().to(spec.dtype).to(device)
    to = (lambda t: None if t is None else t.to(device))  # noqa: E731
    return Case(spec, q, k_cache, v_cache, k, v,
                torch.tensor(spec.cache_lens, dtype=torch.int32, device=device),
                to(cache_batch_idx), to(block_table), to(alibi), cos, sin, buffers)


# ------------------------------------------------------------------------------------------
# The reference.

def rotary_reference(x, cos, sin, positions, interleaved):
    """Rows x (n, heads, D) at `positions` (n,) rotated as attention_params.h defines: the first
    rotary_dim features in pairs (t, t + rotary_dim/2), or (2t, 2t + 1) when interleaved,
    float32 arithmetic, one rounding to x's dtype; the other features unchanged."""
    half = cos.shape[1]
    c = cos[positions].float()[:, None, :]
    s = sin[positions].float()[:, None, :]
    first = slice(0, 2 * half, 2) if interleaved else slice(0, half)
    second = slice(1, 2 * half, 2) if interleaved else slice(half, 2 * half)
    x1, x2 = x[..., first].float(), x[..., second].float()
    out = x.clone()
    out[..., first] = (x1 * c - x2 * s).to(x.dtype)
    out[..., second] = (x2 * c + x1 * s).to(x.dtype)
    return out


def key_address(case: Case, b: int, j: torch.Tensor):
    """(cache batch row or page, row) of keys j of sequence b."""
    if case.block_table is not None:
        ps = case.spec.page_size
        return case.block_table.cpu()[b, (j // ps).long()].long(), j % ps
    row = b if case.cache_batch_idx is None else int(case.cache_batch_idx[b])
    return torch.full_like(j, row), j


def reference(case: Case):
    """(expected k_cache, expected v_cache, the (row, position) pairs of the cache that the
    append writes, [per sequence: (q as attended, keys, values, alibi)]), on the CPU, in the
    data's dtype."""
    s = case.spec
    k_cache, v_cache = case.k_cache.cpu().clone(), case.v_cache.cpu().clone()
    interleaved = bool(s.rotary and s.rotary[1])
    follow = s.causal or s.window != (-1, -1)
    cos = None if case.cos is None else case.cos.cpu()
    sin = None if case.sin is None else case.sin.cpu()
    sequences = []
    appended = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for b in range(s.batch):
        start = s.cache_lens[b]
        if case.k is not None:
            positions = start + torch.arange(s.seqlen_new)
            k_rows = case.k[b].cpu()
            if cos is not None:
                k_rows = rotary_reference(k_rows, cos, sin, positions, interleaved)
            rows = key_address(case, b, positions)
            appended[rows] = True
            k_cache[rows] = k_rows
            v_cache[rows] = case.v[b].cpu()
    for b in range(s.batch):
        keys = key_address(case, b, torch.arange(s.lengths[b]))
        q = case.q[b].cpu()
        if cos is not None:
            positions = s.cache_lens[b] + (torch.arange(s.seqlen_q) if follow
                                           else torch.zeros(s.seqlen_q, dtype=torch.long))
            q = rotary_reference(q, cos, sin, positions, interleaved)
        alibi = None
        if case.alibi is not None:
            alibi = case.alibi.cpu() if case.alibi.ndim == 1 else case.alibi.cpu()[b:b + 1]
        sequences.append((q, k_cache[keys], v_cache[keys], alibi))
    return k_cache, v_cache, appended, sequences


def attend(sequences, spec: Spec, dtype):
    """Attention per sequence in `dtype` (float64: the reference; the data's dtype: the naive
    low-precision computation), stacked to (B, Sq, Hq, D) and lse (B, Hq, Sq)."""
    outs, lses = [], []
    for q, keys, values, alibi in sequences:
        out, lse = attention_reference(q[None].to(dtype), keys[None].to(dtype),
                                       values[None].to(dtype), causal=spec.causal,
                                       scale=spec.scale, window=spec.window,
                                       softcap=spec.softcap, alibi=alibi)
        outs.append(out[0])
        lses.append(lse[0])
    d = spec.d
    if not outs:
        return torch.empty(0, spec.seqlen_q, spec.heads_q, d, dtype=dtype), \
            torch.empty(0, spec.heads_q, spec.seqlen_q, dtype=dtype)
    return torch.stack(outs), torch.stack(lses)


def assert_padding_untouched(case: Case):
    """The columns of the wide buffers outside the strided views (their padding) unchanged."""
    for buffer, before in case.buffers:
        assert torch.equal(buffer[..., case.spec.d:].cpu(), before[..., case.spec.d:].cpu()), \
            "memory beside a view changed"


def check(case: Case, monkeypatch=None):
    """Runs the call and compares everything with the reference."""
    s = case.spec
    inputs = [t.clone() for t in (case.q, case.k, case.v, case.cache_seqlens) if t is not None]
    expected_k, expected_v, appended, sequences = reference(case)
    args = [case.q, case.k_cache, case.v_cache] + ([case.k, case.v] if case.k is not None else [])
    result = flash_attention_with_kvcache(*args, **case.kwargs())
    out, lse = result if s.return_lse else (result, None)
    assert out.shape == case.q.shape and out.dtype == s.dtype

    # the caches, bit for bit; on a GPU the rotated keys within one rounding (the kernels may
    # contract a product and a sum into one fma), every other row bit for bit
    k_cache, v_cache = case.k_cache.cpu(), case.v_cache.cpu()
    assert torch.equal(v_cache, expected_v), "v_cache"
    if case.q.device.type == "cpu" or case.cos is None:
        assert torch.equal(k_cache, expected_k), "k_cache"
    else:
        eps = torch.finfo(s.dtype).eps
        assert torch.equal(k_cache[~appended], expected_k[~appended]), "k_cache outside the append"
        assert torch.allclose(k_cache[appended].float(), expected_k[appended].float(), rtol=eps,
                              atol=eps), "k_cache"
    assert_padding_untouched(case)
    for before, after in zip(inputs, [t for t in (case.q, case.k, case.v, case.cache_seqlens)
                                      if t is not None], strict=True):
        assert torch.equal(before, after), "an input changed"

    ref, ref_lse = attend(sequences, s, torch.float64)
    if s.dtype == torch.float32:
        err = ((out.cpu().double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        assert err < 1e-5, err
    else:  # FlashAttention's criterion: within 2x the naive low-precision error
        naive, _ = attend(sequences, s, s.dtype)
        ours = (out.cpu().double() - ref).abs().max().item() if ref.numel() else 0.0
        baseline = (naive.double() - ref).abs().max().item() if ref.numel() else 0.0
        assert ours <= 2 * baseline + 1e-3, (ours, baseline)
    if lse is not None:
        assert lse.shape == (s.batch, s.heads_q, s.seqlen_q) and lse.dtype == torch.float32
        lse = lse.cpu().double()
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite)
        assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-4, rtol=1e-4)
        # rows that see no key: 0 out and -inf lse
        assert (lse[~finite] == -math.inf).all()
    return out


# ------------------------------------------------------------------------------------------
# The sweep of random specs.

SEEDS = range(150)
CPU_SPECS = [random_spec(seed) for seed in SEEDS]
GPU_SPECS = [random_spec(1000 + seed, GPU_DTYPES, [8, 16, 32, 64, 72, 96, 128, 256])
             for seed in SEEDS]


def describe(spec: Spec) -> str:
    kind = f"paged{spec.page_size}" if spec.page_size else f"dense-{spec.batch_idx or 'rows'}"
    return (f"{str(spec.dtype)[6:]}-b{spec.batch}-h{spec.heads_q}x{spec.heads_kv}-d{spec.d}"
            f"-q{spec.seqlen_q}-n{spec.seqlen_new}-{kind}")


def test_sweep_covers_the_space():
    specs = CPU_SPECS
    lengths = [n for s in specs for n in s.lengths]
    facts = {
        "dtypes": {s.dtype for s in specs} == set(CPU_DTYPES),
        "gqa": {s.heads_q // s.heads_kv for s in specs} >= {1, 2, 3, 4},
        "odd head dims": any(s.d % 2 for s in specs),
        "head dim 1 and 256": {1, 256} <= {s.d for s in specs},
        "empty caches": any(0 in s.cache_lens and not s.seqlen_new for s in specs),
        "Sq > L_b": any(s.seqlen_q > n for s in specs for n in s.lengths),
        "Sq > 1 decode": any(s.seqlen_q > 1 for s in specs),
        "no k/v": any(s.seqlen_new is None for s in specs),
        "Sn = 0": any(s.seqlen_new == 0 for s in specs),
        "long appends": any((s.seqlen_new or 0) > 20 for s in specs),
        "page size 1 and 512": {1, 512} <= {s.page_size for s in specs},
        "odd page sizes": len({s.page_size for s in specs if s.page_size and s.page_size % 2}) > 4,
        "pages spanning blocks": any(s.page_size and s.page_size < 64
                                     and max(s.lengths) > 64 for s in specs),
        "garbage in unused table entries": any(s.page_size and s.garbage_table for s in specs),
        "batch permutation": any(s.batch_idx == "perm" for s in specs),
        "repeated batch rows": any(s.batch_idx == "repeat" for s in specs),
        "rotary halves, interleaved": {r[1] for s in specs if (r := s.rotary)} == {False, True},
        "rotary_dim < D": any(s.rotary and 2 * s.rotary[0] < s.d for s in specs),
        "rotary with q positions following": any(s.rotary and (s.causal or s.window != (-1, -1))
                                                 for s in specs),
        "rotary with q at one position": any(s.rotary and not s.causal and s.window == (-1, -1)
                                             for s in specs),
        "causal": any(s.causal for s in specs),
        "windows": len({s.window for s in specs}) >= 6,
        "softcap": any(s.softcap for s in specs),
        "alibi": {s.alibi for s in specs} == {None, "heads", "batch_heads"},
        "strided views": any(s.strided for s in specs),
        "int cache_seqlens": any(s.cache_seqlens_int for s in specs),
        "return_lse": any(s.return_lse for s in specs),
        "long caches": max(lengths) > 120,
    }
    missing = [name for name, ok in facts.items() if not ok]
    assert not missing, missing


@pytest.mark.parametrize("spec", CPU_SPECS, ids=describe)
def test_matches_reference(poison, spec):
    check(build(spec))


@pytest.mark.cuda
@pytest.mark.parametrize("spec", GPU_SPECS, ids=describe)
def test_matches_reference_cuda(poison, cuda_device, spec):
    check(build(spec, cuda_device))


# ------------------------------------------------------------------------------------------
# Property test (hypothesis): the same check on specs drawn by hypothesis.

@st.composite
def specs(draw, dtypes, head_dims):
    heads_kv = draw(st.integers(1, 3))
    heads_q = heads_kv * draw(st.integers(1, 4))
    d = draw(head_dims)
    batch = draw(st.integers(1, 4))
    seqlen_new = draw(st.one_of(st.none(), st.integers(0, 3), st.integers(0, 50)))
    seqlen_q = draw(st.one_of(st.integers(1, 3), st.integers(1, 40)))
    lens = tuple(draw(st.lists(st.one_of(st.just(0), st.integers(0, 10), st.integers(0, 200)),
                               min_size=batch, max_size=batch)))
    page_size = draw(st.one_of(st.none(), st.integers(1, 20), st.integers(1, 512)))
    batch_idx = None if page_size else draw(st.sampled_from(
        [None, "perm"] + (["repeat"] if seqlen_new is None else [])))
    rotary = None
    if seqlen_new is not None and d >= 2:
        rotary = draw(st.one_of(st.none(), st.tuples(st.integers(1, d // 2), st.booleans(),
                                                     st.integers(0, 2))))
    spec = Spec(
        dtype=draw(st.sampled_from(dtypes)), batch=batch, heads_q=heads_q, heads_kv=heads_kv,
        d=d, seqlen_q=seqlen_q, seqlen_new=seqlen_new, cache_lens=lens,
        capacity_slack=draw(st.integers(0, 3)), page_size=page_size, batch_idx=batch_idx,
        garbage_table=draw(st.booleans()), rotary=rotary, causal=draw(st.booleans()),
        window=draw(st.one_of(st.just((-1, -1)), st.tuples(st.integers(-1, 8),
                                                          st.integers(-1, 8)))),
        softcap=draw(st.sampled_from([0.0, 3.0])),
        alibi=draw(st.sampled_from([None, "heads", "batch_heads"])),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 1.0))), return_lse=draw(st.booleans()),
        strided=draw(st.booleans()), cache_seqlens_int=False,
        seed=draw(st.integers(0, 2**31 - 1)))
    if not spec_ok(spec):  # shrink the cache instead of discarding the example
        spec = replace(spec, page_size=page_size and min(page_size, 16), d=min(d, 32),
                       rotary=rotary and (min(rotary[0], min(d, 32) // 2), *rotary[1:]))
    return spec


def _settings(n, gpu=False):
    checks = [HealthCheck.too_slow, HealthCheck.data_too_large]
    if gpu:
        checks.append(HealthCheck.function_scoped_fixture)
    return settings(max_examples=n, derandomize=True, database=None, deadline=None,
                    print_blob=True, suppress_health_check=checks)


@_settings(50)
@given(spec=specs(CPU_DTYPES, st.one_of(st.integers(1, 16), st.integers(1, 256))))
def test_property_cpu(spec):
    note(repr(spec))
    with pytest.MonkeyPatch.context() as mp:
        from lutflash.testing import poisoned_empty
        poisoned_empty(mp)
        check(build(spec))


@pytest.mark.cuda
@_settings(200, gpu=True)
@given(spec=specs(GPU_DTYPES, st.sampled_from([8, 16, 32, 64, 96, 128, 136, 256])))
def test_property_cuda(cuda_device, spec):
    note(repr(spec))
    with pytest.MonkeyPatch.context() as mp:
        from lutflash.testing import poisoned_empty
        poisoned_empty(mp)
        check(build(spec, cuda_device))


# ------------------------------------------------------------------------------------------
# Decoding: a prefill then token-by-token steps equal attention over the whole sequence.

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return "cpu" if request.param == "cpu" else request.getfixturevalue("cuda_device")


@pytest.mark.parametrize("page_size", [None, 7, 64])
def test_decode_steps_equal_one_attention(device, page_size):
    # a prompt of 300 tokens appended at once (B·Sn·D above the append's threshold for
    # threads), then 5 steps of one token, causal, with rotary: each step's output equals
    # flash_attention over the rotated prefix.
    g = torch.Generator().manual_seed(3)
    dtype = torch.float32 if device == "cpu" else torch.float16
    batch, heads_q, heads_kv, d, prompt, steps = 2, 4, 2, 64, 300, 5
    total = prompt + steps
    q_all = torch.randn(batch, total, heads_q, d, generator=g).to(dtype).to(device)
    k_all = torch.randn(batch, total, heads_kv, d, generator=g).to(dtype).to(device)
    v_all = torch.randn(batch, total, heads_kv, d, generator=g).to(dtype).to(device)
    angles = torch.arange(total + 3)[:, None] / 10000 ** (torch.arange(16) / 16)
    cos, sin = (f(angles).to(dtype).to(device) for f in (torch.cos, torch.sin))
    if page_size is None:
        k_cache = torch.zeros(batch, total + 3, heads_kv, d, dtype=dtype, device=device)
        table = None
    else:
        pages = math.ceil(total / page_size)
        k_cache = torch.zeros(batch * pages, page_size, heads_kv, d, dtype=dtype, device=device)
        table = torch.randperm(batch * pages, generator=g).view(batch, pages).to(torch.int32)
        table = table.to(device)
    v_cache = torch.zeros_like(k_cache)
    lens = torch.zeros(batch, dtype=torch.int32, device=device)
    outs = []
    with torch.inference_mode():
        for begin, end in [(0, prompt)] + [(t, t + 1) for t in range(prompt, total)]:
            outs.append(flash_attention_with_kvcache(
                q_all[:, begin:end], k_cache, v_cache, k_all[:, begin:end], v_all[:, begin:end],
                cache_seqlens=lens, block_table=table, causal=True, rotary_cos=cos,
                rotary_sin=sin))
            lens += end - begin
    positions = torch.arange(total)
    q_rot = torch.stack([rotary_reference(q_all[b].cpu(), cos.cpu(), sin.cpu(), positions, False)
                         for b in range(batch)])
    k_rot = torch.stack([rotary_reference(k_all[b].cpu(), cos.cpu(), sin.cpu(), positions, False)
                         for b in range(batch)])
    whole = flash_attention(q_rot.float(), k_rot.float(), v_all.cpu().float(), causal=True)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    assert torch.allclose(torch.cat(outs, 1).cpu().float(), whole, atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------
# The CPU kernel's instruction sets, and the layouts of the key rows it reads.

@pytest.mark.parametrize("variant", [1, 3], ids=["portable", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("page_size", [None, 17, 64, 1000])
def test_each_variant(variant, dtype, page_size):
    if variant == 3 and not _C.cpu_features().get("avx512f"):
        pytest.skip("AVX-512 kernel: this CPU has no AVX-512F")
    # D = 64: fp32 rows are read in place where a block lies in one page, gathered otherwise
    spec = replace(random_spec(7), dtype=dtype, batch=3, heads_q=4, heads_kv=2, d=64,
                   seqlen_q=5, seqlen_new=5, cache_lens=(200, 0, 131), page_size=page_size,
                   capacity_slack=1, batch_idx=None if page_size else "perm",
                   rotary=(16, True, 0), causal=True, window=(-1, -1), softcap=2.0,
                   alibi="heads", scale=None, strided=False, cache_seqlens_int=False)
    case = build(spec)
    _, _, _, sequences = reference(case)
    out, _ = kvcache_module._forward(
        case.q, case.k_cache, case.v_cache, case.k, case.v, case.cache_seqlens,
        case.cache_batch_idx, case.block_table, 1 / 8, 2.0, -1, 0, case.alibi, case.cos,
        case.sin, True, variant=variant)
    ref, _ = attend(sequences, spec, torch.float64)
    err = (out.double() - ref).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-5 * ref.abs().max().item()
    else:
        naive, _ = attend(sequences, spec, dtype)
        assert err <= 2 * (naive.double() - ref).abs().max().item() + 1e-3


# ------------------------------------------------------------------------------------------
# Semantics worth a test of their own.

def small(device="cpu", dtype=torch.float32, batch=2, cache=12, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g).to(dtype).to(device)  # noqa: E731
    return (make(batch, 1, 4, d), make(batch, cache, 2, d), make(batch, cache, 2, d),
            make(batch, 1, 2, d), make(batch, 1, 2, d))


def test_int_cache_seqlens_equals_the_tensor(device):
    dtype = torch.float32 if device == "cpu" else torch.float16
    q, kc, vc, k, v = small(device, dtype)
    kc2, vc2 = kc.clone(), vc.clone()
    a = flash_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=5, causal=True)
    lens = torch.full((2,), 5, dtype=torch.int32, device=device)
    b = flash_attention_with_kvcache(q, kc2, vc2, k, v, cache_seqlens=lens, causal=True)
    assert torch.equal(a, b) and torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_shared_pages_without_append():
    # two sequences reading the same prefix pages (prefix sharing), nothing appended
    q, _, _, _, _ = small()
    g = torch.Generator().manual_seed(1)
    pages = torch.randn(4, 3, 2, 16, generator=g), torch.randn(4, 3, 2, 16, generator=g)
    table = torch.tensor([[2, 0, 1], [2, 0, 3]], dtype=torch.int32)
    out = flash_attention_with_kvcache(q, *pages, cache_seqlens=torch.tensor(
        [9, 7], dtype=torch.int32), block_table=table)
    for b, length in enumerate((9, 7)):
        keys, values = (p[table[b].long()].reshape(9, 2, 16)[:length] for p in pages)
        ref, _ = attention_reference(q[b:b + 1].double(), keys[None].double(),
                                     values[None].double())
        assert torch.allclose(out[b:b + 1].double(), ref, atol=1e-6)


def test_direct_call_equals_the_op(monkeypatch):
    # Eager calls skip the dispatcher; the op gives the same results and caches, bit for bit,
    # and the direct path never calls it.
    q, kc, vc, k, v = small(seed=4)
    lens = torch.tensor([3, 8], dtype=torch.int32)
    cos, sin = torch.rand(20, 4), torch.rand(20, 4)
    kc2, vc2 = kc.clone(), vc.clone()
    direct = flash_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, causal=True,
                                          rotary_cos=cos, rotary_sin=sin, return_lse=True)
    through_op = torch.ops.lutflash.flash_attention_with_kvcache(
        q, kc2, vc2, k, v, lens, None, None, 0.25, 0.0, -1, 0, None, cos, sin, False)
    for a, b in zip(direct, through_op, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    monkeypatch.setattr(kvcache_module, "_kvcache_op",
                        lambda *a, **k: pytest.fail("the op was called"))
    with torch.inference_mode():
        flash_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens)


def test_not_differentiable():
    q, kc, vc, k, v = small()
    with pytest.raises(RuntimeError, match="q: flash_attention_with_kvcache is not differentiable"):
        flash_attention_with_kvcache(q.requires_grad_(), kc, vc, k, v, cache_seqlens=2)
    with pytest.raises(RuntimeError, match="k: .*not differentiable"):
        flash_attention_with_kvcache(q.detach(), kc, vc, k.requires_grad_(), v, cache_seqlens=2)
    with torch.no_grad():  # fine without grad mode
        out = flash_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=2)
    assert not out.requires_grad


def test_opcheck():
    q, kc, vc, k, v = small(seed=6)
    lens = torch.tensor([2, 9], dtype=torch.int32)
    table = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32)
    cos, sin = torch.rand(16, 8), torch.rand(16, 8)
    torch.library.opcheck(torch.ops.lutflash.flash_attention_with_kvcache.default,
                          (q, kc, vc, k, v, lens, None, None, 0.25, 0.0, -1, 0, None, cos, sin,
                           True))
    paged = kc.view(4, 6, 2, 16), vc.view(4, 6, 2, 16)
    torch.library.opcheck(torch.ops.lutflash.flash_attention_with_kvcache.default,
                          (q, *paged, None, None, lens, None, table, 0.25, 2.0, 3, -1,
                           torch.rand(4), None, None, False))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("paged", [False, True])
def test_torch_compile_fullgraph(backend, paged):
    # A decode step traced whole: the cache mutation is visible after the compiled call, and
    # outputs and caches equal the eager call's.
    def step(q, k_cache, v_cache, k, v, lens, table, cos, sin):
        out = flash_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens,
                                           block_table=table, causal=True, rotary_cos=cos,
                                           rotary_sin=sin)
        return out.square().sum(-1)

    torch._dynamo.reset()
    q, kc, vc, k, v = small(seed=8)
    lens = torch.tensor([4, 11], dtype=torch.int32)
    table = torch.tensor([[1, 0], [3, 2]], dtype=torch.int32) if paged else None
    if paged:
        kc, vc = kc.view(4, 6, 2, 16), vc.view(4, 6, 2, 16)
    cos, sin = torch.rand(16, 6), torch.rand(16, 6)
    kc_eager, vc_eager = kc.clone(), vc.clone()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    with torch.no_grad():
        got = compiled(q, kc, vc, k, v, lens, table, cos, sin)
        want = step(q, kc_eager, vc_eager, k, v, lens, table, cos, sin)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(kc, kc_eager) and torch.equal(vc, vc_eager)
    address = (table[[0, 1], [0, 1]].long(), torch.tensor([4, 5])) if paged else \
        (torch.tensor([0, 1]), torch.tensor([4, 11]))
    assert torch.equal(vc[address], v[:, 0])  # the mutation happened


# ------------------------------------------------------------------------------------------
# Bad input: each class refused with an error naming the argument (the public function, then
# the raw C entry point, which checks everything again).

def bad_call(**change):
    q, kc, vc, k, v = small(batch=2, cache=12, d=16, seed=9)
    args = dict(q=q, k_cache=kc, v_cache=vc, k=k, v=v)
    kwargs = dict(cache_seqlens=torch.tensor([3, 5], dtype=torch.int32))
    for name, value in change.items():
        (args if name in args else kwargs)[name] = value
    return flash_attention_with_kvcache(*args.values(), **kwargs)


def paged_cache(num_pages=4, page_size=6):
    return dict(k_cache=torch.randn(num_pages, page_size, 2, 16),
                v_cache=torch.randn(num_pages, page_size, 2, 16))


def table(*rows):
    return torch.tensor(rows, dtype=torch.int32)


BAD = [
    # page table indices out of range, where a sequence has keys
    (lambda: bad_call(**paged_cache(),
                      block_table=table([0, 4], [1, 2]),
                      cache_seqlens=torch.tensor([7, 5], dtype=torch.int32)),
     ValueError, r"block_table: expected page numbers in \[0, 4\).*got 4 at \(0, 1\)"),
    (lambda: bad_call(**paged_cache(),
                      block_table=table([0, 1], [-1, 2])), ValueError, "block_table"),
    # cache_seqlens beyond the cache (capacity 12 dense, 2 pages of 6 paged) or negative
    (lambda: bad_call(cache_seqlens=torch.tensor([3, 12], dtype=torch.int32)), ValueError,
     r"cache_seqlens: expected values in \[0, 11\].*got 12 at index 1"),
    (lambda: bad_call(cache_seqlens=13, k=None, v=None), ValueError,
     r"cache_seqlens: expected values in \[0, 12\]"),
    (lambda: bad_call(cache_seqlens=torch.tensor([-1, 0], dtype=torch.int32)), ValueError,
     "cache_seqlens"),
    (lambda: bad_call(cache_seqlens=-1), ValueError, "cache_seqlens"),
    (lambda: bad_call(k=torch.randn(2, 13, 2, 16), v=torch.randn(2, 13, 2, 16), cache_seqlens=0),
     ValueError, "k: expected at most 12 new keys per sequence"),
    (lambda: bad_call(**paged_cache(),
                      block_table=table([0, 1], [2, 3]),
                      cache_seqlens=torch.tensor([3, 12], dtype=torch.int32)), ValueError,
     "cache_seqlens"),
    # cache rows out of range
    (lambda: bad_call(k_cache=torch.randn(3, 12, 2, 16), v_cache=torch.randn(3, 12, 2, 16),
                      cache_batch_idx=torch.tensor([2, 3], dtype=torch.int32)), ValueError,
     r"cache_batch_idx: expected values in \[0, 3\)"),
    # mismatched dtypes
    (lambda: bad_call(k_cache=torch.randn(2, 12, 2, 16).half()), TypeError, "k_cache"),
    (lambda: bad_call(v_cache=torch.randn(2, 12, 2, 16).double()), TypeError, "v_cache"),
    (lambda: bad_call(k=torch.randn(2, 1, 2, 16).bfloat16()), TypeError, "k"),
    (lambda: bad_call(q=torch.randn(2, 1, 4, 16).double()), TypeError, "q"),
    (lambda: bad_call(rotary_cos=torch.rand(16, 4).half(), rotary_sin=torch.rand(16, 4).half()),
     TypeError, "rotary_cos"),
    # wrong ranks and shapes
    (lambda: bad_call(q=torch.randn(2, 4, 16)), ValueError, "q: expected a 4-D"),
    (lambda: bad_call(k_cache=torch.randn(24, 2, 16)), ValueError, "k_cache: expected a 4-D"),
    (lambda: bad_call(v_cache=torch.randn(2, 11, 2, 16)), ValueError, "v_cache: expected shape"),
    (lambda: bad_call(k_cache=torch.randn(2, 12, 3, 16), v_cache=torch.randn(2, 12, 3, 16)),
     ValueError, "k_cache: expected a number of kv heads"),
    (lambda: bad_call(k_cache=torch.randn(2, 12, 2, 8), v_cache=torch.randn(2, 12, 2, 8)),
     ValueError, "k_cache: expected shape"),
    (lambda: bad_call(k_cache=torch.randn(3, 12, 2, 16), v_cache=torch.randn(3, 12, 2, 16)),
     ValueError, "k_cache: expected batch 2"),
    (lambda: bad_call(k=torch.randn(2, 1, 1, 16), v=torch.randn(2, 1, 1, 16)), ValueError,
     "k: expected shape"),
    (lambda: bad_call(k=torch.randn(3, 1, 2, 16), v=torch.randn(3, 1, 2, 16)), ValueError,
     "k: expected shape"),
    (lambda: bad_call(v=torch.randn(2, 2, 2, 16)), ValueError, "v: expected shape"),
    (lambda: bad_call(v=None), ValueError, "v: expected k and v both"),
    (lambda: bad_call(cache_seqlens=torch.tensor([3, 5, 0], dtype=torch.int32)), ValueError,
     "cache_seqlens: expected shape"),
    (lambda: bad_call(cache_seqlens=torch.tensor([[3, 5]], dtype=torch.int32)), ValueError,
     "cache_seqlens: expected shape"),
    (lambda: bad_call(**paged_cache(),
                      block_table=torch.tensor([0, 1], dtype=torch.int32)), ValueError,
     "block_table: expected a 2-D"),
    (lambda: bad_call(**paged_cache(),
                      block_table=table([0, 1])), ValueError, "block_table: expected shape"),
    (lambda: bad_call(cache_batch_idx=torch.tensor([0], dtype=torch.int32)), ValueError,
     "cache_batch_idx: expected shape"),
    (lambda: bad_call(q=torch.randn(2, 1, 4, 257), k_cache=torch.randn(2, 12, 2, 257),
                      v_cache=torch.randn(2, 12, 2, 257), k=None, v=None), ValueError,
     "q: expected a head dim"),
    # block_table with cache_batch_idx
    (lambda: bad_call(**paged_cache(),
                      block_table=table([0, 1], [2, 3]),
                      cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32)), ValueError,
     "cache_batch_idx: expected None with block_table"),
    # rotary without k and v, rotary_dim > D (or odd D rounded up), bad shapes, short tables
    (lambda: bad_call(k=None, v=None, rotary_cos=torch.rand(16, 4), rotary_sin=torch.rand(16, 4)),
     ValueError, "rotary_cos: rotary embeddings apply to new keys"),
    (lambda: bad_call(rotary_cos=torch.rand(16, 9), rotary_sin=torch.rand(16, 9)), ValueError,
     "rotary_cos: expected rotary_dim / 2 columns"),
    (lambda: bad_call(q=torch.randn(2, 1, 4, 7), k_cache=torch.randn(2, 12, 2, 7),
                      v_cache=torch.randn(2, 12, 2, 7), k=torch.randn(2, 1, 2, 7),
                      v=torch.randn(2, 1, 2, 7), rotary_cos=torch.rand(16, 4),
                      rotary_sin=torch.rand(16, 4)), ValueError, "rotary_cos: expected rotary_dim"),
    (lambda: bad_call(rotary_cos=torch.rand(16, 0), rotary_sin=torch.rand(16, 0)), ValueError,
     "rotary_cos: expected rotary_dim"),
    (lambda: bad_call(rotary_cos=torch.rand(16, 4), rotary_sin=torch.rand(16, 3)), ValueError,
     "rotary_sin: expected shape"),
    (lambda: bad_call(rotary_cos=torch.rand(16, 4)), ValueError,
     "rotary_sin: expected rotary_cos and rotary_sin both"),
    (lambda: bad_call(rotary_cos=torch.rand(64), rotary_sin=torch.rand(64)), ValueError,
     "rotary_cos: expected a 2-D"),
    (lambda: bad_call(rotary_cos=torch.rand(5, 4), rotary_sin=torch.rand(5, 4)), ValueError,
     r"rotary_cos: expected at least 6 rows \(positions up to 5 for sequence 1\), got 5"),
    # with 3 queries, causal: q positions 5, 6, 7 for sequence 1 (7 rows are enough without)
    (lambda: bad_call(rotary_cos=torch.rand(7, 4), rotary_sin=torch.rand(7, 4),
                      q=torch.randn(2, 3, 4, 16), causal=True), ValueError,
     r"rotary_cos: expected at least 8 rows \(positions up to 7 for sequence 1\), got 7"),
    # index tensors that are not int32
    (lambda: bad_call(cache_seqlens=torch.tensor([3, 5])), TypeError,
     "cache_seqlens: expected dtype int32"),
    (lambda: bad_call(cache_seqlens=3.0), TypeError, "cache_seqlens"),
    (lambda: bad_call(cache_batch_idx=torch.tensor([1, 0])), TypeError,
     "cache_batch_idx: expected dtype int32"),
    (lambda: bad_call(**paged_cache(),
                      block_table=torch.tensor([[0, 1], [2, 3]])), TypeError,
     "block_table: expected dtype int32"),
    # tensors on different devices (the meta device stands in for a second one)
    (lambda: bad_call(cache_seqlens=torch.tensor([3, 5], dtype=torch.int32, device="meta")),
     ValueError, "cache_seqlens: expected a tensor on cpu"),
    (lambda: bad_call(k_cache=torch.randn(2, 12, 2, 16, device="meta")), ValueError,
     "k_cache: expected a tensor on cpu"),
    (lambda: bad_call(k=torch.randn(2, 1, 2, 16, device="meta")), ValueError,
     "k: expected a tensor on cpu"),
    (lambda: bad_call(**paged_cache(),
                      block_table=table([0, 1], [2, 3]).to("meta")), ValueError,
     "block_table: expected a tensor on cpu"),
    (lambda: bad_call(rotary_cos=torch.rand(16, 4, device="meta"),
                      rotary_sin=torch.rand(16, 4)), ValueError, "rotary_cos: expected a tensor"),
    # options shared with flash_attention
    (lambda: bad_call(window=(-2, 0)), ValueError, "window"),
    (lambda: bad_call(softcap=math.nan), ValueError, "softcap"),
    (lambda: bad_call(softmax_scale=0.0), ValueError, "softmax_scale"),
    (lambda: bad_call(alibi_slopes=torch.rand(3)), ValueError, "alibi_slopes"),
    (lambda: bad_call(causal=1), TypeError, "causal"),
    (lambda: bad_call(rotary_interleaved=1, rotary_cos=torch.rand(16, 4),
                      rotary_sin=torch.rand(16, 4)), TypeError, "rotary_interleaved"),
    (lambda: bad_call(return_lse="yes"), TypeError, "return_lse"),
    # caches the kernels cannot write in place
    (lambda: bad_call(k_cache=torch.randn(2, 12, 2, 16).transpose(-1, -2).contiguous()
                      .transpose(-1, -2)), ValueError, "k_cache: expected a contiguous last"),
    (lambda: bad_call(k_cache=torch.randn(2, 1, 2, 16).expand(2, 12, 2, 16)), ValueError,
     "k_cache: expected a contiguous last dimension and non-overlapping rows"),
    # heads 8 elements apart: rows of 16 overlap whatever order the strides come in
    (lambda: bad_call(k_cache=torch.randn(800).as_strided((2, 12, 2, 16), (400, 32, 8, 1))),
     ValueError, "k_cache: expected a contiguous last dimension and non-overlapping rows"),
    (lambda: (lambda buf: bad_call(k_cache=buf[0], v_cache=buf[0]))(torch.randn(1, 2, 12, 2, 16)),
     ValueError, "k_cache: must not share memory with v_cache"),
]


@pytest.mark.parametrize("call,error,match", BAD, ids=[f"{e.__name__}-{m[:40]}" for _, e, m in BAD])
def test_bad_input_is_refused(call, error, match):
    with pytest.raises(error, match=match):
        call()


def raw_call(**change):
    """_C.attention_kvcache_forward with valid CPU arguments (dense, rotary), some replaced."""
    q, kc, vc, k, v = small(seed=10)
    threads = 1
    args = dict(q=q, k_cache=kc, v_cache=vc, k=k, v=v,
                cache_seqlens=torch.tensor([3, 5], dtype=torch.int32), cache_batch_idx=None,
                block_table=None, alibi=None, sinks=None, cos=torch.rand(16, 4), sin=torch.rand(16, 4),
                q_rotated=torch.empty_like(q), out=torch.empty_like(q),
                lse=torch.empty(2, 4, 1),
                workspace=torch.empty(_C.attention_workspace_bytes(False, 16, False, threads, 4, 2,
                                                                   2), dtype=torch.uint8),
                scale=0.25, softcap=0.0, left=-1, right=0, interleaved=0, threads=threads,
                variant=0, stream=0)
    args.update(change)
    return _C.attention_kvcache_forward(*args.values())


RAW_BAD = [
    (dict(cache_seqlens=torch.tensor([3, 12], dtype=torch.int32)), ValueError, "cache_seqlens"),
    (dict(cache_seqlens=torch.tensor([3, 5], dtype=torch.int32)[None]), ValueError,
     "cache_seqlens: expected shape"),
    (dict(cache_seqlens=torch.tensor([0, 3, 0, 5], dtype=torch.int32)[1::2]), ValueError,
     "cache_seqlens: expected non-negative strides and a contiguous"),
    (dict(cache_seqlens=None), TypeError, "cache_seqlens: expected a tensor"),
    (dict(k_cache=torch.randn(4, 6, 2, 16), v_cache=torch.randn(4, 6, 2, 16),
          block_table=table([0, 1], [9, 2])), ValueError, "block_table: expected page numbers"),
    (dict(k_cache=torch.randn(4, 0, 2, 16), v_cache=torch.randn(4, 0, 2, 16),
          block_table=table([0, 1], [2, 3])), ValueError, "k_cache: expected pages of at least"),
    (dict(k_cache=torch.randn(4, 6, 2, 16), v_cache=torch.randn(4, 6, 2, 16),
          block_table=table([0, 1], [2, 3]),
          cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32)), ValueError,
     "cache_batch_idx: expected None with block_table"),
    (dict(k_cache=torch.randn(4, 2**20, 2, 16)[:, :1].expand(4, 2**20, 2, 16)), ValueError,
     "k_cache: expected a contiguous last dimension and non-overlapping rows"),
    (dict(cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32)), ValueError,
     "cache_batch_idx: expected values in"),
    (dict(cos=torch.rand(5, 4), sin=torch.rand(5, 4)), ValueError, "rotary_cos: expected at least"),
    (dict(cos=torch.rand(16, 9), sin=torch.rand(16, 9)), ValueError,
     "rotary_cos: expected rotary_dim"),
    (dict(cos=torch.rand(4, 16).t(), sin=torch.rand(16, 4)), ValueError,
     "rotary_cos: expected a contiguous tensor"),
    (dict(q_rotated=None), ValueError, "q_rotated: expected a tensor exactly when"),
    (dict(q_rotated=torch.empty(2, 1, 4, 32)[..., :16]), ValueError,
     "q_rotated: expected a contiguous tensor"),
    (dict(q_rotated=None, cos=None, sin=torch.rand(16, 4)), ValueError, "rotary_sin"),
    (dict(k=None, v=None), ValueError, "rotary_cos: rotary embeddings apply to new keys"),
    (dict(out=None), TypeError, "out: expected a tensor"),
    (dict(lse=torch.empty(2, 4, 2)), ValueError, "lse: expected shape"),
    (dict(workspace=torch.empty(64, dtype=torch.uint8)), ValueError, "workspace: expected at least"),
    (dict(interleaved=2), ValueError, "rotary_interleaved"),
    (dict(scale=math.inf), ValueError, "softmax_scale"),
    (dict(left=-2), ValueError, "window_left"),
    (dict(threads=0), ValueError, "num_threads"),
]


@pytest.mark.parametrize("change,error,match", RAW_BAD,
                         ids=[f"{e.__name__}-{m[:40]}" for _, e, m in RAW_BAD])
def test_c_layer_validates_again(change, error, match):
    raw_call()  # the valid call passes
    with pytest.raises(error, match=match):
        raw_call(**change)


def test_c_layer_reads_only_the_pages_in_use():
    # sequence 1 has 5 + 1 keys: its second page holds none and may be anything; one more key
    # and the page is read, and refused
    paged = dict(k_cache=torch.randn(4, 6, 2, 16), v_cache=torch.randn(4, 6, 2, 16))
    raw_call(**paged, block_table=table([0, 1], [2, 2**31 - 1]))
    with pytest.raises(ValueError, match=r"block_table: .* got 2147483647 at \(1, 1\)"):
        raw_call(**paged, block_table=table([0, 1], [2, 2**31 - 1]),
                 cache_seqlens=torch.tensor([3, 6], dtype=torch.int32))


def test_c_layer_refuses_outputs_sharing_memory():
    q, kc, _, _, _ = small(seed=10)  # raw_call's tensors: same seed, same shapes
    with pytest.raises(ValueError, match="k_cache: must not share memory with k"):
        raw_call(k_cache=kc, k=kc[:, :1])
    with pytest.raises(ValueError, match="out: must not share memory with q"):
        raw_call(q=q, out=q)
    with pytest.raises(ValueError, match="q_rotated: must not share memory with q"):
        raw_call(q=q, q_rotated=q)
    zeros = torch.zeros(kc.shape)  # whose first two elements are also int32 zeros
    with pytest.raises(ValueError, match="k_cache: must not share memory with cache_seqlens"):
        raw_call(k_cache=zeros, cache_seqlens=zeros.view(-1)[:2].view(torch.int32))


@pytest.mark.cuda
def test_cuda_refuses_mixed_devices(cuda_device):
    q, kc, vc, k, v = small(cuda_device, torch.float16)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="cache_seqlens: expected a tensor on"):
        flash_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens)
    with pytest.raises(ValueError, match="k_cache: expected a tensor on"):
        flash_attention_with_kvcache(q, kc.cpu(), vc, k, v, cache_seqlens=lens.to(cuda_device))
    with pytest.raises(ValueError, match="k_cache: the CUDA kernels need a head dim"):
        q, kc, vc, k, v = small(cuda_device, torch.float16, d=12)
        flash_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens.to(cuda_device))


@pytest.mark.cuda
def test_cuda_graph_capture(cuda_device):
    # No host read of a device tensor: a decode step captures into a CUDA graph, and each
    # replay appends at the lengths held in the (device) cache_seqlens tensor.
    q, kc, vc, k, v = small(cuda_device, torch.float16, cache=32)
    lens = torch.tensor([3, 5], dtype=torch.int32, device=cuda_device)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    with torch.inference_mode():
        flash_attention_with_kvcache(q, kc_ref, vc_ref, k, v, cache_seqlens=lens, causal=True)
        s = torch.cuda.Stream(cuda_device)
        s.wait_stream(torch.cuda.current_stream(cuda_device))
        with torch.cuda.stream(s):  # warm-up, off the capture
            flash_attention_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=lens)
        torch.cuda.current_stream(cuda_device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = flash_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, causal=True)
        graph.replay()
        torch.cuda.synchronize(cuda_device)
        want = flash_attention_with_kvcache(q, kc_ref.clone(), vc_ref.clone(), None, None,
                                            cache_seqlens=lens + 1, causal=True)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert torch.allclose(out.float(), want.float(), atol=1e-3)


def test_paged_caches_may_share_one_buffer():
    """transformers' paged cache: a layer's K and V pages alternate in one buffer and come as
    the views buffer[:-1] and buffer[1:] (v_cache[p] is k_cache[p + 1]); the block table names
    only even pages, so the call touches K and V pages that never coincide. Dense caches that
    overlap are still refused."""
    gen = torch.Generator().manual_seed(5)
    page, heads_kv, d = 4, 2, 8
    buffer = torch.randn(9, page, heads_kv, d, generator=gen)
    k_cache, v_cache = buffer[:-1], buffer[1:]
    table = torch.tensor([[4, 0], [2, 6]], dtype=torch.int32)
    q = torch.randn(2, 1, 4, d, generator=gen)
    k, v = torch.randn(2, 1, heads_kv, d, generator=gen), torch.randn(2, 1, heads_kv, d, generator=gen)
    lengths = torch.tensor([5, 2], dtype=torch.int32)
    expected_k = [torch.cat((k_cache[table[b, 0]], k_cache[table[b, 1]]))[:int(lengths[b])]
                  for b in range(2)]
    expected_v = [torch.cat((v_cache[table[b, 0]], v_cache[table[b, 1]]))[:int(lengths[b])]
                  for b in range(2)]
    out = flash_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths,
                                       block_table=table, causal=True)
    for b in range(2):
        keys = torch.cat((expected_k[b], k[b])).unsqueeze(0)
        values = torch.cat((expected_v[b], v[b])).unsqueeze(0)
        ref, _ = lutflash_testing.attention_reference(q[b:b + 1].double(), keys.double(),
                                                      values.double(), causal=True)
        torch.testing.assert_close(out[b:b + 1].double(), ref, atol=1e-5, rtol=1e-5)
        pages = torch.cat((k_cache[table[b, 0]], k_cache[table[b, 1]]))
        assert torch.equal(pages[int(lengths[b])], k[b, 0])
    with pytest.raises(ValueError, match="k_cache: must not share memory with v_cache"):
        flash_attention_with_kvcache(torch.randn(4, 1, 4, d), buffer[:4], buffer[1:5],
                                     cache_seqlens=1)
