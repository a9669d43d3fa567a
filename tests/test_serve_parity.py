"""Serve what was evaluated: a policy trained and evaluated by a replay evaluation (tiny sizes) gives, from
``qpo-ray generate`` and from the running policy service with no extra flags, exactly the prompts the
evaluation's JSON recorded for its headline method; its folder's inference.json says how it was evaluated."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from qpo_ray import cli
from qpo_ray.config import load_config
from qpo_ray.data.schema import normalize_text
from qpo_ray.evaluate.offline import POLICY_SUBDIR, evaluate_offline
from qpo_ray.policy.served import read_inference
from tests.test_offline_eval import A, B, C, _store, _synthetic_logs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, ray_local):
    """A replay evaluation of synthetic logs (rerank ★ with a fitted margin, best-of-2, greedy), seed 3, r = 80."""
    tmp = tmp_path_factory.mktemp("parity")
    rows = _synthetic_logs()
    cfg = load_config("offline", ["policy.tiny_hidden=32", "train.batch_size=16", "train.micro_batch_size=16",
                                  "train.cpus_per_worker=1", "train.scratch.epochs=2", "eval.best_of_n=2", "seed=3",
                                  "eval.target_reward=80"])
    out = tmp / "eval"
    res = evaluate_offline(cfg, _store(tmp, rows, name="logs"), out, test_fraction=0.25)
    # Replay's rerank ranks the prompts recorded for each test query, the service the whole pool: here every
    # query has every prompt recorded, so the two are the same candidates.
    recorded: dict[str, set[str]] = {}
    for r in rows:
        recorded.setdefault(normalize_text(r["query"]), set()).add(r["prompt"])
    assert all(recorded[normalize_text(x["query"])] == {A, B, C} for x in res["per_query"])
    return {"result": res, "policy": out / POLICY_SUBDIR, "tmp": tmp}


def _prompts_of(result: dict, method: str) -> dict[str, str]:
    return {row["query"]: row["methods"][method]["prompt"] for row in result["per_query"]}


def test_policy_carries_how_it_was_evaluated(evaluated):
    res = evaluated["result"]
    rec = read_inference(evaluated["policy"])
    assert rec is not None and res["default_method"] == "qpo_rerank"
    s = rec.settings
    assert s.method == "rerank" and s.seed == 3 and s.best_of_n == 2 and s.target_reward == 80.0
    assert s.default_prompt == res["methods"]["best_single"]["prompt"] and s.margin == res["rerank"]["margin"]
    assert set(s.candidates) == {A, B, C}
    assert (rec.task, rec.setting) == ("toy", "zero_shot") and rec.run_config == "../config.yaml"
    assert "held out of training" in rec.sources["margin"] and "best single prompt on train" in rec.sources[
        "default_prompt"]


@pytest.mark.parametrize("method,flags", [("qpo_rerank", []), ("qpo_best_of_n", ["--set", "eval.method=best_of_n"]),
                                          ("qpo_greedy", ["--set", "eval.method=greedy"])])
def test_generate_gives_the_evaluated_prompts(evaluated, tmp_path, method, flags):
    expected = _prompts_of(evaluated["result"], method)
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"query": q}) + "\n" for q in expected))
    out = tmp_path / "p.jsonl"
    assert cli.main(["generate", "--policy", str(evaluated["policy"]), "--in", str(queries), "--out", str(out),
                     *flags]) == 0
    got = {r["query"]: r["prompt"] for r in map(json.loads, out.read_text().splitlines())}
    assert got == expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_service_serves_the_evaluated_prompts(evaluated):
    from ray import serve

    from qpo_ray.policy.served import load_served
    from qpo_ray.serve.app import http_address, make_app

    running = http_address()
    port = running[1] if running else _free_port()
    if running is None:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    policy = evaluated["policy"]
    serve.run(make_app(policy, load_served(policy)), name="qpo-parity", route_prefix="/parity")
    url = f"http://127.0.0.1:{port}/parity"
    try:
        res = evaluated["result"]
        expected = _prompts_of(res, res["default_method"])
        queries = list(expected)
        r = httpx.post(url + "/v1/prompts", json={"queries": queries}, timeout=120)
        assert r.status_code == 200, r.text
        assert {p["query"]: p["prompt"] for p in r.json()["prompts"]} == expected
        assert r.json()["target_reward"] == 80.0  # a request without one gets the evaluated reward
        with ThreadPoolExecutor(8) as pool:  # one query a request, batched however the replica batches them
            singles = list(pool.map(lambda q: httpx.post(url + "/v1/prompts", json={"query": q}, timeout=120),
                                    queries))
        assert {s.json()["prompts"][0]["query"]: s.json()["prompts"][0]["prompt"] for s in singles} == expected
        info = httpx.get(url + "/healthz", timeout=30).json()["inference"]
        assert info["method"] == "rerank" and info["task"] == "toy" and info["missing"] == []
        assert info["default_prompt"] == res["methods"]["best_single"]["prompt"]
        assert info["margin"] == res["rerank"]["margin"] and "held out" in info["sources"]["margin"]
    finally:
        serve.delete("qpo-parity")
        if running is None:
            serve.shutdown()
