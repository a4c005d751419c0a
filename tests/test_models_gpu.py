"""GPU: the Transformer Engine layer spec in bf16 against transformers (skipped without CUDA + TE)."""

from __future__ import annotations

import pytest
import torch

from fipo_megatron.testing.distributed import run_distributed
from fipo_megatron.testing.tiny_models import tiny_hf_config, tiny_hf_model

pytestmark = pytest.mark.gpu


def _te_forward_worker(rank, world_size, family, full_sd, seqs):
    from megatron.core.packed_seq_params import PackedSeqParams

    from fipo_megatron.models import build_gpt_model, load_full_state_dict
    from fipo_megatron.models.builder import resolve_backend
    from fipo_megatron.parallel import ParallelConfig, initialize_parallel

    torch.cuda.set_device(0)
    hf = tiny_hf_config(family)
    parallel = ParallelConfig()
    groups = initialize_parallel(parallel, hf_config=hf)
    assert resolve_backend("auto") == "te"
    model = build_gpt_model(hf, groups=groups, params_dtype=torch.bfloat16, backend="te").eval()
    assert any("layer_norm_weight" in n for n, _ in model.named_parameters()), "not the TE spec"
    load_full_state_dict([model], {k: v.to(torch.bfloat16) for k, v in full_sd.items()}, groups=groups)
    lengths = [len(s) for s in seqs]
    cu = torch.tensor([0] + torch.cumsum(torch.tensor(lengths), 0).tolist(), dtype=torch.int32, device="cuda")
    packed = torch.cat(seqs)[None].cuda()
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                             max_seqlen_kv=max(lengths))
    with torch.no_grad():
        out = model(packed, torch.arange(packed.shape[1], device="cuda")[None], None, packed_seq_params=params)
    return out.float().cpu(), cu.cpu()


def test_te_spec_bf16_forward_matches_transformers():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("transformer_engine.pytorch")
    from conftest import hf_reference_logits, hf_to_megatron_full

    family = "qwen3"
    hf_model = tiny_hf_model(family, seed=3)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, hf_model.config.vocab_size, (n,), generator=g) for n in (16, 9, 31)]
    ref = hf_reference_logits(hf_model, seqs)  # fp32 on CPU
    [(logits, cu)] = run_distributed(_te_forward_worker, 1, args=(family, hf_to_megatron_full(hf_model), seqs),
                                     timeout=300, backend="nccl")
    cu = cu.tolist()
    for i, r in enumerate(ref):
        got = logits[0, cu[i]:cu[i + 1]]
        # bf16 weights and activations: compare at bf16 resolution relative to the logit scale
        torch.testing.assert_close(got, r, atol=5e-2 * r.abs().max().item(), rtol=0)
        assert (got.argmax(-1) == r.argmax(-1)).float().mean() > 0.9
