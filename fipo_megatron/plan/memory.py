"""Per-GPU memory of a FIPO job, by phase: training (the actor's update) and rollout (the colocated engine).

    dims = ModelDims.from_hf(hf_config, tp=8)
    plan = estimate(cfg, cluster, dims)        # MemoryPlan: the lines, the peaks, the headroom

Static (exact, from the parameter count the dry run checks against the meta-built model):

- weights: ``params x bytes(params_dtype)``;
- gradients: Megatron's DDP keeps one fp32 buffer (``grad_reduce_in_fp32``) of every parameter; with the
  distributed optimizer it is laid out as megatron-core's ``_ParamAndGradBuffer`` pads it (each parameter
  starts at a multiple of 64 elements, the buffer ends at a multiple of lcm(DP x CP, 128));
- optimizer: Adam's two fp32 moments, plus fp32 main weights when the parameters are bf16, plus torch
  Adam's fp32 ``step`` scalar per parameter tensor where megatron-core falls back to torch's Adam (no TE or
  Apex here); over DP x CP with the distributed optimizer.

Activations of one micro-batch (an estimate; ``docs/plan.md`` compares it with measurements): the
micro-batch holds ``max(max_tokens_per_micro_batch, longest padded sequence)`` tokens, ``s = that / cp``
per GPU. Per layer, what autograd keeps for backward, in elements of ``params_dtype`` (h hidden, a heads,
g KV groups, d head dim, f FFN, t = TP, and /t on the first two terms with sequence parallelism):

    2 s h   norm inputs (residual stream)      2 s h   norm outputs = linear inputs
    s (a + 2g) d / t   fused QKV               s (a + g) d / t   q, k after RoPE
    s a d / t   attention output               3 s f / t   SwiGLU: fc1 output (2f) and its product (f)
    + fp32: 2 s RMSNorm rstd, s a / t softmax log-sum-exp (flash attention)

The local spec (CPU, no Transformer Engine) also keeps the CP-gathered K/V (with context parallelism, the
heads-expanded K/V prefixes of its blockwise kernels; without it, the GQA-expanded K/V only for CUDA's fp32
kernel) and a second copy of the attention output. ``recompute: selective`` drops the attention internals,
``full`` keeps only each layer's input plus one layer recomputed in backward. Pipeline stage ``r`` holds
``min(pp - r, micro-batches)`` micro-batches in flight under 1F1B (interleaved: Megatron's warm-up count of
model chunks). Backward keeps about one layer's worth of gradients alive. The last stage adds the
chunked log-prob's peak (``actor/logprobs.py``: two fp32
``chunk x V/t`` buffers forward; backward an fp32 ``V/t x h`` weight-gradient accumulator, the hidden
gradient and one chunk) and the FIPO loss's per-token buffers (FutureKL's float64 scan and the loss terms).

Rollout: the actor's static memory stays resident; a colocated SGLang / vLLM engine takes its memory
fraction of the GPU (``mem_fraction_static`` / ``gpu_memory_utilization``), of which its weights are
``params x 2 / engine tp`` and the rest is KV cache.
"""

from __future__ import annotations

import dataclasses
import math

from fipo_megatron.config import FipoConfig
from fipo_megatron.plan.recipe import Cluster

