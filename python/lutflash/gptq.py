"""Calibrated quantization: GPTQ into lutflash's BCQ format, in torch, on the weight's device.

GPTQ (Frantar et al., ICLR 2023) quantizes a Linear layer's weight W (n, k) column by column,
and after each column spreads its rounding error over the columns not yet quantized, through
the inverse of the Hessian H = 2/N Σ xᵀx of the layer's inputs x (the layer's output error on
those inputs is what it minimizes). Here:

- H is dampened by `damp` × mean(diag H) on its diagonal; a column whose input is always zero
  (diag H = 0, a "dead" column) gets H = 1 there and weight 0 (its value never matters).
- The upper Cholesky factor of H⁻¹ drives the updates; columns go in blocks (128 by default)
  whose error reaches the later columns in one matrix product (lazy batch updates). Blocks
  are aligned so that every group starts a block or lies inside one.
- When a column starts a new group, that group's parameters are fitted on the group's
  *current* weights (the original ones plus every error update so far):
  - mode "uniform": lutflash's rtn grid (asymmetric min/max scale s and zero point; codes by
    round-to-nearest), exactly as ``quantize(method="rtn")`` computes it;
  - mode "general": greedy BCQ, then up to `rounds` rounds of alternating least squares
    (alphas and offset for the codes, then the nearest level for each weight), the best kept;
  then each column's codes are chosen against those parameters as the column is quantized
  (general: the nearest of the 2^bits levels).
- Parameters are rounded to the metadata dtype before any code is chosen, and the quantized
  column is computed with the same float32 operations as ``BCQWeight.dequantize``: the packed
  result dequantizes to exactly the weights the error feedback used.

Public entry points: ``lutflash.quantize(weight, bits, group_size, method="gptq",
hessian=H)``, :class:`HessianAccumulator` (H from a layer's inputs), and
``lutflash.quantize_model(model, method="gptq", calibration=batches)`` which calibrates a
Hugging Face decoder layer by layer (:func:`quantize_model_calibrated`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .bcq import WORD_K, BCQWeight, meta_per_group
from .bcq_torch import fit_bcq, pack_codes, rtn_codes, rtn_divisor, rtn_grid

__all__ = ["HessianAccumulator", "gptq_quantize", "pack_codes", "quantize_model_calibrated"]

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK = 128


class HessianAccumulator:
    """H = 2/N Σ xᵀx over the rows x of a Linear layer's inputs (N rows in all), kept as a
    running mean in float32 on the inputs' device (float64 inputs: float64).

        acc = HessianAccumulator(linear.in_features)
        for x in inputs: acc.add_batch(x)        # x: (..., in_features)
        qweight = lutflash.quantize(linear.weight, 3, 128, method="gptq", hessian=acc.hessian)
    """

    def __init__(self, in_features: int):
        if not isinstance(in_features, int) or isinstance(in_features, bool) or in_features < 1:
            raise ValueError(f"in_features: expected a positive int, got {in_features!r}")
        self.in_features = in_features
        self.hessian: torch.Tensor | None = None
        self.count = 0

    def add_batch(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected shape (..., {self.in_features}), got {tuple(x.shape)}")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        rows = x.detach().reshape(-1, self.in_features).to(dtype)
        m = rows.shape[0]
        if m == 0:
            return
        if self.hessian is None:
            self.hessian = torch.zeros(self.in_features, self.in_features, dtype=dtype,
                                       device=rows.device)
        self.hessian *= self.count / (self.count + m)
        self.count += m
        rows = rows * math.sqrt(2.0 / self.count)
        self.hessian += rows.t() @ rows


def _sign_patterns(bits: int, device) -> torch.Tensor:
    """(2^bits, bits) float: entry [p, i] = +1 if bit i of p is set, else −1."""
    p = torch.arange(1 << bits, device=device).unsqueeze(-1)
    return (((p >> torch.arange(bits, device=device)) & 1) * 2 - 1).to(torch.float64)


def _levels(alpha: torch.Tensor, offset: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """(n, 2^bits) float32 level values z + Σ α_i·b_i, summed in the order and precision of
    BCQWeight.dequantize (float32, z first, then plane 0, 1, ...)."""
    signs = patterns.to(torch.float32)
    out = offset.to(torch.float32).unsqueeze(-1).expand(-1, signs.shape[0]).clone()
    for i in range(signs.shape[1]):
        out += alpha[:, i:i + 1].to(torch.float32) * signs[:, i]
    return out


class _Group:
    """One group's fitted parameters (rounded to the metadata dtype) and its column quantizer.
    The fits are the data-free quantizers' own (lutflash.bcq_torch): the rtn grid, or greedy
    plus alternating least squares."""

    def __init__(self, w: torch.Tensor, bits: int, mode: str, rounds: int, meta_dtype,
                 patterns: torch.Tensor):
        self.mode, self.bits = mode, bits
        if mode == "uniform":
            s, self.zp, z = rtn_grid(w, bits, meta_dtype)  # s rounded to meta_dtype for the codes
            z = z.to(torch.float32).to(meta_dtype).to(torch.float64)
            self.divisor = rtn_divisor(s)
            self.params = torch.stack([s, z], 1)
            powers = torch.pow(2.0, torch.arange(bits, device=w.device, dtype=torch.float32) - 1.0)
            alpha = s.to(torch.float32).unsqueeze(1) * powers
        else:
            _, alpha, z = fit_bcq(w, bits, rounds)
            alpha = alpha.to(torch.float32).to(meta_dtype)
            z = z.to(torch.float32).to(meta_dtype)
            self.params = torch.cat([alpha, z.unsqueeze(1)], 1).to(torch.float64)
        self.levels = _levels(alpha.to(torch.float32), z.to(torch.float32), patterns)

    def quantize(self, column: torch.Tensor, codes: torch.Tensor, values: torch.Tensor) -> None:
        """Writes the codes (int64) and the quantized values (float32) of one column (n,) of
        current weights into `codes` and `values` (contiguous (n,) each)."""
        if self.mode == "uniform":
            codes.copy_(rtn_codes(column, self.divisor, self.zp, self.bits))
        else:
            torch.argmin((column.unsqueeze(1) - self.levels).abs_(), dim=1, out=codes)
        torch.gather(self.levels, 1, codes.unsqueeze(1), out=values.unsqueeze(1))


def _block_size(k: int, group_size: int, block_size: int) -> int:
    """Columns per block, such that every group starts a block or lies inside one."""
    if group_size == k:
        return min(block_size, k)
    if group_size <= block_size:
        return group_size * (block_size // group_size)
    for size in range(block_size, 0, -1):  # a divisor of the group size
        if group_size % size == 0 and size % WORD_K == 0:
            return size
    return group_size


def gptq_decide(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                mode: str, *, rounds: int = 15, damp: float = DEFAULT_DAMP,
                block_size: int = DEFAULT_BLOCK, meta_dtype: torch.dtype = torch.float32):
    """The GPTQ loop; returns (codes (n, k) int64, params (n, groups, m), decided (n, k)
    float32), everything on the weight's device. Arguments are checked by the caller
    (lutflash.quantize)."""
    device = weight.device
    n, k = weight.shape
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=device, dtype=torch.float64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    chol, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise ValueError("hessian: not positive definite after dampening; pass a larger damp or "
                         "the Hessian of real inputs (2/N Σ xᵀx)")
    upper = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True).to(torch.float32)

    patterns = _sign_patterns(bits, device)
    # column c of the result is row c here: each column's codes and values are written in place
    codes = torch.empty(k, n, dtype=torch.int64, device=device)
    decided = torch.empty(k, n, dtype=torch.float32, device=device)
    params = torch.zeros(n, k // group_size, meta_per_group(bits, mode), dtype=torch.float64,
                         device=device)
    step = _block_size(k, group_size, block_size)
    group = None
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        W1 = W[:, i1:i2].clone()
        errors = torch.empty(i2 - i1, n, dtype=torch.float32, device=device)
        inverse = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                # the group's current weights: at a block's start W holds every update so far;
                # a group starting inside a block lies inside it (_block_size)
                current = W[:, col:col + group_size] if i == 0 else W1[:, i:i + group_size]
                group = _Group(current, bits, mode, rounds, meta_dtype, patterns)
                params[:, col // group_size] = group.params
            w = W1[:, i]
            group.quantize(w, codes[col], decided[col])
            err = errors[i]
            torch.sub(w, decided[col], out=err)
            err.div_(inverse[i, i])
            if i + 1 < i2 - i1:  # the block's later columns; this one is decided
                W1[:, i + 1:].addr_(err, inverse[i, i + 1:], alpha=-1)
        if i2 < k:
            W[:, i2:].addmm_(errors.t(), upper[i1:i2, i2:], alpha=-1)
    return codes.t(), params, decided.t()


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                  mode: str, *, rounds: int = 15, damp: float = DEFAULT_DAMP,
                  block_size: int = DEFAULT_BLOCK,
                  meta_dtype: torch.dtype = torch.float32) -> BCQWeight:
    """GPTQ into a packed BCQWeight on the weight's device (see the module docstring); use
    lutflash.quantize(..., method="gptq", hessian=H), which checks the arguments."""
    codes, params, _ = gptq_decide(weight, hessian, bits, group_size, mode, rounds=rounds,
                                   damp=damp, block_size=block_size, meta_dtype=meta_dtype)
    return pack_codes(codes, params, bits, group_size, mode, meta_dtype)


def check_hessian(hessian, k: int) -> None:
    if not isinstance(hessian, torch.Tensor):
        raise TypeError(f"hessian: expected a ({k}, {k}) torch.Tensor (2/N Σ xᵀx of the layer's "
                        f"inputs), got {type(hessian).__name__}")
    if not hessian.is_floating_point():
        raise TypeError(f"hessian: expected a floating-point tensor, got {hessian.dtype}")
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian: expected shape ({k}, {k}) (in_features squared), got "
                         f"{tuple(hessian.shape)}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian: has non-finite values")
    if bool((torch.diagonal(hessian) < 0).any()):
        raise ValueError("hessian: has negative diagonal entries (not 2/N Σ xᵀx)")


# ---------------------------------------------------------------------------------------------
# Model level: sequential calibration of a decoder's layers.

# Where Hugging Face causal LMs keep their decoder layers.
LAYER_PATHS = ("model.layers", "model.language_model.layers", "transformer.h",
               "model.decoder.layers", "decoder.layers", "gpt_neox.layers", "layers")


class _StopForward(Exception):
    pass


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, ModuleList) of the model's decoder layers; ValueError where none is found."""
    for path in LAYER_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return path, layers
    raise ValueError(
        f"model: calibrated quantization runs decoder layers one by one and found none in "
        f"{type(model).__name__} (looked for a ModuleList at {', '.join(LAYER_PATHS)}); "
        "supported: Hugging Face decoder-only causal LMs (Llama, Mistral, Qwen2, Gemma, OPT, GPT-2, "
        "GPT-NeoX, ...)")


