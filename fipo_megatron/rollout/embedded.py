"""The embedded rollout engine: a transformers causal LM on CPU or one GPU, sampled in our own decode loop.

It is the default where no server engine (SGLang, vLLM) is installed: the CPU demo and CI use it, and it
is the reference the other engines' log-prob conventions are checked against. The decode loop is ours
(not ``model.generate``) so that it returns, per sampled token, the log-prob under
``log_softmax(logits / temperature)`` (see ``rollout/base.py``) without a second forward pass.

    engine = EmbeddedEngine(hf_config=cfg)               # random init; weights arrive by update_weights
    engine = EmbeddedEngine(model_path="/ckpt/Qwen2.5-0.5B", device="cuda")
"""

from __future__ import annotations

import torch

from fipo_megatron.log import get_logger
from fipo_megatron.rollout.base import RolloutEngine, RolloutOutput, SamplingParams, register_engine
from fipo_megatron.rollout.sampling import sample_next_token

logger = get_logger(__name__)


def _from_pretrained_or_config(*, model_path, hf_config, dtype):
    import transformers

    # transformers >= 4.56 names the argument ``dtype``; older releases (>= 4.45 supported) ``torch_dtype``.
    for key in ("dtype", "torch_dtype"):
        try:
            if model_path is not None:
                return transformers.AutoModelForCausalLM.from_pretrained(model_path, **{key: dtype})
            return transformers.AutoModelForCausalLM.from_config(hf_config, **{key: dtype})
        except TypeError:
            continue
    raise RuntimeError("could not build the transformers model with either dtype= or torch_dtype=")


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def _forward_params(model) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _logits_to_keep_kwarg(model) -> str | None:
    """The forward keyword that limits the LM head to the last positions: ``logits_to_keep`` (transformers
    >= 4.50), ``num_logits_to_keep`` (4.45-4.49), or None for a model that takes neither."""
    params = _forward_params(model)
    return next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in params), None)


