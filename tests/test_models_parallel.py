"""Every TP/PP/CP/DP split of the model gives the single-process logits, on real gloo ranks.

One ``run_distributed`` spawn per world size runs all layouts of that size (Megatron's groups are torn
down between layouts). Every layout loads the SAME full weights through ``load_full_state_dict``; the
reference is transformers' forward pass and, in the same spawn, the unsplit (tp=pp=cp=1, dp=2) model.
Inputs: a right-padded batch and a packed THD batch of odd-length sequences padded to multiples of 2*cp.
Also: CP attention gradients vs cp=1, and ``gather_full_state_dict(load_full_state_dict(x)) == x``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from fipo_megatron.parallel import ParallelConfig, cp_layout
from fipo_megatron.testing.distributed import run_distributed
from fipo_megatron.testing.tiny_models import tiny_hf_config, tiny_hf_model

from conftest import hf_reference_logits, hf_to_megatron_full

LENGTHS = (5, 3, 7)
PAD_UNIT = 4  # 2 * max cp: one padded layout serves every split


def _inputs(vocab: int):
    g = torch.Generator().manual_seed(11)
    seqs = [torch.randint(1, vocab, (n,), generator=g) for n in LENGTHS]
    seq_len = cp_layout.padded_length(max(LENGTHS), cp_size=PAD_UNIT // 2)
    padded = torch.zeros(len(seqs), seq_len, dtype=torch.long)
    padded_lens = [cp_layout.padded_length(n, cp_size=PAD_UNIT // 2) for n in LENGTHS]
    packed = torch.zeros(1, sum(padded_lens), dtype=torch.long)
    cu = torch.tensor([0] + torch.cumsum(torch.tensor(padded_lens), 0).tolist(), dtype=torch.int32)
    for i, s in enumerate(seqs):
        padded[i, :len(s)] = s
        packed[0, cu[i]:cu[i] + len(s)] = s
    return seqs, padded, packed, cu


def _pipeline_forward(model, groups, ids, params, hidden_size):
    """Forward through this rank's stage, passing hidden states stage to stage with p2p."""
    ranks = dist.get_process_group_ranks(groups.pp_group)
    s_local = ids.shape[1]
    if not groups.is_first_stage:
        h = torch.empty(s_local, ids.shape[0], hidden_size)
        dist.recv(h, src=ranks[groups.pp_rank - 1])
        model.set_input_tensor(h)
    pos = torch.arange(s_local)[None].expand_as(ids)
    out = model(ids, pos, None, packed_seq_params=params)
    if not groups.is_last_stage:
        dist.send(out.contiguous(), dst=ranks[groups.pp_rank + 1])
        return None
    return out


def _full_logits(logits_bsv, groups, *, seq_len=None, cu=None):
    """TP all-gather over the vocab dim, then undo the CP zig-zag split of the sequence dim."""
    if groups.tp_size > 1:
        parts = [torch.empty_like(logits_bsv) for _ in range(groups.tp_size)]
        dist.all_gather(parts, logits_bsv.contiguous(), group=groups.tp_group)
        logits_bsv = torch.cat(parts, dim=-1)
    if groups.cp_size == 1:
        return logits_bsv
    parts = [torch.empty_like(logits_bsv) for _ in range(groups.cp_size)]
    dist.all_gather(parts, logits_bsv.contiguous(), group=groups.cp_group)
    if cu is not None:
        return cp_layout.unsplit_packed(parts, cu_seqlens=cu, dim=1)
    full = logits_bsv.new_empty(logits_bsv.shape[0], seq_len, logits_bsv.shape[2])
    for r, part in enumerate(parts):
        full[:, cp_layout.local_positions(seq_len, cp_size=groups.cp_size, cp_rank=r)] = part
    return full


