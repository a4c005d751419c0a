"""From ``TrainBatch`` samples to packed (THD) micro-batches: DP share, token-budget micro-batches, CP split.

Layout of one micro-batch (before the CP split), sequence by sequence::

    [prompt_0 .. prompt_{P-1} response_0 .. response_{R-1} pad ..]   padded to padded_length(P+R)

Log-probs are for the *next* token: position ``p`` carries ``label[p] = token[p+1]``, so response token
``j`` is scored at position ``P-1+j`` and ``response_mask[p] = 1`` exactly for ``p in [P-1, P+R-2]``.
Labels and masks are built on the full sequence and only then split zig-zag over CP, so the shift never
crosses a CP boundary wrongly. Each sequence is padded only as CP (``2*cp``) and sequence parallelism
(``tp``) require (``parallel.cp_layout.padded_length``); padding sits at the end of its sequence, so causal
attention over the padded ``cu_seqlens`` gives real tokens exactly the unpadded result.

Megatron takes THD input as ``[1, T]`` tokens plus ``PackedSeqParams(qkv_format="thd")`` whose
``cu_seqlens_*`` are the real lengths and ``cu_seqlens_*_padded`` the padded ones, both *global* (before
the CP split), as RoPE and Transformer Engine expect.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from fipo_megatron.batch import Sample
from fipo_megatron.parallel.cp_layout import padded_length, split_packed, unsplit_packed


def balanced_partition(weights: Sequence[int], *, num_parts: int) -> list[list[int]]:
    """Split item indices into ``num_parts`` lists with near-equal weight sums (greedy, deterministic).

    Longest first, each to the currently lightest part (ties: lower part index); each part keeps its
    items in ascending index order. Every part is non-empty when ``len(weights) >= num_parts``.
    """
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    if len(weights) < num_parts:
        raise ValueError(f"cannot split {len(weights)} samples over {num_parts} data-parallel ranks: "
                         f"each rank needs at least one sample per mini-batch")
    order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
    loads = [0] * num_parts
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    for i in order:
        # Empty parts first, so every rank gets a sample even when one sample outweighs the rest.
        k = min(range(num_parts), key=lambda r: (len(parts[r]) > 0, loads[r], r))
        parts[k].append(i)
        loads[k] += weights[i]
    return [sorted(p) for p in parts]


def plan_micro_batches(lengths: Sequence[int], *, max_tokens: int, count_multiple: int = 1) -> list[list[int]]:
    """Group item indices into micro-batches of at most ``max_tokens`` tokens (first-fit decreasing).

    A single item longer than ``max_tokens`` gets a micro-batch of its own. ``count_multiple``: make the
    number of micro-batches a multiple of it (Megatron's interleaved pipeline schedule needs a multiple
    of pp) by splitting the heaviest multi-item micro-batches. Deterministic; each micro-batch lists its
    items in ascending index order, micro-batches ordered by their first item.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for b, load in enumerate(loads):
            if load + lengths[i] <= max_tokens:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    while len(bins) % count_multiple:
        splittable = [b for b in range(len(bins)) if len(bins[b]) > 1]
        if not splittable:
            raise ValueError(f"cannot make a multiple of {count_multiple} micro-batches from {len(lengths)} samples")
        b = max(splittable, key=lambda k: (loads[k], -k))
        items = sorted(bins[b], key=lambda j: (-lengths[j], j))
        half = [items[k] for k in range(0, len(items), 2)], [items[k] for k in range(1, len(items), 2)]
        bins[b], loads[b] = half[0], sum(lengths[j] for j in half[0])
        bins.append(half[1])
        loads.append(sum(lengths[j] for j in half[1]))
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])


