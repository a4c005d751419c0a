"""ParallelConfig / validate_layout (fail fast, numbers in the message) and the CPU compatibility shim."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from fipo_megatron.parallel import ParallelConfig, apply_cpu_compat, cpu_compat_active, validate_layout


def test_config_fields_validated():
    for kwargs, field in [(dict(tp=0), "tp"), (dict(pp=-1), "pp"), (dict(cp=0), "cp"), (dict(vpp=0), "vpp"),
                          (dict(vpp=2), "vpp"), (dict(sequence_parallel=True), "sequence_parallel")]:
        with pytest.raises(ValueError, match=field):
            ParallelConfig(**kwargs)
    with pytest.raises(TypeError):
        ParallelConfig(2)  # keyword-only
    c = ParallelConfig(tp=2, pp=2, cp=2, vpp=2)
    assert c.model_parallel_size == 8 and c.num_virtual_stages == 2 and c.seq_multiple() == 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(config=ParallelConfig(tp=2, pp=2), world_size=6),
     "world size 6 is not divisible by tp*pp*cp = 4 (tp=2, pp=2, cp=1)"),
    (dict(config=ParallelConfig(tp=4), world_size=8, num_attention_heads=6),
     "num_attention_heads 6 is not divisible by tp = 4"),
    (dict(config=ParallelConfig(tp=4), world_size=4, num_attention_heads=8, num_query_groups=2),
     "num_query_groups (KV heads) 2 is not divisible by tp = 4"),
    (dict(config=ParallelConfig(pp=2, vpp=2), world_size=2, num_layers=6),
     "num_layers 6 is not divisible by pp*vpp = 4 (pp=2, vpp=2)"),
    (dict(config=ParallelConfig(cp=2), world_size=2, seq_length=10),
     "sequence length 10 is not a multiple of 4 (2*cp with cp=2)"),
    (dict(config=ParallelConfig(tp=2, sequence_parallel=True), world_size=2, on_cpu=True),
     "sequence_parallel is GPU-only"),
    (dict(config=ParallelConfig(use_distributed_optimizer=True), world_size=1, on_cpu=True),
     "use_distributed_optimizer is GPU-only"),
])
def test_bad_layouts_fail_fast_with_numbers(kwargs, message):
    with pytest.raises(ValueError) as err:
        validate_layout(**kwargs)
    assert message in str(err.value)


def test_good_layout_returns_dp():
    assert validate_layout(ParallelConfig(tp=2, pp=2, cp=2), world_size=16, num_attention_heads=8,
                           num_query_groups=2, num_layers=4, seq_length=8) == 2
    assert validate_layout(ParallelConfig(tp=2, sequence_parallel=True, use_distributed_optimizer=True),
                           world_size=2, on_cpu=False) == 1


def test_dist_timeout_from_the_environment(monkeypatch):
    from fipo_megatron.parallel.topology import dist_timeout_minutes

    monkeypatch.delenv("FIPO_DIST_TIMEOUT_MIN", raising=False)
    assert dist_timeout_minutes() == 60
    monkeypatch.setenv("FIPO_DIST_TIMEOUT_MIN", "90")
    assert dist_timeout_minutes() == 90
    for bad in ("ten", "0"):
        monkeypatch.setenv("FIPO_DIST_TIMEOUT_MIN", bad)
        with pytest.raises(ValueError, match="FIPO_DIST_TIMEOUT_MIN"):
            dist_timeout_minutes()


def test_cpu_compat_idempotent():
    from megatron.core.pipeline_parallel import p2p_communication
    from megatron.core.tensor_parallel import random as mp_random

    first = apply_cpu_compat()
    proxy, tracker = p2p_communication.torch, mp_random._CUDA_RNG_STATE_TRACKER
    assert first and cpu_compat_active() and apply_cpu_compat()
    assert p2p_communication.torch is proxy and mp_random._CUDA_RNG_STATE_TRACKER is tracker
    # the redirected factories allocate on CPU, and Megatron's seeding runs through the CPU tracker
    assert proxy.zeros(2, device="cuda").device.type == "cpu"
    assert proxy.cuda.current_device().type == "cpu" and proxy.cuda.synchronize() is None
    # megatron-core >= 0.19's DDP start_grad_sync waits on the current stream's events before reducing
    stream = proxy.cuda.current_stream()
    assert stream.wait_event(object()) is None and stream.wait_stream(stream) is None
    mp_random.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = mp_random.get_cuda_rng_tracker()
    import torch

    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    with tracker.fork():
        b = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before), "fork must restore the default stream"
    assert not torch.equal(a, b), "the tracked stream advances between forks"
    mp_random.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    with mp_random.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(3), a), "re-seeding reproduces the tracked stream"


def test_run_checkpoint_rng_state_holds_megatron_tracker():
    """The run checkpoint's RNG file (checkpoint.manager) carries Megatron's tracked streams, so a resumed
    rank forks into the same numbers as the run that kept going."""
    from megatron.core.tensor_parallel import random as mp_random

    from fipo_megatron.checkpoint.manager import capture_rng_state, restore_rng_state

    apply_cpu_compat()
    mp_random.model_parallel_cuda_manual_seed(11, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = mp_random.get_cuda_rng_tracker()
    with tracker.fork():
        torch.rand(5)
    saved = capture_rng_state()
    assert set(saved["megatron_tracker"]) == set(tracker.get_states())
    with tracker.fork():
        continued = torch.rand(3)
    mp_random.model_parallel_cuda_manual_seed(11, tp_rank=0, ep_rank=0, etp_rank=0)  # a fresh process's tracker
    restore_rng_state(saved)
    with mp_random.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(3), continued)


def test_cpu_compat_noop_when_cuda_present():
    """With CUDA 'available' nothing is patched (checked in a fresh interpreter)."""
    code = textwrap.dedent("""
        import torch
        torch.cuda.is_available = lambda: True
        import megatron.core.pipeline_parallel.p2p_communication as p2p
        import megatron.core.tensor_parallel.random as r
        import megatron.core.optimizer.optimizer as opt
        before = (p2p.torch, r._CUDA_RNG_STATE_TRACKER, r.initialize_rng_tracker, opt.clip_grad_by_total_norm_fp32)
        from fipo_megatron.parallel.cpu_compat import apply_cpu_compat, cpu_compat_active
        assert apply_cpu_compat() is False and not cpu_compat_active()
        after = (p2p.torch, r._CUDA_RNG_STATE_TRACKER, r.initialize_rng_tracker, opt.clip_grad_by_total_norm_fp32)
        assert all(a is b for a, b in zip(before, after)), "patched with CUDA present"
        assert p2p.torch is torch
        print("OK")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


