"""The Ray Serve scoring pool: fan-out over 2 replicas, order, no re-scoring, and a replica killed mid-run.

The replicas run the real transformers engine on tiny-llama. The engine factory below only adds a pause
per batch (so a replica can be killed while it holds requests) and records which process scored what.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter

import pytest

from qpo_ray.config import TargetConfig, load_config
from qpo_ray.score.engines.base import ScoreRequest
from qpo_ray.score.engines.transformers_engine import TransformersEngine
from qpo_ray.tasks import load_task

pytestmark = pytest.mark.slow

CFG = TargetConfig(model="tiny-llama", max_length=256, max_new_tokens=4, num_replicas=2, max_batch_size=4,
                   batch_wait_timeout_s=0.02, max_in_flight=8, num_cpus_per_replica=1, retries=3)


def recording_factory(log_path: str, delay_s: float):
    """An engine factory (pickled by value into the replicas): the transformers engine, slowed and logged."""

    def factory(cfg, tasks):
        import os
        import time

        from qpo_ray.score.engines.transformers_engine import TransformersEngine

        engine = TransformersEngine(cfg, tasks)
        inner = engine.score

        def record(reqs, phase):
            with open(log_path, "a") as f:
                f.write("".join(json.dumps({"pid": os.getpid(), "q": r.query, "p": r.prompt, "phase": phase}) + "\n"
                                for r in reqs))

        def score(reqs):
            record(reqs, "start")
            time.sleep(delay_s)
            out = inner(reqs)
            record(reqs, "done")
            return out

        engine.score = score
        return engine

    return factory


def scored_log(path, phase: str = "done") -> list[dict]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r["phase"] == phase]


@pytest.fixture(scope="module")
def task():
    return load_task("emotion")


@pytest.fixture(scope="module")
def local(task):
    return TransformersEngine(CFG, [task])


@pytest.fixture(scope="module")
def pool(serve_as_found, task, tmp_path_factory):
    from qpo_ray.score.pool import ScoringPool

    log = tmp_path_factory.mktemp("pool") / "scored.jsonl"
    with ScoringPool(CFG, task, run_id=f"test-{time.time_ns()}", engine_factory=recording_factory(str(log), 0.25)) as p:
        p.log = log
        yield p


def requests_for(task, n, prompt="") -> list[ScoreRequest]:
    return [ScoreRequest(task.name, "zero_shot", q, prompt, lab) for q, lab in task.queries()[:n]]


def assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert (a.correct, a.pred, a.tokens, a.calls) == (b.correct, b.pred, b.tokens, b.calls)
        assert a.nll == pytest.approx(b.nll, abs=1e-4)


def test_two_replicas_score_each_once_in_order(pool, task, local, capfd):
    reqs = requests_for(task, 32, prompt="Name the emotion.")
    before = dict(pool.stats)
    got = pool.score(reqs)
    assert_same(got, local.score(reqs))  # input order, same numbers as the engine in this process
    assert pool.stats["calls"] - before["calls"] == 32
    assert pool.stats["tokens"] - before["tokens"] == sum(c.tokens for c in got)
    log = [r for r in scored_log(pool.log) if r["p"] == "Name the emotion."]
    assert Counter(r["q"] for r in log) == Counter(r.query for r in reqs)  # every request scored exactly once
    assert len({r["pid"] for r in log}) == 2  # both replicas took work
    assert "score: 32/32 req (100%)" in capfd.readouterr().err  # the call's own progress meter, closed


def test_repeated_pair_costs_no_target_call(pool, task):
    from qpo_ray.score.pool import score_pairs

    cfg = load_config("tiny", ["target.model=tiny-llama"])
    pairs = [{"query": q, "prompt": "Feelings?"} for q, _ in task.queries("test")[:6]]
    known: dict = {}
    calls = pool.stats["calls"]
    rows = score_pairs(pool, task, cfg, pairs + pairs[:2], known, source="loop-1", loop=1)
    assert pool.stats["calls"] - calls == 6  # the repeats inside the call are scored once
    assert rows[6] == rows[0] and len(known) == 6
    calls = pool.stats["calls"]
    again = score_pairs(pool, task, cfg, pairs[::-1], known, source="loop-2", loop=2)
    assert pool.stats["calls"] == calls  # everything known: no target call
    assert again == rows[:6][::-1]


def test_replica_killed_mid_scoring_is_retried(pool, task, local):
    import ray

    reqs = requests_for(task, 64, prompt="Which emotion is this?")
    before = dict(pool.stats)
    result: dict = {}

    def run():
        try:
            result["out"] = pool.score(reqs, progress=False)
        except Exception as e:  # reported by the assertion below
            result["error"] = e

    worker = threading.Thread(target=run)
    actors = [ray.get_actor(name, namespace="serve") for name in pool.replica_actor_names()]
    by_pid = {ray.get(a.__ray_call__.remote(lambda _self: os.getpid())): a for a in actors}
    worker.start()
    deadline = time.time() + 60
    while not (busy := [r for r in scored_log(pool.log, "start") if r["p"] == "Which emotion is this?"]):
        assert time.time() < deadline, "the pool never started scoring"
        time.sleep(0.02)
    # Kill the replica while it is inside a batch: the requests it holds are lost with it.
    victim = busy[0]["pid"]
    ray.kill(by_pid[victim], no_restart=True)
    worker.join(timeout=120)
    assert not worker.is_alive() and "out" in result, result.get("error", "still running")
    assert_same(result["out"], local.score(reqs))  # every request answered, in order
    assert pool.stats["calls"] - before["calls"] == 64  # ... and counted once
    done = [r for r in scored_log(pool.log) if r["p"] == "Which emotion is this?"]
    lost = {r["q"] for r in busy if r["pid"] == victim} - {r["q"] for r in done if r["pid"] == victim}
    assert lost, "the kill did not interrupt a batch"
    assert lost <= {r["q"] for r in done if r["pid"] != victim}  # re-sent and scored on the other replica
    # Requests the dead replica had accepted fail at the caller and the pool re-sends them (Ray Serve's
    # router itself re-routes only requests that were not yet accepted).
    assert pool.stats["retries"] > before["retries"]


def test_oversized_request_fails_clearly(pool, task):
    from qpo_ray.errors import TargetError

    reqs = requests_for(task, 3) + [ScoreRequest(task.name, "zero_shot", "word " * 300, "", "joy")]
    with pytest.raises(TargetError, match=r"oversized request #0: .* > target.max_length=256"):
        pool.score(reqs, progress=False)




def test_closing_the_pool_is_quiet(pool, capfd):
    """Last in this module: it closes the module's pool. Closing deletes the app and puts no failed Ray task
    on the console, as ``serve.shutdown()`` does ("ServeController.graceful_shutdown failed ... killed by
    `ray.kill`"). The driver starts a closed pool again before its next scoring step."""
    capfd.readouterr()
    pool.close()
    time.sleep(1.0)  # Ray prints failed tasks from a thread of its own
    out = capfd.readouterr()
    assert pool.handle is None and not pool.replica_actor_names()
    for noise in ("graceful_shutdown failed", "listen_for_change failed", "The actor is dead"):
        assert noise not in out.out + out.err, out.out + out.err