def _attention_grad_check(model, groups):
    """LocalCoreAttention under CP vs the same module at cp=1: outputs and q/k/v gradients, padded and THD."""
    from fipo_megatron.models.cp_attention import LocalCoreAttention

    cfg1 = copy.copy(model.config)
    cfg1.context_parallel_size = 1
    attn_cp = LocalCoreAttention(model.config, 1, pg_collection=groups.pg_collection)
    attn_1 = LocalCoreAttention(cfg1, 1)
    g = torch.Generator().manual_seed(5)
    cu = torch.tensor([0, 8, 12, 24], dtype=torch.int32)
    cases = {"padded": ((8, 2), None, lambda x: cp_layout.split_padded(x, cp_size=groups.cp_size,
                                                                        cp_rank=groups.cp_rank, dim=0)),
             "thd": ((24,), cu, lambda x: cp_layout.split_packed(x, cu_seqlens=cu, cp_size=groups.cp_size,
                                                                 cp_rank=groups.cp_rank, dim=0))}
    errors = {}
    for case, (lead, cu_case, split) in cases.items():
        from megatron.core.packed_seq_params import PackedSeqParams

        params = None if cu_case is None else PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_case,
                                                             cu_seqlens_kv=cu_case, max_seqlen_q=12, max_seqlen_kv=12)
        q = torch.randn(*lead, 4, 16, generator=g)
        k, v = torch.randn(*lead, 2, 16, generator=g), torch.randn(*lead, 2, 16, generator=g)
        up = torch.randn(*lead, 64, generator=g)
        ref = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out_ref = attn_1(*ref, None, packed_seq_params=params)
        (out_ref * up).sum().backward()
        loc = [split(t).clone().requires_grad_(True) for t in (q, k, v)]
        out = attn_cp(*loc, None, packed_seq_params=params)
        (out * split(up)).sum().backward()
        errors[case] = max([(out - split(out_ref)).abs().max().item()]
                           + [(a.grad - split(b.grad)).abs().max().item() for a, b in zip(loc, ref)])
    return errors


def _schedule(chunks, groups, batches, *, cu, forward_only):
    """Megatron's own forward/backward schedule (pipelined, interleaved with vpp) over packed micro-batches."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iterator, model):
        ids, params, weight = next(data_iterator)
        out = model(ids, torch.arange(ids.shape[1])[None], None, packed_seq_params=params)

        def loss_func(output):
            return (output.float() * weight).sum(), {"logits": output.detach()}

        return out, loss_func

    iters = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
    store = get_forward_backward_func()(forward_step_func=step, data_iterator=iters, model=chunks,
                                        num_microbatches=len(batches), seq_length=batches[0][0].shape[1],
                                        micro_batch_size=1, forward_only=forward_only)
    logits = [_full_logits(d["logits"], groups, cu=cu) for d in store] if groups.is_last_stage else None
    if forward_only:
        return logits
    from fipo_megatron.models.sharding import local_params

    grads = {n: p.grad.clone() for n, (_, p, chunk) in local_params(chunks).items()
             if p.grad is not None and not n.startswith(("embedding.", "output_layer."))}
    for grad in grads.values():
        # Each CP rank holds the grad of its tokens' loss, which the schedule scales by cp (its legacy
        # 2-output loss path); DDP then averages over dp x cp. Do that average here.
        dist.all_reduce(grad, group=groups.cp_group)
        grad /= groups.cp_size
    if groups.pp_size > 1:  # tied embeddings: stage grads are summed by finalize_model_grads, not here
        parts = [None] * groups.pp_size
        dist.all_gather_object(parts, grads, group=groups.pp_group)
        grads = {k: v for part in parts for k, v in part.items()}
    return logits, grads


def _microbatches(vocab, packed, cu, groups):
    """Two packed micro-batches (this CP rank's share) and a fixed random weight on every logit."""
    from megatron.core.packed_seq_params import PackedSeqParams

    g = torch.Generator().manual_seed(3)
    max_len = int((cu[1:] - cu[:-1]).max())
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len,
                             max_seqlen_kv=max_len)
    split = lambda x: cp_layout.split_packed(x, cu_seqlens=cu, cp_size=groups.cp_size,  # noqa: E731
                                             cp_rank=groups.cp_rank, dim=1)
    return [(split(packed.roll(i, dims=1)), params, split(torch.randn(1, packed.shape[1], vocab, generator=g)))
            for i in range(2)]


