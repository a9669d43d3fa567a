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

Status codes: 422 malformed body (wrong types, empty list, unknown field, both or neither of
``query``/``queries``, another task than the one served, ``target_reward`` outside 0–100 or not finite, an
empty or whitespace-only query, text with a lone surrogate); 413 over a limit (more than
``serve.max_queries_per_request`` queries, a query longer than ``serve.max_query_chars`` characters, or a
body over the byte bound derived from both); 401 missing/wrong key when ``serve.api_key_env`` names a
set variable. Every error body is JSON (``qpo_ray.serve.http``), even when it echoes a value JSON cannot hold.

An empty or whitespace-only query is rejected, not answered: the policy never saw one in training (the
dataset schema refuses empty queries), so a prompt for it would be noise that looks like an answer.

Concurrent requests are batched per replica (``score.batcher``: the next batch forms when the policy is
free): one ``policy_prompts`` call per batch (per distinct ``target_reward`` in it). A request that fails
in generation fails alone (500, JSON); the others of its batch get their prompts. Built and
deployed by ``qpo_ray.serve.app``.
"""

# No `from __future__ import annotations` here: Serve rebuilds the FastAPI routes inside the replica from the
# methods' annotations, and string annotations cannot be resolved there (the class is pickled by value).
import asyncio
import hmac
import logging
import os
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from ray import serve

from qpo_ray.config import ServeConfig
from qpo_ray.errors import QPOError, TargetError
from qpo_ray.policy.inference import InferenceSettings, policy_prompts
from qpo_ray.policy.served import Served
from qpo_ray.score.batcher import EngineBatcher
from qpo_ray.score.engines.openai_engine import OpenAIEngine
from qpo_ray.serve.answer import answer_mode, read_answer
from qpo_ray.serve.http import install_error_handlers
from qpo_ray.serve.messages import (
    AnswerItem,
    AnswerResponse,
    BodyLimit,
    PromptItem,
    PromptRequest,
    PromptResponse,
    max_body_bytes,
)
from qpo_ray.tasks import Task, load_task

log = logging.getLogger("qpo_ray.serve")

DEPLOYMENT_NAME = "QPOPolicyService"


def policy_name(policy_dir: str | Path) -> str:
    """``RUN/policy/loop-2`` → ``RUN-name/loop-2``; any other folder → its name."""
    p = Path(policy_dir)
    return f"{p.parent.parent.name}/{p.name}" if p.parent.name == "policy" else p.name


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


# -- the deployment ---------------------------------------------------------------------------------------
api = FastAPI(
    title="qpo_ray policy service",
    version="1",
    description="Query-dependent prompts from a trained QPO policy, by the method and settings it was evaluated "
                "with: its own prompt at a target reward (greedy or beam), best-of-N ranked by its reward head, "
                "or candidate prompts reranked by it (GET /healthz shows which).",
)
# The body bound comes from the served config, known only when a replica starts; a replica owns its worker
# process, so a module global holds it. Read and set through module-level functions: the deployment class
# is pickled by value, and a global it touched directly would be a copy, not this module's.
_LIMIT = {"bytes": max_body_bytes(ServeConfig())}


def body_limit() -> int:
    return _LIMIT["bytes"]


def set_body_limit(n: int) -> None:
    _LIMIT["bytes"] = n


# Before @serve.ingress: it freezes a copy of the app.
api.add_middleware(BodyLimit, limit=body_limit)
install_error_handlers(api)

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="or `X-API-Key: <key>`")
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or wrong API key (only when serve.api_key_env names a set variable)"},
    413: {"description": "too many queries, a query too long, or a body too large"},
    500: {"description": "this request failed in generation (the others of its batch did not)"},
}
Bearer = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
ApiKey = Annotated[str | None, Security(_api_key)]


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class PolicyService:
    """One policy copy per replica; concurrent requests on a replica are batched into one generation."""

    def __init__(self, policy_dir: str, served: dict[str, Any]):
        import torch

        from qpo_ray.policy.model import QPOPolicy

        self.served = Served.from_dict(served)
        self.cfg, self.settings = self.served.cfg, self.served.settings
        self.scfg = self.cfg.serve
        self.name = policy_name(policy_dir)
        set_body_limit(max_body_bytes(self.scfg))
        self.policy = QPOPolicy.load(policy_dir, device="cuda" if torch.cuda.is_available() else "cpu")
        # The policy generates in the batcher's thread, so the replica's event loop stays free (health
        # checks, requests arriving for the next batch).
        self.batcher = EngineBatcher(self._generate_batch, self.scfg.max_batch_size, self.scfg.batch_wait_timeout_s)
        env = self.scfg.api_key_env
        self._key = os.environ.get(env, "") if env else ""
        if env and not self._key:
            log.warning("serve.api_key_env=%s but the variable is unset or empty here: no key required", env)
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

    # -- request handling ----------------------------------------------------------------------------
    def _authorize(self, bearer: HTTPAuthorizationCredentials | None, key: str | None) -> None:
        if not self._key:
            return
        given = bearer.credentials if bearer is not None else key
        if not given or not hmac.compare_digest(given.encode(), self._key.encode()):
            raise HTTPException(401, "missing or wrong API key (Authorization: Bearer <key> or X-API-Key)",
                                headers={"WWW-Authenticate": "Bearer"})

    def _check(self, req: PromptRequest) -> list[str]:
        queries = req.query_list()
        if len(queries) > self.scfg.max_queries_per_request:
            raise HTTPException(413, f"{len(queries)} queries: at most {self.scfg.max_queries_per_request} "
                                     "per request (serve.max_queries_per_request)")
        for i, q in enumerate(queries):
            if len(q) > self.scfg.max_query_chars:
                raise HTTPException(413, f"query {i} has {len(q)} characters: at most "
                                         f"{self.scfg.max_query_chars} (serve.max_query_chars)")
        if req.task is not None and req.task != self.cfg.task.name:
            raise HTTPException(422, f"this service serves task '{self.cfg.task.name}', not '{req.task}'")
        return queries

    def _reward(self, req: PromptRequest) -> float:
        return self.settings.target_reward if req.target_reward is None else float(req.target_reward)

    async def _prompts(self, req: PromptRequest) -> list[PromptItem]:
        queries = self._check(req)
        self.requests += 1
        try:
            prompts = await self.batcher.submit((queries, self._reward(req)))
        except Exception as e:  # this request's own failure (the batcher isolates it): say what, as JSON
            log.exception("generation failed for a request of %d queries", len(queries))
            raise HTTPException(500, f"generation failed for this request: {type(e).__name__}: {e}") from None
        return [PromptItem(query=q, prompt=p) for q, p in zip(queries, prompts, strict=True)]

    @api.post("/v1/prompts", response_model=PromptResponse, summary="optimised prompt(s) for query(ies)",
              responses=_ERRORS)
    async def prompts(self, req: PromptRequest, bearer: Bearer, key: ApiKey) -> PromptResponse:
        self._authorize(bearer, key)
        items = await self._prompts(req)
        return PromptResponse(prompts=items, policy=self.name, task=self.cfg.task.name,
                              target_reward=self._reward(req))

    @api.post("/v1/answer", response_model=AnswerResponse,
              summary="prompt(s), then the configured target's answer to prompt + query, read as the task is scored",
              responses={**_ERRORS, 502: {"description": "the target failed"},
                         503: {"description": "no target configured"}})
    async def answer(self, req: PromptRequest, bearer: Bearer, key: ApiKey) -> AnswerResponse:
        self._authorize(bearer, key)
        t = self.cfg.target
        if t.engine != "openai":
            raise HTTPException(503, f"no target configured for answers: target.engine is '{t.engine}'; set "
                                     "target.engine=openai and target.base_url to an OpenAI-compatible server")
        items = await self._prompts(req)
        try:
            task, engine = self._target()
            inputs = [self._render(it.prompt, it.query) for it in items]
        except QPOError as e:  # a task file the service cannot read: say which, not a bare 500
            raise HTTPException(500, f"cannot render the target input: {e}") from None
        loop = asyncio.get_running_loop()
        try:
            # Off the event loop, on the engine's pool (target.max_concurrency threads).
            answers = await asyncio.gather(*(loop.run_in_executor(engine.pool, read_answer, engine, task, x)
                                             for x in inputs))
        except TargetError as e:
            raise HTTPException(502, str(e)) from None  # the engine's message names the target's URL
        return AnswerResponse(answers=[AnswerItem(query=it.query, prompt=it.prompt, input=x, **a)
                                       for it, x, a in zip(items, inputs, answers, strict=True)],
                              mode=answer_mode(task), policy=self.name, task=self.cfg.task.name, target=t.model,
                              target_reward=self._reward(req))

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

    @api.get("/healthz", summary="liveness, this replica's batching counters and the inference settings it serves")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "policy": self.name, "task": self.cfg.task.name,
                "uptime_s": round(time.time() - self.started, 1), "requests": self.requests,
                "batches": self.batches, "max_batch_seen": self.max_batch_seen,
                "recent_batch_sizes": list(self.recent_batch_sizes),
                "max_batch_size": self.scfg.max_batch_size, "auth": bool(self._key),
                "method": self.settings.method, "inference": self.served.describe()}


__all__ = ["DEPLOYMENT_NAME", "PolicyService", "api", "generate_batch", "policy_name"]