GiB = 2**30
_DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
# FIPO loss per-token buffers (bytes per local token): FutureKL's float64 chunked scan (input, chunk sums,
# carries, result: 4 x 8 B) and about twenty fp32 per-token terms of the loss (ratios, clip masks,
# influence weights, their gradients).
_LOSS_BYTES_PER_TOKEN = 4 * 8 + 20 * 4
# What an SGLang/vLLM process keeps on its GPUs after release_memory (CUDA context, graph pools).
_ENGINE_RELEASED_BYTES = 1 * GiB


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelDims:
    """The shapes that decide memory (vocabulary already padded to a multiple of tp)."""

    num_layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int
    head_dim: int
    vocab: int
    padded_vocab: int
    tied: bool
    qkv_bias: bool
    qk_norm: bool

    @classmethod
    def from_hf(cls, hf_config, *, tp: int) -> "ModelDims":
        """The dims of a transformers config, its vocabulary padded as the actor pads it for ``tp``."""
        from fipo_megatron.models.hf_config import arch_spec, padded_vocab_size

        spec = arch_spec(hf_config)
        heads = hf_config.num_attention_heads
        return cls(num_layers=hf_config.num_hidden_layers, hidden=hf_config.hidden_size,
                   ffn=hf_config.intermediate_size, heads=heads,
                   groups=getattr(hf_config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
                   vocab=hf_config.vocab_size, padded_vocab=padded_vocab_size(hf_config, tp=tp),
                   tied=bool(getattr(hf_config, "tie_word_embeddings", False)),
                   qkv_bias=spec.qkv_bias, qk_norm=spec.qk_layernorm)

    def layer_params(self, tp: int) -> int:
        """Parameters of one transformer layer on one tensor rank."""
        h, d, f = self.hidden, self.head_dim, self.ffn
        qkv_rows = (self.heads + 2 * self.groups) * d // tp
        n = 2 * h + qkv_rows * h + h * (self.heads * d // tp) + 2 * (f // tp) * h + h * (f // tp)
        if self.qkv_bias:
            n += qkv_rows
        if self.qk_norm:
            n += 2 * d
        return n

    def total_params(self) -> int:
        """Parameters of the HF model (unpadded vocabulary)."""
        n = self.num_layers * self.layer_params(1) + self.vocab * self.hidden + self.hidden
        return n if self.tied else n + self.vocab * self.hidden


def stage_param_count(dims: ModelDims, *, parallel, pp_rank: int) -> int:
    """Parameters one rank of pipeline stage ``pp_rank`` holds (all its virtual chunks)."""
    tp, pp = parallel.tp, parallel.pp
    n = dims.num_layers // pp * dims.layer_params(tp)
    vocab_rows = dims.padded_vocab // tp * dims.hidden
    if pp_rank == 0:
        n += vocab_rows
    if pp_rank == pp - 1:
        n += dims.hidden  # final norm
        if not dims.tied or pp > 1:  # untied output layer, or the last stage's copy of the tied one
            n += vocab_rows
    return n


def adam_keeps_step_tensors() -> bool:
    """Whether this megatron-core's Adam is torch's (a fp32 ``step`` tensor per parameter): it falls back to
    it without Transformer Engine and Apex, whose fused Adam keeps the step per parameter group."""
    try:
        import megatron.core.optimizer as optimizer
    except ImportError:  # pragma: no cover
        return True
    return getattr(getattr(optimizer, "Adam", None), "__module__", "torch").startswith("torch.")


def stage_tensor_count(dims: ModelDims, *, parallel, pp_rank: int) -> int:
    """Parameter tensors one rank of stage ``pp_rank`` holds (torch Adam keeps a ``step`` scalar for each)."""
    per_layer = 6 + int(dims.qkv_bias) + 2 * int(dims.qk_norm)
    n = dims.num_layers // parallel.pp * per_layer
    if pp_rank == 0:
        n += 1
    if pp_rank == parallel.pp - 1:
        n += 1 + int(not dims.tied or parallel.pp > 1)
    return n


def grad_buffer_numel(param_numels: list[int], *, distributed_optimizer: bool, dp_cp: int) -> int:
    """Elements of Megatron DDP's fp32 gradient buffer for these parameters (model order).

    megatron-core ``_ParamAndGradBuffer`` (0.16-0.19, one bucket: no overlapped reduction) walks the
    parameters in reverse and pads only for the distributed optimizer.
    """
    if not distributed_optimizer:
        return sum(param_numels)
    end = 0
    for n in reversed(param_numels):
        end = -(-end // 64) * 64 + n
    divisor = math.lcm(dp_cp, 128)
    return -(-end // divisor) * divisor


@dataclasses.dataclass(frozen=True, kw_only=True)
class Line:
    """One row of the plan: what, bytes per GPU, how it was counted."""

    label: str
    nbytes: int
    note: str = ""


@dataclasses.dataclass(kw_only=True)
class MemoryPlan:
    """The per-GPU plan of the worst rank of each phase."""

    train: list[Line]
    rollout: list[Line]
    train_stage: int
    capacity: int                     # GPU memory minus the reserve
    cluster: Cluster
    tokens_per_micro_batch: int       # before the CP split
    tokens_per_gpu: int
    in_flight: int
    num_micro_batches: int
    engine: dict                      # engine facts (kind, tp, fraction, weights, kv tokens)
    problems: list[str]               # reasons it does not fit (empty: fits)
    warnings: list[str]

    @property
    def train_total(self) -> int:
        """Bytes per GPU while the actor trains (the worst pipeline stage)."""
        return sum(x.nbytes for x in self.train)

    @property
    def rollout_total(self) -> int:
        """Bytes per GPU while the colocated engine samples (the actor's static memory stays resident)."""
        return sum(x.nbytes for x in self.rollout)

    @property
    def peak(self) -> int:
        """The larger of the two phases."""
        return max(self.train_total, self.rollout_total)

    @property
    def headroom(self) -> int:
        """``capacity - peak`` (negative when the plan does not fit)."""
        return self.capacity - self.peak

    @property
    def fits(self) -> bool:
        """No problem found (``problems`` is empty)."""
        return not self.problems


def micro_batch_tokens(cfg: FipoConfig) -> tuple[int, int]:
    """(tokens of the largest micro-batch before the CP split, its longest padded sequence)."""
    from fipo_megatron.parallel.cp_layout import padded_length

    p = cfg.parallel
    multiple = p.sequence_parallel_multiple()
    longest = padded_length(cfg.data.max_prompt_length + cfg.data.max_response_length, cp_size=p.cp,
                            multiple=multiple)
    return max(cfg.actor.max_tokens_per_micro_batch, longest), longest


def layer_activation_bytes(dims: ModelDims, *, tokens: int, tp: int, cp: int, sequence_parallel: bool,
                           recompute: str, backend: str, dtype_bytes: int, seq_len: int | None = None) -> int:
    """Bytes one layer keeps for backward for ``tokens`` local tokens (see the module docstring).

    ``backend``: "te" (Transformer Engine's fused attention), "local" (the local spec on CUDA: SDPA's flash /
    memory-efficient kernels) or "local-cpu" (the same on CPU: SDPA's fused CPU kernel, which keeps only a
    log-sum-exp per row, never the probabilities). ``seq_len`` is accepted for callers and unused: no
    term grows with the sequence length any more.
    """
    s, h, a, g, d, f = tokens, dims.hidden, dims.heads, dims.groups, dims.head_dim, dims.ffn
    sp = tp if sequence_parallel else 1
    if recompute == "full":
        return s * h // sp * dtype_bytes
    elems = 4 * s * h // sp + s * (a + 2 * g) * d // tp + s * (a + g) * d // tp + s * a * d // tp + 3 * s * f // tp
    fp32 = 2 * s // sp
    if recompute == "none":
        fp32 += s * a // tp
        if backend in ("local", "local-cpu"):
            kv_len = s * cp
            if cp > 1:
                elems += 2 * 2 * kv_len * g * d // tp  # gathered K/V and their reordered copies
                elems += 2 * kv_len * a * d // tp      # the blockwise kernels' K/V prefixes (heads expanded)
            elif a != g and backend == "local" and dtype_bytes == 4:
                elems += 2 * kv_len * a * d // tp      # GQA expansion: CUDA's fp32 kernel takes no grouped K/V
            elems += s * a * d // tp                   # per-sequence SDPA outputs before the concat
            # Unfused local-spec modules (saved-tensor hooks on megatron-core 0.16's local spec): torch's
            # RMSNorm keeps its weighted output besides x and x * rstd, and the SwiGLU keeps the gate's
            # sum and silu output besides fc1's output and the product.
            elems += 2 * s * h // sp + 2 * s * f // tp
    return elems * dtype_bytes + fp32 * 4


def in_flight_micro_batches(*, pp: int, vpp: int, pp_rank: int, num_micro_batches: int) -> float:
    """Micro-batches (in whole-stage units) whose activations 1F1B keeps alive on stage ``pp_rank``."""
    if vpp <= 1:
        return min(pp - pp_rank, num_micro_batches)
    # megatron-core interleaved schedule: warm-up model chunks, then one more in the steady state.
    chunks = min((pp - pp_rank - 1) * 2 + (vpp - 1) * pp + 1, num_micro_batches * vpp)
    return chunks / vpp


def logprob_peak_bytes(dims: ModelDims, *, tokens: int, tp: int, chunk: int, dtype_bytes: int) -> int:
    """Transient peak of the chunked vocab-parallel log-prob (``actor/logprobs.py``) on the last stage."""
    v, h, c = dims.padded_vocab // tp, dims.hidden, min(chunk, tokens)
    forward = 2 * c * v * 4
    backward = v * h * 4 + tokens * h * dtype_bytes + c * v * (4 + dtype_bytes)
    if dtype_bytes != 4:
        backward += v * h * (dtype_bytes + 4)  # the chunk's bf16 weight-gradient product and its fp32 copy
    return max(forward, backward)


def _engine_facts(cfg: FipoConfig, dims: ModelDims, cluster: Cluster) -> dict:
    kind = cfg.rollout.engine
    kw = dict(cfg.rollout.engine_kwargs or {})
    if kind in ("sglang", "vllm"):
        etp = int(kw.get("tp_size") or kw.get("tensor_parallel_size") or 1)
        frac = float(kw.get("mem_fraction_static") or kw.get("gpu_memory_utilization") or 0.5)
        weights = dims.total_params() * 2 // etp
        kv_heads = max(1, dims.groups // etp)
        kv_per_token = 2 * dims.num_layers * kv_heads * dims.head_dim * 2
        pool = int(frac * cluster.gpu_bytes)
        kv = max(0, pool - weights)
        num_engines = int(kw.get("num_engines") or 1)
        per_node = getattr(cfg.rollout, "placement", "rank0") == "per_node"
        gpus = etp * num_engines * (cluster.nnodes if per_node else 1)
        return dict(kind=kind, tp=etp, fraction=frac, pool=pool, weights=weights, kv=kv,
                    kv_tokens=kv // kv_per_token, num_engines=num_engines, per_node=per_node, gpus=gpus)
    if kind in ("embedded", "auto"):
        return dict(kind="embedded", tp=1, fraction=None, pool=0, weights=dims.total_params() * 2, kv=0,
                    kv_tokens=None, num_engines=1, per_node=False, gpus=1)
    return dict(kind=kind, tp=None, fraction=None, pool=0, weights=0, kv=0, kv_tokens=None, num_engines=0,
                per_node=False, gpus=0)  # remote servers: nothing on the training GPUs


def estimate(cfg: FipoConfig, cluster: Cluster, dims: ModelDims, *, stage_params: dict[int, list[int]] | None = None,
             backend: str = "te") -> MemoryPlan:
    """The per-GPU plan of ``cfg`` on ``cluster``; see the module docstring.

    ``stage_params``: per pipeline stage, the parameter sizes of one of its ranks in model order (from the
    dry run: exact buffer padding); default: the analytic count. ``backend``: see
    :func:`layer_activation_bytes`.
    """
    p, a = cfg.parallel, cfg.actor
    world = cluster.world_size
    dp = world // p.model_parallel_size if world % p.model_parallel_size == 0 else 0
    dtype_bytes = _DTYPE_BYTES[a.params_dtype]
    dist_opt = p.use_distributed_optimizer
    mb_tokens, longest = micro_batch_tokens(cfg)
    s = mb_tokens // p.cp
    samples_per_rank = max(1, a.ppo_mini_batch_size * cfg.sampling.n // max(dp, 1))
    per_mb = max(1, mb_tokens // longest)
    num_micro = max(1, -(-samples_per_rank // per_mb))
    problems: list[str] = []
    warnings: list[str] = []
    capacity = cluster.gpu_bytes - cluster.reserve_bytes

    step_tensors = adam_keeps_step_tensors() and not dist_opt

    def static_lines(stage: int) -> list[Line]:
        numels = (stage_params or {}).get(stage)
        n = sum(numels) if numels else stage_param_count(dims, parallel=p, pp_rank=stage)
        n_tensors = len(numels) if numels else stage_tensor_count(dims, parallel=p, pp_rank=stage)
        grad_numel = grad_buffer_numel(numels or [n], distributed_optimizer=dist_opt, dp_cp=max(dp, 1) * p.cp)
        opt_numel = grad_numel // (max(dp, 1) * p.cp) if dist_opt else n
        per_param = 8 + (4 if dtype_bytes != 4 else 0)
        where = f"/ DP x CP = {max(dp, 1) * p.cp} (distributed optimizer)" if dist_opt else "every rank (plain)"
        return [Line(label=f"weights ({a.params_dtype})", nbytes=n * dtype_bytes, note=f"{n / 1e9:.3f}e9 params x {dtype_bytes} B"),
                Line(label="gradients (fp32 DDP buffer)", nbytes=grad_numel * 4, note=f"{grad_numel / 1e9:.3f}e9 x 4 B"),
                Line(label="optimizer (Adam)", nbytes=opt_numel * per_param + 4 * n_tensors * step_tensors,
                     note=f"{per_param} B/param {where}")]

    worst = None
    for stage in range(p.pp):
        lines = static_lines(stage)
        flight = in_flight_micro_batches(pp=p.pp, vpp=p.num_virtual_stages, pp_rank=stage, num_micro_batches=num_micro)
        layers = dims.num_layers // p.pp
        per_layer = layer_activation_bytes(dims, tokens=s, tp=p.tp, cp=p.cp, sequence_parallel=p.sequence_parallel,
                                           recompute=a.recompute, backend=backend, dtype_bytes=dtype_bytes)
        act = int(flight * layers * per_layer)
        note = f"{flight:g} in flight x {layers} layers x {per_layer / 2**20:.1f} MiB ({s} tokens/GPU, recompute {a.recompute})"
        if a.recompute == "full":
            act += layer_activation_bytes(dims, tokens=s, tp=p.tp, cp=p.cp, sequence_parallel=p.sequence_parallel,
                                          recompute="none", backend=backend, dtype_bytes=dtype_bytes)
            note += " + 1 layer recomputed"
        lines.append(Line(label="activations (1F1B)", nbytes=act, note=note))
        lines.append(Line(label="backward working set", nbytes=layer_activation_bytes(
            dims, tokens=s, tp=p.tp, cp=p.cp, sequence_parallel=p.sequence_parallel, recompute="none",
            backend=backend, dtype_bytes=dtype_bytes), note="one layer's gradients in flight"))
        if stage == p.pp - 1:
            sp = p.tp if p.sequence_parallel else 1
            head = 2 * s * dims.hidden // sp * dtype_bytes + s * dims.hidden * dtype_bytes + s * (4 + 8)
            lines.append(Line(label="final norm + hidden states", nbytes=head, note="saved for the log-prob backward"))
            lines.append(Line(label="chunked log-prob peak", nbytes=logprob_peak_bytes(
                dims, tokens=s, tp=p.tp, chunk=a.logprob_chunk_size, dtype_bytes=dtype_bytes),
                note=f"chunk {min(a.logprob_chunk_size, s)} x vocab/tp {dims.padded_vocab // p.tp}"))
            lines.append(Line(label="FutureKL + loss buffers", nbytes=s * _LOSS_BYTES_PER_TOKEN,
                              note=f"{_LOSS_BYTES_PER_TOKEN} B/token"))
        if worst is None or sum(x.nbytes for x in lines) > sum(x.nbytes for x in worst[1]):
            worst = (stage, lines)
    stage, train = worst
    engine = _engine_facts(cfg, dims, cluster)
    static = sum(x.nbytes for x in train[:3])
    rollout = list(train[:3])
    if engine["kind"] in ("sglang", "vllm"):
        rollout.append(Line(label=f"{engine['kind']} weights", nbytes=engine["weights"],
                            note=f"bf16 / engine TP {engine['tp']}"))
        rollout.append(Line(label=f"{engine['kind']} KV cache", nbytes=engine["kv"],
                            note=f"fraction {engine['fraction']} x GPU - weights = {engine['kv_tokens']} tokens"))
        train.append(Line(label="engine after release_memory", nbytes=_ENGINE_RELEASED_BYTES,
                          note="CUDA context of the engine process (assumed)"))
        if engine["weights"] >= engine["pool"]:
            problems.append(f"rollout.engine_kwargs: the engine's weights ({engine['weights'] / GiB:.1f} GiB per GPU at "
                            f"tp_size {engine['tp']}) do not fit its memory fraction {engine['fraction']} "
                            f"({engine['pool'] / GiB:.1f} GiB): raise tp_size or the fraction")
        elif engine["kv_tokens"] < cfg.data.max_prompt_length + cfg.data.max_response_length:
            problems.append(f"rollout.engine_kwargs: the KV cache holds {engine['kv_tokens']} tokens, less than one "
                            f"sequence of {cfg.data.max_prompt_length + cfg.data.max_response_length}")
    elif engine["kind"] == "embedded":
        rollout.append(Line(label="embedded engine weights", nbytes=engine["weights"], note="rank 0's GPU, bf16"))
    if dp == 0:
        problems.append(f"world size {world} is not divisible by parallel.tp*pp*cp = {p.model_parallel_size}")
    plan = MemoryPlan(train=train, rollout=rollout, train_stage=stage, capacity=capacity, cluster=cluster,
                      tokens_per_micro_batch=mb_tokens, tokens_per_gpu=s,
                      in_flight=int(math.ceil(in_flight_micro_batches(pp=p.pp, vpp=p.num_virtual_stages,
                                                                      pp_rank=stage, num_micro_batches=num_micro))),
                      num_micro_batches=num_micro, engine=engine, problems=problems, warnings=warnings)
    if plan.train_total > capacity:
        act = next(x.nbytes for x in train if x.label == "activations (1F1B)")
        problems.append(
            f"training needs {plan.train_total / GiB:.1f} GiB per GPU on pipeline stage {stage}, {capacity / GiB:.1f} GiB "
            f"usable ({cluster.gpu_memory_gib:g} GiB - {cluster.reserve_gib:g} reserve): activations take "
            f"{act / GiB:.1f} GiB for micro-batches of {mb_tokens} tokens (actor.max_tokens_per_micro_batch "
            f"{a.max_tokens_per_micro_batch}, longest sequence {longest} from data.max_prompt_length + "
            f"data.max_response_length) split over parallel.cp={p.cp}, actor.recompute={a.recompute}, "
            f"{plan.in_flight} in flight at parallel.pp={p.pp}; weights, gradients and optimizer "
            f"{static / GiB:.1f} GiB")
    if plan.rollout_total > capacity:
        problems.append(f"the rollout needs {plan.rollout_total / GiB:.1f} GiB per GPU (the actor's "
                        f"{static / GiB:.1f} GiB resident + the engine), {capacity / GiB:.1f} GiB usable")
    return plan
