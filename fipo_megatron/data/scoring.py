"""Scoring responses: every verifier call under a timeout, and the whole batch under a deadline, so no
verifier can stall a step or slow the trainer down.

    runner = ScoreRunner(score_fn=fn, timeout_s=10.0, num_workers=4, batch_timeout_s=300.0)
    results, counts = runner.score([{"response_text": ..., "ground_truth": ..., "data_source": ...}, ...])

``score_fn(*, response_text, ground_truth, data_source, ...)`` returns a float (the score) or a dict with
``score`` (and optionally ``acc`` and ``pred``, the extracted answer used by majority voting). A call that
raises, or returns a score that is not a finite number, scores ``wrong_score`` and is counted in
``num_errors``; a call still running ``timeout_s`` after *it* started, or not finished when the batch
deadline ``batch_timeout_s`` passes, scores ``wrong_score`` and is counted in ``num_timeouts``.

``num_workers > 0`` (the default in the run config): calls run in forked worker processes, one call per
worker at a time; a worker whose call overruns is killed with SIGKILL and replaced, so a verifier that
spins cannot take the trainer's interpreter lock nor outlive its timeout, and a batch of N hung calls
costs ``batch_timeout_s`` at most, not ``N x timeout_s / num_workers``. ``num_workers = 0``: daemon
threads (cheapest, for trusted rules that cannot hang: Python cannot kill a thread, so a thread that
spins keeps competing for the interpreter lock after it is abandoned). Verifiers that bring their own
timeout (math-verify's signal alarm) must have it disabled: alarms only work on a main thread, which is
why ``math_verify_score`` passes ``timeout_seconds=None``.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from typing import Any, Callable

from fipo_megatron.algo.rewards.base import register_reward
from fipo_megatron.log import get_logger

logger = get_logger(__name__)


def _normalise(result: Any) -> dict:
    if isinstance(result, dict):
        score = float(result["score"])
        out = {"score": score, "acc": bool(result.get("acc", score > 0)), "pred": result.get("pred")}
    else:
        score = float(result)
        out = {"score": score, "acc": score > 0, "pred": None}
    if not math.isfinite(score):  # a NaN reward would poison the group's advantages
        raise ValueError(f"score function returned a non-finite score {score!r}")
    return out


def _call_in_worker(score_fn: Callable[..., Any], item: dict) -> tuple[bool, Any]:
    try:
        return True, _normalise(score_fn(**item))
    except Exception as exc:  # travels back as text: the exception itself may not pickle
        return False, f"{type(exc).__name__}: {exc}"


def _worker_loop(conn, parent_end, parent_pid: int, score_fn: Callable[..., Any]) -> None:
    """Body of a scoring process: answer ``(index, item)`` requests until the pipe closes or the trainer dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it kills us itself
    parent_end.close()  # else our own copy of the trainer's end would keep the pipe open after it died
    while True:
        try:
            # Other workers forked later hold copies of the trainer's end of this pipe too, so EOF alone
            # may never come after a kill -9 of the trainer: check who our parent is while idle.
            while not conn.poll(1.0):
                if os.getppid() != parent_pid:
                    return
            index, item = conn.recv()
        except (EOFError, OSError):
            return
        ok, value = _call_in_worker(score_fn, item)
        try:
            conn.send((index, ok, value))
        except Exception as exc:  # noqa: BLE001 - an unpicklable result
            conn.send((index, False, f"{type(exc).__name__}: {exc}"))


class _Worker:
    """One forked scoring process and its pipe; ``index``/``started`` describe the call it is running."""

    def __init__(self, ctx, score_fn: Callable[..., Any]):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_loop, args=(child, self.conn, os.getpid(), score_fn), daemon=True,
                                name="fipo-score")
        self.proc.start()
        child.close()
        self.index: int | None = None
        self.started = 0.0

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)  # a spinning verifier may ignore SIGTERM
        self.proc.join(10)
        self.conn.close()


