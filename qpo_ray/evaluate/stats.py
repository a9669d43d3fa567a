"""The numbers every evaluation reports: paired bootstrap confidence intervals and what the prompts look like.

Pure functions over per-query values; nothing here knows about Ray, models or targets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from qpo_ray.data.schema import normalize_text

BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95
_TOKEN = re.compile(r"\w+|[^\w\s]")


def paired_bootstrap(a: Sequence[float | None], b: Sequence[float | None], *, samples: int = BOOTSTRAP_SAMPLES,
                     confidence: float = CONFIDENCE, seed: int = 0) -> dict[str, Any]:
    """Mean of ``a - b`` over the queries where both are known, with a paired bootstrap interval.

    The queries are resampled with replacement ``samples`` times (seeded); the interval is the central
    ``confidence`` share of the resampled means. ``tie`` is True when the interval contains 0: the two
    methods are not told apart by these queries."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} values against {len(b)}: a paired comparison needs one per query each")
    d = np.array([x - y for x, y in zip(a, b, strict=True) if x is not None and y is not None], dtype=np.float64)
    if d.size == 0:
        return {"diff": None, "lo": None, "hi": None, "n": 0, "tie": True}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(samples, d.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = (float(x) for x in np.percentile(means, [tail, 100 - tail]))
    return {"diff": float(d.mean()), "lo": lo, "hi": hi, "n": int(d.size), "tie": bool(lo <= 0.0 <= hi)}


def is_degenerate(prompt: str, repeats: int = 3, max_ngram: int = 3) -> bool:
    """Empty (after whitespace), or some word, punctuation mark or run of up to ``max_ngram`` of them repeated
    ``repeats`` or more times in a row ("the the the", "step by step by step by")."""
    toks = _TOKEN.findall(prompt.casefold())
    if not toks:
        return True
    for n in range(1, max_ngram + 1):
        for i in range(len(toks) - n * repeats + 1):
            gram = toks[i:i + n]
            if all(toks[i + k * n:i + (k + 1) * n] == gram for k in range(1, repeats)):
                return True
    return False


def prompt_stats(prompts: Iterable[str], pool: Iterable[str]) -> dict[str, Any]:
    """How many distinct prompts a method wrote, and what share are verbatim pool prompts (after the
    whitespace/case normalisation of question identity) and degenerate (:func:`is_degenerate`). An empty
    prompt counts as degenerate unless the pool holds one too: then it is the "no instruction" choice."""
    ps = list(prompts)
    known = {normalize_text(p) for p in pool}
    n = len(ps)
    if not n:
        return {"prompts": 0, "distinct": 0, "verbatim_pool_share": None, "degenerate_share": None}
    chosen_empty = "" in known
    return {"prompts": n, "distinct": len({normalize_text(p) for p in ps}),
            "verbatim_pool_share": sum(normalize_text(p) in known for p in ps) / n,
            "degenerate_share": sum(is_degenerate(p) and not (chosen_empty and not p.strip()) for p in ps) / n}
