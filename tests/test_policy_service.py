"""The policy service over real HTTP: a tiny policy on a local Ray Serve instance (ray_local), httpx clients.

One app (API key on, an OpenAI-compatible stub as its target) serves most tests; a second, keyless app
without a target checks the 503. Both live under their own route prefixes and are deleted at the end.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from qpo_ray.config import load_config
from qpo_ray.policy import QPOPolicy, generate_prompts

pytestmark = pytest.mark.slow

KEY_ENV = "QPO_TEST_SERVE_KEY"
KEY = "s3cret-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_Q, MAX_CHARS = 4, 200
QUERIES = ["I finally got the job I wanted!", "My dog died last night.", "Someone keyed my car again.",
           "There is a noise downstairs and I am home alone.", "We won the final!", "ok"]
# Raw bodies (a JSON encoder would refuse most of them), each the client's fault: 422 with a JSON body.
POISON = [
    b'{"query": "bad \\ud800"}',
    b'{"queries": ["fine", "bad \\udfff"]}',
    b'{"query": "a", "target_reward": 1e308}',
    b'{"query": "a", "target_reward": NaN}',
    b'{"query": "a", "target_reward": 1e400}',
    b'{"query": "a", "target_reward": -Infinity}',
    b'{"query": "a", "target_reward": -1e6}',
    b'{"query": "a", "target_reward": 100.5}',
    b'{"query": ""}',
    b'{"queries": ["ok", "  \\t\\n "]}',
    b'{"query": "a", "task": "x\\ud800"}',
    b'{"query": "a", "bad\\ud800key": 1}',
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _StubTarget:
    """An OpenAI-compatible /v1/completions server in a thread; records what it was asked."""

    def __init__(self):
        import uvicorn
        from fastapi import FastAPI

        self.calls: list[dict] = []
        app = FastAPI()

        @app.post("/v1/completions")
        def completions(body: dict) -> dict:
            self.calls.append(body)
            return {"choices": [{"text": " joy", "index": 0}], "model": body.get("model")}

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _deploy(app, name: str, prefix: str, port: int) -> str:
    from ray import serve

    serve.run(app, name=name, route_prefix=prefix)
    return f"http://127.0.0.1:{port}{prefix}"


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("served") / "policy"
    QPOPolicy.from_config(load_config("tiny").policy).save(d)
    return d


@pytest.fixture(scope="module")
def service(ray_local, policy_dir):
    """Base URL of the keyed app; Serve is started on a free port unless another test already runs it."""
    from ray import serve

    from qpo_ray.serve.app import http_address, make_app

    stub = _StubTarget()
    running = http_address()
    port = running[1] if running else _free_port()
    if running is None:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = load_config("tiny", [
        "serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.5", f"serve.max_queries_per_request={MAX_Q}",
        f"serve.max_query_chars={MAX_CHARS}", f"serve.api_key_env={KEY_ENV}",
        "target.engine=openai", "target.model=stub-llm", f"target.base_url=http://127.0.0.1:{stub.port}/v1",
        "target.retries=0",
    ])
    # ray_local started before this test could export the key, so the replica gets it through its runtime_env
    # (in production the variable is set on every node, e.g. from a Kubernetes Secret).
    app = make_app(policy_dir, cfg, ray_actor_options={"runtime_env": {"env_vars": {KEY_ENV: KEY}}})
    try:
        yield {"url": _deploy(app, "qpo-policy-test", "/policy-test", port), "port": port, "stub": stub}
    finally:
        serve.delete("qpo-policy-test")
        if running is None:
            serve.shutdown()
        stub.stop()


def _post(url: str, body, headers=AUTH, **kw) -> httpx.Response:
    return httpx.post(url, json=body, headers=headers, timeout=60, **kw)


def _post_raw(url: str, body: bytes) -> httpx.Response:
    return httpx.post(url, content=body, headers={**AUTH, "content-type": "application/json"}, timeout=60)


def _strict_json(text: str):
    """The body parsed as standard JSON: Python's parser would also take NaN and Infinity."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_one_and_many_queries(service, policy_dir):
    url = service["url"] + "/v1/prompts"
    r = _post(url, {"query": QUERIES[0]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"prompts", "policy", "task", "target_reward"}
    assert body["policy"] == "policy" and body["task"] == "emotion" and body["target_reward"] == 100.0
    assert [p["query"] for p in body["prompts"]] == [QUERIES[0]]
    assert isinstance(body["prompts"][0]["prompt"], str)

    r = _post(url, {"queries": QUERIES[:MAX_Q], "task": "emotion", "target_reward": 55.5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["target_reward"] == 55.5
    assert [p["query"] for p in body["prompts"]] == QUERIES[:MAX_Q]
    # Same prompts as generating locally with the same policy files (greedy is deterministic).
    local = generate_prompts(QPOPolicy.load(policy_dir), QUERIES[:MAX_Q], target_reward=55.5)
    assert [p["prompt"] for p in body["prompts"]] == local


def test_concurrent_requests_are_batched(service, policy_dir):
    url = service["url"] + "/v1/prompts"
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda q: _post(url, {"query": q}), QUERIES + QUERIES[:2]))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    # Each request gets its own query's prompt back, whatever batch it rode in.
    expected = dict(zip(QUERIES, generate_prompts(QPOPolicy.load(policy_dir), QUERIES), strict=True))
    for q, r in zip(QUERIES + QUERIES[:2], responses, strict=True):
        assert r.json()["prompts"] == [{"query": q, "prompt": expected[q]}]
    health = httpx.get(service["url"] + "/healthz", timeout=30).json()
    assert health["max_batch_seen"] > 1, health
    assert health["max_batch_size"] == 8


@pytest.mark.parametrize("body", [
    {}, {"queries": []}, {"queries": [1, 2]}, {"query": 5}, {"query": "a", "queries": ["b"]},
    {"query": "a", "target_reward": "high"}, {"query": "a", "unknown": 1}, {"queries": "not a list"},
    {"query": "a", "task": "some_other_task"}, ["a list"],
])
def test_malformed_input_is_422(service, body):
    r = _post(service["url"] + "/v1/prompts", body)
    assert r.status_code == 422, (body, r.text)


@pytest.mark.parametrize("body", POISON, ids=lambda b: b.decode())
def test_poison_input_is_422_with_a_json_body(service, body):
    r = _post_raw(service["url"] + "/v1/prompts", body)
    assert r.status_code == 422, (body, r.status_code, r.text)
    detail = _strict_json(r.text)["detail"]
    assert detail, r.text


def test_poison_requests_never_fail_valid_ones(service, policy_dir):
    """30 valid requests and the poison ones, interleaved and concurrent, for three rounds: every valid request
    gets 200 and its own prompt, every poison one 422."""
    url = service["url"] + "/v1/prompts"
    valid = [f"{QUERIES[i % len(QUERIES)]} (case {i})" for i in range(30)]
    expected = dict(zip(valid, generate_prompts(QPOPolicy.load(policy_dir), valid), strict=True))
    jobs = [("valid", q) for q in valid] + [("poison", b) for b in POISON]
    rng = random.Random(0)
    for _ in range(3):
        rng.shuffle(jobs)
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(
                lambda job: _post(url, {"query": job[1]}) if job[0] == "valid" else _post_raw(url, job[1]), jobs))
        for (kind, what), r in zip(jobs, responses, strict=True):
            if kind == "valid":
                assert r.status_code == 200, (what, r.text)
                assert r.json()["prompts"] == [{"query": what, "prompt": expected[what]}]
            else:
                assert r.status_code == 422 and _strict_json(r.text)["detail"], (what, r.status_code, r.text)
    health = httpx.get(service["url"] + "/healthz", timeout=30).json()
    assert health["max_batch_seen"] > 1, health


