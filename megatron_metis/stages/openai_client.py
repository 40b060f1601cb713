"""A small OpenAI-compatible chat client (stdlib ``urllib``): retries, rate limit, disk cache.

- The API key is read from an environment variable and sent only in the ``Authorization``
  header; every message this module logs or raises is passed through ``redact``, and the cache
  never stores request headers, so the key reaches no log, exception or file.
- Retries: 429, 5xx, timeouts and connection errors are retried up to ``max_retries`` times,
  with exponential backoff (``backoff_s`` doubling, at most ``max_backoff_s``; a larger
  ``Retry-After`` header wins). Other 4xx fail at once (``RequestRejected``).
- Rate limit: request starts are spaced at least ``60 / requests_per_minute`` seconds.
- Cache: every successful answer is stored under ``cache_dir`` keyed by the SHA-256 of the
  request body (endpoint, model, messages, sampling), written atomically; a re-run after an
  interruption asks the server only for what is not cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from megatron_metis.config.stages import ExpertConfig
from megatron_metis.stages.runner import atomic_write_json

logger = logging.getLogger(__name__)

_RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class ChatError(RuntimeError):
    """A chat request failed for good after its retries (the message is redacted)."""


class RequestRejected(ChatError):
    """The server refused a request with a non-retryable status (e.g. 400): not worth a retry."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class RateLimiter:
    """Spaces successive ``wait()`` returns at least ``60 / requests_per_minute`` seconds."""

    def __init__(
        self,
        requests_per_minute: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.interval = 60.0 / requests_per_minute if requests_per_minute > 0 else 0.0
        self._clock = clock
        self._sleep = sleep
        self._next = -float("inf")

    def wait(self) -> None:
        now = self._clock()
        if now < self._next:
            self._sleep(self._next - now)
            now = self._clock()
        self._next = max(now, self._next) + self.interval


class OpenAIChatClient:
    """``POST {base_url}/chat/completions`` with retries, rate limiting and an on-disk cache.

    Args:
        cfg: the ``expert`` config section (endpoint, model, retries, rate, timeout, sampling).
        cache_dir: cache folder (created).
        api_key: the key; by default read from ``os.environ[cfg.api_key_env]`` (unset: no
            Authorization header, for local servers).
        sleep / clock: injectable for tests.
    """

    def __init__(
        self,
        cfg: ExpertConfig,
        *,
        cache_dir: str | Path,
        api_key: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.cache_dir = Path(cache_dir)
        self._key = api_key if api_key is not None else os.environ.get(cfg.api_key_env) or None
        self._sleep = sleep
        self._limiter = RateLimiter(cfg.requests_per_minute, clock=clock, sleep=sleep)
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0, "failures": 0}

    def redact(self, text: str) -> str:
        """``text`` with the API key replaced by ``***``."""
        return text.replace(self._key, "***") if self._key else text

    def request_body(self, messages: Sequence[Mapping[str, Any]], *, n: int) -> dict[str, Any]:
        """The JSON body of a chat request."""
        body: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": list(messages),
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        }
        if n > 1:
            body["n"] = n
        return body

    def cache_path(self, body: Mapping[str, Any]) -> Path:
        payload = json.dumps({"url": self.url, "body": body}, sort_keys=True, ensure_ascii=False)
        key = hashlib.sha256(payload.encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.json"

    def chat(self, messages: Sequence[Mapping[str, Any]], *, n: int = 1) -> list[str]:
        """The assistant texts of ``n`` choices (from the cache when it has them).

        Raises:
            RequestRejected: a non-retryable 4xx.
            ChatError: retries exhausted (429 / 5xx / timeout / connection errors).
        """
        body = self.request_body(messages, n=n)
        path = self.cache_path(body)
        if path.is_file():
            self.stats["cache_hits"] += 1
            return list(json.loads(path.read_text())["texts"])
        texts = self._post_with_retries(body)
        atomic_write_json(path, {"model": self.cfg.model, "texts": texts})
        return texts

    def _post_with_retries(self, body: Mapping[str, Any]) -> list[str]:
        data = json.dumps(body).encode()
        for attempt in range(self.cfg.max_retries + 1):
            self._limiter.wait()
            self.stats["requests"] += 1
            try:
                return self._post(data)
            except urllib.error.HTTPError as err:
                detail = self._error_text(err)
                if err.code not in _RETRY_STATUSES:
                    self.stats["failures"] += 1
                    raise RequestRejected(detail, err.code) from None
                delay = self._retry_delay(attempt, err.headers.get("Retry-After"))
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                detail = self.redact(f"{self.url}: {type(err).__name__}: {err}")
                delay = self._retry_delay(attempt, None)
            if attempt == self.cfg.max_retries:
                break
            self.stats["retries"] += 1
            logger.warning(
                "chat request failed (%s); retry %d in %.1fs", detail, attempt + 1, delay
            )
            self._sleep(delay)
        self.stats["failures"] += 1
        raise ChatError(f"giving up after {self.cfg.max_retries + 1} attempts: {detail}")

    def _post(self, data: bytes) -> list[str]:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
            raw = response.read().decode(errors="replace")
        try:
            payload = json.loads(raw)
            return [str(choice["message"]["content"] or "") for choice in payload["choices"]]
        except (KeyError, TypeError, ValueError) as err:
            raise ChatError(self.redact(f"malformed response from {self.url}: {err}")) from None

    def _error_text(self, err: urllib.error.HTTPError) -> str:
        try:
            body = err.read().decode(errors="replace")[:300]
        except OSError:
            body = ""
        return self.redact(f"{self.url}: HTTP {err.code}: {body}")

    def _retry_delay(self, attempt: int, retry_after: str | None) -> float:
        delay = min(self.cfg.backoff_s * 2**attempt, self.cfg.max_backoff_s)
        if retry_after:
            try:
                delay = max(delay, min(float(retry_after), self.cfg.max_backoff_s))
            except ValueError:
                pass
        return delay
