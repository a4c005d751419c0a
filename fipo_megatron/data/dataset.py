"""Prompt datasets in the verl / DAPO-Math-17k layout, and a resumable, deterministic prompt sampler.

A row is ``{"prompt": [{"role": "user", "content": ...}, ...], "reward_model": {"ground_truth": ...},
"data_source": ...}`` in a parquet file or a jsonl file (one object per line). Rows that cannot be read
(bad JSON, missing or mistyped fields, a ``null`` ground truth, which no answer could match) are
*malformed*, rows whose messages are blank are *empty*, rows longer than ``max_prompt_length`` tokens are
*overlong*: all three are skipped and counted, never truncated (``PromptDataset.stats``; the trainer logs
them and puts them in the metrics). The warning names the first skipped row of each kind (file, row
number counted from 1, field and reason), so a bad export can be found without a search.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from fipo_megatron.data.tokenizer import encode_prompt
from fipo_megatron.log import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class PromptRecord:
    """One usable prompt: its token ids, the answer the reward checks, and where it came from."""

    index: int
    prompt_ids: list[int]
    ground_truth: Any
    data_source: str
    messages: list[dict] = field(default_factory=list)


@dataclass(kw_only=True)
class PromptDataset:
    """Prompts kept after filtering, with the counts of what was skipped and why."""

    records: list[PromptRecord]
    stats: dict[str, int]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> PromptRecord:
        return self.records[i]


def read_rows(path: str) -> Iterator[dict | None]:
    """Yield the rows of a parquet or jsonl file; ``None`` for a line that is not a JSON object."""
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:  # pragma: no cover - pyarrow is in the test and data extras
            raise ImportError("reading parquet needs pyarrow: pip install 'fipo_megatron[data]'") from exc
        table = pq.read_table(path)
        for batch in table.to_batches():
            yield from batch.to_pylist()
    elif path.endswith((".jsonl", ".json")):
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    yield None
                    continue
                yield row if isinstance(row, dict) else None
    else:
        raise ValueError(f"data file {path!r}: expected a .parquet or .jsonl file")


def _get_dotted(row: dict, key: str) -> Any:
    node: Any = row
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


class _BadRow(Exception):
    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def _messages(prompt: Any) -> list[dict]:
    """Normalise the prompt field: a list of {role, content} messages (a bare string is one user turn)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if hasattr(prompt, "tolist"):  # numpy arrays from pandas-written parquet
        prompt = prompt.tolist()
    if not isinstance(prompt, list) or not prompt:
        raise TypeError("prompt is not a non-empty list of messages")
    out = []
    for m in prompt:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
            raise TypeError("a message is not a {role: str, content: str} mapping")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def load_prompt_dataset(*, files: list[str] | tuple[str, ...], tokenizer, max_prompt_length: int,
                        prompt_key: str = "prompt", ground_truth_key: str = "reward_model.ground_truth",
                        data_source_key: str = "data_source", chat_template: bool = True,
                        raw_template: str = "{content}", rows: list[dict] | None = None) -> PromptDataset:
    """Read ``files`` (or the given ``rows``), tokenize each prompt, skip and count bad rows."""
    if tokenizer is None:
        raise ValueError("load_prompt_dataset needs a tokenizer (see data.tokenizer.load_tokenizer)")
    stats = {"num_rows": 0, "num_malformed": 0, "num_empty": 0, "num_overlong": 0}
    first: dict[str, str] = {}  # kind -> where the first skipped row of that kind is, and why
    records: list[PromptRecord] = []
    named = [("the given rows", iter(rows))] if rows is not None else [(p, read_rows(p)) for p in files]
    for name, source in named:
        for row_number, row in enumerate(source, start=1):
            stats["num_rows"] += 1
            where = f"{name} row {row_number}"
            try:
                if row is None:
                    raise _BadRow("(row)", "not a JSON object")
                if prompt_key not in row:
                    raise _BadRow(prompt_key, "missing")
                try:
                    messages = _messages(row[prompt_key])
                except TypeError as exc:
                    raise _BadRow(prompt_key, str(exc)) from None
                try:
                    ground_truth = _get_dotted(row, ground_truth_key)
                except KeyError:
                    raise _BadRow(ground_truth_key, "missing") from None
                if ground_truth is None:
                    raise _BadRow(ground_truth_key, "null (no response could be scored right)")
                data_source = str(row.get(data_source_key, "unknown"))
            except _BadRow as bad:
                stats["num_malformed"] += 1
                first.setdefault("malformed", f"{where}, field {bad.field!r}: {bad.reason}")
                continue
            if not any(m["content"].strip() for m in messages):
                stats["num_empty"] += 1
                first.setdefault("empty", f"{where}, field {prompt_key!r}: blank messages")
                continue
            ids = encode_prompt(tokenizer, messages, chat_template=chat_template, raw_template=raw_template)
            if len(ids) > max_prompt_length:
                stats["num_overlong"] += 1
                first.setdefault("overlong", f"{where}, field {prompt_key!r}: {len(ids)} tokens")
                continue
            records.append(PromptRecord(index=len(records), prompt_ids=ids, ground_truth=ground_truth,
                                        data_source=data_source, messages=messages))
    stats["num_prompts"] = len(records)
    skipped = stats["num_malformed"] + stats["num_empty"] + stats["num_overlong"]
    if skipped:
        logger.warning("prompt data: kept %d of %d rows (skipped %d malformed, %d empty, %d longer than %d tokens); "
                       "first of each: %s", len(records), stats["num_rows"], stats["num_malformed"],
                       stats["num_empty"], stats["num_overlong"], max_prompt_length,
                       "; ".join(f"{kind}: {where}" for kind, where in first.items()))
    if not records:
        raise ValueError(f"no usable prompts in {list(files) or 'the given rows'} (stats: {stats}; "
                         f"first skipped: {'; '.join(first.values())})")
    return PromptDataset(records=records, stats=stats)


class PromptSampler:
    """Deterministic epoch-wise shuffled order over ``num_prompts`` with a resumable position.

    Epoch ``e`` visits a permutation drawn from ``(seed, e)`` (the identity without ``shuffle``); a
    batch that crosses the end of an epoch continues into the next. ``state_dict`` / ``load_state_dict``
    carry ``(epoch, index)``, so a resumed run draws exactly the prompts an uninterrupted one would.
    """

    def __init__(self, *, num_prompts: int, seed: int, shuffle: bool = True):
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
        self.num_prompts, self.seed, self.shuffle = num_prompts, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._order_for(0)

    def _order_for(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_prompts)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts)

    def next_indices(self, count: int) -> list[int]:
        """The next ``count`` prompt indices, advancing the position."""
        out: list[int] = []
        while len(out) < count:
            if self.index >= self.num_prompts:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._order_for(self.epoch)
            take = min(count - len(out), self.num_prompts - self.index)
            out.extend(int(i) for i in self._order[self.index:self.index + take])
            self.index += take
        return out

    def state_dict(self) -> dict:
        """The position ``(epoch, index)``, with the seed and prompt count it was recorded under."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_prompts": self.num_prompts}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a ``state_dict`` position. A position recorded for another prompt count only logs a
        warning: the run goes on in the current data's order."""
        if state.get("num_prompts", self.num_prompts) != self.num_prompts:
            logger.warning("resuming a data position recorded for %d prompts on %d prompts",
                           state["num_prompts"], self.num_prompts)
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._order_for(self.epoch)
