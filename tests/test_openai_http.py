"""The one OpenAI-compatible HTTP client: what it retries, what it returns, how it gives up (sync and async)."""

import asyncio

import httpx
import pytest

from qpo_ray import openai_http
from qpo_ray.openai_http import TargetUnreachable, apost_json, auth_headers, backoff_s, post_json


def _replies(*statuses: int):
    seen: list[int] = []

    def handle(request: httpx.Request) -> httpx.Response:
        status = statuses[len(seen)]
        seen.append(status)
        return httpx.Response(status, json={"ok": status})

    return handle, seen


@pytest.fixture(autouse=True)
def _no_wait(monkeypatch):
    monkeypatch.setattr(openai_http, "BACKOFF_S", 0.0)


def test_sync_retries_429_and_5xx_then_returns_the_answer():
    handle, seen = _replies(429, 503, 200)
    with httpx.Client(base_url="http://t/v1", transport=httpx.MockTransport(handle)) as c:
        r = post_json(c, "/completions", {}, retries=3)
    assert (r.status_code, seen) == (200, [429, 503, 200])


def test_sync_returns_a_4xx_unretried():
    handle, seen = _replies(400, 200)
    with httpx.Client(base_url="http://t/v1", transport=httpx.MockTransport(handle)) as c:
        assert post_json(c, "/completions", {}, retries=3).status_code == 400
    assert seen == [400]


def test_async_gives_up_after_the_bounded_attempts():
    handle, seen = _replies(500, 429, 502)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as c:
            return await apost_json(c, "http://t/v1/completions", {}, retries=2)

    with pytest.raises(TargetUnreachable, match=r"http://t/v1/completions unreachable after 3 attempt\(s\): HTTP 502"):
        asyncio.run(go())
    assert seen == [500, 429, 502]


def test_transport_errors_are_retried():
    calls = []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={})

    with httpx.Client(base_url="http://t/v1", transport=httpx.MockTransport(handle)) as c:
        assert post_json(c, "/completions", {}, retries=1).status_code == 200
    assert len(calls) == 2


def test_backoff_doubles_with_bounded_jitter(monkeypatch):
    monkeypatch.setattr(openai_http, "BACKOFF_S", 0.5)
    for attempt, base in [(1, 0.5), (2, 1.0), (3, 2.0), (10, openai_http.BACKOFF_MAX_S)]:
        waits = [backoff_s(attempt) for _ in range(50)]
        assert all(base <= w <= base * (1 + openai_http.JITTER) for w in waits)
        assert len(set(waits)) > 1  # jittered, not a fixed schedule


def test_auth_headers(monkeypatch):
    monkeypatch.setenv("QPO_TEST_KEY", "k")
    assert auth_headers("QPO_TEST_KEY") == {"Authorization": "Bearer k"}
    monkeypatch.setenv("QPO_TEST_KEY", "")
    assert auth_headers("QPO_TEST_KEY") == {}
