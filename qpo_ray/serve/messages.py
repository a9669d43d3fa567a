"""What a request to the policy service may hold: the request/response models and the body-size limit.

The models validate what FastAPI can (types, ranges, one of ``query``/``queries``, no empty query); limits
that depend on the served config (query count and length) are checked by the deployment.
"""

# No `from __future__ import annotations`: FastAPI reads these models' annotations inside Serve replicas.
import json
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from qpo_ray.config import REWARD_SCALE, ServeConfig
from qpo_ray.serve.http import check_text

REWARD_MIN, REWARD_MAX = REWARD_SCALE  # the normalised reward scale the policy is conditioned on


def _query(text: str) -> str:
    check_text(text)
    if not text.strip():
        raise ValueError("empty or whitespace-only query: there is nothing to write a prompt for")
    return text


Query = Annotated[str, AfterValidator(_query)]
Text = Annotated[str, AfterValidator(check_text)]


class PromptRequest(BaseModel):
    """One query or a list of queries. Limits on count and length are checked against the served config."""

    model_config = ConfigDict(extra="forbid")

    queries: list[Query] | None = Field(None, min_length=1, description="queries (one or many, none empty)")
    query: Query | None = Field(None, description="a single query (instead of `queries`)")
    task: Text | None = Field(None, description="must match the served task when given")
    target_reward: float | None = Field(None, ge=REWARD_MIN, le=REWARD_MAX, allow_inf_nan=False,
                                        description="reward to condition on (0–100); default: the served "
                                                    "eval.target_reward, the one the policy was evaluated at")

    @model_validator(mode="after")
    def _one_of(self) -> "PromptRequest":
        if (self.queries is None) == (self.query is None):
            raise ValueError("give exactly one of 'query' or 'queries'")
        return self

    def query_list(self) -> list[str]:
        return self.queries if self.queries is not None else [self.query or ""]


class PromptItem(BaseModel):
    query: str
    prompt: str


class PromptResponse(BaseModel):
    prompts: list[PromptItem]
    policy: str
    task: str
    target_reward: float


class AnswerItem(PromptItem):
    """The target's answer to prompt + query, read the way the task is scored."""

    input: str = Field(description="what the target read: the task template filled with prompt and query")
    answer: str | None = Field(description="label mode: the label the target rates most likely; math mode: the "
                                           "number extracted from the reply, as text (null when it has none)")
    score: float | None = Field(None, description="label mode: the mean token log-probability of the answer's "
                                                  "verbalizer")
    label_scores: dict[str, float] | None = Field(None, description="label mode: every label's")
    reply: str | None = Field(None, description="math mode: the target's greedy reply")


class AnswerResponse(BaseModel):
    answers: list[AnswerItem]
    mode: Literal["label", "math"] = Field(description="label: a classification task's labels ranked by the "
                                                       "target's likelihood; math: the number in its reply")
    policy: str
    task: str
    target: str
    target_reward: float


# -- the body limit --------------------------------------------------------------------------------------
def max_body_bytes(scfg: ServeConfig) -> int:
    """The body bound: every query at its longest, JSON-escaped at worst (12 bytes a character), + slack."""
    return scfg.max_queries_per_request * (scfg.max_query_chars * 12 + 16) + 64 * 1024


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit()`` bytes, checked on Content-Length and while reading.

    The body is read here before the app sees it (FastAPI reads it whole anyway): an error raised from inside
    the app's body read would come out as FastAPI's generic 400."""

    def __init__(self, app, limit: Callable[[], int]):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit()
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._reject(send, limit)
        buffered, seen = [], 0
        while True:
            msg = await receive()
            buffered.append(msg)
            if msg["type"] != "http.request":
                break
            seen += len(msg.get("body", b""))
            if seen > limit:
                return await self._reject(send, limit)
            if not msg.get("more_body", False):
                break

        async def replay():
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _reject(send, limit: int) -> None:
        body = json.dumps({"detail": f"request body over {limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


__all__ = ["AnswerItem", "AnswerResponse", "BodyLimit", "PromptItem", "PromptRequest", "PromptResponse",
           "max_body_bytes"]
