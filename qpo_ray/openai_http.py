"""The one HTTP client for OpenAI-compatible servers, sync and async, with one retry policy.

Retried: transport errors (connect/read errors, timeouts), 429 and 5xx, up to ``retries + 1`` attempts with
exponential backoff and jitter (so many clients that were refused together do not come back together).
Anything else is the server's answer and goes back to the caller, who decides what it means: the scoring
engine raises ``TargetError``, the policy service answers 502.

A caller with a total deadline (a ``time.monotonic()`` instant: the policy service's ``/v1/answer``) passes it
along: no attempt or backoff wait runs past it, each attempt's timeouts are cut to the time left, and the
call ends in ``TargetTimeout`` once it has passed.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from collections.abc import Callable, Generator
from typing import Any

import httpx

from qpo_ray.errors import TargetError

BACKOFF_S = 0.5  # the first retry's wait; each later one doubles it
BACKOFF_MAX_S = 8.0
JITTER = 0.25  # up to +25% on each wait


class TargetUnreachable(TargetError):
    """Every attempt failed with a retryable error; ``last`` describes the final one."""

    def __init__(self, url: str, attempts: int, last: str):
        super().__init__(f"{url} unreachable after {attempts} attempt(s): {last}")
        self.url, self.attempts, self.last = url, attempts, last


class TargetTimeout(TargetError):
    """The caller's deadline passed before the target answered."""

    def __init__(self, url: str, attempts: int, last: str):
        super().__init__(f"{url} did not answer before the deadline ({attempts} attempt(s); last: {last or 'none'})")
        self.url, self.attempts, self.last = url, attempts, last


def auth_headers(api_key_env: str) -> dict[str, str]:
    """``Authorization: Bearer`` from the variable ``api_key_env`` names; none when it is unset or empty."""
    key = os.environ.get(api_key_env, "") if api_key_env else ""
    return {"Authorization": f"Bearer {key}"} if key else {}


def backoff_s(attempt: int) -> float:
    """Seconds to wait before attempt number ``attempt`` (1 = the first retry)."""
    return min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (attempt - 1)) * (1 + random.random() * JITTER)


def retryable(resp: httpx.Response) -> bool:
    return resp.status_code == 429 or resp.status_code >= 500


def _describe(outcome: httpx.Response | httpx.TransportError) -> str:
    if isinstance(outcome, httpx.Response):
        return f"HTTP {outcome.status_code}: {outcome.text[:200]}"
    return f"{type(outcome).__name__}: {outcome}"


def _full_url(client: httpx.Client | httpx.AsyncClient, url: str) -> str:
    # httpx appends a relative path to the base URL's path (``URL.join`` would replace it): say the same here.
    return url if "://" in url else str(client.base_url).rstrip("/") + "/" + url.lstrip("/")


# The policy is written once, as a generator: it yields how long to wait before each attempt, is sent that
# attempt's outcome, and returns the final response (or raises). The sync and async callers only do the I/O.
Outcome = httpx.Response | httpx.TransportError


def _left(deadline: float | None) -> float:
    return math.inf if deadline is None else deadline - time.monotonic()


def _policy(url: str, retries: int, deadline: float | None = None) -> Generator[float, Outcome, httpx.Response]:
    last = ""
    for attempt in range(retries + 1):
        wait = backoff_s(attempt) if attempt else 0.0
        if _left(deadline) <= wait:  # no time left for this attempt
            raise TargetTimeout(url, attempt, last)
        outcome = yield wait
        if isinstance(outcome, httpx.Response) and not retryable(outcome):
            return outcome
        last = _describe(outcome)
        if _left(deadline) <= 0:
            raise TargetTimeout(url, attempt + 1, last)
    raise TargetUnreachable(url, retries + 1, last)


def _timeout(client: httpx.Client | httpx.AsyncClient, deadline: float | None) -> Any:
    """The client's timeouts, each cut to the time left before ``deadline``."""
    if deadline is None:
        return httpx.USE_CLIENT_DEFAULT
    left = max(_left(deadline), 0.001)
    t = client.timeout
    return httpx.Timeout(connect=min(t.connect or left, left), read=min(t.read or left, left),
                         write=min(t.write or left, left), pool=min(t.pool or left, left))


def _attempt(send: Callable[[], httpx.Response]) -> Outcome:
    try:
        return send()
    except httpx.TransportError as e:  # connect/read errors and timeouts
        return e


def post_json(client: httpx.Client, url: str, body: dict[str, Any], retries: int,
              deadline: float | None = None) -> httpx.Response:
    """POST ``body`` to ``url`` (absolute or relative to the client's base URL) under the retry policy.

    Returns the first non-retryable response; raises ``TargetUnreachable`` when every attempt failed,
    ``TargetTimeout`` when ``deadline`` (``time.monotonic()``) passed first."""
    policy = _policy(_full_url(client, url), retries, deadline)
    try:
        wait = next(policy)
        while True:
            time.sleep(wait)
            wait = policy.send(_attempt(lambda: client.post(url, json=body, timeout=_timeout(client, deadline))))
    except StopIteration as done:
        return done.value


async def apost_json(client: httpx.AsyncClient, url: str, body: dict[str, Any], retries: int) -> httpx.Response:
    """``post_json`` for an ``httpx.AsyncClient``: the same policy, waiting without blocking the event loop."""
    policy = _policy(_full_url(client, url), retries)
    outcome: Outcome | None = None
    try:
        while True:
            await asyncio.sleep(next(policy) if outcome is None else policy.send(outcome))
            try:
                outcome = await client.post(url, json=body)
            except httpx.TransportError as e:
                outcome = e
    except StopIteration as done:
        return done.value


__all__ = ["TargetTimeout", "TargetUnreachable", "apost_json", "auth_headers", "backoff_s", "post_json", "retryable"]
