"""Megatron TP/PP shards -> HF-named full tensors, streamed in buckets (rollout weight sync, HF export).

    # usual entry point (weights/transport.py): every rank calls it, the engine's rank has a transport
    sync_weights(actor.model_chunks, groups=groups, hf_config=hf_config, transport=engine.weight_transport())

    # the generator underneath: every rank runs the loop, only receiving ranks get buckets
    for bucket in export_hf_buckets(actor.model_chunks, groups=groups, hf_config=hf_config, bucket_bytes=512 << 20):
        engine.update_weights(bucket)
        del bucket  # freed before the next bucket is built
    engine.finish_weight_update()

How it moves data:

- Each pipeline stage exports only its own layers, under global layer names (``models.sharding``).
- CP and DP replicas hold identical weights: only the replica with ``dp_rank == cp_rank == 0`` works;
  the other ranks return at once (they take part in no collective of the export).
- A bucket is a run of consecutive parameters whose *full* size stays within ``bucket_bytes`` (a tensor
  larger than that travels alone). Its TP shards are flattened into one byte buffer and gathered with a
  single TP all-gather; the full tensors are rebuilt by ``models.sharding.gather_tp_shards`` and split into
  HF tensors by the checkpoint mapping (``checkpoint.registry.get_mapping``). The next bucket's
  all-gather is launched once the current bucket is rebuilt, and runs while it is consumed.
- Memory: the whole model is never materialised anywhere. Peak extra memory on an exporting rank,
  measured on CPU/gloo at tp=2 (``tools/benchmarks/bench_sync_memory.py``, docs/benchmarks.md): 2.5x the
  largest bucket in live bytes (one bucket's all-gather: the send buffer, the receive buffer and gloo's
  staging copy); 2.5-5.0x in RSS under glibc's default malloc, whose heap keeps 0-264 MiB of freed
  tensors resident. The largest bucket is ``bucket_bytes`` or the largest single tensor (the embedding),
  whichever is larger. A consumer's loop variable keeps its bucket alive while the next one is built,
  one bucket more, unless it deletes it as ``sync_weights`` does.
- ``destination="rank0"``: every bucket ends at global rank 0 (stage 0 first, then stages 1..pp-1, each
  sent point-to-point from the stage's exporting rank); for an engine living in rank 0's process.
  ``destination="stage"``: each stage's exporting rank (tp_rank 0) yields its own buckets, for transports
  that every stage can reach by itself (disk, an NCCL group per stage).
- ``broadcast_hf_buckets`` (with a ``StageRoute``): every bucket of every stage reaches each of many
  receivers (the engines on every node), one broadcast per bucket from the stage's exporting rank, each
  checked on arrival against a manifest.
- Order is deterministic: stages in order; within a stage, model-chunk then parameter order.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
import torch.distributed as dist

from fipo_megatron.log import get_logger
from fipo_megatron.models.sharding import gather_tp_shards, local_params, partition_dim
from fipo_megatron.parallel.topology import collective_device

logger = get_logger(__name__)

DESTINATIONS = ("rank0", "stage")
NamedTensors = list[tuple[str, torch.Tensor]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Entry:
    name: str                 # canonical global Megatron name
    param: torch.Tensor
    tp_sharded: bool

    def shard_bytes(self) -> int:
        return self.param.numel() * self.param.element_size()


def plan_buckets(entries: list[_Entry], *, bucket_bytes: int, tp_size: int) -> list[list[_Entry]]:
    """Greedy, order-preserving split into buckets of at most ``bucket_bytes`` full bytes (an oversized
    tensor gets a bucket of its own). Identical on every TP rank: shard sizes agree across TP."""
    buckets: list[list[_Entry]] = []
    current: list[_Entry] = []
    current_bytes = 0
    for e in entries:
        full = e.shard_bytes() * (tp_size if e.tp_sharded else 1)
        if current and current_bytes + full > bucket_bytes:
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(e)
        current_bytes += full
    if current:
        buckets.append(current)
    return buckets


_ALIGN = 16  # every tensor starts 16-byte aligned in a packed buffer, so mixed dtypes view back safely


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _layout(nbytes: list[int]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for n in nbytes:
        offsets.append(total)
        total += -(-n // _ALIGN) * _ALIGN
    return offsets, total


def pack_bytes(tensors: list[torch.Tensor], *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate tensors' bytes into one flat uint8 buffer (16-byte aligned starts; see ``unpack_bytes``).
    ``out``: write into this uint8 buffer (``packed_size`` bytes) instead of a new one."""
    offsets, total = _layout([t.numel() * t.element_size() for t in tensors])
    if out is not None:
        assert out.dtype == torch.uint8 and out.numel() == total, (out.dtype, out.numel(), total)
        flat = out
    else:
        flat = torch.empty(total, dtype=torch.uint8, device=tensors[0].device if tensors else "cpu")
    for t, off in zip(tensors, offsets):
        b = _as_bytes(t)
        flat[off:off + b.numel()].copy_(b)
    return flat


