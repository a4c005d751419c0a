"""Block-FP8 quantise/dequantise: the e4m3 error bound derived in weights/fp8.py, layout, both backends."""

from __future__ import annotations

import math

import pytest
import torch

from fipo_megatron.weights import fp8


def _weights():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 260, generator=g)                     # ragged edge blocks (300 = 2*128 + 44)
    w[:128, 128:256] *= 1e-4                                   # a tiny-valued block (subnormals)
    w[130:140, :] = torch.randn(10, 260, generator=g) * 50     # outliers in one block row
    w[256:, 256:] = 0.0                                        # an all-zero block
    return w


def _check_bound(w, q, scale_inv):
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (math.ceil(300 / 128), math.ceil(260 / 128))
    deq = fp8.dequantize_fp8_block(q, scale_inv)
    s = scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :260]
    err = (w - deq).abs()
    bound = torch.maximum(w.abs() * 2.0 ** -4, s * 2.0 ** -10) * (1 + 1e-6)
    assert bool((err <= bound).all()), (err - bound).max()
    # The coarse per-block form of the bound, and that it is nearly attained (the test can fail).
    amax = s * fp8.FP8_E4M3_MAX
    assert bool((err <= amax * 2.0 ** -4).all())
    assert (err / w.abs().clamp_min(1e-30))[w.abs() > s * 2 ** -6].max() > 2.0 ** -4 * 0.8
    # Each block's amax maps to 448 exactly, so it round-trips (up to the fp32 scale division).
    assert torch.equal(deq[256:, 256:], torch.zeros(44, 4))
    return deq


@pytest.mark.parametrize("backend", ["torch", "modelopt"])
def test_fp8_block_quantise_bound(backend):
    if backend == "modelopt" and not fp8._modelopt_available():
        pytest.skip("nvidia-modelopt not installed")
    w = _weights()
    q, scale_inv = fp8.quantize_fp8_block(w, backend=backend)
    _check_bound(w, q, scale_inv)


def test_backends_agree_and_named_export():
    w = _weights()
    q_t, s_t = fp8.quantize_fp8_block_torch(w)
    if fp8._modelopt_available():
        q_m, s_m = fp8.quantize_fp8_block_modelopt(w)
        torch.testing.assert_close(s_m, s_t, rtol=0, atol=0)
        assert torch.equal(q_m.view(torch.uint8), q_t.view(torch.uint8))
    named = [("model.layers.0.self_attn.q_proj.weight", w), ("model.layers.0.self_attn.q_proj.bias", w[0]),
             ("model.embed_tokens.weight", w), ("model.layers.0.input_layernorm.weight", w[0])]
    out = list(fp8.to_fp8_named_tensors(named, backend="torch"))
    assert [n for n, _ in out] == ["model.layers.0.self_attn.q_proj.weight",
                                   "model.layers.0.self_attn.q_proj.weight_scale_inv",
                                   "model.layers.0.self_attn.q_proj.bias", "model.embed_tokens.weight",
                                   "model.layers.0.input_layernorm.weight"]
    assert out[0][1].dtype == torch.float8_e4m3fn and torch.equal(out[1][1], s_t)
    assert out[3][1] is w
    assert fp8.fp8_quantization_config()["weight_block_size"] == [128, 128]
    with pytest.raises(ValueError, match="2-D"):
        fp8.quantize_fp8_block_torch(w[0])
