"""The abstaining rerank's margin, fitted on validation queries held out of training.

Rerank (``qpo_ray.policy.generate.pick``) keeps the best single prompt on train unless another candidate's
``r̂(q, p)`` beats it by more than a margin. r̂ is noisy where the logs' per-query signal is weak (Prompt-OIRL's
MAWPS/SVAMP logs): a plain argmax then swaps a good default for a prompt r̂ merely guesses is better, and
loses on average. The margin is the switching threshold that did best on queries the policy never saw,
among those whose gain there clears its paired bootstrap 95% interval (a gain inside the interval is a tie:
on 133 held-out MAWPS questions, +1.5 points at margin 0 was one such tie, and the same margin lost 0.8
points on the test questions). With none that clears it, the margin is above every gap: rerank is then the
best single prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from qpo_ray.evaluate.stats import paired_bootstrap

GRID_QUANTILES = np.linspace(0.0, 0.9, 10)  # margins tried: these quantiles of the positive gaps, 0 and "never"


def fit_margin(scores: Sequence[Sequence[float]], correct: Sequence[Sequence[float]],
               default: Sequence[int | None]) -> dict[str, Any]:
    """The margin with the highest mean correctness gain over the default prompt on validation queries, among
    those whose gain has a paired bootstrap 95% interval above 0 (else "never switch").

    ``scores[i]`` / ``correct[i]``: r̂ and the recorded correctness of query i's candidates; ``default[i]``: the
    index of the default (best single) prompt among them, or None (the query then does not count). The grid is
    0, quantiles of the positive r̂ gaps and the largest gap ("never switch"); ties go to the larger margin,
    the more cautious. Returns the margin, its validation gain (points, with its interval) and switch share,
    and the whole curve."""
    gaps, gains = [], []
    for s, c, d in zip(scores, correct, default, strict=True):
        if d is None:
            continue
        b = max(range(len(s)), key=s.__getitem__)
        gaps.append(s[b] - s[d])
        gains.append(c[b] - c[d])
    if not gaps:
        return {"margin": 0.0, "val_queries": 0, "val_gain_pts": None, "val_gain_ci_pts": None, "switch_share": None,
                "curve": []}
    g, w = np.asarray(gaps, dtype=float), np.asarray(gains, dtype=float)
    pos = g[g > 0]
    grid = {0.0, float(g.max())} | ({float(x) for x in np.quantile(pos, GRID_QUANTILES)} if pos.size else set())
    curve = []
    for m in sorted(grid):
        per_query = np.where(g > m, w, 0.0)
        ci = paired_bootstrap(per_query.tolist(), [0.0] * len(per_query))
        curve.append({"margin": m, "switch_share": float(np.mean(g > m)), "gain_pts": float(100 * per_query.mean()),
                      "gain_ci_pts": [100 * ci["lo"], 100 * ci["hi"]]})
    never = curve[-1]  # above the largest gap: no switch, no gain
    clear = [r for r in curve if r["gain_ci_pts"][0] > 0]
    best = max(clear, key=lambda r: (round(r["gain_pts"], 9), r["margin"])) if clear else never
    return {"margin": best["margin"], "val_queries": len(gaps), "val_gain_pts": best["gain_pts"],
            "val_gain_ci_pts": best["gain_ci_pts"], "switch_share": best["switch_share"], "curve": curve}


__all__ = ["fit_margin"]