def _vocab_padding_check(family, overrides, full_sd):
    """tp=2 with an odd vocabulary: rows padded on load, pad columns present, dropped again on gather."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from fipo_megatron.models import build_gpt_model, gather_full_state_dict, load_full_state_dict
    from fipo_megatron.parallel import destroy_parallel, initialize_parallel

    hf = tiny_hf_config(family, **overrides)
    parallel = ParallelConfig(tp=2)
    groups = initialize_parallel(parallel, hf_config=hf)
    again = initialize_parallel(parallel, hf_config=hf)  # idempotent for the same layout
    try:
        initialize_parallel(ParallelConfig(pp=2), hf_config=hf)
        switch_error = ""
    except ValueError as err:
        switch_error = str(err)
    bundle_ok = (again.tp_group is groups.tp_group
                 and (groups.tp_size, groups.dp_size, groups.tp_rank) == (2, 1, dist.get_rank())
                 and groups.is_first_stage and groups.is_last_stage and groups.pg_collection.tp is groups.tp_group)
    model = build_gpt_model(hf, groups=groups).eval()
    load_full_state_dict([model], full_sd, groups=groups)
    _, _, packed, cu = _inputs(hf.vocab_size)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=8, max_seqlen_kv=8)
    with torch.no_grad():
        logits = _full_logits(model(packed, torch.arange(packed.shape[1])[None], None, packed_seq_params=params),
                              groups, cu=cu)
    gathered = gather_full_state_dict([model], groups=groups, vocab_size=hf.vocab_size)
    padded = gather_full_state_dict([model], groups=groups)
    destroy_parallel()
    return {"logits": logits, "num_columns": logits.shape[-1], "bundle_ok": bundle_ok, "switch_error": switch_error,
            "roundtrip_max_err": max((gathered[k] - full_sd[k]).abs().max().item() for k in full_sd),
            "pad_rows_zero": all(bool((padded[k][hf.vocab_size:] == 0).all())
                                 for k in ("embedding.word_embeddings.weight", "output_layer.weight"))}


def _layouts_worker(rank, world_size, family, overrides, full_sd, layouts, schedule_layouts=(), vocab_check=None):
    from megatron.core.packed_seq_params import PackedSeqParams

    from fipo_megatron.models import build_model_chunks, gather_full_state_dict, load_full_state_dict
    from fipo_megatron.parallel import destroy_parallel, initialize_parallel

    hf = tiny_hf_config(family, **overrides)
    seqs, padded, packed, cu = _inputs(hf.vocab_size)
    results = {}
    for layout in layouts:
        tp, pp, cp, vpp = layout
        parallel = ParallelConfig(tp=tp, pp=pp, cp=cp, vpp=vpp)
        groups = initialize_parallel(parallel, hf_config=hf)
        chunks = build_model_chunks(hf, groups=groups, seed=1000 + rank)  # init differs per rank
        load_full_state_dict(chunks, full_sd, groups=groups)
        res = {}
        with torch.no_grad():
            if vpp is None:
                model = chunks[0].eval()
                ids = cp_layout.split_padded(padded, cp_size=cp, cp_rank=groups.cp_rank, dim=1)
                out = _pipeline_forward(model, groups, ids, None, hf.hidden_size)
                if out is not None:
                    res["padded"] = _full_logits(out, groups, seq_len=padded.shape[1])
                ids = cp_layout.split_packed(packed, cu_seqlens=cu, cp_size=cp, cp_rank=groups.cp_rank, dim=1)
                params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                         max_seqlen_q=int((cu[1:] - cu[:-1]).max()),
                                         max_seqlen_kv=int((cu[1:] - cu[:-1]).max()))
                out = _pipeline_forward(model, groups, ids, params, hf.hidden_size)
                if out is not None:
                    res["packed"] = _full_logits(out, groups, cu=cu)
        gathered = gather_full_state_dict(chunks, groups=groups)
        res["roundtrip_keys_equal"] = set(gathered) == set(full_sd)
        res["roundtrip_max_err"] = max((gathered[k] - full_sd[k]).abs().max().item() for k in full_sd
                                       if k in gathered)
        if cp > 1:
            res["attn_grad_err"] = _attention_grad_check(chunks[0], groups)
        if layout in schedule_layouts:
            for c in chunks:
                c.train()
            batches = _microbatches(hf.vocab_size, packed, cu, groups)
            res["schedule_logits"], res["schedule_grads"] = _schedule(chunks, groups, batches, cu=cu,
                                                                      forward_only=False)
        results[layout] = res
        destroy_parallel()
    if vocab_check is not None:
        results["vocab_padding"] = _vocab_padding_check(*vocab_check)
    return results


def _check(results_by_rank, seqs, cu, ref_hf, layouts, reference_layout=(1, 1, 1, None)):
    ref = next(r[reference_layout] for r in results_by_rank if "padded" in r[reference_layout])
    for i, s in enumerate(seqs):  # the unsplit model itself against transformers
        torch.testing.assert_close(ref["padded"][i, :len(s)], ref_hf[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ref["packed"][0, cu[i]:cu[i] + len(s)], ref_hf[i], atol=1e-5, rtol=1e-5)
    for layout in layouts:
        per_rank = [r[layout] for r in results_by_rank]
        with_logits = [r for r in per_rank if "padded" in r]
        assert with_logits or layout[3] is not None, f"{layout}: no rank produced logits"
        for r in with_logits:
            for key in ("padded", "packed"):
                torch.testing.assert_close(r[key], ref[key], atol=1e-5, rtol=1e-5, msg=f"{layout} {key}")
        for r in per_rank:
            assert r["roundtrip_keys_equal"] and r["roundtrip_max_err"] == 0.0, f"{layout} state-dict round trip"
            for case, err in r.get("attn_grad_err", {}).items():
                assert err < 1e-5, f"{layout} CP attention {case}: max error {err}"


def _check_schedules(results_by_rank, layouts, *, num_grads, reference_layout=(1, 1, 1, None)):
    """Megatron's schedules (no pipelining / 1F1B / interleaved) give the same logits and grads."""
    ref = next(r[reference_layout] for r in results_by_rank if r[reference_layout]["schedule_logits"])
    assert len(ref["schedule_grads"]) == num_grads and len(ref["schedule_logits"]) == 2
    for layout in layouts:
        per_rank = [r[layout] for r in results_by_rank]
        assert any(r["schedule_logits"] for r in per_rank), f"{layout}: no last stage"
        for r in per_rank:
            if r["schedule_logits"] is not None:
                for got, want in zip(r["schedule_logits"], ref["schedule_logits"], strict=True):
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{layout} schedule logits")
            assert set(r["schedule_grads"]) == set(ref["schedule_grads"]), f"{layout} grad names"
            for name, grad in ref["schedule_grads"].items():
                torch.testing.assert_close(r["schedule_grads"][name], grad, atol=1e-5, rtol=1e-4,
                                           msg=f"{layout} grad of {name}")


