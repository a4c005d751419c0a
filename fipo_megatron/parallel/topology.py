"""The one owner of parallel topology: validate the layout, initialise the process group and Megatron's groups
once, hand them out.

    groups = initialize_parallel(ParallelConfig(tp=2, pp=2, cp=1), hf_config=hf_config)
    groups.tp_group, groups.dp_cp_group, groups.pg_collection, groups.is_last_stage ...

Megatron's ranks are laid out in its default order "tp-cp-ep-dp-pp" (tp fastest). Everything that needs a
group takes it from the frozen :class:`ParallelGroups` bundle; nothing here adds module globals beyond the
ones megatron-core's ``parallel_state`` keeps itself, and outside ``parallel/`` nothing reads those
(``tests/test_import_graph.py``). Also here: the process group (:func:`init_distributed`, with its timeout
``$FIPO_DIST_TIMEOUT_MIN``), the per-stage seeding (:func:`seed_stage_rng`) and the devices tensors live on
(:func:`local_device`, :func:`collective_device`).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

from fipo_megatron.log import get_logger
from fipo_megatron.parallel.cp_layout import padding_unit
from fipo_megatron.parallel.cpu_compat import apply_cpu_compat

logger = get_logger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Model-parallel layout. Data parallelism is what is left: ``dp = world / (tp * pp * cp)``.

    Fields:
        tp: tensor-parallel size (heads, FFN and vocab split over ranks).
        pp: pipeline-parallel size (layers split over stages).
        cp: context-parallel size (each sequence split zig-zag over ranks, see ``parallel.cp_layout``).
        vpp: virtual pipeline stages per rank (interleaved schedule), None for none; needs pp > 1.
        sequence_parallel: shard activations outside attention/MLP over TP (GPU only, needs tp > 1).
        use_distributed_optimizer: shard optimizer state over DP (Megatron's distributed optimizer; GPU only).
    """

    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: int | None = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False

    def __post_init__(self):
        for name in ("tp", "pp", "cp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelConfig.{name} must be an int >= 1, got {value!r}")
        if self.vpp is not None:
            if not isinstance(self.vpp, int) or self.vpp < 1:
                raise ValueError(f"ParallelConfig.vpp must be None or an int >= 1, got {self.vpp!r}")
            if self.vpp > 1 and self.pp == 1:
                raise ValueError(f"ParallelConfig.vpp = {self.vpp} needs pp > 1 (got pp = 1)")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("ParallelConfig.sequence_parallel needs tp > 1 (got tp = 1)")

    @property
    def model_parallel_size(self) -> int:
        """Ranks one model replica spans: ``tp * pp * cp``."""
        return self.tp * self.pp * self.cp

    @property
    def num_virtual_stages(self) -> int:
        """Model chunks per rank (1 without interleaving)."""
        return self.vpp or 1

    def seq_multiple(self) -> int:
        """Every (packed) sequence's length must be a multiple of this: ``2*cp`` for CP, times tp with SP
        (``parallel.cp_layout.padding_unit``)."""
        return padding_unit(cp_size=self.cp, multiple=self.sequence_parallel_multiple())

    def sequence_parallel_multiple(self) -> int:
        """The padding multiple sequence parallelism adds on top of CP's ``2*cp`` (its TP ranks split each
        sequence's tokens): tp with sequence parallelism, else 1."""
        return self.tp if self.sequence_parallel else 1


