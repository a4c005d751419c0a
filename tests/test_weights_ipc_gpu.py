"""GPU: a weight sync through ``CudaIpcTransport`` into a second process on the same GPU (skipped without CUDA).

The actor (one rank, NCCL) exports its Megatron weights as HF-named CUDA tensors; the transport hands CUDA
IPC handles to a separate receiver process (what a colocated vLLM worker does with them), which opens them
with ``rebuild_from_ipc``, copies each into its own memory, and reports what it got. The receiver's
tensors must equal the actor's own export bit for bit, under the names and shapes of transformers' state
dict, over two syncs with the weights changed in between.
"""

from __future__ import annotations

import io
import multiprocessing as mp

import pytest
import torch

from fipo_megatron.testing.distributed import run_distributed
from fipo_megatron.testing.tiny_models import tiny_hf_config

pytestmark = pytest.mark.gpu


def _receiver(conn):
    from fipo_megatron.weights.transport import rebuild_from_ipc

    torch.cuda.set_device(0)
    received = {}
    while True:
        handles = conn.recv()
        if handles is None:
            break
        for name, tensor in rebuild_from_ipc(handles):
            assert tensor.is_cuda, name
            received[name] = tensor.clone().cpu()  # copy out before acknowledging: the sender may free it
        conn.send("ok")
    buf = io.BytesIO()  # plain bytes: torch's fd-sharing pickler would outlive this process
    torch.save(received, buf)
    conn.send_bytes(buf.getvalue())


def _sender(rank, world_size, hf):
    from fipo_megatron.models import build_gpt_model
    from fipo_megatron.parallel import ParallelConfig, initialize_parallel
    from fipo_megatron.weights.export import export_hf_buckets
    from fipo_megatron.weights.transport import CudaIpcTransport, sync_weights

    groups = initialize_parallel(ParallelConfig(), hf_config=hf)
    model = build_gpt_model(hf, groups=groups, params_dtype=torch.bfloat16)
    assert next(model.parameters()).is_cuda
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(child,))
    proc.start()

    def send_handles(handles):
        parent.send(handles)
        assert parent.recv() == "ok"

    results = []
    try:
        for step in range(2):
            if step:
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.01)
            expected = {n: t.clone().cpu() for bucket in export_hf_buckets([model], groups=groups, hf_config=hf,
                                                                           bucket_bytes=1 << 16) for n, t in bucket}
            transport = CudaIpcTransport(send_handles)
            stats = sync_weights([model], groups=groups, transport=transport, hf_config=hf, bucket_bytes=1 << 16)
            results.append((expected, stats))
        parent.send(None)
        received = torch.load(io.BytesIO(parent.recv_bytes()))
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    return results, received, proc.exitcode


def test_cuda_ipc_sync_into_another_process():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import transformers

    hf = tiny_hf_config("qwen2", num_hidden_layers=3)
    [(results, received, exitcode)] = run_distributed(_sender, 1, args=(hf,), timeout=300, backend="nccl")
    assert exitcode == 0
    (first, stats1), (second, stats2) = results
    assert stats1["weights/num_buckets"] > 3  # 64 KiB buckets: several, some holding one tensor
    # the receiver keeps the last value per name: the second sync's weights, which differ from the first's
    assert set(received) == set(second)
    for name, tensor in second.items():
        assert received[name].dtype == tensor.dtype and torch.equal(received[name], tensor), name
    assert any(not torch.equal(first[n], second[n]) for n in second)
    model = transformers.AutoModelForCausalLM.from_config(hf)
    hf_shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    hf_shapes.pop("lm_head.weight")  # tied embeddings: the engine ties it to embed_tokens
    assert {n: tuple(t.shape) for n, t in received.items()} == hf_shapes