@pytest.mark.distributed
def test_world2_tp_pp_cp_dp_match_single_process():
    family, overrides = "qwen2", dict(num_hidden_layers=4)  # tied embeddings and QKV bias; 4 layers for vpp=2
    hf_model = tiny_hf_model(family, seed=1, **overrides)
    full_sd = hf_to_megatron_full(hf_model)
    seqs, _, _, cu = _inputs(hf_model.config.vocab_size)
    ref_hf = hf_reference_logits(hf_model, seqs)
    layouts = [(1, 1, 1, None), (2, 1, 1, None), (1, 2, 1, None), (1, 1, 2, None), (1, 2, 1, 2)]
    schedule_layouts = [(1, 1, 1, None), (1, 2, 1, None), (1, 2, 1, 2), (1, 1, 2, None)]
    odd = dict(vocab_size=255)  # not divisible by tp=2: padded to 256
    odd_model = tiny_hf_model("llama", seed=5, **odd)
    odd_sd = hf_to_megatron_full(odd_model)
    odd_ref = hf_reference_logits(odd_model, _inputs(255)[0])
    results = run_distributed(_layouts_worker, 2, args=(family, overrides, full_sd, layouts, schedule_layouts,
                                                        ("llama", odd, odd_sd)), timeout=300)
    _check(results, seqs, cu.tolist(), ref_hf, layouts)
    for r in results:
        pad = r["vocab_padding"]
        assert pad["num_columns"] == 256 and pad["pad_rows_zero"] and pad["roundtrip_max_err"] == 0.0
        assert pad["bundle_ok"]
        assert "already initialised with (tp, pp, cp, vpp) = (2, 1, 1, None)" in pad["switch_error"]
        for i, n in enumerate(LENGTHS):
            start = int(cu[i])
            torch.testing.assert_close(pad["logits"][0, start:start + n, :255], odd_ref[i], atol=1e-5, rtol=1e-5)
    _check_schedules(results, schedule_layouts, num_grads=4 * 7 + 1)  # 7 tensors per layer + final norm


@pytest.mark.distributed
def test_world4_tp2pp2_and_tp2cp2_match_single_process():
    family = "qwen3"  # untied, QK-norm, head_dim != hidden/heads
    hf_model = tiny_hf_model(family, seed=2)
    full_sd = hf_to_megatron_full(hf_model)
    seqs, _, _, cu = _inputs(hf_model.config.vocab_size)
    ref_hf = hf_reference_logits(hf_model, seqs)
    layouts = [(1, 1, 1, None), (2, 2, 1, None), (2, 1, 2, None)]
    results = run_distributed(_layouts_worker, 4, args=(family, {}, full_sd, layouts), timeout=300)
    _check(results, seqs, cu.tolist(), ref_hf, layouts)
