"""lutflash: LUT-GEMM for binary-coding-quantized weights and FlashAttention for PyTorch.

    import lutflash
    qweight = lutflash.quantize(linear.weight, bits=3, group_size=128, method="alternating")
    y = lutflash.lutgemm(x, qweight, bias)
    model = lutflash.quantize_model(model, bits=3)   # nn.Linear -> lutflash.nn.LutLinear
    lutflash.quantize_model(model, bits=3, method="gptq", calibration=batches)  # calibrated
    out = lutflash.flash_attention(q, k, v, causal=True)
    out = lutflash.flash_attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens)
    qweight = lutflash.from_gptq(qweight, qzeros, scales, g_idx, bits=4, group_size=128)
    model = lutflash.from_quantized_pretrained("Llama-2-7B-GPTQ")  # a GPTQ/AWQ folder
"""

from . import _C, gptq, integrations, nn  # integrations registers "lutflash" with transformers, lazily
from .attention import flash_attention, flash_attention_varlen
from .bcq import FORMAT_VERSION, BCQWeight, quantize
from .decode_ops import apply_rotary, rms_norm, silu_mul
from .kvcache import flash_attention_with_kvcache
from .checkpoints import from_quantized_pretrained
from .convert import from_awq, from_gptq, load_quantized_state_dict
from .lora import LoraLutLinear, add_lora
from .lutgemm import lutgemm  # the function: lutflash.lutgemm; the module is sys.modules["lutflash.lutgemm"]
from .nn import LutLinear, quantize_model
from .patch import patch_model

__version__ = "0.1.0"

built_with_cuda = _C.built_with_cuda()

__all__ = ["BCQWeight", "FORMAT_VERSION", "LoraLutLinear", "LutLinear", "add_lora", "apply_rotary",
           "built_with_cuda",
           "flash_attention", "flash_attention_varlen", "flash_attention_with_kvcache",
           "from_awq", "from_gptq",
           "from_quantized_pretrained", "gptq", "integrations",
           "load_quantized_state_dict", "lutgemm", "nn",
           "patch_model", "quantize", "quantize_model", "rms_norm", "silu_mul"]