@dataclasses.dataclass(kw_only=True)
class PackedMicroBatch:
    """One micro-batch, packed THD and split for this CP rank. ``*_T`` tensors are local, length ``T``."""

    input_ids: torch.Tensor  # [1, T] long, Megatron's THD convention
    position_ids: torch.Tensor  # [1, T] long, position within each sequence
    labels_T: torch.Tensor  # next-token ids (0 where unused)
    response_mask_T: torch.Tensor  # float: 1 where the next token is a response token
    advantages_T: torch.Tensor  # float: the sample's advantage on response positions, 0 elsewhere
    cu_seqlens: torch.Tensor  # [S+1] int32, real lengths, global
    cu_seqlens_padded: torch.Tensor  # [S+1] int32, padded lengths, global
    local_cu_seqlens: torch.Tensor  # [S+1] int64, this rank's offsets into the local tensors (padded // cp)
    sample_indices: list[int]  # into the samples list the micro-batch was built from
    prompt_lengths: list[int]
    response_lengths: list[int]
    cp_size: int
    cp_rank: int
    old_log_probs_T: torch.Tensor | None = None  # set by the actor before an update (scatter_responses)

    @property
    def num_tokens(self) -> int:
        """Tokens of this rank's packed share, padding included."""
        return int(self.input_ids.shape[1])

    @property
    def num_response_tokens(self) -> int:
        """Response tokens of all samples in this micro-batch (all CP ranks together)."""
        return sum(self.response_lengths)

    def packed_seq_params(self, *, cp_group=None):
        """Megatron's ``PackedSeqParams`` for this micro-batch (THD)."""
        from megatron.core.packed_seq_params import PackedSeqParams

        max_len = int((self.cu_seqlens_padded[1:] - self.cu_seqlens_padded[:-1]).max())
        fields = {f.name for f in dataclasses.fields(PackedSeqParams)}
        kwargs = dict(qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
                      cu_seqlens_q_padded=self.cu_seqlens_padded, cu_seqlens_kv_padded=self.cu_seqlens_padded,
                      max_seqlen_q=max_len, max_seqlen_kv=max_len)
        # Later megatron-core versions add fields (cp_group, local_cp_size); set only what exists.
        if "cp_group" in fields and cp_group is not None:
            kwargs["cp_group"] = cp_group
        return PackedSeqParams(**{k: v for k, v in kwargs.items() if k in fields})

    def _response_index(self) -> torch.Tensor:
        """Positions in the *global* packed tensor that score response tokens, sample by sample."""
        starts = self.cu_seqlens_padded[:-1].tolist()
        parts = [torch.arange(s + p - 1, s + p - 1 + r) for s, p, r in zip(starts, self.prompt_lengths, self.response_lengths)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def scatter_responses(self, values: Sequence[torch.Tensor], *, fill: float = 0.0) -> torch.Tensor:
        """Per-sample response values (e.g. old log-probs, one tensor per sample) -> this rank's ``[T]`` tensor."""
        total = int(self.cu_seqlens_padded[-1])
        full = torch.full((total,), fill, dtype=torch.float32)
        if values:
            full[self._response_index()] = torch.cat([v.detach().float().cpu().reshape(-1) for v in values])
        local = split_packed(full, cu_seqlens=self.cu_seqlens_padded, cp_size=self.cp_size, cp_rank=self.cp_rank)
        return local.to(self.input_ids.device)

    def gather_responses(self, shards: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every CP rank's local ``[T]`` tensor (in CP rank order) -> per-sample response values."""
        full = unsplit_packed([s.detach().cpu() for s in shards], cu_seqlens=self.cu_seqlens_padded)
        flat = full[self._response_index()]
        return list(flat.split(self.response_lengths))


def pack_micro_batch(samples: Sequence[Sample], *, indices: Sequence[int], cp_size: int = 1, cp_rank: int = 0,
                     multiple: int = 1, device: torch.device | str = "cpu") -> PackedMicroBatch:
    """Pack ``samples[i] for i in indices`` into one THD micro-batch and take this CP rank's share.

    ``multiple``: extra padding multiple per sequence (``tp`` with sequence parallelism, else 1).
    """
    tokens, labels, mask, adv, positions = [], [], [], [], []
    real, padded, prompt_lens, resp_lens = [0], [0], [], []
    for i in indices:
        s = samples[i]
        num_prompt, num_resp = len(s.prompt_ids), len(s.response_ids)
        if num_prompt < 1:
            raise ValueError(f"sample {i}: prompt_ids is empty; the first response token needs a context token")
        if num_resp < 1:
            raise ValueError(f"sample {i}: response_ids is empty")
        seq = list(s.prompt_ids) + list(s.response_ids)
        length = len(seq)
        plen = padded_length(length, cp_size=cp_size, multiple=multiple)
        seq_t = torch.zeros(plen, dtype=torch.long)
        seq_t[:length] = torch.tensor(seq, dtype=torch.long)
        lab = torch.zeros(plen, dtype=torch.long)
        lab[:length - 1] = seq_t[1:length]
        m = torch.zeros(plen, dtype=torch.float32)
        m[num_prompt - 1:length - 1] = 1.0
        tokens.append(seq_t)
        labels.append(lab)
        mask.append(m)
        adv.append(m * float(s.advantage))
        positions.append(torch.arange(plen))
        real.append(real[-1] + length)
        padded.append(padded[-1] + plen)
        prompt_lens.append(num_prompt)
        resp_lens.append(num_resp)
    cu_padded = torch.tensor(padded, dtype=torch.int32)

    def local(x: torch.Tensor) -> torch.Tensor:
        return split_packed(torch.cat(x), cu_seqlens=cu_padded, cp_size=cp_size, cp_rank=cp_rank).to(device)

    return PackedMicroBatch(
        input_ids=local(tokens).unsqueeze(0), position_ids=local(positions).unsqueeze(0), labels_T=local(labels),
        response_mask_T=local(mask), advantages_T=local(adv),
        cu_seqlens=torch.tensor(real, dtype=torch.int32, device=device), cu_seqlens_padded=cu_padded.to(device),
        local_cu_seqlens=(cu_padded.long() // cp_size).to(device), sample_indices=list(indices),
        prompt_lengths=prompt_lens, response_lengths=resp_lens, cp_size=cp_size, cp_rank=cp_rank)


def plan_and_pack(samples: Sequence[Sample], *, dp_size: int, dp_rank: int, max_tokens: int, cp_size: int = 1,
                  cp_rank: int = 0, multiple: int = 1, count_multiple: int = 1,
                  device: torch.device | str = "cpu") -> list[PackedMicroBatch]:
    """This DP rank's share of ``samples`` (balanced by tokens), in token-budget micro-batches, packed.

    ``sample_indices`` of the result index into ``samples``. The budget counts padded tokens of the
    whole sequence (before the CP split), so every rank of a CP group builds the same plan.
    """
    lengths = [padded_length(s.num_tokens, cp_size=cp_size, multiple=multiple) for s in samples]
    mine = balanced_partition(lengths, num_parts=dp_size)[dp_rank]
    plan = plan_micro_batches([lengths[i] for i in mine], max_tokens=max_tokens, count_multiple=count_multiple)
    return [pack_micro_batch(samples, indices=[mine[j] for j in mb], cp_size=cp_size, cp_rank=cp_rank,
                             multiple=multiple, device=device) for mb in plan]