def check_calibration(calibration) -> list:
    """A non-empty list or tuple of batches: integer token-id tensors (seq,) or (batch, seq),
    or dicts of the model's keyword arguments holding "input_ids" (or "inputs_embeds")."""
    if isinstance(calibration, (torch.Tensor, str, bytes)) or not isinstance(calibration, Sequence):
        raise TypeError(f"calibration: expected a list of batches (token-id tensors or dicts of "
                        f"model inputs), got {type(calibration).__name__}")
    if len(calibration) == 0:
        raise ValueError("calibration: expected at least one batch, got an empty list")
    for index, batch in enumerate(calibration):
        name = f"calibration[{index}]"
        if isinstance(batch, Mapping):
            if "input_ids" not in batch and "inputs_embeds" not in batch:
                raise ValueError(f"{name}: a dict batch needs 'input_ids' or 'inputs_embeds', got "
                                 f"keys {sorted(batch)}")
            ids = batch.get("input_ids")
            if ids is not None:
                _check_ids(ids, f"{name}['input_ids']")
        elif isinstance(batch, torch.Tensor):
            _check_ids(batch, name)
        else:
            raise TypeError(f"{name}: expected a token-id tensor or a dict of model inputs, got "
                            f"{type(batch).__name__}")
    return list(calibration)


