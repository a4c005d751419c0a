"""DAPO dynamic sampling (docs/algorithm.md §6, "filter_groups"): pure bookkeeping, no engine calls.

    acc = GroupAccumulator(target_num_groups=512, max_num_gen_batches=10)
    while acc.should_generate_more():
        groups = generate_and_score(...)                  # one generation batch
        acc.add(keep_informative_groups(groups, values_of=lambda g: g.accs), num_generated=len(groups))
    batch_groups = acc.take(on_exhausted="raise")       # DAPO raises if the budget ran out before it filled

The trainer's rollout phase (``rollout/phase.py``, ``RolloutPhase.collect``) is this loop.
"""

from __future__ import annotations

import math
from typing import Callable, Generic, Iterable, Sequence, TypeVar

T = TypeVar("T")


def group_is_informative(values: Sequence[float], *, keep_singletons: bool = True) -> bool:
    """True if the group's metric values do not all agree (population std > 0, as DAPO tests it).

    A group of one trivially agrees; DAPO keeps it (``keep_singletons``), which only matters with one
    response per prompt. NaN values are an error (a reward function bug should not look informative).
    """
    vals = [float(v) for v in values]
    if any(math.isnan(v) for v in vals):
        raise ValueError(f"metric values contain NaN: {vals}")
    if len(vals) <= 1:
        return keep_singletons and len(vals) == 1
    return max(vals) != min(vals)


def keep_informative_groups(groups: Iterable[T], *, values_of: Callable[[T], Sequence[float]],
                            keep_singletons: bool = True) -> list[T]:
    """The groups whose metric values (``values_of(group)``: e.g. accuracies or rewards) disagree."""
    return [g for g in groups if group_is_informative(values_of(g), keep_singletons=keep_singletons)]


class GroupAccumulator(Generic[T]):
    """Collects kept groups over generation batches until ``target_num_groups`` are there.

    ``max_num_gen_batches <= 0`` means no limit (DAPO's convention). ``take()`` returns exactly the
    first ``target_num_groups`` groups (the surplus of the last batch is dropped, as DAPO truncates)
    and resets the accumulator for the next step.
    """

    def __init__(self, *, target_num_groups: int, max_num_gen_batches: int = 10) -> None:
        if target_num_groups < 1:
            raise ValueError(f"target_num_groups must be >= 1, got {target_num_groups}")
        self.target_num_groups = target_num_groups
        self.max_num_gen_batches = max_num_gen_batches
        self._groups: list[T] = []
        self.num_gen_batches = 0
        self.num_seen_groups = 0

    def add(self, kept_groups: Iterable[T], *, num_generated: int | None = None) -> None:
        """Record one generation batch's kept groups (``num_generated``: groups before filtering, for metrics)."""
        kept = list(kept_groups)
        self._groups.extend(kept)
        self.num_gen_batches += 1
        self.num_seen_groups += len(kept) if num_generated is None else num_generated

    @property
    def num_groups(self) -> int:
        """Groups kept so far this step."""
        return len(self._groups)

    @property
    def is_full(self) -> bool:
        """At least ``target_num_groups`` kept."""
        return len(self._groups) >= self.target_num_groups

    @property
    def budget_exhausted(self) -> bool:
        """``max_num_gen_batches`` generation batches spent (never, with no limit)."""
        return self.max_num_gen_batches > 0 and self.num_gen_batches >= self.max_num_gen_batches

    def should_generate_more(self) -> bool:
        """Not full yet and the generation budget allows another batch."""
        return not self.is_full and not self.budget_exhausted

    def take(self, *, on_exhausted: str = "raise", whole_multiple_of: int = 1) -> list[T]:
        """The step's groups, then reset for the next step.

        Full: exactly the first ``target_num_groups`` (the surplus of the last batch is dropped, as DAPO
        truncates). Budget exhausted first: ``on_exhausted="raise"`` raises RuntimeError (DAPO's behaviour);
        ``"train"`` returns the largest multiple of ``whole_multiple_of`` groups it has (whole mini-batches
        only, so every optimizer step keeps the configured size), possibly none.
        """
        if on_exhausted not in ("raise", "train"):
            raise ValueError(f"on_exhausted must be 'raise' or 'train', got {on_exhausted!r}")
        if whole_multiple_of < 1:
            raise ValueError(f"whole_multiple_of must be >= 1, got {whole_multiple_of}")
        if self.is_full:
            out = self._groups[:self.target_num_groups]
        elif on_exhausted == "raise":
            raise RuntimeError(f"dynamic sampling: only {len(self._groups)} of {self.target_num_groups} prompts have "
                               f"mixed rewards after {self.num_gen_batches} generation batches "
                               f"(algorithm.filter_groups.max_num_gen_batches={self.max_num_gen_batches}); the data "
                               "may be too easy or too hard for the policy")
        else:
            out = self._groups[:len(self._groups) // whole_multiple_of * whole_multiple_of]
        self._groups, self.num_gen_batches, self.num_seen_groups = [], 0, 0
        return out
