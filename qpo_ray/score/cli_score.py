"""``qpo-ray score --in pairs --out scored``: score a file of (query, prompt[, label]) pairs on the target.

Input: parquet or JSONL with columns ``query``, ``prompt`` and optionally ``label`` (looked up in the task
when missing) and ``source`` (default ``offline:scored``). Output: rows of the dataset schema, as parquet
(``.parquet``) or JSONL (any other suffix). Scoring goes through a Ray Serve ``ScoringPool`` unless
``local`` asks for the engine in this process.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from qpo_ray.atomic import atomic_write_table
from qpo_ray.config import RunConfig
from qpo_ray.data.schema import rows_to_table
from qpo_ray.errors import DataError
from qpo_ray.jsonl import read_jsonl, write_jsonl
from qpo_ray.score.pairs import score_pairs
from qpo_ray.tasks import load_task

DEFAULT_SOURCE = "offline:scored"


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a parquet or JSONL pairs file, checked for text ``query``/``prompt``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"pairs file not found: {p}")
    if p.suffix.lower() == ".parquet":
        try:
            rows = pq.read_table(p).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{p}: not a readable parquet file ({type(e).__name__}: {e})") from None
    else:
        rows = [rec for _, rec in read_jsonl(p)]
    for i, r in enumerate(rows):
        for col in ("query", "prompt"):
            if not isinstance(r, dict) or not isinstance(r.get(col), str):
                raise DataError(f"{p}: row {i}: column '{col}' missing or not text")
    return rows


def write_rows(rows: list[dict[str, Any]], path: str | Path) -> None:
    p = Path(path)
    table = rows_to_table(rows, source=str(p))
    # Either way the output appears complete or not at all.
    if p.suffix.lower() == ".parquet":
        atomic_write_table(p, table)
    else:
        write_jsonl(p, table.to_pylist())


def score_file(cfg: RunConfig, in_path: str | Path, out_path: str | Path, *, local: bool = False,
               rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Score every pair of ``in_path`` (or ``rows``, already read from it) and write the schema rows to
    ``out_path``; returns a summary."""
    task = load_task(cfg.task.name)
    rows = read_pairs(in_path) if rows is None else rows
    t0 = time.time()
    by_source: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_source.setdefault(r.get("source") or DEFAULT_SOURCE, []).append(i)
    out: list[dict[str, Any] | None] = [None] * len(rows)
    known: dict[str, Any] = {}

    def run(scorer) -> None:
        for source, idx in by_source.items():
            for i, row in zip(idx, score_pairs(scorer, task, cfg, [rows[i] for i in idx], known, source=source),
                              strict=True):
                out[i] = row

    if local:
        from qpo_ray.score.engines import make_engine

        engine = make_engine(cfg.target, task)
        run(engine)
        stats = {"calls": None, "tokens": None}
    else:
        from qpo_ray.score.pool import ScoringPool

        with ScoringPool(cfg.target, task, run_id=f"score-{uuid.uuid4().hex[:8]}") as pool:
            run(pool)
            stats = dict(pool.stats)
    write_rows(out, out_path)  # type: ignore[arg-type]
    summary = {"rows": len(rows), "distinct_pairs": len(known), "target_calls": stats["calls"],
               "target_tokens": stats["tokens"], "seconds": round(time.time() - t0, 2),
               "mean_reward": sum(r["reward"] for r in out) / max(1, len(out)),  # type: ignore[index]
               "accuracy": sum(r["correct"] for r in out) / max(1, len(out))}  # type: ignore[index]
    print(f"[qpo-ray] scored {summary['rows']} pairs → {out_path}: accuracy {summary['accuracy']:.3f}, "
          f"mean reward {summary['mean_reward']:.3f}", file=sys.stderr)
    return summary
