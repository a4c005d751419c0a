"""Next-token sampling shared by in-process engines: temperature, top-k, top-p, and the returned log-prob.

The log-prob returned for a sampled token is ``log_softmax(logits / T)[token]``: before top-k/top-p
truncation (the convention of ``rollout/base.py``, which matches what the actor recomputes).
"""

from __future__ import annotations

import torch

from fipo_megatron.rollout.base import SamplingParams


def filter_logits(scaled_BV: torch.Tensor, *, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and the top-p nucleus to -inf (the most likely token always stays)."""
    out_BV = scaled_BV
    if top_k != -1 and top_k < scaled_BV.shape[-1]:
        kth_B1 = torch.topk(scaled_BV, top_k, dim=-1).values[:, -1:]
        out_BV = out_BV.masked_fill(out_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(out_BV, dim=-1, descending=True)
        probs_BV = torch.softmax(sorted_BV, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first is never dropped.
        mass_before_BV = probs_BV.cumsum(-1) - probs_BV
        drop_sorted_BV = mass_before_BV >= top_p
        drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
        out_BV = out_BV.masked_fill(drop_BV, float("-inf"))
    return out_BV


def sample_next_token(logits_BV: torch.Tensor, *, sampling: SamplingParams,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (token_B, logp_B): sampled ids and their log-probs under ``log_softmax(logits / T)``."""
    logits_BV = logits_BV.float()
    if sampling.greedy:
        logp_BV = torch.log_softmax(logits_BV, dim=-1)
        token_B = logits_BV.argmax(dim=-1)
    else:
        scaled_BV = logits_BV / sampling.temperature
        logp_BV = torch.log_softmax(scaled_BV, dim=-1)
        filtered_BV = filter_logits(scaled_BV, top_k=sampling.top_k, top_p=sampling.top_p)
        probs_BV = torch.softmax(filtered_BV, dim=-1)
        token_B = torch.multinomial(probs_BV, num_samples=1, generator=generator).squeeze(-1)
    return token_B, logp_BV.gather(-1, token_B.unsqueeze(-1)).squeeze(-1)


# Per-request seeds of engines that expand ``n`` into separate requests (SGLang, vLLM).
_SEED_SPACE = 1 << 62  # inside vLLM's and SGLang's int64 seed ranges, with headroom for their own arithmetic


def request_seeds(seed: int | None, num_requests: int) -> list[int | None]:
    """The sampling seed of each of ``num_requests`` requests of one call seeded ``seed`` (None: unseeded).

    An engine seeds one generator per request (vLLM's per-request ``torch.Generator``; SGLang's
    ``sampling_seed`` under deterministic inference), so the ``n`` samples of a prompt sent with one seed are
    ``n`` copies of one response: GRPO advantages of zero, every group dropped by dynamic sampling. Request
    ``k`` (prompt ``k // n``, sample ``k % n`` in the grouped order) samples with ``(h(seed) + k) mod 2**62``:
    consecutive like vLLM's own ``n`` fan-out, which gives child ``i`` the seed ``seed + i``
    (``vllm/v1/engine/parallel_sampling.py``, vllm 0.32.0), so no two requests of one call share a seed; the
    hash ``h`` keeps calls with nearby seeds (the trainer counts generation batches) from sharing streams."""
    if seed is None:
        return [None] * num_requests
    import hashlib

    base = int.from_bytes(hashlib.blake2b(f"fipo-request-seed/{int(seed)}".encode(), digest_size=8).digest(),
                          "little") % _SEED_SPACE
    return [(base + k) % _SEED_SPACE for k in range(num_requests)]
