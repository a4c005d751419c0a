"""FutureKL: the discounted future sum of the per-token log-ratio (docs/algorithm.md §3), exact in O(B*T) work.

    F_t = sum_{k >= t} gamma^(k - t) * x_k        (to the end of the row / sequence, k = t included)

The released FIPO code builds an (L x 128) decay matrix per block and multiplies, O(B*L^2). Here the
same numbers come from a two-level chunked scan:

1. cut every sequence into chunks of ``K`` tokens (each sequence starts a fresh chunk, so a chunk never
   straddles two sequences); inside a chunk ``F^loc = x_chunk @ D^T`` with the K x K upper-triangular
   decay matrix ``D[i, j] = gamma^(j - i)`` for ``j >= i`` (a dense matmul: tensor cores on GPU);
2. the chunk totals ``S_n = F^loc_n[0]`` obey ``E_n = S_n + gamma^K * E_{n+1}`` (E_n: FutureKL at the
   start of chunk n), which is FutureKL again, over the chunks of each sequence with decay ``gamma^K``:
   a recursive call on a (num_seqs, max_chunks) view, tiny;
3. ``F_t = F^loc_t + gamma^(K - i) * E_{n+1}`` for the token at offset ``i`` of chunk ``n``.

Numerics: every power of gamma has a non-negative exponent (never ``gamma^(-t)``, which overflows at
20k tokens); powers are formed in float64. The scan itself runs in float64 by default and is cast back
once: the work is ~2*K flops per token (42 MFLOP for 8 x 20k tokens), negligible even at fp64 rates,
and it keeps the result exact to the output's rounding whatever the matmul precision settings are
(TF32 would otherwise leave ~1e-3 relative error). No Python loop over sequences or chunks.
"""

from __future__ import annotations

import functools
import math

import torch

#: tokens per chunk of the scan. 128 keeps the K x K matmul on tensor cores and the carry level short.
DEFAULT_CHUNK_SIZE = 128


def gamma_from_tau(tau: float) -> float:
    """Per-token decay for a half-life of ``tau`` tokens: ``gamma = 2 ** (-1 / tau)`` (tau = 32 -> 0.97857)."""
    if not tau > 0 or math.isinf(tau):
        raise ValueError(f"decay_rate (tau) must be a positive finite number of tokens, got {tau}")
    return 2.0 ** (-1.0 / tau)


