"""DAPO's soft overlong punishment (docs/algorithm.md §6)."""

from __future__ import annotations


def overlong_penalty(*, response_length: int, max_response_length: int, buffer_length: int,
                     penalty_factor: float = 1.0) -> float:
    """Penalty added to the reward of a response of ``response_length`` tokens.

    0 up to ``max_response_length - buffer_length`` tokens, then linear down to ``-penalty_factor`` at
    ``max_response_length``: ``min(-(len - (L_max - buf)) / buf * factor, 0)``. Recipes: L_max 20480,
    buf 4096, factor 1 (32B); 10240 / 2048 (7B).
    """
    if max_response_length <= 0:
        raise ValueError(f"max_response_length must be > 0, got {max_response_length}")
    if not 0 < buffer_length <= max_response_length:
        raise ValueError(f"buffer_length must be in (0, max_response_length={max_response_length}], "
                         f"got {buffer_length}")
    if penalty_factor < 0:
        raise ValueError(f"penalty_factor must be >= 0, got {penalty_factor}")
    if response_length < 0:
        raise ValueError(f"response_length must be >= 0, got {response_length}")
    exceed = response_length - (max_response_length - buffer_length)
    if exceed <= 0:
        return 0.0
    return min(-exceed / buffer_length * penalty_factor, 0.0)