def test_a_request_that_fails_in_generation_fails_alone(policy_dir):
    """Past the request checks, inside one batch: requests the policy cannot encode or compute get their own
    error, their batch mates their prompts (the replica's batch function behind the replica's batcher)."""
    from qpo_ray.score.batcher import EngineBatcher
    from qpo_ray.serve.deployment import generate_batch

    policy = QPOPolicy.load(policy_dir)
    cfg = load_config("tiny")
    batcher = EngineBatcher(lambda items: generate_batch(policy, items, cfg), max_batch_size=16, wait_s=0.2)
    items = [([QUERIES[0]], 100.0), (["bad \ud800"], 100.0), (QUERIES[1:3], 100.0), ([QUERIES[3]], 1e308),
             ([QUERIES[4]], 100.0)]

    async def main():
        return await asyncio.gather(*(batcher.submit(it) for it in items), return_exceptions=True)

    out = asyncio.run(main())
    assert isinstance(out[1], Exception) and isinstance(out[3], Exception), out
    local = generate_prompts(policy, [QUERIES[0], *QUERIES[1:3], QUERIES[4]])
    assert [out[0], out[2], out[4]] == [local[:1], local[1:3], local[3:]]


def test_generate_batch_serves_the_configured_method(tmp_path):
    """The service's method (eval.method) is the evaluation's: the policy's own prompt (greedy or beam),
    best-of-N by r̂, or the policy's training prompts reranked by r̂."""
    from qpo_ray.policy.generate import best_of_n, rerank
    from qpo_ray.serve.deployment import generate_batch

    cfg = load_config("tiny", ["policy.reward_head=last_prompt"])
    policy = QPOPolicy.from_config(cfg.policy, seed=0).eval()
    items = [(QUERIES[:2], 100.0), (QUERIES[2:3], 40.0)]
    got = generate_batch(policy, items, cfg)
    assert got == [generate_prompts(policy, QUERIES[:2]), generate_prompts(policy, QUERIES[2:3], target_reward=40.0)]
    beam = load_config("tiny", ["policy.reward_head=last_prompt", "eval.num_beams=3"])
    assert generate_batch(policy, items[:1], beam) == [generate_prompts(policy, QUERIES[:2], num_beams=3)]
    bon = load_config("tiny", ["policy.reward_head=last_prompt", "eval.method=best_of_n", "eval.best_of_n=3"])
    assert generate_batch(policy, items[:1], bon) == [best_of_n(policy, QUERIES[:2], 3, top_k=bon.collect.top_k,
                                                                top_p=bon.collect.top_p, seed=0)]
    rr = load_config("tiny", ["policy.reward_head=last_prompt", "eval.method=rerank"])
    cands = ["Be brief.", "Answer in one word.", ""]
    out = generate_batch(policy, items, rr, cands)
    assert out == [rerank(policy, QUERIES[:2], [cands] * 2), rerank(policy, QUERIES[2:3], [cands])]
    assert all(p in cands for ps in out for p in ps)


