"""dedupe — a second loop over already-scored pairs makes zero target calls.

Full mode goes through the driver's own path: ``RunScores.score`` on a run directory with a tiny-llama
Serve scoring pool (the ``tiny`` profile's target). Loop 1 scores N pairs; loop 2 asks for the same pairs
again in the same session (in-memory cache); a fresh Session on the same run directory asks once more
(cache reloaded from ``scores/``); finally a mix of old and new pairs must cost exactly the new ones.
Target calls are the requests that reached the pool (``ScoringPool.stats['requests']``).

``--quick`` skips Ray: ``score_pairs`` with a ``known`` mapping on an in-process tiny-llama engine that
counts the requests it receives.

ratio = calls of the repeat loops / calls of loop 1 (goal = 0). The repeated rows must equal loop 1's
(reward, correct, nll, key).
"""

from __future__ import annotations

import argparse

from benchmarks._common import emotion_pairs, main, result

NAME = "dedupe"
FIELDS = ("key", "reward", "correct", "nll", "prompt_acc", "query", "prompt", "label")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", type=int, default=32, help="pairs scored in loop 1")
    p.add_argument("--new", type=int, default=8, help="new pairs mixed into the last loop")


def quick(args: argparse.Namespace) -> None:
    args.pairs, args.new = 12, 4
    args.in_process = True


class CountingScorer:
    """An in-process scorer (the engine the replicas would run) that counts the requests it receives."""

    def __init__(self, engine):
        self.engine = engine
        self.requests = 0

    def score(self, requests):
        self.requests += len(requests)
        return self.engine.score(list(requests))


def _same(a: list[dict], b: list[dict]) -> bool:
    return [tuple(r[f] for f in FIELDS) for r in a] == [tuple(r[f] for f in FIELDS) for r in b]


def run_in_process(args: argparse.Namespace, pairs: list[dict], extra: list[dict]) -> dict:
    from qpo_ray.config import load_config
    from qpo_ray.score.engines.transformers_engine import TransformersEngine
    from qpo_ray.score.pairs import score_pairs
    from qpo_ray.tasks import load_task

    cfg = load_config("tiny")
    task = load_task(cfg.task.name)
    scorer = CountingScorer(TransformersEngine(cfg.target, task))
    known: dict = {}
    first = score_pairs(scorer, task, cfg, pairs, known, source="loop-1", loop=1)
    c1 = scorer.requests
    second = score_pairs(scorer, task, cfg, pairs, known, source="loop-2", loop=2)
    c2 = scorer.requests - c1
    mixed = score_pairs(scorer, task, cfg, pairs + extra, known, source="loop-3", loop=3)
    c3 = scorer.requests - c1 - c2
    return {"mode": "score_pairs + known (in-process tiny-llama engine)", "first_calls": c1,
            "repeat_calls": c2, "repeat_calls_fresh_session": None, "mixed_calls": c3,
            "rows_equal": _same(first, second) and _same(first, mixed[: len(pairs)])}


def run_session(args: argparse.Namespace, pairs: list[dict], extra: list[dict], root: str) -> dict:
    from pathlib import Path

    from benchmarks._common import start_ray, stop_ray
    from qpo_ray.config import load_config
    from qpo_ray.driver.session import Session
    from qpo_ray.runs import RunDir

    run_dir = Path(root) / "run"
    cfg = load_config("tiny", [f"run_dir={run_dir}"])
    start_ray()
    try:
        s = Session(cfg, RunDir(run_dir))
        try:
            s.pool.start()
            first = s.scores.score(pairs, "bench-loop1", phase="collect", source="loop-1", loop=1)
            c1 = int(s.pool.stats["requests"])
            second = s.scores.score(pairs, "bench-loop2", phase="collect", source="loop-2", loop=2)
            c2 = int(s.pool.stats["requests"]) - c1
        finally:
            s.close()
        s2 = Session(cfg, RunDir(run_dir))  # a restarted driver: the cache comes back from scores/
        try:
            # Its pool is not started: a request for a pair the cache lacks would fail instead of being counted.
            third = s2.scores.score(pairs, "bench-loop2b", phase="collect", source="loop-2", loop=2)
            c2b = int(s2.pool.stats["requests"])
            s2.pool.start()
            mixed = s2.scores.score(pairs + extra, "bench-loop3", phase="collect", source="loop-3", loop=3)
            c3 = int(s2.pool.stats["requests"]) - c2b
        finally:
            s2.close()
    finally:
        stop_ray()
    return {"mode": "RunScores.score (Serve pool, tiny-llama)", "first_calls": c1, "repeat_calls": c2,
            "repeat_calls_fresh_session": c2b, "mixed_calls": c3,
            "rows_equal": _same(first, second) and _same(first, third) and _same(first, mixed[: len(pairs)])}


def run(args: argparse.Namespace) -> dict:
    from benchmarks._common import workdir

    rows = emotion_pairs(args.pairs + args.new, seed=1)
    pairs, extra = rows[: args.pairs], rows[args.pairs:]
    if getattr(args, "in_process", False):
        raw = run_in_process(args, pairs, extra)
    else:
        with workdir(args, "dedupe") as root:
            raw = run_session(args, pairs, extra, root)
    repeat = raw["repeat_calls"] + (raw["repeat_calls_fresh_session"] or 0)
    raw["pairs"], raw["new_pairs"] = len(pairs), len(extra)
    notes = []
    ok_mixed = raw["mixed_calls"] == len(extra)
    if not ok_mixed:
        notes.append(f"the mixed loop made {raw['mixed_calls']} calls for {len(extra)} new pairs")
    if raw["first_calls"] != len(pairs):
        notes.append(f"loop 1 made {raw['first_calls']} calls for {len(pairs)} distinct pairs")
    if not raw["rows_equal"]:
        notes.append("repeated rows differ from loop 1's")
    ratio = repeat / max(1, raw["first_calls"])
    # A call count, not a speed: what bounds it is whether a repeated pair ever reaches the target.
    limited = (f"exact, not a throughput: repeat loops made {repeat} target calls, the mixed loop "
               f"{raw['mixed_calls']} for {len(extra)} new pairs (cache hits cost no target call)")
    return result(NAME, ratio=ratio, goal=0, op="==", ours=repeat, baseline=raw["first_calls"],
                  units="target calls (repeat loops vs loop 1)", raw=raw, notes=notes,
                  ok=ratio == 0 and ok_mixed and raw["rows_equal"], limited_by=limited)


if __name__ == "__main__":
    raise SystemExit(main(NAME, add_args, quick, run))
