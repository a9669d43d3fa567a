"""What one driver process holds for a run (``Session``) and the run's pair cache (``RunScores``): every
pair scored in the run, persisted chunk by chunk, so none is sent to the target twice."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

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
from qpo_ray.score.engines.base import Components, ScoreRequest
from qpo_ray.stopping import check_stop
from qpo_ray.tasks import Task, load_task
from qpo_ray.tracking import Tracker

log = logging.getLogger("qpo_ray")

SCORE_CHUNK = 64  # pairs scored and persisted together: a crash loses at most one chunk of target calls


class Pool(Protocol):
    """What the driver uses of a ``ScoringPool`` (tests give an in-process stand-in)."""

    stats: dict[str, float]

    def score(self, requests: list[ScoreRequest]) -> list[Components]: ...

    def progress(self, total: int, desc: str) -> AbstractContextManager[None]: ...

    def start(self) -> Any: ...

    def close(self) -> None: ...


class RunScores:
    """The run's one pair cache, ``known`` (``pair_key`` → row): every pair scored in this run (persisted chunk
    by chunk under ``scores/``, read back when the run resumes) and the dataset's rows a request asked for.
    ``score`` passes it to ``score_pairs`` as ``known``, so a pair is sent to the target at most once per run."""

    def __init__(self, cfg: RunConfig, task: Task, run: RunDir, store: DatasetStore, pool: Pool):
        self.cfg, self.task, self.run, self.store, self.pool = cfg, task, run, store, pool
        self.known: dict[str, dict[str, Any]] = {}
        for f in sorted(run.scores.glob("*.parquet")) if run.scores.is_dir() else []:
            for r in pq.read_table(f).to_pylist():
                self.known[r["key"]] = r

    def _look_up(self, keys: set[str]) -> None:
        """Add the rows of the latest dataset version whose key is asked for (streamed, filtered by key)."""
        latest = self.store.latest()
        if latest is None or not keys:
            return
        wanted = pa.array(sorted(keys))
        for b in self.store.iter_batches(latest):
            for r in b.filter(pc.is_in(b.column("key"), value_set=wanted)).to_pylist():
                self.known[r["key"]] = r

    def seen(self, version: int) -> tuple[set[tuple[str, str]], dict[str, str]]:
        """What exploration must not spend target calls on, as ``pair_identity``s: every pair stored in
        ``version`` or known to the run (scored in it, or a dataset row of a version ``version`` holds); and
        every prompt ``version`` holds, by ``prompt_identity`` (versions grow from their parent, so these are
        the prompts of every earlier version)."""
        pairs: set[tuple[str, str]] = set()
        prompts: dict[str, str] = {}
        for b in self.store.iter_batches(version, columns=["query", "prompt"]):
            for q, p in zip(b.column("query").to_pylist(), b.column("prompt").to_pylist(), strict=True):
                pairs.add(pair_identity(q, p))
                prompts.setdefault(prompt_identity(p), p)
        pairs |= {pair_identity(r["query"], r["prompt"]) for r in self.known.values()}
        return pairs, prompts

    def score(self, pairs: Sequence[dict[str, str]], tag: str, *, phase: str, source: str,
              loop: int) -> list[dict[str, Any]]:
        """Rows for (query, label, prompt) pairs, in input order; a pair known to the run costs no call.

        New pairs are scored in chunks that keep each prompt's pairs together, and each chunk is persisted
        under ``scores/`` before the next is sent, so a crash never pays for the same pair twice. A chunk's
        request to ``score_pairs`` also holds the known pairs of its prompts: ``prompt_acc`` counts every
        pair of the step with that prompt (as in ``qpo-ray score``), at no call.
        """
        from qpo_ray.score.pairs import requests_per_pair, score_pairs

        keys = [pair_key(self.task.name, self.cfg.target.model, self.cfg.task.setting, p["query"], p["prompt"])
                for p in pairs]
        self._look_up({k for k in keys if k not in self.known})
        todo = list({k: p for p, k in zip(pairs, keys, strict=True) if k not in self.known}.items())
        if todo:
            log.info("[%s] scoring %d new pair(s) (%d already known)", tag, len(todo), len(pairs) - len(todo))
            with self.pool.progress(len(todo) * requests_per_pair(self.cfg, phase), f"score {tag}"):
                for chunk in _chunks_by_prompt(todo, SCORE_CHUNK):
                    check_stop()
                    prompts = {p["prompt"] for _, p in chunk}
                    request = [p for _, p in chunk] + [p for p, k in zip(pairs, keys, strict=True)
                                                       if k in self.known and p["prompt"] in prompts]
                    score_pairs(self.pool, self.task, self.cfg, request, self.known, phase=phase, source=source,
                                loop=loop)
                    table = rows_to_table([self.known[k] for k, _ in chunk], source=f"scores of {tag}")
                    atomic_write_table(self.run.scores / f"{tag}-{uuid.uuid4().hex[:12]}.parquet", table)
                    for r in table.to_pylist():  # as a resumed run reads them back
                        self.known[r["key"]] = r
                    fault_point(f"score.{tag}.chunk")
        # A reused row is labelled with the step that asked for it; rows already in the dataset are
        # dropped by the merge rule, so a label never changes a stored row.
        return [dict(self.known[k], source=source, loop=loop) for k in keys]


class Session:
    """What the driver holds for a run: its config and directory, the dataset store, the task, the tracker,
    the scoring pool (created here, started and stopped by the driver) and the run's pair scores."""

    def __init__(self, cfg: RunConfig, run: RunDir, pool: Pool | None = None):
        self.cfg = cfg
        self.run = run
        self.store = DatasetStore(run.path)
        self.store.clean_tmp()
        self.task = load_task(cfg.task.name)
        self.target = cfg.target.model
        self.tracker = Tracker(run.path, cfg.tracking, cfg.model_dump(mode="json"))
        if pool is None:
            from qpo_ray.score.pool import ScoringPool

            # Named after where the run is: a copy of the run resumed beside it gets its own pool.
            pool = ScoringPool(cfg.target, self.task, app_name=f"qpo-target-{content_id(str(run.path), n=8)}")
        self.pool = pool
        self.scores = RunScores(cfg, self.task, run, self.store, pool)

    @property
    def calls(self) -> int:
        """Target calls this process made for the run."""
        return int(self.pool.stats["calls"])

    def close(self) -> None:
        self.pool.close()
        self.tracker.close()


