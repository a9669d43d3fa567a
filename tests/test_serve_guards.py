"""The policy service's guards, in-process (no Ray): the app of one replica (``build_api``) behind an ASGI
client, the CLI's ``serve`` refusals before anything starts, fair batching, the target deadline, and
schemathesis against the service's OpenAPI description. Over real Serve: ``test_policy_service``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from qpo_ray.cli import main
from qpo_ray.config import load_config
from qpo_ray.policy import QPOPolicy
from qpo_ray.policy.served import load_served

KEY_ENV = "QPO_TEST_GUARD_KEY"
KEY = "guard-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("guards") / "policy"
    QPOPolicy.from_config(load_config("tiny").policy).save(d)
    return d


@contextmanager
def _key(value: str | None = KEY):
    old = os.environ.get(KEY_ENV)
    if value is None:
        os.environ.pop(KEY_ENV, None)
    else:
        os.environ[KEY_ENV] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(KEY_ENV, None)
        else:
            os.environ[KEY_ENV] = old


def _app(policy_dir, *sets: str):
    """One replica's FastAPI app, keyed, with the tiny config and ``sets``."""
    from qpo_ray.serve.deployment import Replica, build_api

    served = load_served(policy_dir, "tiny", ["serve.batch_wait_timeout_s=0", f"serve.api_key_env={KEY_ENV}",
                                              "serve.max_queries_per_request=4", "serve.max_query_chars=200", *sets])
    with _key():
        return build_api(Replica(str(policy_dir), served.to_dict()))


@pytest.fixture(scope="module")
def app(policy_dir):
    return _app(policy_dir)


@contextmanager
def hung_target():
    """An OpenAI-compatible URL whose server accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(256)
    srv.settimeout(0.1)
    conns, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}/v1"
    finally:
        stop.set()
        t.join()
        for c in conns:
            c.close()
        srv.close()


@contextmanager
def echo_target():
    """A minimal OpenAI-compatible target: ``/v1/completions`` echoes each prompt, one token a character, every
    token at log-probability -1 (what ``OpenAIEngine.label_nlls`` reads)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Echo(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the handler's API)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            choices = [{"index": i, "text": t, "logprobs": {"text_offset": list(range(len(t))),
                                                             "token_logprobs": [None] + [-1.0] * (len(t) - 1)}}
                       for i, t in enumerate(prompts)]
            out = json.dumps({"choices": choices, "usage": {"total_tokens": 1}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


# -- the CLI refuses before anything starts ----------------------------------------------------------------
def _tampered(tmp_path, edit) -> str:
    from qpo_ray.policy.model import POLICY_CONFIG

    folder = tmp_path / "policy"
    QPOPolicy.from_config(load_config("tiny").policy).save(folder)
    meta = json.loads((folder / POLICY_CONFIG).read_text())
    edit(meta, folder)
    (folder / POLICY_CONFIG).write_text(json.dumps(meta))
    return str(folder)


def _truncate_weights(meta, folder):
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])


FOLDERS = {
    "no vocab_ids": (lambda m, f: m.pop("vocab_ids"), r"policy_config\.json: no 'vocab_ids'"),
    "policy without its model": (lambda m, f: m["policy"].pop("model"), r"'policy' lacks model \("),
    "policy without two keys": (lambda m, f: [m["policy"].pop(k) for k in ("prompt_vocab", "reward_head")],
                                r"'policy' lacks reward_head, prompt_vocab"),
    "truncated weights": (_truncate_weights, r"cannot rebuild the saved policy"),
}


