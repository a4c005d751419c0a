"""A small JSON-over-HTTP client with retries and exponential backoff, for server rollout engines.

Standard library only (``urllib``), so it works wherever the trainer does. Connection failures,
timeouts, HTTP 429 and 5xx are retried with delays ``backoff_s * 2**k`` (capped at ``max_backoff_s``);
after ``max_retries`` it raises :class:`EngineUnavailableError`, which the trainer can catch to
checkpoint and stop cleanly: nothing of the trainer's state is touched by a failed request. Other 4xx
answers are the caller's bug and raise :class:`EngineRequestError` at once.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any

from fipo_megatron.log import get_logger

logger = get_logger(__name__)


class EngineUnavailableError(RuntimeError):
    """The engine did not answer (down, crashed, overloaded) after all retries."""


class EngineRequestError(RuntimeError):
    """The engine answered with an error that retrying cannot fix (HTTP 4xx other than 429)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """``max_retries`` retries after the first attempt; ``timeout_s`` per attempt."""

    max_retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    timeout_s: float = 600.0

    def __post_init__(self):
        if self.max_retries < 0:
            raise ValueError(f"RetryPolicy.max_retries must be >= 0, got {self.max_retries}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError(f"RetryPolicy.backoff_s/max_backoff_s must be >= 0, got {self.backoff_s}/{self.max_backoff_s}")
        if self.timeout_s <= 0:
            raise ValueError(f"RetryPolicy.timeout_s must be > 0, got {self.timeout_s}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        return min(self.backoff_s * (2 ** attempt), self.max_backoff_s)


def encode_json(payload: Any) -> bytes:
    """JSON body; refuses tensors and other non-JSON values with a clear error (not a silent str())."""
    try:
        return json.dumps(payload, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise TypeError(f"request payload is not JSON-serialisable: {e}") from e


def request_json(url: str, payload: Any = None, *, method: str = "POST", policy: RetryPolicy = RetryPolicy(),
                 sleep=time.sleep) -> Any:
    """Send ``payload`` as JSON to ``url``; return the decoded JSON answer (or None for an empty body)."""
    body = encode_json(payload) if payload is not None else None
    last_error: str = ""
    for attempt in range(policy.max_retries + 1):
        request = urllib.request.Request(url, data=body, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=policy.timeout_s) as response:
                raw = response.read()
            if not raw.strip():
                return None
            try:
                return json.loads(raw)
            except ValueError:  # some routes (SGLang /flush_cache) answer plain text
                return raw.decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:500]
            if e.code != 429 and e.code < 500:
                raise EngineRequestError(f"{method} {url} -> HTTP {e.code}: {detail}") from e
            last_error = f"HTTP {e.code}: {detail}"
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as e:
            last_error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        if attempt < policy.max_retries:
            delay = policy.delay(attempt)
            logger.warning("%s %s failed (%s); retry %d/%d in %.1f s", method, url, last_error, attempt + 1,
                           policy.max_retries, delay)
            sleep(delay)
    raise EngineUnavailableError(f"{method} {url} failed after {policy.max_retries + 1} attempts; last error: "
                                 f"{last_error}")
