"""FutureKL across context-parallel ranks with 2*CP scalars per sequence (docs/algorithm.md §3.1).

Megatron's load-balanced layout (``parallel/cp_layout.py``) cuts every sequence (padded to a multiple of
``2*CP``) into ``2*CP`` chunks of ``c`` tokens; rank ``r`` holds chunks ``r`` and ``2CP-1-r``. FutureKL
only looks forward, so each chunk ``j`` needs one number from the rest of the sequence, the carry
``C_j = FutureKL_{b_j}`` at its end:

1. local scan of each held chunk: ``F^loc`` and its total ``S_j = F^loc_{a_j}`` (``algo.future_kl.segment_scan``);
2. ONE all-gather of the (num_seqs, 2) totals over the CP group (2*CP scalars per sequence in all);
3. ``E_k = S_k + gamma^c * E_{k+1}`` over the 2*CP chunks of each sequence (a 2*CP-step loop over
   tiny tensors), ``C_j = E_{j+1}``;
4. ``FutureKL_t = F^loc_t + gamma^(b_j - t) * C_j`` (a non-negative exponent: no overflow).

Frameworks that gather the whole log-prob sequence to every CP rank send ``T/CP`` values per rank per
sequence instead of 2 (``tools/benchmarks/bench_future_kl.py`` prints both). FutureKL is detached in
FIPO, so no backward pass runs through the exchange. Everything is computed in float64 and cast to the
input's dtype once, so the split result equals the unsplit one to the output's rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fipo_megatron.algo.future_kl import future_kl, segment_scan


@dataclass(frozen=True, kw_only=True, eq=False)
class CPShard:
    """Which zig-zag share of the batch this CP rank holds, and the group to complete it with.

    Exactly one layout is described:
    - packed (THD): ``cu_seqlens`` = the GLOBAL offsets of the packed sequences, each already padded to
      a multiple of ``2*cp_size``; the local tensor holds, per sequence, chunks ``cp_rank`` and
      ``2*cp_size-1-cp_rank`` (``cp_layout.split_packed``), with local offsets ``cu_seqlens // cp_size``;
    - padded (B, T): ``padded_seq_len`` = the GLOBAL T (a multiple of ``2*cp_size``); the local tensor is
      ``cp_layout.split_padded`` of it, (B, T // cp_size).

    Attributes:
        cp_group: the context-parallel process group (``None``: the default group).
        cp_size: number of CP ranks.
        cp_rank: this rank's index in the CP group.
        cu_seqlens: global packed offsets (int tensor of S+1), or None.
        padded_seq_len: global padded length of the (B, T) layout, or None.
    """

    cp_group: Any = None
    cp_size: int
    cp_rank: int
    cu_seqlens: torch.Tensor | None = None
    padded_seq_len: int | None = None

    def __post_init__(self) -> None:
        if self.cp_size < 1:
            raise ValueError(f"cp_size must be >= 1, got {self.cp_size}")
        if not 0 <= self.cp_rank < self.cp_size:
            raise ValueError(f"cp_rank must be in [0, {self.cp_size}), got {self.cp_rank}")
        if (self.cu_seqlens is None) == (self.padded_seq_len is None):
            raise ValueError("give exactly one of cu_seqlens (packed layout) and padded_seq_len (B, T layout)")
        unit = 2 * self.cp_size if self.cp_size > 1 else 1
        if self.cu_seqlens is not None:
            cu = self.cu_seqlens
            if cu.dim() != 1 or cu.numel() < 1 or cu.dtype.is_floating_point:
                raise ValueError(f"cu_seqlens must be a 1-D integer tensor of S+1 offsets, "
                                 f"got {cu.dtype} {tuple(cu.shape)}")
            lens = (cu[1:] - cu[:-1]).tolist()
            bad = [n for n in lens if n < 0 or n % unit]
            if int(cu[0]) != 0 or bad:
                raise ValueError(f"cu_seqlens: sequences must start at 0 and be padded to multiples of 2*cp_size = "
                                 f"{unit}; offending lengths {bad[:5]}")
        elif self.padded_seq_len < 0 or self.padded_seq_len % unit:
            raise ValueError(f"padded_seq_len ({self.padded_seq_len}) must be a multiple of 2*cp_size = {unit}")

    @property
    def local_cu_seqlens(self) -> torch.Tensor | None:
        """Offsets of the sequences in this rank's packed share (``cu_seqlens // cp_size``)."""
        return None if self.cu_seqlens is None else self.cu_seqlens // self.cp_size

    @property
    def is_packed(self) -> bool:
        """True for the packed (THD) layout, False for (B, T // cp_size) rows."""
        return self.cu_seqlens is not None

    # What the policy loss calls (``algo.policy_loss.ContextParallelShard``): the loss stays free of any
    # process-group code.
    def future_kl(self, x_local: torch.Tensor, *, gamma: float) -> torch.Tensor:
        """``future_kl_cp`` of this shard."""
        return future_kl_cp(x_local, gamma=gamma, shard=self)

    def sum_over_group(self, tensor: torch.Tensor) -> torch.Tensor:
        """``sum_over_cp`` over this shard's CP group."""
        return sum_over_cp(tensor, self)


def sum_over_cp(per_sequence: torch.Tensor, shard: CPShard) -> torch.Tensor:
    """Sum a tensor (e.g. per-sequence counts) over the CP group; returns a new tensor, same on every rank."""
    if shard.cp_size == 1:
        return per_sequence.clone()
    out = per_sequence.detach().clone().contiguous()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=shard.cp_group)
    return out


