"""The abstaining rerank's margin, fitted on validation queries held out of training.

Rerank (``qpo_ray.policy.generate.pick``) keeps the best single prompt on train unless another candidate's
``r̂(q, p)`` beats it by more than a margin. r̂ is noisy where the logs' per-query signal is weak (Prompt-OIRL's
MAWPS/SVAMP logs): a plain argmax then swaps a good default for a prompt r̂ merely guesses is better, and
loses on average. The margin is the switching threshold that did best on queries the policy never saw,
among those whose gain there clears its paired bootstrap 95% interval (a gain inside the interval is a tie:
on 133 held-out MAWPS questions, +1.5 points at margin 0 was one such tie, and the same margin lost 0.8
points on the test questions). With none that clears it, the margin is above every gap: rerank is then the
best single prompt.

``fit_margin`` is the fit itself, on r̂ and the recorded correctness; ``fit_on_validation`` scores a replay
evaluation's held-out queries with the trained policy and fits on them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qpo_ray.data.schema import normalize_text
from qpo_ray.evaluate.stats import paired_bootstrap

if TYPE_CHECKING:
    from qpo_ray.evaluate.split import OfflineSplit

log = logging.getLogger("qpo_ray")

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


def fit_on_validation(policy_dir: Path, split: OfflineSplit, default: str | None) -> dict[str, Any]:
    """Rerank's margin fitted on ``split``'s held-out validation queries, ranked by the policy of
    ``policy_dir``; ``default`` is the best single prompt on train. Returns :func:`fit_margin`'s record
    with ``fitted: True``."""
    from qpo_ray.policy.generate import candidate_scores
    from qpo_ray.policy.model import QPOPolicy

    norm = [normalize_text(q) for q in split.val_queries]
    keys = [sorted(split.val_acc[q]) for q in norm]
    scores = candidate_scores(QPOPolicy.load(policy_dir), split.val_queries,
                              [[split.prompt_text[k] for k in ks] for ks in keys])
    correct = [[split.val_acc[q][k] for k in ks] for q, ks in zip(norm, keys, strict=True)]
    dkey = normalize_text(default) if default is not None else None
    fitted = fit_margin(scores, correct, [ks.index(dkey) if dkey in ks else None for ks in keys])
    if fitted["val_queries"]:
        log.info("offline eval: rerank's margin %.3f: it leaves the best single prompt on %.0f%% of %d validation "
                 "queries, %+.2f pts there", fitted["margin"], 100 * fitted["switch_share"], fitted["val_queries"],
                 fitted["val_gain_pts"])
    else:
        log.warning("offline eval: no validation query has the best single prompt recorded; rerank's margin is 0")
    return {**fitted, "fitted": True}


__all__ = ["fit_margin", "fit_on_validation"]
