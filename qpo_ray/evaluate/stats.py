"""The numbers every evaluation reports: paired bootstrap confidence intervals and what the prompts look like.

Pure functions over per-query values; nothing here knows about Ray, models or targets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from qpo_ray.data.prompts import is_degenerate, prompt_identity

BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95


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


def prompt_stats(prompts: Iterable[str], pool: Iterable[str], earlier: Iterable[str] | None = None) -> dict[str, Any]:
    """How many distinct prompts a method wrote; the share that are pool prompts (``prompt_identity``: case,
    whitespace and punctuation aside), that are *new* (in none of the ``earlier`` prompts, e.g. the dataset
    the policy was trained on; None when not given), and that are degenerate (:func:`is_degenerate`). An
    empty prompt counts as degenerate unless the pool holds one too: then it is the "no instruction" choice."""
    ps = list(prompts)
    known = {prompt_identity(p) for p in pool}
    n = len(ps)
    if not n:
        return {"prompts": 0, "distinct": 0, "verbatim_pool_share": None, "new_share": None, "degenerate_share": None}
    seen = None if earlier is None else {prompt_identity(p) for p in earlier}
    chosen_empty = "" in known
    return {"prompts": n, "distinct": len({prompt_identity(p) for p in ps}),
            "verbatim_pool_share": sum(prompt_identity(p) in known for p in ps) / n,
            "new_share": None if seen is None else sum(prompt_identity(p) not in seen for p in ps) / n,
            "degenerate_share": sum(is_degenerate(p) and not (chosen_empty and not p.strip()) for p in ps) / n}
