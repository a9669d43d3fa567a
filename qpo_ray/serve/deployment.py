"""The trained policy behind HTTP: a Ray Serve deployment with a FastAPI ingress.

Endpoints
- ``POST /v1/prompts``: ``{"query": "..."}`` or ``{"queries": [...]}`` (+ optional ``task``, ``target_reward``,
  default the served one) → ``{"prompts": [{"query", "prompt"}], "policy", "task", "target_reward"}``;
- ``POST /v1/answer``: the same, then asks the configured target (an OpenAI-compatible server,
  ``target.engine = openai``) the way the task is scored, through the scoring engine's own calls
  (``OpenAIEngine``): a classification task's answer is the label whose verbalizer the target rates most
  likely (``"mode": "label"``, with every label's score), a math task's the number extracted from the
  target's greedy reply (``"mode": "math"``, with the reply); 503 when no target is set;
- ``GET /healthz``: liveness, batching counters of the replica that answers, and the inference settings it
  serves with where each came from (``qpo_ray.policy.served``);
- ``/docs`` and ``/openapi.json``: FastAPI's own.

The prompts are ``qpo_ray.policy.inference.policy_prompts``'s, with the settings the policy folder's
``inference.json`` records (the evaluation's headline method, its default prompt and margin, its seed), so a
query gets the prompt the evaluation measured.

Status codes: 401 missing/wrong key when ``serve.api_key_env`` is set, checked before the body is read (a
named variable that is unset or empty stops the replica from starting: it never serves without the key);
422 malformed body (not JSON, a key twice in one object, wrong types, ``target_reward`` not a JSON number,
outside 0–100 or not finite, empty list, unknown field, both or neither of ``query``/``queries``, another
task than the one served, a query with nothing but whitespace, control or zero-width characters, text with
a lone surrogate); 413 over a limit (more than ``serve.max_queries_per_request`` queries, a query longer
than ``serve.max_query_chars`` characters, or a body over the byte bound derived from both); for
``/v1/answer``, 502 when the target fails, 503 when none is configured or the replica holds its most
answers already, 504 when ``serve.answer_timeout_s`` (the total deadline, retries included) passes. Every
error body is JSON (``qpo_ray.http_api``), even when it echoes a value JSON cannot hold.

An empty query is rejected, not answered: the policy never saw one in training (the dataset schema refuses
empty queries), so a prompt for it would be noise that looks like an answer.

Concurrent requests are batched per replica (``score.batcher``: the next batch forms when the policy is
free): one ``policy_prompts`` call per batch (per distinct ``target_reward`` in it). A batch holds at most
``serve.max_batch_queries`` queries: a bigger request is generated in slices that take turns with the other
requests, so a small request is not stuck behind big ones. A request that fails in generation fails alone
(500, JSON); the others of its batch get their prompts. ``/v1/answer`` may hold at most half of the
replica's ``serve.max_ongoing_requests``, so a hung target cannot starve ``/healthz`` and ``/v1/prompts``.
Built and deployed by ``qpo_ray.serve.app``; ``build_api`` is the same app without Serve (tests).
"""

# No `from __future__ import annotations` here: Serve rebuilds the FastAPI routes inside the replica from the
# methods' annotations, and string annotations cannot be resolved there (the class is pickled by value).
import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Security
from fastapi.security import APIKeyHeader, HTTPBearer
from ray import serve

from qpo_ray.config import ServeConfig
from qpo_ray.errors import ConfigError, QPOError, TargetError
from qpo_ray.http_api import install_error_handlers
from qpo_ray.openai_http import TargetTimeout
from qpo_ray.policy.inference import InferenceSettings, policy_prompts
from qpo_ray.policy.served import Served
from qpo_ray.score.batcher import EngineBatcher
from qpo_ray.score.engines.openai_engine import OpenAIEngine
from qpo_ray.serve.answer import answer_mode, read_answer
from qpo_ray.serve.messages import (
    AnswerItem,
    AnswerResponse,
    PromptItem,
    PromptRequest,
    PromptResponse,
    RequestGate,
    max_body_bytes,
)
from qpo_ray.tasks import Task, load_task