def _cache_kwarg(model) -> str:
    """The forward keyword of the KV cache: ``cache`` in transformers releases that renamed it (5.24 warns
    on ``past_key_values`` and announces its removal in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def _new_cache(config):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)  # transformers >= 4.56 sizes layer types from the config
    except TypeError:
        return DynamicCache()


class EmbeddedEngine(RolloutEngine):
    """``RolloutEngine`` over a transformers causal LM (batched, KV-cached, left-padded decode).

    Build from ``model_path`` (an HF model dir) or from ``hf_config`` (random init, to be synced by
    ``update_weights``), or wrap an existing ``model``. ``eos_token_ids`` defaults to the config's
    ``eos_token_id`` (int or list). ``max_batch_size`` bounds how many sequences decode together.
    ``strict_sync``: ``finish_weight_update`` raises if some parameter received no tensor in that sync
    (tied parameters count once).
    """

    def __init__(self, *, model_path: str | None = None, hf_config=None, model: torch.nn.Module | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 eos_token_ids: list[int] | int | None = None, pad_token_id: int | None = None,
                 max_batch_size: int = 64, strict_sync: bool = True):
        if sum(x is not None for x in (model_path, hf_config, model)) != 1:
            raise ValueError("EmbeddedEngine needs exactly one of model_path, hf_config, model")
        if max_batch_size < 1:
            raise ValueError(f"EmbeddedEngine.max_batch_size must be >= 1, got {max_batch_size}")
        if model is None:
            model = _from_pretrained_or_config(model_path=model_path, hf_config=hf_config, dtype=dtype)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        config = self.model.config
        if eos_token_ids is None:
            # Chat models list their end-of-turn id only in generation_config.json (e.g. Qwen2.5's
            # <|im_end|>); stop at the union of both.
            generation = getattr(self.model, "generation_config", None)
            eos_token_ids = _as_ids(getattr(config, "eos_token_id", None)) + _as_ids(getattr(generation, "eos_token_id", None))
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(_as_ids(eos_token_ids)))
        if pad_token_id is None:
            pad_token_id = getattr(config, "pad_token_id", None)
        self.pad_token_id = int(pad_token_id if pad_token_id is not None else (self.eos_token_ids or (0,))[0])
        self.max_batch_size = max_batch_size
        self.strict_sync = strict_sync
        # state_dict(keep_vars=True) lists tied parameters under every alias (lm_head.weight and
        # model.embed_tokens.weight share storage when tie_word_embeddings), so either name loads.
        self._params: dict[str, torch.Tensor] = dict(self.model.state_dict(keep_vars=True))
        # Sampling reads only the last position's logits: without this the prefill runs the LM head over
        # every prompt position ([B, L, V]: ~80 GB in fp32 for 64 prompts of 2k tokens at a 152k vocabulary).
        keep = _logits_to_keep_kwarg(self.model)
        self._last_logits_only: dict = {keep: 1} if keep else {}
        self._cache_kwarg = _cache_kwarg(self.model)
        self._received: set[int] = set()
        self._released = False

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[RolloutOutput]:
        """Decode at most ``max_batch_size`` sequences at a time, whole groups of ``n`` where ``n`` fits (the
        samples of a prompt share its prefill); one generator seeded with ``sampling.seed`` serves the whole
        call. RuntimeError between ``release_memory`` and ``resume_memory``."""
        if any(len(p) == 0 for p in prompt_token_ids):
            raise ValueError("EmbeddedEngine.generate: every prompt needs at least one token")
        if self._released:
            raise RuntimeError("EmbeddedEngine.generate called after release_memory() without resume_memory()")
        requests = [(i, p) for i, p in enumerate(prompt_token_ids) for _ in range(sampling.n)]
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(sampling.seed)
        outputs: list[RolloutOutput] = []
        # Whole groups per decode batch where n fits, so no prompt is prefilled in two batches.
        width = self.max_batch_size - self.max_batch_size % sampling.n if sampling.n <= self.max_batch_size \
            else self.max_batch_size
        for start in range(0, len(requests), width):
            chunk = requests[start:start + width]
            outputs.extend(self._generate_batch(chunk, sampling, generator))
        return outputs

    def _generate_batch(self, requests, sampling: SamplingParams, generator) -> list[RolloutOutput]:
        num_seqs = len(requests)
        # The n samples of a prompt share its prefill: each distinct prompt runs through the model once and
        # its KV cache and last logits are copied to its rows (as SGLang's and vLLM's prefix caches do).
        distinct: dict[tuple[int, ...], int] = {}
        row_source = [distinct.setdefault(tuple(p), len(distinct)) for _, p in requests]
        prompts = list(distinct)
        max_len = max(len(p) for p in prompts)
        # Left padding: the next token of every row is predicted at the same column.
        input_ids_UL = torch.full((len(prompts), max_len), self.pad_token_id, dtype=torch.long)
        mask_UL = torch.zeros((len(prompts), max_len), dtype=torch.long)
        for u, prompt in enumerate(prompts):
            input_ids_UL[u, max_len - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask_UL[u, max_len - len(prompt):] = 1
        input_ids_UL, mask_UL = input_ids_UL.to(self.device), mask_UL.to(self.device)
        position_ids_UL = (mask_UL.cumsum(-1) - 1).clamp(min=0)
        stop_ids = torch.tensor(sorted(set(self.eos_token_ids) | set(sampling.stop_token_ids)),
                                dtype=torch.long, device=self.device)

        # The model fills the cache object in place (every supported transformers release, given a Cache):
        # it is never read back from the output, whose attribute was renamed with the keyword.
        cache = _new_cache(self.model.config)
        kwargs = {self._cache_kwarg: cache, "use_cache": True, **self._last_logits_only}
        out = self.model(input_ids=input_ids_UL, attention_mask=mask_UL, position_ids=position_ids_UL, **kwargs)
        logits_BV = out.logits[:, -1, :].float()
        mask_BL, step_pos = mask_UL, position_ids_UL[:, -1:]
        if len(prompts) < num_seqs:
            rows_B = torch.tensor(row_source, dtype=torch.long, device=self.device)
            # Cache.reorder_cache (beam search's reordering) index_selects every layer's state along the
            # batch, so a repeated index copies a row: read in transformers' cache_utils.py at 4.45.0 and 5.24.0.
            cache.reorder_cache(rows_B)
            logits_BV, mask_BL, step_pos = logits_BV[rows_B], mask_BL[rows_B], step_pos[rows_B]
        del out
        tokens: list[list[int]] = [[] for _ in range(num_seqs)]
        logps: list[list[float]] = [[] for _ in range(num_seqs)]
        finished_B = torch.zeros(num_seqs, dtype=torch.bool, device=self.device)
        for step in range(sampling.max_new_tokens):
            if step > 0:
                out = self.model(input_ids=step_ids, attention_mask=mask_BL, position_ids=step_pos, **kwargs)
                logits_BV = out.logits[:, -1, :].float()
            next_B, logp_B = sample_next_token(logits_BV, sampling=sampling, generator=generator)
            next_l, logp_l, done_l = next_B.tolist(), logp_B.tolist(), finished_B.tolist()
            for b in range(num_seqs):
                if not done_l[b]:
                    tokens[b].append(next_l[b])
                    logps[b].append(logp_l[b])
            finished_B |= torch.isin(next_B, stop_ids)
            if bool(finished_B.all()):
                break
            # Finished rows keep decoding a pad token (cheaper than reshaping the cache); their output is ignored.
            step_ids = torch.where(finished_B, self.pad_token_id, next_B).unsqueeze(-1)
            step_pos = step_pos + 1
            mask_BL = torch.cat([mask_BL, torch.ones_like(mask_BL[:, :1])], dim=-1)

        stop_set = set(stop_ids.tolist())
        return [RolloutOutput(token_ids=tokens[b], log_probs=logps[b], prompt_index=requests[b][0],
                              finish_reason="stop" if tokens[b] and tokens[b][-1] in stop_set else "length")
                for b in range(num_seqs)]

    @torch.no_grad()
    def score(self, sequences: list[list[int]], *, temperature: float = 1.0) -> list[list[float]]:
        """Log-probs of tokens 1..n-1 of each sequence under ``log_softmax(logits / temperature)`` (one
        unpadded forward per sequence): the engine-side view used by sync checks and mismatch tests."""
        out = []
        for seq in sequences:
            ids = torch.tensor([seq], dtype=torch.long, device=self.device)
            logits = self.model(input_ids=ids).logits[0, :-1].float()
            if temperature > 0:
                logits = logits / temperature
            logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
            out.append(logp.tolist())
        return out

    # ---------------------------------------------------------------- weights
    @torch.no_grad()
    def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Copy each tensor into the parameter of that name, cast to its dtype (a tied parameter answers to
        either name); ValueError naming unknown names or a shape mismatch, before anything is copied."""
        unknown = [name for name, _ in named_tensors if name not in self._params]
        if unknown:
            raise ValueError(f"EmbeddedEngine.update_weights: {len(unknown)} unknown parameter name(s) "
                             f"{unknown[:20]}; the model has e.g. {sorted(self._params)[:8]}")
        for name, tensor in named_tensors:
            param = self._params[name]
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(f"EmbeddedEngine.update_weights: {name} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(param.shape)}")
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))
            self._received.add(param.data_ptr())

    def finish_weight_update(self) -> None:
        """Check that every parameter received a tensor since the last sync: ValueError with
        ``strict_sync``, else a warning. The model reads its parameters directly: no cache to flush."""
        missing = sorted({name for name, p in self._params.items() if p.data_ptr() not in self._received})
        self._received.clear()
        if missing:
            msg = f"EmbeddedEngine: weight sync did not update {len(missing)} tensor(s): {missing[:20]}"
            if self.strict_sync:
                raise ValueError(msg)
            logger.warning(msg)

    # ---------------------------------------------------------------- memory
    def release_memory(self) -> None:
        """On GPU, move the model to host memory until ``resume_memory``; on CPU there is nothing to free."""
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()
            self._released = True

    def resume_memory(self) -> None:
        """Move the model back to its device after ``release_memory``."""
        if self._released:
            self.model.to(self.device)
            # Module.to may hand back new tensor objects (buffers always; parameters under torch's
            # overwrite_module_params_on_conversion): re-read the name -> tensor map.
            self._params = dict(self.model.state_dict(keep_vars=True))
            self._released = False

    def shutdown(self) -> None:
        """Give back the GPU memory (as ``release_memory``); the engine started no process."""
        self.release_memory()


@register_engine("embedded", replica_kwargs=lambda kwargs, i: kwargs)  # replicas: same device (tests, CPU)
def _make_embedded(**kwargs) -> EmbeddedEngine:
    return EmbeddedEngine(**kwargs)
