"""A fast decode loop for Hugging Face causal LMs: a static KV cache and one CUDA graph per step.

`model.generate` spends most of a decode step on the host at batch 1 (Python, the logits
processors, the stopping criteria, a host synchronization per token), which a 3-bit model's short
GPU step cannot hide. `StaticGenerator` removes all of that:

1. the prompt is run eagerly into a `transformers.StaticCache` of `max_length` tokens;
2. one decode step (the model's forward of one token per sequence, the choice of the next token,
   the end-of-sequence bookkeeping, the position update) is captured in a `torch.cuda.CUDAGraph`
   whose inputs and outputs are static device buffers;
3. each further token is one `graph.replay()`: no Python per layer, no allocation, no host
   synchronization (except the optional end-of-sequence check, every `eos_check_every` tokens).

The same step runs eagerly where there is no graph (`cuda_graph=False`, and always on the CPU), so
its logic is tested on the CPU against `model.generate`.

Works with LutLinear layers (`lutflash.patch_model`). Captures the step for attn_implementation
"sdpa" and "lutflash" (with a static cache and no padding mask, lutflash attention reads the valid
cache length on the device: see `lutflash.integrations.transformers.lutflash_attention_mask`);
"eager" attention runs the same loop without a graph (transformers' eager mask copies a host scalar
to the device each step, which a CUDA graph cannot capture). Batches must not be padded: every
sequence of a batch has the same prompt length (an `attention_mask` with zeros is refused).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

__all__ = ["StaticGenerator", "generate"]

# attention implementations whose decode step with a static cache is capturable (tested on the
# GPU; transformers' "eager" builds its mask from a host scalar each step, which is not)
GRAPH_ATTENTION = ("sdpa", "lutflash")
MAX_EOS_TOKENS = 16


def _forward_parameters(model) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def _token_ids(name: str, value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    values = [value] if isinstance(value, int) else list(value)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise TypeError(f"{name}: expected an int, a sequence of ints or None, got {value!r}")
    return values


class StaticGenerator:
    """Greedy or sampled decoding of `model` with a static KV cache and, on a GPU, a CUDA graph.

    model: a transformers causal LM (`model(input_ids, position_ids, cache=..., use_cache=True)`
        returning `.logits`), in eval mode, on one device. Its config's attn_implementation
        must be "sdpa" or "lutflash" for graphs (any implementation runs eagerly).
    batch_size, max_length: the shape of the cache, prompt + new tokens at most; a generator
        serves any number of `generate` calls of that batch size whose prompt + max_new_tokens
        fit, reusing its cache and its graph (captured at the first call).
    cuda_graph: None (the default) captures a graph when the model is on a CUDA device with a
        capturable attention implementation and runs eagerly otherwise; True requires both
        (ValueError otherwise); False always runs eagerly.
    eos_check_every: with an end-of-sequence token, the host reads "has every sequence
        finished?" every this many tokens (one synchronization each; the tokens after a sequence
        finished are pad tokens, as in model.generate, and the result is cut where every sequence
        had finished, so it equals model.generate's whatever this is). 0 never checks: all
        max_new_tokens steps run.

    Not thread-safe; one generator per model and thread.
    """

    def __init__(self, model: torch.nn.Module, batch_size: int, max_length: int, *,
                 cuda_graph: bool | None = None, eos_check_every: int = 16):
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"model: expected a transformers model (an nn.Module with a config), "
                            f"got {type(model).__name__}")
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.max_length = _check_int("max_length", max_length, 2)
        self.eos_check_every = _check_int("eos_check_every", eos_check_every, 0)
        if cuda_graph is not None and not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph: expected a bool or None, got {type(cuda_graph).__name__}")
        parameter = next(iter(model.parameters()), None)
        buffer = next(iter(model.buffers()), None)
        reference = parameter if parameter is not None else buffer
        if reference is None:
            raise ValueError("model: has no parameters or buffers to tell its device")
        self.device = reference.device
        attn = getattr(model.config, "_attn_implementation", None)
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda" and attn in GRAPH_ATTENTION
        if cuda_graph:
            if self.device.type != "cuda":
                raise ValueError(f"cuda_graph=True: the model is on {self.device}; CUDA graphs "
                                 "need a model on a CUDA device (pass cuda_graph=None or False)")
            if attn not in GRAPH_ATTENTION:
                raise ValueError(f"cuda_graph=True: attn_implementation {attn!r} is not supported "
                                 f"in the captured decode step; use one of {GRAPH_ATTENTION} or "
                                 "cuda_graph=False")
        self.cuda_graph = cuda_graph
        self.model = model

        from transformers import StaticCache

        parameters = _forward_parameters(model)
        # transformers 5.x renamed forward's past_key_values to cache (the old name warns);
        # earlier 5.x releases take cache_position too
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self._cache_position = "cache_position" in parameters
        self._logits_to_keep = "logits_to_keep" in parameters
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_length)

        vocab = model.config.get_text_config().vocab_size
        batch, device = self.batch_size, self.device
        # the step's static buffers: inputs and state read by the step, written by the step
        self._token = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self._position = torch.zeros((1,), dtype=torch.long, device=device)
        self._finished = torch.zeros((batch,), dtype=torch.bool, device=device)
        self._index = torch.zeros((1,), dtype=torch.long, device=device)  # column of _tokens
        self._tokens = torch.zeros((batch, self.max_length), dtype=torch.long, device=device)
        # per call settings, read by the step (device scalars, so a graph serves every call)
        self._eos = torch.full((MAX_EOS_TOKENS,), -1, dtype=torch.long, device=device)
        self._pad = torch.zeros((), dtype=torch.long, device=device)
        self._inv_temperature = torch.ones((), dtype=torch.float32, device=device)
        self._vocab = vocab
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_key = None

    # The step: the forward of the current token, the next token into the buffers.
    def _forward(self, input_ids, position_ids, logits_to_keep: bool):
        kwargs = {self._cache_arg: self.cache, "use_cache": True}
        if self._cache_position:
            kwargs["cache_position"] = position_ids[0]
        if logits_to_keep and self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return self.model(input_ids=input_ids, position_ids=position_ids, **kwargs).logits[:, -1]

    def _choose(self, logits: torch.Tensor, sample: bool, generator) -> torch.Tensor:
        """The next token (B,) of the last logits (B, vocab): argmax, or a sample of
        softmax(logits / temperature) drawn with the Gumbel-max trick (no host work)."""
        logits = logits.float()
        if sample:
            uniform = torch.rand(logits.shape, device=logits.device, generator=generator)
            gumbel = -torch.log(-torch.log(uniform.clamp_(1e-20, 1.0)))
            logits = logits * self._inv_temperature + gumbel
        return logits.argmax(-1)

    def _record(self, token: torch.Tensor, track_eos: bool) -> None:
        """Writes the chosen token (B,) as the next input and into the output columns."""
        if track_eos:
            token = torch.where(self._finished, self._pad, token)
            self._finished |= (token[:, None] == self._eos).any(-1)  # isin cannot be captured
        self._token.copy_(token[:, None])
        self._tokens.index_copy_(1, self._index, token[:, None])
        self._index += 1

    def _step(self, sample: bool, generator, track_eos: bool) -> None:
        position_ids = self._position[None, :].expand(self.batch_size, 1)
        logits = self._forward(self._token, position_ids, logits_to_keep=False)
        self._record(self._choose(logits, sample, generator), track_eos)
        self._position += 1

    def _state(self) -> list[torch.Tensor]:
        """The tensors a step changes besides the k/v values it writes at the current position
        (which the real step rewrites): the buffers and StaticCache layers' lengths."""
        state = [self._token, self._position, self._finished, self._index]
        for layer in getattr(self.cache, "layers", ()):
            length = getattr(layer, "cumulative_length", None)
            if isinstance(length, torch.Tensor):
                state.append(length)
        return state

    def _capture(self, sample: bool, generator, track_eos: bool) -> None:
        """Captures one step in a CUDA graph, after a warm-up step on a side stream (as
        torch.cuda.graphs requires), then restores the state the warm-up step advanced."""
        saved = [t.clone() for t in self._state()]
        # the warm-up step draws random numbers: put the generator back after the capture, so
        # that a call's samples depend on its seed only, not on whether it captured the graph
        rng = None
        if sample:  # (a parameter's CUDA device always has its index)
            rng = generator if generator is not None else \
                torch.cuda.default_generators[self.device.index]
        rng_state = rng.get_state() if rng is not None else None
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._step(sample, generator, track_eos)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if sample and generator is not None:
            register = getattr(graph, "register_generator_state", None)
            if register is None:
                raise RuntimeError("generator: this torch cannot replay a custom generator in a "
                                   "CUDA graph (CUDAGraph.register_generator_state); pass "
                                   "generator=None (the default CUDA generator) or "
                                   "cuda_graph=False")
            register(generator)
        with torch.cuda.graph(graph):
            self._step(sample, generator, track_eos)
        for tensor, value in zip(self._state(), saved, strict=True):
            tensor.copy_(value)
        if rng is not None:
            rng.set_state(rng_state)
        self._graph = graph

    def _check_input_ids(self, input_ids, attention_mask) -> int:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids: expected a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids: expected dtype int64 or int32 (token ids), got "
                            f"{input_ids.dtype}")
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids: expected shape ({self.batch_size}, prompt_length >= 1) "
                             f"(the generator's batch_size), got {tuple(input_ids.shape)}")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids: expected a tensor on {self.device} (the model's "
                             f"device), got {input_ids.device}")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask: expected None or a tensor of shape "
                                 f"{tuple(input_ids.shape)} (the shape of input_ids)")
            if not bool(attention_mask.bool().all()):
                raise ValueError("attention_mask: padded batches are not supported by the static "
                                 "decode loop (every sequence must have the same prompt length); "
                                 "generate them one by one or use model.generate")
        return input_ids.shape[1]

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *,
                 attention_mask: torch.Tensor | None = None,
                 eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, do_sample: bool = False,
                 temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Returns the prompt followed by the generated tokens, (B, prompt + n) int64, like
        `model.generate(input_ids, max_new_tokens=..., do_sample=False)` with the same
        eos_token_id and pad_token_id (n < max_new_tokens when every sequence ended).

        eos_token_id: None (no end-of-sequence token: exactly max_new_tokens are generated), an
            int or a sequence of ints. Unlike model.generate, the model's generation_config is
            not read: pass model.generation_config.eos_token_id to stop where it would.
        pad_token_id: what follows a finished sequence's end token; defaults to the first
            eos_token_id.
        do_sample: sample from softmax(logits / temperature) (no top-k/top-p) with `generator`
            (on the model's device; None uses torch's default generator of that device).
        """
        _check_int("max_new_tokens", max_new_tokens, 1)
        prompt = self._check_input_ids(input_ids, attention_mask)
        if prompt + max_new_tokens > self.max_length:
            raise ValueError(f"input_ids: a prompt of {prompt} tokens plus max_new_tokens="
                             f"{max_new_tokens} exceeds the generator's max_length "
                             f"{self.max_length}")
        eos = _token_ids("eos_token_id", eos_token_id)
        if len(eos) > MAX_EOS_TOKENS:
            raise ValueError(f"eos_token_id: at most {MAX_EOS_TOKENS} tokens, got {len(eos)}")
        for name, ids in (("eos_token_id", eos), ("pad_token_id", _token_ids("pad_token_id",
                                                                               pad_token_id))):
            if any(not 0 <= i < self._vocab for i in ids):
                raise ValueError(f"{name}: expected token ids in [0, {self._vocab}), got {ids}")
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
        if not isinstance(do_sample, bool):
            raise TypeError(f"do_sample: expected a bool, got {type(do_sample).__name__}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not temperature > 0:
            raise ValueError(f"temperature: expected a float > 0, got {temperature!r}")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator: expected a torch.Generator or None, got "
                                f"{type(generator).__name__}")
            if generator.device.type != self.device.type:
                raise ValueError(f"generator: expected a generator on {self.device.type} (the "
                                 f"model's device), got one on {generator.device}")
        track_eos = bool(eos)

        # settings and state for this call (in place: a captured graph reads these buffers)
        self._eos.copy_(torch.tensor(eos + [-1] * (MAX_EOS_TOKENS - len(eos)), dtype=torch.long))
        self._pad.fill_(pad_token_id)
        self._inv_temperature.fill_(1.0 / temperature)
        self._finished.zero_()
        self._tokens.zero_()
        self._index.zero_()
        self.cache.reset()

        # prefill, eager
        positions = torch.arange(prompt, device=self.device)[None, :].expand(self.batch_size, -1)
        logits = self._forward(input_ids.long(), positions, logits_to_keep=True)
        self._record(self._choose(logits, do_sample, generator), track_eos)
        self._position.fill_(prompt)

        # decode: max_new_tokens - 1 more steps
        key = (do_sample, generator, track_eos)
        if self.cuda_graph and max_new_tokens > 1 and (self._graph is None
                                                       or self._graph_key != key):
            self._graph = None
            self._capture(do_sample, generator, track_eos)
            self._graph_key = key
        done = 1
        while done < max_new_tokens:
            if track_eos and self.eos_check_every and done % self.eos_check_every == 0 \
                    and bool(self._finished.all()):
                break
            if self._graph is not None:
                self._graph.replay()
            else:
                self._step(do_sample, generator, track_eos)
            done += 1

        tokens = self._tokens[:, :done]
        if track_eos:  # cut where every sequence had finished, as model.generate stops there
            ended = torch.isin(tokens, self._eos)
            finished_at = torch.where(ended.any(1), ended.float().argmax(1), done).max()
            tokens = tokens[:, :int(finished_at) + 1] if int(finished_at) < done else tokens
        return torch.cat((input_ids.long(), tokens.clone()), dim=1)


def generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
             cuda_graph: bool | None = None, eos_check_every: int = 16, **kwargs) -> torch.Tensor:
    """One call of StaticGenerator(model, batch, prompt + max_new_tokens).generate(...): the
    cache is allocated and, on a GPU, the step captured on each call (a few forward passes'
    time); keep a StaticGenerator to reuse them across calls. Keyword arguments are
    StaticGenerator.generate's (attention_mask, eos_token_id, pad_token_id, do_sample,
    temperature, generator)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids: expected a 2-D (batch, prompt_length) tensor of token ids, "
                         f"got {type(input_ids).__name__} "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    _check_int("max_new_tokens", max_new_tokens, 1)
    runner = StaticGenerator(model, input_ids.shape[0], input_ids.shape[1] + max_new_tokens,
                             cuda_graph=cuda_graph, eos_check_every=eos_check_every)
    return runner.generate(input_ids, max_new_tokens, **kwargs)