log = logging.getLogger("qpo_ray.serve")

DEPLOYMENT_NAME = "QPOPolicyService"


def policy_name(policy_dir: str | Path) -> str:
    """``RUN/policy/loop-2`` → ``RUN-name/loop-2``; any other folder → its name."""
    p = Path(policy_dir)
    return f"{p.parent.parent.name}/{p.name}" if p.parent.name == "policy" else p.name


def api_key(scfg: ServeConfig, environ: Mapping[str, str] = os.environ) -> str:
    """The key requests must send; "" when ``serve.api_key_env`` is not set. A named variable that is unset or
    blank is a ConfigError: auth fails closed, the service does not start without its key."""
    name = scfg.api_key_env
    if not name:
        return ""
    key = environ.get(name, "")
    if not key.strip():
        raise ConfigError(f"serve.api_key_env={name}, but the variable {name} is "
                          f"{'empty' if name in environ else 'unset'}"
                          f": export {name}=<the key clients must send>, or leave serve.api_key_env unset to serve "
                          "without a key")
    return key


def generate_batch(policy: Any, items: list[tuple[list[str], float]], settings: InferenceSettings) -> list[list[str]]:
    """Prompts for a batch of requests ``(queries, target_reward)``, one list per request, in order, by the
    served settings (``qpo_ray.policy.inference.policy_prompts``, the evaluation's function)."""
    out: list[list[str]] = [[] for _ in items]
    # The policy is conditioned on one reward per call: one call per distinct value (usually just one).
    for reward in dict.fromkeys(r for _, r in items):
        idx = [i for i, (_, r) in enumerate(items) if r == reward]
        flat = [q for i in idx for q in items[i][0]]
        prompts = policy_prompts(policy, flat, replace(settings, target_reward=reward))
        pos = 0
        for i in idx:
            n = len(items[i][0])
            out[i] = prompts[pos:pos + n]
            pos += n
    return out