Item = tuple[str, dict[str, str]]  # (pair_key, pair)


def _chunks_by_prompt(items: list[Item], size: int) -> list[list[Item]]:
    """Chunks of about ``size`` (key, pair) items that never split the pairs of one prompt: a prompt's batch
    accuracy (a reward component) is computed over all of its pairs in a request, so a chunk holds all of them."""
    groups: dict[str, list[Item]] = {}
    for item in items:
        groups.setdefault(item[1]["prompt"], []).append(item)
    chunks: list[list[Item]] = [[]]
    for group in groups.values():
        if chunks[-1] and len(chunks[-1]) + len(group) > size:
            chunks.append([])
        chunks[-1].extend(group)
    return [c for c in chunks if c]


class StepTimer:
    """Measures a step's wall time and the target calls/tokens the pool spent in it."""

    def __init__(self, pool: Pool):
        self.stats = pool.stats

    def __enter__(self) -> StepTimer:
        self.t0, self.c0, self.k0 = time.time(), self.stats["calls"], self.stats["tokens"]
        return self

    def __exit__(self, *exc) -> None:
        self.info = {"wall_s": round(time.time() - self.t0, 2), "target_calls": int(self.stats["calls"] - self.c0),
                     "target_tokens": int(self.stats["tokens"] - self.k0)}


def read_rows(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


__all__ = ["SCHEMA", "RunScores", "Session", "StepTimer", "read_rows"]
