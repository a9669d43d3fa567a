"""Target engine that answers from recorded rows (``target.replay_table``) instead of a model.

Lookup and matching are ``qpo_ray.score.replay.ReplayTable``'s; a pair it cannot match is a TargetError.
The recorded table has no likelihoods, so ``nll`` is 0 and rewards reduce to their accuracy terms.
"""

from __future__ import annotations

from collections.abc import Iterable

from qpo_ray.config import TargetConfig
from qpo_ray.errors import TargetError
from qpo_ray.score.engines.base import Components, ScoreRequest, TaskBook
from qpo_ray.tasks import Task


class ReplayEngine:
    def __init__(self, cfg: TargetConfig, tasks: Task | Iterable[Task] | None = None):
        from qpo_ray.score.replay import ReplayTable

        if not cfg.replay_table:
            raise TargetError("target.engine='replay' needs target.replay_table (a parquet/JSONL of recorded rows)")
        self.target = cfg.model
        self.book = TaskBook(tasks)
        self.table = ReplayTable.from_file(cfg.replay_table)

    def score(self, requests: list[ScoreRequest]) -> list[Components]:
        out = []
        for r in requests:
            self.book.task(r)
            hit = self.table.lookup(r.query, r.prompt)
            if hit.correct is None:
                raise TargetError(f"replay: no recorded outcome for query {r.query[:60]!r} with prompt "
                                  f"{r.prompt[:60]!r}")
            out.append(Components(correct=float(hit.correct), nll=0.0, tokens=0, calls=0))
        return out