# -- one replica -------------------------------------------------------------------------------------------
class Replica:
    """What one replica holds: one policy copy, its batcher, the key, the target's engine, the counters."""

    def __init__(self, policy_dir: str, served: dict[str, Any]):
        import torch

        from qpo_ray.policy.model import QPOPolicy

        self.served = Served.from_dict(served)
        self.cfg, self.settings = self.served.cfg, self.served.settings
        self.scfg = self.cfg.serve
        self.key = api_key(self.scfg)  # first: a replica without its key must not start
        self.name = policy_name(policy_dir)
        self.body_limit = max_body_bytes(self.scfg)
        self.policy = QPOPolicy.load(policy_dir, device="cuda" if torch.cuda.is_available() else "cpu")
        # The policy generates in the batcher's thread, so the replica's event loop stays free (health
        # checks, requests arriving for the next batch).
        self.batcher = EngineBatcher(self._generate_batch, self.scfg.max_batch_size, self.scfg.batch_wait_timeout_s,
                                     max_batch_cost=self.scfg.max_batch_queries)
        self.max_answers = max(1, self.scfg.max_ongoing_requests // 2)
        self.answering = 0
        self._task: Task | None = None  # loaded on the first /v1/answer: prompts alone never need the task file
        self._engine: OpenAIEngine | None = None  # the target's scoring engine, built on the first /v1/answer
        self.started = time.time()
        self.requests = 0
        self.batches = 0
        self.max_batch_seen = 0
        self.recent_batch_sizes: deque[int] = deque(maxlen=50)

    # -- batching -------------------------------------------------------------------------------------
    def _generate_batch(self, items: list[tuple[list[str], float]]) -> list[list[str]]:
        self.batches += 1
        self.max_batch_seen = max(self.max_batch_seen, len(items))
        self.recent_batch_sizes.append(len(items))
        return generate_batch(self.policy, items, self.settings)

    # -- requests -------------------------------------------------------------------------------------
    def check(self, req: PromptRequest) -> list[str]:
        queries = req.query_list()
        if len(queries) > self.scfg.max_queries_per_request:
            raise HTTPException(413, f"{len(queries)} queries: at most {self.scfg.max_queries_per_request} "
                                     "per request (serve.max_queries_per_request)")
        for i, q in enumerate(queries):
            if len(q) > self.scfg.max_query_chars:
                raise HTTPException(413, f"query {i} has {len(q)} characters: at most "
                                         f"{self.scfg.max_query_chars} (serve.max_query_chars)")
        if req.task is not None and req.task != self.cfg.task.name:
            # The shape of FastAPI's own 422 body, which the OpenAPI description promises.
            raise HTTPException(422, [{"type": "value_error", "loc": ["body", "task"], "input": req.task,
                                       "msg": f"this service serves task '{self.cfg.task.name}', not '{req.task}'"}])
        return queries

    def reward(self, req: PromptRequest) -> float:
        return self.settings.target_reward if req.target_reward is None else float(req.target_reward)

    async def prompts(self, req: PromptRequest) -> list[PromptItem]:
        queries = self.check(req)
        self.requests += 1
        reward, size = self.reward(req), self.scfg.max_batch_queries
        # Slices of one request form one batcher group: they take turns with other requests' (score.batcher).
        group = object()
        parts = [asyncio.ensure_future(self.batcher.submit((queries[i:i + size], reward), cost=len(queries[i:i + size]),
                                                           group=group))
                 for i in range(0, len(queries), size)]
        try:
            prompts = [p for part in await asyncio.gather(*parts) for p in part]
        except Exception as e:  # this request's own failure (the batcher isolates it): say what, as JSON
            for part in parts:
                part.cancel()
            log.exception("generation failed for a request of %d queries", len(queries))
            raise HTTPException(500, f"generation failed for this request: {type(e).__name__}: {e}") from None
        return [PromptItem(query=q, prompt=p) for q, p in zip(queries, prompts, strict=True)]

    async def answer(self, req: PromptRequest, deadline: float) -> tuple[list[AnswerItem], Task]:
        items = await self.prompts(req)
        try:
            task, engine = self._target() if self._engine is not None else await asyncio.to_thread(self._target)
            inputs = [self._render(it.prompt, it.query) for it in items]
        except QPOError as e:  # a task file the service cannot read: say which, not a bare 500
            raise HTTPException(500, f"cannot render the target input: {e}") from None
        loop = asyncio.get_running_loop()
        # Off the event loop, on the engine's pool (target.max_concurrency threads); each call stops at the
        # deadline, so a hung target holds a thread no longer than this request.
        answers = await asyncio.gather(*(loop.run_in_executor(engine.pool, read_answer, engine, task, x, deadline)
                                         for x in inputs))
        return [AnswerItem(query=it.query, prompt=it.prompt, input=x, **a)
                for it, x, a in zip(items, inputs, answers, strict=True)], task

    def _target(self) -> tuple[Task, OpenAIEngine]:
        """The served task and an ``OpenAIEngine`` for the configured target, built once."""
        if self._task is None:
            self._task = load_task(self.cfg.task.name)
        if self._engine is None:
            self._engine = OpenAIEngine(self.cfg.target, self._task)
        return self._task, self._engine

    def _render(self, prompt: str, query: str) -> str:
        """The target's input, as in scoring: the task template, with demonstrations in the few-shot setting."""
        demos = None
        if self.cfg.task.setting == "few_shot":
            demos = self._task.demo_sets(1, self.cfg.task.num_demos, self.cfg.seed, exclude_query=query)[0]
        return self._task.render(prompt, query, demos)

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "policy": self.name, "task": self.cfg.task.name,
                "uptime_s": round(time.time() - self.started, 1), "requests": self.requests,
                "batches": self.batches, "max_batch_seen": self.max_batch_seen,
                "recent_batch_sizes": list(self.recent_batch_sizes),
                "max_batch_size": self.scfg.max_batch_size, "max_batch_queries": self.scfg.max_batch_queries,
                "answers_in_flight": self.answering, "auth": bool(self.key),
                "method": self.settings.method, "inference": self.served.describe()}


