"""Megatron's load-balanced ("zig-zag") context-parallel layout, for padded and packed batches.

Every sequence is padded to a multiple of ``2 * cp_size`` tokens and cut into ``2 * cp_size`` equal
chunks; CP rank ``r`` holds chunks ``r`` and ``2 * cp_size - 1 - r`` of every sequence, concatenated in
that order. This balances causal-attention work (early chunks are cheap, late chunks expensive) and is
the layout Megatron/Transformer Engine use for both BSHD and THD inputs, so everything here (attention,
FutureKL carries, packing) agrees on it.

Pure torch: no process groups are touched here.
"""

from __future__ import annotations

import torch


def padding_unit(*, cp_size: int, multiple: int = 1) -> int:
    """What every sequence's length must be a multiple of: ``2 * cp_size * multiple`` (``multiple``: e.g. TP
    for sequence parallelism). The one definition of the rule; with ``cp_size == 1`` only ``multiple``
    applies (no zig-zag split happens)."""
    if cp_size < 1 or multiple < 1:
        raise ValueError(f"cp_size ({cp_size}) and multiple ({multiple}) must be >= 1")
    return (2 * cp_size if cp_size > 1 else 1) * multiple


def padded_length(length: int, *, cp_size: int, multiple: int = 1) -> int:
    """Smallest length >= ``length`` that is a multiple of :func:`padding_unit`."""
    unit = padding_unit(cp_size=cp_size, multiple=multiple)
    return -(-length // unit) * unit


def chunk_bounds(seq_len: int, *, cp_size: int, cp_rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two ``[start, end)`` position ranges of one sequence that ``cp_rank`` holds, in local order.

    ``seq_len`` must already be padded to a multiple of ``2 * cp_size``.
    """
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} out of range for cp_size {cp_size}")
    if seq_len % (2 * cp_size):
        raise ValueError(f"sequence length {seq_len} is not a multiple of 2*cp_size = {2 * cp_size}")
    c = seq_len // (2 * cp_size)
    j = 2 * cp_size - 1 - cp_rank
    return (cp_rank * c, (cp_rank + 1) * c), (j * c, (j + 1) * c)


def local_positions(seq_len: int, *, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global positions (int64, length ``seq_len // cp_size``) of the tokens ``cp_rank`` holds."""
    if cp_size == 1:
        return torch.arange(seq_len)
    (a0, b0), (a1, b1) = chunk_bounds(seq_len, cp_size=cp_size, cp_rank=cp_rank)
    return torch.cat([torch.arange(a0, b0), torch.arange(a1, b1)])


def split_padded(x: torch.Tensor, *, cp_size: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's zig-zag share of a padded batch along ``dim`` (the sequence dimension)."""
    if cp_size == 1:
        return x
    idx = local_positions(x.shape[dim], cp_size=cp_size, cp_rank=cp_rank).to(x.device)
    return x.index_select(dim, idx)


def packed_local_index(cu_seqlens: torch.Tensor, *, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Indices into a packed (THD) tensor of the tokens ``cp_rank`` holds, sequence by sequence.

    ``cu_seqlens`` (S+1 offsets) must describe sequences already padded to multiples of ``2*cp_size``.
    """
    offsets = cu_seqlens.tolist()
    parts = []
    for start, end in zip(offsets[:-1], offsets[1:]):
        parts.append(local_positions(end - start, cp_size=cp_size, cp_rank=cp_rank) + start)
    if not parts:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(parts)


def split_packed(x: torch.Tensor, *, cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 0) -> torch.Tensor:
    """This rank's share of a packed tensor (tokens along ``dim``); local offsets are ``cu_seqlens // cp_size``."""
    if cp_size == 1:
        return x
    idx = packed_local_index(cu_seqlens, cp_size=cp_size, cp_rank=cp_rank).to(x.device)
    return x.index_select(dim, idx)


def unsplit_packed(shards: list[torch.Tensor], *, cu_seqlens: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`split_packed`: reassemble the full packed tensor from every rank's shard, in rank order."""
    cp_size = len(shards)
    if cp_size == 1:
        return shards[0]
    total = int(cu_seqlens[-1])
    shape = list(shards[0].shape)
    shape[dim] = total
    out = shards[0].new_empty(shape)
    for rank, shard in enumerate(shards):
        idx = packed_local_index(cu_seqlens, cp_size=cp_size, cp_rank=rank).to(shard.device)
        out.index_copy_(dim, idx, shard)
    return out
