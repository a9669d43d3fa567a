"""Generated vs source: how a loop's new prompts did against the offline pool on the same collect queries.

QPO's claim is that the prompts the policy writes outperform the ones it was given. A loop scores its chosen
candidates (``collect/screen.py``) and, with ``collect.compare_pool``, every pool prompt on the same collect
queries; this module compares them, per query, with paired bootstrap intervals:

- per collect query with at least one new prompt: the new prompts' mean accuracy and reward against the best
  single pool prompt on train (the fixed prompt a user would pick), the pool prompt best on these very queries
  (chosen in hindsight) and the per-query pool oracle;
- per new prompt: its mean over the queries it was scored on against every pool prompt's on the same queries.
  It *beats the pool* when its accuracy is not lower than any pool prompt's and its mean pair score is higher
  than every pool prompt's. The pair score is the reward without its prompt-accuracy term
  (``reward − 10·prompt_acc``, e.g. ``10·correct − NLL(gold)`` zero-shot): that term averages over whichever
  queries shared the prompt's scoring request, so it would favour a prompt scored on a few lucky queries.

Pure: rows in, a JSON-able dict out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from qpo_ray.data.prompts import prompt_identity
from qpo_ray.data.schema import normalize_text
from qpo_ray.evaluate.stats import paired_bootstrap
from qpo_ray.score.rewards import SCALE

TOP_NEW = 5


def pair_score(row: Mapping[str, Any]) -> float:
    """A pair's reward without its prompt-accuracy term (which depends on the scoring request's other pairs)."""
    return float(row["reward"]) - SCALE * float(row.get("prompt_acc") or 0.0)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def generated_vs_source(scored: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]],
                        pool: Sequence[str], *, best_single: str | None, seed: int = 0,
                        top: int = TOP_NEW) -> dict[str, Any]:
    """``scored``: the loop's chosen rows with a boolean ``new``; ``reference``: the pool scored on the same
    collect queries. See the module doc for what is compared."""
    ref: dict[str, dict[str, Mapping[str, Any]]] = defaultdict(dict)  # query -> pool prompt -> row
    for r in reference:
        ref[normalize_text(r["query"])][r["prompt"]] = r
    new_rows = [r for r in scored if r.get("new")]
    out: dict[str, Any] = {"scored": len(scored), "new": len(new_rows),
                           "new_share": len(new_rows) / len(scored) if scored else None,
                           "new_prompts": len({prompt_identity(r["prompt"]) for r in new_rows})}
    by_query: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in new_rows:
        if ref.get(normalize_text(r["query"])):
            by_query[normalize_text(r["query"])].append(r)
    queries = sorted(by_query)
    if not queries:
        return {**out, "queries": 0, "vs": {}, "top_new": [], "beats_pool": 0}

    def pool_value(q: str, p: str, key: str) -> float | None:
        row = ref[q].get(p)
        return None if row is None else float(row[key])

    here = max(pool, key=lambda p: (_mean([pool_value(q, p, "correct") or 0.0 for q in queries]), p == best_single))
    out["best_pool_here"] = here
    out["best_single"] = best_single
    out["queries"] = len(queries)
    vs: dict[str, Any] = {}
    for key in ("correct", "reward"):
        gen = [_mean([float(r[key]) for r in by_query[q]]) for q in queries]
        others = {
            "best_single": [pool_value(q, best_single, key) if best_single is not None else None for q in queries],
            "best_pool_here": [pool_value(q, here, key) for q in queries],
            "oracle": [max((v for p in pool if (v := pool_value(q, p, key)) is not None), default=None)
                       for q in queries],
        }
        vs[key] = {"generated": _mean(gen),
                   **{name: {"mean": _mean([v for v in vals if v is not None]) if any(v is not None for v in vals)
                             else None, **paired_bootstrap(gen, vals, seed=seed)}
                      for name, vals in others.items()}}
    out["vs"] = vs

    per_prompt: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for q in queries:
        for r in by_query[q]:
            per_prompt[r["prompt"]].append(r)
    ranked = []
    for prompt, rows in per_prompt.items():
        qs = [normalize_text(r["query"]) for r in rows]
        acc, score = _mean([float(r["correct"]) for r in rows]), _mean([pair_score(r) for r in rows])
        pool_acc = {p: _mean([float(ref[q][p]["correct"]) for q in qs]) for p in pool if all(p in ref[q] for q in qs)}
        pool_score = {p: _mean([pair_score(ref[q][p]) for q in qs]) for p in pool_acc}
        if not pool_score:
            continue
        best_p = max(pool_score, key=pool_score.__getitem__)
        won = [r["query"] for r in rows
               if all(pair_score(r) > pair_score(ref[normalize_text(r["query"])][p]) for p in pool_score)]
        ranked.append({"prompt": prompt, "queries": len(rows), "accuracy": acc, "pair_score": score,
                       "best_pool_prompt": best_p, "best_pool_accuracy": pool_acc[best_p],
                       "best_pool_pair_score": pool_score[best_p], "margin": score - pool_score[best_p],
                       "beats_pool": acc >= max(pool_acc.values()) and score > pool_score[best_p],
                       "won_on": won})
    ranked.sort(key=lambda x: (-x["margin"], x["prompt"]))
    out["beats_pool"] = sum(x["beats_pool"] for x in ranked)
    out["top_new"] = ranked[:top]
    return out