# -- the HTTP API ----------------------------------------------------------------------------------------
# The key is checked by RequestGate before FastAPI reads the body; these schemes only document it in the
# OpenAPI description (/docs, schemathesis).
_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="or `X-API-Key: <key>`")
_AUTH = [Security(_bearer), Security(_api_key)]
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or wrong API key (only when serve.api_key_env is set)"},
    413: {"description": "too many queries, a query too long, or a body too large"},
    500: {"description": "this request failed in generation (the others of its batch did not)"},
}
_ANSWER_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS, 502: {"description": "the target failed"},
    503: {"description": "no target configured, or this replica holds its most /v1/answer calls (retry later)"},
    504: {"description": "no answer within serve.answer_timeout_s (the target is slow or does not answer)"},
}


def build_api(rep: Replica) -> FastAPI:
    """The service's FastAPI app over one replica's state (what each Serve replica runs)."""
    api = FastAPI(
        title="qpo_ray policy service",
        version="1",
        description="Query-dependent prompts from a trained QPO policy, by the method and settings it was "
                    "evaluated with: its own prompt at a target reward (greedy or beam), best-of-N ranked by "
                    "its reward head, or candidate prompts reranked by it (GET /healthz shows which).",
    )
    api.add_middleware(RequestGate, limit=lambda: rep.body_limit, key=lambda: rep.key)
    install_error_handlers(api)

    @api.post("/v1/prompts", response_model=PromptResponse, summary="optimised prompt(s) for query(ies)",
              responses=_ERRORS, dependencies=_AUTH)
    async def prompts(req: PromptRequest) -> PromptResponse:
        items = await rep.prompts(req)
        return PromptResponse(prompts=items, policy=rep.name, task=rep.cfg.task.name, target_reward=rep.reward(req))

    @api.post("/v1/answer", response_model=AnswerResponse,
              summary="prompt(s), then the configured target's answer to prompt + query, read as the task is scored",
              responses=_ANSWER_ERRORS, dependencies=_AUTH)
    async def answer(req: PromptRequest) -> AnswerResponse:
        t, limit = rep.cfg.target, rep.scfg.answer_timeout_s
        if t.engine != "openai":
            raise HTTPException(503, f"no target configured for answers: target.engine is '{t.engine}'; set "
                                     "target.engine=openai and target.base_url to an OpenAI-compatible server")
        if rep.answering >= rep.max_answers:
            raise HTTPException(503, f"{rep.answering} /v1/answer calls in flight on this replica, the most it takes "
                                     "(half of serve.max_ongoing_requests): retry later",
                                headers={"Retry-After": "1"})
        rep.answering += 1
        try:
            items, task = await asyncio.wait_for(rep.answer(req, time.monotonic() + limit), limit)
        except (asyncio.TimeoutError, TargetTimeout):
            raise HTTPException(504, f"no answer within serve.answer_timeout_s={limit:g} s: the target at "
                                     f"{t.base_url} is slow or does not answer") from None
        except TargetError as e:
            raise HTTPException(502, str(e)) from None  # the engine's message names the target's URL
        finally:
            rep.answering -= 1
        return AnswerResponse(answers=items, mode=answer_mode(task), policy=rep.name, task=rep.cfg.task.name,
                              target=t.model, target_reward=rep.reward(req))

    @api.get("/healthz", summary="liveness, this replica's batching counters and the inference settings it serves")
    async def healthz() -> dict[str, Any]:
        return rep.health()

    return api


# -- the deployment ----------------------------------------------------------------------------------------
@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class PolicyService:
    """One policy copy per replica; concurrent requests on a replica are batched into one generation."""

    def __init__(self, policy_dir: str, served: dict[str, Any]):
        self.replica = Replica(policy_dir, served)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.replica)


__all__ = ["DEPLOYMENT_NAME", "PolicyService", "Replica", "api_key", "build_api", "generate_batch", "policy_name"]
