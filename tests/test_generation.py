"""lutflash.generation: the static-cache decode loop (eager on the CPU, CUDA graphs on a GPU)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lutflash  # noqa: E402
from lutflash.generation import StaticGenerator, generate  # noqa: E402

PROMPT, NEW = 9, 12


def tiny_llama(attn: str, patched: bool = False, dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128,
                                      initializer_range=0.1)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    model = model.eval().requires_grad_(False)
    if patched:
        lutflash.patch_model(model, attention=attn == "lutflash",
                             linear=dict(bits=3, group_size=64, method="rtn", progress=False))
    return model.to(device=device, dtype=dtype)


def hf_greedy(model, ids, new=NEW, **kwargs):
    kwargs.setdefault("eos_token_id", None)
    kwargs.setdefault("pad_token_id", 0)
    # explicit: without it, generate treats prompt tokens equal to pad_token_id as padding
    kwargs.setdefault("attention_mask", torch.ones_like(ids))
    return model.generate(ids, do_sample=False, max_new_tokens=new, **kwargs)


def full_forward_argmax_holds(model, tokens, prompt):
    """Every generated token is the argmax of one full forward over the sequence (no cache)."""
    with torch.inference_mode():
        logits = model(input_ids=tokens[:, :-1]).logits
    return bool((logits.argmax(-1)[:, prompt - 1:] == tokens[:, prompt:]).all())


@pytest.mark.parametrize("patched", [False, True], ids=["plain", "patched"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", "lutflash"])
@pytest.mark.parametrize("batch", [1, 3])
def test_tokens_equal_model_generate(attn, patched, batch):
    model = tiny_llama(attn, patched)
    ids = torch.randint(0, 256, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
    out = generate(model, ids, NEW)
    assert out.shape == (batch, PROMPT + NEW) and out.dtype == torch.int64
    assert torch.equal(out[:, :PROMPT], ids)
    assert torch.equal(out, hf_greedy(model, ids))
    assert full_forward_argmax_holds(model, out, PROMPT)


def test_generator_reused_across_calls_and_lengths():
    model = tiny_llama("lutflash", patched=True)
    runner = StaticGenerator(model, batch_size=2, max_length=40)
    for prompt, new in ((9, 12), (5, 20), (9, 1), (30, 10)):
        ids = torch.randint(0, 256, (2, prompt), generator=torch.Generator().manual_seed(prompt))
        assert torch.equal(runner.generate(ids, new), hf_greedy(model, ids, new))


def test_int32_input_ids_and_all_ones_attention_mask():
    model = tiny_llama("sdpa")
    ids = torch.randint(0, 256, (2, PROMPT), generator=torch.Generator().manual_seed(0))
    out = generate(model, ids.int(), NEW, attention_mask=torch.ones_like(ids))
    assert torch.equal(out, hf_greedy(model, ids))


@pytest.mark.parametrize("check_every", [0, 1, 4])
def test_eos_stops_like_model_generate(check_every):
    model = tiny_llama("sdpa")
    ids = torch.randint(0, 256, (3, PROMPT), generator=torch.Generator().manual_seed(3))
    free = hf_greedy(model, ids, 20)
    eos = int(free[0, PROMPT + 4])  # a token the first sequence emits at its 5th step
    ref = hf_greedy(model, ids, 20, eos_token_id=eos, pad_token_id=7)
    out = generate(model, ids, 20, eos_token_id=eos, pad_token_id=7, eos_check_every=check_every)
    assert torch.equal(out, ref)
    # a list of end tokens, padding with the first
    eos_list = [eos, int(free[1, PROMPT + 2])]
    ref = hf_greedy(model, ids, 20, eos_token_id=eos_list, pad_token_id=eos_list[0])
    out = generate(model, ids, 20, eos_token_id=eos_list, eos_check_every=check_every)
    assert torch.equal(out, ref)


def test_sampling_reproducible_and_cold_temperature_is_greedy():
    model = tiny_llama("sdpa")
    ids = torch.randint(0, 256, (2, PROMPT), generator=torch.Generator().manual_seed(4))
    first = generate(model, ids, NEW, do_sample=True, generator=torch.Generator().manual_seed(9))
    again = generate(model, ids, NEW, do_sample=True, generator=torch.Generator().manual_seed(9))
    assert torch.equal(first, again)
    assert int(first.min()) >= 0 and int(first.max()) < 256
    assert not torch.equal(first, hf_greedy(model, ids))  # 24 tokens: ties are not likely
    cold = generate(model, ids, NEW, do_sample=True, temperature=1e-6,
                    generator=torch.Generator().manual_seed(9))
    assert torch.equal(cold, hf_greedy(model, ids))


SYNCING_OPS = ("_local_scalar_dense", "nonzero", "is_nonzero", "item", "equal")


class _SyncWatch(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten ops that read a tensor's values on the host (a synchronization on a
    GPU, which a CUDA graph capture refuses)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNCING_OPS:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("attn", ["sdpa", "eager", "lutflash"])
def test_decode_step_reads_nothing_on_the_host(attn):
    """The step a CUDA graph captures, run on the CPU under a dispatch mode: no op in it reads
    tensor values on the host (what would synchronize, and fail a capture, on a GPU)."""
    model = tiny_llama(attn, patched=True)
    runner = StaticGenerator(model, batch_size=2, max_length=PROMPT + NEW)
    ids = torch.randint(0, 256, (2, PROMPT), generator=torch.Generator().manual_seed(5))
    runner.generate(ids, 2, eos_token_id=3)
    watch = _SyncWatch()
    with torch.inference_mode(), watch:
        runner._step(False, None, True)
    assert watch.seen == []


def test_static_cache_without_mask_matches_sdpa_for_lutflash():
    """model(..., cache=StaticCache) with no attention_mask: lutflash attends to the valid
    prefix of the static cache only (it used to attend to the unused zero keys too)."""
    from transformers import StaticCache

    ids = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(6))
    logits = {}
    for attn in ("sdpa", "lutflash"):
        model = tiny_llama(attn)
        cache = StaticCache(config=model.config, max_cache_len=20)
        with torch.inference_mode():
            steps = [model(input_ids=ids, cache=cache, use_cache=True).logits]
            token = steps[-1][:, -1:].argmax(-1)
            for i in range(3):
                steps.append(model(input_ids=token, position_ids=torch.full((3, 1), 7 + i),
                                   cache=cache, use_cache=True).logits)
                token = torch.full((3, 1), 11 + i)
        logits[attn] = torch.cat(steps, dim=1)
    torch.testing.assert_close(logits["lutflash"], logits["sdpa"], rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_argument():
    model = tiny_llama("sdpa")
    ids = torch.randint(0, 256, (2, PROMPT))
    with pytest.raises(ValueError, match="cuda_graph=True"):
        StaticGenerator(model, 2, 32, cuda_graph=True)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, 0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, -3)
    with pytest.raises(TypeError, match="max_new_tokens"):
        generate(model, ids, 2.0)
    with pytest.raises(ValueError, match="input_ids.*max_length 12"):
        StaticGenerator(model, 2, 12).generate(ids, 4)
    with pytest.raises(TypeError, match="input_ids.*int64"):
        generate(model, ids.float(), 4)
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, ids[0], 4)
    with pytest.raises(ValueError, match="input_ids.*batch_size|input_ids.*shape"):
        StaticGenerator(model, 3, 32).generate(ids, 4)
    padded = torch.ones_like(ids)
    padded[1, :2] = 0
    with pytest.raises(ValueError, match="attention_mask.*padded"):
        generate(model, ids, 4, attention_mask=padded)
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(model, ids, 4, eos_token_id=256)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, ids, 4, do_sample=True, temperature=0.0)
    with pytest.raises(TypeError, match="batch_size"):
        StaticGenerator(model, "2", 32)
    with pytest.raises(TypeError, match="model"):
        StaticGenerator(torch.nn.Linear(2, 2), 1, 8)


# GPU: the captured graph gives the eager loop's tokens.

@pytest.mark.cuda
@pytest.mark.parametrize("attn", ["sdpa", "lutflash"])
@pytest.mark.parametrize("batch", [1, 4])
def test_cuda_graph_tokens_equal_eager_loop(cuda_device, attn, batch):
    model = tiny_llama(attn, patched=True, dtype=torch.float16, device=cuda_device)
    ids = torch.randint(0, 256, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
    ids = ids.to(cuda_device)
    eager = generate(model, ids, 24, cuda_graph=False)
    runner = StaticGenerator(model, batch, PROMPT + 24, cuda_graph=True)
    graphed = runner.generate(ids, 24)
    assert runner._graph is not None
    assert torch.equal(graphed, eager)
    assert torch.equal(runner.generate(ids, 24), eager)  # the graph replayed by a second call
    eos = int(eager[0, PROMPT + 5])
    assert torch.equal(runner.generate(ids, 24, eos_token_id=eos),
                       generate(model, ids, 24, cuda_graph=False, eos_token_id=eos))


@pytest.mark.cuda
def test_eager_attention_runs_without_graph(cuda_device):
    # transformers' eager mask copies a host scalar each step: not capturable, so the default
    # runs the loop eagerly and cuda_graph=True is refused
    model = tiny_llama("eager", patched=True, device=cuda_device)  # float32: no near-ties
    ids = torch.randint(0, 256, (2, PROMPT)).to(cuda_device)
    runner = StaticGenerator(model, 2, PROMPT + 8)
    assert not runner.cuda_graph
    out = runner.generate(ids, 8)
    assert runner._graph is None
    assert torch.equal(out, hf_greedy(model, ids, 8))
    with pytest.raises(ValueError, match="attn_implementation 'eager'"):
        StaticGenerator(model, 2, PROMPT + 8, cuda_graph=True)


@pytest.mark.cuda
def test_cuda_graph_sampling_reproducible(cuda_device):
    model = tiny_llama("lutflash", patched=True, dtype=torch.float16, device=cuda_device)
    ids = torch.randint(0, 256, (2, PROMPT)).to(cuda_device)
    runner = StaticGenerator(model, 2, PROMPT + 16, cuda_graph=True)
    torch.manual_seed(3)
    first = runner.generate(ids, 16, do_sample=True)
    torch.manual_seed(3)
    again = runner.generate(ids, 16, do_sample=True)
    assert torch.equal(first, again)
