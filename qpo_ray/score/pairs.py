"""(query, prompt) pairs → full dataset rows: reuse known pairs, score the rest, apply the reward formula."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, Protocol

from qpo_ray.config import RunConfig
from qpo_ray.data.schema import pair_key, prompt_id, query_id
from qpo_ray.errors import DataError
from qpo_ray.score.engines.base import Components, ScoreRequest
from qpo_ray.score.rewards import compute_rewards, formula_for
from qpo_ray.tasks import Task

Pair = Mapping[str, Any] | Sequence[Any]  # {"query", "prompt", "label"?} or (query, prompt[, label])


class Scorer(Protocol):
    def score(self, requests: list[ScoreRequest]) -> list[Components]: ...


def _normalise(pairs: Sequence[Pair], task: Task) -> list[tuple[str, str, str]]:
    out = []
    for i, p in enumerate(pairs):
        if isinstance(p, Mapping):
            q, pr, lab = p.get("query"), p.get("prompt"), p.get("label")
        else:
            q, pr, lab = (tuple(p) + (None,))[:3]
        if not isinstance(q, str) or not isinstance(pr, str):
            raise DataError(f"pair {i}: 'query' and 'prompt' must be text")
        lab = lab if lab is not None else task.label_of(q)
        if lab is None:
            raise DataError(f"pair {i}: no label given and query {q[:60]!r} is not in task '{task.name}'")
        out.append((q, pr, str(lab)))
    return out


def num_demo_sets(cfg: RunConfig, phase: str) -> int:
    """Demonstration sets per few-shot pair: ``demo_sets_test`` when evaluating, else ``demo_sets_collect``."""
    return cfg.task.demo_sets_test if phase == "test" else cfg.task.demo_sets_collect


def requests_per_pair(cfg: RunConfig, phase: str) -> int:
    """Target requests one new pair costs: one per demonstration set in few-shot, else one."""
    return num_demo_sets(cfg, phase) if cfg.task.setting == "few_shot" else 1


def score_pairs(scorer: Scorer, task: Task, cfg: RunConfig, pairs: Sequence[Pair],
                known: MutableMapping[str, Mapping[str, Any]] | None = None, *, source: str, loop: int = 0,
                phase: str = "collect") -> list[dict[str, Any]]:
    """Full schema rows for ``pairs``, in input order.

    A pair whose key is in ``known`` (the dataset, or scored earlier in the run) is answered from there
    and never re-scored; repeats inside ``pairs`` are scored once. New rows are added to ``known`` when it
    is given. Few-shot pairs are scored under ``num_demo_sets(cfg, phase)`` seeded demonstration sets
    (never containing the query itself), one target request per set, averaged into ``acc_fs``.
    ``prompt_acc`` is the mean correctness of the prompt over the distinct pairs of this call (known ones
    included) and ``task.prompt_acc_prior`` pseudo-pairs at the call's mean, see ``rewards``.
    """
    setting, target = cfg.task.setting, cfg.target.model
    known = known if known is not None else {}
    items = _normalise(pairs, task)
    keys = [pair_key(task.name, target, setting, q, p) for q, p, _ in items]
    new: dict[str, tuple[str, str, str]] = {}
    for k, item in zip(keys, items, strict=True):
        if k not in known and k not in new:
            new[k] = item

    requests: list[ScoreRequest] = []
    owner: list[str] = []
    few_shot = setting == "few_shot"
    for k, (q, p, lab) in new.items():
        sets = task.demo_sets(requests_per_pair(cfg, phase), cfg.task.num_demos, cfg.seed, q) if few_shot else [None]
        for demos in sets:
            requests.append(ScoreRequest(task.name, setting, q, p, lab, demos))
            owner.append(k)
    comps = scorer.score(requests) if requests else []
    per_pair: dict[str, list[Components]] = {}
    for k, c in zip(owner, comps, strict=True):
        per_pair.setdefault(k, []).append(c)

    # The batch accuracy of a prompt counts every distinct pair of this call with a known correctness.
    batch = {k: (new[k][1], sum(c.correct for c in cs) / len(cs), sum(c.nll for c in cs) / len(cs))
             for k, cs in per_pair.items()}
    for k in dict.fromkeys(keys):
        row = known.get(k)
        if k not in batch and row is not None and row.get("correct") is not None:
            batch[k] = (row["prompt"], float(row["correct"]), float(row.get("nll") or 0.0))
    batch_keys = list(batch)
    rewards = compute_rewards(formula_for(task.type, setting), [batch[k][0] for k in batch_keys],
                              [batch[k][1] for k in batch_keys], [batch[k][2] for k in batch_keys],
                              cfg.task.prompt_acc_prior)
    for k, rw in zip(batch_keys, rewards, strict=True):
        if k in new:
            q, p, lab = new[k]
            known[k] = {"key": k, "task": task.name, "setting": setting, "target": target,
                        "query_id": query_id(task.name, q), "query": q, "label": lab, "prompt_id": prompt_id(p),
                        "prompt": p, **rw, "source": source, "loop": loop}
    return [dict(known[k]) for k in keys]
