"""Block-scaled FP8 (e4m3) export of linear weights, in the layout SGLang's block-FP8 loader reads.

Layout (DeepSeek-V3 / Qwen3-FP8 checkpoints; SGLang ``python/sglang/srt/layers/quantization/fp8.py``,
``Fp8LinearMethod.create_weights`` with ``weight_block_size``, registers ``weight_scale_inv`` of shape
(ceil(N/bn), ceil(K/bk)); float32 scales, not the UE8M0 ones of its DeepGEMM/Blackwell mode):
``<prefix>.weight`` is ``float8_e4m3fn`` of the original shape (N, K), and ``<prefix>.weight_scale_inv``
is float32 of shape (ceil(N/128), ceil(K/128)), one scale per 128x128 block, with
``dequant = weight.float() * weight_scale_inv`` broadcast over the block. The engine's config must carry
``quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
"weight_block_size": [128, 128]}`` (``fp8_quantization_config``).

Two quantisers give identical bits: nvidia-modelopt's ``FP8QTensor`` (used when it imports) and a
pure-torch reference (CPU-testable). Per block ``s = amax / 448``, ``q = round_e4m3(x / s)``.

Error bound (what the tests check). e4m3 keeps 3 mantissa bits, so round-to-nearest of a normal value
y (|y| >= 2^-6) errs by at most half an ulp, |y| * 2^-4; below 2^-6 the subnormal spacing is 2^-9,
so the error is at most 2^-10. Scaling back by s, for every element of a block:
``|x - dequant(x)| <= max(|x| * 2^-4, s * 2^-10)`` with ``s = amax_block / 448``; in particular
``<= amax_block * 2^-4``. (|x/s| <= 448 = e4m3's max, so nothing saturates.)
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import torch

FP8_E4M3_MAX = 448.0
BLOCK = 128


def fp8_quantization_config(*, block: int = BLOCK) -> dict:
    """The ``quantization_config`` an HF/SGLang config needs to load block-FP8 weights."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [block, block]}


FP8_ROLLOUT_ENGINES = ("sglang", "sglang_server")


def check_fp8_rollout_engine(engine: str, *, field: str = "rollout.weights_fp8") -> None:
    """Config-time check: block-FP8 rollout weights go only to an SGLang engine (its block-FP8 linear
    registers ``weight_scale_inv``; the embedded engine's and vLLM's parameter sets do not take them)."""
    if engine not in FP8_ROLLOUT_ENGINES:
        raise ValueError(f"{field}=true needs rollout.engine in {FP8_ROLLOUT_ENGINES} (an engine serving a "
                         f"block-FP8 model), got {engine!r}")


def require_fp8_rollout(*, field: str = "rollout.weights_fp8") -> None:
    """Start-up check before the first sync: an engine computing in FP8 needs a CUDA GPU."""
    if not torch.cuda.is_available():
        raise ValueError(f"{field}=true needs a CUDA GPU (the engine's block-FP8 GEMMs); none is visible")


def _block_view(x_NK: torch.Tensor, block: int) -> tuple[torch.Tensor, int, int]:
    n, k = x_NK.shape
    nb, kb = math.ceil(n / block), math.ceil(k / block)
    padded = torch.nn.functional.pad(x_NK, (0, kb * block - k, 0, nb * block - n))
    return padded.view(nb, block, kb, block), nb, kb


def _block_scale_inv(blocks: torch.Tensor) -> torch.Tensor:
    """Per-block ``amax / 448`` of a ``_block_view``; an all-zero block gets scale 1 (it quantises to exact
    zeros either way, and amax/448 would divide by zero)."""
    amax = blocks.abs().amax(dim=(1, 3))
    return torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))


def quantize_fp8_block_torch(weight_NK: torch.Tensor, *, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference: return (``float8_e4m3fn`` weight (N, K), float32 ``scale_inv`` (N/b, K/b))."""
    if weight_NK.dim() != 2:
        raise ValueError(f"block FP8 quantises 2-D weights, got shape {tuple(weight_NK.shape)}")
    x = weight_NK.float()
    blocks, nb, kb = _block_view(x, block)
    scale_inv = _block_scale_inv(blocks)
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    n, k = weight_NK.shape
    return q.view(nb * block, kb * block)[:n, :k].contiguous(), scale_inv


def dequantize_fp8_block(q_NK: torch.Tensor, scale_inv: torch.Tensor, *, block: int = BLOCK,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of the quantisers (what the engine computes): ``q * scale_inv`` per block."""
    n, k = q_NK.shape
    expanded = scale_inv.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    return (q_NK.float() * expanded).to(dtype)


def _modelopt_available() -> bool:
    try:
        from modelopt.torch.quantization.qtensor import FP8QTensor  # noqa: F401
    except Exception:  # ImportError, or a modelopt that fails to import against this torch
        return False
    return True


def quantize_fp8_block_modelopt(weight_NK: torch.Tensor, *, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """nvidia-modelopt's block quantiser (``FP8QTensor.quantize``; its scales are amax/448 = scale_inv)."""
    try:
        from modelopt.torch.quantization.qtensor import FP8QTensor
    except ImportError as e:
        raise ImportError("FP8 export via modelopt needs `pip install fipo_megatron[modelopt]`") from e
    if weight_NK.dim() != 2:
        raise ValueError(f"block FP8 quantises 2-D weights, got shape {tuple(weight_NK.shape)}")
    x = weight_NK.float()
    # modelopt's own scales are amax/448 unguarded: an all-zero block gives 0/0 = NaN. Pass guarded ones.
    blocks, nb, kb = _block_view(x, block)
    scale_inv = _block_scale_inv(blocks)
    qtensor, _ = FP8QTensor.quantize(x, scales=scale_inv, block_sizes={-1: block, -2: block})
    return qtensor._quantized_data.contiguous(), scale_inv


def quantize_fp8_block(weight_NK: torch.Tensor, *, block: int = BLOCK,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Block-FP8 quantise one weight; ``backend`` is "modelopt", "torch", or "auto" (modelopt if it imports)."""
    if backend not in ("auto", "modelopt", "torch"):
        raise ValueError(f"backend must be 'auto', 'modelopt' or 'torch', got {backend!r}")
    if backend == "modelopt" or (backend == "auto" and _modelopt_available()):
        return quantize_fp8_block_modelopt(weight_NK, block=block)
    return quantize_fp8_block_torch(weight_NK, block=block)


def is_fp8_linear(name: str, tensor: torch.Tensor) -> bool:
    """Default choice of what to quantise: the decoder's 2-D projection weights (attention q/k/v/o and
    MLP gate/up/down), as block-FP8 checkpoints do; embeddings, lm_head, norms and biases stay high precision."""
    return tensor.dim() == 2 and ".layers." in name and name.endswith("_proj.weight")


def to_fp8_named_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]], *, block: int = BLOCK,
                         backend: str = "auto",
                         select: Callable[[str, torch.Tensor], bool] = is_fp8_linear
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """Map HF-named tensors to their block-FP8 export: a selected ``x.weight`` becomes ``x.weight``
    (float8_e4m3fn) followed by ``x.weight_scale_inv``; everything else passes through unchanged."""
    for name, tensor in named_tensors:
        if select(name, tensor):
            q, scale_inv = quantize_fp8_block(tensor, block=block, backend=backend)
            yield name, q
            yield name[: -len("weight")] + "weight_scale_inv", scale_inv
        else:
            yield name, tensor