def _all_gather_totals(totals_S2: torch.Tensor, shard: CPShard) -> torch.Tensor:
    """(S, 2) totals of this rank -> (cp, S, 2) of every rank, in CP-rank order."""
    parts = [torch.empty_like(totals_S2) for _ in range(shard.cp_size)]
    dist.all_gather(parts, totals_S2.contiguous(), group=shard.cp_group)
    return torch.stack(parts)


def _local_carries(gathered_PS2: torch.Tensor, decay_S: torch.Tensor, shard: CPShard) -> torch.Tensor:
    """Carries into this rank's two chunks per sequence, (S, 2), from every rank's chunk totals."""
    cp, rank = shard.cp_size, shard.cp_rank
    # Global chunk order: chunk k < cp is rank k's first chunk; chunk k >= cp is rank 2cp-1-k's second.
    totals_SC = torch.cat([gathered_PS2[:, :, 0].t(), gathered_PS2[:, :, 1].t().flip(1)], dim=1)
    e_SC = torch.zeros(totals_SC.shape[0], 2 * cp + 1, dtype=totals_SC.dtype, device=totals_SC.device)
    for k in range(2 * cp - 1, -1, -1):  # 2*CP steps over (S,) vectors
        e_SC[:, k] = totals_SC[:, k] + decay_S * e_SC[:, k + 1]
    return torch.stack([e_SC[:, rank + 1], e_SC[:, 2 * cp - rank]], dim=1)


def future_kl_cp(x_local: torch.Tensor, *, gamma: float, shard: CPShard) -> torch.Tensor:
    """Exact FutureKL of this CP rank's zig-zag share (docs/algorithm.md §3.1), one all-gather of 2*CP scalars
    per sequence.

    Args:
        x_local: this rank's share of ``x = d * mask * M``: 1-D packed (offsets ``shard.local_cu_seqlens``)
            or (B, T // cp_size) for the padded layout.
        gamma: decay per token (``algo.future_kl.gamma_from_tau``).
        shard: the layout and CP group.

    Returns:
        FutureKL of the local tokens (same shape and dtype as ``x_local``), equal to the corresponding
        entries of the unsplit ``future_kl`` up to rounding. Collective: every CP rank must call it.
    """
    if shard.cp_size == 1:
        return future_kl(x_local, gamma, shard.cu_seqlens)
    cp = shard.cp_size
    x64 = x_local.detach().to(torch.float64)
    if shard.is_packed:
        if x_local.dim() != 1:
            raise ValueError(f"packed CP layout expects 1-D x_local, got shape {tuple(x_local.shape)}")
        cu_g = shard.cu_seqlens.to(device=x_local.device, dtype=torch.long)
        chunk_len_S = (cu_g[1:] - cu_g[:-1]) // (2 * cp)
        cu_l = cu_g // cp
        if x_local.numel() != int(cu_l[-1]):
            raise ValueError(f"x_local has {x_local.numel()} tokens, the shard describes {int(cu_l[-1])}")
        starts_S2 = torch.stack([cu_l[:-1], cu_l[:-1] + chunk_len_S], dim=1)
        chunk_cu = torch.cat([starts_S2.flatten(), cu_l[-1:]])
        f_loc, totals = segment_scan(x64, gamma, chunk_cu)
        num_seqs = chunk_len_S.numel()
        decay_S = torch.pow(torch.tensor(gamma, dtype=torch.float64, device=x_local.device), chunk_len_S.double())
        carry_S2 = _local_carries(_all_gather_totals(totals.view(num_seqs, 2), shard), decay_S, shard)
        # Each token: weight gamma^(chunk end - t) on its chunk's carry (exponent >= 1).
        chunk_len_2S = chunk_len_S.repeat_interleave(2)
        tok_chunk = torch.repeat_interleave(torch.arange(2 * num_seqs, device=x_local.device), chunk_len_2S,
                                            output_size=x_local.numel())
        token_pos = torch.arange(x_local.numel(), device=x_local.device)
        dist_to_end = (starts_S2.flatten() + chunk_len_2S)[tok_chunk] - token_pos
        tail = torch.pow(torch.tensor(gamma, dtype=torch.float64, device=x_local.device), dist_to_end.double())
        out = f_loc + tail * carry_S2.flatten()[tok_chunk]
    else:
        if x_local.dim() != 2 or x_local.shape[1] * cp != shard.padded_seq_len:
            raise ValueError(f"padded CP layout expects (B, {shard.padded_seq_len // cp}), got {tuple(x_local.shape)}")
        num_rows, local_len = x_local.shape
        chunk_len = local_len // 2
        f_loc, totals = segment_scan(x64.reshape(num_rows * 2, chunk_len), gamma)
        decay_S = torch.full((num_rows,), gamma ** chunk_len, dtype=torch.float64, device=x_local.device)
        carry_B2 = _local_carries(_all_gather_totals(totals.view(num_rows, 2), shard), decay_S, shard)
        tail = torch.pow(torch.tensor(gamma, dtype=torch.float64),
                         torch.arange(chunk_len, 0, -1, dtype=torch.float64)).to(x_local.device)
        out = (f_loc.view(num_rows, 2, chunk_len) + carry_B2[:, :, None] * tail).view(num_rows, local_len)
    return out.to(x_local.dtype)
