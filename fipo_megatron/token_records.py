"""Per-token records: what the loss saw, token by token, for a few responses every K steps.

With ``logging.token_records_interval: K`` (0, the default, turns them off), every K-th step the trainer
picks ``logging.token_records_samples`` responses of the step's *last* mini-batch (half with a positive
advantage, half with a negative one when both exist), the actor taps the policy loss on that mini-batch
(``actor.step.TokenCapture``: nothing is tapped on other steps), and rank 0 appends one JSON line per
response to ``<run_dir>/token_records.jsonl``. The last mini-batch is where FIPO's signal is largest: its
``delta_logp`` is how far the step's earlier mini-batches moved each token's log-prob (docs/algorithm.md §1: on the
first mini-batch it is 0 and FutureKL with it).

Format (``format: "fipo_megatron.token_records/1"``), one object per line:

==================  ==========================================================================================
key                 value
==================  ==========================================================================================
format              the format tag above
step                training step (as in metrics.jsonl)
sample              index of the response in the step's batch
group               index of its prompt group in the batch
loss_mode           the policy loss ("fipo", "dapo", "grpo", ...)
mini_batch          index of the tapped mini-batch (the last one), ``num_mini_batches`` of the step
prompt              decoded prompt (special tokens shown)
reward, finish_reason   the response's reward and why it ended ("stop" / "length")
tokens              the response tokens' text (one string per token, special tokens shown)
token_ids           their ids
delta_logp          per token: log p_now - log p_old, clamped to [-20, 20] (the loss's log-ratio)
future_kl           per token: sum_{k>=t} gamma^(k-t) delta_logp_k over tokens with ratio <= clip_ratio_c
                    (under "dapo"/"grpo": what FIPO's would be; the loss does not use it)
influence_weight    per token: the weight f_t the advantage is multiplied by (1 without FutureKL)
advantage           per token: the advantage A_t
loss                per token: the token's loss term before aggregation
response_mask       per token, 0/1: the token is a response token (always 1 here)
future_kl_masked    per token, 0/1: ratio > clip_ratio_c, so the token does not feed FutureKL
ppo_clipped         per token, 0/1: the PPO clip is active (the clipped term is the larger loss)
dual_clipped        per token, 0/1: a negative-advantage token capped by the dual clip
kept                per token, 0/1: the token counts in the loss (0 when its response was invalidated)
==================  ==========================================================================================

Every per-token list has ``len(tokens)`` entries. Floats are rounded to 6 significant digits. On resume,
lines of steps after the resumed checkpoint are dropped (as for metrics.jsonl). Size: about 10 numbers
per token, so 4 responses of 20k tokens make a few MB per recorded step: keep K large on long runs.
``tools/show_tokens.py RUN_DIR`` renders the records as an HTML page.
"""

from __future__ import annotations

import json
import math
import os
import random
from typing import Sequence

RECORDS_FILE = "token_records.jsonl"
FORMAT = "fipo_megatron.token_records/1"
#: the per-token keys of a record; the order of ``algo.policy_loss.TOKEN_TAP_FIELDS``.
PER_TOKEN_KEYS = ("delta_logp", "future_kl", "influence_weight", "advantage", "loss", "response_mask",
                  "future_kl_masked", "ppo_clipped", "dual_clipped", "kept")
FLAG_KEYS = ("response_mask", "future_kl_masked", "ppo_clipped", "dual_clipped", "kept")
SCALAR_KEYS = {"format": str, "step": int, "sample": int, "group": int, "loss_mode": str, "mini_batch": int,
               "num_mini_batches": int, "prompt": str, "reward": (int, float), "finish_reason": str}


def select_record_samples(batch, *, mini_batch_samples: int, num_samples: int, seed: int) -> list[int]:
    """Indices into ``batch.samples`` of up to ``num_samples`` responses of the last mini-batch, half with a
    positive advantage and half with a non-positive one when both exist. Deterministic in ``seed``, so every
    rank picks the same ones from the same batch."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if mini_batch_samples < 1:
        raise ValueError(f"mini_batch_samples must be >= 1, got {mini_batch_samples}")
    n = len(batch.samples)
    if n == 0:
        return []
    last = (n - 1) // mini_batch_samples * mini_batch_samples
    rng = random.Random(seed)
    pos = [i for i in range(last, n) if batch.samples[i].advantage > 0]
    rest = [i for i in range(last, n) if batch.samples[i].advantage <= 0]
    rng.shuffle(pos)
    rng.shuffle(rest)
    half = (num_samples + 1) // 2
    take = pos[:half] + rest[:num_samples - min(half, len(pos))]
    take += pos[half:half + num_samples - len(take)]
    return sorted(take[:num_samples])


def _round(x: float) -> float | None:
    if not math.isfinite(x):
        return None
    return float(f"{x:.6g}")


def build_records(*, step: int, batch, taps: dict, tokenizer, loss_mode: str, num_mini_batches: int,
                  mini_batch_samples: int) -> list[dict]:
    """One record per tapped sample (``taps``: ``MegatronActor.last_token_taps``), in sample order."""
    records = []
    for i in sorted(taps):
        s = batch.samples[i]
        values = taps[i]
        missing = [k for k in PER_TOKEN_KEYS if k not in values]
        if missing:
            raise ValueError(f"token taps of sample {i} lack {missing}")
        length = len(s.response_ids)
        rec = {"format": FORMAT, "step": int(step), "sample": int(i), "group": int(s.group_id),
               "loss_mode": str(loss_mode), "mini_batch": int(i // mini_batch_samples),
               "num_mini_batches": int(num_mini_batches),
               "prompt": tokenizer.decode(list(s.prompt_ids), skip_special_tokens=False),
               "reward": float(s.reward), "finish_reason": str(s.finish_reason),
               "tokens": [tokenizer.decode([t], skip_special_tokens=False) for t in s.response_ids],
               "token_ids": [int(t) for t in s.response_ids]}
        for k in PER_TOKEN_KEYS:
            col = [float(v) for v in values[k].reshape(-1).tolist()]
            if len(col) != length:
                raise ValueError(f"token taps of sample {i}: {k} has {len(col)} values for {length} tokens")
            rec[k] = [int(v != 0) for v in col] if k in FLAG_KEYS else [_round(v) for v in col]
        records.append(rec)
    return records


def validate_record(rec: dict, *, where: str = "record") -> None:
    """Raise ValueError naming ``where`` and the key when ``rec`` does not follow the format."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: not a JSON object")
    if rec.get("format") != FORMAT:
        raise ValueError(f"{where}: format is {rec.get('format')!r}, expected {FORMAT!r}")
    for key, kind in SCALAR_KEYS.items():
        if not isinstance(rec.get(key), kind) or isinstance(rec.get(key), bool):
            raise ValueError(f"{where}: {key} missing or not {kind}")
    tokens = rec.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"{where}: tokens must be a list of strings")
    for key in ("token_ids", *PER_TOKEN_KEYS):
        col = rec.get(key)
        if not isinstance(col, list) or len(col) != len(tokens):
            raise ValueError(f"{where}: {key} must be a list of {len(tokens)} values (one per token)")
        if key in FLAG_KEYS and any(v not in (0, 1) for v in col):
            raise ValueError(f"{where}: {key} must hold 0/1 flags")
        if key not in FLAG_KEYS and any(v is not None and not isinstance(v, (int, float)) for v in col):
            raise ValueError(f"{where}: {key} must hold numbers")