def unpack_bytes(flat: torch.Tensor, specs: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """Views of ``flat`` as tensors of the given (shape, dtype), inverse of ``pack_bytes``."""
    sizes = [torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size() for shape, dtype in specs]
    offsets, _ = _layout(sizes)
    return [flat[off:off + n].view(dtype).view(shape) for (shape, dtype), off, n in zip(specs, offsets, sizes)]


def packed_size(specs: list[tuple[tuple[int, ...], torch.dtype]]) -> int:
    """Bytes ``pack_bytes`` needs for tensors of these (shape, dtype)."""
    return _layout([torch.Size(s).numel() * torch.empty(0, dtype=d).element_size() for s, d in specs])[1]


def _start_all_gather_bytes(flat: torch.Tensor, group, size: int):
    """Launch one all-gather of a flat byte buffer; returns (work or None, per-rank views of the output)."""
    out = torch.empty(size * flat.numel(), dtype=torch.uint8, device=flat.device)
    # torch >= 2.13 renames all_gather_into_tensor to all_gather_single (the old name warns).
    gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    try:
        work = gather_single(out, flat, group=group, async_op=True)
    except (RuntimeError, AttributeError, NotImplementedError):  # backends without the fused form (old gloo)
        work = dist.all_gather(list(out.chunk(size)), flat, group=group, async_op=True)
    return work, list(out.chunk(size))


@dataclasses.dataclass(kw_only=True)
class _InFlight:
    bucket: list[_Entry]
    sharded: list[_Entry]
    work: object = None
    per_rank: list[torch.Tensor] | None = None
    packed: torch.Tensor | None = None  # keeps the send buffer alive until the collective completes


def _start_bucket(bucket: list[_Entry], *, groups) -> _InFlight:
    """Pack this rank's TP shards of the bucket and launch their all-gather (asynchronously)."""
    sharded = [e for e in bucket if e.tp_sharded and groups.tp_size > 1]
    state = _InFlight(bucket=bucket, sharded=sharded)
    if sharded:
        state.packed = pack_bytes([e.param for e in sharded])
        state.work, state.per_rank = _start_all_gather_bytes(state.packed, groups.tp_group, groups.tp_size)
    return state


def _finish_bucket(state: _InFlight, *, rebuild: bool = True) -> list[tuple[str, torch.Tensor]] | None:
    """Wait for the bucket's all-gather; with ``rebuild``, the full Megatron tensors (None without).
    The send and receive buffers are released on return: the rebuilt tensors are copies."""
    gathered: dict[str, torch.Tensor] = {}
    if state.sharded:
        if state.work is not None:
            state.work.wait()
        per_rank, state.per_rank, state.packed, state.work = state.per_rank, None, None, None
        if rebuild:
            specs = [(tuple(e.param.shape), e.param.dtype) for e in state.sharded]
            per_rank_tensors = [unpack_bytes(buf, specs) for buf in per_rank]
            for i, e in enumerate(state.sharded):
                gathered[e.name] = gather_tp_shards(e.name, [tensors[i] for tensors in per_rank_tensors])
    if not rebuild:
        return None
    return [(e.name, gathered.get(e.name, e.param.detach())) for e in state.bucket]


def _to_hf(full: list[tuple[str, torch.Tensor]], *, mapping, dtype, device) -> NamedTensors:
    out: NamedTensors = []
    for name, tensor in full:
        for hf_name, hf_tensor in mapping.megatron_to_hf(name, tensor):
            hf_tensor = hf_tensor.to(device=device or hf_tensor.device, dtype=dtype or hf_tensor.dtype)
            # Contiguous views of the bucket's gathered tensors are fine: they live as long as the bucket.
            out.append((hf_name, hf_tensor.contiguous()))
    return out


def _send_bucket(bucket: NamedTensors, dst: int) -> None:
    meta = [(n, tuple(t.shape), t.dtype) for n, t in bucket]
    dist.send_object_list([meta], dst=dst)
    if bucket:
        dist.send(pack_bytes([t for _, t in bucket]), dst=dst)


def _recv_bucket(src: int, device) -> NamedTensors:
    holder: list = [None]
    dist.recv_object_list(holder, src=src)
    meta = holder[0]
    if not meta:
        return []
    specs = [(shape, dtype) for _, shape, dtype in meta]
    flat = torch.empty(packed_size(specs), dtype=torch.uint8, device=device)
    dist.recv(flat, src=src)
    return [(name, t) for (name, _, _), t in zip(meta, unpack_bytes(flat, specs))]


def _resolve_mapping(mapping, hf_config, groups):
    if mapping is not None:
        return mapping
    if hf_config is None:
        raise ValueError("the weight export needs hf_config or mapping")
    from fipo_megatron.checkpoint.registry import get_mapping
    from fipo_megatron.models.hf_config import padded_vocab_size

    return get_mapping(hf_config, padded_vocab_size=padded_vocab_size(hf_config, tp=groups.tp_size))


def _export_entries(model_chunks, mapping) -> list[_Entry]:
    entries = []
    for name, (_, param, _) in local_params(model_chunks).items():
        if name == "output_layer.weight" and mapping.tie_word_embeddings:
            continue  # the last stage's copy of the tied embedding; stage 0 exports the original
        entries.append(_Entry(name=name, param=param, tp_sharded=partition_dim(name) is not None))
    return entries


def _stage_hf_buckets(buckets: list[list[_Entry]], *, groups, mapping, dtype, device
                      ) -> Iterator[NamedTensors | None]:
    """One step per bucket on every TP rank of an exporting replica: the HF bucket on tp_rank 0, None on
    the others (their step is their part of the bucket's all-gather), so callers can interleave other
    collectives with the export in the same order on every rank."""
    pending = _start_bucket(buckets[0], groups=groups) if buckets else None
    for k in range(len(buckets)):
        if groups.tp_rank == 0:
            # No name holds the full tensors: those the HF split copies (q/k/v, a dtype cast) are freed here.
            hf = _to_hf(_finish_bucket(pending), mapping=mapping, dtype=dtype, device=device)
        else:
            hf = _finish_bucket(pending, rebuild=False)  # None: only tp_rank 0 hands buckets on
        # Double buffering: bucket k+1's all-gather runs while bucket k is consumed. It starts after bucket
        # k's rebuild, not before: overlapping the rebuild too would hold two more buckets' buffers at the
        # peak (bucket k's gathered bytes and its rebuilt copy, beside bucket k+1's).
        pending = _start_bucket(buckets[k + 1], groups=groups) if k + 1 < len(buckets) else None
        yield hf
        del hf  # freed (once the consumer lets go) before bucket k+1 is rebuilt


def export_hf_buckets(model_chunks, *, groups, hf_config=None, mapping=None, bucket_bytes: int = 512 << 20,
                      destination: str = "rank0", dtype: torch.dtype | None = None,
                      device: str | torch.device | None = None,
                      exporting_replica: bool | None = None) -> Iterator[NamedTensors]:
    """Yield buckets of ``(hf_name, full tensor)`` on the receiving rank(s); see the module docstring.

    Every rank of the job must exhaust the iterator (it drives collectives). ``mapping`` defaults to
    ``get_mapping(hf_config)`` with the model's padded vocabulary; padded vocab rows are dropped.
    ``dtype``/``device``: cast/move exported tensors (e.g. bf16 for the engine); default: as trained.
    ``exporting_replica``: whether this rank's (DP, CP) replica exports, for several replicas exporting at
    once (``pp == 1`` only: each replica's tp_rank 0 receives its own buckets; engines on every node).
    Default: the replica with ``dp_rank == cp_rank == 0`` alone.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    if destination not in DESTINATIONS:
        raise ValueError(f"destination must be one of {DESTINATIONS}, got {destination!r}")
    mapping = _resolve_mapping(mapping, hf_config, groups)
    if exporting_replica is None:
        exporting_replica = groups.dp_rank == 0 and groups.cp_rank == 0
    elif groups.pp_size != 1:
        raise ValueError("export_hf_buckets: exporting_replica (several exporting replicas) needs pp == 1")
    if not exporting_replica:
        return  # an identical replica exports; this one has nothing to do
    entries = _export_entries(model_chunks, mapping)
    buckets = plan_buckets(entries, bucket_bytes=bucket_bytes, tp_size=groups.tp_size)
    logger.debug("weight export: stage %d, %d tensors in %d buckets of <= %d bytes", groups.pp_rank,
                 len(entries), len(buckets), bucket_bytes)
    is_sender = groups.tp_rank == 0
    pp_ranks = dist.get_process_group_ranks(groups.pp_group) if groups.pp_size > 1 else [dist.get_rank()]
    comm_device = next((e.param.device for e in entries), torch.device("cpu"))

    def local_hf_buckets() -> Iterator[NamedTensors]:
        for bucket in _stage_hf_buckets(buckets, groups=groups, mapping=mapping, dtype=dtype, device=device):
            if bucket is not None:
                yield bucket
            del bucket  # a loop variable would keep it alive while the next bucket is built

    if destination == "stage" or groups.pp_size == 1:
        if destination == "stage" or groups.pp_rank == 0:
            yield from local_hf_buckets()
        return
    # destination == "rank0" with pp > 1: stage 0's exporting rank is global rank 0 (tp=cp=dp=0, pp=0)
    # and receives the other stages' buckets through the PP group's point-to-point links.
    if groups.pp_rank == 0:
        yield from local_hf_buckets()
        if is_sender:
            for stage in range(1, groups.pp_size):
                num_buckets = torch.zeros(1, dtype=torch.long, device=comm_device)
                dist.recv(num_buckets, src=pp_ranks[stage])
                for _ in range(int(num_buckets.item())):
                    yield [(n, t.to(device) if device else t) for n, t in _recv_bucket(pp_ranks[stage], comm_device)]
    else:
        if is_sender:
            dist.send(torch.tensor([len(buckets)], dtype=torch.long, device=comm_device), dst=pp_ranks[0])
        for bucket in local_hf_buckets():
            _send_bucket([(n, t.to(comm_device)) for n, t in bucket], pp_ranks[0])
            del bucket


def hf_names_and_shapes(model_chunks, *, groups, hf_config=None, mapping=None) -> list[tuple[str, tuple[int, ...]]]:
    """The (HF name, shape) list a sync sends, computed without moving any tensor data: what an engine
    (SGLang ``update_weights_from_distributed`` / vLLM ``load_weights``) will be asked to load."""
    mapping = _resolve_mapping(mapping, hf_config, groups)
    return [(hf, shape) for e in _export_entries(model_chunks, mapping)
            for hf, shape, _ in _hf_specs(e, mapping=mapping, dtype=None)]


def _hf_specs(entry: _Entry, *, mapping, dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(HF name, full shape, dtype) of what ``entry`` exports, from its full shape alone (meta tensors)."""
    meta = torch.empty(mapping.expected_shape(entry.name), device="meta", dtype=entry.param.dtype)
    return [(hf, tuple(t.shape), dtype or t.dtype) for hf, t in mapping.megatron_to_hf(entry.name, meta)]


def check_against_hf_state_dict(sent: list[tuple[str, tuple[int, ...]]], hf_shapes: dict[str, tuple[int, ...]], *,
                                tied_word_embeddings: bool = False) -> None:
    """ValueError listing missing, unexpected, duplicated and mis-shaped names when what a sync sends
    (``sent``: (HF name, shape)) does not cover the HF model's own state dict (``hf_shapes``) exactly.
    With tied embeddings ``lm_head.weight`` is the embedding and need not be sent."""
    expected = dict(hf_shapes)
    if tied_word_embeddings:
        expected.pop("lm_head.weight", None)
    names = [n for n, _ in sent]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    got = dict(sent)
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(f"{n}: sent {tuple(got[n])}, model has {tuple(expected[n])}"
                   for n in set(got) & set(expected) if tuple(got[n]) != tuple(expected[n]))
    if missing or unexpected or wrong or duplicated:
        raise ValueError(f"weight sync does not match the HF model: missing {missing}, unexpected {unexpected}, "
                         f"duplicated {duplicated}, wrong shapes {wrong}")


# ------------------------------------------------------------------------------------------------------------
# Every stage to every node: engines on all nodes for any TP/PP/CP/DP layout (``rollout.node_engines``)

_MAGIC = 0x46495046454E4345  # marks a bucket buffer's fences
_FENCE_WORDS = 8             # int64 words of the header and of the trailer (64 bytes: keeps 16-byte alignment)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageRoute:
    """Who takes part in a stage broadcast: ``sources[s]`` exports pipeline stage ``s`` (tp_rank 0 of its
    ``dp_rank == cp_rank == 0`` replica), ``receivers`` get every bucket of every stage. ``group`` holds
    the sources and receivers (NCCL with CUDA, gloo on CPU: the bucket payloads), ``object_group`` the
    same ranks over gloo (the manifests). Build it with ``new_stage_route``."""

    sources: tuple[int, ...]
    receivers: tuple[int, ...]
    group: object
    object_group: object

    @property
    def members(self) -> tuple[int, ...]:
        """Sources and receivers, sorted: the ranks of ``group`` and ``object_group``."""
        return tuple(sorted(set(self.sources) | set(self.receivers)))


def stage_sources(groups) -> tuple[int, ...]:
    """The global rank exporting each pipeline stage: tp = cp = dp = 0 of that stage, which Megatron's rank
    order (tp-cp-ep-dp-pp, pp slowest) puts at ``stage * world / pp``."""
    per_stage = groups.world_size // groups.pp_size
    return tuple(stage * per_stage for stage in range(groups.pp_size))


def new_stage_route(groups, receivers: list[int], *, backend: str | None = None) -> StageRoute:
    """Build the groups of a ``StageRoute`` to ``receivers`` (global ranks). Collective: every rank of the
    job calls it, with the same ``receivers``. ``backend``: default NCCL when CUDA is available, else gloo."""
    sources = stage_sources(groups)
    if groups.tp_rank == groups.cp_rank == groups.dp_rank == 0:
        assert groups.rank == sources[groups.pp_rank], (groups.rank, sources, groups.pp_rank)
    receivers = tuple(sorted(set(int(r) for r in receivers)))
    if not receivers or receivers[0] < 0 or receivers[-1] >= groups.world_size:
        raise ValueError(f"receivers must be ranks in [0, {groups.world_size}), got {list(receivers)}")
    members = sorted(set(sources) | set(receivers))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    group = dist.new_group(members, backend=backend)
    object_group = group if backend == "gloo" else dist.new_group(members, backend="gloo")
    return StageRoute(sources=sources, receivers=receivers, group=group, object_group=object_group)


def _fence(nonce: int, stage: int, index: int, specs, ok: bool) -> list[int]:
    return [_MAGIC, nonce, stage, index, len(specs), packed_size([(s, d) for _, s, d in specs]), int(ok), 0]


def broadcast_hf_buckets(model_chunks, *, route: StageRoute, groups, hf_config=None, mapping=None,
                         bucket_bytes: int = 512 << 20, dtype: torch.dtype | None = None) -> Iterator[NamedTensors]:
    """Yield every bucket of every stage, in stage order, on each of ``route.receivers``: each rank then
    holds the full HF-named model one bucket at a time (engines on every node, any parallel layout).

    Every rank of the job must exhaust the iterator. How it moves data:

    1. Each stage's exporting replica exports its own layers as ``export_hf_buckets(destination="stage")``
       does (TP all-gather per bucket inside the replica).
    2. Manifests first: each stage's source sends the list of its buckets' (HF name, shape, dtype),
       computed from shapes alone, with a fresh random nonce (one gloo all-gather of objects). A receiver
       checks that the manifests together cover the HF model exactly (``check_against_hf_state_dict``
       against the mapping's own list) before any tensor arrives.
    3. Then one broadcast per bucket from the stage's source over ``route.group``: one flat byte buffer,
       a 64-byte header (nonce, stage, bucket index, tensor count, payload bytes) before the payload and
       the same 64 bytes after it. A receiver checks both fences against the manifest, so a bucket of an
       earlier sync, a skipped or truncated one cannot pass as this one; the tensors are views of the
       buffer. The source checks its actual bucket against its manifest before sending.

    A failed check does not stop the loop (the other ranks are inside the broadcasts): this rank yields
    nothing more, keeps receiving, and raises ``ValueError`` once the last bucket has gone by. Memory: a
    receiver holds one bucket (``bucket_bytes`` plus 128 bytes); a source a packed copy on top of the
    export's own buffers.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    mapping = _resolve_mapping(mapping, hf_config, groups)
    rank = groups.rank
    member, receiver = rank in route.members, rank in route.receivers
    exporting = groups.dp_rank == 0 and groups.cp_rank == 0
    is_source = exporting and rank == route.sources[groups.pp_rank]
    local = None
    manifest = None
    if exporting:
        entries = _export_entries(model_chunks, mapping)
        buckets = plan_buckets(entries, bucket_bytes=bucket_bytes, tp_size=groups.tp_size)
        local = _stage_hf_buckets(buckets, groups=groups, mapping=mapping, dtype=dtype, device=None)
        if is_source:
            import secrets

            manifest = (groups.pp_rank, secrets.randbits(62),
                        [[spec for e in bucket for spec in _hf_specs(e, mapping=mapping, dtype=dtype)]
                         for bucket in buckets])
    if not member:
        for _ in local or ():  # tp_rank > 0 of an exporting replica: its part of the all-gathers only
            pass
        return

    gathered: list = [None] * len(route.members)
    dist.all_gather_object(gathered, manifest, group=route.object_group)
    manifests = {m[0]: m for m in gathered if m is not None}
    error: str | None = None
    if sorted(manifests) != list(range(len(route.sources))):
        # Every member sees the same gathered list: all skip the payloads together.
        for _ in local or ():
            pass
        raise ValueError(f"weight broadcast: manifests for stages {sorted(manifests)}, expected "
                         f"{len(route.sources)} stages")
    if receiver:
        sent = [(name, shape) for stage in range(len(route.sources)) for bucket in manifests[stage][2]
                for name, shape, _ in bucket]
        expected = {hf: mapping.hf_expected_shape(hf) for hf in mapping.hf_names()}
        try:
            check_against_hf_state_dict(sent, expected)
        except ValueError as e:
            error = str(e)
    device = collective_device(route.group)
    fence_bytes = _FENCE_WORDS * 8
    for stage in range(len(route.sources)):
        _, nonce, bucket_specs = manifests[stage]
        src = route.sources[stage]
        mine = local if groups.pp_rank == stage else None
        for index, specs in enumerate(bucket_specs):
            # The previous bucket and its buffer are let go before the next is built (else both are alive).
            bucket = buf = header = payload = trailer = None
            bucket = next(mine) if mine is not None else None  # in step with the stage's TP all-gathers
            payload_specs = [(shape, dt) for _, shape, dt in specs]
            size = packed_size(payload_specs)
            buf = torch.empty(2 * fence_bytes + size, dtype=torch.uint8, device=device)
            header, payload, trailer = buf[:fence_bytes], buf[fence_bytes:fence_bytes + size], buf[fence_bytes + size:]
            header.zero_()
            trailer.zero_()  # a broadcast that did not land leaves zeros, never an old bucket's fences
            if rank == src:
                got = [(n, tuple(t.shape), t.dtype) for n, t in bucket]
                ok = got == [(n, tuple(sh), dt) for n, sh, dt in specs]
                if ok and bucket:
                    pack_bytes([t.to(device) for _, t in bucket], out=payload)
                elif not ok:
                    payload.zero_()
                if not ok and error is None:
                    error = f"stage {stage} bucket {index}: exported {got}, manifest says {specs}"
                words = torch.tensor(_fence(nonce, stage, index, specs, ok), dtype=torch.int64, device=device)
                header.copy_(words.view(torch.uint8))
                trailer.copy_(words.view(torch.uint8))
            dist.broadcast(buf, src=src, group=route.group)
            if rank == src:
                if receiver and error is None:
                    yield bucket
                continue
            want = _fence(nonce, stage, index, specs, True)
            got_head, got_tail = header.view(torch.int64).tolist(), trailer.view(torch.int64).tolist()
            if error is None and (got_head != want or got_tail != want):
                error = (f"stage {stage} bucket {index} from rank {src}: fences {got_head} / {got_tail}, "
                         f"expected {want} (a missed, stale or truncated bucket)")
            if receiver and error is None:
                yield [(name, t) for (name, _, _), t in zip(specs, unpack_bytes(payload, payload_specs))]
        if mine is not None and next(mine, None) is not None:
            error = error or f"stage {stage} exported more buckets than its manifest lists"
    if error is not None:
        raise ValueError(f"weight broadcast on rank {rank}: {error}")
