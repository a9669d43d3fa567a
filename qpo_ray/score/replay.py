"""Replay scoring: answer a ``(query, prompt)`` pair from recorded rows instead of calling a target LLM.

The recorded table is any parquet/JSONL with ``query``, ``prompt`` and ``correct`` and/or ``reward``
(a dataset version, an import, a test log). It makes evaluation of a policy on logged data (the
Prompt-OIRL logs) possible without a model, and it is deterministic, which tests like.

Matching rule (:func:`match_prompt`):

1. The query must be recorded: exact match after normalisation (whitespace collapsed, case folded).
   An unknown query is ``none``.
2. ``exact``: a recorded prompt of that query equals the asked prompt after the same normalisation.
3. ``approx``: otherwise the recorded prompt OF THE SAME QUERY with the highest similarity, where
   ``similarity(a, b)`` = token-set Jaccard ``|A ∩ B| / |A ∪ B|`` over case-folded word tokens (``\\w+``)
   — word order and punctuation are ignored, and one shared word among many counts for little. Ties are
   broken by difflib's ``SequenceMatcher.ratio`` on the normalised texts, then by the text itself, so
   the choice is deterministic. The match is kept only if its Jaccard is ``>= min_similarity``
   (default :data:`MIN_SIMILARITY` = 0.5); below that the pair is ``none`` (unmatched).

Repeats: several recorded rows of the same (normalised) query and prompt are averaged — the result's
``correct`` and ``reward`` are the means over the rows that carry them (``None`` when none do).
An unmatched pair has ``correct = reward = None``; the caller decides what that means.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from qpo_ray.data.schema import normalize_text  # the same identity the import split uses
from qpo_ray.errors import DataError
from qpo_ray.jsonl import read_jsonl

MIN_SIMILARITY = 0.5
MatchKind = Literal["exact", "approx", "none"]
KINDS: tuple[MatchKind, ...] = ("exact", "approx", "none")
_WORD = re.compile(r"\w+")


def tokens(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.casefold()))


def similarity(a: str, b: str) -> float:
    """Token-set Jaccard of two prompts in [0, 1]; two prompts without any word token count as 1.0."""
    ta, tb = tokens(a), tokens(b)
    if not ta and not tb:
        return 1.0 if normalize_text(a) == normalize_text(b) else 0.0
    return len(ta & tb) / len(ta | tb)


@dataclass(frozen=True)
class Match:
    """Which recorded prompt answers an asked one: ``prompt`` is the recorded (normalised) text or None."""

    kind: MatchKind
    prompt: str | None
    similarity: float


def match_prompt(prompt: str, candidates: Iterable[str], min_similarity: float = MIN_SIMILARITY) -> Match:
    """Match ``prompt`` against the recorded prompts of one query (see the module doc for the rule)."""
    norm = normalize_text(prompt)
    cands = {normalize_text(c) for c in candidates}
    if norm in cands:
        return Match("exact", norm, 1.0)
    if not cands:
        return Match("none", None, 0.0)
    scored = [(similarity(norm, c), difflib.SequenceMatcher(None, norm, c).ratio(), c) for c in cands]
    jac, _, best = min(scored, key=lambda t: (-t[0], -t[1], t[2]))  # highest Jaccard, ratio; then text
    if jac < min_similarity:
        return Match("none", None, jac)
    return Match("approx", best, jac)


@dataclass(frozen=True)
class ReplayResult:
    """The replayed outcome of one pair. ``rows`` = recorded rows averaged (0 when unmatched)."""

    correct: float | None
    reward: float | None
    kind: MatchKind
    matched_prompt: str | None
    similarity: float
    rows: int


class _Agg:
    """Running sums of the recorded rows of one (query, prompt)."""

    __slots__ = ("correct_sum", "correct_n", "reward_sum", "reward_n", "rows")

    def __init__(self) -> None:
        self.correct_sum = self.reward_sum = 0.0
        self.correct_n = self.reward_n = self.rows = 0

    def add(self, correct: float | None, reward: float | None) -> None:
        self.rows += 1
        if correct is not None:
            self.correct_sum += correct
            self.correct_n += 1
        if reward is not None:
            self.reward_sum += reward
            self.reward_n += 1

    def means(self) -> tuple[float | None, float | None]:
        c = self.correct_sum / self.correct_n if self.correct_n else None
        r = self.reward_sum / self.reward_n if self.reward_n else None
        return c, r


class ReplayTable:
    """Recorded outcomes by normalised query, then normalised prompt; counts the match kinds it served."""

    def __init__(self, min_similarity: float = MIN_SIMILARITY):
        if not 0.0 <= min_similarity <= 1.0:
            raise ValueError(f"min_similarity {min_similarity} is not within [0, 1]")
        self.min_similarity = min_similarity
        self._data: dict[str, dict[str, _Agg]] = {}
        self.rows = 0
        self.counts: Counter[str] = Counter({k: 0 for k in KINDS})

    # -- building -----------------------------------------------------------------------------------
    def add(self, query: str, prompt: str, correct: float | None = None, reward: float | None = None) -> None:
        """Record one row; at least one of correct/reward is needed."""
        if correct is None and reward is None:
            raise ValueError(f"replay row for query {query[:60]!r}: neither correct nor reward")
        agg = self._data.setdefault(normalize_text(query), {}).setdefault(normalize_text(prompt), _Agg())
        agg.add(None if correct is None else float(correct), None if reward is None else float(reward))
        self.rows += 1

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]], *, min_similarity: float = MIN_SIMILARITY,
                  where: str = "<rows>", **filters: str | None) -> ReplayTable:
        """A table from row dicts; ``filters`` (task=, target=, setting=) keep only matching rows."""
        table = cls(min_similarity)
        want = {k: v for k, v in filters.items() if v is not None}
        for i, row in enumerate(rows):
            if any(row.get(k) != v for k, v in want.items()):
                continue
            q, p = row.get("query"), row.get("prompt")
            if not isinstance(q, str) or not isinstance(p, str):
                raise DataError(f"{where}: row {i}: 'query' and 'prompt' must be text")
            try:
                table.add(q, p, _num(row.get("correct")), _num(row.get("reward")))
            except (TypeError, ValueError) as e:
                raise DataError(f"{where}: row {i}: {e}") from None
        return table

    @classmethod
    def from_file(cls, path: str | Path, *, min_similarity: float = MIN_SIMILARITY, task: str | None = None,
                  target: str | None = None, setting: str | None = None) -> ReplayTable:
        """A table from a parquet file, a folder of parquet files (a dataset version) or a JSONL file."""
        p = Path(path)
        if not p.exists():
            raise DataError(f"replay table not found: {p}")
        rows = (r for _, r in read_jsonl(p)) if p.suffix.lower() in (".jsonl", ".json") else _parquet_rows(p)
        return cls.from_rows(rows, min_similarity=min_similarity, where=str(p), task=task, target=target,
                             setting=setting)

    # -- answering ----------------------------------------------------------------------------------
    def lookup(self, query: str, prompt: str) -> ReplayResult:
        """The recorded outcome of ``(query, prompt)``; counts the match kind."""
        prompts = self._data.get(normalize_text(query))
        m = match_prompt(prompt, prompts, self.min_similarity) if prompts else Match("none", None, 0.0)
        self.counts[m.kind] += 1
        if m.prompt is None:
            return ReplayResult(None, None, "none", None, m.similarity, 0)
        agg = prompts[m.prompt]
        correct, reward = agg.means()
        return ReplayResult(correct, reward, m.kind, m.prompt, m.similarity, agg.rows)

    def report(self) -> dict[str, int]:
        """How many lookups matched exactly, approximately or not at all."""
        out = {k: self.counts[k] for k in KINDS}
        out["total"] = sum(out.values())
        return out

    def reset_counts(self) -> None:
        self.counts = Counter({k: 0 for k in KINDS})

    @property
    def num_queries(self) -> int:
        return len(self._data)

    def __len__(self) -> int:
        return self.rows


def _num(val: Any) -> float | None:
    if val is None:
        return None
    if isinstance(val, bool | int | float):
        return float(val)
    raise TypeError(f"expected a number, got {type(val).__name__} {val!r}")


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no parquet files")
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise DataError(f"{f}: not a readable parquet file ({e})") from None
        names = set(pf.schema_arrow.names)
        if not {"query", "prompt"} <= names or not names & {"correct", "reward"}:
            raise DataError(f"{f}: a replay table needs columns query, prompt and correct or reward")
        cols = [c for c in ("task", "target", "setting", "query", "prompt", "correct", "reward") if c in names]
        for batch in pf.iter_batches(columns=cols):
            yield from batch.to_pylist()


__all__ = ["KINDS", "MIN_SIMILARITY", "Match", "ReplayResult", "ReplayTable", "match_prompt", "similarity"]