def _check_ids(ids, name: str) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer token ids, got {ids.dtype}")
    if ids.ndim not in (1, 2) or ids.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty (seq,) or (batch, seq) tensor of token "
                         f"ids, got shape {tuple(ids.shape)}")


def _as_kwargs(batch, device) -> dict:
    if isinstance(batch, Mapping):
        kwargs = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                  for key, value in batch.items()}
    else:
        kwargs = {"input_ids": batch.to(device)}
    ids = kwargs.get("input_ids")
    if ids is not None and ids.ndim == 1:
        kwargs["input_ids"] = ids.unsqueeze(0)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim == 1:
        kwargs["attention_mask"] = mask.unsqueeze(0)
    kwargs["use_cache"] = False
    return kwargs


def _hidden_of(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def quantize_model_calibrated(model: nn.Module, targets: list[tuple[str, nn.Linear]],
                              calibration: list, make_layer: Callable, progress: bool,
                              awq: tuple | None = None) -> list[str]:
    """Sequential GPTQ of `targets` (name, nn.Linear) of `model`.

    The inputs of the first decoder layer are captured for every calibration batch (a hook
    stops the forward pass there); then each decoder layer in turn, and inside it each stage
    of Linears in the order the layer calls them (q/k/v, then o, then gate/up, then down for a
    Llama layer): the stage's target Linears accumulate the Hessians of their inputs while the
    layer runs on all batches, are quantized by ``make_layer(name, linear, hessian)`` (which
    returns the LutLinear) and replaced; the now-quantized layer runs again to give the next
    layer its inputs. Every Linear is thus calibrated on the inputs it gets in the final
    model, everything before it already quantized. With awq = (bits, group_size, search
    method), each layer
    first gets the AWQ-style scale search (:func:`awq_layer`) on its calibration inputs. Target
    Linears outside
    the decoder layers (e.g. an untied lm_head) are calibrated last, on one forward pass of
    the whole quantized model. Returns the names of the replaced modules.
    """
    path, layers = find_decoder_layers(model)
    first_param = next(model.parameters())
    device = first_param.device
    was_training = model.training
    model.eval()
    replaced = []

    def replace(name, new):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        replaced.append(name)

    def quantize_group(items, run):
        """Hooks the Linears `items`, runs `run()`, quantizes and replaces them."""
        accumulators = {name: HessianAccumulator(linear.in_features) for name, linear in items}
        handles = [linear.register_forward_hook(
            lambda module, args, output, acc=accumulators[name]: acc.add_batch(args[0]))
            for name, linear in items]
        try:
            run()
        finally:
            for handle in handles:
                handle.remove()
        for name, linear in items:
            acc = accumulators[name]
            if acc.hessian is None:
                raise ValueError(f"{name}: the calibration batches never reached this layer")
            replace(name, make_layer(name, linear, acc.hessian))

    try:
        # 1. the first layer's inputs, one (args, kwargs) per batch
        captured = []

        def capture(module, args, kwargs):
            captured.append((args, kwargs))
            raise _StopForward

        handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            for batch in calibration:
                try:
                    model(**_as_kwargs(batch, device))
                except _StopForward:
                    pass
        finally:
            handle.remove()
        if len(captured) != len(calibration):
            raise ValueError(f"model: the forward pass did not reach {path}[0]")

        by_layer: dict[int, list] = {}
        outside = []
        prefix = path + "."
        for name, linear in targets:
            head, _, rest = name.partition(prefix) if name.startswith(prefix) else ("", "", "")
            index = rest.split(".", 1)[0] if rest else ""
            if index.isdigit() and int(index) < len(layers):
                by_layer.setdefault(int(index), []).append((name, linear))
            else:
                outside.append((name, linear))

        # 2. layer by layer
        for index in tqdm(range(len(layers)), desc="lutflash: calibrating", unit="layer",
                          disable=not progress):
            layer = layers[index]

            def run_layer(layer=layer):
                return [_hidden_of(layer(*args, **kwargs)) for args, kwargs in captured]

            if awq is not None and index in by_layer:
                awq_layer(layer, captured, *awq)
            for stage in _stages(layer, by_layer.get(index, []), captured[0]):
                quantize_group(stage, run_layer)
            outputs = run_layer()
            captured = [_with_hidden(args, kwargs, out)
                        for (args, kwargs), out in zip(captured, outputs, strict=True)]

        # 3. the rest (e.g. lm_head): one pass of the quantized model
        if outside:
            def run_model():
                for batch in calibration:
                    model(**_as_kwargs(batch, device))
            quantize_group(outside, run_model)
    finally:
        model.train(was_training)
    return replaced


def _stages(layer: nn.Module, items: list, call) -> list[list]:
    """The layer's target Linears in the order the layer calls them, consecutive calls on one
    input tensor (q/k/v, gate/up) in one stage: each stage is then calibrated on the outputs of
    the stages before it, already quantized. Linears the layer does not call come last."""
    if not items:
        return []
    order, inputs = [], []
    names = {id(linear): name for name, linear in items}

    def record(module, args):
        if id(module) in names and names[id(module)] not in order:
            order.append(names[id(module)])
            inputs.append(args[0])

    handles = [linear.register_forward_pre_hook(record) for _, linear in items]
    try:
        layer(*call[0], **call[1])
    finally:
        for handle in handles:
            handle.remove()
    by_name = dict(items)
    stages: list[list] = []
    for position, name in enumerate(order):
        if position and inputs[position] is inputs[position - 1]:
            stages[-1].append((name, by_name[name]))
        else:
            stages.append([(name, by_name[name])])
    missing = [(name, linear) for name, linear in items if name not in order]
    return stages + ([missing] if missing else [])


# AWQ-style scale search (Lin et al., MLSys 2024): for a group of Linear layers reading one
# input that a preceding module produces by a per-channel product (a norm's weight, or the rows
# of a Linear), scale the input channels down by s and the Linear layers' columns up by s: the
# full-precision function is unchanged, while the channels that carry large activations get
# finer quantization. s = mean|x|^a (normalized), with a picked on a grid to minimize the
# layers' output error on the calibration inputs after round-to-nearest quantization.

# (preceding module, the Linear layers it feeds), as names inside a decoder layer
AWQ_PAIRS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
             ("self_attn.v_proj", ("self_attn.o_proj",)),
             ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
             ("mlp.up_proj", ("mlp.down_proj",)),
             ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
             ("self_attn.v_proj", ("self_attn.out_proj",)),
             ("final_layer_norm", ("fc1",)))