def read_token_records(path: str) -> list[dict]:
    """Every record of a ``token_records.jsonl`` (or of ``RUN_DIR``), validated; a bad line raises a
    ValueError naming the file and line (a trailing line cut by a crash is skipped)."""
    if os.path.isdir(path):
        path = os.path.join(path, RECORDS_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"no token records at {path!r} (set logging.token_records_interval > 0)")
    with open(path) as f:
        lines = f.read().split("\n")
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if n == len(lines):  # unterminated last line: a write cut short
                continue
            raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
        validate_record(rec, where=f"{path}:{n}")
        out.append(rec)
    return out


class TokenRecordWriter:
    """Appends records to ``<run_dir>/token_records.jsonl`` (rank 0 only), flushed and fsynced per step."""

    def __init__(self, run_dir: str, *, resume_step: int | None = None):
        from fipo_megatron.metrics import truncate_after_step

        self.path = os.path.join(run_dir, RECORDS_FILE)
        os.makedirs(run_dir, exist_ok=True)
        truncate_after_step(self.path, -1 if resume_step is None else resume_step)

    def write(self, records: Sequence[dict]) -> None:
        """Append one JSON line per record, flushed and fsynced before returning."""
        if not records:
            return
        with open(self.path, "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())


class TokenRecorder:
    """The trainer's side of the records: which samples to tap at a step (every rank, the same), and
    writing their records (rank 0). Off (``interval`` 0): ``select`` returns nothing, no file is touched."""

    def __init__(self, *, interval: int, num_samples: int, run_dir: str, tokenizer, loss_mode: str,
                 mini_batch_prompts: int, seed: int, writes: bool):
        self.interval, self.num_samples, self.run_dir = interval, num_samples, run_dir
        self.tokenizer, self.loss_mode, self.mini_batch_prompts, self.seed = tokenizer, loss_mode, mini_batch_prompts, seed
        self.writes = writes and interval > 0
        self._writer: TokenRecordWriter | None = None

    @classmethod
    def from_config(cls, cfg, *, run_dir: str, tokenizer, rank: int) -> "TokenRecorder":
        """From ``cfg.logging.token_records_*``; only global rank 0 writes."""
        return cls(interval=cfg.logging.token_records_interval, num_samples=cfg.logging.token_records_samples,
                   run_dir=run_dir, tokenizer=tokenizer, loss_mode=cfg.policy_loss.loss_mode,
                   mini_batch_prompts=cfg.actor.ppo_mini_batch_size, seed=cfg.trainer.seed, writes=rank == 0)

    def start(self, *, resume_step: int | None) -> None:
        """Open the file: a fresh run starts it empty, a resumed one drops the records after ``resume_step``."""
        if self.writes:
            self._writer = TokenRecordWriter(self.run_dir, resume_step=resume_step)

    def select(self, step: int, batch) -> list[int]:
        """Samples of ``batch`` to tap at ``step`` (``MegatronActor.update(record_samples=...)``); [] when off."""
        if not self.interval or step % self.interval or batch is None:
            return []
        return select_record_samples(batch, mini_batch_samples=self.mini_batch_prompts * batch.num_responses_per_prompt,
                                     num_samples=self.num_samples, seed=self.seed * 1_000_003 + step)

    def write(self, step: int, batch, taps: dict | None) -> int:
        """Append the records of ``taps`` (``MegatronActor.last_token_taps``); the number written."""
        if not self.writes or not taps:
            return 0
        if self._writer is None:
            self.start(resume_step=None)
        per_mini = self.mini_batch_prompts * batch.num_responses_per_prompt
        records = build_records(step=step, batch=batch, taps=taps, tokenizer=self.tokenizer, loss_mode=self.loss_mode,
                                num_mini_batches=math.ceil(len(batch.samples) / per_mini), mini_batch_samples=per_mini)
        self._writer.write(records)
        return len(records)
