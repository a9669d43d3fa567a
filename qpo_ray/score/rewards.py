"""Where the reward is: raw reward components → raw reward (docs/design.md §2), with no target call.

Each scored pair carries ``correct``, ``nll`` and ``prompt_acc``; a formula is a pure function of those,
so a stored dataset can be re-rewarded after a formula changes.

- classification, zero-shot: ``r = 10·correct + 10·acc(p) − NLL(gold label)``
- classification, few-shot:  ``r = 10·(acc_fs(q, p) + avg_acc_fs(p))``; ``correct`` holds ``acc_fs``, the
  fraction of the demonstration sets under which ``q`` was answered correctly
- math:                      ``r = 10·correct + 10·avg_acc − mean NLL of the response tokens``

``acc(p)`` / ``avg_acc`` / ``avg_acc_fs(p)`` (the ``prompt_acc`` column) is the mean ``correct`` over the
distinct pairs with prompt ``p`` in one scoring request, those scored before included (``score_pairs`` with
``known``). A request is one driver step (``RunScores.score``: bootstrap, a loop's score step, an eval) or one
``source`` group of a ``qpo-ray score`` input; both count the same pairs, so a pair gets the same reward
either way. That is the reference's "accuracy over the evaluation batch the prompt was scored with", with
one change: ``prior_pairs`` pseudo-pairs at the request's mean ``correct`` join each prompt's count
(``task.prompt_acc_prior``). Without them a prompt the loops wrote, scored on one or two collect queries,
gets ``acc(p)`` 1 or 0 from those alone: a success earns +10 on top of its ``correct``, its failures fall
below the merge threshold, and ``r̂`` learns from the dataset that such a prompt always wins. For a pool
prompt scored on every train query the pseudo-pairs move ``acc(p)`` by a few percent.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

Formula = Literal["zero_shot", "few_shot", "math"]
SCALE = 10.0


def formula_for(task_type: str, setting: str) -> Formula:
    """Which formula a task type and setting use."""
    if task_type == "math":
        return "math"
    if setting not in ("zero_shot", "few_shot"):
        raise ValueError(f"unknown setting '{setting}'")
    return setting  # type: ignore[return-value]


def zero_shot_reward(correct: float, nll: float, prompt_acc: float) -> float:
    return SCALE * correct + SCALE * prompt_acc - nll


def few_shot_reward(acc_fs: float, avg_acc_fs: float) -> float:
    return SCALE * (acc_fs + avg_acc_fs)


def math_reward(correct: float, nll: float, avg_acc: float) -> float:
    return SCALE * correct + SCALE * avg_acc - nll


def reward(formula: Formula, correct: float, nll: float, prompt_acc: float) -> float:
    """The raw reward of one pair from its stored components."""
    if formula == "few_shot":
        return few_shot_reward(correct, prompt_acc)
    if formula == "math":
        return math_reward(correct, nll, prompt_acc)
    if formula == "zero_shot":
        return zero_shot_reward(correct, nll, prompt_acc)
    raise ValueError(f"unknown reward formula '{formula}'")


def prompt_accuracy(prompts: Sequence[str], correct: Sequence[float], prior_pairs: float = 0.0) -> list[float]:
    """Per pair, the mean ``correct`` over all pairs with the same prompt (the batch accuracy of a prompt),
    counting ``prior_pairs`` more pairs at the mean ``correct`` of all pairs given."""
    if len(prompts) != len(correct):
        raise ValueError(f"{len(prompts)} prompts but {len(correct)} correctness values")
    if prior_pairs < 0:
        raise ValueError(f"prior_pairs must be >= 0, got {prior_pairs}")
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for p, c in zip(prompts, correct, strict=True):
        total[p] += c
        count[p] += 1
    prior = prior_pairs * sum(correct) / len(correct) if correct else 0.0
    return [(total[p] + prior) / (count[p] + prior_pairs) for p in prompts]


def compute_rewards(formula: Formula, prompts: Sequence[str], correct: Sequence[float],
                    nll: Sequence[float], prior_pairs: float = 0.0) -> list[dict[str, float]]:
    """Rewards for the pairs of one scoring call: ``{reward, correct, nll, prompt_acc}`` per pair."""
    acc = prompt_accuracy(prompts, correct, prior_pairs)
    return [{"reward": reward(formula, c, n, a), "correct": float(c), "nll": float(n), "prompt_acc": a}
            for c, n, a in zip(correct, nll, acc, strict=True)]

