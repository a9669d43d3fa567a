"""What a request to the policy service may hold: the request/response models and the gate every request
passes before FastAPI reads it (the API key, the body-size limit, duplicate JSON keys).

The models validate what FastAPI can (types, ranges, one of ``query``/``queries``, no empty query, a
``target_reward`` that is a JSON number); limits that depend on the served config (query count and length)
are checked by the deployment.
"""

# No `from __future__ import annotations`: FastAPI reads these models' annotations inside Serve replicas.
import hmac
import json
import unicodedata
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from qpo_ray.config import REWARD_SCALE, ServeConfig
from qpo_ray.http_api import check_text, json_safe

REWARD_MIN, REWARD_MAX = REWARD_SCALE  # the normalised reward scale the policy is conditioned on


def _blank(c: str) -> bool:
    # Whitespace, control characters (NUL, ...) and format characters (zero-width space, joiner, BOM, ...).
    return c.isspace() or unicodedata.category(c) in ("Cc", "Cf")


def _query(text: str) -> str:
    check_text(text)
    if all(_blank(c) for c in text):
        raise ValueError("empty or whitespace-only query (control and zero-width characters count as blank): "
                         "there is nothing to write a prompt for")
    return text


Query = Annotated[str, AfterValidator(_query)]
Text = Annotated[str, AfterValidator(check_text)]


class PromptRequest(BaseModel):
    """One query or a list of queries. Limits on count and length are checked against the served config."""

    model_config = ConfigDict(extra="forbid")

    queries: list[Query] | None = Field(None, min_length=1, description="queries (one or many, none empty)")
    query: Query | None = Field(None, description="a single query (instead of `queries`)")
    task: Text | None = Field(None, description="must match the served task when given")
    # strict: a JSON number; `true` or "50" is a client's mistake, not 1.0 or 50.0.
    target_reward: float | None = Field(None, ge=REWARD_MIN, le=REWARD_MAX, allow_inf_nan=False, strict=True,
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


# -- the gate ------------------------------------------------------------------------------------------------
# Open without a key: liveness and the API's description. Every other path needs the key (fails closed).
PUBLIC_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
UNAUTHORIZED = "missing or wrong API key (Authorization: Bearer <key> or X-API-Key)"


def max_body_bytes(scfg: ServeConfig) -> int:
    """The body bound: every query at its longest, JSON-escaped at worst (12 bytes a character), + slack."""
    return scfg.max_queries_per_request * (scfg.max_query_chars * 12 + 16) + 64 * 1024


def given_key(headers: dict[bytes, bytes]) -> str:
    """The key a request sends: ``Authorization: Bearer <key>``, else ``X-API-Key``."""
    scheme, _, cred = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() == "bearer" and cred.strip():
        return cred.strip()
    return headers.get(b"x-api-key", b"").decode("latin-1").strip()


def duplicate_key(body: bytes) -> str | None:
    """The first key a JSON object of ``body`` holds twice; None when there is none or it is not JSON (FastAPI
    then says what is wrong with it)."""
    found: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for k, _ in items:
            if k in seen and not found:
                found.append(k)
            seen.add(k)
        return {}

    try:
        json.loads(body, object_pairs_hook=pairs)
    except ValueError:
        return None
    return found[0] if found else None


class RequestGate:
    """ASGI middleware, in this order before FastAPI reads anything: 401 without the key (so an
    unauthenticated caller learns nothing about its body), 413 for a body over ``limit()`` bytes (on
    Content-Length and while reading), 422 for a JSON object with a key twice (Python's parser keeps the last
    one silently; the importer refuses them too).

    The body is read here before the app sees it (FastAPI reads it whole anyway): an error raised from inside
    the app's body read would come out as FastAPI's generic 400."""

    def __init__(self, app, limit: Callable[[], int], key: Callable[[], str]):
        self.app, self.limit, self.key = app, limit, key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        key = self.key()
        if key and _route(scope) not in PUBLIC_PATHS and not hmac.compare_digest(
                given_key(headers).encode("utf-8", "backslashreplace"), key.encode()):
            return await _reply(send, 401, {"detail": UNAUTHORIZED}, [(b"www-authenticate", b"Bearer")])
        limit = self.limit()
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _over(send, limit)
        buffered, seen = [], 0
        while True:
            msg = await receive()
            buffered.append(msg)
            if msg["type"] != "http.request":
                break
            seen += len(msg.get("body", b""))
            if seen > limit:
                return await _over(send, limit)
            if not msg.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in buffered if m["type"] == "http.request")
        dup = duplicate_key(body) if body else None
        if dup is not None:
            err = {"type": "duplicate_key", "loc": ["body", dup],
                   "msg": f"key {dup!r} appears twice in one JSON object: send each key once"}
            return await _reply(send, 422, {"detail": [json_safe(err)]})

        async def replay():
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)


def _route(scope) -> str:
    """The path inside the app (Serve mounts it under a route prefix, the scope's root_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


async def _over(send, limit: int) -> None:
    await _reply(send, 413, {"detail": f"request body over {limit} bytes"})


async def _reply(send, status: int, doc: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(doc).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


__all__ = ["PUBLIC_PATHS", "AnswerItem", "AnswerResponse", "PromptItem", "PromptRequest", "PromptResponse",
           "RequestGate", "duplicate_key", "given_key", "max_body_bytes"]
