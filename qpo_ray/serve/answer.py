"""How ``/v1/answer`` reads the target: the way the task is scored, through the scoring engine's own calls.

- ``label`` (classification): the label whose verbalizer the target rates most likely after the rendered
  prompt + query (``OpenAIEngine.label_nlls``, the arithmetic scoring uses), with every label's mean token
  log-probability;
- ``math``: the target's greedy chat reply (``OpenAIEngine.math_reply``) and the number scoring extracts from
  it (``qpo_ray.score.engines.base.predicted_answer``).
"""

from __future__ import annotations

from typing import Any, Literal

from qpo_ray.score.engines.base import predicted_answer, predicted_label
from qpo_ray.score.engines.openai_engine import OpenAIEngine
from qpo_ray.tasks import Task

Mode = Literal["label", "math"]


def answer_mode(task: Task) -> Mode:
    return "label" if task.type == "classification" else "math"


def read_answer(engine: OpenAIEngine, task: Task, text: str, deadline: float | None = None) -> dict[str, Any]:
    """The fields of one ``AnswerItem`` beyond query, prompt and input. Blocking (HTTP); raises TargetError
    (``TargetTimeout`` once ``deadline``, a ``time.monotonic()`` instant, has passed)."""
    if answer_mode(task) == "label":
        nll, _ = engine.label_nlls(task, text, deadline)
        best = predicted_label(task, nll)
        return {"answer": task.labels[best], "score": -nll[best],
                "label_scores": {lab: -v for lab, v in zip(task.labels, nll, strict=True)}}
    reply, _, _ = engine.math_reply(text, deadline)
    return {"answer": predicted_answer(reply), "reply": reply}


__all__ = ["Mode", "answer_mode", "read_answer"]