AWQ_GRID = 20


def _get(module: nn.Module, name: str):
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def _scale_output(module: nn.Module, scale: torch.Tensor, probe_width: int) -> bool:
    """Divides `module`'s output channels by `scale` in place if that is exact for it (an
    nn.Linear's rows and bias, or a norm whose output is weight·normalized (+ bias), checked on
    a probe); returns False, leaving the module as it was, otherwise."""
    if isinstance(module, nn.Linear):
        if module.out_features != scale.numel():
            return False
        module.weight.div_(scale.to(module.weight.dtype).unsqueeze(1))
        if module.bias is not None:
            module.bias.div_(scale.to(module.bias.dtype))
        return True
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (scale.numel(),):
        return False
    bias = getattr(module, "bias", None)
    probe = torch.randn(4, probe_width, generator=torch.Generator().manual_seed(0)).to(
        device=weight.device, dtype=weight.dtype)
    before = module(probe).float()
    saved = (weight.detach().clone(), bias.detach().clone() if isinstance(bias, torch.Tensor) else None)
    weight.div_(scale.to(weight.dtype))
    if isinstance(bias, torch.Tensor):
        bias.div_(scale.to(bias.dtype))
    after = module(probe).float()
    want = before / scale.float().to(before.device)
    tolerance = 1e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if ((after - want).norm() / want.norm().clamp_min(1e-30)).item() > tolerance:
        weight.copy_(saved[0])  # e.g. Gemma's (1 + weight) norm: not a per-channel product
        if saved[1] is not None:
            bias.copy_(saved[1])
        return False
    return True


