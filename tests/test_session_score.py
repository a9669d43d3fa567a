"""One definition of a pair's reward: the driver's ``Session.score`` and ``qpo-ray score``
(``score_pairs`` with ``known``) give a new pair the same ``prompt_acc`` and reward, counting the pairs of the
same prompt that were scored before. No Ray: the session's pool is an in-process stand-in."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager

from qpo_ray.config import load_config
from qpo_ray.driver.session import Session
from qpo_ray.runs import RunDir
from qpo_ray.score.engines import Components
from qpo_ray.score.pairs import score_pairs


class FakePool:
    """Correctness is a hash of (query, prompt): deterministic, and different across pairs."""

    def __init__(self):
        self.stats = {"requests": 0, "calls": 0, "tokens": 0, "retries": 0, "seconds": 0.0}
        self.asked: list[str] = []

    def score(self, requests, progress: bool = True):
        self.asked += [r.query for r in requests]
        self.stats["calls"] += len(requests)
        return [Components(correct=float(hashlib.sha256(f"{r.query}|{r.prompt}".encode()).digest()[0] % 2),
                           nll=0.5, tokens=3, calls=1) for r in requests]

    @contextmanager
    def progress(self, total: int, desc: str):
        yield

    def close(self) -> None:
        pass


def test_a_pair_gets_the_same_reward_from_the_driver_and_from_score(tmp_path):
    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}"])
    s = Session(cfg, RunDir(tmp_path / "run"))
    s._pool = pool = FakePool()
    prompt = "Name the emotion."
    pairs = [{"query": f"query number {i}", "label": "joy", "prompt": prompt} for i in range(6)]
    try:
        first = s.score(pairs[:3], "a", phase="collect", source="loop-1", loop=1)
        both = s.score(pairs, "b", phase="collect", source="loop-2", loop=2)
    finally:
        s.close()
    assert s._pool is None and len(first) == 3
    # Only the new pairs cost a call, each once...
    assert pool.asked == [p["query"] for p in pairs]
    # ...and the prompt accuracy of the three new ones counts all six pairs of the prompt in that step.
    correct = [r["correct"] for r in both]
    assert len(set(correct)) == 2, "the fixture needs both outcomes to tell the definitions apart"
    for r in both[3:]:
        assert r["prompt_acc"] == sum(correct) / 6
    # The same call through score_pairs with the earlier rows as `known` (what `qpo-ray score` does).
    known = {r["key"]: dict(r) for r in first}
    again = score_pairs(FakePool(), s.task, cfg, pairs, known, source="loop-2", loop=2)
    for a, b in zip(both[3:], again[3:], strict=True):
        assert (a["prompt_acc"], a["reward"]) == (b["prompt_acc"], b["reward"])