@functools.lru_cache(maxsize=64)
def _decay_matrix_T(gamma: float, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``D^T`` with ``D[i, j] = gamma^(j - i)`` for ``j >= i`` else 0; shape (size, size)."""
    idx = torch.arange(size, dtype=torch.float64)
    dist = idx[None, :] - idx[:, None]  # j - i
    d = torch.where(dist >= 0, torch.pow(torch.tensor(gamma, dtype=torch.float64), dist.clamp(min=0)),
                    torch.zeros((), dtype=torch.float64))
    return d.t().contiguous().to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _tail_decay(gamma: float, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``gamma^(size - i)`` for ``i = 0 .. size-1``: the weight of the carry entering a chunk at offset i."""
    dist = torch.arange(size, 0, -1, dtype=torch.float64)
    return torch.pow(torch.tensor(gamma, dtype=torch.float64), dist).to(dtype=dtype, device=device)


def _check_gamma(gamma: float) -> float:
    gamma = float(gamma)
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    return gamma


def _scan_rows(x_BT: torch.Tensor, gamma: float, chunk_size: int) -> torch.Tensor:
    """FutureKL along dim 1 of a (B, T) tensor, each row one sequence. Returns (B, T)."""
    num_rows, seq_len = x_BT.shape
    if seq_len == 0 or num_rows == 0:
        return torch.zeros_like(x_BT)
    if seq_len <= chunk_size:
        return x_BT @ _decay_matrix_T(gamma, seq_len, x_BT.dtype, x_BT.device)
    num_chunks = -(-seq_len // chunk_size)
    pad = num_chunks * chunk_size - seq_len
    x_pad = torch.nn.functional.pad(x_BT, (0, pad)) if pad else x_BT
    x_BNK = x_pad.view(num_rows, num_chunks, chunk_size)
    f_loc_BNK = x_BNK @ _decay_matrix_T(gamma, chunk_size, x_BT.dtype, x_BT.device)
    # FutureKL at the start of each chunk, then the carry into chunk n is that of chunk n+1.
    e_BN = _scan_rows(f_loc_BNK[:, :, 0].contiguous(), gamma ** chunk_size, chunk_size)
    carry_BN = torch.nn.functional.pad(e_BN[:, 1:], (0, 1))
    f_BNK = f_loc_BNK + carry_BN[:, :, None] * _tail_decay(gamma, chunk_size, x_BT.dtype, x_BT.device)
    return f_BNK.view(num_rows, -1)[:, :seq_len]


def _packed_chunk_layout(cu_seqlens: torch.Tensor, num_tokens: int, chunk_size: int, device: torch.device):
    """Where each packed token goes in a chunk-aligned buffer (each sequence starting a new chunk).

    Returns (dest index per token, chunk -> sequence id, chunk -> chunk index within its sequence,
    number of chunks, most chunks of one sequence).
    """
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lens = cu[1:] - cu[:-1]
    num_seqs = lens.numel()
    chunks_per_seq = (lens + chunk_size - 1) // chunk_size
    chunk_start = torch.cumsum(chunks_per_seq, 0) - chunks_per_seq
    # One host sync for the two sizes that shape the buffers.
    num_chunks, max_chunks = (int(v) for v in torch.stack([chunks_per_seq.sum(), chunks_per_seq.max()]).tolist())
    seq_ids = torch.arange(num_seqs, device=device)
    tok_seq = torch.repeat_interleave(seq_ids, lens, output_size=num_tokens)
    dest = torch.arange(num_tokens, device=device) - cu[:-1][tok_seq] + chunk_start[tok_seq] * chunk_size
    chunk_seq = torch.repeat_interleave(seq_ids, chunks_per_seq, output_size=num_chunks)
    chunk_idx = torch.arange(num_chunks, device=device) - chunk_start[chunk_seq]
    return dest, chunk_seq, chunk_idx, num_chunks, max_chunks


def _scan_packed(x_N: torch.Tensor, cu_seqlens: torch.Tensor, gamma: float, chunk_size: int) -> torch.Tensor:
    """FutureKL of a packed 1-D tensor, restarting at every ``cu_seqlens`` boundary (module docstring, 1-3)."""
    num_tokens = x_N.numel()
    num_seqs = cu_seqlens.numel() - 1
    if num_tokens == 0 or num_seqs == 0:
        return torch.zeros_like(x_N)
    dest, chunk_seq, chunk_idx, num_chunks, max_chunks = _packed_chunk_layout(
        cu_seqlens, num_tokens, chunk_size, x_N.device)
    buf = x_N.new_zeros(num_chunks * chunk_size).index_copy_(0, dest, x_N)
    f_loc_CK = buf.view(num_chunks, chunk_size) @ _decay_matrix_T(gamma, chunk_size, x_N.dtype, x_N.device)
    # Chunk level: (num_seqs, max_chunks) padded view of the chunk totals, scanned per sequence.
    s_SM = x_N.new_zeros(num_seqs, max_chunks + 1)
    s_SM[chunk_seq, chunk_idx] = f_loc_CK[:, 0]
    e_SM = _scan_rows(s_SM, gamma ** chunk_size, chunk_size)
    carry_C = e_SM[chunk_seq, chunk_idx + 1]  # the extra zero column is the carry past the last chunk
    f_CK = f_loc_CK + carry_C[:, None] * _tail_decay(gamma, chunk_size, x_N.dtype, x_N.device)
    return f_CK.view(-1).index_select(0, dest)


def _validate_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D tensor of S+1 offsets, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype.is_floating_point:
        raise ValueError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    first, last = (int(v) for v in cu_seqlens[[0, -1]].tolist())
    if first != 0 or last != num_tokens:
        raise ValueError(f"cu_seqlens must run from 0 to the number of packed tokens ({num_tokens}), "
                         f"got {first} .. {last}")


def future_kl(x: torch.Tensor, gamma: float, cu_seqlens: torch.Tensor | None = None, *,
              chunk_size: int = DEFAULT_CHUNK_SIZE, compute_dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """Discounted future sum ``F_t = sum_{k>=t} gamma^(k-t) x_k`` to the end of each row / sequence.

    Args:
        x: (B, T) right-padded rows (padding must be 0, or is summed like any token), or a 1-D packed
            tensor with ``cu_seqlens``.
        gamma: decay per token, in (0, 1]; see :func:`gamma_from_tau`.
        cu_seqlens: int tensor of S+1 offsets for a packed ``x``; the sum restarts at every boundary.
        chunk_size: tokens per chunk of the scan (a tuning knob; the result does not depend on it
            beyond float rounding).
        compute_dtype: dtype of the scan (float64 by default, see the module docstring); ``None`` scans
            in ``x``'s dtype (half precision promoted to float32).

    Returns:
        FutureKL with the shape and dtype of ``x``. No gradient is meant to flow through it (FIPO
        detaches it); autograd still works since only matmuls and indexing are used.
    """
    gamma = _check_gamma(gamma)
    if chunk_size < 2:  # the chunk level must be shorter than the token level
        raise ValueError(f"chunk_size must be >= 2, got {chunk_size}")
    if compute_dtype is None:
        compute_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    work = x.to(compute_dtype)
    if cu_seqlens is None:
        if x.dim() != 2:
            raise ValueError(f"x must be (B, T) without cu_seqlens, got shape {tuple(x.shape)}")
        out = _scan_rows(work, gamma, chunk_size)
    else:
        if x.dim() != 1:
            raise ValueError(f"packed x must be 1-D with cu_seqlens, got shape {tuple(x.shape)}")
        _validate_cu_seqlens(cu_seqlens, x.numel())
        out = _scan_packed(work, cu_seqlens, gamma, chunk_size)
    return out.to(x.dtype)


def segment_scan(x: torch.Tensor, gamma: float, cu_seqlens: torch.Tensor | None = None, *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, compute_dtype: torch.dtype | None = torch.float64
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Local scan of independent segments for the context-parallel split (docs/algorithm.md §3.1).

    Returns ``(F_loc, S)``: ``F_loc`` = :func:`future_kl` of each segment (summed to the segment's end
    only) and ``S`` its total ``F_loc`` at the segment's first token, one value per row (B,) or per
    segment of ``cu_seqlens`` (S,). An empty segment has total 0.
    """
    f_loc = future_kl(x, gamma, cu_seqlens, chunk_size=chunk_size, compute_dtype=compute_dtype)
    if cu_seqlens is None:
        totals = f_loc[:, 0] if f_loc.shape[1] else f_loc.new_zeros(f_loc.shape[0])
        return f_loc, totals
    cu = cu_seqlens.to(device=x.device, dtype=torch.long)
    nonempty = cu[1:] > cu[:-1]
    starts = torch.where(nonempty, cu[:-1], torch.zeros_like(cu[:-1]))
    totals = torch.where(nonempty, f_loc[starts] if f_loc.numel() else f_loc.new_zeros(starts.shape),
                         f_loc.new_zeros(()))
    return f_loc, totals