def local_device() -> torch.device:
    """This process's compute device: its current CUDA device, or the CPU without CUDA."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def collective_device(group=None) -> torch.device:
    """Where the tensors of a collective over ``group`` (None: the default group) must live: this process's
    CUDA device under NCCL, the CPU under gloo (a job may mix them, e.g. gloo groups beside NCCL)."""
    return local_device() if dist.get_backend(group) == "nccl" else torch.device("cpu")


def validate_layout(config: ParallelConfig, *, world_size: int, num_attention_heads: int | None = None,
                    num_query_groups: int | None = None, num_layers: int | None = None,
                    seq_length: int | None = None,
                    on_cpu: bool | None = None) -> int:
    """Check that ``config`` fits the job and the model; return the data-parallel size.

    Raises ``ValueError`` naming the offending numbers, before any group or model exists.
    ``seq_length`` (optional) is checked against the CP/SP padding rule (:meth:`ParallelConfig.seq_multiple`).
    The vocabulary needs no check: ``models.hf_config`` pads it to a multiple of tp. ``on_cpu`` defaults to "CUDA is not available" and rejects the GPU-only features.
    """
    c = config
    mp = c.model_parallel_size
    if world_size < 1 or world_size % mp:
        raise ValueError(f"world size {world_size} is not divisible by tp*pp*cp = {mp} "
                         f"(tp={c.tp}, pp={c.pp}, cp={c.cp})")
    if num_attention_heads is not None and num_attention_heads % c.tp:
        raise ValueError(f"num_attention_heads {num_attention_heads} is not divisible by tp = {c.tp}")
    if num_query_groups is not None and num_query_groups % c.tp:
        raise ValueError(f"num_query_groups (KV heads) {num_query_groups} is not divisible by tp = {c.tp}; "
                         f"choose tp dividing {num_query_groups}")
    if num_layers is not None:
        stages = c.pp * c.num_virtual_stages
        if num_layers % stages:
            raise ValueError(f"num_layers {num_layers} is not divisible by pp*vpp = {stages} "
                             f"(pp={c.pp}, vpp={c.num_virtual_stages})")
    if seq_length is not None and seq_length % c.seq_multiple():
        sp = f", times tp={c.tp} for sequence parallelism" if c.sequence_parallel else ""
        raise ValueError(f"sequence length {seq_length} is not a multiple of {c.seq_multiple()} "
                         f"(2*cp with cp={c.cp}{sp}); pad each sequence with parallel.cp_layout.padded_length")
    if on_cpu is None:
        on_cpu = not torch.cuda.is_available()
    if on_cpu and c.sequence_parallel:
        raise ValueError("ParallelConfig.sequence_parallel is GPU-only in megatron-core; set it False on CPU")
    if on_cpu and c.use_distributed_optimizer:
        raise ValueError("ParallelConfig.use_distributed_optimizer is GPU-only in megatron-core; set it False on CPU")
    return world_size // mp


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelGroups:
    """Sizes, ranks and process groups of this rank, for every axis. Pass it explicitly; don't re-query."""

    config: ParallelConfig
    world_size: int
    rank: int
    tp_size: int
    pp_size: int
    cp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    tp_group: Any
    pp_group: Any
    cp_group: Any
    dp_group: Any
    dp_cp_group: Any  # data x context parallel: where gradients are reduced and token counts summed
    tp_cp_group: Any
    mp_group: Any  # tensor x pipeline (x context) model-parallel group
    embedding_group: Any  # first and last stage (tied word embeddings under PP)
    is_first_stage: bool
    is_last_stage: bool
    pg_collection: Any = None  # megatron.core.process_groups_config.ProcessGroupCollection when it exists

    @property
    def vpp_size(self) -> int:
        """Virtual stages (model chunks) per rank."""
        return self.config.num_virtual_stages

    def is_first_chunk(self, vp_stage: int | None = None) -> bool:
        """Whether this rank's model chunk ``vp_stage`` (None without vpp) is the pipeline's first: the one
        that holds the embedding. Megatron's ``is_pipeline_first_stage(ignore_virtual=False)``."""
        return self.is_first_stage and (self.vpp_size == 1 or vp_stage == 0)

    def is_last_chunk(self, vp_stage: int | None = None) -> bool:
        """Whether this rank's model chunk ``vp_stage`` (None without vpp) is the pipeline's last: the one
        that holds the output layer. Megatron's ``is_pipeline_last_stage(ignore_virtual=False)``."""
        return self.is_last_stage and (self.vpp_size == 1 or vp_stage == self.vpp_size - 1)


def seed_stage_rng(seed: int, *, pp_rank: int) -> None:
    """Seed torch's default generator and Megatron's RNG tracker for pipeline stage ``pp_rank``.

    The stage seed is ``seed + 100 * pp_rank``, as Megatron-LM's training does: the ranks of one stage
    (its TP, CP and DP ranks) share the default stream, so the parameters they hold as replicas start
    equal, while stages draw different numbers for their different layers. The tracker then derives the
    per-TP-rank stream (``model_parallel_cuda_manual_seed``) that Megatron forks into for TP-sharded
    weights and dropout. Needs Megatron's groups (:func:`initialize_parallel`).
    """
    from megatron.core import tensor_parallel

    stage_seed = seed + 100 * pp_rank
    torch.manual_seed(stage_seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


DIST_TIMEOUT_ENV = "FIPO_DIST_TIMEOUT_MIN"
_DEFAULT_DIST_TIMEOUT_MIN = 60


def dist_timeout_minutes() -> int:
    """How long a collective may wait before it fails, in minutes: ``$FIPO_DIST_TIMEOUT_MIN``, default 60.

    One value for the default process group and for Megatron's model-parallel groups. The default is
    generous because the other ranks wait in a collective while rank 0 generates a whole rollout phase.
    """
    raw = os.environ.get(DIST_TIMEOUT_ENV, str(_DEFAULT_DIST_TIMEOUT_MIN))
    try:
        minutes = int(raw)
    except ValueError:
        raise ValueError(f"{DIST_TIMEOUT_ENV} must be a whole number of minutes, got {raw!r}") from None
    if minutes < 1:
        raise ValueError(f"{DIST_TIMEOUT_ENV} must be >= 1 (minutes), got {minutes}")
    return minutes


def init_distributed(*, backend: str | None = None) -> bool:
    """Initialise torch.distributed for this process unless it already is; return whether this call did.

    ``backend``: None picks NCCL with CUDA (this process's GPU is ``$LOCAL_RANK``, bound through
    ``device_id`` so NCCL does not guess it) and gloo without; "gloo" forces gloo (one-process CPU work
    such as offline conversion). Launched by torchrun or SLURM (``RANK`` and ``WORLD_SIZE`` set), the job's
    rendezvous comes from the environment; a lone process gets a private one-rank group on a free local
    port. The collective timeout is :func:`dist_timeout_minutes` (``$FIPO_DIST_TIMEOUT_MIN``, minutes,
    default 60). Tests (``testing.distributed.run_distributed``) initialise their own gloo groups first,
    so this is then a no-op.
    """
    if dist.is_initialized():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs: dict[str, Any] = {"timeout": datetime.timedelta(minutes=dist_timeout_minutes())}
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, **kwargs)
        return True
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, **kwargs)
    return True