@pytest.mark.parametrize("command", ["generate", "serve"])
@pytest.mark.parametrize("case", list(FOLDERS))
def test_a_damaged_policy_folder_is_one_line(case, command, tmp_path, capsys):
    edit, message = FOLDERS[case]
    folder = _tampered(tmp_path, edit)
    (tmp_path / "q.txt").write_text("hello\n")
    args = ["--in", str(tmp_path / "q.txt")] if command == "generate" else ["--port", str(_free_port())]
    ray_before = _ray_running()
    rc = main([command, "--policy", folder, *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("qpo-ray: error: ") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert _ray_running() == ray_before, "Ray was started before the folder was checked"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_refuses_a_bad_port_or_a_missing_key(policy_dir, capsys):
    ray_before = _ray_running()

    def serve(*args: str) -> str:
        rc = main(["serve", "--policy", str(policy_dir), *args])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("qpo-ray: error: ") and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
        return err

    assert re.search(r"serve\.port.*less than or equal to 65535", serve("--port", "70000"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert re.search(rf"127\.0\.0\.1:{port} is in use", serve("--port", str(port)))
    with _key(None):
        err = serve("--port", str(_free_port()), "--set", f"serve.api_key_env={KEY_ENV}")
        assert f"the variable {KEY_ENV} is unset" in err
    with _key(""):
        assert f"the variable {KEY_ENV} is empty" in serve("--set", f"serve.api_key_env={KEY_ENV}")
    assert re.search(r"'serve\.api_key_env': String should match pattern", serve("--set", 'serve.api_key_env=""'))
    assert _ray_running() == ray_before, "Ray was started before the mistake was found"


def test_a_replica_without_its_key_does_not_start(policy_dir):
    """Where the key must come from the replica's own environment (a cluster node), a replica that lacks it
    fails to start instead of serving without a key."""
    from qpo_ray.errors import ConfigError
    from qpo_ray.serve.deployment import Replica

    served = load_served(policy_dir, "tiny", [f"serve.api_key_env={KEY_ENV}"])
    with _key(None), pytest.raises(ConfigError, match=f"{KEY_ENV} is unset"):
        Replica(str(policy_dir), served.to_dict())


# -- requests ----------------------------------------------------------------------------------------------
def _post(app, path: str, body: bytes, headers=AUTH) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as c:
            return await c.post(path, content=body, headers={**headers, "content-type": "application/json"})

    return asyncio.run(go())


BODIES = {
    "duplicate key": (b'{"query": "a", "query": "b"}', 422, r"key 'query' appears twice"),
    "duplicate key, nested in a list": (b'{"queries": ["a"], "task": "emotion", "task": "x"}', 422,
                                        r"key 'task' appears twice"),
    "reward true": (b'{"query": "a", "target_reward": true}', 422, r"valid number"),
    "reward as text": (b'{"query": "a", "target_reward": "50"}', 422, r"valid number"),
    "NUL-only query": (b'{"query": "\\u0000\\u0000"}', 422, r"empty or whitespace-only query"),
    "zero-width-only query": (b'{"queries": ["ok", "\\u200b\\u200d\\ufeff \\u2060"]}', 422,
                              r"empty or whitespace-only query"),
    "valid, integer reward": (b'{"query": "a", "target_reward": 50}', 200, r'"target_reward":50\.0'),
}


@pytest.mark.parametrize("case", list(BODIES))
def test_request_bodies(app, case):
    body, status, pattern = BODIES[case]
    r = _post(app, "/v1/prompts", body)
    assert r.status_code == status and re.search(pattern, r.text), r.text


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}])
@pytest.mark.parametrize("body", [b'{"query": "my-secret-text", "target_reward": "x"}',
                                  b'{"query": "my-secret-text", "query": "again"}', b"my-secret-text",
                                  b'{"query": "my-secret-text"}'])
def test_the_key_is_checked_before_the_body(app, body, headers):
    r = _post(app, "/v1/answer", body, headers=headers)
    assert r.status_code == 401 and "my-secret-text" not in r.text, r.text
    assert _post(app, "/v1/prompts", body, headers=headers).status_code == 401


# -- a hung target -----------------------------------------------------------------------------------------
def test_answer_stops_at_its_deadline_while_the_rest_answers(policy_dir):
    """40 concurrent /v1/answer against a target that never answers (each call would retry 4 × 60 s): all get
    504 at serve.answer_timeout_s, and /healthz and /v1/prompts answer meanwhile: the replica's event loop
    stays free. (The bounds on their latency are checked over real Serve, test_policy_service.)"""
    with hung_target() as url:
        app = _app(policy_dir, "target.engine=openai", f"target.base_url={url}", "target.model=m",
                   "target.timeout_s=60", "target.retries=3", "serve.answer_timeout_s=3")

        async def go():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc",
                                         headers=AUTH, timeout=30) as c:
                t0 = time.monotonic()
                answers = [asyncio.create_task(c.post("/v1/answer", json={"query": f"q {i}"})) for i in range(40)]
                await asyncio.sleep(1.0)
                waits = {"/healthz": [], "/v1/prompts": []}
                for path, body in (("/healthz", None), ("/v1/prompts", {"query": "hi"})) * 2:
                    s = time.monotonic()
                    r = await (c.get(path) if body is None else c.post(path, json=body))
                    assert r.status_code == 200, r.text
                    waits[path].append(time.monotonic() - s)
                done = await asyncio.gather(*answers)
                return done, waits, time.monotonic() - t0

        done, waits, took = asyncio.run(go())
    assert all(r.status_code == 504 and "serve.answer_timeout_s=3" in r.json()["detail"] for r in done), \
        [(r.status_code, r.text) for r in done[:3]]
    assert took < 3 + 10, took  # the deadline and a loaded machine's slack; without it 4 × 60 s of retries
    assert max(waits["/healthz"]) < 1.0, waits


def test_answers_beyond_half_the_replica_are_refused_at_once(policy_dir):
    with hung_target() as url:
        app = _app(policy_dir, "target.engine=openai", f"target.base_url={url}", "target.model=m",
                   "serve.answer_timeout_s=1", "serve.max_ongoing_requests=4")

        async def go():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc",
                                         headers=AUTH, timeout=30) as c:
                return await asyncio.gather(*(c.post("/v1/answer", json={"query": f"q {i}"}) for i in range(3)))

        codes = sorted(r.status_code for r in asyncio.run(go()))
    assert codes == [503, 504, 504], codes


