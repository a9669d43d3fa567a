"""The merge rule (docs/design.md §2, Merge): how a loop's scored rows become the next dataset version.

1. drop exact duplicates among the new rows (same pair key: task, target, setting, query, prompt);
2. drop rows whose key is already in the dataset (a pair is scored and stored at most once);
3. keep rows whose raw reward exceeds the task's threshold;
4. commit ``parent rows + kept rows`` as the next version, atomically.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from qpo_ray.data.schema import rows_to_table
from qpo_ray.data.store import DatasetStore, Manifest


@dataclass
class MergeStats:
    new_rows: int
    duplicates_in_batch: int
    already_in_dataset: int
    below_threshold: int
    kept: int


def select_rows(rows: Sequence[dict[str, Any]], existing_keys: Container[str],
                threshold: float) -> tuple[list[dict], MergeStats]:
    """Apply the merge rule to scored rows; returns the rows to add and what was dropped."""
    seen: set[str] = set()
    dup = old = low = 0
    kept = []
    for r in rows:
        k = r["key"]
        if k in seen:
            dup += 1
            continue
        seen.add(k)
        if k in existing_keys:
            old += 1
            continue
        if not r["reward"] > threshold:
            low += 1
            continue
        kept.append(r)
    return kept, MergeStats(len(rows), dup, old, low, len(kept))


def merge_rows(store: DatasetStore, parent: int, version: int, rows: Sequence[dict[str, Any]], threshold: float,
               *, note: str = "") -> tuple[Manifest, MergeStats]:
    """Commit ``version`` = ``parent`` + the rows that pass the merge rule."""
    kept, stats = select_rows(rows, store.keys(parent), threshold)
    chunks: list[pa.Table] = [rows_to_table(kept, source=f"merge into v{version:03d}")] if kept else []
    manifest = store.commit(chunks, version=version, parent=parent, note=note, source=f"loop rows for v{version:03d}")
    return manifest, stats