def _current_layout(ps) -> tuple[int, int, int, int | None]:
    return (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_context_parallel_world_size(), ps.get_virtual_pipeline_model_parallel_world_size())


def initialize_parallel(config: ParallelConfig, *, hf_config=None, seed: int = 1234,
                        distributed_timeout_minutes: int | None = None, on_cpu: bool | None = None) -> ParallelGroups:
    """Initialise torch.distributed (if needed, :func:`init_distributed`) and Megatron's model-parallel
    groups; return the bundle.

    Idempotent for the same ``config``; a different layout in the same process needs
    :func:`destroy_parallel` first. With ``hf_config`` the layout is checked against the model (heads,
    KV heads, layers) before anything is created (``on_cpu`` as in :func:`validate_layout`; the planner
    passes False to check a GPU layout on CPU). Seeds the RNGs once, when it creates the groups
    (:func:`seed_stage_rng`). ``distributed_timeout_minutes`` of Megatron's groups: None for
    :func:`dist_timeout_minutes`, the default group's.
    """
    from megatron.core import parallel_state as ps

    apply_cpu_compat()
    init_distributed()
    world_size = dist.get_world_size()
    model_kw = {}
    if hf_config is not None:
        model_kw = dict(num_attention_heads=hf_config.num_attention_heads,
                        num_query_groups=getattr(hf_config, "num_key_value_heads", None)
                        or hf_config.num_attention_heads,
                        num_layers=hf_config.num_hidden_layers)
    dp = validate_layout(config, world_size=world_size, on_cpu=on_cpu, **model_kw)

    want = (config.tp, config.pp, config.cp, config.vpp if config.vpp and config.vpp > 1 else None)
    if ps.model_parallel_is_initialized():
        if _current_layout(ps) != want:
            raise ValueError(f"Megatron is already initialised with (tp, pp, cp, vpp) = {_current_layout(ps)}, "
                             f"not {want}; call destroy_parallel() first")
    else:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=config.tp, pipeline_model_parallel_size=config.pp,
            virtual_pipeline_model_parallel_size=want[3], context_parallel_size=config.cp,
            distributed_timeout_minutes=(dist_timeout_minutes() if distributed_timeout_minutes is None
                                         else distributed_timeout_minutes))
        seed_stage_rng(seed, pp_rank=ps.get_pipeline_model_parallel_rank())
        logger.info("parallel layout: tp=%d pp=%d cp=%d vpp=%s dp=%d (world %d)", config.tp, config.pp,
                    config.cp, want[3], dp, world_size)

    pg_collection = _process_group_collection()
    return ParallelGroups(
        config=config, world_size=world_size, rank=dist.get_rank(),
        tp_size=config.tp, pp_size=config.pp, cp_size=config.cp, dp_size=dp,
        tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
        cp_group=ps.get_context_parallel_group(), dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        tp_cp_group=ps.get_tensor_and_context_parallel_group(),
        mp_group=ps.get_model_parallel_group(), embedding_group=ps.get_embedding_group(check_initialized=False),
        is_first_stage=ps.is_pipeline_first_stage(ignore_virtual=True),
        is_last_stage=ps.is_pipeline_last_stage(ignore_virtual=True),
        pg_collection=pg_collection,
    )


def _process_group_collection():
    """Megatron's ProcessGroupCollection of the groups just initialised; None where the API is missing."""
    try:
        from megatron.core.process_groups_config import ProcessGroupCollection
    except ImportError:  # megatron-core without the explicit-group API
        return None
    try:
        return ProcessGroupCollection.use_mpu_process_groups()
    except Exception as err:  # a getter of some optional group (MoE, hybrid CP) missing in this version
        logger.debug("full ProcessGroupCollection unavailable (%s); using the dense-model groups", err)
        return ProcessGroupCollection.use_mpu_process_groups(
            required_pgs=["tp", "pp", "mp", "embd", "pos_embd", "cp", "tp_cp", "dp", "dp_cp"])


def destroy_parallel() -> None:
    """Tear down Megatron's model-parallel groups (not torch.distributed), e.g. to switch layouts."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