def test_post_json_stops_at_the_deadline():
    from qpo_ray.openai_http import TargetTimeout, post_json

    with hung_target() as url, httpx.Client(base_url=url, timeout=60) as client:
        t0 = time.monotonic()
        with pytest.raises(TargetTimeout,
                           match=r"did not answer before the deadline \(1 attempt\(s\); last: ReadTimeout"):
            post_json(client, "/completions", {}, retries=3, deadline=time.monotonic() + 0.5)
        assert time.monotonic() - t0 < 1.5


# -- fair batching -----------------------------------------------------------------------------------------
def test_a_small_request_rides_in_the_next_batch_behind_big_ones():
    """While a batch runs, 8 big requests (4 slices of 4 each) then one small one arrive; batches hold at most
    8 queries: the small one runs in the next batch, not after all 32 slices; the big ones take turns."""
    from qpo_ray.score.batcher import EngineBatcher

    batches: list[list[str]] = []

    def fn(items):
        batches.append([name for name, _ in items])
        time.sleep(0.3 if batches[-1] == ["running"] else 0.01)
        return [name for name, _ in items]

    batcher = EngineBatcher(fn, max_batch_size=16, wait_s=0.0, max_batch_cost=8)

    async def main_():
        running = asyncio.ensure_future(batcher.submit(("running", None)))
        await asyncio.sleep(0.1)  # the batch is running in its thread
        big = [asyncio.ensure_future(batcher.submit((f"big{g}.{i}", None), cost=4, group=f"big{g}"))
               for g in range(8) for i in range(4)]
        await asyncio.sleep(0.01)
        small = asyncio.ensure_future(batcher.submit(("small", None), cost=1))
        return await asyncio.gather(running, *big, small)

    out = asyncio.run(main_())
    assert out[-1] == "small" and out[1] == "big0.0"
    assert batches[0] == ["running"]
    first = next(i for i, b in enumerate(batches) if "small" in b)
    assert first == 1, batches
    assert all(sum(4 if n.startswith("big") else 1 for n in b) <= 8 for b in batches), batches
    assert batches[1:4] == [["small", "big0.0"], ["big1.0", "big2.0"], ["big3.0", "big4.0"]], batches  # in turn


def test_batches_are_first_come_first_served_without_groups():
    from qpo_ray.score.batcher import EngineBatcher

    batches = []
    batcher = EngineBatcher(lambda items: batches.append(list(items)) or list(items), max_batch_size=3, wait_s=0.05)

    async def main_():
        return await asyncio.gather(*(batcher.submit(i) for i in range(7)))

    assert asyncio.run(main_()) == list(range(7))
    assert batches == [[0, 1, 2], [3, 4, 5], [6]]


def test_a_big_request_is_generated_in_slices(policy_dir):
    """A request of 4 queries with serve.max_batch_queries=2: two batches of one slice, its prompts in order."""
    from qpo_ray.policy import generate_prompts

    app = _app(policy_dir, "serve.max_batch_queries=2")
    queries = ["one query", "two queries", "three", "four"]
    r = _post(app, "/v1/prompts", json.dumps({"queries": queries}).encode())
    assert r.status_code == 200, r.text
    assert [p["query"] for p in r.json()["prompts"]] == queries
    assert [p["prompt"] for p in r.json()["prompts"]] == generate_prompts(QPOPolicy.load(policy_dir), queries)
    health = _get(app, "/healthz")
    assert health["batches"] == 2 and health["recent_batch_sizes"] == [1, 1], health


def _get(app, path: str):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc") as c:
            return (await c.get(path)).json()

    return asyncio.run(go())


# -- schemathesis ------------------------------------------------------------------------------------------
# Not schemathesis' pytest plugin (``schema.parametrize``): its fixture loader does not run on pytest 9.
def test_the_openapi_description_holds(policy_dir):
    """No 5xx and no response outside the description, on generated requests with the key (and the checks
    schemathesis adds without it), up to 25 examples per operation.

    Without positive_data_acceptance: the description cannot say what the served config and the body rules
    refuse (more queries than serve.max_queries_per_request, a blank query, neither query nor queries), and
    those requests rightly get their documented 413 or 422."""
    from hypothesis import given
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    with echo_target() as url:
        app = _app(policy_dir, "target.engine=openai", f"target.base_url={url}", "target.model=m")
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        operations = [r.ok() for r in schema.get_all_operations()]
        assert {op.path for op in operations} == {"/v1/prompts", "/v1/answer", "/healthz"}
        for op in operations:
            @given(case=op.as_strategy())
            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                      database=None)
            def check(case):
                case.call_and_validate(headers=AUTH, excluded_checks=[positive_data_acceptance])

            check()