def _awq_search(x: torch.Tensor, linears: list[nn.Linear], bits: int, group_size,
                method: str) -> torch.Tensor:
    """The input scales s (in_features,) minimizing Σ ||x Wᵀ − (x/s) Q(W·s)ᵀ||² over the grid
    s = mean|x|^(i/AWQ_GRID), i = 0 (no scaling) .. AWQ_GRID − 1; Q is lutflash.quantize with
    `method` (a data-free one)."""
    from .bcq import quantize

    x = x.to(torch.float32)
    magnitude = x.abs().mean(0).clamp_min(1e-8)
    weights = [linear.weight.detach().to(torch.float32) for linear in linears]
    refs = [x @ w.t() for w in weights]
    best, best_scale = None, torch.ones_like(magnitude)
    for i in range(AWQ_GRID):
        scale = magnitude.pow(i / AWQ_GRID)
        scale = scale / (scale.max() * scale.min()).sqrt()
        err = 0.0
        for w, ref in zip(weights, refs, strict=True):
            q = quantize(w * scale, bits, group_size, method).dequantize().to(x.device) / scale
            err += (x @ q.t() - ref).square().sum().item()
        if best is None or err < best:
            best, best_scale = err, scale
    return best_scale


@torch.no_grad()
def awq_layer(layer: nn.Module, captured: list, bits: int, group_size,
              method: str = "rtn") -> list[str]:
    """AWQ scale search and folding for one decoder layer run on `captured` (args, kwargs)
    calls, the search quantizing with `method` ("rtn", "greedy" or "alternating"); returns the names of the preceding modules whose scales were folded (the pairs of
    AWQ_PAIRS that the layer has, shapes allowing). The layer's full-precision function is
    unchanged (up to rounding)."""
    pairs = []
    for prev_name, names in AWQ_PAIRS:
        prev = _get(layer, prev_name)
        linears = [_get(layer, name) for name in names]
        if prev is None or any(not isinstance(lin, nn.Linear) for lin in linears):
            continue
        if len({lin.in_features for lin in linears}) != 1:
            continue
        pairs.append((prev_name, prev, linears))
    if not pairs:
        return []
    inputs: dict[int, list] = {id(pair[2][0]): [] for pair in pairs}
    handles = [pair[2][0].register_forward_hook(
        lambda module, args, output: inputs[id(module)].append(
            args[0].detach().reshape(-1, args[0].shape[-1])))
        for pair in pairs]
    try:
        for args, kwargs in captured:
            layer(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    folded = []
    for prev_name, prev, linears in pairs:
        x = torch.cat(inputs[id(linears[0])])
        k = linears[0].in_features
        group = k if group_size in (None, -1) else group_size
        scale = _awq_search(x, linears, bits, group, method)
        if bool((scale == 1).all()) or not _scale_output(prev, scale, k):
            continue
        for linear in linears:
            linear.weight.mul_(scale.to(linear.weight.dtype))
        folded.append(prev_name)
    return folded


def _with_hidden(args, kwargs, hidden):
    """The layer's call with its hidden states (first positional or "hidden_states") replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = hidden
    return args, kwargs
