"""Which of the policy's candidate prompts the target is asked about (QPO's exploration, docs/design.md §2 Collect).

The policy proposes several prompts per collect query. Per query, candidates that are the same prompt
(``prompt_identity``), pairs already scored in this run or stored in the dataset, and degenerate prompts
are dropped; the rest are ranked by the reward head's ``r̂(q, p)`` and only the best ``per_query`` are
scored. ``new_share`` of those slots go first to *new* prompts (no earlier dataset version holds them), so
that the loops find prompts no one wrote instead of re-scoring the pool. Pure: no model, no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from qpo_ray.data.prompts import is_degenerate, prompt_identity
from qpo_ray.data.schema import normalize_text


@dataclass(frozen=True)
class Candidate:
    query: str
    label: str
    prompt: str
    rhat: float | None = None  # r̂(q, p); None without the "last_prompt" head: sample order is kept


@dataclass
class ScreenStats:
    queries: int = 0
    sampled: int = 0  # candidates the policy proposed
    repeats: int = 0  # the same prompt again for the same query
    known_pairs: int = 0  # (query, prompt) already scored in this run or stored in the dataset
    degenerate: int = 0
    screened_out: int = 0  # target calls r̂ saved: fresh candidates not scored
    chosen: int = 0
    chosen_new: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "new_share": self.chosen_new / self.chosen if self.chosen else None}


def pair_identity(query: str, prompt: str) -> tuple[str, str]:
    """What "the same pair" means when screening: the query's identity and the prompt's."""
    return normalize_text(query), prompt_identity(prompt)


def screen(candidates: Sequence[Candidate], *, seen_pairs: Container[tuple[str, str]],
           known_prompts: Container[str], per_query: int, new_share: float) -> tuple[list[Candidate], ScreenStats]:
    """The candidates to score, grouped by query in first-seen order, best ``r̂`` first within a query.

    ``seen_pairs`` holds :func:`pair_identity` of every pair scored or stored before; ``known_prompts`` the
    ``prompt_identity`` of every prompt in earlier dataset versions (a prompt outside it is *new*). Of each
    query's ``per_query`` slots, ``ceil(new_share × per_query)`` go to the best new candidates, the rest to
    the best remaining ones, new or not."""
    if per_query < 1 or not 0.0 <= new_share <= 1.0:
        raise ValueError(f"per_query={per_query} must be >= 1 and new_share={new_share} within [0, 1]")
    stats = ScreenStats(sampled=len(candidates))
    by_query: dict[str, list[Candidate]] = {}
    for c in candidates:
        by_query.setdefault(c.query, []).append(c)
    out: list[Candidate] = []
    reserved = math.ceil(new_share * per_query)
    for group in by_query.values():
        stats.queries += 1
        ranked = sorted(enumerate(group), key=lambda ic: (-(ic[1].rhat if ic[1].rhat is not None else 0.0), ic[0]))
        fresh: list[Candidate] = []
        seen: set[str] = set()
        for _, c in ranked:
            ident = prompt_identity(c.prompt)
            if ident in seen:
                stats.repeats += 1
            elif pair_identity(c.query, c.prompt) in seen_pairs:
                stats.known_pairs += 1
            elif c.prompt.strip() and is_degenerate(c.prompt):
                stats.degenerate += 1
            else:
                fresh.append(c)
            seen.add(ident)
        new = [c for c in fresh if prompt_identity(c.prompt) not in known_prompts]
        first = new[:reserved]
        rest = [c for c in fresh if c not in first][: per_query - len(first)]
        chosen = sorted(first + rest, key=fresh.index)
        stats.chosen += len(chosen)
        stats.chosen_new += sum(c in new for c in chosen)
        stats.screened_out += len(fresh) - len(chosen)
        out += chosen
    return out, stats
