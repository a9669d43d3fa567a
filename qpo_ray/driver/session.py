"""What one driver process holds for a run: Ray, the run directory, the dataset store, the task, the
tracker, the scoring pool (started on first use) and the cache of every pair scored in this run."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from qpo_ray.atomic import atomic_write_table
from qpo_ray.collect.screen import pair_identity
from qpo_ray.config import RunConfig
from qpo_ray.data.prompts import prompt_identity
from qpo_ray.data.schema import SCHEMA, pair_key, rows_to_table
from qpo_ray.data.store import DatasetStore
from qpo_ray.faults import fault_point
from qpo_ray.ids import content_id
from qpo_ray.runs import RunDir
from qpo_ray.stopping import check_stop
from qpo_ray.tracking import Tracker

log = logging.getLogger("qpo_ray")

SCORE_CHUNK = 64  # pairs scored and persisted together: a crash loses at most one chunk of target calls


class Session:
    """Holds the per-run state shared by the steps."""

    def __init__(self, cfg: RunConfig, run: RunDir):
        from qpo_ray.tasks import load_task

        self.cfg = cfg
        self.run = run
        self.store = DatasetStore(run.path)
        self.store.clean_tmp()
        self.task = load_task(cfg.task.name)
        self.target = cfg.target.model
        self.run_id = run.run_id  # names the Ray Train runs: stored in the run, so a moved run keeps it
        self.tracker = Tracker(run.path, cfg.tracking, cfg.model_dump(mode="json"))
        self._pool = None
        self._cache: dict[str, dict[str, Any]] | None = None
        self.calls = 0
        self.tokens = 0

    # -- scoring ------------------------------------------------------------------------------------
    @property
    def pool(self):
        if self._pool is None:
            from qpo_ray.score.pool import ScoringPool

            # Named after where the run is: a copy of the run resumed beside it gets its own pool.
            self._pool = ScoringPool(self.cfg.target, self.task,
                                     app_name=f"qpo-target-{content_id(str(self.run.path), n=8)}").start()
            check_stop()  # a signal while Serve deployed the pool stops the run here at the latest
        return self._pool

    def _load_cache(self) -> dict[str, dict[str, Any]]:
        if self._cache is None:
            self._cache = {}
            if self.run.scores.is_dir():
                for f in sorted(self.run.scores.glob("*.parquet")):
                    for r in pq.read_table(f).to_pylist():
                        self._cache[r["key"]] = r
        return self._cache

    def _from_dataset(self, keys: set[str]) -> dict[str, dict[str, Any]]:
        """Rows of the latest dataset version whose key is asked for (streamed, filtered by key)."""
        latest = self.store.latest()
        if latest is None or not keys:
            return {}
        wanted = pa.array(sorted(keys))
        out = {}
        for b in self.store.iter_batches(latest):
            hit = b.filter(pc.is_in(b.column("key"), value_set=wanted))
            for r in hit.to_pylist():
                out[r["key"]] = r
        return out

    def seen(self, version: int) -> tuple[set[tuple[str, str]], dict[str, str]]:
        """What exploration must not spend target calls on, as ``pair_identity``s: every pair stored in
        ``version`` or scored in this run; and every prompt ``version`` holds, by ``prompt_identity`` (versions
        grow from their parent, so these are the prompts of every earlier version)."""
        pairs: set[tuple[str, str]] = set()
        prompts: dict[str, str] = {}
        for b in self.store.iter_batches(version, columns=["query", "prompt"]):
            for q, p in zip(b.column("query").to_pylist(), b.column("prompt").to_pylist(), strict=True):
                pairs.add(pair_identity(q, p))
                prompts.setdefault(prompt_identity(p), p)
        pairs |= {pair_identity(r["query"], r["prompt"]) for r in self._load_cache().values()}
        return pairs, prompts

    def score(self, pairs: Sequence[dict[str, str]], tag: str, *, phase: str, source: str, loop: int) -> list[dict[str, Any]]:
        """Score (query, label, prompt) pairs; a pair scored before in this run or in the dataset costs no call.

        New results are persisted chunk by chunk under ``scores/`` before they are used, so a crash never
        pays for the same pair twice. Rows come back in input order.
        """
        from qpo_ray.score.pairs import requests_per_pair

        setting = self.cfg.task.setting
        cache = self._load_cache()
        keys = [pair_key(self.task.name, self.target, setting, p["query"], p["prompt"]) for p in pairs]
        known = {**self._from_dataset({k for k in keys if k not in cache}), **cache}
        todo = [p for p, k in zip(pairs, keys, strict=True) if k not in known]
        todo = list({pair_key(self.task.name, self.target, setting, p["query"], p["prompt"]): p for p in todo}.values())
        if todo:
            log.info("[%s] scoring %d new pair(s) (%d already known)", tag, len(todo), len(pairs) - len(todo))
            with self.pool.progress(len(todo) * requests_per_pair(self.cfg, phase), f"score {tag}"):
                for chunk in _chunks_by_prompt(todo, SCORE_CHUNK):
                    check_stop()
                    # prompt_acc counts every pair of the step with that prompt, also those scored before
                    # (score_pairs' definition, as in `qpo-ray score`): they ride along, at no call.
                    prompts = {p["prompt"] for p in chunk}
                    scored = [(p, k) for p, k in zip(pairs, keys, strict=True) if k in known and p["prompt"] in prompts]
                    self._score_chunk(chunk, scored, tag, cache, known, phase=phase, source=source, loop=loop)
        # A reused row is labelled with the step that asked for it; rows already in the dataset are
        # dropped by the merge rule, so a label never changes a stored row.
        return [dict(known[k], source=source, loop=loop) for k in keys]

    def _score_chunk(self, chunk, scored, tag: str, cache: dict, known: dict, *, phase: str, source: str,
                     loop: int) -> None:
        """Score ``chunk`` (new pairs) beside ``scored`` (pairs, keys known already); persist the new rows."""
        from qpo_ray.score.pool import score_pairs

        before = self.pool.stats.copy()
        context = {k: known[k] for _, k in scored}
        rows = score_pairs(self.pool, self.task, self.cfg, chunk + [p for p, _ in scored], context, phase=phase,
                           source=source, loop=loop)[: len(chunk)]
        after = self.pool.stats
        self.calls += after["calls"] - before["calls"]
        self.tokens += after["tokens"] - before["tokens"]
        table = rows_to_table(rows, source=f"scores of {tag}")
        atomic_write_table(self.run.scores / f"{tag}-{uuid.uuid4().hex[:12]}.parquet", table)
        for r in table.to_pylist():
            cache[r["key"]] = r
            known[r["key"]] = r
        fault_point(f"score.{tag}.chunk")

    def release_pool(self) -> None:
        """Stop the scoring pool; the next score starts it again (the run's score cache stays)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self.tracker.close()


def _chunks_by_prompt(pairs: list[dict[str, str]], size: int) -> list[list[dict[str, str]]]:
    """Chunks of about ``size`` pairs that never split the pairs of one prompt: a prompt's batch accuracy
    (a reward component) is computed over all of its pairs in a call, so a chunk must hold all of them."""
    groups: dict[str, list[dict[str, str]]] = {}
    for p in pairs:
        groups.setdefault(p["prompt"], []).append(p)
    chunks: list[list[dict[str, str]]] = [[]]
    for group in groups.values():
        if chunks[-1] and len(chunks[-1]) + len(group) > size:
            chunks.append([])
        chunks[-1].extend(group)
    return [c for c in chunks if c]


class StepTimer:
    """Measures a step's wall time and the target calls/tokens it spent."""

    def __init__(self, session: Session):
        self.s = session

    def __enter__(self) -> StepTimer:
        self.t0, self.c0, self.k0 = time.time(), self.s.calls, self.s.tokens
        return self

    def __exit__(self, *exc) -> None:
        self.info = {"wall_s": round(time.time() - self.t0, 2), "target_calls": self.s.calls - self.c0,
                     "target_tokens": self.s.tokens - self.k0}


def read_rows(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


__all__ = ["SCHEMA", "Session", "StepTimer", "read_rows"]
