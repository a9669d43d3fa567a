"""The run's pair cache (``RunScores``): the driver and ``qpo-ray score`` (``score_pairs`` with ``known``) give a
new pair the same ``prompt_acc`` and reward, counting the pairs of the same prompt that were scored before; a
pair known to the run (scored in it, persisted, or in the dataset) is never sent to the target again. No Ray:
the pool is an in-process stand-in."""

from __future__ import annotations

import hashlib
import shutil
from contextlib import contextmanager

import pyarrow as pa
import pytest

from qpo_ray.config import load_config
from qpo_ray.data.store import DatasetStore
from qpo_ray.driver.session import SCORE_CHUNK, RunScores, StepTimer
from qpo_ray.runs import RunDir
from qpo_ray.score.engines import Components
from qpo_ray.score.pairs import score_pairs
from qpo_ray.tasks import load_task


class FakePool:
    """Correctness is a hash of (query, prompt): deterministic, and different across pairs."""

    def __init__(self):
        self.stats = {"requests": 0, "calls": 0, "tokens": 0, "retries": 0, "seconds": 0.0}
        self.asked: list[str] = []
        self.sizes: list[int] = []

    def score(self, requests, progress: bool = True):
        self.asked += [r.query for r in requests]
        self.sizes.append(len(requests))
        self.stats["calls"] += len(requests)
        return [Components(correct=float(hashlib.sha256(f"{r.query}|{r.prompt}".encode()).digest()[0] % 2),
                           nll=0.5, tokens=3, calls=1) for r in requests]

    @contextmanager
    def progress(self, total: int, desc: str):
        yield

    def start(self):
        return self

    def close(self) -> None:
        pass


@pytest.fixture
def run(tmp_path):
    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}"])
    rd = RunDir(tmp_path / "run")
    return cfg, load_task(cfg.task.name), rd, DatasetStore(rd.path)


def pairs_of(prompt: str, n: int, start: int = 0) -> list[dict[str, str]]:
    return [{"query": f"query number {i}", "label": "joy", "prompt": prompt} for i in range(start, start + n)]


def test_a_pair_gets_the_same_reward_from_the_driver_and_from_score(run):
    cfg, task, rd, store = run
    pool = FakePool()
    scores = RunScores(cfg, task, rd, store, pool)
    pairs = pairs_of("Name the emotion.", 6)
    with StepTimer(pool) as t:
        first = scores.score(pairs[:3], "a", phase="collect", source="loop-1", loop=1)
    both = scores.score(pairs, "b", phase="collect", source="loop-2", loop=2)
    assert len(first) == 3 and t.info["target_calls"] == 3
    # Only the new pairs cost a call, each once...
    assert pool.asked == [p["query"] for p in pairs]
    # ...and the prompt accuracy of the three new ones counts all six pairs of the prompt in that step.
    correct = [r["correct"] for r in both]
    assert len(set(correct)) == 2, "the fixture needs both outcomes to tell the definitions apart"
    for r in both[3:]:
        assert r["prompt_acc"] == sum(correct) / 6
    # The same call through score_pairs with the earlier rows as `known` (what `qpo-ray score` does).
    known = {r["key"]: dict(r) for r in first}
    again = score_pairs(FakePool(), task, cfg, pairs, known, source="loop-2", loop=2)
    for a, b in zip(both[3:], again[3:], strict=True):
        assert (a["prompt_acc"], a["reward"]) == (b["prompt_acc"], b["reward"])


def test_chunks_keep_a_prompts_pairs_together_and_a_resumed_run_pays_nothing_twice(run):
    """More new pairs than a chunk: each prompt's pairs go in one request, every chunk is persisted, and a
    new RunScores on the same run directory (a resumed driver) answers them all from scores/."""
    cfg, task, rd, store = run
    pool = FakePool()
    big = pairs_of("Big prompt.", SCORE_CHUNK - 4) + pairs_of("Small prompt.", 10)
    rows = RunScores(cfg, task, rd, store, pool).score(big, "s", phase="collect", source="loop-1", loop=1)
    assert pool.sizes == [SCORE_CHUNK - 4, 10] and len(list(rd.scores.glob("s-*.parquet"))) == 2
    again = FakePool()
    resumed = RunScores(cfg, task, rd, store, again)
    assert resumed.score(big, "s", phase="collect", source="loop-1", loop=1) == rows
    assert again.asked == []
    # The step's known pairs of a prompt ride along in its request: the new pair's prompt_acc counts them.
    *_, new = resumed.score(pairs_of("Small prompt.", 11), "t", phase="collect", source="loop-2", loop=2)
    assert again.asked == ["query number 10"]
    small = [r["correct"] for r in rows[SCORE_CHUNK - 4:]] + [new["correct"]]
    prior = cfg.task.prompt_acc_prior
    assert new["prompt_acc"] == pytest.approx((sum(small) + prior * sum(small) / 11) / (11 + prior))


def test_dataset_rows_cost_no_call(run):
    """A pair stored in the dataset (e.g. imported logs) is known to a run that never scored it."""
    cfg, task, rd, store = run
    pairs = pairs_of("Stored prompt.", 4)
    rows = RunScores(cfg, task, rd, store, FakePool()).score(pairs, "x", phase="collect", source="offline", loop=0)
    store.commit([pa.Table.from_pylist(rows)], version=0, source="rows", note="D0")
    shutil.rmtree(rd.scores)  # the run's own scores gone: only the dataset knows the pairs
    pool = FakePool()
    got = RunScores(cfg, task, rd, store, pool).score(pairs, "y", phase="test", source="eval", loop=1)
    assert pool.asked == [] and [r["reward"] for r in got] == [r["reward"] for r in rows]
    assert {r["source"] for r in got} == {"eval"}
