"""The one interface to a target LLM: score a batch of requests, return raw reward components.

An engine knows the target model and nothing about datasets, rewards or Ray. What a request means
(classification by label likelihood, math by greedy answer) is decided by its task; the helpers here
turn a request into the text every engine scores, so engines differ only in how they call the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from qpo_ray.errors import TargetError
from qpo_ray.tasks import Demo, Task, answers_match, extract_number


@dataclass(frozen=True)
class ScoreRequest:
    """One (query, prompt) to score on the target; ``demos`` makes it a few-shot request."""

    task: str  # task name; the engine holds the Task
    setting: str  # zero_shot | few_shot
    query: str
    prompt: str
    label: str  # gold label (classification) or gold answer (math)
    demos: tuple[Demo, ...] | None = None


@dataclass
class Components:
    """Raw outcome of one request. ``nll``: gold-label mean token NLL (classification) or the response's
    mean token NLL (math). ``tokens``/``calls``: target tokens and calls this request consumed."""

    correct: float
    nll: float
    tokens: int
    calls: int
    reply: str | None = None  # math: the target's answer text
    pred: str | None = None  # predicted label, or the extracted number as text


@runtime_checkable
class TargetEngine(Protocol):
    target: str  # the target's name in pair keys (TargetConfig.model)

    def score(self, requests: list[ScoreRequest]) -> list[Components]:
        """Components for each request, in order. Raises TargetError for a request it cannot score."""
        ...


class TaskBook:
    """The tasks an engine can score, by name (requests carry only the name)."""

    def __init__(self, tasks: Task | Iterable[Task] | None = None):
        self.tasks: dict[str, Task] = {}
        for t in [tasks] if isinstance(tasks, Task) else tasks or ():
            self.tasks[t.name] = t

    def task(self, req: ScoreRequest) -> Task:
        try:
            return self.tasks[req.task]
        except KeyError:
            raise TargetError(f"the engine has no task '{req.task}' (has: {sorted(self.tasks) or 'none'})") from None


def encode(tok, text: str, special: bool = True) -> list[int]:
    """Token ids of ``text`` with a Hugging Face tokenizer (special tokens only when asked)."""
    return tok(text, add_special_tokens=special)["input_ids"]


def chat_ids(tok, text: str) -> list[int]:
    """A user turn through the tokenizer's chat template when it has one, else the raw text."""
    if getattr(tok, "chat_template", None):
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        return encode(tok, rendered, special=False)
    return encode(tok, text)


def request_text(task: Task, req: ScoreRequest) -> str:
    """The text the target reads (before any chat template)."""
    return task.render(req.prompt, req.query, req.demos)


def check_label(task: Task, req: ScoreRequest) -> None:
    if task.type == "classification" and req.label not in task.verbalizers:
        raise TargetError(f"task '{task.name}': gold label '{req.label}' is not one of {list(task.labels)}")


def predicted_label(task: Task, label_nll: Sequence[float]) -> int:
    """The index of the label the target rates most likely: the lowest mean token NLL (ties: the earlier)."""
    return min(range(len(task.labels)), key=lambda i: label_nll[i])


def predicted_answer(reply: str | None) -> str | None:
    """The number a math reply answers with, as text (None when it holds none)."""
    pred = extract_number(reply)
    return None if pred is None else repr(pred)


def classify(task: Task, req: ScoreRequest, label_nll: Sequence[float], tokens: int, calls: int) -> Components:
    """Components from the mean token NLL of each label's verbalizer (in ``task.labels`` order)."""
    best = predicted_label(task, label_nll)
    gold = task.labels.index(req.label)
    return Components(correct=float(best == gold), nll=float(label_nll[gold]), tokens=tokens, calls=calls,
                      pred=task.labels[best])


def grade_math(task: Task, req: ScoreRequest, reply: str, response_nll: float, tokens: int,
               calls: int) -> Components:
    """Components from a math reply: the extracted number against the gold answer."""
    pred = extract_number(reply)
    ok = answers_match(pred, req.label, task.tolerance)
    return Components(correct=float(ok), nll=float(response_nll), tokens=tokens, calls=calls, reply=reply,
                      pred=predicted_answer(reply))


def mean_nll(logprobs: Sequence[float]) -> float:
    """Mean negative log-probability; 0.0 for an empty response."""
    return -sum(logprobs) / len(logprobs) if logprobs else 0.0


def oversized(i: int, n_tokens: int, limit: int, what: str) -> TargetError:
    return TargetError(f"oversized request #{i}: {what} needs {n_tokens} tokens > target.max_length={limit} "
                       f"(raise target.max_length or shorten the prompt/query)")