def _train_step_worker(rank, world_size, full_sd, layouts):
    """One Megatron DDP + optimizer step (SGD, grad clipping) per layout under cpu_compat.

    SGD rather than Adam: Adam's first step is ~lr*sign(g), which turns fp32 rounding of near-zero grads
    into full-size differences between layouts; SGD keeps the update proportional to the clipped grad.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from fipo_megatron.models import build_gpt_model, gather_full_state_dict, load_full_state_dict
    from fipo_megatron.parallel import destroy_parallel, initialize_parallel
    from fipo_megatron.testing.tiny_models import tiny_hf_config

    hf = tiny_hf_config("qwen2")  # tied embeddings: finalize_model_grads syncs them across PP stages
    g = torch.Generator().manual_seed(0)
    ids, weight_BSV = torch.randint(0, 256, (1, 8), generator=g), torch.randn(1, 8, 256, generator=g)
    out = {}
    for tp, pp in layouts:
        parallel = ParallelConfig(tp=tp, pp=pp)
        groups = initialize_parallel(parallel, hf_config=hf)
        model = build_gpt_model(hf, groups=groups)
        load_full_state_dict([model], full_sd, groups=groups)
        model = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        model.config.finalize_model_grads_func = finalize_model_grads
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="sgd", lr=1.0, clip_grad=0.5, bf16=False), [model])
        w_shard = weight_BSV.chunk(tp, dim=-1)[groups.tp_rank]  # logits stay vocab-sharded over TP

        def step(data_iterator, m):
            logits = m(ids, torch.arange(8)[None], None)
            return logits, lambda o: ((o.float() * w_shard).sum(), {})

        model.zero_grad_buffer()
        opt.zero_grad()
        get_forward_backward_func()(forward_step_func=step, data_iterator=iter([0, 0]), model=[model],
                                    num_microbatches=2, seq_length=8, micro_batch_size=1, forward_only=False)
        ok, grad_norm, _ = opt.step()
        out[(tp, pp)] = (ok, grad_norm, gather_full_state_dict([model], groups=groups))
        destroy_parallel()
    return out


@pytest.mark.distributed
def test_megatron_train_step_runs_on_cpu_and_agrees_across_layouts():
    """DDP grad buffers, tied-embedding sync, grad-norm clipping and the optimizer run on gloo; dp/tp/pp agree."""
    from conftest import hf_to_megatron_full

    from fipo_megatron.testing.distributed import run_distributed
    from fipo_megatron.testing.tiny_models import tiny_hf_model

    full_sd = hf_to_megatron_full(tiny_hf_model("qwen2", seed=4))
    layouts = [(1, 1), (2, 1), (1, 2)]
    results = run_distributed(_train_step_worker, 2, args=(full_sd, layouts), timeout=240)
    ok, ref_norm, ref_params = results[0][(1, 1)]
    assert ok and ref_norm > 0.5, "the step must clip (clip_grad 0.5) for the test to cover clipping"
    moved = max((ref_params[k] - full_sd[k]).abs().max().item() for k in full_sd)
    assert moved > 1e-4
    for per_rank in results:
        for layout, (ok, norm, params) in per_rank.items():
            assert ok and abs(norm - ref_norm) < 1e-4 * ref_norm, f"{layout}: grad norm {norm} vs {ref_norm}"
            for k in full_sd:
                torch.testing.assert_close(params[k], ref_params[k], atol=1e-5, rtol=1e-5, msg=f"{layout} {k}")
