"""Local-spec core attention on packed (THD) batches: ours vs a padded batch vs a dense packed mask.

    python tools/benchmarks/bench_local_attention.py            # 8 sequences, lengths 128..2048, CPU
    python tools/benchmarks/bench_local_attention.py --quick    # seconds
    python tools/benchmarks/bench_local_attention.py --device cuda

The local layer spec is the CPU / no-Transformer-Engine path. Three ways to run causal attention over
the same RL micro-batch (sequences of very different lengths), forward + backward, fp32:
- ``padded_megatron``: megatron-core's own local ``DotProductAttention`` on the batch right-padded to the
  longest sequence ([L_max, B] layout: O(B * L_max^2) work, what the local spec did before THD support);
- ``dense_packed``: one SDPA over the whole pack with a dense block-diagonal causal mask (O(T^2) work and
  a T x T mask: the naive THD implementation);
- ``ours``: ``fipo_megatron.models.cp_attention.LocalCoreAttention`` on THD input (one causal SDPA per
  sequence: O(sum L_i^2)).
Outputs of ``ours`` and ``dense_packed`` are checked equal on the real tokens. Time: best of --repeats.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def _config(num_heads, num_groups, head_dim, cp=1):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=num_heads * head_dim, num_attention_heads=num_heads,
                             num_query_groups=num_groups, kv_channels=head_dim, attention_dropout=0.0,
                             masked_softmax_fusion=False, attention_softmax_in_fp32=True,
                             context_parallel_size=cp, use_cpu_initialization=True)


def _timed(fn, repeats):
    best = float("inf")
    out = None
    for _ in range(repeats + 1):  # first run warms up
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from fipo_megatron.models.cp_attention import LocalCoreAttention
    from fipo_megatron.parallel import apply_cpu_compat

    apply_cpu_compat()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    dev = torch.device(args.device)
    heads, groups, hd = (4, 2, 32) if args.quick else (8, 2, 64)
    g = torch.Generator().manual_seed(0)
    lengths = [64, 200, 17, 120] if args.quick else [2048, 1500, 900, 600, 400, 256, 180, 128]
    total, max_len = sum(lengths), max(lengths)
    cu = torch.tensor([0] + torch.cumsum(torch.tensor(lengths), 0).tolist(), dtype=torch.int32)
    q = torch.randn(total, heads, hd, generator=g).to(dev)
    k = torch.randn(total, groups, hd, generator=g).to(dev)
    v = torch.randn(total, groups, hd, generator=g).to(dev)
    cfg = _config(heads, groups, hd)
    ours = LocalCoreAttention(cfg, 1).to(dev)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len,
                             max_seqlen_kv=max_len)

    def run_ours():
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = ours(qq, kk, vv, None, packed_seq_params=params)
        out.sum().backward()
        return out.detach()

    seq_id = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(dev)
    idx = torch.arange(total, device=dev)
    dense_mask = (seq_id[:, None] == seq_id[None, :]) & (idx[None, :] <= idx[:, None])

    def run_dense():
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        rep = heads // groups
        out = F.scaled_dot_product_attention(qq.transpose(0, 1), kk.repeat_interleave(rep, 1).transpose(0, 1),
                                             vv.repeat_interleave(rep, 1).transpose(0, 1), attn_mask=dense_mask)
        out = out.transpose(0, 1).reshape(total, heads * hd)
        out.sum().backward()
        return out.detach()

    from megatron.core import parallel_state

    if parallel_state._GLOBAL_MEMORY_BUFFER is None:  # Megatron's DPA takes its score buffer from here
        parallel_state._set_global_memory_buffer()
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(0, tp_rank=0, ep_rank=0, etp_rank=0)  # its dropout region forks the tracker
    pg = types.SimpleNamespace(tp=types.SimpleNamespace(size=lambda: 1))
    megatron_dpa = DotProductAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=pg).to(dev)

    def pad(x):
        out = x.new_zeros(max_len, len(lengths), *x.shape[1:])
        for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            out[: b - a, i] = x[a:b]
        return out

    qp, kp, vp = pad(q), pad(k), pad(v)

    def run_padded():
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (qp, kp, vp))
        out = megatron_dpa(qq, kk, vv, None, attn_mask_type=AttnMaskType.causal)
        out.sum().backward()
        return out.detach()

    t_ours, out_ours = _timed(run_ours, args.repeats)
    t_dense, out_dense = _timed(run_dense, args.repeats)
    t_pad, _ = _timed(run_padded, args.repeats)
    err = (out_ours - out_dense).abs().max().item()
    work = {"ours": sum(n * n for n in lengths), "dense_packed": total * total,
            "padded_megatron": len(lengths) * max_len * max_len}
    print(f"device={dev} heads={heads} kv_groups={groups} head_dim={hd} lengths={lengths} (T={total})")
    print(f"max |ours - dense_packed| = {err:.2e}")
    print(f"{'variant':<18}{'fwd+bwd s':>12}{'vs ours':>10}{'score entries':>16}")
    for name, t in (("ours", t_ours), ("dense_packed", t_dense), ("padded_megatron", t_pad)):
        print(f"{name:<18}{t:>12.4f}{t / t_ours:>9.2f}x{work[name]:>16,d}")


if __name__ == "__main__":
    main()
