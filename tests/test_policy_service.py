"""The policy service over real HTTP: a tiny policy on a local Ray Serve instance (ray_local), httpx clients.

One app (API key on, the OpenAI-compatible serve-target server on a tiny Llama as its target) serves most
tests; a second, keyless app without a target checks the 503. The target lives at ``/``, the apps under their
own route prefixes; all are deleted at the end. Parity with an evaluation: ``test_serve_parity``.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import pytest

from qpo_ray.config import TargetConfig, load_config
from qpo_ray.policy import QPOPolicy, generate_prompts
from qpo_ray.policy.inference import InferenceSettings, policy_prompts
from qpo_ray.policy.served import load_served

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


TARGET = dict(engine="openai", model="tiny-llama", max_length=256, max_new_tokens=6, retries=0)


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
    """Base URL of the keyed app and of its target; Serve is started on a free port unless another test
    already runs it."""
    from ray import serve

    from qpo_ray.score.server import APP_NAME as TARGET_APP
    from qpo_ray.score.server import serve_target
    from qpo_ray.serve.app import http_address, make_app

    running = http_address()
    port = running[1] if running else _free_port()
    started = running is None
    target_url = serve_target(TargetConfig(**{**TARGET, "engine": "transformers"}), "127.0.0.1", port)
    served = load_served(policy_dir, "tiny", [
        "serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.5", f"serve.max_queries_per_request={MAX_Q}",
        f"serve.max_query_chars={MAX_CHARS}", f"serve.api_key_env={KEY_ENV}",
        *(f"target.{k}={v}" for k, v in TARGET.items()), f"target.base_url={target_url}",
    ])
    # ray_local started before this test could export the key, so the replica gets it through its runtime_env
    # (in production the variable is set on every node, e.g. from a Kubernetes Secret).
    app = make_app(policy_dir, served, ray_actor_options={"runtime_env": {"env_vars": {KEY_ENV: KEY}}})
    try:
        yield {"url": _deploy(app, "qpo-policy-test", "/policy-test", port), "port": port, "target": target_url}
    finally:
        serve.delete("qpo-policy-test")
        serve.delete(TARGET_APP)
        if started:
            serve.shutdown()


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
    settings = InferenceSettings.from_config(load_config("tiny"))
    batcher = EngineBatcher(lambda items: generate_batch(policy, items, settings), max_batch_size=16, wait_s=0.2)
    items = [([QUERIES[0]], 100.0), (["bad \ud800"], 100.0), (QUERIES[1:3], 100.0), ([QUERIES[3]], 1e308),
             ([QUERIES[4]], 100.0)]

    async def main():
        return await asyncio.gather(*(batcher.submit(it) for it in items), return_exceptions=True)

    out = asyncio.run(main())
    assert isinstance(out[1], Exception) and isinstance(out[3], Exception), out
    local = generate_prompts(policy, [QUERIES[0], *QUERIES[1:3], QUERIES[4]])
    assert [out[0], out[2], out[4]] == [local[:1], local[1:3], local[3:]]


def test_generate_batch_is_policy_prompts_per_target_reward():
    """The service's batch function adds no method choice of its own: each distinct target reward of a batch is
    one ``policy_prompts`` call with the served settings, whatever the method."""
    from qpo_ray.serve.deployment import generate_batch

    cfg = load_config("tiny", ["policy.reward_head=last_prompt", "eval.best_of_n=3", "seed=3"])
    policy = QPOPolicy.from_config(cfg.policy, seed=0).eval()
    base = InferenceSettings.from_config(cfg, candidates=("Be brief.", "Answer in one word.", ""),
                                         default_prompt="Be brief.", margin=0.01)
    items = [(QUERIES[:2], 100.0), (QUERIES[2:3], 40.0), (QUERIES[3:4], 100.0)]
    for method in ("greedy", "best_of_n", "rerank"):
        s = replace(base, method=method)
        at_100 = policy_prompts(policy, [*QUERIES[:2], QUERIES[3]], s)
        at_40 = policy_prompts(policy, QUERIES[2:3], replace(s, target_reward=40.0))
        assert generate_batch(policy, items, s) == [at_100[:2], at_40, at_100[2:]], method


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


def test_answer_is_the_label_the_scoring_engine_predicts(service):
    """Classification: /v1/answer returns, per query, the label the scoring engine predicts (Components.pred) for
    that prompt and query on the same target, with every label's score."""
    from qpo_ray.score.engines.base import ScoreRequest
    from qpo_ray.score.engines.openai_engine import OpenAIEngine
    from qpo_ray.tasks import load_task

    r = _post(service["url"] + "/v1/answer", {"queries": QUERIES[:MAX_Q]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "label" and body["target"] == "tiny-llama" and body["task"] == "emotion"
    task = load_task("emotion")
    engine = OpenAIEngine(TargetConfig(**TARGET, base_url=service["target"]), task)
    try:
        # Any gold label: the prediction does not depend on it.
        scored = engine.score([ScoreRequest("emotion", "zero_shot", a["query"], a["prompt"], task.labels[0])
                               for a in body["answers"]])
    finally:
        engine.close()
    assert [a["query"] for a in body["answers"]] == QUERIES[:MAX_Q]
    for a, c in zip(body["answers"], scored, strict=True):
        assert a["answer"] == c.pred and a["reply"] is None
        assert set(a["label_scores"]) == set(task.labels) and a["score"] == max(a["label_scores"].values())
        assert a["input"] == task.render(a["prompt"], a["query"])


def test_math_answer_is_the_number_scoring_extracts(service):
    """Math: the target's greedy reply and the number scoring extracts from it (the engine's math call)."""
    from qpo_ray.score.engines.base import ScoreRequest
    from qpo_ray.score.engines.openai_engine import OpenAIEngine
    from qpo_ray.serve.answer import answer_mode, read_answer
    from qpo_ray.tasks import load_task

    task = load_task("math_demo")
    engine = OpenAIEngine(TargetConfig(**TARGET, base_url=service["target"]), task)
    try:
        for q, gold in task.queries()[:2]:
            got = read_answer(engine, task, task.render("Think, then answer.", q))
            c = engine.score_one(ScoreRequest("math_demo", "zero_shot", q, "Think, then answer.", gold))
            assert got == {"answer": c.pred, "reply": c.reply}
    finally:
        engine.close()
    assert answer_mode(task) == "math" and answer_mode(load_task("emotion")) == "label"


def test_answer_without_target_is_503(service, policy_dir):
    from ray import serve

    from qpo_ray.serve.app import make_app

    served = load_served(policy_dir, "tiny")  # target.engine = transformers: nothing to call over HTTP
    url = _deploy(make_app(policy_dir, served), "qpo-policy-test-503", "/policy-test-503", service["port"])
    try:
        r = httpx.post(url + "/v1/answer", json={"query": "hi"}, timeout=60)
        assert r.status_code == 503 and "target.engine" in r.json()["detail"]
        assert httpx.get(url + "/healthz", timeout=30).json()["auth"] is False
    finally:
        serve.delete("qpo-policy-test-503")


def test_a_hung_target_does_not_take_the_service_down(service, policy_dir):
    """A target that accepts connections and never answers, 40 concurrent /v1/answer calls (each would retry
    4 × 60 s): /healthz answers within 1 s and /v1/prompts within 2 s throughout, and every answer is a 504
    once serve.answer_timeout_s has passed."""
    from ray import serve

    from qpo_ray.serve.app import make_app
    from tests.test_serve_guards import hung_target

    deadline_s = 4.0
    with hung_target() as url:
        served = load_served(policy_dir, "tiny", [
            "serve.batch_wait_timeout_s=0.01", f"serve.answer_timeout_s={deadline_s}", "target.engine=openai",
            f"target.base_url={url}", "target.model=m", "target.timeout_s=60", "target.retries=3"])
        base = _deploy(make_app(policy_dir, served), "qpo-policy-test-hung", "/policy-test-hung", service["port"])
        try:
            with ThreadPoolExecutor(42) as pool:
                t0 = time.monotonic()
                def timed_answer(i):
                    s = time.monotonic()
                    r = httpx.post(base + "/v1/answer", json={"query": f"q {i}"}, timeout=60)
                    return r, time.monotonic() - s

                answers = [pool.submit(timed_answer, i) for i in range(40)]
                time.sleep(1.0)  # the answers' own prompts made: from here on they wait on the target
                waits = {"/healthz": [], "/v1/prompts": []}
                while not all(a.done() for a in answers) and time.monotonic() - t0 < 30:
                    for path in waits:
                        s = time.monotonic()
                        r = (httpx.get(base + path, timeout=30) if path == "/healthz"
                             else httpx.post(base + path, json={"query": "hi"}, timeout=30))
                        assert r.status_code == 200, r.text
                        waits[path].append(time.monotonic() - s)
                    time.sleep(0.2)
                done = [a.result() for a in answers]
        finally:
            serve.delete("qpo-policy-test-hung")
    took = [t for _, t in done]
    print(f"hung target: 40 answers {sorted({r.status_code for r, _ in done})} in {min(took):.2f}-{max(took):.2f} s "
          f"(deadline {deadline_s:g} s); /healthz max {max(waits['/healthz']):.3f} s over "
          f"{len(waits['/healthz'])}, /v1/prompts max {max(waits['/v1/prompts']):.3f} s over "
          f"{len(waits['/v1/prompts'])}")
    assert [r.status_code for r, _ in done] == [504] * 40, [(r.status_code, r.text[:200]) for r, _ in done]
    assert len(waits["/healthz"]) >= 3 and max(waits["/healthz"]) < 1.0, waits
    assert max(waits["/v1/prompts"]) < 2.0, waits
    assert max(took) < deadline_s + 10, took  # the deadline and a loaded machine's slack


def test_healthz_and_openapi(service):
    h = httpx.get(service["url"] + "/healthz", timeout=30)
    assert h.status_code == 200 and h.json()["status"] == "ok"
    # The settings it serves and where they came from; this folder was never evaluated, and says so.
    info = h.json()["inference"]
    assert h.json()["method"] == info["method"] == "greedy" and info["missing"] == ["inference.json"]
    assert info["sources"]["method"] == "eval.method of --config tiny" and info["default_prompt"] is None
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