def test_not_json_is_422(service):
    r = httpx.post(service["url"] + "/v1/prompts", content=b"not json", timeout=30,
                   headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 422


def test_over_limit_is_413(service):
    url = service["url"] + "/v1/prompts"
    r = _post(url, {"queries": ["q"] * (MAX_Q + 1)})
    assert r.status_code == 413 and "max_queries_per_request" in r.json()["detail"]
    r = _post(url, {"query": "x" * (MAX_CHARS + 1)})
    assert r.status_code == 413 and "max_query_chars" in r.json()["detail"]
    huge = {"query": "a", "pad": "x" * 200_000}  # over the body bound: rejected before parsing
    assert _post(url, huge).status_code == 413

    def chunks():  # no Content-Length: counted while streaming
        yield b'{"query": "'
        for _ in range(50):
            yield b"y" * 4096
        yield b'"}'
    r = httpx.post(url, content=chunks(), headers={**AUTH, "content-type": "application/json"}, timeout=30)
    assert r.status_code == 413


def test_api_key(service):
    url = service["url"] + "/v1/prompts"
    assert _post(url, {"query": "hi"}, headers={}).status_code == 401
    assert _post(url, {"query": "hi"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert _post(url, {"query": "hi"}, headers={"X-API-Key": "wrong"}).status_code == 401
    assert _post(url, {"query": "hi"}, headers={"X-API-Key": KEY}).status_code == 200
    assert _post(url, {"query": "hi"}).status_code == 200
    assert httpx.get(service["url"] + "/healthz", timeout=30).json()["auth"] is True


def test_answer_asks_the_target(service):
    stub = service["stub"]
    stub.calls.clear()
    r = _post(service["url"] + "/v1/answer", {"queries": QUERIES[:2]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["target"] == "stub-llm" and [a["answer"] for a in body["answers"]] == [" joy", " joy"]
    sent = sorted(c["prompt"] for c in stub.calls)
    assert sent == sorted(a["input"] for a in body["answers"])
    for a in body["answers"]:  # the emotion template around the policy's prompt and the query
        assert a["input"].endswith(f"Text: {a['query']}\nEmotion:")
        assert a["prompt"] in a["input"]
    assert all(c["temperature"] == 0.0 and c["model"] == "stub-llm" for c in stub.calls)


def test_answer_without_target_is_503(service, policy_dir):
    from ray import serve

    from qpo_ray.serve.app import make_app

    cfg = load_config("tiny")  # target.engine = transformers: nothing to call over HTTP
    url = _deploy(make_app(policy_dir, cfg), "qpo-policy-test-503", "/policy-test-503", service["port"])
    try:
        r = httpx.post(url + "/v1/answer", json={"query": "hi"}, timeout=60)
        assert r.status_code == 503 and "target.engine" in r.json()["detail"]
        assert httpx.get(url + "/healthz", timeout=30).json()["auth"] is False
    finally:
        serve.delete("qpo-policy-test-503")


def test_healthz_and_openapi(service):
    h = httpx.get(service["url"] + "/healthz", timeout=30)
    assert h.status_code == 200 and h.json()["status"] == "ok"
    spec = httpx.get(service["url"] + "/openapi.json", timeout=30).json()
    assert "/v1/prompts" in spec["paths"] and "/v1/answer" in spec["paths"]
    assert "PromptRequest" in spec["components"]["schemas"]
    assert httpx.get(service["url"] + "/docs", timeout=30).status_code == 200


def test_build_app_args(policy_dir):
    from ray.serve import Application

    from qpo_ray.errors import QPOError
    from qpo_ray.serve.app import build_app

    app = build_app({"policy_dir": str(policy_dir), "config": "tiny",
                     "overrides": "serve.num_replicas=2 serve.max_batch_size=4"})
    assert isinstance(app, Application)
    with pytest.raises(QPOError, match="unknown argument"):
        build_app({"policy_dir": str(policy_dir), "polcy": 1})
    with pytest.raises(QPOError, match="not a saved QPO policy"):
        build_app({"policy_dir": str(policy_dir.parent)})
