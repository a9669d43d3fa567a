"""The abstaining rerank's margin, fitted on validation queries held out of training.

Rerank (``qpo_ray.policy.generate.pick``) keeps the best single prompt on train unless another candidate's
``r̂(q, p)`` beats it by more than a margin. r̂ is noisy where the logs' per-query signal is weak (Prompt-OIRL's
MAWPS/SVAMP logs): a plain argmax then swaps a good default for a prompt r̂ merely guesses is better, and
loses on average. The margin is the switching threshold that did best on queries the policy never saw;
with none that helps, it is above every gap, and rerank is the best single prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

GRID_QUANTILES = np.linspace(0.0, 0.9, 10)  # margins tried: these quantiles of the positive gaps, 0 and "never"


def fit_margin(scores: Sequence[Sequence[float]], correct: Sequence[Sequence[float]],
               default: Sequence[int | None]) -> dict[str, Any]:
    """The margin that maximises the mean correctness gain over the default prompt on validation queries.

    ``scores[i]`` / ``correct[i]``: r̂ and the recorded correctness of query i's candidates; ``default[i]``: the
    index of the default (best single) prompt among them, or None (the query then does not count). The grid is
    0, quantiles of the positive r̂ gaps and the largest gap ("never switch"); ties go to the larger margin,
    the more cautious. Returns the margin, its validation gain (points) and switch share, and the whole curve."""
    gaps, gains = [], []
    for s, c, d in zip(scores, correct, default, strict=True):
        if d is None:
            continue
        b = max(range(len(s)), key=s.__getitem__)
        gaps.append(s[b] - s[d])
        gains.append(c[b] - c[d])
    if not gaps:
        return {"margin": 0.0, "val_queries": 0, "val_gain_pts": None, "switch_share": None, "curve": []}
    g, w = np.asarray(gaps, dtype=float), np.asarray(gains, dtype=float)
    pos = g[g > 0]
    grid = {0.0, float(g.max())} | ({float(x) for x in np.quantile(pos, GRID_QUANTILES)} if pos.size else set())
    curve = [{"margin": m, "switch_share": float(np.mean(g > m)), "gain_pts": float(100 * np.mean(np.where(g > m, w, 0.0)))}
             for m in sorted(grid)]
    best = max(curve, key=lambda r: (round(r["gain_pts"], 9), r["margin"]))
    return {"margin": best["margin"], "val_queries": len(gaps), "val_gain_pts": best["gain_pts"],
            "switch_share": best["switch_share"], "curve": curve}


__all__ = ["fit_margin"]