class ScoreRunner:
    """Run a score function over a batch with a per-call timeout and a batch deadline; failures score
    ``wrong_score`` (see the module docstring for the two modes).

    ``batch_timeout_s``: the most one ``score`` call may take (0: ``timeout_s`` times the number of rounds
    the batch needs, i.e. no separate bound). With ``num_workers > 0`` the workers stay alive between
    batches; ``close`` stops them.
    """

    def __init__(self, *, score_fn: Callable[..., Any], timeout_s: float, wrong_score: float = -1.0,
                 max_workers: int = 32, num_workers: int = 0, batch_timeout_s: float = 0.0):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if num_workers < 0 or max_workers < 1:
            raise ValueError(f"num_workers must be >= 0 and max_workers >= 1, got {num_workers}, {max_workers}")
        if batch_timeout_s < 0:
            raise ValueError(f"batch_timeout_s must be >= 0, got {batch_timeout_s}")
        self.score_fn, self.timeout_s, self.wrong_score = score_fn, timeout_s, wrong_score
        self.max_workers, self.num_workers, self.batch_timeout_s = max_workers, num_workers, batch_timeout_s
        self._workers: list[_Worker] = []

    def score(self, items: list[dict]) -> tuple[list[dict], dict[str, int]]:
        """Score every item (keyword arguments of ``score_fn``); return results and failure counts."""
        deadline = time.monotonic() + self.batch_timeout_s if self.batch_timeout_s else float("inf")
        outcomes = self._run_processes(items, deadline) if self.num_workers else self._run_threads(items, deadline)
        counts = {"num_timeouts": 0, "num_errors": 0}
        results = []
        for status, value in outcomes:
            if status == "ok":
                results.append(value)
                continue
            counts["num_timeouts" if status in ("timeout", "deadline") else "num_errors"] += 1
            if status == "error" and counts["num_errors"] == 1:
                logger.warning("score function failed: %s (scored as wrong; further errors counted only)", value)
            results.append({"score": self.wrong_score, "acc": False, "pred": None})
        num_deadline = sum(1 for s, _ in outcomes if s == "deadline")
        if num_deadline:
            logger.warning("%d score call(s) unfinished at the batch deadline (%.1f s) scored as wrong",
                           num_deadline, self.batch_timeout_s)
        if counts["num_timeouts"] > num_deadline:
            logger.warning("%d score call(s) exceeded %.1f s and scored as wrong",
                           counts["num_timeouts"] - num_deadline, self.timeout_s)
        return results, counts

    def _run_threads(self, items: list[dict], batch_deadline: float) -> list[tuple[str, Any]]:
        outcomes: list[tuple[str, Any] | None] = [None] * len(items)
        final: list[tuple[str, Any]] = [("deadline", None)] * len(items)

        def work(i: int) -> None:
            ok, value = _call_in_worker(self.score_fn, items[i])
            outcomes[i] = ("ok" if ok else "error", value)

        for start in range(0, len(items), self.max_workers):
            if time.monotonic() >= batch_deadline:
                break
            threads = [(i, threading.Thread(target=work, args=(i,), daemon=True, name=f"score-{i}"))
                       for i in range(start, min(start + self.max_workers, len(items)))]
            for _, t in threads:
                t.start()
            deadline = min(time.monotonic() + self.timeout_s, batch_deadline)
            for i, t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
                # decided now: an abandoned thread that finishes later must not change the outcome
                final[i] = ("timeout", None) if t.is_alive() else outcomes[i]  # type: ignore[assignment]
        return final

    def _run_processes(self, items: list[dict], batch_deadline: float) -> list[tuple[str, Any]]:
        import multiprocessing as mp
        from multiprocessing.connection import wait

        ctx = mp.get_context("fork")
        while len(self._workers) < min(self.num_workers, max(len(items), 1)):
            self._workers.append(_Worker(ctx, self.score_fn))
        outcomes: list[tuple[str, Any]] = [("deadline", None)] * len(items)
        todo = list(range(len(items)))[::-1]
        idle = list(self._workers)
        busy: list[_Worker] = []
        while todo or busy:
            while todo and idle:
                w = idle.pop()
                w.index, w.started = todo.pop(), time.monotonic()
                try:
                    w.conn.send((w.index, items[w.index]))
                except Exception as exc:  # noqa: BLE001 - an item that does not pickle
                    outcomes[w.index] = ("error", f"{type(exc).__name__}: {exc}")
                    idle.append(w)
                    continue
                busy.append(w)
            if not busy:
                continue
            now = time.monotonic()
            if now >= batch_deadline:
                break
            next_due = min(min(w.started + self.timeout_s for w in busy), batch_deadline)
            ready = wait([w.conn for w in busy], timeout=max(0.0, next_due - now))
            for w in list(busy):
                if w.conn in ready:
                    try:
                        index, ok, value = w.conn.recv()
                        outcomes[index] = ("ok" if ok else "error", value)
                        busy.remove(w)
                        idle.append(w)
                        continue
                    except (EOFError, OSError):  # the worker died (a crash in native code, the OOM killer)
                        outcomes[w.index] = ("error", f"scoring process died (exit code {w.proc.exitcode})")
                elif time.monotonic() - w.started >= self.timeout_s:
                    outcomes[w.index] = ("timeout", None)
                else:
                    continue
                busy.remove(w)
                idle.append(self._replace(w, ctx))
        for w in busy:  # the batch deadline passed: their calls (and all unsent ones) stay "deadline"
            self._replace(w, ctx, respawn=False)
        return outcomes

    def _replace(self, worker: _Worker, ctx, *, respawn: bool = True) -> _Worker | None:
        worker.kill()
        self._workers.remove(worker)
        if not respawn:
            return None
        fresh = _Worker(ctx, self.score_fn)
        self._workers.append(fresh)
        return fresh

    def close(self) -> None:
        """Stop the worker processes (process mode)."""
        for w in self._workers:
            w.kill()
        self._workers = []


# Registered beside the package's other rewards; math_verify itself is imported lazily, inside the call.
@register_reward("math_verify", failure_score=-1.0)
def math_verify_score(*, response_text: str, ground_truth: Any, **_) -> dict:
    """+1 / -1 by HF math-verify (``pip install 'fipo_megatron[math-verify]'``): parse both, compare."""
    try:
        from math_verify import parse, verify
    except ImportError as exc:
        raise ImportError("reward.reward_fn=math_verify needs math-verify: pip install 'fipo_megatron[math-verify]'") from exc
    gold_text = str(ground_truth)
    if "$" not in gold_text and "\\boxed" not in gold_text:
        gold_text = f"${gold_text}$"
    try:  # disable math-verify's signal-based timeouts: we run off the main thread (see module doc)
        gold = parse(gold_text, parsing_timeout=None)
        pred = parse(response_text, parsing_timeout=None)
        ok = bool(verify(gold, pred, timeout_seconds=None))
    except TypeError:  # older math-verify without the timeout keywords
        ok = bool(verify(parse(gold_text), parse(response_text)))
    return {"score": 1.0 if ok else -1.0, "acc": ok}
