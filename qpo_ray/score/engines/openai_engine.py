"""Target engine over any OpenAI-compatible HTTP server (vLLM, Ray Serve LLM, ``qpo-ray serve-target``).

Classification: one ``POST /completions`` per request with the text + each verbalizer as a prompt list,
``echo: true, logprobs: 1``; a label's NLL is the mean over the echoed tokens that lie inside the
verbalizer (located by ``text_offset``). ``max_tokens`` is 1, not 0: vLLM rejects 0 and the one generated
token lies past the verbalizer, so it is ignored. Math: ``POST /chat/completions`` (the server applies the
model's chat template), greedy, ``logprobs: true`` for the reply's NLL.

Connection errors, timeouts, 429 and 5xx are retried with backoff and jitter (``qpo_ray.openai_http``, the
client the policy service uses too); a thread pool bounds the requests in flight. The API key comes from the
environment variable named by ``target.api_key_env``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from qpo_ray.config import TargetConfig
from qpo_ray.errors import TargetError
from qpo_ray.openai_http import TargetUnreachable, auth_headers, post_json
from qpo_ray.score.engines.base import (
    Components,
    ScoreRequest,
    TaskBook,
    check_label,
    classify,
    grade_math,
    mean_nll,
    request_text,
)
from qpo_ray.tasks import Task

log = logging.getLogger(__name__)
ECHO_MAX_TOKENS = 1


def label_token_logprobs(logprobs: dict[str, Any], start: int, end: int) -> list[float]:
    """Log-probs of the echoed tokens whose text starts inside ``[start, end)`` (the verbalizer)."""
    offsets, values = logprobs["text_offset"], logprobs["token_logprobs"]
    picked = [v for off, v in zip(offsets, values, strict=True) if start <= off < end]
    if not picked or any(v is None for v in picked):
        raise TargetError("the server's echoed logprobs do not cover the label tokens "
                          "(does it support echo with logprobs on /v1/completions?)")
    return [float(v) for v in picked]


class OpenAIEngine:
    def __init__(self, cfg: TargetConfig, tasks: Task | Iterable[Task] | None = None):
        self.cfg = cfg
        self.target = cfg.model
        self.book = TaskBook(tasks)
        self.base_url = cfg.base_url.rstrip("/")
        headers = auth_headers(cfg.api_key_env)
        limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=cfg.timeout_s, limits=limits)
        self.pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="qpo-openai")

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.http.close()

    def __getstate__(self):  # the client and pool are rebuilt where the engine is unpickled
        return {"cfg": self.cfg, "tasks": list(self.book.tasks.values())}

    def __setstate__(self, state):
        self.__init__(state["cfg"], state["tasks"])

    # -- HTTP -------------------------------------------------------------------------------------
    def post(self, path: str, body: dict[str, Any], deadline: float | None = None) -> dict[str, Any]:
        """POST under the shared retry policy (``qpo_ray.openai_http``); TargetError when it gives up,
        ``TargetTimeout`` when ``deadline`` (``time.monotonic()``) passes first."""
        url = f"{self.base_url}{path}"
        try:
            resp = post_json(self.http, path, body, self.cfg.retries, deadline)
        except TargetUnreachable as e:
            raise TargetError(f"target server {e}") from None
        if resp.status_code >= 400:
            raise TargetError(f"target server {url} rejected the request: HTTP {resp.status_code}: "
                              f"{resp.text[:300]}")
        try:
            return resp.json()
        except ValueError:
            raise TargetError(f"target server {url} sent a non-JSON reply: {resp.text[:200]}") from None

    # -- scoring ----------------------------------------------------------------------------------
    def score(self, requests: list[ScoreRequest]) -> list[Components]:
        return list(self.pool.map(self.score_one, requests))

    def score_one(self, req: ScoreRequest) -> Components:
        task = self.book.task(req)
        text = request_text(task, req)
        if task.type == "classification":
            return self._classify(task, req, text)
        return self._math(task, req, text)

    def _classify(self, task: Task, req: ScoreRequest, text: str) -> Components:
        check_label(task, req)
        nll, tokens = self.label_nlls(task, text)
        return classify(task, req, nll, tokens, calls=1)

    def _math(self, task: Task, req: ScoreRequest, text: str) -> Components:
        reply, nll, tokens = self.math_reply(text)
        return grade_math(task, req, reply, nll, tokens, calls=1)

    # -- the two calls, also what the policy service answers with -------------------------------------
    def label_nlls(self, task: Task, text: str, deadline: float | None = None) -> tuple[list[float], int]:
        """The mean token NLL of each label's verbalizer after ``text`` (``task.labels`` order), and the
        tokens the call used."""
        verbs = [task.verbalizers[lab] for lab in task.labels]
        body = {"model": self.cfg.model, "prompt": [text + v for v in verbs], "max_tokens": ECHO_MAX_TOKENS,
                "echo": True, "logprobs": 1, "temperature": 0.0}
        out = self.post("/completions", body, deadline)
        choices = sorted(out.get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != len(verbs):
            raise TargetError(f"target server {self.base_url}: {len(choices)} choices for {len(verbs)} prompts")
        nll = [mean_nll(label_token_logprobs(c["logprobs"], len(text), len(text) + len(v)))
               for c, v in zip(choices, verbs, strict=True)]
        return nll, _tokens(out)

    def math_reply(self, text: str, deadline: float | None = None) -> tuple[str, float, int]:
        """The target's greedy chat reply to ``text``, its mean token NLL, and the tokens the call used."""
        body = {"model": self.cfg.model, "messages": [{"role": "user", "content": text}],
                "max_tokens": self.cfg.max_new_tokens, "temperature": 0.0, "logprobs": True}
        out = self.post("/chat/completions", body, deadline)
        try:
            choice = out["choices"][0]
            reply = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise TargetError(f"target server {self.base_url}: no choices[0].message in the reply") from None
        content = (choice.get("logprobs") or {}).get("content") or []
        if not content and reply:
            log.warning("target server %s returned no logprobs; the reply's NLL is taken as 0", self.base_url)
        return reply, mean_nll([float(t["logprob"]) for t in content]), _tokens(out)


def _tokens(out: dict[str, Any]) -> int:
    usage = out.get("usage") or {}
    return int(usage.get("total_tokens") or usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0))
