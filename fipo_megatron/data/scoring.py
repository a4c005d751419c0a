"""Scoring responses: every verifier call under a timeout, so one hung check cannot stall a step.

    runner = ScoreRunner(score_fn=fn, timeout_s=10.0)
    results, counts = runner.score([{"response_text": ..., "ground_truth": ..., "data_source": ...}, ...])

``score_fn(*, response_text, ground_truth, data_source, ...)`` returns a float (the score) or a dict with
``score`` (and optionally ``acc`` and ``pred``, the extracted answer used by majority voting). A call that raises scores ``wrong_score`` and is counted in
``num_errors``; a call still running after ``timeout_s`` scores ``wrong_score`` and is counted in
``num_timeouts``. Calls run in daemon threads (Python cannot kill a thread, so a hung one is abandoned;
it never blocks the trainer or the interpreter's exit) or, with ``num_workers > 0``, in a pool of
processes that is killed when a call hangs. Verifiers that bring their own timeout (math-verify's signal
alarm) must have it disabled: alarms only work on a main thread, which is why ``math_verify_score``
passes ``timeout_seconds=None``.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from fipo_megatron.log import get_logger

logger = get_logger(__name__)


def _normalise(result: Any) -> dict:
    if isinstance(result, dict):
        score = float(result["score"])
        return {"score": score, "acc": bool(result.get("acc", score > 0)), "pred": result.get("pred")}
    score = float(result)
    return {"score": score, "acc": score > 0, "pred": None}


def _call_in_worker(score_fn: Callable[..., Any], item: dict) -> tuple[bool, Any]:
    try:
        return True, _normalise(score_fn(**item))
    except Exception as exc:  # travels back as text: the exception itself may not pickle
        return False, f"{type(exc).__name__}: {exc}"


class ScoreRunner:
    """Run a score function over a batch with a per-call timeout; failures score ``wrong_score``.

    ``num_workers = 0``: daemon threads, ``max_workers`` at a time (cheap rules such as DAPO's regex).
    ``num_workers > 0``: a pool of forked processes, for CPU-heavy verifiers (math-verify's sympy) that
    threads would serialise on the GIL; call i must finish by ``timeout_s * (1 + i // num_workers)`` after
    the batch starts (its fair share of the queue), and a pool that timed out is killed and rebuilt, so a
    hung verifier never outlives its batch. ``score_fn`` must then be a module-level function.
    """

    def __init__(self, *, score_fn: Callable[..., Any], timeout_s: float, wrong_score: float = -1.0,
                 max_workers: int = 32, num_workers: int = 0):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if num_workers < 0 or max_workers < 1:
            raise ValueError(f"num_workers must be >= 0 and max_workers >= 1, got {num_workers}, {max_workers}")
        self.score_fn, self.timeout_s, self.wrong_score = score_fn, timeout_s, wrong_score
        self.max_workers, self.num_workers = max_workers, num_workers
        self._pool = None

    def score(self, items: list[dict]) -> tuple[list[dict], dict[str, int]]:
        """Score every item (keyword arguments of ``score_fn``); return results and failure counts."""
        outcomes = self._run_processes(items) if self.num_workers else self._run_threads(items)
        counts = {"num_timeouts": 0, "num_errors": 0}
        results = []
        for status, value in outcomes:
            if status == "ok":
                results.append(value)
                continue
            counts["num_timeouts" if status == "timeout" else "num_errors"] += 1
            if status == "error" and counts["num_errors"] == 1:
                logger.warning("score function raised %s (scored as wrong; further errors counted only)", value)
            results.append({"score": self.wrong_score, "acc": False, "pred": None})
        if counts["num_timeouts"]:
            logger.warning("%d score call(s) exceeded %.1f s and scored as wrong", counts["num_timeouts"], self.timeout_s)
        return results, counts

    def _run_threads(self, items: list[dict]) -> list[tuple[str, Any]]:
        outcomes: list[tuple[str, Any] | None] = [None] * len(items)
        final: list[tuple[str, Any] | None] = [None] * len(items)

        def work(i: int) -> None:
            ok, value = _call_in_worker(self.score_fn, items[i])
            outcomes[i] = ("ok" if ok else "error", value)

        for start in range(0, len(items), self.max_workers):
            threads = [(i, threading.Thread(target=work, args=(i,), daemon=True, name=f"score-{i}"))
                       for i in range(start, min(start + self.max_workers, len(items)))]
            for _, t in threads:
                t.start()
            deadline = time.monotonic() + self.timeout_s
            for i, t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
                # decided now: an abandoned thread that finishes later must not change the outcome
                final[i] = ("timeout", None) if t.is_alive() else outcomes[i]
        return final  # type: ignore[return-value]

    def _run_processes(self, items: list[dict]) -> list[tuple[str, Any]]:
        import multiprocessing as mp

        if self._pool is None:
            self._pool = mp.get_context("fork").Pool(self.num_workers)
        t0 = time.monotonic()
        pending = [self._pool.apply_async(_call_in_worker, (self.score_fn, item)) for item in items]
        outcomes, timed_out = [], False
        for i, res in enumerate(pending):
            deadline = t0 + self.timeout_s * (1 + i // self.num_workers)
            try:
                ok, value = res.get(timeout=max(0.0, deadline - time.monotonic()))
                outcomes.append(("ok" if ok else "error", value))
            except mp.TimeoutError:
                outcomes.append(("timeout", None))
                timed_out = True
            except Exception as exc:  # the result could not travel back (unpicklable)
                outcomes.append(("error", f"{type(exc).__name__}: {exc}"))
        if timed_out:  # kill the hung workers with their pool; the next batch forks a fresh one
            self.close()
        return outcomes

    def close(self) -> None:
        """Stop the worker processes (process mode)."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


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
